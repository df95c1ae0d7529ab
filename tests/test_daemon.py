"""``postbote run`` as a service (issue: runs as a service): scheduling, concurrency, backoff, signals, the lock.

The daemon runs as a real subprocess against scriptable POP3 servers and gets real signals; what a user would
check afterwards is asserted (what was delivered, what is left on the server, the exit status, the log). Scheduling
policy (backoff, jitter, parallelism) is also tested in-process with a stand-in poller, so nothing sleeps long.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import structlog.testing
import yaml
from postbote.config import load_config
from postbote.daemon import START_JITTER, Backoff, Daemon, start_delay
from postbote.pluginmanager import make_plugin_manager
from postbote.poll import PollStats
from postbote.state import StateStore
from postbote.testing.pop3server import Action, Faults, POP3Server

from tests.harness import REPO_ROOT as REPO
from tests.harness import DaemonRun, account, mail, subjects, wait_until, write_config


@pytest.fixture
def servers() -> Iterator[Callable[..., POP3Server]]:
    started: list[POP3Server] = []

    def make(messages: list[bytes] = (), faults: Faults | None = None, **kwargs: Any) -> POP3Server:
        server = POP3Server(list(messages), faults=faults, **kwargs).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


# --- scheduling policy, without waiting


class Highest(random.Random):
    """A random source always at the top of the range: the longest delays the policy allows."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_backoff_doubles_after_each_failure_up_to_the_maximum_and_a_success_resets_it() -> None:
    backoff = Backoff(interval=60, maximum=600)
    delays = [backoff.after(False, Highest()) for _ in range(6)]
    assert delays == [120, 240, 480, 600, 600, 600]
    assert backoff.after(True, Highest()) == 60
    assert backoff.after(False, Highest()) == 120


def test_backoff_never_polls_more_often_than_the_interval_and_survives_long_streaks() -> None:
    slow = Backoff(interval=7200, maximum=600)
    assert slow.after(False, Highest()) == 7200
    long_streak = Backoff(interval=1, maximum=3600, failures=100_000)
    assert long_streak.after(False, Highest()) == 3600


def test_backoff_jitter_only_shortens_the_delay_a_little() -> None:
    rng = random.Random(7)
    delays = [Backoff(interval=60, maximum=600, failures=5).after(False, rng) for _ in range(200)]
    assert all(540 <= d <= 600 for d in delays) and len(set(delays)) > 100


def test_first_polls_are_spread_over_a_few_seconds_but_never_beyond_one_interval() -> None:
    rng = random.Random(1)
    delays = [start_delay(300, rng) for _ in range(500)]
    assert 0 <= min(delays) < 0.5 and START_JITTER - 0.5 < max(delays) <= START_JITTER
    assert all(0 <= start_delay(0.5, rng) <= 0.5 for _ in range(100))


# --- the daemon in-process with a stand-in poller


class StandInPoller:
    """Records when each poll runs; ``behaviour(account_name, stop)`` returns an error or None."""

    def __init__(self, behaviour: Callable[[str, threading.Event], str | None]) -> None:
        self.behaviour = behaviour
        self.lock = threading.Lock()
        self.running: set[str] = set()
        self.most_at_once = 0
        self.overlaps: list[str] = []
        self.starts: dict[str, list[float]] = {}

    def factory(self, _pm: Any, store: StateStore, stop: threading.Event) -> StandInPoller:
        self.stop = stop
        self.store = store
        return self

    def poll(self, account: Any) -> PollStats:
        with self.lock:
            if account.name in self.running:
                self.overlaps.append(account.name)
            self.running.add(account.name)
            self.most_at_once = max(self.most_at_once, len(self.running))
            self.starts.setdefault(account.name, []).append(time.monotonic())
        try:
            error = self.behaviour(account.name, self.stop)
        finally:
            with self.lock:
                self.running.discard(account.name)
        return PollStats(account.name, error=error)


def in_process_daemon(tmp_path: Path, poller: StandInPoller, names: list[str], *, stop_grace: float = 5.0,
                      **top: Any) -> tuple[Daemon, threading.Thread, StateStore]:
    interval = top.pop("poll_interval", "1s")
    accounts = [account(name, None, tmp_path / "Maildir", poll_interval=interval) for name in names]
    path = write_config(tmp_path / "postbote.yaml", accounts, **top)
    pm = make_plugin_manager(entry_points=False)
    config = load_config(path, pm)
    store = StateStore(config.state_dir)
    daemon = Daemon(pm, config, store, poller_factory=poller.factory, stop_grace=stop_grace, rng=random.Random(3))
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    return daemon, thread, store


