"""The keys of a ``protocol: imap`` account (issue 13): read into `IMAPSettings` by the IMAP plugin, every mistake
named with file, line and key, as the core names its own."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
from postbote.cli import main
from postbote.config import Account, load_config
from postbote.errors import ConfigError
from postbote.pluginmanager import make_plugin_manager
from postbote.plugins.imap.settings import AfterFetch, ConnectionSettings, FolderRule, IMAPSettings, TLSMode
from postbote.plugins.signin.settings import AuthChoice

from tests.harness import logging_restored


def write(tmp_path: Path, account: str) -> Path:
    """A config with one IMAP account whose keys (after name and protocol) are ``account``."""
    path = tmp_path / "postbote.yaml"
    path.write_text("state_dir: state\naccounts:\n  - name: work\n    protocol: imap\n"
                    + textwrap.indent(textwrap.dedent(account), "    ")
                    + "    deliver: {maildir: Mail}\n")
    os.chmod(path, 0o600)
    return path


def account_of(tmp_path: Path, keys: str) -> Account:
    config = load_config(write(tmp_path, keys), make_plugin_manager(entry_points=False))
    (account,) = config.accounts
    return account


def problems_of(tmp_path: Path, keys: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, keys), make_plugin_manager(entry_points=False))
    return str(caught.value)


LOGIN = "host: imap.example.org\nusername: me@example.org\npassword: secret\n"


def test_an_imap_account_reads_the_connection_like_pop3_with_the_imap_ports(tmp_path: Path) -> None:
    source = account_of(tmp_path, LOGIN).source

    assert isinstance(source, IMAPSettings) and isinstance(source, ConnectionSettings)
    assert (source.host, source.port, source.tls, source.auth) == ("imap.example.org", 993, TLSMode.IMPLICIT,
                                                                  AuthChoice.AUTO)
    assert source.server == "me@example.org on imap.example.org:993"
    assert source.received_protocol == "IMAPS" and source.holds_inline_password


@pytest.mark.parametrize("tls, port", [("starttls", 143), ("none", 143), ("implicit", 993)])
def test_the_default_port_follows_the_tls_mode(tmp_path: Path, tls: str, port: int) -> None:
    source = account_of(tmp_path, LOGIN + f"tls: {tls}\n").source

    assert source.port == port
    assert source.received_protocol == ("IMAP" if tls == "none" else "IMAPS")


def test_by_default_inbox_is_fetched_and_delivered_messages_are_deleted_with_idle_on(tmp_path: Path) -> None:
    source = account_of(tmp_path, LOGIN).source

    assert source.folders == (FolderRule("INBOX", AfterFetch.DELETE),)
    assert source.after_fetch is AfterFetch.DELETE
    assert (source.unseen_only, source.gmail, source.idle) == (False, False, True)


def test_keep_true_makes_keep_the_default_action(tmp_path: Path) -> None:
    account = account_of(tmp_path, LOGIN + "keep: true\n")

    assert account.keep and account.source.after_fetch is AfterFetch.KEEP
    assert account.source.folders[0].after_fetch is AfterFetch.KEEP


def test_folders_may_be_names_patterns_or_mappings_with_their_own_action(tmp_path: Path) -> None:
    source = account_of(tmp_path, LOGIN + textwrap.dedent("""\
        after_fetch: move
        move_to: Archive
        folders:
          - INBOX
          - Lists/*
          - {name: Newsletters, after_fetch: seen}
          - {name: Old, after_fetch: move, move_to: Archive/Old}
        unseen_only: true
        gmail: true
        idle: false
    """)).source

    assert source.folders == (FolderRule("INBOX", AfterFetch.MOVE, "Archive"),
                              FolderRule("Lists/*", AfterFetch.MOVE, "Archive"),
                              FolderRule("Newsletters", AfterFetch.SEEN, None),
                              FolderRule("Old", AfterFetch.MOVE, "Archive/Old"))
    assert [rule.is_pattern for rule in source.folders] == [False, True, False, False]
    assert (source.unseen_only, source.gmail, source.idle) == (True, True, False)
    assert "folders INBOX, Lists/*, Newsletters, Old" in source.describe()


@pytest.mark.parametrize("keys, expected", [
    ("keep: true\nafter_fetch: delete\n", "postbote.yaml:9: accounts[0].after_fetch: delete contradicts the "
                                          "account's keep: true"),
    ("keep: true\nafter_fetch: move\nmove_to: Archive\n", "accounts[0].after_fetch: move contradicts the account's "
                                                          "keep: true"),
    ("keep: true\nfolders: [{name: INBOX, after_fetch: delete}]\n", "accounts[0].folders[0].after_fetch: delete "
                                                                    "contradicts the account's keep: true"),
    ("keep: true\nafter_fetch: seen\n", "accounts[0].after_fetch: seen with the account's keep: true would never "
                                        "mark anything"),
    ("after_fetch: move\n", "postbote.yaml:8: accounts[0].after_fetch: move needs move_to"),
    ("after_fetch: seen\nmove_to: Archive\n", "postbote.yaml:9: accounts[0].move_to: move_to is for after_fetch: "
                                              "move"),
    ("after_fetch: expunge\n", "postbote.yaml:8: accounts[0].after_fetch: expected one of delete, move, seen, keep"),
    ("folders: INBOX\n", "postbote.yaml:8: accounts[0].folders: expected a list of folder names"),
    ("folders: []\n", "accounts[0].folders: expected a list of folder names"),
    ("folders: [INBOX, INBOX]\n", "accounts[0].folders[1]: folder 'INBOX' is listed twice"),
    ("folders: [inbox, INBOX]\n", "accounts[0].folders[1]: folder 'INBOX' is listed twice"),
    ("after_fetch: move\nmove_to: Archive\nfolders: [INBOX, Archive]\n", "accounts[0].folders[1]: folder "
                                                                      "'Archive' is where delivered messages are "
                                                                      "moved (move_to)"),
    ("folders: [INBOX, {name: Old, after_fetch: move, move_to: INBOX}]\n", "accounts[0].folders[0]: folder 'INBOX' "
                                                                          "is where delivered messages are moved"),
    ("folders: [{after_fetch: seen}]\n", "accounts[0].folders[0].name: required key is missing"),
    ("folders: [{name: X, after: seen}]\n", "accounts[0].folders[0].after: unknown key (did you mean "
                                            "'after_fetch'?)"),
    ("folders: [3]\n", "accounts[0].folders[0]: expected a folder name"),
    ("unseen_only: maybe\n", "accounts[0].unseen_only: expected"),
    ("idel: false\n", "accounts[0].idel: unknown key (did you mean 'idle'?)"),
    ("auth: apop\n", "accounts[0].auth: expected one of auto, plain, login"),
    ("tls: stls\n", "accounts[0].tls: expected one of implicit, starttls, none"),
])
def test_each_mistake_names_file_line_and_key(tmp_path: Path, keys: str, expected: str) -> None:
    assert expected in problems_of(tmp_path, LOGIN + keys)


def test_config_errors_exit_with_status_2_and_one_line_each(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, LOGIN + "after_fetch: move\nfolders: [INBOX, INBOX]\n")

    with logging_restored():
        status = main(["-c", str(path), "check"])

    err = capsys.readouterr().err
    assert status == 2
    assert "accounts[0].after_fetch: move needs move_to" in err and "listed twice" in err
    assert "Traceback" not in err


def test_check_shows_the_imap_account_without_its_secret(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, LOGIN + "tls: starttls\nfolders: [INBOX, Lists/*]\nafter_fetch: seen\n")

    with logging_restored():
        status = main(["-c", str(path), "check"])

    out = capsys.readouterr().out
    assert status == 0, out
    assert "me@example.org on imap.example.org:143" in out and "STARTTLS" in out and "seen after delivery" in out
    assert "secret" not in out


def test_check_shows_each_folders_own_action(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, LOGIN + "folders: [INBOX, {name: Archive, after_fetch: keep}]\n")

    with logging_restored():
        assert main(["-c", str(path), "check"]) == 0

    assert "delete (INBOX), keep (Archive) after delivery" in capsys.readouterr().out
