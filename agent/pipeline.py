"""What happens to one message between RETR and DELE: filters, backups, deliveries (the hooks, in this order).

`handle` returns an `Outcome` or raises: `DeliveryError` when a destination refused or failed, `PluginError` when a
plugin raised. The caller (the poller) records the outcome and only then deletes; on an exception it does neither.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pluggy

from agent.errors import DeliveryError, PluginError
from agent.message import Message, Verdict

if TYPE_CHECKING:
    from agent.config import Account
    from agent.poller import PollContext
    from agent.state import StateStore


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
    """Deliver to every destination, remembering partial successes so that a retry skips what already took the
    message: a destination, with several; recipients, when an LMTP server accepted some of them (no duplicates)."""
    destinations = message.destinations if message.destinations is not None else account.destinations
    if not destinations:
        raise DeliveryError("a filter left the message without destinations", temporary=True)
    several = len(destinations) > 1
    done = store.destinations_done(account.name, message.uid) if message.uid in poll.partly_delivered else {}
    answers: list[str | Deferred] = []
    for index, destination in enumerate(destinations):
        key = f"{index}:{destination.label}"
        if key in done:
            answers.append(done[key])
            continue
        served = [name.split(">", 1)[1] for name in done if name.startswith(f"{key}>")]
        try:
            answer = deliver_to_the_rest(pm, message, account, destination, poll, served)
            if several:
                answer = settled(answer)  # each destination's success is noted on its own, so it must be known now
        except DeliveryError as exc:
            for recipient in exc.accepted:
                store.record_destination(account.name, message.uid, f"{key}>{recipient}", exc.reason)
                poll.partly_delivered.add(message.uid)
            raise
        if several and not poll.has_staged(message.uid):
            # A staged delivery becomes durable only with the whole message's record, so it is not noted alone.
            store.record_destination(account.name, message.uid, key, settled(answer))
            poll.partly_delivered.add(message.uid)
        answers.append(answer)
    return answers


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