def stop_daemon(daemon: Daemon, thread: threading.Thread, store: StateStore, timeout: float = 5.0) -> float:
    started = time.monotonic()
    daemon.request(signal.SIGTERM)
    thread.join(timeout)
    assert not thread.is_alive(), "the daemon did not stop"
    if not daemon.abandoned:
        store.close()
    return time.monotonic() - started


def test_at_most_max_parallel_polls_run_and_never_two_of_one_account(tmp_path: Path) -> None:
    poller = StandInPoller(lambda _name, _stop: time.sleep(0.3))
    daemon, thread, store = in_process_daemon(tmp_path, poller, ["a", "b", "c", "d"], max_parallel=2,
                                              poll_interval=0.1)
    for _ in range(3):
        time.sleep(0.2)
        daemon.request(signal.SIGUSR1)  # asks for polls of accounts still running: they must be skipped
    wait_until(lambda: all(len(poller.starts.get(n, [])) >= 2 for n in "abcd"), 5, "two polls of every account")
    stop_daemon(daemon, thread, store)
    assert poller.most_at_once == 2
    assert poller.overlaps == []


def test_at_most_max_parallel_per_host_polls_run_against_one_server(tmp_path: Path) -> None:
    """Providers limit connections per address: accounts on one host take turns, however many may run at once."""
    poller = StandInPoller(lambda _name, _stop: time.sleep(0.1))
    daemon, thread, store = in_process_daemon(tmp_path, poller, ["a", "b", "c", "d"], max_parallel=4,
                                              max_parallel_per_host=1, poll_interval=0.1)
    wait_until(lambda: all(len(poller.starts.get(n, [])) >= 2 for n in "abcd"), 10, "two polls of every account")
    stop_daemon(daemon, thread, store)
    assert poller.most_at_once == 1 and poller.overlaps == []


def test_a_hanging_account_does_not_hold_up_the_others(tmp_path: Path) -> None:
    release = threading.Event()
    poller = StandInPoller(lambda name, _stop: release.wait(10) and None if name == "stuck" else None)
    daemon, thread, store = in_process_daemon(tmp_path, poller, ["stuck", "fine"], poll_interval=0.1)
    wait_until(lambda: len(poller.starts.get("fine", [])) >= 5, 5, "five polls of the fine account")
    assert len(poller.starts["stuck"]) == 1
    release.set()
    stop_daemon(daemon, thread, store)


def test_failing_account_backs_off_exponentially_to_the_maximum(tmp_path: Path) -> None:
    poller = StandInPoller(lambda _name, _stop: "connection refused")
    daemon, thread, store = in_process_daemon(tmp_path, poller, ["down"], poll_interval=0.1, backoff_max=0.4)
    starts = wait_until(lambda: len(poller.starts.get("down", [])) >= 5 and poller.starts["down"], 5, "5 polls")
    stop_daemon(daemon, thread, store)
    gaps = [later - earlier for earlier, later in zip(starts, starts[1:], strict=False)]
    # 0.2, 0.4, then capped at 0.4; each shortened by at most 10 % jitter
    assert 0.17 < gaps[0] < 0.3 and all(0.35 < gap < 0.55 for gap in gaps[1:4]), gaps


def test_a_crashing_poll_is_one_event_a_failed_poll_and_the_other_accounts_go_on(tmp_path: Path) -> None:
    def behaviour(name: str, _stop: threading.Event) -> None:
        if name == "crashy":
            raise RuntimeError("a bug")

    poller = StandInPoller(behaviour)
    with structlog.testing.capture_logs() as events:
        daemon, thread, store = in_process_daemon(tmp_path, poller, ["crashy", "fine"], poll_interval=0.1,
                                                  backoff_max=0.2)
        wait_until(lambda: len(poller.starts.get("crashy", [])) >= 2 and len(poller.starts.get("fine", [])) >= 3,
                   5, "polls of both accounts after the crash")
        record = store.last_poll("crashy")
        stop_daemon(daemon, thread, store)
    crashes = [e for e in events if e["event"] == "poll.crashed"]
    assert crashes and all(e["account"] == "crashy" for e in crashes)
    assert crashes[0]["error"] == "internal error: RuntimeError: a bug" and "exc_info" not in crashes[0]
    assert record is not None and not record.ok and record.error == "internal error: RuntimeError: a bug"


