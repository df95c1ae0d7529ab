"""The state store on PostgreSQL (``state: postgresql://...``), shared by several workers, and the leases by which
they divide the accounts among them.

`PostgresDatabase` is the connection layer under `postbote.state.StateStore`: the store's statements are the same
as on SQLite (the ``?`` placeholders become psycopg's ``%s`` here), its tables the same (``REAL`` becomes
``DOUBLE PRECISION``), and every commit is durable when it returns (``synchronous_commit`` is set on for our
sessions), so the commit-before-DELE rule needs no extra sync. The schema is versioned (``schema_version``): opening
the store applies the `MIGRATIONS` it lacks, in one transaction under an advisory lock, so that workers started
together do not race each other.

Leases, not a job library. Each account has one row in ``account_leases`` (next_due, lease_worker, lease_until);
a worker claims due accounts in batches::

    SELECT account ... WHERE next_due <= now AND (lease_until IS NULL OR lease_until < now)
    ORDER BY next_due LIMIT n FOR UPDATE SKIP LOCKED

and sets itself as the holder until ``now + worker_lease`` in the same statement; `LeaseKeeper` renews the leases it
holds (and its row in ``workers``) every third of the lease; the poll's end releases the lease with the account's
next due time. An account is therefore polled by one worker at a time, once per interval across all workers, and a
dead worker's accounts are claimed by the others once its leases run out. We looked at procrastinate (a
PostgreSQL job queue built on the same ``SKIP LOCKED``): its jobs are one-shot tasks, deferred and then done, with
per-queue locks; an account is a standing row polled for ever at its own interval, whose next due time depends on
the poll's outcome (backoff), and which must never run twice at once -- which procrastinate does with
``queueing_lock``/``lock`` strings but then needs a job row inserted per poll (3,333 inserts and deletes a second
at 1,000,000 accounts), its own worker process model (asyncio) beside our poll threads, and its schema to migrate.
One table with a lease column is less code than adapting it, and the claim is a single statement.

All times here are the database's clock (``clock_timestamp()``, as seconds since the epoch), so that workers on
machines whose clocks differ still agree on who holds what.
"""

from __future__ import annotations

import contextlib
import enum
import os
import socket
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from postbote.credentials import redact
from postbote.errors import PSYCOPG_MISSING, ConfigError, StateError
from postbote.logconfig import get_logger
from postbote.state import _MESSAGE_COLUMNS, _SCHEMA, Database, WorkerFigures, Writer

if TYPE_CHECKING:
    import psycopg
    from postbote.config import SharedState

log = get_logger("postbote.state")

NOW = "extract(epoch FROM clock_timestamp())::double precision"
CONNECT_TIMEOUT = 10  # seconds to reach the server; a poll that cannot is deferred like any state failure
# A server or network that stops answering must not hold a poll (and with it the account's lease) for ever: libpq's
# TCP keepalives and user timeout find a dead peer in about 30 s, the statement timeout bounds a stuck statement.
# Where the conninfo sets one of these itself, its value is kept.
CONNECTION_DEFAULTS = {"connect_timeout": str(CONNECT_TIMEOUT), "keepalives": "1", "keepalives_idle": "10",
                       "keepalives_interval": "5", "keepalives_count": "3", "tcp_user_timeout": "30000",
                       "application_name": "postbote"}
STATEMENT_TIMEOUT = "30s"
# Connections a worker opens at most. One, shared under a lock, made every poll wait for the others' round trips
# (about 8 an empty poll: 2.5 ms of the connection's time a poll at a LAN's 0.3 ms); a few lift that limit well past
# what one process's GIL polls, and 22 workers still hold under 100 connections (PostgreSQL's default limit).
POOL_SIZE = 4
MIGRATION_LOCK = 0x706F7374  # pg_advisory_xact_lock key: one worker at a time migrates the schema
UNKNOWN_ACCOUNT_DELAY = 60.0  # an account claimed by a worker whose config lacks it is left this long for the others


def _postgres(sql: str) -> str:
    """The shared schema text in PostgreSQL's words: REAL is a 4-byte float there, and rowid is SQLite's own."""
    import re

    return re.sub(r"\bREAL\b", "DOUBLE PRECISION", sql).replace(") WITHOUT ROWID;", ");")


