"""``postbote run``: poll every account at its ``poll_interval``, several at once, until told to stop.

When each account is next due is kept in a heap (`DueQueue`): the main loop takes the accounts that are due and
learns how long it may sleep in O(log n), which 100,000 accounts need. The `schedule` library is kept for the
daemon's human-scale housekeeping only (a few jobs: systemd's STATUS= line and the next-poll notes in the state
store, once a second): its ``run_pending`` and ``idle_seconds`` look at every job on every tick, 100,000
``datetime.now()`` calls per tick with one job per account. Due accounts wait in a `ReadyQueue`, per server host;
the main thread starts their polls in threads, at most ``max_parallel`` at a time, at most
``max_parallel_per_host`` against one host and never two for one account, so a slow or hanging server delays nobody
else (and every network operation has its ``timeout``). The main thread never polls: it sleeps on a wake-up socket
that poll threads and signals write to, so it always answers signals and the systemd watchdog.

After a failed poll an account waits twice as long each time, up to ``backoff_max``; one success brings it back to
its ``poll_interval``. A refused login is logged once per streak of refusals, not on every poll.

Signals are turned into requests handled by the main loop, between polls:

* SIGTERM, SIGINT: start nothing new, let the polls in hand finish the message they hold (each poll stops between
  messages and ends with QUIT, which is safe: every message deleted by it was recorded first) and exit 0. Polls
  still busy after `STOP_GRACE` seconds are abandoned without QUIT, so the server deletes nothing of theirs;
  a second signal abandons them at once.
* SIGHUP: load the config again; an invalid one is logged and the old one stays. The new one takes over once the
  polls running on the old one have finished.
* SIGUSR1 (``postbote poll`` sends it when a daemon holds the state directory): poll every account now.

Push: after a successful poll of an account whose source can watch for new mail (IMAP IDLE, the
``watch_mailbox`` hook), its watches are handed to one `Watcher` thread; new mail there queues the account at once.
"""

from __future__ import annotations

import contextlib
import gc
import heapq
import logging
import math
import random
import selectors
import signal
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from queue import SimpleQueue
from typing import Any

import schedule
import structlog
from postbote.config import Account, Config
from postbote.errors import LoginRefused, PostboteError
from postbote.hookspecs import hookimpl
from postbote.jobs import keep_out_of_the_collector, poll_guarded, start_plugins
from postbote.logconfig import bound, get_logger
from postbote.pluginmanager import PluginManager
from postbote.poll import PollStats
from postbote.poller import Poller
from postbote.sdnotify import Notifier
from postbote.state import StateStore, WaitingMessage
from postbote.state_postgres import UNKNOWN_ACCOUNT_DELAY, LeaseBoard, LeaseKeeper, PostgresDatabase
from postbote.status import WaitingSummary, stale_after, waiting_messages
from postbote.tls import forget_contexts
from postbote.watch import Watcher

log = get_logger("postbote.daemon")

START_JITTER = 5.0  # the first polls are spread over this many seconds (at most one poll_interval)
BACKOFF_JITTER = 0.1  # a delay after failures is shortened by up to this fraction, so that accounts drift apart
STOP_GRACE = 20.0  # seconds the polls in hand get to finish after SIGTERM (the unit's TimeoutStopSec is 30 s)
MAX_SLEEP = 60.0
WAKEUP_READ = 65536  # bytes of pokes read at once
HOUSEKEEPING_EVERY = 1  # seconds between two STATUS= updates and two writes of the next-poll notes
NO_PUSH_RECHECK = 3600.0
"""Seconds before the daemon asks again for the watches of an account whose source offered none (an IMAP server
without IDLE): asking opens a session of its own, and was done after every poll."""
STATUS_NAMES = 10  # failing or waiting accounts named in STATUS= (systemd shows one line; the rest are counted)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
HANDLED_SIGNALS = (*STOP_SIGNALS, signal.SIGHUP, signal.SIGUSR1)

AUTH_WATCH = "postbote.daemon.auth-watch"

Loader = Callable[[], tuple[PluginManager, Config]]
PollerFactory = Callable[[PluginManager, StateStore, threading.Event], Poller]


def start_delay(interval: float, rng: random.Random) -> float:
    """Seconds until an account's first poll: soon, but spread so that many accounts do not connect together."""
    return rng.uniform(0.0, min(START_JITTER, interval))


@dataclass
class Backoff:
    """The delay before an account's next poll, from its interval and its current streak of failed polls."""

    interval: float
    maximum: float
    failures: int = 0

    def after(self, ok: bool, rng: random.Random) -> float:
        """Record a poll's outcome; return the seconds to wait before the next one."""
        if ok:
            self.failures = 0
            return self.interval
        self.failures += 1
        return self.failure_delay(rng)

    def failure_delay(self, rng: random.Random) -> float:
        ceiling = max(self.maximum, self.interval)
        delay = min(self.interval * 2.0 ** min(self.failures, 32), ceiling)
        return delay * rng.uniform(1.0 - BACKOFF_JITTER, 1.0)


@dataclass
class AccountSlot:
    """What the daemon knows about one account between polls."""

    account: Account
    backoff: Backoff
    auth_failures: int = 0


