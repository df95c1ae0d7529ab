"""What happens to one message between RETR and DELE: filters, backups, deliveries (the hooks, in this order).

`handle` returns an `Outcome` or raises: `DeliveryError` when a destination refused or failed, `PluginError` when a
plugin raised. The caller (the poller) records the outcome and only then deletes; on an exception it does neither.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pluggy
import structlog
from postbote.errors import DeliveryError, PluginError
from postbote.message import Message, Verdict
from postbote.state import UNCERTAIN_ATTEMPTS, Delivery, DeliveryState

if TYPE_CHECKING:
    from postbote.config import Account
    from postbote.poller import PollContext
    from postbote.state import StateStore

log = structlog.get_logger("postbote.deliver")


@dataclass
class Outcome:
    """``answers`` has one entry per destination: its answer, or a `Deferred` one still to be confirmed.
    ``durable_elsewhere``: some destination took the message for good on return (an MTA, a program), so its
    record must not wait for a batch -- a crash would deliver it again."""

    dropped: bool = False
    reason: str = ""
    answers: list[str | Deferred] = field(default_factory=list)
    durable_elsewhere: bool = False

    @property
    def deferred(self) -> bool:
        return any(isinstance(answer, Deferred) for answer in self.answers)


class Deferred:
    """A destination's answer that arrives later (`deliver_message` returned an object with ``result()``): the
    message counts as delivered only once ``result()`` returns; exceptions other than `DeliveryError` become
    `PluginError`, as they do when raised by the hook itself."""

    def __init__(self, plugin: str, pending: Any) -> None:
        self.plugin = plugin
        self.pending = pending

    def result(self) -> str:
        try:
            return str(self.pending.result())
        except DeliveryError:
            raise
        except Exception as exc:
            raise PluginError(self.plugin, "deliver_message", exc) from exc


def settled(answer: str | Deferred) -> str:
    return answer.result() if isinstance(answer, Deferred) else answer


def implementations(hook: pluggy.HookCaller, kwargs: dict[str, Any]) -> list[Any]:
    """The hook's implementations in pluggy's call order, less those of plugins the account has turned off."""
    account = kwargs.get("account")
    return [impl for impl in reversed(hook.get_hookimpls())
            if not (impl.hookwrapper or impl.wrapper) and (account is None or account.uses(impl.plugin_name))]


def call_each(hook: pluggy.HookCaller, **kwargs: Any) -> Iterator[tuple[str, Any]]:
    """Call a hook's implementations one at a time, in pluggy's order, so that a failure names its plugin."""
    for impl in implementations(hook, kwargs):
        try:
            result = impl.function(*(kwargs[name] for name in impl.argnames))
        except DeliveryError:
            raise
        except Exception as exc:
            raise PluginError(impl.plugin_name, hook.name, exc) from exc
        yield impl.plugin_name, result


def call_all(hook: pluggy.HookCaller, **kwargs: Any) -> list[PluginError]:
    """Call every implementation even when some raise (observer hooks); returns the errors."""
    errors = []
    for impl in implementations(hook, kwargs):
        try:
            impl.function(*(kwargs[name] for name in impl.argnames))
        except Exception as exc:  # noqa: BLE001 - an observer's failure is reported, never propagated
            errors.append(PluginError(impl.plugin_name, hook.name, exc))
    return errors


def handle(pm: pluggy.PluginManager, store: StateStore, message: Message, account: Account,
           poll: PollContext) -> Outcome:
    verdict = run_filters(pm, message, account)
    if verdict is not None and verdict.dropped:
        return Outcome(dropped=True, reason=verdict.reason)
    for _ in call_each(pm.hook.backup_message, message=message, account=account):
        pass
    staged_before = poll.staged_count(message.uid)
    answers = deliver_everywhere(pm, store, message, account, poll)
    unstaged = len(answers) - (poll.staged_count(message.uid) - staged_before)
    return Outcome(answers=answers, durable_elsewhere=unstaged > 0)


def run_filters(pm: pluggy.PluginManager, message: Message, account: Account) -> Verdict | None:
    for plugin, verdict in call_each(pm.hook.filter_message, message=message, account=account):
        if verdict is None:
            continue
        if not isinstance(verdict, Verdict):
            raise PluginError(plugin, "filter_message", TypeError(f"returned {verdict!r}, expected a Verdict or None"))
        return verdict
    return None


def deliver_everywhere(pm: pluggy.PluginManager, store: StateStore, message: Message, account: Account,
                       poll: PollContext) -> list[str | Deferred]:
    """Deliver to every destination, each one's success noted on its own so that a retry gives a destination the
    message only if it did not take it yet -- whatever its kind and its place in the list; and recipients, when an
    LMTP server accepted some of them.

    Before a hand-over that cannot be undone, an "in flight" note is committed: a state store that cannot be written
    stops the delivery (the message is deferred, undelivered) instead of letting every poll deliver it again. Only
    the one staged delivery of a message with a single destination needs no note: its file becomes visible in the
    same transaction that records the message (see `PollContext.stage_rename`)."""
    destinations = message.destinations if message.destinations is not None else account.destinations
    if not destinations:
        raise DeliveryError("a filter left the message without destinations", temporary=True)
    several = len(destinations) > 1
    notes = store.deliveries(account.name, message.uid) if message.uid in poll.partly_delivered else {}
    answers: list[str | Deferred] = []
    for index, destination in enumerate(destinations):
        key = f"{index}:{destination.label}"
        note = notes.get(key)
        if note is not None and note.state is DeliveryState.DONE:
            answers.append(note.answer)
            continue
        served = [name.split(">", 1)[1] for name, part in notes.items()
                  if name.startswith(f"{key}>") and part.state is DeliveryState.DONE]
        poll.staging = not several and stages_delivery(destination)
        if not poll.staging:
            announce_delivery(store, account, message, destination, key, note)
        try:
            answer = deliver_to_the_rest(pm, message, account, destination, poll, served)
            if several:
                answer = settled(answer)  # each destination's success is noted on its own, so it must be known now
        except DeliveryError as exc:
            for recipient in exc.accepted:
                store.finish_delivery(account.name, message.uid, f"{key}>{recipient}", exc.reason)
                poll.partly_delivered.add(message.uid)
            raise
        if several:
            store.finish_delivery(account.name, message.uid, key, settled(answer))
            poll.partly_delivered.add(message.uid)
        answers.append(answer)
    return answers


def stages_delivery(destination: Any) -> bool:
    """Whether the destination's plugin stages its writes (`PollContext.stage_rename`) instead of finishing them."""
    return bool(getattr(destination.settings, "stages_delivery", False))


