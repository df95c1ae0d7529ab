"""Config loading: valid files become typed accounts; every mistake names file, line and key (issue #2)."""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path

import pytest
from postbote.cli import main
from postbote.config import load_config
from postbote.errors import ConfigError
from postbote.pluginmanager import make_plugin_manager
from postbote.plugins.pop3.settings import TLSMode
from postbote.plugins.signin.passwords import PasswordKind
from postbote.plugins.signin.settings import AuthChoice, server_label

VALID = """\
state_dir: state
log: {level: debug, format: json}
defaults:
  poll_interval: 5m
  tls_ca_file: ca.pem
accounts:
  - name: alice
    host: pop.example.org
    username: alice
    password_file: alice.pass
    keep: true
    max_size: 25MB
    deliver:
      smtp: {host: 127.0.0.1, port: 2525, recipients: [alice@example.org]}
  - name: bob
    host: pop.example.org
    tls: starttls
    poll_interval: 30s
    username: bob
    password_command: [pass, show, mail/bob]
    deliver:
      - maildir: Mail/bob
      - smtp: {recipients: [bob@example.org], envelope_sender: "<>"}
"""


def write(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "postbote.yaml"
    path.write_text(textwrap.dedent(text))
    os.chmod(path, mode)
    return path


def load(path: Path):
    return load_config(path, make_plugin_manager(entry_points=False))


def problems_of(tmp_path: Path, text: str, mode: int = 0o600) -> str:
    with pytest.raises(ConfigError) as caught:
        load(write(tmp_path, text, mode))
    return str(caught.value)


def test_a_valid_config_becomes_typed_accounts_with_defaults_merged(tmp_path: Path) -> None:
    config = load(write(tmp_path, VALID))
    alice, bob = config.accounts
    assert config.state_dir == tmp_path / "state"
    assert (alice.source.port, alice.source.tls, alice.keep) == (995, TLSMode.IMPLICIT, True)
    assert alice.max_size == 25_000_000
    assert alice.poll_interval == 300 and alice.source.tls_ca_file == tmp_path / "ca.pem"
    assert (bob.source.port, bob.source.tls, bob.poll_interval, bob.keep) == (110, TLSMode.STARTTLS, 30, False)
    assert [d.kind for d in bob.destinations] == ["maildir", "smtp"]
    assert bob.destinations[0].settings.path == tmp_path / "Mail" / "bob"
    assert bob.destinations[1].settings.envelope_sender == ""
    assert bob.source.credentials.password.command == ("pass", "show", "mail/bob")
    assert bob.source.credentials.password.kind is PasswordKind.COMMAND and bob.source.auth is AuthChoice.AUTO
    assert (alice.protocol, alice.source.server) == ("pop3", "alice@pop.example.org:995")
    assert server_label("me@example.org", "pop.example.org", 995) == "me@example.org on pop.example.org:995"


@pytest.mark.parametrize(("snippet", "expected"), [
    ("    port: http\n", ":9: accounts[0].port: expected an integer from 1 to 65535, got 'http'"),
    ("    prot: 110\n", ":9: accounts[0].prot: unknown key (did you mean 'port'?)"),
    ("    tls: maybe\n", ":9: accounts[0].tls: expected one of implicit, starttls, none, got 'maybe'"),
    ("    poll_interval: soon\n", ":9: accounts[0].poll_interval: expected a duration such as 30, 30s, 5m or 1h"),
    ("    max_size: huge\n", ":9: accounts[0].max_size: expected a size in bytes"),
    ("    keep: yes please\n", ":9: accounts[0].keep: expected true or false, got 'yes please'"),
    ("    password_env: MAIL_PASSWORD\n", ":3: accounts[0]: give exactly one of password, password_file, "
                                        "password_command, password_env, token_command, oauth2 "
                                        "(found password, password_env)"),
])
def test_each_mistake_names_file_line_key_and_what_was_expected(tmp_path: Path, snippet: str, expected: str) -> None:
    text = ("state_dir: s\naccounts:\n  - name: alice\n    host: h\n    username: u\n    password: p\n"
            "    deliver:\n      maildir: m\n" + snippet)
    message = problems_of(tmp_path, text)
    assert f"{tmp_path / 'postbote.yaml'}{expected}" in message


def test_password_command_must_be_an_argument_list_not_a_shell_line(tmp_path: Path) -> None:
    message = problems_of(tmp_path, "accounts:\n  - name: a\n    host: h\n    username: u\n"
                                    "    password_command: pass show mail\n    deliver: {maildir: m}\n")
    assert ":5: accounts[0].password_command: expected a command as a list of arguments (it is run without a shell)" \
        in message


def test_all_mistakes_are_reported_at_once(tmp_path: Path) -> None:
    message = problems_of(tmp_path, """\
        accounts:
          - name: a
            host: h
            port: 0
            username: u
            password: p
            deliver: {maildir: m}
          - name: a
            host: h
            username: u
            password: p
            deliver: {carrier_pigeon: {}}
        """)
    lines = message.splitlines()
    numbers = [int(match[1]) for line in lines if (match := re.search(r"\.yaml:(\d+):", line))]
    assert numbers == sorted(numbers) and len(numbers) >= 3  # in the order of the file, the duplicate name too
    assert any(":4: accounts[0].port:" in line for line in lines)
    assert any(":12: accounts[1].deliver.carrier_pigeon: unknown delivery target 'carrier_pigeon' (known: gmail, imap, "
               "lmtp, maildir, " in line for line in lines)


def test_duplicate_account_names_are_refused(tmp_path: Path) -> None:
    account = "  - {name: a, host: h, username: u, password: p, deliver: {maildir: m}}\n"
    assert ":3: accounts[1].name: duplicate account name 'a' (first used on line 2)" in problems_of(
        tmp_path, "accounts:\n" + account + account)


def test_required_keys_are_named(tmp_path: Path) -> None:
    message = problems_of(tmp_path, "accounts:\n  - name: a\n    password: p\n")
    assert ":2: accounts[0].host: required key is missing" in message
    assert ":2: accounts[0].username: required key is missing" in message
    assert ":2: accounts[0].deliver: required key is missing" in message


def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    assert "postbote.yaml:3: malformed YAML" in problems_of(tmp_path, "accounts:\n  - name: a\n  host: [\n")


def test_a_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load(tmp_path / "nope.yaml")


def test_an_inline_password_in_a_file_others_can_read_is_refused(tmp_path: Path) -> None:
    text = "accounts:\n  - {name: a, host: h, username: u, password: p, deliver: {maildir: m}}\n"
    assert "holds an inline password but is accessible by group or others (mode 0644)" in problems_of(
        tmp_path, text, mode=0o644)


def test_an_inline_password_may_be_read_by_the_group_postbote_runs_as(tmp_path: Path) -> None:
    """The service recipe installs the config ``-m 640 -g postbote``: readable by the service's own group."""
    text = "accounts:\n  - {name: a, host: h, username: u, password: p, deliver: {maildir: m}}\n"
    path = write(tmp_path, text, 0o640)
    os.chown(path, -1, os.getegid())
    assert load(path).accounts[0].name == "a"
    path.chmod(0o660)  # the group may read it, never write it
    assert "accessible by group or others (mode 0660)" in str(pytest.raises(ConfigError, load, path).value)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another group needs root (CI runs as root)")
def test_an_inline_password_readable_by_another_group_is_refused(tmp_path: Path) -> None:
    text = "accounts:\n  - {name: a, host: h, username: u, password: p, deliver: {maildir: m}}\n"
    path = write(tmp_path, text, 0o640)
    os.chown(path, -1, os.getegid() + 4242)
    assert "accessible by group or others (mode 0640)" in str(pytest.raises(ConfigError, load, path).value)


def test_check_refuses_a_password_file_others_can_read_as_a_poll_would(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    secret = tmp_path / "pop-pw.txt"  # not "secret": an earlier test of the run may have used that as a password
    secret.write_text("pw\n")
    secret.chmod(0o644)
    path = write(tmp_path, "accounts:\n  - {name: a, host: h, username: u, password_file: pop-pw.txt, "
                           "deliver: {maildir: m}}\n")
    assert main(["-c", str(path), "check"]) == 2
    assert f"accounts[0].password_file: {secret} is readable by other users" in capsys.readouterr().err
    secret.chmod(0o600)
    assert main(["-c", str(path), "check"]) == 0


def test_smtp_destination_options_are_validated_by_the_smtp_plugin(tmp_path: Path) -> None:
    text = ("accounts:\n  - name: a\n    host: h\n    username: u\n    password: p\n    deliver:\n"
            "      smtp: {host: mx, port: 25, recipents: [x@y]}\n")
    message = problems_of(tmp_path, text)
    assert ":7: accounts[0].deliver.smtp.recipents: unknown key (did you mean 'recipients'?)" in message
    assert "accounts[0].deliver.smtp.recipients: required key is missing" in message


def test_cli_reports_config_errors_on_one_line_each_with_exit_status_2(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "accounts:\n  - {name: a, host: h, port: x, username: u, password: p, "
                           "deliver: {maildir: m}}\n")
    assert main(["-c", str(path), "check"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("postbote: error: ") and "accounts[0].port" in err
    assert "Traceback" not in err


def test_check_lists_accounts_without_showing_secrets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "accounts:\n  - {name: a, host: h, username: u, password: s3cr3t-pw, "
                           "deliver: {maildir: m}}\n")
    assert main(["-c", str(path), "check"]) == 0
    out = capsys.readouterr().out
    assert "a: u@h:995 (TLS, auth auto, inline password (********))" in out
    assert "every 5m; delete after delivery" in out  # durations as `status` shows them
    assert "s3cr3t-pw" not in out


def test_token_mechanisms_need_a_token_source_and_password_mechanisms_a_password(tmp_path: Path) -> None:
    base = "accounts:\n  - name: a\n    host: h\n    username: u\n    deliver: {maildir: m}\n"
    assert ":6: accounts[0].password: auth: xoauth2 logs in with an OAuth2 access token: give token_command or " \
        "oauth2" in problems_of(tmp_path, base + "    password: p\n    auth: xoauth2\n")
    assert ":6: accounts[0].token_command: auth: scram-sha-256 logs in with a password" in problems_of(
        tmp_path, base + "    token_command: [get-token]\n    auth: scram-sha-256\n")
    config = load(write(tmp_path, base + "    token_command: [get-token, --account, a]\n"))
    assert config.accounts[0].source.credentials.describe() == "token_command get-token (+2 args)"


def test_the_example_config_shows_valid_keys_only() -> None:
    """examples/postbote.yaml documents every key; it must stay a config postbote accepts."""
    example = Path(__file__).resolve().parent.parent / "examples" / "postbote.yaml"
    config = load(example)
    assert [a.name for a in config.accounts] == ["alice", "bob", "carol-gmail", "dave-old-isp"]
    assert config.accounts[0].options_for("backup") is not None and not config.accounts[0].uses("spamassassin")


def test_the_source_keys_are_read_by_the_pop3_plugin_and_a_misspelt_one_gets_a_hint(tmp_path: Path) -> None:
    base = "accounts:\n  - name: a\n    host: h\n    username: u\n    password: p\n    deliver: {maildir: m}\n"
    config = load(write(tmp_path, base + "    protocol: pop3\n    tls: none\n"))
    (account,) = config.accounts
    assert account.protocol == "pop3" and account.source.tls is TLSMode.NONE and account.source.port == 110
    assert account.source.received_protocol == "POP3" and account.source.holds_inline_password
    assert ":7: accounts[0].password_comand: unknown key (did you mean 'password_command'?)" in problems_of(
        tmp_path, base + "    password_comand: [pass]\n")
    assert ":7: accounts[0].tls_verfy: unknown key (did you mean 'tls_verify'?)" in problems_of(
        tmp_path, base + "    tls_verfy: false\n")


def test_an_unknown_protocol_is_an_error_that_lists_the_known_ones(tmp_path: Path) -> None:
    message = problems_of(tmp_path, "accounts:\n  - name: a\n    protocol: carrier-pigeon\n    host: h\n"
                                    "    deliver: {maildir: m}\n")
    assert ":3: accounts[0].protocol: unknown protocol 'carrier-pigeon' (known: imap, pop3)" in message
    assert "host" not in message  # the source keys are not judged without a source to read them


def test_defaults_may_hold_source_keys_and_a_misspelt_one_is_reported_once(tmp_path: Path) -> None:
    account = "  - {name: %s, username: u, password: p, deliver: {maildir: m}}\n"
    text = "defaults:\n  host: pop.example.org\n  tls: starttls\n  kep: true\naccounts:\n" + account % "a" + \
        account % "b"
    message = problems_of(tmp_path, text)
    assert message.count("kep") == 1
    assert ":4: defaults.kep: unknown key (did you mean 'keep'?)" in message
    config = load(write(tmp_path, text.replace("  kep: true\n", "")))
    assert [(a.source.host, a.source.tls, a.source.port) for a in config.accounts] == [
        ("pop.example.org", TLSMode.STARTTLS, 110)] * 2


def test_a_bad_default_shared_by_several_accounts_is_one_problem_and_nothing_else(tmp_path: Path) -> None:
    """The second account sharing a bad key adds no new line; it must not look fine to what reads after it (which
    said, for it, that no plugin read its protocol's settings)."""
    account = "  - {name: %s, username: u, password: p, deliver: {maildir: m}}\n"
    text = "defaults:\n  host: pop.example.org\n  port: 99999\naccounts:\n" + account % "a" + account % "b"
    assert problems_of(tmp_path, text).splitlines() == [
        f"{tmp_path / 'postbote.yaml'}:3: defaults.port: expected an integer from 1 to 65535, got 99999 (int)"]


def test_a_source_plugin_reads_only_its_own_keys(tmp_path: Path) -> None:
    """The POP3 keys mean nothing to another source: there they are unknown keys."""
    from postbote.testing import FakeSource

    pm = make_plugin_manager(entry_points=False, extra=[FakeSource()])
    path = write(tmp_path, "accounts:\n  - {name: a, protocol: fake, host: h, deliver: {maildir: m}}\n")
    with pytest.raises(ConfigError, match=r":2: accounts\[0\].host: unknown key"):
        load_config(path, pm)


ACCOUNT_HEAD = "accounts:\n  - name: a\n    host: h\n    username: u\n    password: p\n"


@pytest.mark.parametrize(("broken", "fixed"), [
    pytest.param(ACCOUNT_HEAD, ACCOUNT_HEAD + "    {hint}\n", id="deliver missing"),
    pytest.param(ACCOUNT_HEAD + "    deliver: {maildir: m, mbox: n}\n", ACCOUNT_HEAD + "    deliver: {hint}\n",
                 id="deliver entry not one destination"),
    pytest.param(ACCOUNT_HEAD + "    deliver: [smtp]\n", ACCOUNT_HEAD + "    deliver: [{hint}]\n",
                 id="deliver list item not a mapping"),
    pytest.param(ACCOUNT_HEAD + "    deliver: {mda: {command: procmail -d a}}\n",
                 ACCOUNT_HEAD + "    deliver: {{mda: {{command: {hint}}}}}\n", id="mda command a shell line"),
    pytest.param("accounts:\n  - {name: a, host: h, username: u, deliver: {maildir: m},password_command: pass show}\n",
                 "accounts:\n  - {{name: a, host: h, username: u, deliver: {{maildir: m}},password_command: {hint}}}\n",
                 id="password_command a shell line"),
    pytest.param("plugins:\n  rules: {stop: first}\n" + ACCOUNT_HEAD + "    deliver: {maildir: m}\n",
                 "plugins:\n  rules: {{{hint}}}\n" + ACCOUNT_HEAD + "    deliver: {{maildir: m}}\n",
                 id="rules missing"),
    pytest.param(ACCOUNT_HEAD + "    protocol: imap\n    folders: []\n    deliver: {maildir: m}\n",
                 ACCOUNT_HEAD + "    protocol: imap\n    folders: {hint}\n    deliver: {{maildir: m}}\n",
                 id="imap folders empty"),
])
def test_every_example_a_config_error_suggests_passes_check_as_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        broken: str, fixed: str) -> None:
    """A hint like ``e.g. {smtp: {host: localhost}}`` that itself fails ``check`` (recipients missing) sends a new
    user round in circles: each example is taken from the error message the user sees and checked as written."""
    monkeypatch.setenv("HOME", str(tmp_path))
    message = problems_of(tmp_path, broken)
    hints = re.findall(r"e\.g\. (.+?)(?:, got .*)?$", message, flags=re.MULTILINE)  # a parser adds ", got ..."
    assert len(hints) == 1, message
    (hint,) = hints
    path = write(tmp_path, fixed.format(hint=hint))
    assert main(["-c", str(path), "check"]) == 0, (hint, capsys.readouterr().err)


def test_the_destination_hint_is_not_an_smtp_destination_without_recipients(tmp_path: Path) -> None:
    message = problems_of(tmp_path, ACCOUNT_HEAD + "    deliver: {maildir: m, mbox: n}\n")
    assert "e.g. {maildir: ~/Maildir}" in message and "{smtp: {host: localhost}}" not in message
