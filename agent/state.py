"""The persistent record of what happened to each message, and the lock on the state directory.

One SQLite database (WAL) under ``state_dir`` holds, per account and UID, whether a message was delivered,
dropped or rejected. Every write commits before the caller goes on, and the poller records a message as handled
*before* it sends DELE: after a crash at any point the worst case is one duplicate delivery, never a loss.

Commits reach the operating system at once (they survive the process being killed) but are synced to the disk
by `make_durable`, which the poller calls before QUIT: POP3 applies deletions only at QUIT, so that is the moment
the records must survive a power cut. One sync per poll instead of one per message.

It also keeps, per account, the summary of the last poll, running totals, and the next poll the daemon has
planned, so that ``postbote status`` and the metrics plugin can tell what happened without asking the daemon.
One store may be shared by the daemon's poll threads: its connection is used by one thread at a time.

With ``state: postgresql://...`` the same records live in a PostgreSQL database that several workers share: the
`StateStore` is the same class running the same statements, over `postbote.state_postgres.PostgresDatabase` instead
of `SQLiteDatabase` (see the `Database` protocol). Plugin tables (`KeyedTable`) stay in ``state_dir`` on each
machine.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import json
import math
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from postbote.errors import StateError, StateLockedError

if TYPE_CHECKING:
    from postbote.config import Config, SharedState

DATABASE_NAME = "postbote.sqlite3"
LOCK_NAME = "postbote.lock"
SHARED_PLACEHOLDER = "postbote.shared"  # `StateStore.path` of a shared store: no file, named under state_dir

DEFAULT_BUSY_TIMEOUT = 2.0  # seconds to wait for another process's write lock before the message is deferred
FORGET_AFTER_LISTINGS = 3  # a record goes only when its UID was missing from this many listings in a row ...
FORGET_AFTER_SECONDS = 86400.0  # ... and for at least this long: one odd listing must never forget a mailbox
MAX_HELD_POLLS = 100_000  # poll records kept in memory while the state store cannot be written (the oldest go)
UNCERTAIN_ATTEMPTS = 2  # deliveries that ended without an answer (a crash) before the message is held for the admin


class Status(enum.StrEnum):
    """What became of a message, as recorded per account and UID."""

    DELIVERED = "delivered"  # every destination took it
    DROPPED = "dropped"  # a filter dropped it
    REJECTED = "rejected"  # a destination refused it for good: left on the server until `postbote retry`
    DEFERRED = "deferred"  # not delivered yet (a temporary failure): fetched again on the next poll


class DeliveryState(enum.StrEnum):
    """One destination's part in one message's delivery."""

    IN_FLIGHT = "in_flight"  # about to be handed over, or handed over without an answer (a crash): maybe delivered
    DONE = "done"  # the destination took it for good


DELIVERED = Status.DELIVERED
DROPPED = Status.DROPPED
REJECTED = Status.REJECTED
DEFERRED = Status.DEFERRED
HANDLED = (Status.DELIVERED, Status.DROPPED)
WAITING = (Status.DEFERRED, Status.REJECTED)

# ``messages``, like ``delivery_notes``, is clustered on its primary key (WITHOUT ROWID): one b-tree instead of a
# row table plus a key index, so a message's record writes one page fewer per commit (~15 % of the per-message
# transaction). Databases created before keep their rowid table; every statement works on both.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    account TEXT NOT NULL,
    uid TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    message_id TEXT,
    size INTEGER,
    updated REAL NOT NULL,
    PRIMARY KEY (account, uid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS delivery_notes (
    account TEXT NOT NULL,
    uid TEXT NOT NULL,
    position INTEGER NOT NULL,
    label TEXT NOT NULL,
    recipient TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    answer TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    updated REAL NOT NULL,
    PRIMARY KEY (account, uid, position, label, recipient)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pending_renames (
    account TEXT NOT NULL,
    uid TEXT NOT NULL,
    source TEXT NOT NULL,
    target TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS polls (
    account TEXT PRIMARY KEY,
    finished REAL NOT NULL,
    ok INTEGER NOT NULL,
    duration REAL NOT NULL,
    counts TEXT NOT NULL,
    error TEXT,
    last_success REAL,
    totals TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS poll_counters (
    account TEXT PRIMARY KEY,
    polls INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    failure_streak INTEGER NOT NULL DEFAULT 0,
    duration_total REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS poll_schedule (
    account TEXT PRIMARY KEY,
    next_poll REAL
);
"""


# Columns of ``messages`` added after the first release: (name, declaration), added to older databases on open.
_MESSAGE_COLUMNS = (
    ("header_digest", "TEXT"),  # SHA-256 of the header block: tells a reused UID from the message recorded
    ("since", "REAL"),  # when the message first failed (deferred, rejected): what `status` calls waiting since
    ("attempts", "INTEGER NOT NULL DEFAULT 0"),  # polls that tried and failed
    ("absent", "INTEGER NOT NULL DEFAULT 0"),  # listings in a row that did not list this UID
    ("absent_since", "REAL"),  # when it was first missing from the listing
)


@dataclass(frozen=True)
class PollRecord:
    account: str
    finished: float
    ok: bool
    duration: float
    counts: dict[str, int]
    error: str | None
    last_success: float | None
    totals: dict[str, int]
    polls: int = 0
    failures: int = 0
    failure_streak: int = 0
    duration_total: float = 0.0


@dataclass(frozen=True)
class FinishedPoll:
    """A poll's record on its way to the state store (`StateStore.record_poll`)."""

    account: str
    ok: bool
    duration: float
    counts: dict[str, int]
    error: str | None
    finished: float


@dataclass(frozen=True)
class Record:
    uid: str
    status: Status
    reason: str
    size: int | None = None  # the size the server listed when the outcome was recorded
    header_digest: str | None = None
    absent: int = 0  # listings in a row that did not list this UID
    absent_since: float | None = None
    updated: float | None = None  # when the outcome was recorded (for a delivered message: when it was delivered)

    @property
    def handled(self) -> bool:
        return self.status in HANDLED


