"""What happens to one message between its fetch and its record: filters, backups, deliveries (the hooks, in order).

`Handler.handle` returns an `Outcome` or raises: `DeliveryError` when a destination refused or failed,
`PluginError` when a plugin raised. The caller (the poller) records the outcome and only then deletes; on an
exception it does neither.
pluggy calls the implementations (through the account's subset of the hooks, without the plugins it turns off);
`postbote.pluginmanager` makes each failure name its plugin.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from postbote.delivery import Delivered, DeliveryResult, Pending, Staged, as_result, wait_for
from postbote.durable import fsync_file, rename_durably
from postbote.errors import DeliveryError, PluginError
from postbote.logconfig import get_logger
from postbote.message import Message, Verdict
from postbote.state import UNCERTAIN_ATTEMPTS, Delivery, DeliveryKey, DeliveryState

if TYPE_CHECKING:
    from postbote.config import Account, Destination
    from postbote.pluginmanager import AccountHooks
    from postbote.poll import Poll
    from postbote.state import StateStore

log = get_logger("postbote.deliver")


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
    def confirmable(self) -> bool:
        """Every answer still on its way is from a destination that can find the message later if it is lost."""
        return all(result.confirmable for _, result in self.results if isinstance(result, Pending))

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


class Handler:
    """Hands the messages of one poll of one account on: filters, backups, deliveries.

    ``hooks`` is the account's view of the hooks (`PluginManager.hooks_for`); ``partly_delivered`` the UIDs with
    delivery notes from earlier attempts; ``begin_delivery(uid, key)`` commits an "in flight" note (the poller may
    commit it together with the previous message's record: one transaction instead of two)."""

    def __init__(self, hooks: AccountHooks, store: StateStore, account: Account, poll: Poll,
                 begin_delivery: Callable[[str, DeliveryKey], None] | None = None,
                 partly_delivered: set[str] | None = None) -> None:
        self.hooks = hooks
        self.store = store
        self.account = account
        self.poll = poll
        self.partly_delivered = partly_delivered if partly_delivered is not None else set()
        self.begin_delivery = begin_delivery or (lambda uid, key: store.begin_delivery(account.name, uid, key))

    def handle(self, message: Message) -> Outcome:
        verdict = self.hooks.call("filter_message", message=message, account=self.account)
        if verdict is not None and not isinstance(verdict, Verdict):
            filters = ", ".join(impl.plugin_name for impl in self.hooks.caller("filter_message").get_hookimpls())
            raise PluginError(f"one of {filters}", "filter_message",
                              TypeError(f"returned {verdict!r}, expected a Verdict or None"))
        if verdict is not None and verdict.dropped:
            return Outcome(dropped=True, reason=verdict.reason)
        self.hooks.call("backup_message", message=message, account=self.account)
        outcome = Outcome()
        try:
            self.deliver_everywhere(message, outcome)
        except BaseException:
            outcome.discard_staged()
            raise
        return outcome

    def deliver_everywhere(self, message: Message, outcome: Outcome) -> None:
        """Deliver to every destination, each one's success noted on its own so that a retry gives a destination the
        message only if it did not take it yet -- whatever its kind and its place in the list; and recipients, when
        an LMTP server accepted some of them.

        Before a hand-over that cannot be undone, an "in flight" note is committed: a state store that cannot be
        written stops the delivery (the message is deferred, undelivered) instead of letting every poll deliver it
        again. Only a message with a single destination that stages its file needs no note: the file becomes
        visible in the same transaction that records the message (see `postbote.delivery.Staged`)."""
        account, store, uid = self.account, self.store, message.uid
        destinations = message.destinations if message.destinations is not None else account.destinations
        if not destinations:
            raise DeliveryError("a filter left the message without destinations", temporary=True)
        several = len(destinations) > 1
        notes = store.deliveries(account.name, uid) if uid in self.partly_delivered else {}
        for position, destination in enumerate(destinations):
            key = DeliveryKey(position, destination.label)
            note = notes.get(key)
            if note is not None and note.state is DeliveryState.DONE:
                outcome.results.append((destination, Delivered(note.answer)))
                continue
            served = [part.key.recipient for part in notes.values()
                      if part.key.recipient and part.key.destination == key and part.state is DeliveryState.DONE]
            found = self.found_there(message, destination, note)
            if found is None and (several or not stages_delivery(destination)):
                self.announce(message, destination, key, note)
            try:
                result = Delivered(found) if found is not None else \
                    self.deliver_to_the_rest(message, destination, served)
                if several:  # each destination's success is noted on its own, so it must be final now
                    result = made_final(result, destination)
            except DeliveryError as exc:
                for recipient in exc.accepted:
                    store.finish_delivery(account.name, uid, key.for_recipient(recipient), exc.reason)
                    self.partly_delivered.add(uid)
                raise
            if several:
                assert isinstance(result, Delivered)
                store.finish_delivery(account.name, uid, key, result.answer)
                self.partly_delivered.add(uid)
            outcome.results.append((destination, result))

    def found_there(self, message: Message, destination: Destination, note: Delivery | None) -> str | None:
        """Where an earlier delivery that ended without an answer put the message, if its destination can find it
        (``find_delivered``): then it counts as delivered without a second copy."""
        if note is None or note.state is not DeliveryState.IN_FLIGHT or note.key.recipient:
            return None
        found = self.hooks.call("find_delivered", message=message, destination=destination, account=self.account,
                                poll=self.poll)
        if found is None:
            return None
        answer = f"found already delivered: {found}"
        log.info("message.found_delivered", destination=destination.label, answer=answer, attempts=note.attempts)
        return answer

    def announce(self, message: Message, destination: Destination, key: DeliveryKey, note: Delivery | None) -> None:
        """Commit the "in flight" note before the hand-over. A note left from an earlier attempt means that attempt
        ended without an answer (postbote was killed, or its outcome could not be recorded): the message may have
        arrived already. It is delivered again once, with a warning; after that it is held for the admin."""
        if note is not None:
            if note.attempts >= UNCERTAIN_ATTEMPTS:
                raise DeliveryError(
                    f"{destination.label}: {note.attempts} deliveries ended without an answer (postbote was stopped "
                    "mid-delivery, the connection broke after the whole message was sent, or the outcome could not "
                    "be recorded); held so that it is not delivered again and again: check the destination for "
                    "copies, then `postbote retry` it", temporary=False)
            log.warning("message.delivering_again", destination=destination.label, attempts=note.attempts,
                        reason="an earlier delivery ended without an answer: the destination may get a second copy")
        self.begin_delivery(message.uid, key)

    def deliver_to_the_rest(self, message: Message, destination: Destination, served: list[str]) -> DeliveryResult:
        """Deliver, leaving out the recipients an earlier, partly successful attempt already reached: the
        destination is handed on with ``recipients`` set to the rest."""
        if served:
            everyone = message.recipients or list(getattr(destination.settings, "recipients", ()))
            rest = tuple(recipient for recipient in everyone if recipient not in served)
            if not rest:
                return Delivered("; ".join(served))
            destination = dataclasses.replace(destination, recipients=rest)
        answer = self.hooks.call("deliver_message", message=message, destination=destination, account=self.account,
                                 poll=self.poll)
        if answer is None:
            raise DeliveryError(f"no plugin delivers to {destination.kind!r}", temporary=True)
        return as_result(answer, destination.kind)


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
