"""The daemon's scheduling at scale (issue 16): the account queue is a heap, ready polls wait per server host.

The `schedule` library looks at every job on every tick (``run_pending`` and ``idle_seconds`` each call
``datetime.now()`` per job), so with one job per account 100,000 accounts cost 100,000 comparisons per tick. The
accounts are planned in `DueQueue` (next due in O(log n)); `schedule` keeps the daemon's housekeeping, one job.
"""

from __future__ import annotations

import random
import signal
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from postbote.config import load_config
from postbote.daemon import Daemon, DueQueue, ReadyQueue
from postbote.pluginmanager import make_plugin_manager
from postbote.poll import PollStats
from postbote.state import StateStore

from tests.harness import account, wait_until, write_config

pytestmark = pytest.mark.usefixtures("time_limit")


def test_the_due_queue_gives_accounts_in_the_order_they_are_due() -> None:
    due = DueQueue()
    for name, when in (("c", 30.0), ("a", 10.0), ("b", 20.0)):
        due.set(name, when)
    assert due.seconds_to_next(now=5.0) == 5.0
    assert list(due.pop_due(now=20.0)) == ["a", "b"]
    assert list(due.pop_due(now=20.0)) == [], "an account taken is no longer planned"
    assert due.when("c") == 30.0 and len(due) == 1


def test_an_account_planned_again_is_due_only_at_its_new_time() -> None:
    due = DueQueue()
    due.set("a", 10.0)
    due.set("a", 50.0)  # a reload moved it
    due.set("b", 40.0)
    assert due.seconds_to_next(now=0.0) == 40.0
    assert list(due.pop_due(now=45.0)) == ["b"]
    assert list(due.pop_due(now=50.0)) == ["a"]


def test_replanning_many_times_keeps_the_heap_bounded() -> None:
    due = DueQueue()
    for round_ in range(50):
        for index in range(100):
            due.set(f"a{index}", float(round_ * 100 + index))
    assert len(due) == 100
    assert len(due._heap) <= 2 * 100 + 64
    assert list(due.pop_due(now=1e9)) == [f"a{index}" for index in range(100)]


def test_ready_accounts_are_taken_host_by_host_within_the_limits() -> None:
    ready = ReadyQueue()
    for name in ("x1", "x2", "x3"):
        ready.add(name, "pop.x.example")
    for name in ("y1", "y2"):
        ready.add(name, "pop.y.example")
    ready.add("x1", "pop.x.example")  # asked for twice: still once in the queue
    running: Counter[str] = Counter({"pop.x.example": 1})
    assert ready.take(10, running, per_host=2) == ["x1", "y1", "y2"], "x's second slot, then y's two"
    assert running == Counter({"pop.x.example": 2, "pop.y.example": 2})
    assert "x2" in ready and len(ready) == 2
    running["pop.x.example"] = 0
    assert ready.take(1, running, per_host=2) == ["x2"], "no more than the free slots"


def test_forgotten_accounts_leave_the_ready_queue() -> None:
    ready = ReadyQueue()
    for name in ("a", "b", "c"):
        ready.add(name, "host")
    ready.keep_only({"a", "c"})
    assert ready.take(10, Counter(), per_host=10) == ["a", "c"]


class NeverPolled:
    """A poller the accounts of these tests never reach (their first poll is planned as late as allowed)."""

    def __init__(self, _pm: Any, store: StateStore, _stop: threading.Event) -> None:
        self.store = store

    def poll(self, account: Any) -> PollStats:
        return PollStats(account.name, error="not polled in this test")


class Latest(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return b


def test_thousands_of_accounts_are_planned_in_the_state_store_and_schedule_keeps_one_job(tmp_path: Path) -> None:
    names = [f"acct{index:05d}" for index in range(3000)]
    path = write_config(tmp_path / "postbote.yaml",
                        [account(name, None, tmp_path / "Maildir", poll_interval="1h") for name in names],
                        log={"format": "json", "level": "warning"})
    pm = make_plugin_manager(entry_points=False)
    config = load_config(path, pm)
    store = StateStore(config.state_dir)
    daemon = Daemon(pm, config, store, poller_factory=NeverPolled, rng=Latest())
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: all(store.next_poll(name) is not None for name in (names[0], names[-1])), 10,
                   "the next polls noted")
        assert all(store.next_poll(name) is not None for name in names)
        assert len(daemon.scheduler.jobs) == 1, "schedule holds the housekeeping, not one job per account"
    finally:
        daemon.request(signal.SIGTERM)
        thread.join(20)
    assert not thread.is_alive()
    assert all(store.next_poll(name) is None for name in names), "a stopped daemon plans nothing"
    store.close()


def test_the_status_line_names_a_few_failing_accounts_and_counts_the_rest(tmp_path: Path) -> None:
    names = [f"acct{index:03d}" for index in range(25)]
    path = write_config(tmp_path / "postbote.yaml",
                        [account(name, None, tmp_path / "Maildir", poll_interval="1h") for name in names])
    pm = make_plugin_manager(entry_points=False)
    store = StateStore(tmp_path / "state")
    daemon = Daemon(pm, load_config(path, pm), store, poller_factory=NeverPolled)
    daemon._plan(daemon.config.accounts, previous={})
    daemon._failing = set(names)
    line = daemon._status_line()
    store.close()
    assert line.startswith("25 account(s), 25 failing (acct000, acct001,")
    assert "acct009, and 15 more)" in line and "acct010" not in line


class CountingPoller:
    """Answers at once; remembers the threads polls ran in."""

    def __init__(self, _pm: Any, store: StateStore, _stop: threading.Event) -> None:
        self.store = store

    threads: set[int] = set()
    polls: list[str] = []

    def poll(self, account: Any) -> PollStats:
        CountingPoller.threads.add(threading.get_ident())
        CountingPoller.polls.append(account.name)
        return PollStats(account.name)


def test_polls_run_in_at_most_max_parallel_threads_kept_from_poll_to_poll(tmp_path: Path) -> None:
    names = [f"acct{index:02d}" for index in range(12)]
    path = write_config(tmp_path / "postbote.yaml",
                        [account(name, None, tmp_path / "Maildir", poll_interval="1h") for name in names],
                        max_parallel=3, log={"format": "json", "level": "warning"})
    pm = make_plugin_manager(entry_points=False)
    store = StateStore(tmp_path / "state")
    CountingPoller.threads, CountingPoller.polls = set(), []
    daemon = Daemon(pm, load_config(path, pm), store, poller_factory=CountingPoller)
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        for round_ in range(1, 4):
            daemon.request(signal.SIGUSR1)  # every account, now
            wait_until(lambda round_=round_: len(CountingPoller.polls) >= 12 * round_, 10, f"round {round_}")
    finally:
        daemon.request(signal.SIGTERM)
        thread.join(20)
    store.close()
    assert sorted(set(CountingPoller.polls)) == names
    assert len(CountingPoller.threads) <= 3, "36 polls, 3 at a time, in the same 3 threads"
