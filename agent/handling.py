"""What happens to one message between its fetch and its record: filters, backups, deliveries (the hooks, in order).

`handle` returns an `Outcome` or raises: `DeliveryError` when a destination refused or failed, `PluginError` when a
plugin raised. The caller (the poller) records the outcome and only then deletes; on an exception it does neither.
pluggy calls the implementations (through the account's subset of the hooks, without the plugins it turns off);
`postbote.pluginmanager` makes each failure name its plugin.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog
from postbote.delivery import Delivered, DeliveryResult, Pending, Staged, as_result, wait_for
from postbote.durable import fsync_file, rename_durably
from postbote.errors import DeliveryError, PluginError
from postbote.message import Message, Verdict
from postbote.state import UNCERTAIN_ATTEMPTS, Delivery, DeliveryKey, DeliveryState

if TYPE_CHECKING:
    from postbote.config import Account, Destination
    from postbote.pluginmanager import AccountHooks
    from postbote.poll import Poll
    from postbote.state import StateStore

log = structlog.get_logger("postbote.deliver")


@dataclass
class Outcome:
    """What the pipeline made of a message: dropped (with the filter's reason), or one result per destination."""

    dropped: bool = False
    reason: str = ""
    results: list[tuple[Destination, DeliveryResult]] = field(default_factory=list)

    @property
    def pending(self) -> bool:
        """Some destination's answer is still on its way."""
        return any(isinstance(result, Pending) for _, result in self.results)

    @property
    def staged(self) -> list[Staged]:
        return [result for _, result in self.results if isinstance(result, Staged)]

    @property
    def durable_now(self) -> bool:
        """Some destination took the message for good on return (an MTA, a program), so its record must not wait
        for a batch: a crash would deliver it again."""
        return any(isinstance(result, Delivered) for _, result in self.results)

    @property
    def answers(self) -> list[str]:
        return [result.answer for _, result in self.results if isinstance(result, Delivered | Staged)]

    def wait_for_answers(self) -> None:
        """Turn every `Pending` result into its answer; raises as the delivery would have."""
        self.results = [(destination, wait_for(result, destination.kind) if isinstance(result, Pending) else result)
                        for destination, result in self.results]

    def discard_staged(self) -> None:
        discard(self.staged)


def discard(staged: list[Staged]) -> None:
    for result in staged:
        with contextlib.suppress(OSError):
            os.unlink(result.source)


def handle(hooks: AccountHooks, store: StateStore, message: Message, account: Account, poll: Poll,
           partly_delivered: set[str]) -> Outcome:
    """Filters, backups, deliveries for one message. ``hooks`` is the account's view of the hooks
    (`PluginManager.hooks_for`); ``partly_delivered`` the UIDs with delivery notes from earlier attempts."""
    verdict = hooks.call("filter_message", message=message, account=account)
    if verdict is not None and not isinstance(verdict, Verdict):
        filters = ", ".join(impl.plugin_name for impl in hooks.caller("filter_message").get_hookimpls())
        raise PluginError(f"one of {filters}", "filter_message",
                          TypeError(f"returned {verdict!r}, expected a Verdict or None"))
    if verdict is not None and verdict.dropped:
        return Outcome(dropped=True, reason=verdict.reason)
    hooks.call("backup_message", message=message, account=account)
    outcome = Outcome()
    try:
        deliver_everywhere(hooks, store, message, account, poll, partly_delivered, outcome)
    except BaseException:
        outcome.discard_staged()
        raise
    return outcome


def deliver_everywhere(hooks: AccountHooks, store: StateStore, message: Message, account: Account, poll: Poll,
                       partly_delivered: set[str], outcome: Outcome) -> None:
    """Deliver to every destination, each one's success noted on its own so that a retry gives a destination the
    message only if it did not take it yet -- whatever its kind and its place in the list; and recipients, when an
    LMTP server accepted some of them.

    Before a hand-over that cannot be undone, an "in flight" note is committed: a state store that cannot be written
    stops the delivery (the message is deferred, undelivered) instead of letting every poll deliver it again. Only
    a message with a single destination that stages its file needs no note: the file becomes visible in the same
    transaction that records the message (see `postbote.delivery.Staged`)."""
    destinations = message.destinations if message.destinations is not None else account.destinations
    if not destinations:
        raise DeliveryError("a filter left the message without destinations", temporary=True)
    several = len(destinations) > 1
    notes = store.deliveries(account.name, message.uid) if message.uid in partly_delivered else {}
    for position, destination in enumerate(destinations):
        key = DeliveryKey(position, destination.label)
        note = notes.get(key)
        if note is not None and note.state is DeliveryState.DONE:
            outcome.results.append((destination, Delivered(note.answer)))
            continue
        served = [part.key.recipient for part in notes.values()
                  if part.key.recipient and part.key.destination == key and part.state is DeliveryState.DONE]
        uncertain = several or not stages_delivery(destination)
        if uncertain:
            announce_delivery(store, account, message, destination, key, note)
        try:
            result = deliver_to_the_rest(hooks, message, account, destination, poll, served)
            if several:  # each destination's success is noted on its own, so it must be final now
                result = made_final(result, destination)
        except DeliveryError as exc:
            for recipient in exc.accepted:
                store.finish_delivery(account.name, message.uid, key.for_recipient(recipient), exc.reason)
                partly_delivered.add(message.uid)
            raise
        if several:
            assert isinstance(result, Delivered)
            store.finish_delivery(account.name, message.uid, key, result.answer)
            partly_delivered.add(message.uid)
        outcome.results.append((destination, result))


def stages_delivery(destination: Destination) -> bool:
    """Whether the destination's plugin may answer `Staged` (its settings say ``stages_delivery``): such a single
    destination needs no "in flight" note. A plugin that stages without saying so is still safe, only noted."""
    return bool(getattr(destination.settings, "stages_delivery", False))


def made_final(result: DeliveryResult, destination: Destination) -> Delivered:
    """The result once the destination has the message for good: a pending answer waited for, a staged file synced
    and renamed into place (fsync, rename, fsync of the directory)."""
    if isinstance(result, Pending):
        return wait_for(result, destination.kind)
    if isinstance(result, Staged):
        try:
            fsync_file(result.source)
            rename_durably(result.source, result.target)
        except OSError as exc:
            discard([result])
            raise DeliveryError(f"{result.target}: {exc.strerror or exc}", temporary=True) from None
        return Delivered(result.answer)
    return result


def announce_delivery(store: StateStore, account: Account, message: Message, destination: Destination,
                      key: DeliveryKey, note: Delivery | None) -> None:
    """Commit the "in flight" note before the hand-over. A note left from an earlier attempt means that attempt
    ended without an answer (postbote was killed, or its outcome could not be recorded): the message may have
    arrived already. It is delivered again once, with a warning; after that it is held for the admin."""
    if note is not None:
        if note.attempts >= UNCERTAIN_ATTEMPTS:
            raise DeliveryError(
                f"{destination.label}: {note.attempts} deliveries ended without an answer (postbote was stopped "
                "mid-delivery, or could not record the outcome); held so that it is not delivered again and again: "
                "check the destination for copies, then `postbote retry` it", temporary=False)
        log.warning("message.delivering_again", destination=destination.label, attempts=note.attempts,
                    reason="an earlier delivery ended without an answer: the destination may get a second copy")
    store.begin_delivery(account.name, message.uid, key)


def deliver_to_the_rest(hooks: AccountHooks, message: Message, account: Account, destination: Destination, poll: Poll,
                        served: list[str]) -> DeliveryResult:
    """Deliver, leaving out the recipients an earlier, partly successful attempt already reached: the destination
    is handed on with ``recipients`` set to the rest."""
    if not served:
        return deliver_one(hooks, message, account, destination, poll)
    everyone = message.recipients or list(getattr(destination.settings, "recipients", ()))
    rest = tuple(recipient for recipient in everyone if recipient not in served)
    if not rest:
        return Delivered("; ".join(served))
    return deliver_one(hooks, message, account, dataclasses.replace(destination, recipients=rest), poll)


def deliver_one(hooks: AccountHooks, message: Message, account: Account, destination: Destination,
                poll: Poll) -> DeliveryResult:
    answer = hooks.call("deliver_message", message=message, destination=destination, account=account, poll=poll)
    if answer is None:
        raise DeliveryError(f"no plugin delivers to {destination.kind!r}", temporary=True)
    return as_result(answer, destination.kind)