def announce_delivery(store: StateStore, account: Account, message: Message, destination: Any, key: str,
                      note: Delivery | None) -> None:
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


def deliver_to_the_rest(pm: pluggy.PluginManager, message: Message, account: Account, destination: Any,
                        poll: PollContext, served: list[str]) -> str | Deferred:
    """Deliver, leaving out the recipients an earlier, partly successful attempt already reached."""
    if not served:
        return deliver_one(pm, message, account, destination, poll)
    rerouted = message.recipients
    everyone = rerouted or list(getattr(destination.settings, "recipients", ()))
    message.recipients = [recipient for recipient in everyone if recipient not in served]
    try:
        return deliver_one(pm, message, account, destination, poll) if message.recipients else "; ".join(served)
    finally:
        message.recipients = rerouted


def deliver_one(pm: pluggy.PluginManager, message: Message, account: Account, destination: Any,
                poll: PollContext) -> str | Deferred:
    try:
        answer = pm.hook.deliver_message(message=message, destination=destination, account=account, poll=poll)
    except DeliveryError:
        raise
    except Exception as exc:
        raise PluginError(destination.kind, "deliver_message", exc) from exc
    if answer is None:
        raise DeliveryError(f"no plugin delivers to {destination.kind!r}", temporary=True)
    if not isinstance(answer, str) and callable(getattr(answer, "result", None)):
        return Deferred(destination.kind, answer)
    return str(answer)
