"""Seeing what postbote does (issue: runs as a service): ``postbote status [--json]`` from the state store, and the
progress line ``postbote poll`` draws on a terminal.
"""

from __future__ import annotations

import io
import json
import logging
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

from agent.cli import main
from agent.config import load_config
from agent.pluginmanager import make_plugin_manager
from agent.poller import Poller
from agent.pop3server import Action, Faults, POP3Server
from agent.state import StateStore
from plugins.progress import SHOW_AFTER, ProgressDisplay
from tests.test_daemon import REPO, DaemonRun, account, mail, write_config


def poll_once(config_path: Path) -> None:
    pm = make_plugin_manager(entry_points=False)
    config = load_config(config_path, pm)
    store = StateStore(config.state_dir)
    try:
        for entry in config.accounts:
            Poller(pm, store).poll(entry)
    finally:
        store.close()


def test_status_before_any_poll_says_so_and_creates_nothing(tmp_path: Path, capsys) -> None:
    config = write_config(tmp_path / "postbote.yaml", [account("alice", None, tmp_path / "Maildir")])
    assert main(["-c", str(config), "status"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("daemon: not running;")
    assert "alice  never polled (demo@127.0.0.1:1)" in out
    assert not (tmp_path / "state").exists()


def test_status_shows_the_last_poll_the_totals_and_the_last_error(tmp_path: Path, capsys) -> None:
    server = POP3Server([mail(1), mail(2), (mail(3))], faults=Faults().on("RETR 3", action=Action.drop())).start()
    try:
        config = write_config(tmp_path / "postbote.yaml", [account("alice", server, tmp_path / "Maildir"),
                                                          account("bob", None, tmp_path / "Maildir")])
        poll_once(config)
    finally:
        server.stop()
    assert main(["-c", str(config), "status"]) == 1
    out = capsys.readouterr().out
    assert "alice  FAILED, last poll " in out
    assert ": 2 delivered, 0 dropped, 0 deferred, 0 rejected, 0 left on the server" in out
    assert "in all: 2 delivered, 0 dropped" in out
    assert "bob    FAILED" in out and "error: cannot connect to 127.0.0.1:1" in out
    assert "1 failed poll(s) in a row; last success never" in out
    assert "next poll: when the daemon runs (every 1s)" in out


def test_status_json_has_every_account_with_machine_readable_times(tmp_path: Path, capsys) -> None:
    server = POP3Server([mail(1)]).start()
    try:
        config = write_config(tmp_path / "postbote.yaml", [account("alice", server, tmp_path / "Maildir"),
                                                          account("carol", None, tmp_path / "Maildir")])
        pm = make_plugin_manager(entry_points=False)
        loaded = load_config(config, pm)
        store = StateStore(loaded.state_dir)
        Poller(pm, store).poll(loaded.accounts[0])
        store.close()
    finally:
        server.stop()
    assert main(["-c", str(config), "status", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["daemon"] == {"running": False, "pid": None}
    alice, carol = report["accounts"]
    assert (alice["name"], alice["outcome"], alice["error"], alice["failure_streak"]) == ("alice", "ok", None, 0)
    assert alice["counts"]["delivered"] == 1 and alice["totals"]["delivered"] == 1
    assert alice["last_poll"].endswith("+00:00") and alice["last_poll"] == alice["last_success"]
    assert alice["next_poll"] is None
    assert (carol["outcome"], carol["last_poll"]) == ("never polled", None)


def test_status_while_the_daemon_runs_shows_it_and_the_next_poll(tmp_path: Path) -> None:
    server = POP3Server([mail(1)]).start()
    config = write_config(tmp_path / "postbote.yaml", [account("alice", server, tmp_path / "Maildir",
                                                              poll_interval="1h")])
    daemon = DaemonRun(config)
    try:
        daemon.wait_for("daemon.started")
        daemon.send(signal.SIGUSR1)
        daemon.wait_for("poll.finished")
        time.sleep(0.1)  # the main loop records the next poll after the poll thread's report
        status = subprocess.run([sys.executable, "-m", "agent", "-c", str(config), "status", "--json"], cwd=REPO,
                                capture_output=True, text=True, timeout=10)
        report = json.loads(status.stdout)
        assert status.returncode == 0
        assert report["daemon"] == {"running": True, "pid": daemon.process.pid}
        (alice,) = report["accounts"]
        assert alice["outcome"] == "ok" and alice["counts"]["delivered"] == 1
        next_poll = datetime.fromisoformat(alice["next_poll"])
        planned_after = next_poll - datetime.fromisoformat(alice["last_poll"])
        assert timedelta(minutes=59) < planned_after <= timedelta(hours=1, seconds=1)  # one poll_interval later
        text = subprocess.run([sys.executable, "-m", "agent", "-c", str(config), "status"], cwd=REPO,
                              capture_output=True, text=True, timeout=10).stdout
        assert f"daemon: running (pid {daemon.process.pid})" in text
        assert f"next poll {next_poll.astimezone().strftime('%Y-%m-%d %H:%M:%S')} (in " in text
    finally:
        assert daemon.stop() == 0
        server.stop()
    after = json.loads(subprocess.run([sys.executable, "-m", "agent", "-c", str(config), "status", "--json"],
                                      cwd=REPO, capture_output=True, text=True, timeout=10).stdout)
    assert after["daemon"]["running"] is False and after["accounts"][0]["next_poll"] is None


def test_status_reads_without_leaving_files_behind(tmp_path: Path, capsys) -> None:
    config = write_config(tmp_path / "postbote.yaml", [account("bob", None, tmp_path / "Maildir")])
    poll_once(config)
    before = sorted(p.name for p in (tmp_path / "state").iterdir())
    assert main(["-c", str(config), "status"]) == 1
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == before
    assert "bob  FAILED" in capsys.readouterr().out


def test_status_reads_a_database_from_an_older_version(tmp_path: Path, capsys) -> None:
    state = tmp_path / "state"
    state.mkdir()
    db = sqlite3.connect(state / "postbote.sqlite3")
    db.executescript("""CREATE TABLE polls (account TEXT PRIMARY KEY, finished REAL NOT NULL, ok INTEGER NOT NULL,
        duration REAL NOT NULL, counts TEXT NOT NULL, error TEXT, last_success REAL, totals TEXT NOT NULL);""")
    db.execute("INSERT INTO polls VALUES ('bob', ?, 1, 0.5, '{\"delivered\": 3}', NULL, ?, '{\"delivered\": 9}')",
               (time.time(), time.time()))
    db.commit()
    db.close()
    config = write_config(tmp_path / "postbote.yaml", [account("bob", None, tmp_path / "Maildir")])
    assert main(["-c", str(config), "status"]) == 0
    assert "3 delivered" in capsys.readouterr().out


# --- progress on a terminal


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Sized:
    def __init__(self, size: int) -> None:
        self.size = size


class Named:
    def __init__(self, name: str) -> None:
        self.name = name


def test_progress_appears_only_for_long_fetches_and_counts_messages_and_bytes() -> None:
    stream, clock, box = io.StringIO(), FakeClock(), Named("alice")
    display = ProgressDisplay(stream, clock=clock)
    try:
        display.messages_listed(account=box, count=3, octets=3_000_000)
        display.message_delivered(message=Sized(1_000_000), account=box)
        assert stream.getvalue() == ""  # quick so far: nothing drawn
        clock.now += SHOW_AFTER
        display.message_dropped(message=Sized(1_000_000), account=box)
        assert stream.getvalue().endswith("\r\x1b[Kalice: 2/3 messages, 2.0/3.0 MB (66%)")
        display.poll_finished(account=box)
        assert stream.getvalue().endswith("\r\x1b[K")
    finally:
        display.close()


def test_a_log_line_first_wipes_the_progress_line() -> None:
    stream, clock, box = io.StringIO(), FakeClock(), Named("alice")
    handler = logging.StreamHandler(stream)
    logging.getLogger().addHandler(handler)
    display = ProgressDisplay(stream, clock=clock)
    try:
        display.messages_listed(account=box, count=2, octets=10)
        clock.now += SHOW_AFTER
        display.message_delivered(message=Sized(5), account=box)
        logging.getLogger("postbote.test").warning("something happened")
        assert stream.getvalue().endswith("alice: 1/2 messages, 0.0/0.0 MB (50%)\r\x1b[Ksomething happened\n")
    finally:
        display.close()
        logging.getLogger().removeHandler(handler)
