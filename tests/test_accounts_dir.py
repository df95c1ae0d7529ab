"""``accounts_dir:``: accounts from a conf.d of YAML files (one or many accounts a file) beside or instead of the
main file's ``accounts:``; each file's mistakes name that file and line; the main file's ``defaults:`` apply; a
SIGHUP reload picks up added, changed and removed files, and the accounts that did not change keep their schedule."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from postbote import ConfigError
from postbote.config import load_config
from postbote.pluginmanager import make_plugin_manager
from postbote.testing.pop3server import POP3Server

from tests.harness import DaemonRun, mail, subjects, wait_until


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, mode)
    return path


def account(name: str, port: int, maildir: Path, **extra: str) -> str:
    keys = "".join(f", {key}: {value}" for key, value in extra.items())
    return (f"  - {{name: {name}, host: 127.0.0.1, port: {port}, tls: none, username: demo, password: demo, "
            f"deliver: {{maildir: {maildir}}}{keys}}}\n")


def load(path: Path):  # type: ignore[no-untyped-def]
    return load_config(path, make_plugin_manager(entry_points=False))


def test_accounts_come_from_every_file_of_the_directory_in_name_order_with_the_defaults(tmp_path: Path) -> None:
    main = write(tmp_path / "postbote.yaml", f"state_dir: {tmp_path / 'state'}\naccounts_dir: accounts.d\n"
                                             "defaults: {poll_interval: 10m}\n")
    write(tmp_path / "accounts.d" / "20-b.yaml", "accounts:\n" + account("b", 1, tmp_path / "b"))
    write(tmp_path / "accounts.d" / "10-a.yml", "accounts:\n" + account("a1", 1, tmp_path / "a")
          + account("a2", 1, tmp_path / "a", poll_interval="1h"))
    write(tmp_path / "accounts.d" / "notes.txt", "not YAML, not read\n")
    config = load(main)
    assert [(a.name, a.poll_interval) for a in config.accounts] == [("a1", 600.0), ("a2", 3600.0), ("b", 600.0)]


def test_a_mistake_in_an_account_file_names_that_file_and_line(tmp_path: Path) -> None:
    main = write(tmp_path / "postbote.yaml", f"state_dir: {tmp_path / 'state'}\naccounts_dir: accounts.d\n"
                                             "accounts:\n" + account("a", 1, tmp_path / "a"))
    bad = write(tmp_path / "accounts.d" / "b.yaml", "accounts:\n" + account("b", 0, tmp_path / "b")
                + account("a", 1, tmp_path / "a"))
    with pytest.raises(ConfigError) as caught:
        load(main)
    text = str(caught.value)
    assert f"{bad}:2: accounts[0].port:" in text
    assert f"duplicate account name 'a' (also in {main})" in text


def test_an_inline_password_in_an_account_file_others_can_read_is_refused(tmp_path: Path) -> None:
    main = write(tmp_path / "postbote.yaml", f"state_dir: {tmp_path / 'state'}\naccounts_dir: accounts.d\n")
    write(tmp_path / "accounts.d" / "b.yaml", "accounts:\n" + account("b", 1, tmp_path / "b"), mode=0o644)
    with pytest.raises(ConfigError, match="holds an inline password but is accessible by group or others"):
        load(main)


def test_a_reload_picks_up_new_files_and_keeps_the_others_on_their_schedule(
        tmp_path: Path, daemons: Callable[..., DaemonRun]) -> None:
    with POP3Server([mail(1)]) as first, POP3Server([mail(2)]) as second:
        main = write(tmp_path / "postbote.yaml", f"state_dir: {tmp_path / 'state'}\n"
                                                 "log: {format: json, level: info}\naccounts_dir: accounts.d\n")
        write(tmp_path / "accounts.d" / "one.yaml",
              "accounts:\n" + account("one", first.port, tmp_path / "one", poll_interval="1h"))
        daemon = daemons(main)
        wait_until(lambda: subjects(tmp_path / "one") == ["Subject: message 1"], 15, "the first account's mail")
        write(tmp_path / "accounts.d" / "two.yaml",
              "accounts:\n" + account("two", second.port, tmp_path / "two", poll_interval="1h"))
        daemon.send(signal.SIGHUP)
        (reloaded,) = daemon.wait_for("config.reloaded", timeout=15)
        assert reloaded["added"] == ["two"] and "removed" not in reloaded
        wait_until(lambda: subjects(tmp_path / "two") == ["Subject: message 2"], 15, "the new account's mail")
        assert len(daemon.events("poll.finished", account="one")) == 1  # not polled again by the reload
        assert daemon.stop() == 0
