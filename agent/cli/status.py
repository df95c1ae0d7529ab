"""``postbote status``: what each account's last poll did, when the next one is due, the last error, and the
messages waiting on the server (deferred, with the last reason, and rejected, with the reply `postbote retry` needs).

Exit status 1 when some account's last poll failed or some message waits, so ``postbote status || alert`` notices
mail that is not arriving. An account is *stale* when a message has waited longer than its ``stale_after``.

Everything comes from the state store, opened read-only (so it works while the daemon runs, and run as root it
creates no file the service user could not open afterwards), and from the lock file, which names a running
daemon. With a shared state (PostgreSQL) there is no lock file: the workers, their heartbeats and which of them
holds which account's lease come from the database. Nothing here talks to a mail server.
"""

from __future__ import annotations

import argparse
import enum
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from postbote.cli.startup import set_up
from postbote.config import DEFAULT_STALE_AFTER, Account, Config
from postbote.errors import StateError
from postbote.state import (
    PollRecord,
    StateStore,
    WaitingMessage,
    WorkerFigures,
    open_store,
    read_lock_holder,
    store_exists,
)
from postbote.status import WaitingSummary, human_duration, stale_after, waiting_messages

EXIT_OK, EXIT_FAILED = 0, 1
SHOWN_COUNTS = ("delivered", "dropped", "deferred", "rejected", "left")
MAX_WAITING_SHOWN = 20  # per account in the text output; --json lists every one


class Outcome(enum.StrEnum):
    """The outcome of an account's last poll."""

    OK = "ok"
    FAILED = "failed"
    NEVER_POLLED = "never polled"


@dataclass(frozen=True)
class AccountStatus:
    name: str
    server: str
    poll_interval: float
    outcome: Outcome
    last_poll: float | None = None
    duration: float | None = None
    counts: dict[str, int] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    last_success: float | None = None
    failure_streak: int = 0
    next_poll: float | None = None
    waiting: list[WaitingMessage] = field(default_factory=list)
    stale_after: float = DEFAULT_STALE_AFTER
    stale: bool = False
    held_by: str | None = None  # shared state: the worker whose lease on the account is live (polling it now)

    @property
    def needs_attention(self) -> bool:
        return self.outcome is Outcome.FAILED or bool(self.waiting)


@dataclass(frozen=True)
class WorkerStatus(WorkerFigures):
    """A worker sharing the accounts through a PostgreSQL state (``postbote run``, or a ``postbote poll``)."""

    alive: bool = False  # its heartbeat is younger than the lease: it renews its leases


@dataclass(frozen=True)
class ServiceStatus:
    config: Path
    state_dir: Path
    daemon_pid: int | None
    accounts: list[AccountStatus]
    state: str | None = None  # a shared state's database, password masked
    workers: list[WorkerStatus] = field(default_factory=list)

    @property
    def exit_status(self) -> int:
        return EXIT_FAILED if any(account.needs_attention for account in self.accounts) else EXIT_OK


@dataclass(frozen=True)
class _Stored:
    """What the state store knows of one account."""

    last_poll: PollRecord | None = None
    next_poll: float | None = None
    waiting: Sequence[WaitingMessage] = ()
    held_by: str | None = None


def collect(config: Config, now: float | None = None) -> ServiceStatus:
    now = time.time() if now is None else now
    if config.state is not None:
        return _collect_shared(config, now)
    _check_readable(config.state_dir)
    holder = read_lock_holder(config.state_dir)
    daemon_pid = holder.pid if holder is not None and holder.role == "daemon" and holder.alive() else None
    stored: dict[str, _Stored] = {}
    if store_exists(config):
        store = open_store(config, readonly=True)
        try:
            stored = _read_accounts(store, config)
        finally:
            store.close()
    accounts = [_account_status(a, stored.get(a.name, _Stored()), now, daemon_running=daemon_pid is not None)
                for a in config.accounts]
    return ServiceStatus(config.path, config.state_dir, daemon_pid, accounts)


def _read_accounts(store: StateStore, config: Config) -> dict[str, _Stored]:
    return {a.name: _Stored(store.last_poll(a.name), store.next_poll(a.name), waiting_messages(store, a.name))
            for a in config.accounts}


