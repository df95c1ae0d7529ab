"""One poll of one account: connect, log in, list, fetch and hand on each new message, delete what is safe, QUIT.

The order of writes is the product's first promise. For every message: RETR, run the pipeline, record the outcome
in the state store (committed), and only then send DELE. Deletions take effect at QUIT; if the session ends any
other way, the records stay and the next poll deletes those messages without delivering them again.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pluggy
import structlog
from postbote import pipeline
from postbote.config import Account
from postbote.credentials import redact
from postbote.digest import header_block_digest
from postbote.durable import fsync_file, rename_all_durably, rename_durably, sync_filesystems
from postbote.errors import AccountError, DeliveryError, PluginError, PostboteError, StateError
from postbote.login import AuthSettings, login
from postbote.message import Message
from postbote.pop3 import ListingEntry, MessageTooLarge, POP3Client, POP3ConnectionError, POP3Error
from postbote.state import DEFERRED, DELIVERED, DROPPED, REJECTED, Outcome, Record, StateStore, Status
from postbote.tls import TLSPolicy

log = structlog.get_logger("postbote.poll")
PIPELINE_WINDOW = 64  # RETRs in flight: enough to hide a 20 ms round trip behind small messages
BATCH_SIZE = 64
# The session's deadline when the account sets no poll_timeout: login and listing get a few `timeout`s, then each
# message adds time for its size at a slow link's rate and a little for its hand-over.
DEADLINE_TIMEOUTS = 4
DEADLINE_RATE = 64 * 1024  # octets per second
DEADLINE_PER_MESSAGE = 0.5  # seconds


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


class PollContext:
    """Per-poll resources shared by all messages of one poll (an SMTP session, say), closed when the poll ends."""

    def __init__(self, account: Account) -> None:
        self.account = account
        self.current_uid = ""
        self.staging = True  # whether the delivery in hand may stage its file (see `stage_rename`)
        self.partly_delivered: set[str] = set()  # UIDs some destinations already took in an earlier poll
        self._resources: dict[Any, tuple[Any, Callable[[Any], None]]] = {}
        self._staged: dict[str, list[tuple[str, str]]] = {}

    def stage_rename(self, source: str, target: str) -> None:
        """Defer making a written file visible: postbote syncs ``source`` with the rest of its batch, records the
        message, then renames ``source`` to ``target``. A delivery target that stages returns at once, without its
        own fsync; if the message fails later, ``source`` is removed.

        When the message has other destinations as well, each destination's success is recorded on its own as it
        happens, so the file is made durable and moved into place now (fsync, rename, fsync of the directory)."""
        if self.staging:
            self._staged.setdefault(self.current_uid, []).append((str(source), str(target)))
            return
        try:
            fsync_file(source)
            rename_durably(source, target)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(source)
            raise DeliveryError(f"{target}: {exc.strerror or exc}", temporary=True) from None

    def has_staged(self, uid: str) -> bool:
        return uid in self._staged

    def staged_count(self, uid: str) -> int:
        return len(self._staged.get(uid, ()))

    def take_staged(self, uids: list[str]) -> list[tuple[str, str, str]]:
        return [(uid, source, target) for uid in uids for source, target in self._staged.pop(uid, [])]

    def discard_staged(self, uid: str) -> None:
        self.discard([(uid, source, target) for source, target in self._staged.pop(uid, [])])

    @staticmethod
    def discard(staged: list[tuple[str, str, str]]) -> None:
        for _, source, _ in staged:
            with contextlib.suppress(OSError):
                os.unlink(source)

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
        for uid in list(self._staged):
            self.discard_staged(uid)


@dataclass
class Handled:
    """A message the pipeline handled, waiting to be recorded (and then deleted) with its batch."""

    entry: ListingEntry
    message: Message
    outcome: pipeline.Outcome
    header_digest: str

    @property
    def answers(self) -> list[str]:
        return [answer for answer in self.outcome.answers if isinstance(answer, str)]


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
            crashed = False
            try:
                self._session(account, stats, poll)
            except PostboteError as exc:
                stats.error = redact(str(exc))  # kept in the state store and shown by `status`
                log.error("account.failed", error=stats.error, error_type=type(exc).__name__)
                self._notify("account_error", account=account, error=exc)
            except Exception:
                crashed = True  # a bug: logged and recorded once, by the job's boundary (`jobs.poll_guarded`)
                raise
            finally:
                poll.close()
                stats.duration = round(time.monotonic() - started, 3)
                if not crashed:
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
        self._finish_interrupted_commits(account)
        started = time.monotonic()
        client = self._login(account, started)
        session = AccountSession(self, account, client, stats, poll)
        try:
            entries = client.listing()
            stats.listed = len(entries)
            to_verify, to_fetch = self._plan(account, entries, stats, poll)
            if account.poll_timeout is None:  # the TOP checks, and a fetch where one finds a reused UID, count too
                client.deadline = session_deadline(account, started, to_fetch + [entry for entry, _ in to_verify])
            self._notify("messages_listed", account=account, count=len(to_fetch),
                         octets=sum(entry.size for entry in to_fetch))
            for entry in session.verified(to_verify, to_fetch):
                session.delete(entry)
                log.info("message.deleted", uid=entry.uid, reason="delivered in an earlier poll")
            session.fetch(to_fetch)
            session.settle()
            self.store.make_durable()  # deletions take effect at QUIT: the records behind them must be on disk
            client.quit()
        except BaseException:
            session.settle_after_error()
            client.close()
            raise
        # The records stay until the UIDs are gone from the listing (`StateStore.note_listing`): a server that
        # answers +OK to QUIT but keeps the messages has them deleted again next poll, not delivered again.
        stats.deleted = len(session.confirmed_deletions())

    def _finish_interrupted_commits(self, account: Account) -> None:
        """Complete the file renames of a batch whose state was committed just before a crash (see `settle`)."""
        for uid, source, target in self.store.pending_renames(account.name):
            try:
                if not os.path.exists(target):
                    rename_durably(source, target)
            except FileNotFoundError:
                log.error("message.file_missing", uid=uid, file=source,
                          reason="recorded as delivered but the file is gone: it will be fetched again")
                self.store.forget(account.name, [uid])
            except OSError as exc:
                raise AccountError(f"cannot move {source} into place: {exc.strerror or exc}; nothing is deleted on "
                                   "the server until it can") from None
            self.store.clear_renames(account.name, [uid])

    def _login(self, account: Account, started: float) -> POP3Client:
        tls = TLSPolicy(verify=account.tls_verify, fingerprint=account.tls_fingerprint,
                        ca_file=str(account.tls_ca_file) if account.tls_ca_file else None)
        client = POP3Client.connect(account.host, account.port, implicit_tls=account.tls == "implicit", tls=tls,
                                    timeout=account.timeout, deadline=session_deadline(account, started, []))
        try:
            client.capa()
            if account.tls == "starttls":
                client.starttls(tls)
            login(client, AuthSettings.from_account(account, self.store.path.parent), log)
        except BaseException:
            client.close()
            raise
        return client

    def _plan(self, account: Account, entries: list[ListingEntry], stats: PollStats,
              poll: PollContext) -> tuple[list[tuple[ListingEntry, Record]], list[ListingEntry]]:
        """Split the listing into messages handled before (to delete once their headers show they are the same
        messages) and messages to fetch; note the UIDs the listing lacks (`StateStore.note_listing`)."""
        records = self.store.records(account.name)
        poll.partly_delivered = self.store.partly_delivered(account.name)
        self.store.note_listing(account.name, records, {entry.uid for entry in entries})
        duplicated = {uid for uid, count in Counter(e.uid for e in entries).items() if count > 1}
        to_verify: list[tuple[ListingEntry, Record]] = []
        to_fetch: list[ListingEntry] = []
        for entry in entries:
            record = records.get(entry.uid)
            if record is not None and record.handled and record.size is not None and record.size != entry.size:
                log.warning("message.uid_reused", uid=entry.uid, size=entry.size, recorded_size=record.size,
                            reason="this UID now names a message of another size: treated as a new message")
                self.store.forget(account.name, [entry.uid])
                record = None
            if entry.uid in duplicated:
                log.warning("message.skipped", uid=entry.uid, reason="the server lists this UID more than once")
                stats.left += 1
            elif record is not None and record.handled and (not account.keep or record.absent):
                to_verify.append((entry, record))  # a UID back after an absence is checked too, even with keep
            elif record is not None and (record.status == REJECTED or (record.handled and not account.fetch_all)):
                stats.left += 1
            elif account.max_size is not None and entry.size > account.max_size:
                self._reject_too_large(account, entry, stats)
            else:
                to_fetch.append(entry)
        if account.max_messages is not None and len(to_fetch) > account.max_messages:
            stats.left += len(to_fetch) - account.max_messages
            to_fetch = to_fetch[: account.max_messages]
        return to_verify, to_fetch

    def _reject_too_large(self, account: Account, entry: ListingEntry, stats: PollStats) -> None:
        """A message over ``max_size`` stays on the server, reported as rejected (once): never spooled."""
        reason = (f"larger than max_size ({entry.size} > {account.max_size} octets): left on the server; to fetch "
                  f"it, raise max_size, then `postbote retry {account.name} {entry.uid}`")
        log.error("message.rejected", uid=entry.uid, size=entry.size, max_size=account.max_size, reason=reason)
        self.store.record(account.name, entry.uid, REJECTED, reason=reason, size=entry.size)
        stats.rejected += 1
        stats.left += 1

    def _notify(self, hook_name: str, **kwargs: Any) -> None:
        """Tell the observers; an observer that raises is logged and never affects the mail."""
        for error in pipeline.call_all(getattr(self.pm.hook, hook_name), **kwargs):
            log.error("plugin.failed", plugin=error.plugin, hook=hook_name, error=str(error.error))


class AccountSession:
    """The fetch loop of one logged-in POP3 session: pipelined RETRs, batched commits, deferred DELE replies.

    Per message: RETR, the pipeline (filters, backups, deliveries), then the message joins the batch. A batch is
    *settled* when a message needs no deferred work (SMTP, LMTP, MDA: durable on return), when it is full, or at
    the end: files staged by deliveries are synced with one ``syncfs`` per filesystem, the outcomes and the staged
    renames are committed in one state transaction, the renames are done, and only then are the DELEs sent. A
    crash before the commit leaves the messages on the server and the files in ``tmp/`` (never delivered); a crash
    after it is finished by `Poller._finish_interrupted_commits` from the journal: no loss, no duplicate.
    """

    def __init__(self, poller: Poller, account: Account, client: POP3Client, stats: PollStats,
                 poll: PollContext) -> None:
        self.poller = poller
        self.account = account
        self.client = client
        self.stats = stats
        self.poll = poll
        self.batch: list[Handled] = []
        self.awaiting_answer = False  # a message in the batch has a deferred answer
        self.deletions: dict[int, str] = {}

    def verified(self, handled: list[tuple[ListingEntry, Record]], to_fetch: list[ListingEntry]) -> list[ListingEntry]:
        """The listed messages recorded as handled that are still the messages recorded: their header block
        (``TOP n 0``) has the digest recorded at delivery. A UID the server gave to another message joins
        ``to_fetch``; one whose headers cannot be read (no TOP) stays on the server, undeleted."""
        same: list[ListingEntry] = []
        for entry, record in handled:
            if record.header_digest is None:  # recorded by an earlier version: the size was checked
                same.append(entry)
                continue
            headers = self.client.top_headers(entry.number)
            if headers is None:
                log.warning("message.not_deleted", uid=entry.uid,
                            reason="delivered before, but the server cannot show its headers (TOP) to confirm it is "
                                   "the same message: left on the server")
                self.stats.left += 1
            elif header_block_digest(headers) == record.header_digest:
                same.append(entry)
            else:
                log.warning("message.uid_reused", uid=entry.uid,
                            reason="this UID now names a message with other headers: treated as a new message")
                self.poller.store.forget(self.account.name, [entry.uid])
                to_fetch.append(entry)
        return [] if self.account.keep else same

    def fetch(self, to_fetch: list[ListingEntry]) -> None:
        window = PIPELINE_WINDOW if self.client.pipelining else 1
        waiting, in_flight = deque(to_fetch), deque[ListingEntry]()
        while waiting or in_flight:
            while waiting and len(in_flight) < window and not self.poller.stop.is_set():
                entry = waiting.popleft()
                self.client.send_retrieve(entry.number, limit=retrieve_limit(entry, self.account))
                in_flight.append(entry)
            if self.poller.stop.is_set():
                log.info("poll.stopping", not_fetched=len(waiting) + len(in_flight))
                return  # messages already requested are read and discarded before QUIT
            self.message(in_flight.popleft(), more_coming=bool(waiting or in_flight))

    def message(self, entry: ListingEntry, *, more_coming: bool) -> None:
        message = Message(entry.uid, entry.size)
        with structlog.contextvars.bound_contextvars(uid=entry.uid):
            try:
                received = self.client.read_retrieved(message.write)
            except MessageTooLarge as exc:
                message.discard()
                self.poller.store.record(self.account.name, entry.uid, REJECTED, reason=str(exc), size=entry.size)
                log.error("message.rejected", reason=str(exc), size=entry.size)
                raise
            except POP3ConnectionError:
                message.discard()
                raise
            except OSError as exc:
                message.discard()
                raise AccountError(f"cannot spool the message to a temporary file: {exc.strerror or exc} "
                                   "(is the temporary directory full?)") from None
            except POP3Error as exc:
                # A -ERR to this RETR: the session is still in step, so only this message waits for the next poll.
                message.discard()
                self.stats.left += 1
                log.warning("message.not_retrieved", reason=str(exc), size=entry.size)
                return
            message.close_writing()
            digest = header_block_digest(message.header_bytes)  # before any filter edits the headers
            if looks_truncated(received, entry.size):
                message.discard()
                self.stats.left += 1
                log.warning("message.truncated", size=entry.size, received=received,
                            reason="the server sent far less than LIST announced; left on the server")
                return
            self.stats.bytes += message.size
            if self.awaiting_answer:
                self.settle()  # the previous message's answer has had this message's transfer to arrive
            handled = self.hand_on(entry, message, digest)
        if handled is None:
            message.discard()
            return
        self.batch.append(handled)
        if handled.outcome.deferred:
            self.awaiting_answer = True
            return  # settled before the next message is handed on, or at the end of the poll
        if handled.outcome.durable_elsewhere or len(self.batch) >= BATCH_SIZE or not more_coming:
            self.settle()

    def hand_on(self, entry: ListingEntry, message: Message, digest: str) -> Handled | None:
        self.poll.current_uid = message.uid
        try:
            outcome = pipeline.handle(self.poller.pm, self.poller.store, message, self.account, self.poll)
        except (DeliveryError, PluginError) as exc:
            self.poll.discard_staged(message.uid)
            self.failed(message, exc, temporary=not (isinstance(exc, DeliveryError) and not exc.temporary))
            return None
        return Handled(entry, message, outcome, digest)

    def failed(self, message: Message, error: PostboteError, *, temporary: bool) -> None:
        self.stats.left += 1
        reason = redact(str(error))  # a server may quote what it was sent
        facts: dict[str, Any] = {"size": message.size, "message_id": message.message_id}
        if isinstance(error, PluginError):
            facts["plugin"] = error.plugin
        if temporary:
            self.stats.deferred += 1
            log.warning("message.deferred", reason=reason, **facts)
        else:
            self.stats.rejected += 1
            log.error("message.rejected", reason=reason, **facts)
        try:
            self.poller.store.record(self.account.name, message.uid, DEFERRED if temporary else REJECTED,
                                     reason=reason, message_id=message.message_id, size=message.server_size)
        except StateError as exc:
            log.error("state.outcome_not_recorded", error=str(exc),
                      reason="the message stays on the server and is tried again")
        self.poller._notify("message_failed", message=message, account=self.account, error=error, temporary=temporary)

    def settle(self, *, delete: bool = True) -> None:
        """Confirm deferred answers, make the batch durable, record it in one transaction, finish staged renames,
        then send the DELEs.

        A message whose delivery was deferred (an MTA's answer still on its way) is settled before the next message
        is handed on, so at most one message is ever delivered but not recorded: a crash costs one duplicate."""
        if not self.batch:
            return
        self.awaiting_answer = False
        batch, self.batch = [h for h in self.batch if self.confirmed(h)], []
        if not batch:
            return
        staged = self.poll.take_staged([h.message.uid for h in batch])
        try:
            sync_filesystems([source for _, source, _ in staged])
        except OSError as exc:
            # The data may not have reached the disk: nothing of this batch counts as delivered, and the disk is
            # unlikely to do better for the next messages, so the poll stops here.
            self.poll.discard(staged)
            for handled in batch:
                handled.message.discard()
            self.stats.deferred += len(batch)
            self.stats.left += len(batch)
            raise AccountError(f"writing delivered messages to disk failed: {exc.strerror or exc}; "
                               f"{len(batch)} message(s) stay on the server") from None
        try:
            self.poller.store.record_batch(self.account.name, [self.record_of(h) for h in batch], renames=staged)
        except BaseException:
            self.poll.discard(staged)
            for handled in batch:
                handled.message.discard()
            raise
        try:
            rename_all_durably((source, target) for _, source, target in staged)
        except OSError as exc:
            # Recorded but not yet in place: the journal keeps the renames for the next poll, and no DELE is sent.
            raise AccountError(f"delivered files could not be moved into place: {exc.strerror or exc}; "
                               "retried on the next poll, nothing is deleted on the server until then") from None
        self.poller.store.clear_renames(self.account.name, [uid for uid, _, _ in staged])
        for handled in batch:
            self.report(handled)
            if delete:
                self.delete(handled.entry)
            handled.message.discard()

    def confirmed(self, handled: Handled) -> bool:
        """Wait for the message's deferred answers; a refusal fails the message as if its delivery had raised."""
        message = handled.message
        try:
            handled.outcome.answers = [pipeline.settled(answer) for answer in handled.outcome.answers]
        except (DeliveryError, PluginError) as exc:
            with structlog.contextvars.bound_contextvars(uid=message.uid):
                self.poll.discard_staged(message.uid)
                self.failed(message, exc, temporary=not (isinstance(exc, DeliveryError) and not exc.temporary))
            message.discard()
            return False
        return True

    def settle_after_error(self) -> None:
        """The session broke: still record what was fully handled (it is durable), but delete nothing."""
        try:
            self.settle(delete=False)
        except Exception as exc:  # noqa: BLE001 - the original error is the one to report
            log.error("batch.not_recorded", error=str(exc), reason="messages stay on the server")

    def record_of(self, handled: Handled) -> Outcome:
        status: Status = DROPPED if handled.outcome.dropped else DELIVERED
        reason = handled.outcome.reason or "; ".join(handled.answers)
        return Outcome(handled.message.uid, status, reason, handled.message.message_id, handled.entry.size,
                       handled.header_digest)

    def report(self, handled: Handled) -> None:
        message = handled.message
        with structlog.contextvars.bound_contextvars(uid=message.uid):
            facts = {"size": message.size, "message_id": message.message_id}
            if handled.outcome.dropped:
                self.stats.dropped += 1
                log.info("message.dropped", reason=handled.outcome.reason, **facts)
                self.poller._notify("message_dropped", message=message, account=self.account,
                                    reason=handled.outcome.reason)
            else:
                self.stats.delivered += 1
                log.info("message.delivered", destinations=handled.answers, **facts)
                self.poller._notify("message_delivered", message=message, account=self.account,
                                    destinations=handled.answers)

    def delete(self, entry: ListingEntry) -> None:
        if self.account.keep:
            self.stats.left += 1
            return
        self.client.delete(entry.number, wait=False)
        self.deletions[entry.number] = entry.uid

    def confirmed_deletions(self) -> list[str]:
        """UIDs whose DELE the server accepted and whose removal QUIT made final."""
        for number, reply in self.client.refused_deletions.items():
            log.warning("message.delete_refused", uid=self.deletions.get(number), reply=reply,
                        reason="recorded as handled; deletion is tried again next poll")
        return [uid for number, uid in self.deletions.items() if number not in self.client.refused_deletions]


def session_deadline(account: Account, started: float, to_fetch: list[ListingEntry]) -> float:
    """When the session must end, whatever the server does (a byte a second keeps every single read alive): the
    account's ``poll_timeout``, or a budget from ``timeout`` and the mail still to fetch."""
    if account.poll_timeout is not None:
        return started + account.poll_timeout
    octets = sum(entry.size for entry in to_fetch)
    return started + DEADLINE_TIMEOUTS * account.timeout + octets / DEADLINE_RATE + DEADLINE_PER_MESSAGE * len(to_fetch)


def looks_truncated(received: int, listed: int) -> bool:
    """Far less data than LIST announced is a cut transfer, not the message (small differences are line-ending
    counting: some servers announce LF sizes and send CRLF)."""
    return received < listed * 0.9 - 64


def retrieve_limit(entry: ListingEntry, account: Account) -> int:
    """The most data accepted for one message: a server sending far more than LIST said is not trusted."""
    generous = 2 * entry.size + (1 << 20)
    return min(generous, account.max_size) if account.max_size else generous
