"""One poll of one account: connect, log in, list, fetch and hand on each new message, delete what is safe, QUIT.

The order of writes is the product's first promise. For every message: RETR, run the pipeline, record the outcome
in the state store (committed), and only then send DELE. Deletions take effect at QUIT; if the session ends any
other way, the records stay and the next poll deletes those messages without delivering them again.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pluggy
import structlog

from agent import pipeline
from agent.config import Account
from agent.errors import DeliveryError, PluginError, PostboteError
from agent.message import Message
from agent.pop3 import ListingEntry, POP3Client
from agent.tls import TLSPolicy
from agent.state import DELIVERED, DROPPED, HANDLED, REJECTED, StateStore

log = structlog.get_logger("postbote.poll")


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
    deleted_uids: list[str] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    def counts(self) -> dict[str, int]:
        return {"listed": self.listed, "delivered": self.delivered, "dropped": self.dropped,
                "deferred": self.deferred, "rejected": self.rejected, "deleted": self.deleted, "left": self.left,
                "bytes": self.bytes}


class PollContext:
    """Per-poll resources shared by all messages of one poll (an SMTP session, say), closed when the poll ends."""

    def __init__(self, account: Account) -> None:
        self.account = account
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


class Poller:
    def __init__(self, pm: pluggy.PluginManager, store: StateStore, stop: threading.Event | None = None) -> None:
        self.pm = pm
        self.store = store
        self.stop = stop or threading.Event()

    def poll(self, account: Account) -> PollStats:
        stats = PollStats(account.name)
        started = time.monotonic()
        with structlog.contextvars.bound_contextvars(account=account.name):
            self._notify("poll_started", account=account)
            poll = PollContext(account)
            try:
                self._session(account, stats, poll)
            except PostboteError as exc:
                stats.error = str(exc)
                log.error("account.failed", error=stats.error, error_type=type(exc).__name__)
                self._notify("account_error", account=account, error=exc)
            finally:
                poll.close()
                stats.duration = round(time.monotonic() - started, 3)
                log.log(40 if stats.error else 20, "poll.finished", ok=stats.ok, duration_s=stats.duration,
                        **stats.counts())
                self._remember(stats)
                self._notify("poll_finished", account=account, stats=stats)
        return stats

    def _remember(self, stats: PollStats) -> None:
        try:
            self.store.record_poll(stats.account, ok=stats.ok, duration=stats.duration, counts=stats.counts(),
                                   error=stats.error)
        except PostboteError as exc:
            log.error("state.poll_not_recorded", error=str(exc))

    def _session(self, account: Account, stats: PollStats, poll: PollContext) -> None:
        client = self._login(account)
        try:
            entries = client.listing()
            stats.listed = len(entries)
            to_delete, to_fetch = self._plan(account, entries, stats)
            self._notify("messages_listed", account=account, count=len(to_fetch),
                         octets=sum(entry.size for entry in to_fetch))
            for entry in to_delete:
                client.delete(entry.number)
                stats.deleted_uids.append(entry.uid)
                log.info("message.deleted", uid=entry.uid, reason="delivered in an earlier poll")
            for entry in to_fetch:
                if self.stop.is_set():
                    log.info("poll.stopping", remaining=len(to_fetch) - (stats.delivered + stats.dropped))
                    break
                self._message(client, account, entry, stats, poll)
            client.quit()
        except BaseException:
            client.close()
            raise
        stats.deleted = len(stats.deleted_uids)
        self.store.forget(account.name, stats.deleted_uids)

    def _login(self, account: Account) -> POP3Client:
        tls = TLSPolicy(verify=account.tls_verify, fingerprint=account.tls_fingerprint,
                        ca_file=str(account.tls_ca_file) if account.tls_ca_file else None)
        password = account.password.resolve()
        client = POP3Client.connect(account.host, account.port, implicit_tls=account.tls == "implicit", tls=tls,
                                    timeout=account.timeout)
        try:
            client.capa()
            if account.tls == "starttls":
                client.starttls(tls)
            elif account.tls == "none" and account.auth != "apop":
                log.warning("login.cleartext", reason="tls: none: the password crosses the network unencrypted")
            if account.auth == "apop":
                client.login_apop(account.username, password)
            else:
                client.login_user(account.username, password)
        except BaseException:
            client.close()
            raise
        return client

    def _plan(self, account: Account, entries: list[ListingEntry],
              stats: PollStats) -> tuple[list[ListingEntry], list[ListingEntry]]:
        """Split the listing into messages to delete without delivery (handled before) and messages to fetch."""
        records = self.store.records(account.name)
        present = {entry.uid for entry in entries}
        self.store.forget(account.name, [uid for uid in records if uid not in present])
        duplicated = {uid for uid, count in Counter(e.uid for e in entries).items() if count > 1}
        to_delete: list[ListingEntry] = []
        to_fetch: list[ListingEntry] = []
        for entry in entries:
            record = records.get(entry.uid)
            if entry.uid in duplicated:
                log.warning("message.skipped", uid=entry.uid, reason="the server lists this UID more than once")
                stats.left += 1
            elif record is not None and record.status in HANDLED and not account.keep:
                to_delete.append(entry)
            elif record is not None and record.status == REJECTED:
                stats.left += 1
            elif record is not None and record.status in HANDLED and not account.fetch_all:
                stats.left += 1
            elif account.max_size is not None and entry.size > account.max_size:
                log.warning("message.too_large", uid=entry.uid, size=entry.size, max_size=account.max_size)
                stats.left += 1
            else:
                to_fetch.append(entry)
        if account.max_messages is not None and len(to_fetch) > account.max_messages:
            stats.left += len(to_fetch) - account.max_messages
            to_fetch = to_fetch[: account.max_messages]
        return to_delete, to_fetch

    def _message(self, client: POP3Client, account: Account, entry: ListingEntry, stats: PollStats,
                 poll: PollContext) -> None:
        message = Message(entry.uid, entry.size)
        try:
            with structlog.contextvars.bound_contextvars(uid=entry.uid):
                client.retrieve(entry.number, message.write, limit=account.max_size)
                message.close_writing()
                stats.bytes += message.size
                self._hand_on(client, account, entry, message, stats, poll)
        finally:
            message.discard()

    def _hand_on(self, client: POP3Client, account: Account, entry: ListingEntry, message: Message,
                 stats: PollStats, poll: PollContext) -> None:
        facts = {"size": message.size, "message_id": message.message_id}
        try:
            outcome = pipeline.handle(self.pm, self.store, message, account, poll)
        except DeliveryError as exc:
            self._failed(account, message, exc, stats, facts, temporary=exc.temporary)
            return
        except PluginError as exc:
            self._failed(account, message, exc, stats, {**facts, "plugin": exc.plugin}, temporary=True)
            return
        status = DROPPED if outcome.dropped else DELIVERED
        self.store.record(account.name, message.uid, status, reason=outcome.reason or "; ".join(outcome.answers),
                          message_id=message.message_id, size=message.size)
        if outcome.dropped:
            stats.dropped += 1
            log.info("message.dropped", reason=outcome.reason, **facts)
            self._notify("message_dropped", message=message, account=account, reason=outcome.reason)
        else:
            stats.delivered += 1
            log.info("message.delivered", destinations=outcome.answers, **facts)
            self._notify("message_delivered", message=message, account=account, destinations=outcome.answers)
        if account.keep:
            stats.left += 1
        else:
            client.delete(entry.number)
            stats.deleted_uids.append(message.uid)

    def _failed(self, account: Account, message: Message, error: PostboteError, stats: PollStats,
                facts: dict[str, Any], *, temporary: bool) -> None:
        stats.left += 1
        if temporary:
            stats.deferred += 1
            log.warning("message.deferred", reason=str(error), **facts)
        else:
            stats.rejected += 1
            self.store.record(account.name, message.uid, REJECTED, reason=str(error),
                              message_id=message.message_id, size=message.size)
            log.error("message.rejected", reason=str(error), **facts)
        self._notify("message_failed", message=message, account=account, error=error, temporary=temporary)

    def _notify(self, hook_name: str, **kwargs: Any) -> None:
        """Tell the observers; an observer that raises is logged and never affects the mail."""
        for error in pipeline.call_all(getattr(self.pm.hook, hook_name), **kwargs):
            log.error("plugin.failed", plugin=error.plugin, hook=hook_name, error=str(error.error))
