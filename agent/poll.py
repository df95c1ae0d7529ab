"""The per-poll object plugins see (`Poll`) and the counts a poll ends with (`PollStats`).

A `Poll` lives from the moment an account's poll starts until it ends: the source plugin opens the mailbox with it
(``open_mailbox``), and delivery plugins keep one connection per destination for all of the poll's messages in it
(`Poll.resource`), closed when the poll ends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from postbote.logconfig import get_logger

if TYPE_CHECKING:
    from postbote.config import Account

log = get_logger("postbote.poll")


@dataclass
class PollStats:
    account: str
    listed: int = 0
    delivered: int = 0
    dropped: int = 0
    deferred: int = 0
    rejected: int = 0
    deleted: int = 0
    left: int = 0
    bytes: int = 0
    duration: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def counts(self) -> dict[str, int]:
        return {"listed": self.listed, "delivered": self.delivered, "dropped": self.dropped,
                "deferred": self.deferred, "rejected": self.rejected, "deleted": self.deleted, "left": self.left,
                "bytes": self.bytes}


class Poll:
    """One poll of one account, as plugins see it: the account, the state directory, the session's deadline and
    the resources shared by its messages."""

    def __init__(self, account: Account, *, state_dir: Path, deadline: float | None = None) -> None:
        self.account = account
        self.state_dir = state_dir
        self.deadline = deadline  # time.monotonic() by which the source must have logged in (the mailbox's own
        # deadline, which the poller moves once it knows how much mail there is, bounds the rest of the session)
        self._resources: dict[Any, tuple[Any, Callable[[Any], None]]] = {}

    def resource(self, key: Any, opener: Callable[[], Any], *, usable: Callable[[Any], bool] = lambda _: True,
                 close: Callable[[Any], None] = lambda r: r.close()) -> Any:
        """The resource stored under ``key``, opened with ``opener`` on first use or when it is no longer usable."""
        held = self._resources.get(key)
        if held is not None and usable(held[0]):
            return held[0]
        if held is not None:
            self._close_one(key)
        resource = opener()
        self._resources[key] = (resource, close)
        return resource

    def _close_one(self, key: Any) -> None:
        resource, close = self._resources.pop(key)
        try:
            close(resource)
        except Exception as exc:  # noqa: BLE001 - closing must never turn a good poll into a failed one
            log.warning("resource.close_failed", resource=str(key), error=str(exc))

    def close(self) -> None:
        for key in reversed(list(self._resources)):
            self._close_one(key)