class DueQueue:
    """When each planned account is next due (``time.time()`` seconds), as a heap: the next due in O(log n).

    An account has one plan at a time; planning it again leaves its old heap entry behind, which is skipped when it
    comes up (and the heap is rebuilt when such entries outnumber the live ones)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, str]] = []
        self._when: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._when)

    def set(self, name: str, when: float) -> None:
        self._when[name] = when
        heapq.heappush(self._heap, (when, name))
        if len(self._heap) > 2 * len(self._when) + 64:
            self._heap = [(planned, account) for account, planned in self._when.items()]
            heapq.heapify(self._heap)

    def when(self, name: str) -> float | None:
        return self._when.get(name)

    def pop_due(self, now: float) -> Iterator[str]:
        """The accounts due at ``now``, soonest first; they are no longer planned."""
        while self._heap and self._heap[0][0] <= now:
            when, name = heapq.heappop(self._heap)
            if self._when.get(name) == when:
                del self._when[name]
                yield name

    def seconds_to_next(self, now: float) -> float | None:
        while self._heap and self._when.get(self._heap[0][1]) != self._heap[0][0]:
            heapq.heappop(self._heap)  # planned again since: not this entry
        return self._heap[0][0] - now if self._heap else None


class ReadyQueue:
    """Accounts due (or asked for) and waiting for a free slot: first come, first served within one server host,
    the hosts taken in turn, so that accounts of a host at its ``max_parallel_per_host`` do not hold up the others
    and are not looked at again until their host has room (which a single queue would do on every tick)."""

    def __init__(self) -> None:
        self._hosts: dict[str, deque[str]] = {}  # in turn: a host served goes to the end
        self._names: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def __len__(self) -> int:
        return len(self._names)

    def add(self, name: str, host: str) -> None:
        if name not in self._names:
            self._names.add(name)
            self._hosts.setdefault(host, deque()).append(name)

    def clear(self) -> None:
        self._hosts.clear()
        self._names.clear()

    def names(self) -> set[str]:
        return set(self._names)

    def keep_only(self, names: Iterable[str]) -> None:
        wanted = set(names)
        for host, waiting in list(self._hosts.items()):
            kept = deque(name for name in waiting if name in wanted)
            if kept:
                self._hosts[host] = kept
            else:
                del self._hosts[host]
        self._names &= wanted

    def take(self, free: int, running: Counter[str], per_host: int) -> list[str]:
        """Up to ``free`` accounts to start, none on a host that has ``per_host`` polls ``running`` (which counts
        the ones taken here too)."""
        taken: list[str] = []
        progress = True
        while progress and len(taken) < free and self._hosts:
            progress = False
            for host in list(self._hosts):
                if len(taken) >= free:
                    break
                if running[host] >= per_host:
                    continue
                waiting = self._hosts.pop(host)
                name = waiting.popleft()
                if waiting:
                    self._hosts[host] = waiting  # to the end: the next host's turn
                self._names.discard(name)
                running[host] += 1
                taken.append(name)
                progress = True
        return taken


class SharedSchedule:
    """The daemon's part in a shared state store (PostgreSQL): which accounts it polls is decided by leases, not by
    its own `DueQueue` (see `postbote.state_postgres`). It claims due accounts in batches, at most every
    `CLAIM_EVERY` seconds and only as many as it has room for (twice ``max_parallel``, less those running or waiting
    for a slot), so that a few hundred polls a second cost a few claims a second; a `LeaseKeeper` renews the leases
    of the accounts it holds; a finished poll's lease is given back with the account's next due time in the next
    `flush` (once a second, batched), so another worker may take the account from then on.

    Every call that reaches the database may fail (`PostboteError`): the daemon logs it and goes on, and what was not
    written is written on the next try; leases not renewed meanwhile simply run out."""

    CLAIM_EVERY = 0.25

    def __init__(self, board: LeaseBoard) -> None:
        self.board = board
        self.keeper = LeaseKeeper(board)
        self._releases: dict[str, float] = {}  # account -> time.time() when due again, not yet written
        self._polls = 0
        self._failures = 0
        self._next_claim = 0.0  # time.monotonic()

    @property
    def worker(self) -> str:
        return self.board.worker

    def start(self) -> None:
        self.board.join()
        self.keeper.start()
        log.info("worker.joined", worker=self.worker, lease_s=self.board.lease)

    def add(self, first_due_in: dict[str, float]) -> None:
        """Accounts this worker knows, added to the shared schedule unless some worker added them already."""
        try:
            self.board.add_accounts(first_due_in)
        except PostboteError as exc:
            log.warning("worker.accounts_not_added", accounts=len(first_due_in), error=str(exc),
                        effect="polled once a worker with them in its config adds them")

    def claim(self, room: int) -> list[str]:
        if room <= 0 or time.monotonic() < self._next_claim:
            return []
        self._next_claim = time.monotonic() + self.CLAIM_EVERY
        try:
            claimed = self.board.claim(room)
        except PostboteError as exc:
            log.warning("worker.claim_failed", worker=self.worker, error=str(exc))
            return []
        self.keeper.hold(claimed)
        return claimed

    def seconds_to_next_claim(self) -> float:
        return max(0.0, self._next_claim - time.monotonic())

    def finished(self, name: str, when: float, *, ok: bool | None) -> None:
        """Give the lease back (at the next `flush`) with the account due at ``when``; ``ok`` counts a poll."""
        self._releases[name] = when
        if ok is not None:
            self._polls += 1
            self._failures += 0 if ok else 1

    def flush(self) -> None:
        if not self._releases and not self._polls:
            return
        releases, polls, failures = self._releases, self._polls, self._failures
        now = time.time()
        try:
            self.board.release({name: when - now for name, when in releases.items()}, polls=polls,
                               failures=failures)
        except PostboteError as exc:
            log.warning("worker.release_failed", worker=self.worker, accounts=len(releases), error=str(exc),
                        effect="tried again in a second; the leases are renewed meanwhile")
            return
        self._releases, self._polls, self._failures = {}, 0, 0  # the main loop's own: nothing came in meanwhile
        self.keeper.drop(releases)

    def make_due(self, names: Iterable[str]) -> None:
        try:
            self.board.make_due(names)
        except PostboteError as exc:
            log.warning("worker.not_made_due", worker=self.worker, error=str(exc))

    def stop(self, keeping: Iterable[str]) -> None:
        """Write what is pending, then leave: every lease is released but those of ``keeping`` (polls abandoned
        mid-session, whose accounts another worker must not take before the lease runs out)."""
        self.flush()
        kept = set(keeping)
        self.keeper.drop(self.keeper.held() - kept)
        self.keeper.stop()
        try:
            self.board.leave(keeping=kept)
        except PostboteError as exc:
            log.warning("worker.leave_failed", worker=self.worker, error=str(exc),
                        effect="its leases run out after worker_lease")
        log.info("worker.left", worker=self.worker)


@dataclass(frozen=True)
class PollResult:
    account: str
    stats: PollStats
    started: float
    login_refused: bool


class AuthFailureWatch:
    """An observer telling the daemon which accounts' last poll failed because the server refused the login."""

    def __init__(self) -> None:
        self._refused: set[str] = set()
        self._lock = threading.Lock()

    @hookimpl
    def account_error(self, account: Account, error: PostboteError) -> None:
        if isinstance(error, LoginRefused):
            with self._lock:
                self._refused.add(account.name)

    def take(self, account: str) -> bool:
        with self._lock:
            refused = account in self._refused
            self._refused.discard(account)
            return refused


