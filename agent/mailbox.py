"""The seam between the poller and a mail source: a `Mailbox` lists, fetches and deletes; the poller decides.

A source plugin (POP3 is the built-in one) answers the ``open_mailbox(account, poll)`` hook with an object that
speaks this protocol, logged in and ready. The poller is the only sequencer: it lists, plans (what to fetch, what to
delete because it was delivered before), fetches, hands each message to the pipeline, commits the outcome to the
state store, and only then asks the mailbox to delete. A mailbox knows nothing of delivery, state or plugins.

Deletions a mailbox is asked for need not take effect at once (POP3 marks them and removes them at QUIT): `finish`
ends the session and returns the entries whose removal the server confirmed. If the session ends any other way,
`abort` closes it without confirming anything; the records in the state store make the next poll delete those
messages without delivering them again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Union, runtime_checkable

if TYPE_CHECKING:
    from postbote.message import Message


@dataclass(frozen=True)
class MailboxEntry:
    """One message as a listing shows it: its unique id, its size in octets as the server announced it, and the
    source's own handle for it (``ref``: a POP3 message number, an IMAP folder and UID).

    ``stays``: the source keeps this message where it is once handled (an IMAP folder read with ``after_fetch:
    seen`` or ``keep``). The poller treats it as with ``keep: true`` -- its record stays while it is listed and it is
    never fetched again -- but still calls `Mailbox.delete` for it once, after the commit, so that the source can
    apply its action (mark it seen). ``action_due``: the listing shows that action undone for an entry handled
    before (a session that broke before it, a server that refused it): the poller asks for it again."""

    uid: str
    size: int
    ref: Any = None
    stays: bool = False
    action_due: bool = False  # an entry that stays whose action the listing shows undone (IMAP: not \Seen yet)


@dataclass(frozen=True)
class NotFetched:
    """The source could not give this message now, but the session is still in step: the message stays on the
    server and is tried again next poll. ``event`` names the log event (``message.not_retrieved``,
    ``message.truncated``); ``facts`` are logged with it."""

    reason: str
    event: str = "message.not_retrieved"
    facts: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class TooLarge:
    """The message turned out larger than the account accepts: it is recorded as rejected and the session ends
    (the rest of the transfer was not read, so the session is out of step)."""

    reason: str


# What `Mailbox.fetch` yields per entry (the message module is loaded only once there is a message to fetch).
Fetched = Union["Message", NotFetched, TooLarge]  # noqa: UP007 - a forward reference needs typing.Union


@runtime_checkable
class Mailbox(Protocol):
    """A logged-in session with one account's mailbox (see the module docstring for the order of calls)."""

    deadline: float | None  # ``time.monotonic()`` by which the whole session must end; the poller may move it

    def listing(self) -> Sequence[MailboxEntry]:
        """Every message in the mailbox, in the server's order."""
        ...

    def headers(self, entry: MailboxEntry) -> bytes | None:
        """The message's header block (up to the empty line), or None when the source cannot show it without
        fetching the message. Used to confirm that a UID recorded as delivered still names the same message, and by
        ``poll --dry-run`` (`postbote.dry_run`) to run the filters on it: it must change nothing (no \\Seen)."""
        ...

    def fetch(self, entries: Iterable[MailboxEntry], *, stop: Callable[[], bool]) -> Iterator[tuple[MailboxEntry,
                                                                                                     Fetched]]:
        """Fetch ``entries`` in order, each spooled into a `Message` (or a reason it is not there), as a stream:
        a source may request several ahead of the one being handled. Requests no more once ``stop()`` is true.
        A message yielded is the caller's to discard; a message not yet yielded when the caller stops iterating
        is the source's to clean up."""
        ...

    def delete(self, entry: MailboxEntry) -> None:
        """Ask for the message's removal -- for an entry that `stays`, for the source's after-handling action
        instead (the poller calls it only once the message's outcome is committed)."""
        ...

    def finish(self) -> list[MailboxEntry]:
        """End the session cleanly; returns the entries whose removal (or, for entries that stay, whose action)
        the server confirmed."""
        ...

    def abort(self) -> None:
        """End the session at once (after an error): nothing asked for is confirmed, nothing more is sent."""
        ...
