"""``postbote poll --dry-run``: what a poll would do with each listed message, from its headers alone, changing
nothing on the server or in the state.

A sequencer of its own beside `postbote.poller` (which it never drives): open the mailbox through the source plugin,
list, sort the entries against the state's records the way a poll plans them, read the header block of each message a
poll would fetch through the seam's `Mailbox.headers` (POP3 ``TOP n 0``, IMAP ``BODY.PEEK[HEADER]``: neither marks a
message seen), run the account's filters on a message made of those headers, and end the session with
`Mailbox.abort` -- no DELE, no STORE, no EXPUNGE, no QUIT that could apply anything. The state is opened read-only;
no record, no in-flight note, no observer hook (`message_delivered`, notifications, metrics) is called.

Filters see the headers only: one that reads the body (spamassassin, a body rule of a plugin) may decide otherwise
when the whole message is fetched. The output says so.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from postbote.errors import AccountError, PluginError, PostboteError
from postbote.message import Message, Verdict
from postbote.poll import Poll
from postbote.state import REJECTED

if TYPE_CHECKING:
    from pathlib import Path

    from postbote.config import Account
    from postbote.mailbox import Mailbox, MailboxEntry
    from postbote.pluginmanager import AccountHooks, PluginManager
    from postbote.state import Record


class Fate(enum.Enum):
    """What a poll would do with a listed message."""

    DELIVER = "deliver"  # fetched and handed to these destinations
    DROP = "drop"  # fetched and dropped by a filter
    DELETE = "delete"  # handled before: deleted (or its after-fetch action done) without being fetched again
    LEAVE = "leave"  # left on the server, not fetched
    DEFER = "defer"  # fetched, but a filter failed: it would wait for the next poll


@dataclass(frozen=True)
class Preview:
    """One listed message's fate; ``detail``: the destinations' labels, the filter that drops it and why, or why it
    is left."""

    uid: str
    size: int
    fate: Fate
    detail: str
    subject: str | None = None


@dataclass(frozen=True)
class AccountPreview:
    account: str
    messages: tuple[Preview, ...]
    filters: tuple[str, ...]  # the filter plugins that ran, on the headers only


def preview_account(pm: PluginManager, account: Account, state_dir: Path,
                    records: Mapping[str, Record]) -> AccountPreview:
    """Log in to ``account``, list it and say what a poll would do with each message; nothing is changed."""
    hooks = pm.hooks_for(account)
    poll = Poll(account, state_dir=state_dir, deadline=time.monotonic() + 4 * account.timeout)
    try:
        mailbox: Mailbox | None = hooks.call("open_mailbox", passing=(PostboteError,), account=account, poll=poll)
        if mailbox is None:
            raise AccountError(f"no plugin reads mail over {account.protocol!r} (is its plugin installed?)")
        try:
            previews = [*_previews(mailbox, hooks, account, records)]
        finally:
            mailbox.abort()  # no QUIT, no EXPUNGE: nothing asked for can take effect
    finally:
        poll.close()
    return AccountPreview(account.name, tuple(previews), tuple(impl.plugin_name for impl in _filters(hooks)))


def _previews(mailbox: Mailbox, hooks: AccountHooks, account: Account,
              records: Mapping[str, Record]) -> Iterable[Preview]:
    to_fetch: list[MailboxEntry] = []
    for entry in mailbox.listing():
        reason = planned_without_fetching(account, entry, records.get(entry.uid), time.time())
        if reason is None:
            to_fetch.append(entry)
        else:
            yield Preview(entry.uid, entry.size, *reason)
    limit = account.max_messages if account.max_messages is not None else len(to_fetch)
    for entry in to_fetch[:limit]:
        yield previewed(mailbox, hooks, account, entry)
    for entry in to_fetch[limit:]:
        yield Preview(entry.uid, entry.size, Fate.LEAVE, f"for a later poll (max_messages: {limit})")


def planned_without_fetching(account: Account, entry: MailboxEntry, record: Record | None,
                             now: float) -> tuple[Fate, str] | None:
    """The fate of a message a poll would not fetch (as `postbote.poller.Poller._plan` sorts the listing), or
    None for a message it would fetch."""
    from postbote.poller import kept_long_enough, oversized_to_delete

    if oversized_to_delete(account, entry, record):
        return Fate.DELETE, "larger than max_size, reported in an earlier poll: deleted unread (delete_oversized)"
    if record is not None and record.handled and record.size is not None and record.size != entry.size:
        record = None  # the UID names another message now: a poll treats it as new
    if record is not None and record.handled:
        if not (account.keep or entry.stays) or record.absent:
            return Fate.DELETE, "handled in an earlier poll: deleted once its headers show it is the same message"
        if entry.stays and entry.action_due and not account.keep:
            return Fate.DELETE, "handled in an earlier poll: its after-fetch action is done again"
        if kept_long_enough(account, record, now):
            return Fate.DELETE, "kept for delete_after since its delivery: deleted"
    if record is not None and record.status == REJECTED:
        return Fate.LEAVE, f"{LEFT_REJECTED} ({record.reason}); tried again after `postbote retry`"
    if record is not None and record.handled and not account.fetch_all:
        return Fate.LEAVE, "delivered before (keep)"
    if account.max_size is not None and entry.size > account.max_size:
        return Fate.LEAVE, f"{LEFT_OVERSIZED} ({entry.size} > {account.max_size} octets): reported, not fetched"
    return None


LEFT_REJECTED = "rejected before"
LEFT_OVERSIZED = "larger than max_size"
"""How the reasons of `planned_without_fetching` for a message left on the server start (``check --connect``
counts them by these)."""


def previewed(mailbox: Mailbox, hooks: AccountHooks, account: Account, entry: MailboxEntry) -> Preview:
    """Run the filters on the message's headers and say where it would go."""
    headers = mailbox.headers(entry)
    if headers is None:
        return Preview(entry.uid, entry.size, Fate.DELIVER,
                       "the server did not show the headers alone (POP3 without TOP, or gone): a poll fetches it "
                       "and delivers it to "
                       f"{labels(account.destinations)} unless a filter decides otherwise")
    message = Message(entry.uid, entry.size)
    try:
        message.write(headers)
        message.close_writing()
        subject = message.get_header("Subject")
        try:
            fate, detail = filtered(message, hooks, account)
        except PluginError as exc:
            fate, detail = Fate.DEFER, f"a filter failed: {exc}"
        return Preview(entry.uid, entry.size, fate, detail, subject)
    finally:
        message.discard()