def test_stop_abandons_a_poll_that_ignores_it_after_the_grace_period(tmp_path: Path) -> None:
    unblock = threading.Event()
    poller = StandInPoller(lambda _name, _stop: unblock.wait(10) and None)
    daemon, thread, store = in_process_daemon(tmp_path, poller, ["slow"], stop_grace=0.3, poll_interval=0.1)
    wait_until(lambda: poller.running, 3, "the poll to start")
    took = stop_daemon(daemon, thread, store)
    assert took < 2 and daemon.abandoned == ["slow"]
    unblock.set()


def test_stop_waits_for_the_poll_in_hand_to_finish(tmp_path: Path) -> None:
    def one_more_message(_name: str, stop: threading.Event) -> None:
        stop.wait(5)
        time.sleep(0.2)  # the message in hand

    poller = StandInPoller(one_more_message)
    daemon, thread, store = in_process_daemon(tmp_path, poller, ["busy"], poll_interval=0.1)
    wait_until(lambda: poller.running, 3, "the poll to start")
    stop_daemon(daemon, thread, store)
    assert daemon.abandoned == [] and poller.running == set()


# --- the real daemon, real signals


def test_sigterm_ends_the_poll_between_messages_quits_and_exits_0_without_losing_mail(
        tmp_path: Path, servers, daemons) -> None:
    everything = [f"Subject: message {n}" for n in range(1, 6)]
    server = servers([mail(n) for n in range(1, 6)], Faults().on("RETR 3", action=Action.stall(1.0)))
    maildir = tmp_path / "Maildir"
    config = write_config(tmp_path / "postbote.yaml", [account("box", server, maildir)])
    daemon = daemons(config)
    daemon.wait_for("daemon.started")
    daemon.send(signal.SIGUSR1)
    wait_until(lambda: "RETR 3" in server.commands, 5, "RETR 3")
    started = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - started < 5
    assert daemon.events("poll.stopping") and "QUIT" in server.commands
    delivered = subjects(maildir)
    left = sorted(line.decode() for _uid, data in server.messages() for line in data.splitlines()
                  if line.startswith(b"Subject:"))
    assert "Subject: message 1" in delivered and "Subject: message 5" in left
    assert sorted(delivered + left) == everything  # each message delivered and deleted, or still on the server
    assert subprocess.run([sys.executable, "-m", "postbote", "-c", str(config), "poll"], cwd=REPO,
                          capture_output=True).returncode == 0
    assert subjects(maildir) == everything and server.uids() == []


def test_sigterm_while_a_server_hangs_exits_0_within_its_timeout(tmp_path: Path, servers, daemons) -> None:
    server = servers([mail(1)], Faults().on("RETR", action=Action.stall(30)))
    config = write_config(tmp_path / "postbote.yaml", [account("hangs", server, tmp_path / "Maildir")])
    daemon = daemons(config)
    daemon.wait_for("daemon.started")
    daemon.send(signal.SIGUSR1)
    wait_until(lambda: "RETR 1" in server.commands, 5, "RETR 1")
    started = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - started < 4
    assert server.uids() != [] and subjects(tmp_path / "Maildir") == []


def test_a_stalling_account_does_not_delay_another_accounts_delivery(tmp_path: Path, servers, daemons) -> None:
    stalled = servers([mail(1)], Faults().on("GREETING", action=Action.stall(30)))
    healthy = servers([mail(2)])
    config = write_config(tmp_path / "postbote.yaml", [
        account("stalled", stalled, tmp_path / "stalled", timeout="3s"),
        account("healthy", healthy, tmp_path / "healthy")])
    daemon = daemons(config)
    daemon.wait_for("daemon.started")
    daemon.send(signal.SIGUSR1)
    started = time.monotonic()
    wait_until(lambda: subjects(tmp_path / "healthy") == ["Subject: message 2"], 2, "the healthy delivery")
    assert time.monotonic() - started < 2
    assert not daemon.events("poll.finished", account="stalled")
    assert daemon.stop() == 0


