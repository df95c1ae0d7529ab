"""Seeing what postbote does (issue: runs as a service): ``postbote status [--json]`` from the state store, and the
progress line ``postbote poll`` draws on a terminal.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

from postbote.cli import main
from postbote.cli.progress import SHOW_AFTER, ProgressDisplay
from postbote.cli.status import collect, show_status
from postbote.config import load_config
from postbote.pluginmanager import make_plugin_manager
from postbote.state import StateStore
from postbote.testing import poll_once
from postbote.testing.pop3server import Action, Faults, POP3Server

from tests.harness import REPO_ROOT as REPO
from tests.harness import DaemonRun, account, mail, write_config


def poll_every_account(config_path: Path) -> None:
    """One poll of each account of the config, in order, as ``postbote poll`` does."""
    for entry in load_config(config_path, make_plugin_manager(entry_points=False)).accounts:
        poll_once(config_path, account=entry.name)


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
        poll_every_account(config)
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
        poll_once(config)
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
        status = subprocess.run([sys.executable, "-m", "postbote", "-c", str(config), "status", "--json"], cwd=REPO,
                                capture_output=True, text=True, timeout=10)
        report = json.loads(status.stdout)
        assert status.returncode == 0
        assert report["daemon"] == {"running": True, "pid": daemon.process.pid}
        (alice,) = report["accounts"]
        assert alice["outcome"] == "ok" and alice["counts"]["delivered"] == 1
        next_poll = datetime.fromisoformat(alice["next_poll"])
        planned_after = next_poll - datetime.fromisoformat(alice["last_poll"])
        assert timedelta(minutes=59) < planned_after <= timedelta(hours=1, seconds=1)  # one poll_interval later
        text = subprocess.run([sys.executable, "-m", "postbote", "-c", str(config), "status"], cwd=REPO,
                              capture_output=True, text=True, timeout=10).stdout
        assert f"daemon: running (pid {daemon.process.pid})" in text
        assert f"next poll {next_poll.astimezone().strftime('%Y-%m-%d %H:%M:%S')} (in " in text
    finally:
        assert daemon.stop() == 0
        server.stop()
    after = json.loads(subprocess.run([sys.executable, "-m", "postbote", "-c", str(config), "status", "--json"],
                                      cwd=REPO, capture_output=True, text=True, timeout=10).stdout)
    assert after["daemon"]["running"] is False and after["accounts"][0]["next_poll"] is None


def test_status_reads_without_leaving_files_behind(tmp_path: Path, capsys) -> None:
    config = write_config(tmp_path / "postbote.yaml", [account("bob", None, tmp_path / "Maildir")])
    poll_every_account(config)
    before = sorted(p.name for p in (tmp_path / "state").iterdir())
    assert main(["-c", str(config), "status"]) == 1
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == before
    assert "bob  FAILED" in capsys.readouterr().out


def test_status_reads_a_database_from_an_older_version(tmp_path: Path, capsys) -> None:
    """The tables an older daemon wrote (no poll counters, no since/attempts per message), read while it runs."""
    state = tmp_path / "state"
    state.mkdir()
    db = sqlite3.connect(state / "postbote.sqlite3")
    db.executescript("""CREATE TABLE polls (account TEXT PRIMARY KEY, finished REAL NOT NULL, ok INTEGER NOT NULL,
        duration REAL NOT NULL, counts TEXT NOT NULL, error TEXT, last_success REAL, totals TEXT NOT NULL);
        CREATE TABLE messages (account TEXT NOT NULL, uid TEXT NOT NULL, status TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '', message_id TEXT, size INTEGER, updated REAL NOT NULL,
        PRIMARY KEY (account, uid));""")
    db.execute("INSERT INTO polls VALUES ('bob', ?, 1, 0.5, '{\"delivered\": 3}', NULL, ?, '{\"delivered\": 9}')",
               (time.time(), time.time()))
    db.execute("INSERT INTO messages VALUES ('bob', 'u7', 'delivered', '', '<7@x>', 10, ?)", (time.time(),))
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


# --- what waits on the server (issue 11, item 17)


def record_waiting(config_path: Path, *outcomes: tuple[str, str, str]) -> None:
    """Write what the poller writes for messages it could not deliver: ``(uid, status, reason)``."""
    config = load_config(config_path, make_plugin_manager(entry_points=False))
    store = StateStore(config.state_dir)
    try:
        for uid, status, reason in outcomes:
            store.record(config.accounts[0].name, uid, status, reason=reason, size=1234,
                         message_id=f"<{uid}@example.net>")
    finally:
        store.close()


def polled_fine(tmp_path: Path, **extra: object) -> Path:
    server = POP3Server([]).start()
    try:
        config = write_config(tmp_path / "postbote.yaml", [account("alice", server, tmp_path / "Maildir", **extra)])
        poll_every_account(config)
    finally:
        server.stop()
    return config


def test_status_lists_deferred_and_rejected_messages_with_their_reasons_and_exits_1(tmp_path: Path,
                                                                                     capsys) -> None:
    config = polled_fine(tmp_path)
    record_waiting(config, ("u1", "deferred", "maildir /m: Permission denied"),
                   ("u2", "rejected", "smtp 127.0.0.1:25: 550 5.7.1 refused"))
    assert main(["-c", str(config), "status"]) == 1
    out = capsys.readouterr().out
    assert "alice  WAITING, last poll " in out
    assert "2 messages waiting on the server: 1 deferred, 1 rejected" in out
    assert "  u1  deferred since " in out and ": maildir /m: Permission denied" in out
    assert "  u2  rejected since " in out and ": smtp 127.0.0.1:25: 550 5.7.1 refused" in out
    assert "postbote retry alice [UID...]" in out
    assert "STALE" not in out


def test_status_json_lists_every_waiting_message_and_whether_the_account_is_stale(tmp_path: Path,
                                                                                   capsys) -> None:
    config = polled_fine(tmp_path)
    record_waiting(config, ("u1", "deferred", "mda: exit status 75"))
    assert main(["-c", str(config), "status", "--json"]) == 1
    (alice,) = json.loads(capsys.readouterr().out)["accounts"]
    (waiting,) = alice["waiting"]
    assert {key: waiting[key] for key in ("uid", "status", "reason", "attempts", "size", "message_id")} == {
        "uid": "u1", "status": "deferred", "reason": "mda: exit status 75", "attempts": 1, "size": 1234,
        "message_id": "<u1@example.net>"}
    assert abs(datetime.fromisoformat(waiting["since"]).timestamp() - time.time()) < 60
    assert (alice["stale"], alice["stale_after"]) == (False, 3600.0)


def test_an_account_is_stale_once_mail_has_waited_longer_than_stale_after(tmp_path: Path) -> None:
    config_path = polled_fine(tmp_path, stale_after="30m")
    record_waiting(config_path, ("u1", "deferred", "451 4.3.0 try later"))
    config = load_config(config_path, make_plugin_manager(entry_points=False))
    since = collect(config).accounts[0].waiting[0].since
    fresh, late = io.StringIO(), io.StringIO()
    show_status(config, out=fresh, now=since + 29 * 60)
    assert show_status(config, out=late, now=since + 31 * 60) == 1
    assert "alice  WAITING" in fresh.getvalue() and "STALE" not in fresh.getvalue()
    assert "alice  STALE" in late.getvalue()
    assert "STALE: mail has waited 31m, longer than stale_after (30m)" in late.getvalue()
    assert "(1 stale)" in late.getvalue()


def test_status_shows_at_most_twenty_waiting_messages_per_account_as_text(tmp_path: Path, capsys) -> None:
    config = polled_fine(tmp_path)
    record_waiting(config, *[(f"u{n:02}", "deferred", "451 later") for n in range(25)])
    assert main(["-c", str(config), "status"]) == 1
    out = capsys.readouterr().out
    assert "25 messages waiting on the server: 25 deferred" in out
    assert out.count("deferred since") == 20 and "... and 5 more (postbote status --json lists every one)" in out


def test_status_is_0_again_once_nothing_waits(tmp_path: Path, capsys) -> None:
    config = polled_fine(tmp_path)
    assert main(["-c", str(config), "status"]) == 0
    assert "alice  ok, last poll " in capsys.readouterr().out


# --- one line, never a traceback (issue 11, item 18)


@contextmanager
def effective_user(uid: int) -> Iterator[None]:
    """Run the block with the file permissions of ``uid`` (root is not stopped by chmod); a no-op for non-root."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(uid)
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_status_with_an_unreadable_state_directory_parent_prints_one_line(capsys) -> None:
    base = Path(tempfile.mkdtemp(prefix="pb-status-"))
    try:
        base.chmod(0o755)
        (base / "locked" / "state").mkdir(parents=True)
        config = write_config(base / "postbote.yaml", [account("alice", None, base / "Maildir", password=None,
                                                               password_env="PB_UNUSED")])
        config.write_text(config.read_text().replace(str(base / "state"), str(base / "locked" / "state")))
        config.chmod(0o644)
        main(["-c", str(config), "status"])  # as root: every module the command needs is imported now
        capsys.readouterr()
        (base / "locked").chmod(0)
        with effective_user(65534):
            status = main(["-c", str(config), "status"])
        captured = capsys.readouterr()
        assert status == 1
        assert captured.err == (f"postbote: error: cannot read the state directory {base / 'locked' / 'state'}: "
                                f"Permission denied; run this as the user postbote runs as (e.g. sudo -u postbote "
                                f"postbote status)\n")
    finally:
        (base / "locked").chmod(0o755)
        shutil.rmtree(base)


def test_status_json_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    config = write_config(tmp_path / "postbote.yaml", [account("alice", None, tmp_path / "Maildir")])
    reader, writer = os.pipe()
    os.close(reader)  # `postbote status --json | head -1` after head has gone: every write fails with EPIPE
    try:
        done = subprocess.run([sys.executable, "-m", "postbote", "-c", str(config), "status", "--json"], cwd=REPO,
                              stdout=writer, stderr=subprocess.PIPE, text=True, timeout=30)
    finally:
        os.close(writer)
    assert (done.returncode, done.stderr) == (1, "")