# Each migration takes the schema from the version before it to its own; a store applies the ones it lacks.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: the records, as on SQLite (its columns added since the first release included)
    (_postgres(_SCHEMA), *(_postgres(f"ALTER TABLE messages ADD COLUMN {name} {declaration}")
                           for name, declaration in _MESSAGE_COLUMNS)),
    # 2: workers and the leases by which they share the accounts
    ("CREATE TABLE workers (id TEXT PRIMARY KEY, host TEXT NOT NULL, pid INTEGER NOT NULL, role TEXT NOT NULL, "
     "started DOUBLE PRECISION NOT NULL, heartbeat DOUBLE PRECISION NOT NULL, polls BIGINT NOT NULL DEFAULT 0, "
     "failures BIGINT NOT NULL DEFAULT 0)",
     "CREATE TABLE account_leases (account TEXT PRIMARY KEY, next_due DOUBLE PRECISION NOT NULL, "
     "lease_worker TEXT, lease_until DOUBLE PRECISION)",
     "CREATE INDEX account_leases_by_due ON account_leases (next_due)"),
)
SCHEMA_VERSION = len(MIGRATIONS)


class PostgresDatabase:
    """`postbote.state.Database` on PostgreSQL: a small pool of connections (autocommit between our transactions),
    at most `POOL_SIZE`, that the poll threads take in turn; one dropped by the server or the network is replaced on
    the next use. A thread that holds a connection (inside a transaction) gets the same one again if it asks."""

    shared = True

    def __init__(self, state: SharedState, *, readonly: bool = False,
                 migrations: Sequence[Sequence[str]] = MIGRATIONS, pool_size: int = POOL_SIZE) -> None:
        try:
            import psycopg  # noqa: F401 - the optional extra; `shared_state` checked it at config time
        except ImportError:
            raise ConfigError(f"state: {PSYCOPG_MISSING}") from None
        self._state = state
        self.where = state.shown
        self._readonly = readonly
        self._sql: dict[str, str] = {}
        self._columns: dict[str, set[str]] = {}
        self._slots = threading.BoundedSemaphore(pool_size)
        self._pool_lock = threading.Lock()
        self._idle: list[psycopg.Connection[Any]] = []
        self._open_connections: set[psycopg.Connection[Any]] = set()
        self._mine = threading.local()  # .connection: the one this thread holds now
        self.round_trips = 0  # statements sent (bench/workers.py reports them per poll)
        with self._errors():
            if readonly:
                self.query("SELECT 1")  # the server answers: a status or a metrics read fails here, clearly
            else:
                self._migrate(migrations)

    # --- the connections

    def _open(self) -> psycopg.Connection[Any]:
        import psycopg
        from psycopg.conninfo import conninfo_to_dict, make_conninfo
        from psycopg.types.string import StrDumper

        given = conninfo_to_dict(self._state.conninfo)
        conninfo = make_conninfo(self._state.conninfo, **{key: value for key, value in CONNECTION_DEFAULTS.items()
                                                          if key not in given})
        conn = psycopg.connect(conninfo, autocommit=True)
        conn.adapters.register_dumper(enum.StrEnum, StrDumper)  # our enums as their values, not their names
        conn.execute("SET synchronous_commit TO on")  # a commit is on the server's disk before DELE
        conn.execute(f"SET statement_timeout TO '{STATEMENT_TIMEOUT}'")
        if self._readonly:
            conn.execute("SET default_transaction_read_only TO on")
        with self._pool_lock:
            self._open_connections.add(conn)
        return conn

    @contextlib.contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A connection of the pool for the block (waiting for one when all are in use)."""
        held = getattr(self._mine, "connection", None)
        if held is not None:
            yield held
            return
        with self._slots:
            with self._pool_lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None or conn.closed or conn.broken:
                if conn is not None:
                    self._discard(conn)
                conn = self._open()
            self._mine.connection = conn
            try:
                yield conn
            finally:
                self._mine.connection = None
                if conn.closed or conn.broken:
                    self._discard(conn)
                else:
                    with self._pool_lock:
                        self._idle.append(conn)

    def _discard(self, conn: psycopg.Connection[Any]) -> None:
        with self._pool_lock:
            self._open_connections.discard(conn)
        with contextlib.suppress(Exception):
            conn.close()

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        import psycopg

        try:
            yield
        except psycopg.Error as exc:
            raise StateError(f"state database {self.where}: {redact(_one_line(exc))}") from None

    def _dialect(self, sql: str) -> str:
        translated = self._sql.get(sql)
        if translated is None:
            translated = self._sql[sql] = sql.replace("%", "%%").replace("?", "%s")
        return translated

    def _migrate(self, migrations: Sequence[Sequence[str]]) -> None:
        with self.transaction() as tx:
            tx.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
            tx.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            rows = tx.query("SELECT version FROM schema_version")
            version = rows[0][0] if rows else 0
            if version > len(migrations):
                raise StateError(f"state database {self.where}: its schema is version {version}, newer than this "
                                 f"postbote knows ({len(migrations)}); upgrade postbote")
            for number, steps in enumerate(migrations[version:], start=version + 1):
                for step in steps:
                    tx.execute(step)
                log.info("state.schema_upgraded", database=self.where, version=number)
            if not rows:
                tx.execute("INSERT INTO schema_version (version) VALUES (?)", (len(migrations),))
            elif version != len(migrations):
                tx.execute("UPDATE schema_version SET version = ?", (len(migrations),))

    def schema_version(self) -> int:
        rows = self.query("SELECT version FROM schema_version") if "schema_version" in self.tables() else []
        return rows[0][0] if rows else 0

    # --- `Database`

    def query(self, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        with self._errors(), self._connection() as conn:
            self.round_trips += 1
            return conn.execute(self._dialect(sql), args).fetchall()

    @contextlib.contextmanager
    def transaction(self, *, needs_sync: bool = True) -> Iterator[Writer]:
        with self._errors(), self._connection() as conn:
            self.round_trips += 2  # BEGIN and COMMIT
            with conn.transaction(), conn.cursor() as cursor:
                yield _PostgresWriter(self, cursor)

    def tables(self) -> set[str]:
        return {name for (name,) in self.query(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()")}

    def columns(self, table: str) -> set[str]:
        if table not in self._columns:
            self._columns[table] = {name for (name,) in self.query(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
                "AND table_name = ?", (table,))}
        return self._columns[table]

    def make_durable(self) -> None:
        """Nothing to do: every commit was flushed to the server's disk before it returned."""

    def close(self) -> None:
        with self._pool_lock:
            connections, self._open_connections, self._idle = self._open_connections, set(), []
        for conn in connections:
            with contextlib.suppress(Exception):
                conn.close()