def test_sigusr1_polls_every_account_now(tmp_path: Path, servers, daemons) -> None:
    server = servers([mail(1)])
    maildir = tmp_path / "Maildir"
    config = write_config(tmp_path / "postbote.yaml", [account("box", server, maildir, poll_interval="1h")])
    daemon = daemons(config)
    daemon.wait_for("daemon.started")
    daemon.send(signal.SIGUSR1)
    daemon.wait_for("poll.finished", account="box")
    assert subjects(maildir) == ["Subject: message 1"]
    server.add_message(mail(2))  # the next scheduled poll is an hour away now
    daemon.send(signal.SIGUSR1)
    wait_until(lambda: len(subjects(maildir)) == 2, 3, "the second message")
    assert daemon.stop() == 0


def test_a_poll_request_while_the_account_is_polling_polls_it_again_when_that_poll_ends(
        tmp_path: Path, servers, daemons) -> None:
    """The running poll listed the mailbox before the new mail came: the request is kept, not dropped as "already
    running", or the mail would wait for the next scheduled poll (an hour here)."""
    server = servers([mail(1)], Faults().on("RETR", action=Action.stall(3.0)))
    maildir = tmp_path / "Maildir"
    config = write_config(tmp_path / "postbote.yaml",
                          [account("box", server, maildir, poll_interval="1h", timeout="30s")])
    daemon = daemons(config)
    daemon.wait_for("daemon.started")
    daemon.send(signal.SIGUSR1)
    wait_until(lambda: "RETR 1" in server.commands, 10, "the first poll's RETR")  # listed, and held there
    server.add_message(mail(2))
    daemon.send(signal.SIGUSR1)
    daemon.wait_for("poll.requested", count=2)
    wait_until(lambda: len(subjects(maildir)) == 2, 30, "the second message")
    assert subjects(maildir) == ["Subject: message 1", "Subject: message 2"]
    assert daemon.stop() == 0


def test_postbote_poll_while_the_daemon_runs_asks_it_to_poll(tmp_path: Path, servers, daemons) -> None:
    server = servers([mail(1)])
    maildir = tmp_path / "Maildir"
    config = write_config(tmp_path / "postbote.yaml", [account("box", server, maildir, poll_interval="1h")])
    daemon = daemons(config)
    daemon.wait_for("daemon.started")
    poll = subprocess.run([sys.executable, "-m", "postbote", "-c", str(config), "poll"], cwd=REPO,
                          capture_output=True, text=True, timeout=10)
    assert poll.returncode == 0
    assert poll.stdout == "", "no line on stdout when it is no terminal (cron mails every line)"
    assert '"event": "poll.asked_daemon"' in poll.stderr and f'"pid": {daemon.process.pid}' in poll.stderr
    daemon.wait_for("poll.requested")
    as_cron = config.with_name("cron.yaml")  # the same accounts and state, the log at its default level
    document = yaml.safe_load(config.read_text())
    del document["log"]
    as_cron.write_text(yaml.safe_dump(document))
    as_cron.chmod(0o600)
    cron = subprocess.run([sys.executable, "-m", "postbote", "-c", str(as_cron), "poll"], cwd=REPO,
                          capture_output=True, text=True, timeout=10)
    assert (cron.returncode, cron.stdout, cron.stderr) == (0, "", ""), "under cron: nothing to mail"
    daemon.wait_for("poll.requested", count=2)
    wait_until(lambda: subjects(maildir) == ["Subject: message 1"], 3, "the delivery")
    unknown = subprocess.run([sys.executable, "-m", "postbote", "-c", str(config), "poll", "nobody"], cwd=REPO,
                             capture_output=True, text=True, timeout=10)
    assert unknown.returncode == 2 and "no account named 'nobody'" in unknown.stderr
    assert daemon.stop() == 0


def test_a_second_daemon_on_the_same_state_directory_refuses_to_start(tmp_path: Path, servers, daemons) -> None:
    server = servers()
    config = write_config(tmp_path / "postbote.yaml", [account("box", server, tmp_path / "Maildir")])
    first = daemons(config)
    first.wait_for("daemon.started")
    second = subprocess.run([sys.executable, "-m", "postbote", "-c", str(config), "run"], cwd=REPO,
                            capture_output=True, text=True, timeout=10)
    assert second.returncode == 1
    assert f"another postbote daemon (pid {first.process.pid}) is using the state directory" in second.stderr
    assert first.process.poll() is None
    assert first.stop() == 0