@dataclass
class _Generation:
    """A plugin manager and the config loaded with it; replaced as a whole on reload."""

    pm: PluginManager
    config: Config
    auth_watch: AuthFailureWatch = field(default_factory=AuthFailureWatch)


class RepeatedLoginFailureFilter(logging.Filter):
    """Drops the poller's ``account.failed`` event for a refused login already reported in the current streak."""

    def __init__(self) -> None:
        super().__init__("postbote.daemon.auth")
        self.muted: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        event = record.msg if isinstance(record.msg, dict) else {}
        return not (event.get("event") == "account.failed" and event.get("error_type") in _login_refusal_names()
                    and event.get("account") in self.muted)


def _login_refusal_names() -> set[str]:
    """The ``error_type`` of a refused login in ``account.failed``: `LoginRefused` and every subclass of it (the
    source plugins' own, such as POP3AuthError)."""
    names: set[str] = set()
    kinds: list[type[Exception]] = [LoginRefused]
    while kinds:
        kind = kinds.pop()
        names.add(kind.__name__)
        kinds.extend(kind.__subclasses__())
    return names


class PollThreads:
    """The threads polls run in, kept from one poll to the next: as many as polls ran at once, at most
    ``max_parallel``. A thread per poll cost its start-up, and the main loop waited for each new thread to run.
    Daemon threads, as before: one abandoned after SIGTERM does not keep the process alive."""

    def __init__(self) -> None:
        self._jobs: SimpleQueue[tuple[Callable[..., Callable[[], None]], tuple[object, ...]] | None] = SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self._count = 0

    def run(self, work: Callable[..., Callable[[], None]], *args: object) -> None:
        """``work(*args)`` in an idle thread, or a new one; ``work`` must not raise. What it returns is called once
        the thread counts as idle again, so that a poll started in answer to it finds the thread free."""
        with self._lock:
            start = self._idle == 0
            if start:
                self._count += 1
            else:
                self._idle -= 1
        if start:
            threading.Thread(target=self._serve, name=f"poll-{self._count}", daemon=True).start()
        self._jobs.put((work, args))

    def close(self) -> None:
        """Let the idle threads end (a busy one ends after its poll)."""
        for _ in range(self._count):
            self._jobs.put(None)

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            work, args = job
            report = work(*args)
            with self._lock:
                self._idle += 1
            report()


class Wakeup:
    """A socket pair the main loop sleeps on; poll threads and signal handlers write a byte to it to wake it."""

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.reader, selectors.EVENT_READ)

    def poke(self) -> None:
        with contextlib.suppress(OSError):  # full: the loop is awake already; closed: the daemon is gone
            self.writer.send(b"\0")

    def wait(self, timeout: float) -> None:
        if self._selector.select(max(0.0, timeout)):
            # One byte per poke, one poke per finished poll: one read takes them all (anything left over only
            # wakes the loop once more).
            with contextlib.suppress(BlockingIOError):
                self.reader.recv(WAKEUP_READ)

    def close(self) -> None:
        self._selector.close()
        self.reader.close()
        self.writer.close()


