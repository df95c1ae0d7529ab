"""One poll of one account: open the mailbox, list, fetch and hand on each new message, delete what is safe.

The poller is the only sequencer; it speaks to the mail source only through the `postbote.Mailbox` seam (plan →
fetch → handle → commit → delete). The order of writes is the product's first promise. For every message: fetch,
run the pipeline, record the outcome in the state store (committed), and only then ask the mailbox to delete it.
Deletions take effect when the mailbox finishes (POP3: at QUIT); if the session ends any other way, the records stay
and the next poll deletes those messages without delivering them again.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from postbote.config import Account
from postbote.credentials import redact
from postbote.digest import header_block_digest
from postbote.durable import rename_all_durably, rename_durably, sync_filesystems
from postbote.errors import AccountError, DeliveryError, PluginError, PostboteError, StateError
from postbote.logconfig import bound, get_logger
from postbote.mailbox import Mailbox, MailboxEntry, NotFetched, TooLarge
from postbote.pluginmanager import AccountHooks, PluginManager
from postbote.poll import Poll, PollStats
from postbote.state import DEFERRED, DELIVERED, DROPPED, REJECTED, DeliveryKey, Outcome, Record, StateStore, Status

if TYPE_CHECKING:
    from postbote import handling
    from postbote.message import Message

log = get_logger("postbote.poll")
BATCH_SIZE = 64
# Answers a poll leaves outstanding at once when every destination still to answer can find a message it never
# answered (`postbote.Pending.confirmable`): a window of APPENDs on the wire instead of one round trip per message.
# Bounded in messages and in bytes, since each waiting message keeps its spool file.
PENDING_WINDOW = 16
PENDING_WINDOW_BYTES = 8 * 1024 * 1024
# The session's deadline when the account sets no poll_timeout: login and listing get a few `timeout`s, then each
# message adds time for its size at a slow link's rate and a little for its hand-over.
DEADLINE_TIMEOUTS = 4
DEADLINE_RATE = 64 * 1024  # octets per second
DEADLINE_PER_MESSAGE = 0.5  # seconds
OVERSIZED_DELETED = "larger than max_size: deleted unread (delete_oversized)"


@dataclass
class Handled:
    """A message the pipeline handled, waiting to be recorded (and then deleted) with its batch."""

    entry: MailboxEntry
    message: Message
    outcome: handling.Outcome
    header_digest: str


class Poller:
    def __init__(self, pm: PluginManager, store: StateStore, stop: threading.Event | None = None) -> None:
        self.pm = pm
        self.store = store
        self.stop = stop or threading.Event()

    def poll(self, account: Account) -> PollStats:
        stats = PollStats(account.name)
        started = time.monotonic()
        hooks = self.pm.hooks_for(account)
        with bound(account=account.name):
            hooks.notify("poll_started", account=account)
            poll = Poll(account, state_dir=self.store.state_dir, deadline=session_deadline(account, started, []))
            crashed = False
            try:
                self._session(account, stats, poll, hooks, started)
            except PostboteError as exc:
                stats.error = redact(str(exc))  # kept in the state store and shown by `status`
                log.error("account.failed", error=stats.error, error_type=type(exc).__name__)
                hooks.notify("account_error", account=account, error=exc)
            except Exception:
                crashed = True  # a bug: logged and recorded once, by the job's boundary (`jobs.poll_guarded`)
                raise
            finally:
                poll.close()
                stats.duration = round(time.monotonic() - started, 3)
                if not crashed:
                    counts = stats.counts()
                    log.log(40 if stats.error else 20, "poll.finished", ok=stats.ok, duration_s=stats.duration,
                            **counts)
                    self._remember(stats, counts, hooks)
                    hooks.notify("poll_finished", account=account, stats=stats)
        return stats

    def _remember(self, stats: PollStats, counts: dict[str, int], hooks: AccountHooks) -> None:
        """Record the poll; the daemon may hold the record a moment to write many together, unless a plugin
        watching ``poll_finished`` (the metrics) may read it right after."""
        try:
            self.store.record_poll(stats.account, ok=stats.ok, duration=stats.duration, counts=counts,
                                   error=stats.error, may_hold=not hooks.implemented("poll_finished"))
        except PostboteError as exc:
            log.error("state.poll_not_recorded", error=str(exc))

    def _session(self, account: Account, stats: PollStats, poll: Poll, hooks: AccountHooks, started: float) -> None:
        self._finish_interrupted_commits(account)
        mailbox = self._open(account, poll, hooks)
        session = AccountSession(self, account, mailbox, stats, poll, hooks)
        try:
            entries = mailbox.listing()
            stats.listed = len(entries)
            to_verify, to_fetch = self._plan(account, entries, stats, session)
            if account.poll_timeout is None:  # the header checks, and a fetch finding a reused UID, count too
                mailbox.deadline = session_deadline(account, started, to_fetch + [entry for entry, _ in to_verify])
            hooks.notify("messages_listed", account=account, count=len(to_fetch),
                         octets=sum(entry.size for entry in to_fetch))
            for entry in session.verified(to_verify, to_fetch):
                session.delete(entry)
                if entry.stays:
                    log.info("message.action_again", uid=entry.uid, reason="its action did not happen last time")
                else:
                    log.info("message.deleted", uid=entry.uid, reason=deletion_reason(account, entry, session))
            if to_fetch:  # most polls at scale find nothing new: no fetch loop is set up for them
                session.fetch(to_fetch)
            session.settle()
            self.store.make_durable()  # deletions take effect when the mailbox finishes: their records must be on disk
            deleted = mailbox.finish()
        except BaseException:
            session.settle_after_error()
            mailbox.abort()
            raise
        # The records stay until the UIDs are gone from the listing (`StateStore.note_listing`): a server that
        # answers +OK to QUIT but keeps the messages has them deleted again next poll, not delivered again.
        stats.deleted = sum(1 for entry in deleted if not entry.stays)

    @staticmethod
    def _open(account: Account, poll: Poll, hooks: AccountHooks) -> Mailbox:
        mailbox: Mailbox | None = hooks.call("open_mailbox", passing=(PostboteError,), account=account, poll=poll)
        if mailbox is None:
            raise AccountError(f"no plugin reads mail over {account.protocol!r} (is its plugin installed?)")
        return mailbox

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

    def _plan(self, account: Account, entries: Sequence[MailboxEntry], stats: PollStats,
              session: AccountSession) -> tuple[list[tuple[MailboxEntry, Record]], list[MailboxEntry]]:
        """Split the listing into messages handled before (to delete once their headers show they are the same
        messages) and messages to fetch; note the UIDs the listing lacks (`StateStore.note_listing`)."""
        records = self.store.records(account.name)
        now = time.time()
        if entries:  # the notes concern messages to fetch: an empty mailbox (most polls) needs no query
            session.partly_delivered.update(self.store.partly_delivered(account.name))
        self.store.note_listing(account.name, records, {entry.uid for entry in entries})
        duplicated = listed_twice(entries)
        to_verify: list[tuple[MailboxEntry, Record]] = []
        to_fetch: list[MailboxEntry] = []
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
            elif oversized_to_delete(account, entry, record):
                to_verify.append((entry, self._delete_oversized(account, entry, session)))
            elif record is not None and record.handled and (not (account.keep or entry.stays) or record.absent):
                to_verify.append((entry, record))  # a UID back after an absence is checked too, even with keep
            elif record is not None and record.handled and entry.stays and entry.action_due and not account.keep:
                to_verify.append((entry, record))  # handled, but its source's action did not happen: again
            elif record is not None and record.handled and kept_long_enough(account, record, now):
                session.expired.add(entry.uid)  # keep with delete_after: its time on the server is up
                to_verify.append((entry, record))
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

    def _reject_too_large(self, account: Account, entry: MailboxEntry, stats: PollStats) -> None:
        """A message over ``max_size`` stays on the server, reported as rejected (once): never spooled."""
        reason = (f"larger than max_size ({entry.size} > {account.max_size} octets): left on the server; to fetch "
                  f"it, raise max_size, then `postbote retry {account.name} {entry.uid}`")
        log.error("message.rejected", uid=entry.uid, size=entry.size, max_size=account.max_size, reason=reason)
        self.store.record(account.name, entry.uid, REJECTED, reason=reason, size=entry.size)
        stats.rejected += 1
        stats.left += 1

    def _delete_oversized(self, account: Account, entry: MailboxEntry, session: AccountSession) -> Record:
        """``delete_oversized``: a message reported as too large by an earlier poll (and so notified) is recorded as
        dropped and deleted unread, even with ``keep``."""
        reason = f"{OVERSIZED_DELETED} ({entry.size} > {account.max_size} octets)"
        log.warning("message.oversized_deleted", uid=entry.uid, size=entry.size, max_size=account.max_size)
        self.store.record(account.name, entry.uid, DROPPED, reason=reason, size=entry.size)
        session.expired.add(entry.uid)
        return Record(entry.uid, DROPPED, reason, entry.size)


@dataclass
class Unanswered:
    """The messages of a batch whose answers are still on their way, and whether the next hand-over must wait.

    One such message may always wait (its answer arrives while the source sends the next message): a crash then
    costs at most one copy. More may wait only while every one of them is `confirmable` (its destination can find
    it after a crash, so none costs a copy), up to `PENDING_WINDOW` messages and `PENDING_WINDOW_BYTES`."""

    count: int = 0
    size: int = 0
    confirmable: bool = True

    def add(self, handled: Handled) -> None:
        self.count += 1
        self.size += handled.message.size
        self.confirmable = self.confirmable and handled.outcome.confirmable

    def must_wait(self) -> bool:
        if self.count == 0:
            return False
        return not self.confirmable or self.count >= PENDING_WINDOW or self.size >= PENDING_WINDOW_BYTES


class AccountSession:
    """The fetch loop of one open mailbox: messages streamed in, handed on, committed in batches, then deleted.

    Per message: fetch, the pipeline (filters, backups, deliveries), then the message joins the batch. A batch is
    *settled* when a message's delivery is final on return (SMTP with several recipients, LMTP, MDA, mbox), when it
    is full, or at the end: files staged by deliveries are synced with one ``syncfs`` per filesystem, the outcomes
    and the staged renames are committed in one state transaction, the renames are done, and only then are the
    deletions asked for. A crash before the commit leaves the messages on the server and the files in ``tmp/``
    (never delivered); a crash after it is finished by `Poller._finish_interrupted_commits` from the journal: no
    loss, no duplicate.
    """

    def __init__(self, poller: Poller, account: Account, mailbox: Mailbox, stats: PollStats, poll: Poll,
                 hooks: AccountHooks) -> None:
        self.poller = poller
        self.store = poller.store
        self.account = account
        self.mailbox = mailbox
        self.stats = stats
        self.poll = poll
        self.hooks = hooks
        self.batch: list[Handled] = []
        self.unanswered = Unanswered()  # the messages of the batch whose answers are on their way
        self.partly_delivered: set[str] = set()  # UIDs some destinations already took in an earlier poll
        self.expired: set[str] = set()  # kept UIDs whose delete_after is up: deleted although the account keeps mail
        self._handler: handling.Handler | None = None

    @property
    def handler(self) -> handling.Handler:
        """Filters and deliveries, loaded only once the poll has a message to hand on."""
        if self._handler is None:
            from postbote.handling import Handler

            self._handler = Handler(self.hooks, self.store, self.account, self.poll, self.begin_delivery,
                                    self.partly_delivered)
        return self._handler

    def verified(self, handled: list[tuple[MailboxEntry, Record]],
                 to_fetch: list[MailboxEntry]) -> list[MailboxEntry]:
        """The listed messages recorded as handled that are still the messages recorded: their header block has
        the digest recorded at delivery. A UID the server gave to another message joins ``to_fetch``; one whose
        headers cannot be read (POP3 without TOP) stays on the server, undeleted."""
        same: list[MailboxEntry] = []
        for entry, record in handled:
            if record.header_digest is None:  # recorded by an earlier version: the size was checked
                same.append(entry)
                continue
            headers = self.mailbox.headers(entry)
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
                self.store.forget(self.account.name, [entry.uid])
                to_fetch.append(entry)
        return [entry for entry in same
                if entry.uid in self.expired or entry.action_due or not (self.account.keep or entry.stays)]

    def fetch(self, to_fetch: list[MailboxEntry]) -> None:
        fetched = self.mailbox.fetch(to_fetch, stop=self.poller.stop.is_set)
        remaining = len(to_fetch)
        for entry, item in fetched:
            remaining -= 1
            self.message(entry, item, more_coming=remaining > 0)

    def message(self, entry: MailboxEntry, item: Message | NotFetched | TooLarge, *, more_coming: bool) -> None:
        with bound(uid=entry.uid):
            if isinstance(item, TooLarge):
                self.store.record(self.account.name, entry.uid, REJECTED, reason=item.reason, size=entry.size)
                log.error("message.rejected", reason=item.reason, size=entry.size)
                raise AccountError(item.reason)
            if isinstance(item, NotFetched):
                self.stats.left += 1
                log.warning(item.event, reason=item.reason, **dict(item.facts))
                return
            message = item
            digest = header_block_digest(message.header_bytes)  # before any filter edits the headers
            self.stats.bytes += message.size
            # The previous message's answer has had this message's transfer to arrive: it is settled before this
            # message's first hand-over (`begin_delivery`), or right after this message is handled.
            handled = self.hand_on(entry, message, digest)
            if self.unanswered.must_wait():
                self.settle()
        if handled is None:
            message.discard()
            return
        self.batch.append(handled)
        if handled.outcome.pending:
            self.unanswered.add(handled)
            if len(self.batch) >= BATCH_SIZE:
                self.settle()
            return  # settled before a later message's first hand-over, or at the end of the poll
        if handled.outcome.durable_now or len(self.batch) >= BATCH_SIZE or not more_coming:
            self.settle()

    def hand_on(self, entry: MailboxEntry, message: Message, digest: str) -> Handled | None:
        try:
            outcome = self.handler.handle(message)
        except (DeliveryError, PluginError) as exc:
            self.failed(message, exc)
            return None
        return Handled(entry, message, outcome, digest)

    def failed(self, message: Message, error: DeliveryError | PluginError) -> None:
        """The one place a message's failure is counted, logged, recorded and announced."""
        temporary = not (isinstance(error, DeliveryError) and not error.temporary)
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
            self.store.record(self.account.name, message.uid, DEFERRED if temporary else REJECTED,
                              reason=reason, message_id=message.message_id, size=message.server_size,
                              in_doubt=isinstance(error, DeliveryError) and error.in_doubt)
        except StateError as exc:
            log.error("state.outcome_not_recorded", error=str(exc),
                      reason="the message stays on the server and is tried again")
        self.hooks.notify("message_failed", message=message, account=self.account, error=error, temporary=temporary)

    def begin_delivery(self, uid: str, key: DeliveryKey) -> None:
        """Commit the "in flight" note of the message about to be handed over; when the answers on their way must
        be waited for first (see `Unanswered`), settle them, their records and this note in one transaction."""
        if self.unanswered.must_wait() and self.settle(note=(uid, key)):
            return
        self.store.begin_delivery(self.account.name, uid, key)

    def settle(self, *, delete: bool = True, note: tuple[str, DeliveryKey] | None = None) -> bool:
        """Wait for pending answers, make the batch durable, record it in one transaction (with ``note``, the next
        message's "in flight" note, if given), finish staged renames, then ask for the deletions. Returns whether
        ``note`` was committed.

        A message whose answer is pending (an MTA's answer still on its way) is settled before the next message's
        first hand-over, so at most one message is ever delivered but not recorded: a crash costs one duplicate --
        unless its destination can find it later (see `Unanswered`)."""
        if not self.batch:
            return False
        self.unanswered = Unanswered()
        batch, self.batch = [h for h in self.batch if self.answered(h)], []
        if not batch:
            return False
        staged = [(h.message.uid, result) for h in batch for result in h.outcome.staged]
        try:
            sync_filesystems([result.source for _, result in staged])
        except OSError as exc:
            # The data may not have reached the disk: nothing of this batch counts as delivered, and the disk is
            # unlikely to do better for the next messages, so the poll stops here.
            self.abandon(batch)
            self.stats.deferred += len(batch)
            self.stats.left += len(batch)
            raise AccountError(f"writing delivered messages to disk failed: {exc.strerror or exc}; "
                               f"{len(batch)} message(s) stay on the server") from None
        try:
            self.store.record_batch(self.account.name, [self.record_of(h) for h in batch],
                                    renames=[(uid, result.source, result.target) for uid, result in staged],
                                    notes=[note] if note else [])
        except BaseException:
            self.abandon(batch)
            raise
        try:
            rename_all_durably((result.source, result.target) for _, result in staged)
        except OSError as exc:
            # Recorded but not yet in place: the journal keeps the renames for the next poll, and nothing is deleted.
            raise AccountError(f"delivered files could not be moved into place: {exc.strerror or exc}; "
                               "retried on the next poll, nothing is deleted on the server until then") from None
        self.store.clear_renames(self.account.name, [uid for uid, _ in staged])
        for handled in batch:
            self.report(handled)
            if delete:
                self.delete(handled.entry)
            handled.message.discard()
        return note is not None

    @staticmethod
    def abandon(batch: list[Handled]) -> None:
        for handled in batch:
            handled.outcome.discard_staged()
            handled.message.discard()

    def answered(self, handled: Handled) -> bool:
        """Wait for the message's pending answers; a refusal fails the message as if its delivery had raised."""
        message = handled.message
        try:
            handled.outcome.wait_for_answers()
        except (DeliveryError, PluginError) as exc:
            with bound(uid=message.uid):
                handled.outcome.discard_staged()
                self.failed(message, exc)
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
        reason = handled.outcome.reason or "; ".join(handled.outcome.answers)
        return Outcome(handled.message.uid, status, reason, handled.message.message_id, handled.entry.size,
                       handled.header_digest)

    def report(self, handled: Handled) -> None:
        message = handled.message
        with bound(uid=message.uid):
            facts = {"size": message.size, "message_id": message.message_id}
            if handled.outcome.dropped:
                self.stats.dropped += 1
                log.info("message.dropped", reason=handled.outcome.reason, **facts)
                self.hooks.notify("message_dropped", message=message, account=self.account,
                                  reason=handled.outcome.reason)
            else:
                self.stats.delivered += 1
                answers = handled.outcome.answers
                log.info("message.delivered", destinations=answers, **facts)
                self.hooks.notify("message_delivered", message=message, account=self.account, destinations=answers)

    def delete(self, entry: MailboxEntry) -> None:
        if entry.uid in self.expired:
            self.mailbox.delete(entry)
            return
        if self.account.keep or entry.stays:
            self.stats.left += 1
            if self.account.keep:
                return
        self.mailbox.delete(entry)  # for an entry that stays: the source's own action (an IMAP \Seen flag)