def test_sighup_with_a_broken_config_keeps_running_on_the_old_one(tmp_path: Path, servers, daemons) -> None:
    server = servers([mail(1)])
    maildir = tmp_path / "Maildir"
    config = write_config(tmp_path / "postbote.yaml", [account("box", server, maildir, poll_interval="1h")])
    daemon = daemons(config)
    daemon.wait_for("daemon.started")
    config.write_text(config.read_text().replace("poll_interval: 1h", "poll_intervall: 1h"))
    daemon.send(signal.SIGHUP)
    (failure,) = daemon.wait_for("config.reload_failed")
    assert any("unknown key (did you mean 'poll_interval'?)" in line for line in failure["error"])
    daemon.send(signal.SIGUSR1)
    wait_until(lambda: subjects(maildir) == ["Subject: message 1"], 3, "a delivery on the old config")
    assert daemon.stop() == 0


def test_sighup_with_a_valid_config_switches_to_it(tmp_path: Path, servers, daemons) -> None:
    first, second = servers([mail(1)]), servers([mail(2)])
    path = tmp_path / "postbote.yaml"
    config = write_config(path, [account("one", first, tmp_path / "one", poll_interval="1h")])
    daemon = daemons(config)
    daemon.wait_for("daemon.started")
    write_config(path, [account("one", first, tmp_path / "one", poll_interval="1h"),
                        account("two", second, tmp_path / "two", poll_interval="1h")])
    daemon.send(signal.SIGHUP)
    (reloaded,) = daemon.wait_for("config.reloaded")
    assert reloaded["added"] == ["two"] and "removed" not in reloaded  # no "removed": null
    daemon.send(signal.SIGUSR1)
    wait_until(lambda: subjects(tmp_path / "two") == ["Subject: message 2"], 3, "the new account's delivery")
    assert daemon.stop() == 0


def test_backoff_after_failures_grows_and_is_capped(tmp_path: Path, daemons) -> None:
    config = write_config(tmp_path / "postbote.yaml", [account("down", None, tmp_path / "Maildir",
                                                               poll_interval=0.2)], backoff_max=0.5)
    daemon = daemons(config)
    events = daemon.wait_for("poll.backing_off", count=4, account="down")
    delays = [e["next_poll_in_s"] for e in events[:4]]
    assert [e["failed_polls"] for e in events[:4]] == [1, 2, 3, 4]
    assert 0.35 < delays[0] <= 0.4 and all(0.44 < d <= 0.5 for d in delays[1:]), delays
    assert daemon.stop() == 0


def test_a_refused_login_is_logged_once_per_streak(tmp_path: Path, servers, daemons) -> None:
    server = servers([mail(1)])
    config = write_config(tmp_path / "postbote.yaml", [account("box", server, tmp_path / "Maildir",
                                                               password="wrong", poll_interval=0.1)],
                          backoff_max=0.2)
    daemon = daemons(config)
    daemon.wait_for("poll.finished", count=4, account="box")
    assert len(daemon.events("account.failed", account="box")) == 1
    assert len(daemon.events("account.login_refused", account="box")) == 1
    assert [e["level"] for e in daemon.events("poll.backing_off")][:3] == ["info", "debug", "debug"]
    assert daemon.stop() == 0


def test_a_log_file_moved_away_by_logrotate_is_opened_anew_on_sighup(tmp_path: Path, servers: Callable[..., POP3Server],
                                                                      daemons: Callable[..., DaemonRun]) -> None:
    log_file = tmp_path / "postbote.log"
    config = write_config(tmp_path / "postbote.yaml",
                          [account("one", servers([mail(1)]), tmp_path / "one", poll_interval="1h")],
                          log={"format": "json", "level": "info", "file": str(log_file)})
    daemon = daemons(config)
    wait_until(lambda: log_file.exists() and "daemon.started" in log_file.read_text(), 10, "daemon.started in the file")
    log_file.rename(tmp_path / "postbote.log.1")  # what logrotate does, then it sends SIGHUP
    daemon.send(signal.SIGHUP)
    wait_until(lambda: log_file.exists() and "config.reloaded" in log_file.read_text(), 10, "the new file")
    assert "daemon.started" not in log_file.read_text()
    assert "daemon.started" in (tmp_path / "postbote.log.1").read_text()
    assert daemon.stop() == 0
    assert "daemon.stopped" in log_file.read_text()
