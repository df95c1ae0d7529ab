"""The persistent record of what happened to each message, and the lock on the state directory.

One SQLite database (WAL) under ``state_dir`` holds, per account and UID, whether a message was delivered,
dropped or rejected. Every write commits before the caller goes on, and the poller records a message as handled
*before* it sends DELE: after a crash at any point the worst case is one duplicate delivery, never a loss.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Iterable
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


@dataclass(frozen=True)
class Record:
    uid: str
    status: str
    reason: str


class StateStore:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / DATABASE_NAME
        try:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StateError(f"state database {self.path}: {exc}") from None

    def close(self) -> None:
        self._db.close()

    def records(self, account: str) -> dict[str, Record]:
        rows = self._query("SELECT uid, status, reason FROM messages WHERE account = ?", (account,))
        return {uid: Record(uid, status, reason) for uid, status, reason in rows}

    def record(self, account: str, uid: str, status: str, *, reason: str = "", message_id: str | None = None,
               size: int | None = None) -> None:
        """Record the outcome for one message, committed (and synced, ``synchronous=FULL``) before returning."""
        with self._transaction():
            self._db.execute(
                "INSERT INTO messages (account, uid, status, reason, message_id, size, updated) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (account, uid) DO UPDATE SET status = excluded.status, "
                "reason = excluded.reason, message_id = excluded.message_id, size = excluded.size, "
                "updated = excluded.updated",
                (account, uid, status, reason, message_id, size, time.time()))
            if status in HANDLED:
                self._db.execute("DELETE FROM destinations_done WHERE account = ? AND uid = ?", (account, uid))

    def destinations_done(self, account: str, uid: str) -> dict[str, str]:
        """Destinations that already took this message in an earlier, partly failed attempt."""
        rows = self._query("SELECT destination, answer FROM destinations_done WHERE account = ? AND uid = ?",
                           (account, uid))
        return dict(rows)

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

    def last_poll(self, account: str) -> PollRecord | None:
        rows = self._query("SELECT account, finished, ok, duration, counts, error, last_success, totals FROM polls "
                           "WHERE account = ?", (account,))
        if not rows:
            return None
        name, finished, ok, duration, counts, error, last_success, totals = rows[0]
        return PollRecord(name, finished, bool(ok), duration, json.loads(counts), error, last_success,
                          json.loads(totals))

    def clear_rejected(self, account: str, uids: Iterable[str] = ()) -> list[str]:
        """Make rejected messages eligible again; all of the account's when ``uids`` is empty. Returns the UIDs."""
        wanted = set(uids)
        rejected = [uid for uid, rec in self.records(account).items()
                    if rec.status == REJECTED and (not wanted or uid in wanted)]
        self.forget(account, rejected)
        return rejected

    def _query(self, sql: str, args: tuple[object, ...]) -> list[tuple]:
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StateError(f"state database {self.path}: {exc}") from None

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db, self.path)


class _Transaction:
    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self._db = db
        self._path = path

    def __enter__(self) -> None:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StateError(f"state database {self._path}: {exc}") from None

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self._db.execute("ROLLBACK" if exc_type else "COMMIT")
        except sqlite3.Error as error:
            raise StateError(f"state database {self._path}: cannot commit: {error}") from None


class StateLock:
    """An exclusive lock on the state directory, held for the life of a ``poll`` or ``run``."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_NAME
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
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise StateLockedError(f"another postbote (pid {holder}) is using the state directory "
                                   f"{self.path.parent}; stop it first, or give this one another state_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> StateLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