def deletion_reason(account: Account, entry: MailboxEntry, session: AccountSession) -> str:
    if entry.uid not in session.expired:
        return "delivered in an earlier poll"
    if account.delete_oversized and account.max_size is not None and entry.size > account.max_size:
        return "larger than max_size, reported in an earlier poll (delete_oversized)"
    return "kept for delete_after since its delivery"


def oversized_to_delete(account: Account, entry: MailboxEntry, record: Record | None) -> bool:
    """Whether ``delete_oversized`` deletes this message now: over ``max_size`` and reported as rejected by an
    earlier poll (or recorded for deletion by one whose deletion did not happen)."""
    if not account.delete_oversized or account.max_size is None or entry.size <= account.max_size or record is None:
        return False
    return record.status == REJECTED or (record.status == DROPPED and record.reason.startswith(OVERSIZED_DELETED))


def kept_long_enough(account: Account, record: Record, now: float) -> bool:
    """Whether a message the account keeps has been on the server ``delete_after`` since its delivery."""
    if not account.keep or account.delete_after is None or record.updated is None:
        return False
    return now - record.updated >= account.delete_after


def listed_twice(entries: Sequence[MailboxEntry]) -> set[str]:
    """The UIDs a listing names more than once (a broken server); counted only when there are any."""
    if len({entry.uid for entry in entries}) == len(entries):
        return set()
    return {uid for uid, count in Counter(entry.uid for entry in entries).items() if count > 1}


def session_deadline(account: Account, started: float, to_fetch: Sequence[MailboxEntry]) -> float:
    """When the session must end, whatever the server does (a byte a second keeps every single read alive): the
    account's ``poll_timeout``, or a budget from ``timeout`` and the mail still to fetch."""
    if account.poll_timeout is not None:
        return started + account.poll_timeout
    octets = sum(entry.size for entry in to_fetch)
    return started + DEADLINE_TIMEOUTS * account.timeout + octets / DEADLINE_RATE + DEADLINE_PER_MESSAGE * len(to_fetch)
