"""What waits on a server: an account's deferred and rejected messages, and how long they have waited.

Shared by ``postbote status`` (`postbote.cli.status`), the daemon's stale-mail warnings (`postbote.daemon`) and
the metrics plugin. An account is *stale* when a message has waited longer than its ``stale_after``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from postbote.state import Status, WaitingMessage

if TYPE_CHECKING:
    from postbote.config import Account
    from postbote.state import StateStore


@dataclass(frozen=True)
class WaitingSummary:
    """How many messages of one account wait, and how many of them longer than ``stale_after``."""

    deferred: int = 0
    rejected: int = 0
    stale: int = 0
    oldest: float | None = None  # when the longest-waiting message first failed

    @property
    def total(self) -> int:
        return self.deferred + self.rejected

    @classmethod
    def of(cls, messages: Iterable[WaitingMessage], *, now: float, stale_after: float) -> WaitingSummary:
        messages = list(messages)
        statuses = [message.status for message in messages]
        return cls(deferred=statuses.count(Status.DEFERRED), rejected=statuses.count(Status.REJECTED),
                   stale=sum(1 for message in messages if now - message.since > stale_after),
                   oldest=min((message.since for message in messages), default=None))

    def describe(self) -> str:
        """``2 deferred, 1 rejected (2 stale)``, or ``nothing waiting``."""
        if not self.total:
            return "nothing waiting"
        parts = [f"{count} {state}" for count, state in ((self.deferred, "deferred"), (self.rejected, "rejected"))
                 if count]
        stale = f" ({self.stale} stale)" if self.stale else ""
        return ", ".join(parts) + stale


def stale_after(account: Account) -> float:
    """Seconds a message may wait before its account is called stale (``stale_after``, one hour by default)."""
    return float(account.stale_after)


def waiting_messages(store: StateStore, account: str) -> list[WaitingMessage]:
    """The account's deferred and rejected messages, longest waiting first."""
    return sorted(store.waiting(account), key=lambda message: (message.since, message.uid))


def human_duration(seconds: float) -> str:
    """``45s``, ``5m``, ``1h30m``, ``2d3h``: how ``check``, ``status`` and the status line show a duration."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        amount, seconds = divmod(seconds, size)
        if amount:
            parts.append(f"{amount}{unit}")
    return "".join(parts[:2])
