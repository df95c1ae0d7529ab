"""``postbote import`` of getmail rc files (issue 15, Migration): retriever types, destinations and options mapped
onto postbote's keys, passwords in 0600 files, what does not carry over listed with its reason."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest
import yaml
from postbote.cli import main
from postbote.config import load_config
from postbote.pluginmanager import make_plugin_manager

DATA = Path(__file__).parent / "data" / "migration"


def imported(tmp_path: Path, capsys: pytest.CaptureFixture[str], *names: str) -> tuple[dict[str, Any], str, str]:
    status = main(["import", *(str(DATA / name) for name in names), "--secrets-dir", str(tmp_path / "secrets")])
    out, err = capsys.readouterr()
    assert status == 0, err
    path = tmp_path / "postbote.yaml"
    path.write_text(f"state_dir: {tmp_path / 'state'}\n" + out)
    load_config(path, make_plugin_manager(entry_points=False))  # a config postbote reads without a problem
    return {account["name"]: account for account in yaml.safe_load(out)["accounts"]}, out, err


def test_an_imap_ssl_retriever_with_a_password_command_an_mda_and_options(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    accounts, out, err = imported(tmp_path, capsys, "getmailrc-imap")
    assert accounts["alice@imap.example.com"] == {
        "name": "alice@imap.example.com", "protocol": "imap", "host": "imap.example.com",
        "tls_fingerprint": "ab:cd:ef:01:23:45:67:89:ab:cd:ef:01:23:45:67:89:ab:cd:ef:01:23:45:67:89:ab:cd:ef:01:23:"
                           "45:67:89",  # getmail's fingerprints are SHA-256 already
        "username": "alice", "password_command": ["/usr/bin/pass", "show", "mail/alice"],
        "keep": True,  # delete = false
        "delete_after": "7d",  # getmail's days
        "max_messages": 100, "folders": ["INBOX", "Lists.postbote"],
        "deliver": {"mda": ["/usr/bin/procmail", "-f", "%(sender)", "-d", "alice"]}}
    assert not (tmp_path / "secrets").exists()  # a password command: no secret to write
    for words in ("[options] verbose = 2",
                  "[options] message_log", "[destination] %(sender)", "[filter-spam] type = Filter_classifier"):
        assert words in err and words in out
    assert "getmailrc-imap:16: [options] verbose = 2" in err  # FILE:LINE
    assert "oldmail-imap.example.com-993-alice-INBOX" in out  # how to import the state


def test_a_plain_pop3_retriever_into_a_maildir_deleting_after_delivery(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    accounts, out, err = imported(tmp_path, capsys, "getmailrc-pop")
    account = accounts["bob@example.org"]  # the user name is an address: it names the account alone
    assert account["tls"] == "none" and account["port"] == 1110
    assert "keep" not in account and "fetch_all" not in account  # delete = true: read_all changes nothing
    assert account["max_size"] == 5000000
    assert account["deliver"] == {"maildir": "~/Maildir"}
    secret = Path(account["password_file"])
    assert secret.read_text() == "s3cret pass\n" and stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert "s3cret" not in out + err
    assert "tls: starttls" in out  # getmail talked in the clear: the comment says how not to


def test_multidrop_and_multidestination(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    accounts, out, err = imported(tmp_path, capsys, "getmailrc-multi")
    account = accounts["domain@pop.domain.example"]
    assert account["keep"] is True and account["fetch_all"] is True  # getmail's defaults: keep, read_all
    assert account["deliver"] == [{"maildir": "/home/c/Maildir"}, {"mbox": "~/backup.mbox"}]
    assert "(multidrop)" in err and "envelope_recipient" in err


def test_several_getmail_files_make_one_config_with_unique_names(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    accounts, _out, _err = imported(tmp_path, capsys, "getmailrc-imap", "getmailrc-pop", "getmailrc-multi")
    assert len(accounts) == 3


def test_an_address_as_user_name_names_the_account_and_a_second_one_on_another_server_stays_unique(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Not ``bob@example.org@pop.example.org``: the address alone, with the usual ``-2`` for the same address on
    another server."""
    other = tmp_path / "getmailrc-pop-backup"
    other.write_text((DATA / "getmailrc-pop").read_text().replace("pop.example.org", "backup.example.net"))

    accounts, out, _err = imported(tmp_path, capsys, "getmailrc-pop", str(other))

    assert set(accounts) == {"bob@example.org", "bob@example.org-2"}
    assert accounts["bob@example.org-2"]["host"] == "backup.example.net"
    assert "@example.org@" not in out


def test_files_of_both_tools_at_once_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["import", str(DATA / "getmailrc-pop"), str(DATA / "fetchmailrc-simple")]) == 2
    assert "different tools" in capsys.readouterr().err


def test_a_file_without_a_retriever_is_an_error_with_its_name(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    rc = tmp_path / "getmailrc"
    rc.write_text("[options]\ndelete = true\n")
    assert main(["import", "--from", "getmail", str(rc)]) == 2
    assert f"{rc}:1: no [retriever] section" in capsys.readouterr().err