def _collect_shared(config: Config, now: float) -> ServiceStatus:
    """`collect` from a shared state: the accounts as on SQLite, plus the workers and which one holds what."""
    from postbote.state_postgres import PostgresDatabase, holders, workers

    store = open_store(config, readonly=True)
    try:
        database = store.database
        assert isinstance(database, PostgresDatabase)
        stored = _read_accounts(store, config)
        leases = "workers" in database.tables()  # else no worker has opened this database yet
        held = holders(database) if leases else {}
        rows = workers(database) if leases else []
    finally:
        store.close()
    found = [WorkerStatus(**asdict(row), alive=now - row.heartbeat < config.worker_lease) for row in rows]
    running = any(worker.alive for worker in found)
    accounts = [_account_status(a, replace(stored.get(a.name, _Stored()),
                                           held_by=held[a.name].worker if a.name in held else None),
                                now, daemon_running=running) for a in config.accounts]
    return ServiceStatus(config.path, config.state_dir, None, accounts, state=str(config.state), workers=found)


def _check_readable(state_dir: Path) -> None:
    """A state directory this user cannot look into is said so, instead of being shown as "never polled"."""
    hint = "run this as the user postbote runs as (e.g. sudo -u postbote postbote status)"
    try:
        is_dir = state_dir.is_dir()
        state_dir.stat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StateError(f"cannot read the state directory {state_dir}: {exc.strerror or exc}; {hint}") from None
    if is_dir and not os.access(state_dir, os.R_OK | os.X_OK):
        raise StateError(f"cannot read the state directory {state_dir}: permission denied; {hint}")


def _account_status(account: Account, stored: _Stored, now: float, *, daemon_running: bool) -> AccountStatus:
    threshold = stale_after(account)
    summary = WaitingSummary.of(stored.waiting, now=now, stale_after=threshold)
    never = AccountStatus(name=account.name, server=account.source.server,
                          poll_interval=account.poll_interval, outcome=Outcome.NEVER_POLLED,
                          next_poll=stored.next_poll if daemon_running else None, waiting=list(stored.waiting),
                          stale_after=threshold, stale=bool(summary.stale), held_by=stored.held_by)
    record = stored.last_poll
    if record is None:
        return never
    return replace(never, outcome=Outcome.OK if record.ok else Outcome.FAILED, last_poll=record.finished,
                   duration=record.duration, counts=dict(record.counts), totals=dict(record.totals),
                   error=record.error, last_success=record.last_success, failure_streak=record.failure_streak)


def run(args: argparse.Namespace) -> int:
    _pm, config = set_up(args)
    return show_status(config, as_json=args.json)


def show_status(config: Config, *, as_json: bool = False, out: TextIO | None = None,
                now: float | None = None) -> int:
    now = time.time() if now is None else now
    status = collect(config, now)
    out = out or sys.stdout
    if as_json:
        json.dump(to_json(status), out, indent=2)
        out.write("\n")
    else:
        out.write(render(status, now))
    return status.exit_status


def to_json(status: ServiceStatus) -> dict[str, Any]:
    """Times as ISO 8601 UTC strings (null when unknown); counts as in the state store; ``waiting`` lists every
    deferred and rejected message, longest waiting first."""
    accounts = []
    for account in status.accounts:
        entry = asdict(account)
        for key in ("last_poll", "last_success", "next_poll"):
            entry[key] = _iso(entry[key])
        for message in entry["waiting"]:
            message["since"] = _iso(message["since"])
        accounts.append(entry)
    shown: dict[str, Any] = {"config": str(status.config), "state_dir": str(status.state_dir),
                             "daemon": {"running": status.daemon_pid is not None, "pid": status.daemon_pid},
                             "accounts": accounts}
    if status.state is not None:
        shown["state"] = status.state
        shown["workers"] = [{**asdict(worker), "started": _iso(worker.started), "heartbeat": _iso(worker.heartbeat)}
                            for worker in status.workers]
    return shown


def render(status: ServiceStatus, now: float) -> str:
    if status.state is not None:
        lines = [f"state {status.state} (shared); config {status.config}", *_worker_lines(status.workers, now)]
        running = any(worker.alive for worker in status.workers)
    else:
        daemon = f"running (pid {status.daemon_pid})" if status.daemon_pid else "not running"
        lines = [f"daemon: {daemon}; config {status.config}; state {status.state_dir}"]
        running = status.daemon_pid is not None
    width = max((len(a.name) for a in status.accounts), default=0)
    for account in status.accounts:
        lines.extend(_account_lines(account, now, width, daemon_running=running))
    return "\n".join(lines) + "\n"


