"""Several ``postbote run`` workers sharing 300 accounts through a PostgreSQL state (issue 16), end to end.

Real processes against a real Dovecot and a real PostgreSQL: three workers, a compressed ``poll_interval``, one
worker SIGKILLed and another added mid-run. What a provider running them would check:

- every account is polled in every interval (the gap between two polls of an account is at most an interval plus
  the time the schedule's batching and a busy machine add, and one lease more across the kill);
- no account is ever polled by two workers at once -- read from the server's side: with
  ``mail_max_userip_connections = 1`` Dovecot never had to refuse a second session of a user. Its anvil counts each
  user's open sessions exactly and logs every refusal; the order of its log's login and logout lines does not tell
  the same (two processes log them, and a short session's logout can precede its login), so it is not used;
- nothing is lost (every message put into a mailbox, before and after the kill, reaches the Maildir and leaves the
  server) and a kill costs at most one duplicate per poll it cut short.

The bounds come from the configured interval and lease, never from how fast this machine is.
"""

from __future__ import annotations

import collections
import email
import json
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import psycopg
import pytest
import yaml
from postbote.state import StateStore
from postbote.state_postgres import LeaseBoard, PostgresDatabase

from tests.harness import DaemonRun, Postbote
from tests.servers.dovecot import DovecotServer
from tests.servers.postgres import PASSWORD

pytestmark = pytest.mark.usefixtures("time_limit")
TIME_LIMIT = 240

ACCOUNTS = 300
INTERVAL = 8.0  # seconds: under 40 polls a second across the workers, on two cores beside Dovecot and PostgreSQL
LEASE = 5.0
MAX_PARALLEL = 8
BATCHING = 1.0 + 0.25  # a finished poll's lease is given back within a second; claims come every quarter second
SLACK = INTERVAL / 2  # a busy machine's share: a poll's own time, a late wake-up, polls queued behind others
MAILBOXES_WITH_MAIL = 30


def user(index: int) -> str:
    return f"u{index:04d}"


@pytest.fixture
def many_users(dovecot_factory: Callable[..., DovecotServer]) -> Iterator[DovecotServer]:
    """300 users on a Dovecot with limits raised for the workers' connections, and one session per user and
    address (``dovecot_factory`` is asked for its checks only: skipped without Dovecot, failed in CI)."""
    server = DovecotServer(tls=False, users={}, clients=4 * MAX_PARALLEL,
                           extra_config="mail_max_userip_connections = 1\n")
    server.add_users({user(index): f"pw-{user(index)}" for index in range(ACCOUNTS)})
    server.start()
    try:
        yield server
    finally:
        server.stop()


def write_config(directory: Path, name: str, server: DovecotServer, dsn: str, inbox: Path) -> Path:
    """One worker's config: all 300 accounts (every worker runs the same list), its own state_dir."""
    accounts = [{"name": user(index), "host": server.host, "port": server.pop3_port, "tls": "none",
                 "username": user(index), "password": f"pw-{user(index)}", "poll_interval": f"{INTERVAL:g}s",
                 "timeout": "10s", "deliver": {"maildir": str(inbox)}} for index in range(ACCOUNTS)]
    config = {"state": dsn, "state_dir": str(directory / name), "worker_lease": f"{LEASE:g}s",
              "max_parallel": MAX_PARALLEL, "max_parallel_per_host": MAX_PARALLEL,
              "log": {"level": "info", "format": "json"}, "accounts": accounts}
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path


def mail(tag: str) -> bytes:
    return (f"From: sender@example.org\r\nTo: {tag}@example.org\r\nSubject: {tag}\r\n"
            f"Message-ID: <{tag}@postbote.test>\r\n\r\nbody of {tag}\r\n").encode()