@dataclass(frozen=True)
class Outcome:
    """What to record for one message: `StateStore.record_batch` takes a list of them."""

    uid: str
    status: Status
    reason: str = ""
    message_id: str | None = None
    size: int | None = None
    header_digest: str | None = None
    in_doubt: bool = False  # a failure after which the destination may have the message: its notes are kept


@dataclass(frozen=True)
class WaitingMessage:
    """A message still on the server that postbote could not deliver: what `postbote status` lists."""

    uid: str
    status: Status  # DEFERRED or REJECTED
    reason: str
    since: float  # time.time() when it first failed
    attempts: int
    size: int | None
    message_id: str | None


@dataclass(frozen=True)
class DeliveryKey:
    """Which part of a message's delivery a note is about: the destination at ``position`` in the message's list
    (with its label, so that a reordered or changed list does not match an old note), and, for a destination that
    took the message for some recipients only (LMTP), one ``recipient``."""

    position: int
    label: str
    recipient: str = ""

    def for_recipient(self, recipient: str) -> DeliveryKey:
        return DeliveryKey(self.position, self.label, recipient)

    @property
    def destination(self) -> DeliveryKey:
        return DeliveryKey(self.position, self.label)


@dataclass(frozen=True)
class Delivery:
    """One destination's part in a message's delivery (see `DeliveryState`)."""

    key: DeliveryKey
    state: DeliveryState
    answer: str
    attempts: int


def _legacy_key(text: str) -> DeliveryKey:
    """A note's key as versions before 0.2 wrote it: ``POSITION:LABEL`` or ``POSITION:LABEL>RECIPIENT``."""
    position, _, rest = text.partition(":")
    label, _, recipient = rest.partition(">")
    return DeliveryKey(int(position) if position.isdigit() else -1, label, recipient)