def _worker_lines(workers: list[WorkerStatus], now: float) -> list[str]:
    """One line per worker: who, since when, its last heartbeat, what it holds and has done."""
    if not workers:
        return ["workers: none running"]
    lines = [f"workers: {sum(worker.alive for worker in workers)} running"]
    for worker in workers:
        state = "" if worker.alive else " -- NOT RENEWING (stopped or cut off; its leases run out)"
        lines.append(f"  {worker.id} ({worker.role}, {worker.host} pid {worker.pid}): heartbeat "
                     f"{_when(worker.heartbeat, now)}, started {_when(worker.started, now)}, holds {worker.holding}, "
                     f"{worker.polls} poll(s), {worker.failures} failed{state}")
    return lines


def _account_lines(account: AccountStatus, now: float, width: int, *, daemon_running: bool) -> list[str]:
    indent = " " * (width + 2)
    head = f"{account.name:<{width}}  "
    if account.last_poll is None:
        lines = [f"{head}never polled ({account.server})"]
    else:
        counts = ", ".join(f"{account.counts.get(key, 0)} {_count_label(key)}" for key in SHOWN_COUNTS)
        lines = [f"{head}{_headline(account)}, "
                 f"last poll {_when(account.last_poll, now)}, took {account.duration:g} s: {counts}"]
        if account.outcome is Outcome.FAILED:
            success = _when(account.last_success, now) if account.last_success else "never"
            lines.append(f"{indent}error: {account.error}")
            lines.append(f"{indent}{account.failure_streak} failed poll(s) in a row; last success {success}")
    lines.extend(_waiting_lines(account, now, indent))
    if account.last_poll is not None:
        totals = ", ".join(f"{account.totals.get(key, 0)} {key}" for key in ("delivered", "dropped", "bytes"))
        lines.append(f"{indent}in all: {totals}")
    if account.held_by is not None:
        lines.append(f"{indent}being polled by worker {account.held_by}")
    elif account.next_poll is not None:
        lines.append(f"{indent}next poll {_when(account.next_poll, now)}")
    elif not daemon_running:
        lines.append(f"{indent}next poll: when the daemon runs (every {human_duration(account.poll_interval)})")
    return lines


def _headline(account: AccountStatus) -> str:
    """FAILED, STALE or WAITING in capitals, so that trouble stands out; plain "ok" when nothing needs a look."""
    if account.outcome is Outcome.FAILED:
        return "FAILED"
    if account.stale:
        return "STALE"
    if account.waiting:
        return "WAITING"
    return str(account.outcome)


def _waiting_lines(account: AccountStatus, now: float, indent: str) -> list[str]:
    """One line for what waits, then one per message (at most `MAX_WAITING_SHOWN`), longest waiting first."""
    if not account.waiting:
        return []
    summary = WaitingSummary.of(account.waiting, now=now, stale_after=account.stale_after)
    noun = "message" if summary.total == 1 else "messages"
    lines = [f"{indent}{summary.total} {noun} waiting on the server: {summary.describe()}"]
    if summary.stale and summary.oldest is not None:
        lines.append(f"{indent}STALE: mail has waited {human_duration(now - summary.oldest)}, longer than stale_after "
                     f"({human_duration(account.stale_after)})")
    if summary.rejected:
        lines.append(f"{indent}rejected messages are tried again after: postbote retry {account.name} [UID...]")
    for message in account.waiting[:MAX_WAITING_SHOWN]:
        attempts = f", {message.attempts} attempts" if message.attempts > 1 else ""
        lines.append(f"{indent}  {message.uid}  {message.status} since {_when(message.since, now)}{attempts}: "
                     f"{_one_line(message.reason)}")
    if len(account.waiting) > MAX_WAITING_SHOWN:
        lines.append(f"{indent}  ... and {len(account.waiting) - MAX_WAITING_SHOWN} more (postbote status --json "
                     f"lists every one)")
    return lines


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "(no reason recorded)"


def _count_label(key: str) -> str:
    return "left on the server" if key == "left" else key


def _when(timestamp: float, now: float) -> str:
    local = datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")
    delta = timestamp - now
    if delta >= 0.5:
        relative = f"in {human_duration(delta)}"
    else:
        relative = f"{human_duration(-delta)} ago" if delta <= -0.5 else "now"
    return f"{local} ({relative})"


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, tz=UTC).isoformat(timespec="seconds")