def delivered_ids(inbox: Path) -> collections.Counter[str]:
    found: collections.Counter[str] = collections.Counter()
    for folder in ("new", "cur"):
        for path in (inbox / folder).glob("*") if (inbox / folder).is_dir() else []:
            found[email.message_from_bytes(path.read_bytes())["Message-ID"]] += 1
    return found


def polls_by_account(runs: list[DaemonRun]) -> dict[str, list[float]]:
    """When each account's polls finished, from every worker's log (the killed one's too)."""
    finished: dict[str, list[float]] = collections.defaultdict(list)
    for run in runs:
        for event in run.events("poll.finished"):
            finished[event["account"]].append(datetime.fromisoformat(event["timestamp"]).timestamp())
    return {name: sorted(times) for name, times in finished.items()}


def worker_holding(dsn: str, pid: int) -> tuple[str, set[str]]:
    """The id of the worker process ``pid`` and the accounts it holds leases on now."""
    with psycopg.connect(dsn) as db:
        (worker,) = db.execute("SELECT id FROM workers WHERE pid = %s", (pid,)).fetchone() or (None,)
        held = {name for (name,) in db.execute("SELECT account FROM account_leases WHERE lease_worker = %s",
                                               (worker,))}
    assert worker is not None, f"worker pid {pid} is not in the workers table"
    return worker, held


