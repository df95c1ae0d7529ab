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
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.errors import StateError, StateLockedError

DATABASE_NAME = "postbote.sqlite3"
LOCK_NAME = "postbote.lock"

DELIVERED = "delivered"
DROPPED = "dropped"
REJECTED = "rejected"
HANDLED = (DELIVERED, DROPPED)

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
);
CREATE TABLE IF NOT EXISTS destinations_done (
    account TEXT NOT NULL,
    uid TEXT NOT NULL,
    destination TEXT NOT NULL,
    answer TEXT NOT NULL,
    PRIMARY KEY (account, uid, destination)
);
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
class Record:
    uid: str
    status: str
    reason: str
    size: int | None = None  # the size the server listed when the outcome was recorded


class StateStore:
    def __init__(self, state_dir: Path, *, readonly: bool = False) -> None:
        """Open (and create) the database; ``readonly`` opens an existing one for reading without creating files.

        A read-only store never creates the ``-wal``/``-shm`` companions (which, made by root for
        ``postbote status``, would lock the service user out): while nobody has the database open it is read as an
        immutable file. A missing database is a `StateError`.
        """
        self.path = state_dir / DATABASE_NAME
        self._lock = threading.RLock()
        self._tables = {"polls", "poll_counters", "poll_schedule"}
        try:
            if readonly:
                self._db = _connect_readonly(self.path)
                self._tables = {name for (name,) in self._db.execute("SELECT name FROM sqlite_master")}
                return
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StateError(f"state database {self.path}: {exc}") from None

    @staticmethod
    def exists(state_dir: Path) -> bool:
        return (state_dir / DATABASE_NAME).is_file()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def make_durable(self) -> None:
        """Sync every committed record to the disk (the write-ahead log, where WAL commits land)."""
        wal = self.path.with_name(self.path.name + "-wal")
        with self._lock:
            try:
                fd = os.open(wal, os.O_RDONLY)
            except FileNotFoundError:
                return  # everything is checkpointed into the database file, which SQLite synced then
            except OSError as exc:
                raise StateError(f"state database {self.path}: cannot sync: {exc.strerror or exc}") from None
            try:
                os.fsync(fd)
            except OSError as exc:
                raise StateError(f"state database {self.path}: cannot sync: {exc.strerror or exc}") from None
            finally:
                os.close(fd)

    def records(self, account: str) -> dict[str, Record]:
        rows = self._query("SELECT uid, status, reason, size FROM messages WHERE account = ?", (account,))
        return {uid: Record(uid, status, reason, size) for uid, status, reason, size in rows}

    def record(self, account: str, uid: str, status: str, *, reason: str = "", message_id: str | None = None,
               size: int | None = None) -> None:
        """Record the outcome for one message, committed before returning (synced by `make_durable`)."""
        with self._transaction():
            self._db.execute(
                "INSERT INTO messages (account, uid, status, reason, message_id, size, updated) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (account, uid) DO UPDATE SET status = excluded.status, "
                "reason = excluded.reason, message_id = excluded.message_id, size = excluded.size, "
                "updated = excluded.updated",
                (account, uid, status, reason, message_id, size, time.time()))
            if status in HANDLED:
                self._db.execute("DELETE FROM destinations_done WHERE account = ? AND uid = ?", (account, uid))

    def record_batch(self, account: str, records: list[tuple[str, str, str, str | None, int]],
                     renames: Sequence[tuple[str, str, str]] = ()) -> None:
        """Record many outcomes ``(uid, status, reason, message_id, size)`` and the renames that complete their
        delivery, in one transaction (one sync). The renames are journaled until `clear_renames`."""
        now = time.time()
        with self._transaction():
            self._db.executemany(
                "INSERT INTO messages (account, uid, status, reason, message_id, size, updated) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (account, uid) DO UPDATE SET status = excluded.status, "
                "reason = excluded.reason, message_id = excluded.message_id, size = excluded.size, "
                "updated = excluded.updated",
                [(account, uid, status, reason, message_id, size, now) for uid, status, reason, message_id, size
                 in records])
            self._db.executemany("DELETE FROM destinations_done WHERE account = ? AND uid = ?",
                                 [(account, uid) for uid, *_ in records])
            if renames:
                self._db.executemany("INSERT INTO pending_renames VALUES (?, ?, ?, ?)",
                                     [(account, uid, source, target) for uid, source, target in renames])

    def pending_renames(self, account: str) -> list[tuple[str, str, str]]:
        return [tuple(row) for row in self._query(  # type: ignore[misc]
            "SELECT uid, source, target FROM pending_renames WHERE account = ?", (account,))]

    def clear_renames(self, account: str, uids: Iterable[str]) -> None:
        uids = list(uids)
        if not uids:
            return
        with self._transaction():
            self._db.executemany("DELETE FROM pending_renames WHERE account = ? AND uid = ?",
                                 [(account, uid) for uid in uids])

    def destinations_done(self, account: str, uid: str) -> dict[str, str]:
        """Destinations that already took this message in an earlier, partly failed attempt."""
        rows = self._query("SELECT destination, answer FROM destinations_done WHERE account = ? AND uid = ?",
                           (account, uid))
        return dict(rows)

    def partly_delivered(self, account: str) -> set[str]:
        """UIDs with destinations noted by `record_destination` (normally none: one query per poll, not per message)."""
        return {uid for (uid,) in self._query("SELECT DISTINCT uid FROM destinations_done WHERE account = ?",
                                              (account,))}

    def record_destination(self, account: str, uid: str, destination: str, answer: str) -> None:
        with self._transaction():
            self._db.execute("INSERT OR REPLACE INTO destinations_done VALUES (?, ?, ?, ?)",
                             (account, uid, destination, answer))

    def forget(self, account: str, uids: Iterable[str]) -> None:
        """Drop the records of messages that are no longer on the server (deleted by us, or by someone else)."""
        uids = list(uids)
        if not uids:
            return
        with self._transaction():
            self._db.executemany("DELETE FROM messages WHERE account = ? AND uid = ?", [(account, u) for u in uids])
            self._db.executemany("DELETE FROM destinations_done WHERE account = ? AND uid = ?",
                                 [(account, u) for u in uids])

    def record_poll(self, account: str, *, ok: bool, duration: float, counts: dict[str, int],
                    error: str | None) -> None:
        """Remember the last poll of an account and add its counts to the account's running totals."""
        previous = self.last_poll(account)
        totals = dict(previous.totals) if previous else {}
        for key, value in counts.items():
            totals[key] = totals.get(key, 0) + value
        now = time.time()
        last_success = now if ok else (previous.last_success if previous else None)
        with self._transaction():
            self._db.execute("INSERT OR REPLACE INTO polls VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (account, now, int(ok), duration, json.dumps(counts), error, last_success,
                              json.dumps(totals)))
            self._db.execute(
                "INSERT INTO poll_counters (account, polls, failures, failure_streak, duration_total) "
                "VALUES (?, 1, ?, ?, ?) ON CONFLICT (account) DO UPDATE SET polls = polls + 1, "
                "failures = failures + excluded.failures, "
                "failure_streak = CASE WHEN excluded.failures = 0 THEN 0 ELSE failure_streak + 1 END, "
                "duration_total = duration_total + excluded.duration_total",
                (account, int(not ok), int(not ok), duration))

    def last_poll(self, account: str) -> PollRecord | None:
        if "polls" not in self._tables:  # read-only, written by an older version
            return None
        counters = "poll_counters" if "poll_counters" in self._tables else \
            "(SELECT NULL AS account, 0 AS polls, 0 AS failures, 0 AS failure_streak, 0 AS duration_total)"
        rows = self._query(
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
        with self._transaction():
            self._db.execute("INSERT OR REPLACE INTO poll_schedule VALUES (?, ?)", (account, when))

    def next_poll(self, account: str) -> float | None:
        if "poll_schedule" not in self._tables:
            return None
        rows = self._query("SELECT next_poll FROM poll_schedule WHERE account = ?", (account,))
        return rows[0][0] if rows else None

    def clear_rejected(self, account: str, uids: Iterable[str] = ()) -> list[str]:
        """Make rejected messages eligible again; all of the account's when ``uids`` is empty. Returns the UIDs."""
        wanted = set(uids)
        rejected = [uid for uid, rec in self.records(account).items()
                    if rec.status == REJECTED and (not wanted or uid in wanted)]
        self.forget(account, rejected)
        return rejected

    def _query(self, sql: str, args: tuple[object, ...]) -> list[tuple]:
        try:
            with self._lock:
                return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StateError(f"state database {self.path}: {exc}") from None

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db, self.path, self._lock)


def _connect_readonly(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise StateError(f"state database {path}: does not exist (no poll has run with this state_dir yet)")
    in_use = path.with_name(path.name + "-wal").exists()
    uri = f"{path.resolve().as_uri()}?mode=ro" + ("" if in_use else "&immutable=1")
    db = sqlite3.connect(uri, uri=True, timeout=10.0, isolation_level=None, check_same_thread=False)
    db.execute("SELECT count(*) FROM sqlite_master").fetchall()
    return db


class _Transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, holding the store's lock so threads sharing the connection never interleave."""

    def __init__(self, db: sqlite3.Connection, path: Path, lock: threading.RLock) -> None:
        self._db = db
        self._path = path
        self._lock = lock

    def __enter__(self) -> None:
        self._lock.acquire()
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            self._lock.release()
            raise StateError(f"state database {self._path}: {exc}") from None

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self._db.execute("ROLLBACK" if exc_type else "COMMIT")
        except sqlite3.Error as error:
            raise StateError(f"state database {self._path}: cannot commit: {error}") from None
        finally:
            self._lock.release()


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
