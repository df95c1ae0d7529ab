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
    dropped: bool = False
    reason: str = ""
    answers: list[str] = field(default_factory=list)


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
    return Outcome(answers=deliver_everywhere(pm, store, message, account, poll))


def run_filters(pm: pluggy.PluginManager, message: Message, account: Account) -> Verdict | None:
    for plugin, verdict in call_each(pm.hook.filter_message, message=message, account=account):
        if verdict is None:
            continue
        if not isinstance(verdict, Verdict):
            raise PluginError(plugin, "filter_message", TypeError(f"returned {verdict!r}, expected a Verdict or None"))
        return verdict
    return None


def deliver_everywhere(pm: pluggy.PluginManager, store: StateStore, message: Message, account: Account,
                       poll: PollContext) -> list[str]:
    """Deliver to every destination, remembering partial successes so that a retry skips what already took the
    message: a destination, with several; recipients, when an LMTP server accepted some of them (no duplicates)."""
    destinations = message.destinations if message.destinations is not None else account.destinations
    if not destinations:
        raise DeliveryError("a filter left the message without destinations", temporary=True)
    several = len(destinations) > 1
    done = store.destinations_done(account.name, message.uid)
    answers = []
    for index, destination in enumerate(destinations):
        key = f"{index}:{destination.label}"
        if key in done:
            answers.append(done[key])
            continue
        served = [name.split(">", 1)[1] for name in done if name.startswith(f"{key}>")]
        try:
            answer = deliver_to_the_rest(pm, message, account, destination, poll, served)
        except DeliveryError as exc:
            for recipient in exc.accepted:
                store.record_destination(account.name, message.uid, f"{key}>{recipient}", exc.reason)
            raise
        if several and not poll.has_staged(message.uid):
            # A staged delivery becomes durable only with the whole message's record, so it is not noted alone.
            store.record_destination(account.name, message.uid, key, answer)
        answers.append(answer)
    return answers


def deliver_to_the_rest(pm: pluggy.PluginManager, message: Message, account: Account, destination: Any,
                        poll: PollContext, served: list[str]) -> str:
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
                poll: PollContext) -> str:
    try:
        answer = pm.hook.deliver_message(message=message, destination=destination, account=account, poll=poll)
    except DeliveryError:
        raise
    except Exception as exc:
        raise PluginError(destination.kind, "deliver_message", exc) from exc
    if answer is None:
        raise DeliveryError(f"no plugin delivers to {destination.kind!r}", temporary=True)
    return str(answer)