def filtered(message: Message, hooks: AccountHooks, account: Account) -> tuple[Fate, str]:
    """The filters in the order pluggy calls them, one at a time so that the one that drops the message is named;
    the first verdict ends filtering, as in a poll (`postbote.handling.Handler.handle`)."""
    for impl in _filters(hooks):
        arguments = {"message": message, "account": account}
        try:
            verdict = impl.function(**{name: arguments[name] for name in impl.argnames})
        except Exception as exc:  # noqa: BLE001 - a filter's failure is this message's answer, as in a poll
            raise PluginError(impl.plugin_name, "filter_message", exc) from exc
        if verdict is None:
            continue
        if not isinstance(verdict, Verdict):
            raise PluginError(impl.plugin_name, "filter_message",
                              TypeError(f"returned {verdict!r}, expected a Verdict or None"))
        if verdict.dropped:
            return Fate.DROP, f"dropped by {impl.plugin_name}: {verdict.reason}"
        break
    destinations = message.destinations if message.destinations is not None else account.destinations
    if not destinations:
        return Fate.DEFER, "a filter left the message without destinations"
    rerouted = f" (recipients: {', '.join(message.recipients)})" if message.recipients else ""
    return Fate.DELIVER, labels(destinations) + rerouted


def _filters(hooks: AccountHooks) -> list[Any]:
    if not hooks.implemented("filter_message"):
        return []
    return [impl for impl in reversed(hooks.caller("filter_message").get_hookimpls())
            if not (impl.wrapper or impl.hookwrapper)]


def labels(destinations: Sequence[Any]) -> str:
    return ", ".join(destination.label for destination in destinations)
