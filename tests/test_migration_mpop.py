"""``postbote import`` of an .mpoprc (issue 15, Migration): accounts, defaults and inheritance, TLS, passwords,
deliveries, and what does not carry over."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import yaml
from postbote.cli import main
from postbote.config import load_config
from postbote.migrate import without_sender
from postbote.pluginmanager import make_plugin_manager

DATA = Path(__file__).parent / "data" / "migration"


def test_an_mpoprc_becomes_a_config_postbote_reads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["import", str(DATA / "mpoprc"), "--secrets-dir", str(tmp_path / "secrets")]) == 0  # recognised
    out, err = capsys.readouterr()
    accounts = {account["name"]: account for account in yaml.safe_load(out)["accounts"]}
    assert accounts["isp"] == {
        "name": "isp", "host": "pop.isp.example", "username": "joe.sixpack",  # tls on, tls_starttls off: 995
        "password_command": ["/bin/sh", "-c", "pass show mail/isp"], "keep": True, "max_size": 10 * 1024 * 1024,
        "deliver": {"maildir": "~/Mail/isp"}}
    old = accounts["old"]  # copies isp, then says otherwise
    assert old["tls"] == "starttls" and "port" not in old and "keep" not in old and old["fetch_all"] is True
    assert old["username"] == "joe old" and "password_command" not in old  # its own password wins
    secret = Path(old["password_file"])
    assert secret.read_text() == '0ld "pw"\n' and stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert old["deliver"] == {"mda": ["/usr/bin/procmail", "-d", "joe"]}  # -f '%F' dropped whole
    assert "0ld" not in out + err
    for words in ("mpoprc:14: killsize 50m", "mpoprc:22: tls_fingerprint", "mpoprc:23: delivery"):
        assert words in err
    assert "postbote import-state isp ~/.local/share/mpop/uidls" in out
    assert "openssl s_client -connect pop.old.example:110 -starttls pop3" in out
    path = tmp_path / "postbote.yaml"
    path.write_text(f"state_dir: {tmp_path / 'state'}\n" + out)
    assert [a.name for a in load_config(path, make_plugin_manager(entry_points=False)).accounts] == ["isp", "old"]


@pytest.mark.parametrize(("text", "words"), [
    ("host x\n", "mpoprc:1: 'host' before any 'defaults' or 'account'"),
    ("account a : b\nhost x\n", "mpoprc:1: account 'a' copies 'b', which is not defined above"),
    ('account a\nhost x\nuser "u\n', "mpoprc:3: unterminated quoted argument"),
    ("account a\nuser u\n", "mpoprc:1: account 'a' has no host"),
])
def test_a_broken_mpoprc_is_one_error_with_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         text: str, words: str) -> None:
    rc = tmp_path / "mpoprc"
    rc.write_text(text)
    assert main(["import", "--from", "mpop", str(rc)]) == 2
    assert words in capsys.readouterr().err


def test_the_sender_placeholder_goes_with_the_option_that_introduced_it() -> None:
    assert without_sender("/usr/bin/procmail -f '%F' -d joe") == "/usr/bin/procmail -d joe"
    assert without_sender('maildrop -f "%F"') == "maildrop"
    assert without_sender("deliver %F -x") == "deliver -x"