def wait(seconds: float, check: Callable[[], None]) -> None:
    """Sleep ``seconds``, checking every second that the workers are still up."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        check()
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def test_three_workers_share_300_accounts_one_killed_one_added_every_account_polled_once_at_a_time_nothing_lost(
        tmp_path: Path, postgres_dsn: str, many_users: DovecotServer,
        daemons: Callable[..., DaemonRun]) -> None:
    server = many_users
    inbox = tmp_path / "inbox"
    for index in range(MAILBOXES_WITH_MAIL):
        server.deliver(user(index), mail(f"before-{index}"))
    configs = [write_config(tmp_path, f"worker{number}", server, postgres_dsn, inbox) for number in range(4)]
    runs = [daemons(config) for config in configs[:3]]

    def all_up() -> None:
        for run in runs:
            if run is not killed and run.process.poll() is not None:
                raise AssertionError(f"a worker exited ({run.process.returncode}):\n{run.log()[-5000:]}")

    killed: DaemonRun | None = None
    started = time.time()
    wait(2 * INTERVAL, all_up)
    for index in range(MAILBOXES_WITH_MAIL, 2 * MAILBOXES_WITH_MAIL):  # mail arriving around the kill
        server.deliver(user(index), mail(f"around-{index}"))
    killed = runs[0]
    deadline = time.monotonic() + 2 * INTERVAL
    while not (held_at_kill := worker_holding(postgres_dsn, killed.process.pid)[1]):  # kill it with work in hand
        assert time.monotonic() < deadline, "the first worker held no lease for two intervals"
        time.sleep(0.05)
    killed.process.send_signal(signal.SIGKILL)
    killed_id = worker_holding(postgres_dsn, killed.process.pid)[0]
    killed_at = time.time()
    killed.wait(10)
    wait(INTERVAL, all_up)
    runs.append(daemons(configs[3]))
    for index in range(2 * MAILBOXES_WITH_MAIL, 3 * MAILBOXES_WITH_MAIL):  # mail for the added worker's time
        server.deliver(user(index), mail(f"after-{index}"))
    wait(3 * INTERVAL, all_up)
    for run in runs[1:]:
        assert run.stop(timeout=30) == 0, run.log()[-5000:]
    ended = time.time()

    assert not [run for run in runs if PASSWORD in run.log()], "the database password in a worker's log"
    polls = polls_by_account(runs)
    assert sorted(polls) == [user(index) for index in range(ACCOUNTS)], "every account was polled"
    normal_gap = INTERVAL + BATCHING + SLACK
    late = {}
    for name, times in polls.items():
        edges = [started + INTERVAL, *times, ended - normal_gap]  # the first round is spread over START_JITTER
        for before, after in zip(edges, edges[1:], strict=False):
            allowed = normal_gap + (LEASE if before <= killed_at <= after else 0.0)
            if after - before > allowed:
                late[name] = round(after - before, 2)
    assert not late, f"accounts not polled in an interval ({normal_gap:g} s, {normal_gap + LEASE:g} s across the " \
                     f"kill): {late}"

    taken_over = [min(t for t in polls[name] if t > killed_at) - killed_at for name in held_at_kill]
    print(f"\nworker {killed_id} killed holding {len(held_at_kill)} lease(s); taken over after "
          f"{max(taken_over, default=0):.2f} s at most (lease {LEASE:g} s, interval {INTERVAL:g} s); "
          f"{sum(len(times) for times in polls.values())} polls in {ended - started:.0f} s")

    dovecot_log = server.log_text()
    assert "Maximum number of connections" not in dovecot_log, "Dovecot refused a second session of a user"
    failed = [event for run in runs for event in run.events("poll.finished") if not event.get("ok")]
    assert failed == [], "a poll failed (a refused second session would)"
    logins = len(re.findall(r"pop3-login: (?:Info: )?Login: user=", dovecot_log))
    assert logins >= sum(len(times) for times in polls.values()), "the server saw every poll the workers logged"

    copies = delivered_ids(inbox)
    expected = {f"<{when}-{index}@postbote.test>" for when, first in (("before", 0), ("around", 1), ("after", 2))
                for index in range(first * MAILBOXES_WITH_MAIL, (first + 1) * MAILBOXES_WITH_MAIL)}
    assert expected - set(copies) == set(), "messages lost"
    twice = {message for message, count in copies.items() if count > 1}
    assert all(copies[message] == 2 for message in twice), copies
    assert len(twice) <= MAX_PARALLEL, f"more duplicates than polls the kill could cut short: {twice}"
    assert all(server.count(user(index)) == 0 for index in range(3 * MAILBOXES_WITH_MAIL)), "mail left on the server"

    with psycopg.connect(postgres_dsn) as db:
        rows = db.execute("SELECT id, polls FROM workers").fetchall()
        leased = db.execute("SELECT account, lease_worker FROM account_leases WHERE lease_worker IS NOT NULL"
                            ).fetchall()
    assert [worker for worker, _ in rows] == [killed_id], "the stopped workers left; the killed one stays, stale"
    assert leased == [], "a stopped worker gives its leases back; the killed one's were taken over"


# --- postbote status and postbote poll beside the workers


def shared_config(postbote: Postbote, dsn: str, dovecot: DovecotServer | None = None) -> Path:
    port = dovecot.pop3_port if dovecot else 1
    return postbote.configure([{"name": "alice", "host": "127.0.0.1", "port": port, "tls": "none",
                                "username": "alice", "password": "alice-secret", "poll_interval": "5m",
                                "timeout": "10s", "deliver": {"maildir": str(postbote.directory / "inbox")}}],
                              top={"state": dsn, "worker_lease": "30s"})


def a_worker(dsn: str) -> LeaseBoard:
    """Another worker, as a running ``postbote run`` elsewhere appears in the database."""
    from postbote.config import shared_state

    state = shared_state(dsn)
    assert state is not None
    worker = LeaseBoard(PostgresDatabase(state), lease=30.0)
    worker.join()
    return worker


def test_status_shows_the_workers_their_heartbeats_and_who_polls_which_account(
        postbote: Postbote, postgres_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    shared_config(postbote, postgres_dsn)
    assert postbote.run("status") == 0  # no worker yet: the tables are made by the first to open the database
    worker = a_worker(postgres_dsn)
    worker.add_accounts({"alice": 0.0})
    assert worker.claim(1) == ["alice"]
    capsys.readouterr()
    postbote.run("status")
    text = capsys.readouterr().out
    assert "workers: 1 running" in text and worker.worker in text and f"pid {os.getpid()}" in text
    assert f"being polled by worker {worker.worker}" in text
    assert "pg-test-secret" not in text and "********" in text
    postbote.run("status", "--json")
    shown = json.loads(capsys.readouterr().out)
    assert [entry["id"] for entry in shown["workers"]] == [worker.worker]
    assert shown["workers"][0]["holding"] == 1 and shown["accounts"][0]["held_by"] == worker.worker
    worker.leave()
    worker.database.close()


def test_poll_leaves_an_account_a_worker_is_polling_and_polls_it_once_the_lease_is_free(
        postbote: Postbote, postgres_dsn: str, dovecot: DovecotServer) -> None:
    shared_config(postbote, postgres_dsn, dovecot)
    dovecot.deliver("alice", mail("one-shot"))
    worker = a_worker(postgres_dsn)
    worker.add_accounts({"alice": 0.0})
    assert worker.claim(1) == ["alice"]
    assert postbote.poll() == 0, "the account is in a worker's hands: nothing to report"
    assert dovecot.count("alice") == 1 and delivered_ids(postbote.directory / "inbox") == {}
    worker.release({"alice": 300.0})
    assert postbote.poll() == 0
    assert dovecot.count("alice") == 0
    assert delivered_ids(postbote.directory / "inbox") == {"<one-shot@postbote.test>": 1}
    worker.leave()
    worker.database.close()


def test_metrics_give_each_workers_figures_and_every_workers_polls_per_account(tmp_path: Path,
                                                                              postgres_dsn: str) -> None:
    from postbote.config import load_config
    from postbote.pluginmanager import make_plugin_manager
    from postbote.plugins import metrics

    from tests.harness import account, write_config

    path = write_config(tmp_path / "postbote.yaml", [account("alice", None, tmp_path / "Maildir")],
                        plugins={"metrics": {"textfile": str(tmp_path / "postbote.prom")}}, state=postgres_dsn)
    config = load_config(path, make_plugin_manager(entry_points=False))
    worker = a_worker(postgres_dsn)
    worker.add_accounts({"alice": 0.0})
    worker.claim(1)
    worker.release({"alice": 300.0}, polls=3, failures=1)
    store = StateStore(tmp_path / "state", shared=config.state)
    store.record_poll("alice", ok=True, duration=0.2, counts={}, error=None)
    store.close()
    exporter = metrics.MetricsExporter(config)
    try:
        exporter.refresh("alice")
        text = exporter.render(["alice"])
    finally:
        exporter.close()
    labels = f'worker="{worker.worker}",host="{worker.worker.split(":")[0]}"'
    assert f"postbote_worker_polls_total{{{labels}}} 3" in text
    assert f"postbote_worker_poll_failures_total{{{labels}}} 1" in text
    assert f"postbote_worker_leases{{{labels}}} 0" in text
    assert 'postbote_polls_total{account="alice"} 1' in text
    worker.leave()
    worker.database.close()


def test_a_worker_reloaded_with_a_new_account_adds_it_to_the_shared_schedule_and_polls_it(
        postbote: Postbote, postgres_dsn: str, dovecot: DovecotServer, daemons: Callable[..., DaemonRun]) -> None:
    config = shared_config(postbote, postgres_dsn, dovecot)
    run = daemons(config)
    run.wait_for("poll.finished", account="alice", timeout=30)
    document = yaml.safe_load(config.read_text())
    document["accounts"].append({**document["accounts"][0], "name": "bob", "username": "bob",
                                 "password": "bob-secret"})
    config.write_text(yaml.safe_dump(document, sort_keys=False))
    dovecot.deliver("bob", mail("after-reload"))
    run.send(signal.SIGHUP)
    run.wait_for("poll.finished", account="bob", timeout=30)
    assert run.stop(timeout=30) == 0
    assert delivered_ids(postbote.directory / "inbox") == {"<after-reload@postbote.test>": 1}