class Writer(Protocol):
    """The statements of one open transaction, whichever database holds the store. SQL is written once, in the
    dialect SQLite and PostgreSQL share (``?`` placeholders, ``ON CONFLICT``, ``coalesce``); the PostgreSQL
    connection translates the placeholders."""

    def execute(self, sql: str, args: Sequence[object] = ()) -> int:
        """Run one statement; returns the rows it changed."""
        ...

    def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> int:
        ...

    def query(self, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        ...


class Database(Protocol):
    """What `StateStore` needs of the database under it: `SQLiteDatabase` (one file under ``state_dir``, the
    default) or ``postbote.state_postgres.PostgresDatabase`` (shared by several workers). Every failure is a
    `StateError` whose text names the database (without a password)."""

    shared: bool  # several processes, maybe on several machines, use this database at once
    where: str  # the database as errors name it

    def query(self, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]: ...

    def transaction(self, *, needs_sync: bool = True) -> contextlib.AbstractContextManager[Writer]:
        """A transaction, committed at the end of the block (rolled back on an exception). ``needs_sync=False``:
        its records need no sync before QUIT (`StateStore.make_durable`)."""
        ...

    def tables(self) -> set[str]: ...

    def columns(self, table: str) -> set[str]: ...

    def make_durable(self) -> None: ...

    def close(self) -> None: ...


class StateStore:
    """The records of every account's messages and polls, on SQLite (``state_dir``) or, with ``shared``, on a
    PostgreSQL database several workers share (`postbote.state_postgres`): one interface, the same statements."""

    def __init__(self, state_dir: Path, *, readonly: bool = False, busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
                 shared: SharedState | None = None) -> None:
        """Open (and create) the database; ``readonly`` opens an existing one for reading without creating files.

        A read-only SQLite store never creates the ``-wal``/``-shm`` companions (which, made by root for
        ``postbote status``, would lock the service user out): while nobody has the database open it is read as an
        immutable file. A missing database is a `StateError`.
        """
        self.state_dir = state_dir
        """Where this machine keeps what is not shared: plugin tables (`KeyedTable`), OAuth tokens, the lock."""
        self._db: Database
        if shared is None:
            self.path = state_dir / DATABASE_NAME
            self._db = SQLiteDatabase(self.path, readonly=readonly, busy_timeout=busy_timeout)
        else:
            from postbote.state_postgres import PostgresDatabase

            self.path = state_dir / SHARED_PLACEHOLDER  # no file: its parent is this machine's state directory
            self._db = PostgresDatabase(shared, readonly=readonly)
        self._tables = self._db.tables() if readonly or self._db.shared else {"polls", "poll_counters",
                                                                                "poll_schedule"}
        self._journaled: set[str] | None = None  # accounts that may have renames journaled (`remember_journal`)
        self._held_lock = threading.Lock()
        self._holding = False
        self._held: list[FinishedPoll] = []  # poll records waiting to be written (`hold_poll_records`)

    @property
    def shared(self) -> bool:
        """Whether other workers use this store at once (PostgreSQL): accounts are then claimed by leases."""
        return self._db.shared

    @property
    def database(self) -> Database:
        return self._db

    @staticmethod
    def exists(state_dir: Path) -> bool:
        return (state_dir / DATABASE_NAME).is_file()

    def close(self) -> None:
        """Close the database, writing the poll records still held first (the daemon writes, and reports a failure
        to, before it gets here)."""
        with contextlib.suppress(StateError):
            self.write_held_poll_records()
        self._db.close()

    def make_durable(self) -> None:
        """Make every committed record survive a power cut before the server may delete a message (see the module
        docstring); a no-op where every commit is durable already (PostgreSQL)."""
        self._db.make_durable()

    def records(self, account: str) -> dict[str, Record]:
        rows = self._db.query("SELECT uid, status, reason, size, header_digest, absent, absent_since, updated "
                              "FROM messages WHERE account = ?", (account,))
        return {uid: Record(uid, Status(status), reason, size, digest, absent, absent_since, updated)
                for uid, status, reason, size, digest, absent, absent_since, updated in rows}

    def record(self, account: str, uid: str, status: Status, *, reason: str = "", message_id: str | None = None,
               size: int | None = None, header_digest: str | None = None, in_doubt: bool = False) -> None:
        """Record the outcome for one message, committed before returning (synced by `make_durable`)."""
        self.record_batch(account, [Outcome(uid, status, reason, message_id, size, header_digest, in_doubt)])

    def record_batch(self, account: str, outcomes: Sequence[Outcome], renames: Sequence[tuple[str, str, str]] = (),
                     notes: Sequence[tuple[str, DeliveryKey]] = ()) -> None:
        """Record many outcomes and the renames that complete their delivery, in one transaction (one sync). The
        renames are journaled until `clear_renames`. A message that is handled (delivered, dropped) no longer needs
        its per-destination notes; one that failed keeps the time it first failed and counts the attempt, and loses
        its "in flight" notes (a destination answered no, or a plugin raised: no copy in doubt). ``notes`` are
        "in flight" notes of other messages (see `begin_delivery`), committed with the rest."""
        now = time.time()
        with self._db.transaction() as tx:
            tx.executemany(
                "INSERT INTO messages (account, uid, status, reason, message_id, size, updated, header_digest, "
                "since, attempts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (account, uid) DO UPDATE SET "
                "since = CASE WHEN excluded.since IS NOT NULL AND messages.status IN (?, ?) "
                "THEN coalesce(messages.since, excluded.since) ELSE excluded.since END, "
                "attempts = CASE WHEN excluded.since IS NOT NULL AND messages.status IN (?, ?) "
                "THEN messages.attempts + 1 ELSE excluded.attempts END, "
                "status = excluded.status, reason = excluded.reason, "
                "message_id = coalesce(excluded.message_id, messages.message_id), size = excluded.size, "
                "updated = excluded.updated, header_digest = coalesce(excluded.header_digest, messages.header_digest), "
                "absent = 0, absent_since = NULL",
                [(account, o.uid, o.status, o.reason, o.message_id, o.size, now, o.header_digest,
                  now if o.status in WAITING else None, 1 if o.status in WAITING else 0, *WAITING, *WAITING)
                 for o in outcomes])
            handled = [(account, o.uid) for o in outcomes if o.status in HANDLED]
            if handled:
                tx.executemany("DELETE FROM delivery_notes WHERE account = ? AND uid = ?", handled)
            answered = [(account, o.uid, DeliveryState.IN_FLIGHT) for o in outcomes
                        if o.status in WAITING and not o.in_doubt]
            if answered:  # the destination said no: that attempt left no doubt behind
                tx.executemany("DELETE FROM delivery_notes WHERE account = ? AND uid = ? AND state = ?", answered)
            if renames:
                if self._journaled is not None:
                    self._journaled.add(account)  # before the commit: the set may say more than the table, never less
                tx.executemany("INSERT INTO pending_renames (account, uid, source, target) VALUES (?, ?, ?, ?)",
                               [(account, uid, source, target) for uid, source, target in renames])
            for uid, key in notes:
                _note_in_flight(tx, account, uid, key)

    def record_imported(self, account: str, uids: Iterable[str], *, reason: str,
                        sizes: dict[str, int] | None = None) -> int:
        """Record messages delivered by other means -- another tool's UID list (``postbote import-state``), or what
        is on the server now (``postbote mark-seen``) -- as DELIVERED with ``reason``, in one transaction, so that
        no poll delivers them again. A UID the store already has a record of keeps it (postbote's own knowledge
        wins). ``sizes``: the size the server lists per UID, where known (a reused UID of another size is then
        told apart). Returns how many records were added."""
        now = time.time()
        wanted = list(dict.fromkeys(uids))
        sizes = sizes or {}
        with self._db.transaction() as tx:
            return tx.executemany(
                "INSERT INTO messages (account, uid, status, reason, size, updated) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (account, uid) DO NOTHING",
                [(account, uid, DELIVERED, reason, sizes.get(uid), now) for uid in wanted])

    def waiting(self, account: str) -> list[WaitingMessage]:
        """The messages of ``account`` that wait on the server undelivered: deferred or rejected, oldest first."""
        return self._waiting("account = ? AND ", (account,)).get(account, [])

    def waiting_everywhere(self) -> dict[str, list[WaitingMessage]]:
        """`waiting` of every account that has such messages, in one query (the daemon's start-up asks for all)."""
        return self._waiting("", ())

    def _waiting(self, which: str, args: tuple[object, ...]) -> dict[str, list[WaitingMessage]]:
        columns = self._db.columns("messages")  # read-only: maybe written by an older version
        if not columns:
            return {}
        since = "coalesce(since, updated)" if "since" in columns else "updated"
        attempts = "attempts" if "attempts" in columns else "1"
        rows = self._db.query(
            f"SELECT account, uid, status, reason, {since}, {attempts}, size, message_id FROM messages "
            f"WHERE {which}status IN (?, ?) ORDER BY {since}, uid", (*args, *WAITING))
        found: dict[str, list[WaitingMessage]] = {}
        for account, uid, status, reason, when, count, size, message_id in rows:
            found.setdefault(account, []).append(WaitingMessage(uid, Status(status), reason, when, count, size,
                                                                message_id))
        return found

    def pending_renames(self, account: str) -> list[tuple[str, str, str]]:
        journaled = self._journaled
        if journaled is not None and account not in journaled:
            return []  # the sole poller knows: nothing journaled for this account
        renames = [tuple(row) for row in self._db.query(
            "SELECT uid, source, target FROM pending_renames WHERE account = ?", (account,))]
        if journaled is not None and not renames:
            journaled.discard(account)
        return renames  # type: ignore[return-value]

    def remember_journal(self) -> None:
        """For the one process that polls this store (the daemon, holding the state lock): know which accounts
        have renames journaled (`pending_renames`), read once now and kept as this store journals and clears
        them, instead of asking the database at the start of every poll. Not for a shared store: another worker
        may journal renames for an account this one takes over."""
        if self._db.shared:
            return
        self._journaled = {account for (account,) in self._db.query("SELECT DISTINCT account FROM pending_renames")}

    def clear_renames(self, account: str, uids: Iterable[str]) -> None:
        uids = list(uids)
        if not uids:
            return
        with self._db.transaction() as tx:
            tx.executemany("DELETE FROM pending_renames WHERE account = ? AND uid = ?",
                           [(account, uid) for uid in uids])

    def deliveries(self, account: str, uid: str) -> dict[DeliveryKey, Delivery]:
        """What each destination did with this message in earlier attempts that did not finish it."""
        rows = self._db.query("SELECT position, label, recipient, state, answer, attempts FROM delivery_notes "
                              "WHERE account = ? AND uid = ?", (account, uid))
        notes = (Delivery(DeliveryKey(position, label, recipient), DeliveryState(state), answer, attempts)
                 for position, label, recipient, state, answer, attempts in rows)
        return {note.key: note for note in notes}

    def partly_delivered(self, account: str) -> set[str]:
        """UIDs with notes in `delivery_notes` (normally none: one query per poll, not per message)."""
        return {uid for (uid,) in self._db.query("SELECT DISTINCT uid FROM delivery_notes WHERE account = ?",
                                                 (account,))}

    def begin_delivery(self, account: str, uid: str, key: DeliveryKey) -> None:
        """Note, committed, that a destination is about to get this message: written *before* a hand-over that
        cannot be undone, so that a state store that cannot be written stops the delivery instead of letting every
        poll deliver again; a note still there at the next poll means the hand-over may have happened."""
        with self._db.transaction() as tx:
            _note_in_flight(tx, account, uid, key)

    def finish_delivery(self, account: str, uid: str, key: DeliveryKey, answer: str) -> None:
        """The destination (or recipient) of ``key`` took the message for good: it is not given it again."""
        with self._db.transaction() as tx:
            tx.execute(
                "INSERT INTO delivery_notes (account, uid, position, label, recipient, state, answer, attempts, "
                "updated) VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?) "
                "ON CONFLICT (account, uid, position, label, recipient) DO UPDATE SET "
                "state = excluded.state, answer = excluded.answer, updated = excluded.updated",
                (account, uid, *astuple(key), DeliveryState.DONE, answer, time.time()))

    def note_listing(self, account: str, records: dict[str, Record], listed: set[str],
                     now: float | None = None) -> list[str]:
        """Count, per record, the listings in a row that did not list its UID, and forget those missing from
        `FORGET_AFTER_LISTINGS` listings over at least `FORGET_AFTER_SECONDS`: one odd listing (a server hiccup,
        a wrong folder, another client's expunge) never forgets what was delivered. Returns the forgotten UIDs."""
        now = time.time() if now is None else now
        missing = [uid for uid, record in records.items() if uid not in listed]
        counting = [uid for uid in missing if records[uid].absent < FORGET_AFTER_LISTINGS]  # the rest wait for time
        back = [uid for uid in listed if (record := records.get(uid)) is not None and record.absent]
        due = [uid for uid in missing if (since := records[uid].absent_since) is not None
               and since <= now - FORGET_AFTER_SECONDS]
        if not counting and not back and not due:
            return []  # the usual poll: nothing to write
        with self._db.transaction() as tx:
            if back:
                tx.executemany("UPDATE messages SET absent = 0, absent_since = NULL WHERE account = ? AND uid = ?",
                               [(account, uid) for uid in back])
            if counting:
                tx.executemany(
                    "UPDATE messages SET absent = absent + 1, absent_since = coalesce(absent_since, ?) "
                    "WHERE account = ? AND uid = ?", [(now, account, uid) for uid in counting])
            gone = [uid for (uid,) in tx.query(
                "SELECT uid FROM messages WHERE account = ? AND absent >= ? AND absent_since <= ?",
                (account, FORGET_AFTER_LISTINGS, now - FORGET_AFTER_SECONDS))]
            _delete(tx, account, gone)
        return gone

    def forget(self, account: str, uids: Iterable[str]) -> None:
        """Drop the records of messages at once (a retry, a file that vanished); see `note_listing` for the rest."""
        uids = list(uids)
        if not uids:
            return
        with self._db.transaction() as tx:
            _delete(tx, account, uids)

    def record_poll(self, account: str, *, ok: bool, duration: float, counts: dict[str, int],
                    error: str | None, may_hold: bool = False) -> None:
        """Remember the last poll of an account and add its counts to the account's running totals.

        While `hold_poll_records` is on, a record the caller ``may_hold`` waits in memory for
        `write_held_poll_records`; any other is written at once, together with those waiting before it."""
        finished = FinishedPoll(account, ok, duration, counts, error, time.time())
        with self._held_lock:
            if self._holding and may_hold:
                if len(self._held) >= MAX_HELD_POLLS:
                    del self._held[0]  # the oldest goes: every record that follows it is newer anyway
                self._held.append(finished)
                return
            polls, self._held = [*self._held, finished], []
        self._write_polls(polls)

    def hold_poll_records(self, hold: bool = True) -> None:
        """Keep the records of polls in memory until `write_held_poll_records` (the daemon: once a second, and
        whenever no poll runs). Each poll's record was its own transaction, the main cost of an empty poll's state
        writes at a few hundred polls a second; a crash loses the summaries of the last second's polls, never a
        message's record. Turning it off writes what is held."""
        with self._held_lock:
            self._holding = hold
        if not hold:
            self.write_held_poll_records()

    def write_held_poll_records(self) -> None:
        """Write the held poll records in one transaction; they stay held if the write fails (`StateError`)."""
        with self._held_lock:
            polls, self._held = self._held, []
        if not polls:
            return
        try:
            self._write_polls(polls)
        except BaseException:
            with self._held_lock:
                self._held[:0] = polls
                del self._held[:-MAX_HELD_POLLS]  # the oldest go first: the newer records of the same accounts stay
            raise

    def _write_polls(self, polls: Sequence[FinishedPoll]) -> None:
        """One transaction for ``polls``, in order. A poll that moved nothing (most polls: an empty mailbox) leaves
        the totals as they are and needs no read: the last success is kept in SQL when it failed."""
        totals: dict[str, dict[str, int]] = {}  # the running totals of accounts whose polls added to them
        rows = []
        with self._db.transaction(needs_sync=False) as tx:
            for poll in polls:
                encoded = json.dumps(poll.counts)
                adds = any(poll.counts.values())
                if adds:
                    if poll.account not in totals:
                        found = tx.query("SELECT totals FROM polls WHERE account = ?", (poll.account,))
                        totals[poll.account] = json.loads(found[0][0]) if found else {}
                    running = totals[poll.account]
                    for key, value in poll.counts.items():
                        running[key] = running.get(key, 0) + value
                rows.append((poll.account, poll.finished, int(poll.ok), poll.duration, encoded, poll.error,
                             poll.finished if poll.ok else None,
                             json.dumps(totals[poll.account]) if adds else encoded, int(adds)))
            tx.executemany(
                "INSERT INTO polls (account, finished, ok, duration, counts, error, last_success, totals) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (account) DO UPDATE SET finished = excluded.finished, "
                "ok = excluded.ok, duration = excluded.duration, counts = excluded.counts, error = excluded.error, "
                "last_success = coalesce(excluded.last_success, polls.last_success), "
                "totals = CASE WHEN ? = 1 THEN excluded.totals ELSE polls.totals END", rows)
            tx.executemany(
                "INSERT INTO poll_counters (account, polls, failures, failure_streak, duration_total) "
                "VALUES (?, 1, ?, ?, ?) ON CONFLICT (account) DO UPDATE SET polls = poll_counters.polls + 1, "
                "failures = poll_counters.failures + excluded.failures, "
                "failure_streak = CASE WHEN excluded.failures = 0 THEN 0 ELSE poll_counters.failure_streak + 1 END, "
                "duration_total = poll_counters.duration_total + excluded.duration_total",
                [(poll.account, int(not poll.ok), int(not poll.ok), poll.duration) for poll in polls])

    def last_poll(self, account: str) -> PollRecord | None:
        self.write_held_poll_records()  # what this process recorded is read back
        if "polls" not in self._tables:  # read-only, written by an older version
            return None
        counters = "poll_counters" if "poll_counters" in self._tables else \
            "(SELECT NULL AS account, 0 AS polls, 0 AS failures, 0 AS failure_streak, 0 AS duration_total)"
        rows = self._db.query(
            "SELECT p.account, finished, ok, duration, counts, error, last_success, totals, "
            "coalesce(polls, 0), coalesce(failures, 0), coalesce(failure_streak, 0), coalesce(duration_total, 0) "
            f"FROM polls p LEFT JOIN {counters} c ON c.account = p.account WHERE p.account = ?", (account,))
        if not rows:
            return None
        name, finished, ok, duration, counts, error, last_success, totals = rows[0][:8]
        polls, failures, failure_streak, duration_total = rows[0][8:]
        return PollRecord(name, finished, bool(ok), duration, json.loads(counts), error, last_success,
                          json.loads(totals), polls=polls, failures=failures, failure_streak=failure_streak,
                          duration_total=duration_total)

    def set_next_poll(self, account: str, when: float | None) -> None:
        """Remember when the daemon means to poll ``account`` next (None: not planned, the daemon is not running)."""
        self.set_next_polls({account: when})

    def set_next_polls(self, planned: Mapping[str, float | None]) -> None:
        """`set_next_poll` for many accounts in one transaction: the daemon plans 100,000 accounts at start-up and
        notes a few hundred polls a second, which one commit each would make the state store's main cost."""
        if not planned:
            return
        with self._db.transaction(needs_sync=False) as tx:
            tx.executemany("INSERT INTO poll_schedule (account, next_poll) VALUES (?, ?) "
                           "ON CONFLICT (account) DO UPDATE SET next_poll = excluded.next_poll", planned.items())

    def next_poll(self, account: str) -> float | None:
        """When ``account`` is polled next: as its daemon planned it, or, in a shared store, when it is due for
        whichever worker claims it."""
        if "account_leases" in self._tables:  # shared: the workers' schedule; a daemon's own note where none
            rows = self._db.query("SELECT coalesce((SELECT next_due FROM account_leases WHERE account = ?), "
                                  "(SELECT next_poll FROM poll_schedule WHERE account = ?))", (account, account))
        elif "poll_schedule" in self._tables:
            rows = self._db.query("SELECT next_poll FROM poll_schedule WHERE account = ?", (account,))
        else:
            return None
        return rows[0][0] if rows else None

    def clear_rejected(self, account: str, uids: Iterable[str] = ()) -> list[str]:
        """Make rejected messages eligible again; all of the account's when ``uids`` is empty. Returns the UIDs.

        Only the message's record goes: the destinations (and LMTP recipients) that did take it keep their notes, so
        the retry gives it only to the ones that refused it, not a second copy to the others."""
        wanted = set(uids)
        rejected = [uid for uid, rec in self.records(account).items()
                    if rec.status == REJECTED and (not wanted or uid in wanted)]
        if rejected:
            with self._db.transaction() as tx:
                tx.executemany("DELETE FROM messages WHERE account = ? AND uid = ?",
                               [(account, uid) for uid in rejected])
        return rejected


def _note_in_flight(tx: Writer, account: str, uid: str, key: DeliveryKey) -> None:
    tx.execute(
        "INSERT INTO delivery_notes (account, uid, position, label, recipient, state, answer, attempts, "
        "updated) VALUES (?, ?, ?, ?, ?, ?, '', 1, ?) "
        "ON CONFLICT (account, uid, position, label, recipient) DO UPDATE SET "
        "attempts = delivery_notes.attempts + 1, updated = excluded.updated",
        (account, uid, key.position, key.label, key.recipient, DeliveryState.IN_FLIGHT, time.time()))


def _delete(tx: Writer, account: str, uids: list[str]) -> None:
    pairs = [(account, uid) for uid in uids]
    tx.executemany("DELETE FROM messages WHERE account = ? AND uid = ?", pairs)
    tx.executemany("DELETE FROM delivery_notes WHERE account = ? AND uid = ?", pairs)


def open_store(config: Config, *, readonly: bool = False) -> StateStore:
    """The state store ``config`` names: its ``state`` database (PostgreSQL) if it has one, else SQLite in its
    ``state_dir``."""
    return StateStore(config.state_dir, readonly=readonly, busy_timeout=config.state_busy_timeout,
                      shared=config.state)


def store_exists(config: Config) -> bool:
    """Whether there is a store to read: a shared one always is (its schema is made by whoever opens it first)."""
    return config.state is not None or StateStore.exists(config.state_dir)


class SQLiteDatabase:
    """The embedded default: one SQLite database (WAL) under ``state_dir``, one connection shared by the poll
    threads under a lock."""

    shared = False

    def __init__(self, path: Path, *, readonly: bool, busy_timeout: float) -> None:
        self.path = path
        self.where = str(path)
        self._wal = path.with_name(path.name + "-wal")  # where WAL commits land (`make_durable`)
        self._lock = threading.RLock()
        self._unsynced = True  # whatever an earlier run left unsynced is synced by the first `make_durable`
        try:
            if readonly:
                self._db = _connect_readonly(path)
                return
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            _create_private(path)
            self._db = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            self._upgrade()
        except (OSError, sqlite3.Error) as exc:
            raise StateError(f"state database {path}: {exc}") from None

    def _upgrade(self) -> None:
        """Bring a database written by an earlier version up to this schema (columns added, tables renamed)."""
        present = self.columns("messages")
        for name, declaration in _MESSAGE_COLUMNS:
            if name not in present:
                self._db.execute(f"ALTER TABLE messages ADD COLUMN {name} {declaration}")
        tables = self.tables()
        legacy = [(f"SELECT account, uid, destination, '{DeliveryState.DONE}', answer, 1, updated FROM {table}"
                   if table == "destinations_done" else
                   f"SELECT account, uid, destination, state, answer, attempts, updated FROM {table}", table)
                  for table in ("destinations_done", "deliveries") if table in tables]
        for select, table in legacy:  # notes keyed by strings: their keys become structured
            with self.transaction() as tx:
                rows = tx.query(select)
                tx.executemany(
                    "INSERT OR IGNORE INTO delivery_notes (account, uid, position, label, recipient, state, answer, "
                    "attempts, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(account, uid, *astuple(_legacy_key(text)), state, answer, attempts, updated or time.time())
                     for account, uid, text, state, answer, attempts, updated in rows])
                tx.execute(f"DROP TABLE {table}")

    def tables(self) -> set[str]:
        return {name for (name,) in self.query("SELECT name FROM sqlite_master WHERE type = 'table'")}

    def columns(self, table: str) -> set[str]:
        return {row[1] for row in self.query(f"PRAGMA table_info({table})")}

    def query(self, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        try:
            with self._lock:
                return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StateError(f"state database {self.path}: {exc}") from None

    def transaction(self, *, needs_sync: bool = True) -> contextlib.AbstractContextManager[Writer]:
        return _Transaction(self._db, self.path, self._lock, self._mark_unsynced if needs_sync else None)

    def _mark_unsynced(self) -> None:
        self._unsynced = True

    def make_durable(self) -> None:
        """Sync every committed record to the disk (the write-ahead log, where WAL commits land).

        Skipped when no message's record was committed since the last sync: an empty poll has nothing to make
        durable before its QUIT (its poll record, and the next-poll notes, need no sync before anything), and the
        fsync was a tenth of its CPU."""
        with self._lock:
            if not self._unsynced:
                return
            self._unsynced = False  # before the sync: a commit made during it marks the store again
            try:
                fd = os.open(self._wal, os.O_RDONLY)
            except FileNotFoundError:
                return  # everything is checkpointed into the database file, which SQLite synced then
            except OSError as exc:
                self._unsynced = True
                raise StateError(f"state database {self.path}: cannot sync: {exc.strerror or exc}") from None
            try:
                os.fsync(fd)
            except OSError as exc:
                self._unsynced = True
                raise StateError(f"state database {self.path}: cannot sync: {exc.strerror or exc}") from None
            finally:
                os.close(fd)

    def close(self) -> None:
        with self._lock:
            self._db.close()


class _SQLiteWriter:
    """`Writer` on a SQLite connection inside `_Transaction`."""

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self._db = db
        self._path = path

    def execute(self, sql: str, args: Sequence[object] = ()) -> int:
        try:
            return self._db.execute(sql, args).rowcount
        except sqlite3.Error as exc:
            raise StateError(f"state database {self._path}: {exc}") from None

    def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> int:
        try:
            return self._db.executemany(sql, rows).rowcount
        except sqlite3.Error as exc:
            raise StateError(f"state database {self._path}: {exc}") from None

    def query(self, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StateError(f"state database {self._path}: {exc}") from None


@dataclass(frozen=True)
class AccountState:
    """What the state store tells of one account's polls: what `read_account_state` returns."""

    last_poll: PollRecord
    waiting: list[WaitingMessage]  # deferred and rejected, longest waiting first


def read_account_state(where: Path | Config, account: str) -> AccountState | None:
    """The account's last poll and the messages waiting on its server, for readers outside the poller (metrics,
    notifications): `read_accounts_state` of one account. None when there is no database yet or no poll of it."""
    return read_accounts_state(where, [account]).get(account)


def read_accounts_state(where: Path | Config, accounts: Iterable[str]) -> dict[str, AccountState]:
    """`AccountState` of each of ``accounts`` that has been polled, read together (a reader of many accounts opens
    the database once for all of them).

    ``where``: a state directory (SQLite), or the config, whose ``state`` may name a shared database. A SQLite store
    is read through a read-only store opened for this read alone: the reader never writes nor creates a file, and a
    store kept open could be one SQLite reads as an immutable file (opened while nobody had the database open),
    blind to every later poll. A shared store is read over one read-only connection kept for the process. Empty when
    there is no database yet; a `StateError` when the database cannot be read.
    """
    if not isinstance(where, Path) and where.state is not None:
        return _states(_shared_reader(where.state), accounts)
    state_dir = where if isinstance(where, Path) else where.state_dir
    if not StateStore.exists(state_dir):
        return {}
    with contextlib.closing(StateStore(state_dir, readonly=True)) as store:
        return _states(store, accounts)


def _states(store: StateStore, accounts: Iterable[str]) -> dict[str, AccountState]:
    states = {}
    for account in accounts:
        last_poll = store.last_poll(account)
        if last_poll is not None:
            states[account] = AccountState(last_poll, store.waiting(account))
    return states


@dataclass(frozen=True)
class WorkerFigures:
    """A worker sharing a PostgreSQL state, as its row in ``workers`` says (``postbote status``, the metrics)."""

    id: str  # HOST:PID:RANDOM
    host: str
    pid: int
    role: str  # daemon (postbote run) or poll (postbote poll)
    started: float  # seconds since the epoch, by the database's clock
    heartbeat: float  # its last renewal of its leases
    polls: int  # polls it finished
    failures: int
    holding: int  # accounts whose lease it holds now


def read_workers(config: Config) -> list[WorkerFigures]:
    """The workers of ``config``'s shared state (none with a SQLite state: one daemon, no leases)."""
    if config.state is None:
        return []
    from postbote.state_postgres import PostgresDatabase, workers

    database = _shared_reader(config.state).database
    if not isinstance(database, PostgresDatabase) or "workers" not in database.tables():
        return []
    return workers(database)


_shared_readers: dict[str, StateStore] = {}
_shared_readers_lock = threading.Lock()


def _shared_reader(state: SharedState) -> StateStore:
    """One read-only store per shared database for the process: a PostgreSQL connection costs a login (SCRAM) and
    a few round trips, which a reader after every poll must not pay each time. Its state directory is never used."""
    with _shared_readers_lock:
        store = _shared_readers.get(state.conninfo)
        if store is None:
            store = _shared_readers[state.conninfo] = StateStore(Path("."), readonly=True, shared=state)
        return store


def _create_private(path: Path) -> None:
    """Create the database file readable by its owner only (SQLite gives its -wal and -shm files the same mode)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)


def _connect_readonly(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise StateError(f"state database {path}: does not exist (no poll has run with this state_dir yet)")
    in_use = path.with_name(path.name + "-wal").exists()
    uri = f"{path.resolve().as_uri()}?mode=ro" + ("" if in_use else "&immutable=1")
    db = sqlite3.connect(uri, uri=True, timeout=10.0, isolation_level=None, check_same_thread=False)
    db.execute("SELECT count(*) FROM sqlite_master").fetchall()
    return db


class _Transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, holding the store's lock so threads sharing the connection never interleave;
    the block writes through the `_SQLiteWriter` it is given."""

    def __init__(self, db: sqlite3.Connection, path: Path, lock: threading.RLock,
                 committed: Callable[[], None] | None = None) -> None:
        self._db = db
        self._path = path
        self._lock = lock
        self._committed = committed

    def __enter__(self) -> _SQLiteWriter:
        self._lock.acquire()
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            self._lock.release()
            raise StateError(f"state database {self._path}: {exc}") from None
        return _SQLiteWriter(self._db, self._path)

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if exc_type:
                self._rollback()
                return
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as error:
                # A COMMIT that failed (disk full, I/O error, busy) may leave the transaction open: rolled back
                # here, or its writes would be read back on this connection -- and committed by the next COMMIT.
                self._rollback()
                raise StateError(f"state database {self._path}: cannot commit: {error}") from None
            if self._committed is not None:
                self._committed()
        finally:
            self._lock.release()

    def _rollback(self) -> None:
        if self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")


@dataclass(frozen=True)
class LockHolder:
    """Who holds the state directory, as written in the lock file: a pid and a role (``daemon``, ``poll``)."""

    pid: int
    role: str

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def read_lock_holder(state_dir: Path) -> LockHolder | None:
    """The holder named in the lock file, if any; the file is emptied when a holder releases the lock cleanly."""
    try:
        words = (state_dir / LOCK_NAME).read_text("ascii", errors="replace").split()
    except OSError:
        return None
    if not words or not words[0].isdigit():
        return None
    return LockHolder(int(words[0]), words[1] if len(words) > 1 else "unknown")


class StateLock:
    """An exclusive lock on the state directory, held for the life of a ``poll`` or ``run``.

    The holder writes ``PID ROLE`` into the lock file, so that ``postbote poll`` can find a running daemon (and
    signal it instead of failing) and ``postbote status`` can say whether one runs.
    """

    def __init__(self, state_dir: Path, *, role: str = "poll") -> None:
        self.path = state_dir / LOCK_NAME
        self.role = role
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StateError(f"cannot create lock file {self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").split()
            os.close(fd)
            who = f"{holder[1]} " if len(holder) > 1 else ""
            raise StateLockedError(f"another postbote {who}(pid {holder[0] if holder else 'unknown'}) is using the "
                                   f"state directory {self.path.parent}; stop it first, or give this one another "
                                   f"state_dir") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {self.role}\n".encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise StateError(f"cannot write lock file {self.path}: {exc.strerror or exc}") from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):  # the lock goes with the descriptor; a stale pid is only informative
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> StateLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# --- plugin tables


JsonValue = None | bool | int | float | str | list["JsonValue"] | dict[str, "JsonValue"]
TableValue = JsonValue | bytes
"""What a `KeyedTable` entry holds: bytes as they are, anything else as JSON (None is stored as SQL NULL)."""

PRIVATE_MODE = 0o600
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

_KEYED_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    namespace TEXT NOT NULL,
    key TEXT NOT NULL,
    value,
    written REAL NOT NULL,
    PRIMARY KEY (namespace, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_by_time ON entries (written);
"""


@dataclass(frozen=True)
class Entry:
    """One value of a `KeyedTable` and when it was written (seconds since the epoch, as the writer gave it)."""

    value: TableValue
    written: float


@dataclass(frozen=True)
class LegacyTable:
    """The shape of a table an older version of a plugin kept in its database file, to move into a `KeyedTable`.

    Its rows become entries (``namespace``, ``key``, no value, ``written``) the first time the file is opened, and the
    old table is dropped in the same transaction: users upgrading keep their history, and the plugin never reads
    two schemas. Every field names a table or column of the old file.
    """

    table: str
    namespace: str
    key: str
    written: str

    def __post_init__(self) -> None:
        for name in (self.table, self.namespace, self.key, self.written):
            if not _IDENTIFIER.fullmatch(name):
                raise ValueError(f"legacy table: {name!r} is not a plain SQL identifier")


class KeyedTable:
    """A plugin's own table of values keyed by (namespace, key), each with the time it was written.

    It lives in its own database file beside the state database (``state_dir/NAME.sqlite3``), not inside it: a
    plugin's table has its own retention and may grow large (the dedupe history holds every Message-ID and
    recipient of the window), so it must neither bloat the file nor hold the write lock that the per-message records
    commit under, and a broken or deleted plugin table costs that plugin's feature, never the record of what was
    delivered. It keeps the state store's other promises: the file and its ``-wal``/``-shm`` companions are created
    0600 (and tightened if an older version left them wider), every write commits before it returns, writers wait
    ``busy_timeout`` for another process's lock, and one connection is shared by the poll threads under a lock.
    Every failure is a `StateError`.
    """

    def __init__(self, path: Path, *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
                 legacy: LegacyTable | None = None) -> None:
        self.path = path
        self.tightened: list[tuple[Path, int]] = []
        """Files of this table that were wider than 0600 when opened (path, former mode), for the plugin to log."""
        self._lock = threading.RLock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._tighten_if_ours(path, create=True)
            self._db = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise StateError(f"cannot open {path}: {exc}") from None
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_KEYED_SCHEMA)
            if legacy is not None:
                self._adopt(legacy)
            for companion in SQLITE_COMPANIONS:
                self._tighten_if_ours(path.with_name(path.name + companion), create=False)
        except (OSError, sqlite3.Error, StateError) as exc:
            self._db.close()
            raise StateError(f"cannot open {path}: {exc}") from None

    @classmethod
    def open(cls, state_dir: Path, name: str, *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
             legacy: LegacyTable | None = None) -> KeyedTable:
        """The table ``name`` of a plugin (``state_dir/NAME.sqlite3``), created if missing."""
        if not _IDENTIFIER.fullmatch(name):
            raise ValueError(f"plugin table name {name!r}: use letters, digits and underscores")
        if f"{name}.sqlite3" == DATABASE_NAME:
            raise ValueError(f"plugin table name {name!r}: that is the state database's own file")
        return cls(state_dir / f"{name}.sqlite3", busy_timeout=busy_timeout, legacy=legacy)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def put(self, namespace: str, key: str, value: TableValue = None, *, written: float | None = None) -> None:
        """Write one entry (replacing any under the same key), committed before returning."""
        self.put_many(namespace, [key], value, written=written)

    def put_many(self, namespace: str, keys: Iterable[str], value: TableValue = None, *,
                 written: float | None = None) -> None:
        """Write the same value under several keys of one namespace in one transaction."""
        when = time.time() if written is None else written
        stored = _encode(value)
        with self._transaction():
            self._db.executemany(
                "INSERT INTO entries (namespace, key, value, written) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (namespace, key) DO UPDATE SET value = excluded.value, written = excluded.written",
                [(namespace, key, stored, when) for key in keys])

    def get(self, namespace: str, key: str) -> Entry | None:
        return self.get_many(namespace, [key]).get(key)

    def get_many(self, namespace: str, keys: Iterable[str], *, since: float | None = None) -> dict[str, Entry]:
        """The entries of ``namespace`` under ``keys`` (those written at or after ``since``, if given)."""
        wanted = sorted(set(keys))
        if not wanted:
            return {}
        placeholders = ", ".join("?" * len(wanted))
        rows = self._query(f"SELECT key, value, written FROM entries WHERE namespace = ? AND key IN ({placeholders})"
                           " AND written >= ?", (namespace, *wanted, -math.inf if since is None else since))
        return {key: Entry(_decode(value), written) for key, value, written in rows}

    def contains(self, namespace: str, key: str, *, since: float | None = None) -> bool:
        return key in self.get_many(namespace, [key], since=since)

    def delete(self, namespace: str, key: str) -> bool:
        """Remove one entry; returns whether there was one."""
        with self._transaction():
            return self._db.execute("DELETE FROM entries WHERE namespace = ? AND key = ?",
                                    (namespace, key)).rowcount > 0

    def expire_older_than(self, cutoff: float) -> int:
        """Remove the entries written before ``cutoff``; returns how many."""
        with self._transaction():
            return self._db.execute("DELETE FROM entries WHERE written < ?", (cutoff,)).rowcount

    def __len__(self) -> int:
        return int(self._query("SELECT count(*) FROM entries", ())[0][0])

    def _adopt(self, legacy: LegacyTable) -> None:
        """Move the rows of an older version's table into ``entries`` and drop that table (see `LegacyTable`)."""
        present = self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                                   (legacy.table,)).fetchall()
        if not present:
            return
        with self._transaction():
            self._db.execute(
                f"INSERT INTO entries (namespace, key, value, written) "
                f"SELECT {legacy.namespace}, {legacy.key}, NULL, {legacy.written} FROM {legacy.table} WHERE true "
                f"ON CONFLICT (namespace, key) DO UPDATE SET written = max(entries.written, excluded.written)")
            self._db.execute(f"DROP TABLE {legacy.table}")

    def _tighten_if_ours(self, path: Path, *, create: bool) -> None:
        """Create ``path`` 0600 (SQLite gives the -wal and -shm files the database file's mode), or tighten a file
        of ours that an older version left wider; an absent companion is fine."""
        flags = os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_RDWR | os.O_CREAT if create else os.O_RDONLY)
        try:
            fd = os.open(path, flags, PRIVATE_MODE)
        except FileNotFoundError:
            if create:
                raise
            return
        try:
            status = os.fstat(fd)
            if status.st_mode & 0o077 and status.st_uid == os.geteuid():
                os.fchmod(fd, PRIVATE_MODE)
                self.tightened.append((path, status.st_mode & 0o777))
        finally:
            os.close(fd)

    def _query(self, sql: str, args: tuple[object, ...]) -> list[tuple]:
        try:
            with self._lock:
                return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StateError(f"{self.path}: {exc}") from None

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """The store's transaction, with every SQLite failure inside it a `StateError` too."""
        try:
            with _Transaction(self._db, self.path, self._lock):
                yield
        except sqlite3.Error as exc:
            raise StateError(f"{self.path}: {exc}") from None


def _encode(value: TableValue) -> bytes | str | None:
    if value is None or isinstance(value, bytes):
        return value
    return json.dumps(value, separators=(",", ":"))


def _decode(stored: bytes | str | None) -> TableValue:
    if stored is None or isinstance(stored, bytes):
        return stored
    return json.loads(stored)  # type: ignore[no-any-return]