class _PostgresWriter:
    def __init__(self, database: PostgresDatabase, cursor: psycopg.Cursor[Any]) -> None:
        self._database = database
        self._cursor = cursor

    def execute(self, sql: str, args: Sequence[object] = ()) -> int:
        self._database.round_trips += 1
        self._cursor.execute(self._database._dialect(sql), args)
        return max(self._cursor.rowcount, 0)

    def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> int:
        rows = list(rows)
        if not rows:
            return 0
        self._database.round_trips += 1  # pipelined: one round trip for the batch
        self._cursor.executemany(self._database._dialect(sql), rows)
        return max(self._cursor.rowcount, 0)

    def query(self, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        self._database.round_trips += 1
        self._cursor.execute(self._database._dialect(sql), args)
        return self._cursor.fetchall()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# --- workers and leases


class Role(enum.StrEnum):
    DAEMON = "daemon"  # postbote run
    POLL = "poll"  # postbote poll, once


@dataclass(frozen=True)
class Holder:
    """Who holds an account's lease, and until when (the database's clock)."""

    worker: str
    until: float


def new_worker_id() -> str:
    """``HOST:PID:RANDOM``: readable in ``status``, and never the id of an earlier process with the same pid."""
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"


class LeaseBoard:
    """One worker's view of ``account_leases`` and ``workers``: claim due accounts, renew, release."""

    def __init__(self, database: PostgresDatabase, *, lease: float, worker: str | None = None,
                 role: Role = Role.DAEMON) -> None:
        self.database = database
        self.lease = lease
        self.worker = worker or new_worker_id()
        self.role = role

    def join(self) -> None:
        """Enter this worker in ``workers`` (its heartbeat is renewed with its leases)."""
        with self.database.transaction(needs_sync=False) as tx:
            tx.execute(f"INSERT INTO workers (id, host, pid, role, started, heartbeat) VALUES (?, ?, ?, ?, {NOW}, "
                       f"{NOW})", (self.worker, socket.gethostname(), os.getpid(), self.role))

    def leave(self, keeping: Iterable[str] = ()) -> None:
        """Release every lease still held but those of ``keeping`` (another worker may take the accounts at once)
        and leave ``workers``."""
        with self.database.transaction(needs_sync=False) as tx:
            tx.execute("UPDATE account_leases SET lease_worker = NULL, lease_until = NULL WHERE lease_worker = ? "
                       "AND NOT account = ANY(?)", (self.worker, sorted(set(keeping))))
            tx.execute("DELETE FROM workers WHERE id = ?", (self.worker,))

    def add_accounts(self, first_due_in: Mapping[str, float]) -> None:
        """Make rows for accounts the table lacks, due after the given seconds; known accounts keep theirs (other
        workers may be polling them)."""
        if not first_due_in:
            return
        with self.database.transaction(needs_sync=False) as tx:  # one statement for 100,000 accounts too
            tx.execute(f"INSERT INTO account_leases (account, next_due) SELECT account, {NOW} + delay "
                       "FROM unnest(?::text[], ?::double precision[]) AS given (account, delay) "
                       "ON CONFLICT (account) DO NOTHING", (list(first_due_in), list(first_due_in.values())))

    def claim(self, limit: int) -> list[str]:
        """Up to ``limit`` due accounts that no live lease holds, soonest due first, now leased to this worker.
        Rows another claimer has locked are skipped, not waited for: two claimers never get the same account."""
        if limit <= 0:
            return []
        with self.database.transaction(needs_sync=False) as tx:
            rows = tx.query(
                f"WITH due AS (SELECT account, next_due FROM account_leases WHERE next_due <= {NOW} "
                f"AND (lease_until IS NULL OR lease_until < {NOW}) ORDER BY next_due LIMIT ? "
                f"FOR UPDATE SKIP LOCKED) "
                f"UPDATE account_leases AS l SET lease_worker = ?, lease_until = {NOW} + ? FROM due "
                f"WHERE l.account = due.account RETURNING l.account, due.next_due", (limit, self.worker, self.lease))
        return [name for name, _due in sorted(rows, key=lambda row: (row[1], row[0]))]

    def claim_now(self, account: str) -> Holder | None:
        """Lease ``account`` whether due or not (``postbote poll``): None when it is ours now, else who holds it."""
        with self.database.transaction(needs_sync=False) as tx:
            tx.execute(f"INSERT INTO account_leases (account, next_due) VALUES (?, {NOW}) "
                       "ON CONFLICT (account) DO NOTHING", (account,))
            taken = tx.execute(
                f"UPDATE account_leases SET lease_worker = ?, lease_until = {NOW} + ? WHERE account = ? "
                f"AND (lease_until IS NULL OR lease_until < {NOW} OR lease_worker = ?)",
                (self.worker, self.lease, account, self.worker))
            if taken:
                return None
            rows = tx.query("SELECT lease_worker, lease_until FROM account_leases WHERE account = ?", (account,))
        return Holder(rows[0][0], rows[0][1]) if rows else Holder("", 0.0)

    def renew(self, accounts: Iterable[str]) -> set[str]:
        """Extend this worker's leases on ``accounts`` and its heartbeat; returns the accounts whose lease it no
        longer held (run out and taken by another worker: that one may be polling them too)."""
        wanted = sorted(set(accounts))
        with self.database.transaction(needs_sync=False) as tx:
            tx.execute(f"UPDATE workers SET heartbeat = {NOW} WHERE id = ?", (self.worker,))
            if not wanted:
                return set()
            rows = tx.query(f"UPDATE account_leases SET lease_until = {NOW} + ? WHERE lease_worker = ? "
                            f"AND account = ANY(?) RETURNING account", (self.lease, self.worker, wanted))
        return set(wanted) - {name for (name,) in rows}

    def release(self, next_due_in: Mapping[str, float], *, polls: int = 0, failures: int = 0) -> None:
        """Give up the leases on these accounts, each due again after the given seconds, and count this worker's
        finished polls; a lease this worker no longer holds is left alone."""
        if not next_due_in and not polls:
            return
        with self.database.transaction(needs_sync=False) as tx:
            if next_due_in:
                tx.execute(f"UPDATE account_leases AS l SET next_due = {NOW} + given.delay, lease_worker = NULL, "
                           "lease_until = NULL FROM unnest(?::text[], ?::double precision[]) AS given (account, delay) "
                           "WHERE l.account = given.account AND l.lease_worker = ?",
                           (list(next_due_in), [max(0.0, delay) for delay in next_due_in.values()], self.worker))
            if polls:
                tx.execute("UPDATE workers SET polls = polls + ?, failures = failures + ? WHERE id = ?",
                           (polls, failures, self.worker))

    def make_due(self, accounts: Iterable[str]) -> None:
        """Have these accounts polled as soon as some worker is free (``postbote poll`` beside the daemons, new
        mail pushed)."""
        wanted = sorted(set(accounts))
        if wanted:
            with self.database.transaction(needs_sync=False) as tx:
                tx.execute(f"UPDATE account_leases SET next_due = {NOW} WHERE account = ANY(?)", (wanted,))

    def now(self) -> float:
        return float(self.database.query(f"SELECT {NOW}")[0][0])


def holders(database: PostgresDatabase) -> dict[str, Holder]:
    """Every account whose lease is live now, and its holder."""
    return {account: Holder(worker, until) for account, worker, until in database.query(
        f"SELECT account, lease_worker, lease_until FROM account_leases WHERE lease_until >= {NOW}")}


def workers(database: PostgresDatabase) -> list[WorkerFigures]:
    """The workers in ``workers``, oldest first, with how many accounts each holds now."""
    rows = database.query(
        "SELECT w.id, w.host, w.pid, w.role, w.started, w.heartbeat, w.polls, w.failures, "
        f"(SELECT count(*) FROM account_leases l WHERE l.lease_worker = w.id AND l.lease_until >= {NOW}) "
        "FROM workers w ORDER BY w.started, w.id")
    return [WorkerFigures(*row) for row in rows]


class LeaseKeeper:
    """A thread renewing a worker's leases (and heartbeat) every third of the lease, so that a poll longer than the
    lease keeps its account: only a worker that stopped (killed, frozen, cut off from the database) loses them."""

    def __init__(self, board: LeaseBoard) -> None:
        self.board = board
        self._held: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
        self.lost: set[str] = set()  # leases found taken by another worker (logged when found)

    def start(self) -> None:
        self._thread.start()

    def hold(self, accounts: Iterable[str]) -> None:
        with self._lock:
            self._held.update(accounts)

    def drop(self, accounts: Iterable[str]) -> None:
        with self._lock:
            self._held.difference_update(accounts)

    def held(self) -> set[str]:
        with self._lock:
            return set(self._held)

    def renew_now(self) -> None:
        try:
            lost = self.board.renew(self.held())
        except StateError as exc:
            log.warning("lease.not_renewed", worker=self.board.worker, error=str(exc),
                        effect="renewed on the next beat; the leases run out if the database stays away")
            return
        if lost - self.lost:
            log.error("lease.lost", worker=self.board.worker, accounts=sorted(lost - self.lost),
                      cause="this worker did not renew its leases in time (stopped or cut off from the database)",
                      effect="another worker may poll these accounts too; nothing is lost, a message may be "
                             "delivered twice")
        self.lost |= lost

    @contextlib.contextmanager
    def leased(self, account: str, next_due_in: float) -> Iterator[Holder | None]:
        """The lease on ``account`` for the block, due or not (``postbote poll``), then released with the account
        due again after ``next_due_in`` seconds. Yields None when the lease is ours, else who holds it (the block
        must then leave the account alone)."""
        holder = self.board.claim_now(account)
        if holder is not None:
            yield holder
            return
        self.hold([account])
        try:
            yield None
        finally:
            self.drop([account])
            self.board.release({account: next_due_in})

    def _run(self) -> None:
        while not self._stop.wait(self.board.lease / 3):
            self.renew_now()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=CONNECT_TIMEOUT + 5)


@contextlib.contextmanager
def one_shot_worker(database: Database, lease: float) -> Iterator[LeaseKeeper]:
    """A worker for ``postbote poll``: entered in ``workers`` and renewing its leases until the block ends."""
    if not isinstance(database, PostgresDatabase):
        raise TypeError("leases live in a shared state store (PostgreSQL)")
    board = LeaseBoard(database, lease=lease, role=Role.POLL)
    board.join()
    keeper = LeaseKeeper(board)
    keeper.start()
    try:
        yield keeper
    finally:
        keeper.stop()
        with contextlib.suppress(StateError):
            board.leave()