class Daemon:
    def __init__(self, pm: PluginManager, config: Config, store: StateStore, *, load: Loader | None = None,
                 on_reload: Callable[[Config], None] | None = None, notifier: Notifier | None = None,
                 stop_grace: float = STOP_GRACE, rng: random.Random | None = None,
                 poller_factory: PollerFactory = Poller) -> None:
        self.store = store
        self.stop = threading.Event()
        self.abandoned: list[str] = []
        self._load = load
        self._on_reload = on_reload or (lambda _config: None)
        self.notifier = notifier or Notifier(None)
        self._stop_grace = stop_grace
        self._rng = rng or random.Random()
        self._current = _Generation(pm, config)
        self._pending: _Generation | None = None
        self._make_poller = poller_factory
        self._poller = poller_factory(pm, store, self.stop)
        self.scheduler = schedule.Scheduler()  # housekeeping only; the accounts are in self._due (see the docstring)
        self._due = DueQueue()
        self._slots: dict[str, AccountSlot] = {}
        self._ready = ReadyQueue()
        self._next_poll_notes: dict[str, float | None] = {}  # for the state store, written by the housekeeping
        self._failing: set[str] = set()
        self._status_due = False
        self._last_housekeeping = float("-inf")  # time.monotonic() of the last one
        self._scheduled_check = float("-inf")  # time.monotonic() when `schedule` may have a job due
        self._workers: dict[str, str] = {}  # accounts being polled -> the server host each connects to
        self._running_per_host: Counter[str] = Counter()  # kept as polls start and end, not counted per tick
        self._threads = PollThreads()
        self._again: set[str] = set()  # asked to poll now while polling: polled once more when that poll ends
        self._results: SimpleQueue[PollResult] = SimpleQueue()
        self._requests: deque[int] = deque()
        self._pushed: deque[str] = deque()  # accounts a watch said have new mail
        self._no_push_until: dict[str, float] = {}  # accounts whose source offered no watch, until time.monotonic()
        self._watcher = Watcher(self._new_mail)
        self._wakeup = Wakeup()
        self._stopping = False
        self._mute = RepeatedLoginFailureFilter()
        self._last_poll: tuple[PollStats, float] | None = None  # its summary is made when the status line is
        self._waiting: dict[str, WaitingSummary] = {}
        self._shared = SharedSchedule(LeaseBoard(store.database, lease=config.worker_lease)) \
            if isinstance(store.database, PostgresDatabase) else None
        self._unknown: set[str] = set()  # accounts claimed from the shared schedule that this config lacks

    @property
    def worker(self) -> str | None:
        """This worker's id in a shared state store (None on SQLite: one daemon per state directory)."""
        return self._shared.worker if self._shared is not None else None

    @property
    def config(self) -> Config:
        return self._current.config

    # --- life cycle

    def run(self) -> int:
        """Poll until SIGTERM/SIGINT (or `request` of one); returns the exit status, 0."""
        poll_logger = logging.getLogger("postbote.poll")
        poll_logger.addFilter(self._mute)
        try:
            with self._signals_routed():
                self._configure(self._current)
                try:
                    if self._shared is not None:
                        self._shared.start()
                    self._plan(self.config.accounts, previous={})
                    self._refresh_all_waiting()
                    self._write_next_poll_notes()
                    self.store.hold_poll_records()  # written by the housekeeping, and whenever no poll runs
                    self.store.remember_journal()  # this daemon alone polls this store (it holds the state lock)
                    self.scheduler.every(HOUSEKEEPING_EVERY).seconds.do(self._housekeeping)
                    log.info("daemon.started", accounts=len(self.config.accounts), config=str(self.config.path),
                             max_parallel=self.config.max_parallel)
                    self.notifier.ready(self._status_line())
                    keep_out_of_the_collector()
                    self._loop()
                    self._shut_down()
                finally:
                    self._unconfigure(self._current)
        finally:
            self._write_poll_records()  # what is still held (a failure is logged, not raised over the real exit)
            with contextlib.suppress(PostboteError):  # written or reported just now: stop holding, whatever is left
                self.store.hold_poll_records(False)
            poll_logger.removeFilter(self._mute)
            self._wakeup.close()
            self._threads.close()
            self.notifier.close()
        log.info("daemon.stopped", abandoned=self.abandoned or None)
        return 0

    def request(self, signum: int) -> None:
        """Ask for what ``signum`` would do (thread-safe; this is also what the signal handlers call)."""
        self._requests.append(signum)
        self._wakeup.poke()

    @contextmanager
    def _signals_routed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, lambda signum, _frame: self.request(signum)) for sig in HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _loop(self) -> None:
        while not self._stopping:
            self._handle_requests()
            self._collect_results()
            if self._stopping:
                break
            self._poll_pushed()
            self._apply_pending_reload()
            self._queue_due()
            self._run_scheduled()
            self._start_queued()
            self.notifier.ping_if_due()
            self._wakeup.wait(self._sleep_time())

    def _run_scheduled(self) -> None:
        """The `schedule` jobs (the housekeeping), asked for only when one may be due: the loop turns once or more
        for every poll, and asking `schedule` reads the wall clock and looks at every job."""
        now = time.monotonic()
        if now < self._scheduled_check:
            return
        self.scheduler.run_pending()
        idle = self.scheduler.idle_seconds
        self._scheduled_check = now + (MAX_SLEEP if idle is None else max(0.0, idle))

    def _sleep_time(self) -> float:
        candidates = [MAX_SLEEP, self._scheduled_check - time.monotonic()]
        if self._shared is not None and self._room():
            candidates.append(self._shared.seconds_to_next_claim())
        # With every slot busy, an account falling due could not start: it is queued when a poll ends, and that
        # wakes the loop anyway. Waking for it too doubled the loop's turns when accounts are due back to back.
        slot_free = len(self._workers) < self.config.max_parallel
        if slot_free and (due := self._due.seconds_to_next(time.time())) is not None:
            candidates.append(due)
        if (ping := self.notifier.seconds_to_next_ping()) is not None:
            candidates.append(ping)
        return max(0.0, min(candidates))

    def _shut_down(self) -> None:
        self._watcher.stop()
        running = sorted(self._workers)
        log.info("daemon.stopping", polls_running=running or None)
        self.notifier.stopping(f"stopping; finishing {', '.join(running)}" if running else "stopping")
        self.stop.set()
        if self._shared is not None:  # claimed but not started: due now, for another worker
            for name in self._ready.names():
                self._shared.finished(name, time.time(), ok=None)
        self._ready.clear()
        deadline = time.monotonic() + self._stop_grace
        abandon_now = False
        while self._workers and not abandon_now and time.monotonic() < deadline:
            self._wakeup.wait(min(1.0, deadline - time.monotonic()))
            abandon_now = any(signum in STOP_SIGNALS for signum in self._drain_requests())
            self._collect_results()
            self.notifier.ping_if_due()
        if self._workers:
            self.abandoned = sorted(self._workers)
            log.warning("daemon.polls_abandoned", accounts=self.abandoned,
                        reason="second stop signal" if abandon_now else f"still busy after {self._stop_grace:g} s",
                        effect="no QUIT sent, so the server deletes nothing from these sessions; a message whose "
                               "hand-off was cut short is fetched again next time (at worst delivered twice)")
        self._write_poll_records()
        if self._shared is not None:
            self._shared.stop(keeping=self.abandoned)
            return
        self._next_poll_notes = dict.fromkeys(self._slots)
        self._write_next_poll_notes()

    # --- requests (signals)

    def _drain_requests(self) -> list[int]:
        taken = []
        while self._requests:
            taken.append(self._requests.popleft())
        return taken

    def _handle_requests(self) -> None:
        for signum in self._drain_requests():
            if signum in STOP_SIGNALS:
                log.info("stop.requested", signal=signal.Signals(signum).name)
                self._stopping = True
                return
            if signum == signal.SIGHUP:
                self._begin_reload()
            elif signum == signal.SIGUSR1:
                self._poll_everything_now()

    def _poll_everything_now(self) -> None:
        """A poll of every account now; an account polling already is polled once more when that poll ends (its
        listing may predate the mail the request is about)."""
        log.info("poll.requested", accounts=len(self._slots))
        for name in self._slots:
            if name in self._workers:
                self._again.add(name)
            elif self._shared is None:
                self._enqueue(name)
        if self._shared is not None:
            self._shared.make_due(name for name in self._slots if name not in self._workers)

    # --- push

    def _new_mail(self, name: str) -> None:
        """A watch saw new mail for account ``name`` (called from the watcher thread)."""
        self._pushed.append(name)
        self._wakeup.poke()

    def _poll_pushed(self) -> None:
        while self._pushed:
            name = self._pushed.popleft()
            if name not in self._slots:
                continue
            if name in self._workers:
                self._again.add(name)  # its listing may predate the new mail
            elif self._shared is not None:
                self._shared.make_due([name])
            else:
                self._enqueue(name)

    def _watch(self, poller: Poller, account: Account) -> None:
        """Open the account's watches after a successful poll, if its source offers push and none is open."""
        if self.stop.is_set() or self._watcher.watching(account.name):
            return
        if self._no_push_until.get(account.name, 0.0) > time.monotonic():
            return  # its server offered no push a while ago: not asked again after every poll (a login each time)
        hooks = poller.pm.hooks_for(account)
        if not hooks.implemented("watch_mailbox"):
            return
        with bound(account=account.name):
            try:
                watches = hooks.call("watch_mailbox", passing=(PostboteError,), account=account,
                                     state_dir=self.store.state_dir)
            except PostboteError as exc:
                log.warning("watch.unavailable", error=str(exc), effect="polled at its poll_interval")
                return
        if watches:
            self._watcher.add(account.name, list(watches))
        elif watches is None:  # no plugin watches this account's source (POP3): not asked again until a reload
            self._no_push_until[account.name] = math.inf
        else:
            self._no_push_until[account.name] = time.monotonic() + NO_PUSH_RECHECK

    # --- scheduling

    def _plan(self, accounts: tuple[Account, ...], previous: dict[str, AccountSlot]) -> None:
        """Plan every account's next poll; accounts kept over a reload keep their next poll and their failure
        streak (one waiting for a free slot keeps its place, and is planned when its poll ends)."""
        if self._shared is not None:
            self._plan_shared(accounts, previous)
            return
        now = time.time()
        old_due, self._due = self._due, DueQueue()
        self._slots = {}
        for account in accounts:
            backoff = Backoff(account.poll_interval, self.config.backoff_max)
            old = previous.get(account.name)
            self._slots[account.name] = AccountSlot(account, backoff, auth_failures=old.auth_failures if old else 0)
            if old is None:
                self._set_next_poll(account.name, now + start_delay(account.poll_interval, self._rng))
                continue
            backoff.failures = old.backoff.failures
            next_poll = old_due.when(account.name)
            if next_poll is None:
                continue  # waiting for a slot
            if old.account.poll_interval != account.poll_interval and not backoff.failures:
                next_poll = min(next_poll, now + account.poll_interval)
            self._set_next_poll(account.name, next_poll)
        self._failing = {name for name, slot in self._slots.items() if slot.backoff.failures}
        self._ready.keep_only(self._slots)

    def _plan_shared(self, accounts: tuple[Account, ...], previous: dict[str, AccountSlot]) -> None:
        """`_plan` with a shared store: new accounts join the shared schedule (spread over the first seconds, as
        alone); the ones a reload removed and that wait here for a slot are given back, due now."""
        assert self._shared is not None
        self._slots = {}
        for account in accounts:
            old = previous.get(account.name)
            backoff = Backoff(account.poll_interval, self.config.backoff_max, old.backoff.failures if old else 0)
            self._slots[account.name] = AccountSlot(account, backoff, auth_failures=old.auth_failures if old else 0)
        self._shared.add({account.name: start_delay(account.poll_interval, self._rng) for account in accounts
                          if account.name not in previous})
        for name in self._ready.names() - set(self._slots):
            self._shared.finished(name, time.time(), ok=None)
        self._failing = {name for name, slot in self._slots.items() if slot.backoff.failures}
        self._ready.keep_only(self._slots)

    def _room(self) -> int:
        """How many more accounts a shared store's worker may claim: twice ``max_parallel``, less those running
        or waiting for a slot (a reload waiting for the running polls claims none)."""
        if self._stopping or self._pending is not None:
            return 0
        return 2 * self.config.max_parallel - len(self._workers) - len(self._ready)

    def _queue_due(self) -> None:
        if self._shared is not None:
            self._queue_claimed(self._shared)
            return
        for name in self._due.pop_due(time.time()):
            self._enqueue(name)

    def _queue_claimed(self, shared: SharedSchedule) -> None:
        """Queue the accounts claimed; one missing from this config (removed here, or another worker's config is
        newer) is given back for a while, with a warning the first time (a row no config names any more stays in
        the shared schedule until deleted there: ``DELETE FROM account_leases WHERE account = ...``)."""
        for name in shared.claim(self._room()):
            if name in self._slots:
                self._enqueue(name)
                continue
            if name not in self._unknown:
                self._unknown.add(name)
                log.warning("worker.account_unknown", account=name, worker=shared.worker,
                            effect=f"left for a worker whose config has it (again in {UNKNOWN_ACCOUNT_DELAY:g} s)")
            shared.finished(name, time.time() + UNKNOWN_ACCOUNT_DELAY, ok=None)

    def _enqueue(self, name: str) -> None:
        if name in self._workers or name in self._ready:
            log.debug("poll.skipped", account=name, reason="already running or waiting for a free slot")
            return
        self._ready.add(name, self._slots[name].account.server_host)

    def _start_queued(self) -> None:
        if self._pending is not None or not self._ready:
            return  # a reload waits for the running polls; start nothing on the old config meanwhile
        free = self.config.max_parallel - len(self._workers)
        for name in self._ready.take(free, self._running_per_host, self.config.max_parallel_per_host):
            self._start(self._slots[name])

    def _start(self, slot: AccountSlot) -> None:
        self._workers[slot.account.name] = slot.account.server_host  # counted in `_running_per_host` by `take`
        self._threads.run(self._work, self._poller, self._current.auth_watch, slot.account)

    def _work(self, poller: Poller, auth_watch: AuthFailureWatch, account: Account) -> Callable[[], None]:
        """One poll, in a poll thread; never raises. Returns the report to the main loop, which the thread sends
        once it is free for the next poll."""
        structlog.contextvars.clear_contextvars()
        started = time.time()
        stats = poll_guarded(poller, account)
        if stats.ok:
            try:
                self._watch(poller, account)
            except Exception:  # noqa: BLE001 - a plugin's bug in push must not lose the poll's result
                log.exception("watch.crashed", account=account.name)
        result = PollResult(account.name, stats, started, auth_watch.take(account.name))
        return lambda: self._report(result)

    def _report(self, result: PollResult) -> None:
        self._results.put(result)
        self._wakeup.poke()

    def _collect_results(self) -> None:
        if self._results.empty():
            return
        while not self._results.empty():  # the main loop is the only reader: not empty, so get() does not wait
            result = self._results.get()
            self._poll_ended(result.account)
            self._finished(result)
            if result.account in self._again:
                self._again.discard(result.account)
                if self._shared is not None:
                    self._shared.finished(result.account, time.time(), ok=None)  # due now, for whoever is free
                elif not self._stopping and result.account in self._slots:
                    self._enqueue(result.account)
        if not self._workers:
            self._write_poll_records()  # nothing running: what `status` shows is up to date at once

    def _poll_ended(self, name: str) -> None:
        host = self._workers.pop(name)
        self._running_per_host[host] -= 1
        if not self._running_per_host[host]:
            del self._running_per_host[host]

    def _finished(self, result: PollResult) -> None:
        slot = self._slots.get(result.account)
        self._last_poll = (result.stats, time.time())
        self._status_due = True
        if slot is None:  # removed by a reload while it ran
            if self._shared is not None:
                self._shared.finished(result.account, time.time() + UNKNOWN_ACCOUNT_DELAY, ok=result.stats.ok)
            return
        if result.stats.deferred or result.stats.rejected or result.account in self._waiting:
            self._refresh_waiting(slot.account)  # else nothing waited before, and this poll left nothing waiting
        streak_before = slot.backoff.failures
        delay = slot.backoff.after(result.stats.ok, self._rng)
        if slot.backoff.failures:
            self._failing.add(result.account)
        else:
            self._failing.discard(result.account)
        self._note_login_outcome(slot, result)
        if result.stats.ok and streak_before:
            log.info("account.recovered", account=slot.account.name, failed_polls=streak_before)
        elif not result.stats.ok:
            level = logging.DEBUG if slot.auth_failures > 1 else logging.INFO
            log.log(level, "poll.backing_off", account=slot.account.name, failed_polls=slot.backoff.failures,
                    next_poll_in_s=round(delay, 3))
        if self._shared is not None:
            self._shared.finished(result.account, max(result.started + delay, time.time()), ok=result.stats.ok)
        elif not self._stopping:
            self._set_next_poll(result.account, max(result.started + delay, time.time()))
        if time.monotonic() - self._last_housekeeping >= HOUSEKEEPING_EVERY:
            self._housekeeping()  # the first poll after a quiet second is told at once; the next ones in a batch

    def _note_login_outcome(self, slot: AccountSlot, result: PollResult) -> None:
        """Count a streak of refused logins; the poller's own error event is kept for the first one only."""
        name = slot.account.name
        if result.login_refused:
            slot.auth_failures += 1
            if slot.auth_failures == 1:
                log.error("account.login_refused", account=name, error=result.stats.error,
                          hint="check the username and password; repeats are not logged until the login works")
            self._mute.muted.add(name)
            return
        if slot.auth_failures and result.stats.ok:
            log.info("account.login_accepted", account=name, refused_before=slot.auth_failures)
        slot.auth_failures = 0
        self._mute.muted.discard(name)

    def _set_next_poll(self, name: str, when: float) -> None:
        self._due.set(name, when)
        self._next_poll_notes[name] = when

    def _housekeeping(self) -> None:
        """At most once a second: what ``postbote status`` and systemd are told, batched -- a few hundred polls a
        second would otherwise be as many commits and STATUS= datagrams."""
        self._last_housekeeping = time.monotonic()
        if self._shared is not None:
            self._shared.flush()
        self._write_poll_records()
        self._write_next_poll_notes()
        if self._status_due:
            self._status_due = False
            self.notifier.status(self._status_line())

    def _write_poll_records(self) -> None:
        try:
            self.store.write_held_poll_records()
        except PostboteError as exc:
            log.error("state.poll_not_recorded", error=str(exc), effect="kept in memory and written later")

    def _write_next_poll_notes(self) -> None:
        notes, self._next_poll_notes = self._next_poll_notes, {}
        try:
            self.store.set_next_polls(notes)
        except PostboteError as exc:
            log.warning("state.next_poll_not_recorded", accounts=len(notes), error=str(exc))

    # --- reload

    def _begin_reload(self) -> None:
        if self._load is None:
            log.warning("config.reload_unsupported")
            return
        log.info("config.reloading", config=str(self.config.path))
        try:
            pm, config = self._load()
        except PostboteError as exc:
            self._reload_failed(str(exc))
            return
        if config.state != self.config.state:
            self._reload_failed(f"state changed from {self.config.state or 'sqlite'} to {config.state or 'sqlite'}: "
                                f"restart postbote to move to another state store")
            return
        if config.state_dir != self.config.state_dir:
            self._reload_failed(f"state_dir changed from {self.config.state_dir} to {config.state_dir}: "
                                f"restart postbote to move to another state directory")
            return
        self.notifier.reloading()
        self._pending = _Generation(pm, config)

    def _reload_failed(self, why: str) -> None:
        log.error("config.reload_failed", error=why.splitlines(), keeping=str(self.config.path))
        self.notifier.status(f"config reload failed, running on the old config: {why.splitlines()[0]}")

    def _apply_pending_reload(self) -> None:
        """Switch to the reloaded config once no poll runs on the old one; on any trouble keep the old one."""
        if self._pending is None or self._workers:
            return
        new, old = self._pending, self._current
        self._pending = None
        self._unconfigure(old)
        try:
            self._configure(new)
        except Exception as exc:  # noqa: BLE001 - any plugin's configure may fail; the old config goes on
            self._unconfigure(new)
            self._configure(old)
            self._reload_failed(f"a plugin refused the new config: {type(exc).__name__}: {exc}")
            self.notifier.ready(self._status_line())
            return
        self._current = new
        forget_contexts()  # CA files replaced on disk, and the system's CA store, are read again
        self._poller = self._make_poller(new.pm, self.store, self.stop)
        self._on_reload(new.config)
        before = set(self._slots)
        self._no_push_until.clear()  # a changed account may name another server now
        for name, slot in self._slots.items():
            if self._watcher.watching(name) and slot.account not in new.config.accounts:
                self._watcher.drop(name)  # removed or changed: the next poll watches with the new settings
        self._plan(new.config.accounts, previous=self._slots)
        changes = {"added": sorted(set(self._slots) - before), "removed": sorted(before - set(self._slots))}
        log.info("config.reloaded", config=str(new.config.path), accounts=len(new.config.accounts),
                 **{key: names for key, names in changes.items() if names})
        self._next_poll_notes.update(dict.fromkeys(before - set(self._slots)))
        self._write_next_poll_notes()
        self._waiting = {name: summary for name, summary in self._waiting.items() if name in self._slots}
        self.notifier.ready(self._status_line())
        del old
        gc.unfreeze()  # the old generation is garbage now: let the collector have it, then keep the new one out
        gc.collect()
        keep_out_of_the_collector()

    def _configure(self, generation: _Generation) -> None:
        """Start the plugins as ``postbote poll`` does: one that cannot start is a `ConfigError` (exit status 2)."""
        generation.pm.register(generation.auth_watch, name=AUTH_WATCH)
        try:
            start_plugins(generation.pm, generation.config)
        except BaseException:
            generation.pm.unregister(name=AUTH_WATCH)
            raise

    @staticmethod
    def _unconfigure(generation: _Generation) -> None:
        try:
            generation.pm.hook.unconfigure(config=generation.config)
        except Exception as exc:  # noqa: BLE001 - a plugin failing to clean up must not stop the daemon
            log.error("plugin.unconfigure_failed", error=f"{type(exc).__name__}: {exc}")
        if generation.pm.get_plugin(AUTH_WATCH) is not None:
            generation.pm.unregister(name=AUTH_WATCH)

    def _refresh_waiting(self, account: Account) -> None:
        """Count the account's deferred, rejected and stale messages for the status line."""
        try:
            messages = waiting_messages(self.store, account.name)
        except PostboteError as exc:
            log.warning("state.waiting_unreadable", account=account.name, error=str(exc))
            return
        self._note_waiting(account, messages)

    def _refresh_all_waiting(self) -> None:
        """`_refresh_waiting` of every account, in one query of the state store (start-up)."""
        try:
            everywhere = self.store.waiting_everywhere()
        except PostboteError as exc:
            log.warning("state.waiting_unreadable", error=str(exc))
            return
        for name, messages in everywhere.items():
            if name in self._slots:
                self._note_waiting(self._slots[name].account, messages)

    def _note_waiting(self, account: Account, messages: list[WaitingMessage]) -> None:
        summary = WaitingSummary.of(messages, now=time.time(), stale_after=stale_after(account))
        if summary.total:
            self._waiting[account.name] = summary
        else:
            self._waiting.pop(account.name, None)  # only accounts with something waiting: the status line's cost

    def _status_line(self) -> str:
        """systemd's STATUS=: failing accounts, what waits where (deferred, rejected, stale), and the last poll;
        the first `STATUS_NAMES` accounts of each kind by name, the others counted."""
        failing = heapq.nsmallest(STATUS_NAMES, self._failing)
        waiting = [(name, self._waiting[name]) for name in heapq.nsmallest(STATUS_NAMES, self._waiting)]
        problems = []
        if failing:
            problems.append(f"{len(self._failing)} failing ({', '.join(failing)}{_more(self._failing, failing)})")
        if waiting:
            problems.append("waiting: " + "; ".join(f"{name} {summary.describe()}" for name, summary in waiting)
                            + _more(self._waiting, waiting))
        health = ", ".join(problems) if problems else "all fine"
        watched = self._watcher.count()
        push = f", {watched} watched for new mail" if watched else ""
        worker = f"worker {self.worker}: " if self.worker else ""
        last = _summary(*self._last_poll) if self._last_poll else "no poll yet"
        return f"{worker}{len(self._slots)} account(s){push}, {health}; last poll: {last}"


def _more(everything: set[str] | dict[str, WaitingSummary], named: list[Any]) -> str:
    return f", and {len(everything) - len(named)} more" if len(everything) > len(named) else ""


def _summary(stats: PollStats, finished: float) -> str:
    at = datetime.fromtimestamp(finished).strftime("%H:%M:%S")
    if not stats.ok:
        return f"{stats.account} failed at {at}: {stats.error}"
    return (f"{stats.account} ok at {at}: {stats.delivered} delivered, {stats.dropped} dropped, "
            f"{stats.deferred} deferred, {stats.rejected} rejected, {stats.left} left on the server")
