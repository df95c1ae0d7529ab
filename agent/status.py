"""``postbote status``: what each account's last poll did, when the next one is due, and the last error.

Everything comes from the state store, opened read-only (so it works while the daemon runs, and run as root it
creates no file the service user could not open afterwards), and from the lock file, which names a running
daemon. Nothing here talks to a mail server.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from agent.config import Account, Config
from agent.errors import StateError
from agent.state import PollRecord, StateStore, read_lock_holder

EXIT_OK, EXIT_FAILED = 0, 1
SHOWN_COUNTS = ("delivered", "dropped", "rejected", "left")


@dataclass(frozen=True)
class AccountStatus:
    name: str
    server: str
    poll_interval: float
    outcome: str  # "ok" | "failed" | "never polled"
    last_poll: float | None = None
    duration: float | None = None
    counts: dict[str, int] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    last_success: float | None = None
    failure_streak: int = 0
    next_poll: float | None = None


@dataclass(frozen=True)
class ServiceStatus:
    config: Path
    state_dir: Path
    daemon_pid: int | None
    accounts: list[AccountStatus]

    @property
    def exit_status(self) -> int:
        return EXIT_FAILED if any(account.outcome == "failed" for account in self.accounts) else EXIT_OK


def collect(config: Config) -> ServiceStatus:
    if config.state_dir.is_dir() and not os.access(config.state_dir, os.R_OK | os.X_OK):
        raise StateError(f"cannot read the state directory {config.state_dir}: permission denied; run this as the "
                         f"user postbote runs as (e.g. sudo -u postbote postbote status)")
    holder = read_lock_holder(config.state_dir)
    daemon_pid = holder.pid if holder is not None and holder.role == "daemon" and holder.alive() else None
    records: dict[str, tuple[PollRecord | None, float | None]] = {}
    if StateStore.exists(config.state_dir):
        store = StateStore(config.state_dir, readonly=True)
        try:
            records = {a.name: (store.last_poll(a.name), store.next_poll(a.name)) for a in config.accounts}
        finally:
            store.close()
    accounts = [_account_status(a, *records.get(a.name, (None, None)), daemon_running=daemon_pid is not None)
                for a in config.accounts]
    return ServiceStatus(config.path, config.state_dir, daemon_pid, accounts)


def _account_status(account: Account, record: PollRecord | None, next_poll: float | None, *,
                    daemon_running: bool) -> AccountStatus:
    never = AccountStatus(name=account.name, server=f"{account.username}@{account.host}:{account.port}",
                          poll_interval=account.poll_interval, outcome="never polled",
                          next_poll=next_poll if daemon_running else None)
    if record is None:
        return never
    return replace(never, outcome="ok" if record.ok else "failed", last_poll=record.finished,
                   duration=record.duration, counts=dict(record.counts), totals=dict(record.totals),
                   error=record.error, last_success=record.last_success, failure_streak=record.failure_streak)


def show_status(config: Config, *, as_json: bool = False, out: TextIO | None = None,
                now: float | None = None) -> int:
    status = collect(config)
    out = out or sys.stdout
    if as_json:
        json.dump(to_json(status), out, indent=2)
        out.write("\n")
    else:
        out.write(render(status, time.time() if now is None else now))
    return status.exit_status


def to_json(status: ServiceStatus) -> dict[str, Any]:
    """Times as ISO 8601 UTC strings (null when unknown); counts as in the state store."""
    accounts = []
    for account in status.accounts:
        entry = asdict(account)
        for key in ("last_poll", "last_success", "next_poll"):
            entry[key] = _iso(entry[key])
        accounts.append(entry)
    return {"config": str(status.config), "state_dir": str(status.state_dir),
            "daemon": {"running": status.daemon_pid is not None, "pid": status.daemon_pid},
            "accounts": accounts}


def render(status: ServiceStatus, now: float) -> str:
    daemon = f"running (pid {status.daemon_pid})" if status.daemon_pid else "not running"
    lines = [f"daemon: {daemon}; config {status.config}; state {status.state_dir}"]
    width = max((len(a.name) for a in status.accounts), default=0)
    for account in status.accounts:
        lines.extend(_account_lines(account, now, width, daemon_running=status.daemon_pid is not None))
    return "\n".join(lines) + "\n"


def _account_lines(account: AccountStatus, now: float, width: int, *, daemon_running: bool) -> list[str]:
    indent = " " * (width + 2)
    head = f"{account.name:<{width}}  "
    if account.last_poll is None:
        lines = [f"{head}never polled ({account.server})"]
    else:
        counts = ", ".join(f"{account.counts.get(key, 0)} {_count_label(key)}" for key in SHOWN_COUNTS)
        lines = [f"{head}{account.outcome.upper() if account.outcome == 'failed' else account.outcome}, "
                 f"last poll {_when(account.last_poll, now)}, took {account.duration:g} s: {counts}"]
        if account.outcome == "failed":
            success = _when(account.last_success, now) if account.last_success else "never"
            lines.append(f"{indent}error: {account.error}")
            lines.append(f"{indent}{account.failure_streak} failed poll(s) in a row; last success {success}")
        totals = ", ".join(f"{account.totals.get(key, 0)} {key}" for key in ("delivered", "dropped", "bytes"))
        lines.append(f"{indent}in all: {totals}")
    if account.next_poll is not None:
        lines.append(f"{indent}next poll {_when(account.next_poll, now)}")
    elif not daemon_running:
        lines.append(f"{indent}next poll: when the daemon runs (every {_duration(account.poll_interval)})")
    return lines


def _count_label(key: str) -> str:
    return "left on the server" if key == "left" else key


def _when(timestamp: float, now: float) -> str:
    local = datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")
    delta = timestamp - now
    relative = f"in {_duration(delta)}" if delta >= 0.5 else f"{_duration(-delta)} ago" if delta <= -0.5 else "now"
    return f"{local} ({relative})"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        amount, seconds = divmod(seconds, size)
        if amount:
            parts.append(f"{amount}{unit}")
    return "".join(parts[:2])


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, tz=UTC).isoformat(timespec="seconds")
