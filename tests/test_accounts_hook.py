"""Accounts a plugin supplies (issue 16, the ``load_accounts`` hook): the example plugin that reads them from a
SQLite table (``examples/plugins/sqlite_accounts.py``), its rows polled against a real Dovecot like the config's own
accounts, their mistakes named by the database and the row, their names unique across every place accounts come
from, and the table holding no secret."""

from __future__ import annotations

import signal
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from postbote import ConfigError
from postbote.cli import main
from postbote.config import load_config
from postbote.pluginmanager import make_plugin_manager

from tests.harness import REPO_ROOT, DaemonRun, MaildirTarget, corpus_message, corpus_number, wait_until
from tests.servers.dovecot import DovecotServer

pytestmark = pytest.mark.usefixtures("time_limit")

EXAMPLE_PLUGINS = REPO_ROOT / "examples" / "plugins"


def accounts_table(path: Path, rows: list[tuple[object, ...]]) -> Path:
    with sqlite3.connect(path) as database:
        database.execute("CREATE TABLE accounts (name TEXT PRIMARY KEY, host TEXT NOT NULL, username TEXT NOT NULL, "
                         "maildir TEXT NOT NULL, port INTEGER, protocol TEXT)")
        database.executemany("INSERT INTO accounts VALUES (?, ?, ?, ?, ?, ?)", rows)
    return path


def config(tmp_path: Path, database: Path, **more: object) -> Path:
    path = tmp_path / "postbote.yaml"
    path.write_text(yaml.safe_dump({
        "state_dir": str(tmp_path / "state"), "plugin_paths": [str(EXAMPLE_PLUGINS)],
        "defaults": {"tls": "none", "timeout": "10s"},
        "plugins": {"sqlite_accounts": {"database": str(database), "password_dir": str(tmp_path / "passwords")}},
        **more}))
    path.chmod(0o600)
    return path


def password_files(tmp_path: Path, dovecot: DovecotServer, *users: str) -> None:
    directory = tmp_path / "passwords"
    directory.mkdir(mode=0o700, exist_ok=True)
    for user in users:
        (directory / user).write_text(dovecot.password(user) + "\n")
        (directory / user).chmod(0o600)


@pytest.mark.dovecot
def test_hook_load_accounts(tmp_path: Path, dovecot: DovecotServer) -> None:
    """Two accounts in the table, none in the config: both are polled, each into its own Maildir."""
    dovecot.deliver("alice", corpus_message(1))
    dovecot.deliver("bob", corpus_message(2))
    password_files(tmp_path, dovecot, "alice", "bob")
    database = accounts_table(tmp_path / "accounts.sqlite3", [
        ("alice", dovecot.host, "alice", str(tmp_path / "alice"), dovecot.pop3_port, None),
        ("bob", dovecot.host, "bob", str(tmp_path / "bob"), dovecot.pop3_port, "pop3")])
    path = config(tmp_path, database)

    assert main(["-c", str(path), "poll"]) == 0

    assert [corpus_number(m) for m in MaildirTarget(tmp_path / "alice").delivered()] == [1]
    assert [corpus_number(m) for m in MaildirTarget(tmp_path / "bob").delivered()] == [2]
    assert dovecot.messages("alice") == [] and dovecot.messages("bob") == []
    assert b"demo" not in database.read_bytes() and dovecot.password("alice").encode() not in database.read_bytes()


def test_a_mistake_in_a_row_names_the_database_and_the_row(tmp_path: Path) -> None:
    database = accounts_table(tmp_path / "accounts.sqlite3", [
        ("a", "pop.example.org", "a", str(tmp_path / "a"), 110, None),
        ("b", "pop.example.org", "b", str(tmp_path / "b"), 70000, None)])
    with pytest.raises(ConfigError) as caught:
        load_config(config(tmp_path, database), make_plugin_manager(entry_points=False))
    assert f"{database}:2: accounts[1].port:" in str(caught.value)


def test_a_name_the_config_uses_already_is_a_mistake_in_the_table(tmp_path: Path) -> None:
    database = accounts_table(tmp_path / "accounts.sqlite3", [
        ("a", "pop.example.org", "a", str(tmp_path / "a"), None, None)])
    own = {"name": "a", "host": "pop.example.org", "username": "a", "password_file": str(tmp_path / "p"),
           "deliver": {"maildir": str(tmp_path / "a")}}
    path = config(tmp_path, database, accounts=[own])
    with pytest.raises(ConfigError) as caught:
        load_config(path, make_plugin_manager(entry_points=False))
    assert f"duplicate account name 'a' (also in {path})" in str(caught.value)


def test_a_database_that_cannot_be_read_is_one_config_error(tmp_path: Path) -> None:
    path = config(tmp_path, tmp_path / "missing.sqlite3")
    assert main(["-c", str(path), "check"]) == 2


@pytest.mark.dovecot
def test_a_reload_reads_the_table_again_and_polls_a_new_row(tmp_path: Path, dovecot: DovecotServer,
                                                            daemons: Callable[..., DaemonRun]) -> None:
    dovecot.deliver("alice", corpus_message(1))
    dovecot.deliver("bob", corpus_message(2))
    password_files(tmp_path, dovecot, "alice", "bob")
    database = accounts_table(tmp_path / "accounts.sqlite3", [
        ("alice", dovecot.host, "alice", str(tmp_path / "alice"), dovecot.pop3_port, None)])
    path = config(tmp_path, database, log={"format": "json", "level": "info"})
    document = yaml.safe_load(path.read_text())
    document["defaults"]["poll_interval"] = "1h"
    path.write_text(yaml.safe_dump(document))
    daemon = daemons(path)
    wait_until(lambda: len(MaildirTarget(tmp_path / "alice").delivered()) == 1, 15, "alice's mail")

    with sqlite3.connect(database) as table:
        table.execute("INSERT INTO accounts VALUES (?, ?, ?, ?, ?, NULL)",
                      ("bob", dovecot.host, "bob", str(tmp_path / "bob"), dovecot.pop3_port))
    daemon.send(signal.SIGHUP)

    (reloaded,) = daemon.wait_for("config.reloaded", timeout=15)
    assert reloaded["added"] == ["bob"]
    wait_until(lambda: len(MaildirTarget(tmp_path / "bob").delivered()) == 1, 15, "bob's mail")
    assert len(daemon.events("poll.finished", account="alice")) == 1  # not polled again by the reload
    assert daemon.stop() == 0


def test_a_plugin_that_fails_to_supply_accounts_is_one_config_error_naming_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plugin = tmp_path / "plugins" / "broken_accounts.py"
    plugin.parent.mkdir()
    plugin.write_text("from postbote import hookimpl\n\n"
                      "@hookimpl\ndef parse_plugin_options(name, options):\n"
                      "    return {} if name == 'broken_accounts' else None\n\n"
                      "@hookimpl\ndef load_accounts(name, options, base_dir):\n"
                      "    if name == 'broken_accounts':\n"
                      "        raise RuntimeError('the directory service is down')\n")
    path = tmp_path / "postbote.yaml"
    path.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"), "plugin_paths": [str(plugin.parent)],
                                    "plugins": {"broken_accounts": {}}}))
    path.chmod(0o600)

    assert main(["-c", str(path), "check"]) == 2
    err = capsys.readouterr().err
    assert "plugins.broken_accounts: loading accounts failed: RuntimeError: the directory service is down" in err
    assert "Traceback" not in err
