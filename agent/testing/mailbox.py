"""`FakeMailbox`: a mailbox in memory behind the `postbote.Mailbox` seam, for tests that need no sockets or threads.

Register a `FakeSource` with the plugin manager (``poll_once(config, plugins=[source])``) and give the account
``protocol: fake``: each poll of that account opens ``source.mailbox(account_name)``. Deletions take effect when
the poll finishes the session, as POP3's do at QUIT; an aborted session deletes nothing. Faults a test wants are
set on the mailbox: a mailbox that cannot be opened (unreachable, login refused), a message that cannot be fetched
now, one that is too large, headers that cannot be shown, deletions the server refuses, a session that breaks after
some messages, at the first deletion or at its end (POP3: a QUIT that never arrives). A fault stays set until the
test clears it.

To run the ``postbote`` command itself in this process (``postbote.cli.main``) against a `FakeSource`, put the file
`FakeSource.plugin_file` writes into the config's ``plugin_paths``: it serves that very source object, so the test
sees what the command did to the mailbox.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from postbote.errors import AccountError
from postbote.hookspecs import hookimpl
from postbote.mailbox import Fetched, MailboxEntry, NotFetched, TooLarge
from postbote.message import Message

FAKE_PROTOCOL = "fake"


class SessionBroken(AccountError):
    """The fake server "dropped the connection" (`FakeMailbox.break_after`)."""


@dataclass
class FakeMailbox:
    """The messages of one account, by UID, in listing order, with the faults to play."""

    messages: dict[str, bytes] = field(default_factory=dict)
    open_error: Exception | None = None  # raised when a poll opens the mailbox (AccountError, LoginRefused)
    unavailable: set[str] = field(default_factory=set)  # fetched as NotFetched (a -ERR to RETR)
    too_large: set[str] = field(default_factory=set)  # fetched as TooLarge (the session then ends)
    refuse_deletion: set[str] = field(default_factory=set)  # kept although asked to delete
    shows_headers: bool = True  # False: like a POP3 server without TOP
    break_after: int | None = None  # the session breaks after this many messages were fetched
    break_at_delete: bool = False  # the session breaks when the first deletion is asked for (POP3: at DELE)
    break_at_finish: bool = False  # the session's end never arrives, so nothing is deleted (POP3: QUIT lost)
    stays: bool = False  # listed as entries that stay (IMAP after_fetch: seen): handled ones are marked, not removed
    sessions: int = 0  # sessions opened
    fetched: list[str] = field(default_factory=list)  # every UID fetched, in order, over all sessions
    deleted: list[str] = field(default_factory=list)  # every UID removed, in order
    marked: list[str] = field(default_factory=list)  # every UID marked as handled (``stays``), in order
    deadline: float | None = None
    _asked: list[str] = field(default_factory=list)  # deletions asked for in the open session
    _added: int = 0  # messages added so far: numbers the UIDs given

    def add(self, data: bytes, uid: str | None = None) -> str:
        """Put a message in the mailbox (last in the listing); its UID, ``uid-1``, ``uid-2``, ... unless given."""
        self._added += 1
        uid = uid or f"uid-{self._added}"
        self.messages[uid] = data
        return uid

    def uids(self) -> list[str]:
        """The UIDs of the messages on the "server", in listing order (what `POP3Server.uids` tells of its own)."""
        return list(self.messages)

    # --- the Mailbox protocol ---

    def open(self) -> FakeMailbox:
        self.sessions += 1
        self._asked = []
        if self.open_error is not None:
            raise self.open_error
        return self

    def listing(self) -> Sequence[MailboxEntry]:
        return [MailboxEntry(uid, len(data), uid, stays=self.stays) for uid, data in self.messages.items()]

    def headers(self, entry: MailboxEntry) -> bytes | None:
        if not self.shows_headers:
            return None
        data = self.messages[entry.uid]
        end = min((i for i in (data.find(b"\r\n\r\n"), data.find(b"\n\n")) if i >= 0), default=len(data))
        return data[:end]

    def fetch(self, entries: Iterable[MailboxEntry], *, stop: Callable[[], bool]) -> Iterator[tuple[MailboxEntry,
                                                                                                     Fetched]]:
        for count, entry in enumerate(entries):
            if stop():
                return
            if self.break_after is not None and count >= self.break_after:
                raise SessionBroken("the fake server dropped the connection")
            self.fetched.append(entry.uid)
            if entry.uid in self.too_large:
                yield entry, TooLarge(f"message {entry.uid} is larger than the account accepts")
                return
            if entry.uid in self.unavailable:
                yield entry, NotFetched("-ERR the fake server cannot give this message now")
                continue
            yield entry, Message.from_bytes(self.messages[entry.uid], uid=entry.uid)

    def delete(self, entry: MailboxEntry) -> None:
        if self.break_at_delete:
            raise SessionBroken("the fake server dropped the connection when asked to delete a message")
        self._asked.append(entry.uid)

    def finish(self) -> list[MailboxEntry]:
        if self.break_at_finish:
            self._asked = []
            raise SessionBroken("the fake server dropped the connection before the session's end")
        done = []
        for uid in self._asked:
            if uid in self.refuse_deletion or uid not in self.messages:
                continue
            done.append(MailboxEntry(uid, len(self.messages[uid]), uid, stays=self.stays))
            if self.stays:
                self.marked.append(uid)
                continue
            del self.messages[uid]
            self.deleted.append(uid)
        self._asked = []
        return done

    def abort(self) -> None:
        self._asked = []


@dataclass(frozen=True)
class FakeSourceSettings:
    """What ``account.source`` holds for a ``protocol: fake`` account."""

    name: str

    @property
    def server(self) -> str:
        return f"{self.name}@fake"

    @property
    def files(self) -> dict[str, Any]:
        return {}


_SHARED: weakref.WeakValueDictionary[int, FakeSource] = weakref.WeakValueDictionary()

_PLUGIN_FILE = '''"""Serves FakeSource {key} of the process that wrote this file (`FakeSource.plugin_file`)."""

from postbote.testing.mailbox import shared_source

SOURCE_PROTOCOLS = ("fake",)
_source = shared_source({key})
parse_source = _source.parse_source
open_mailbox = _source.open_mailbox
'''


class FakeSource:
    """A source plugin for ``protocol: fake`` accounts, each served by its `FakeMailbox`."""

    SOURCE_PROTOCOLS = (FAKE_PROTOCOL,)
    name = "fake-source"

    def __init__(self) -> None:
        self.mailboxes: dict[str, FakeMailbox] = {}

    def mailbox(self, account: str) -> FakeMailbox:
        return self.mailboxes.setdefault(account, FakeMailbox())

    def plugin_file(self, directory: Path, name: str = "fake_source") -> Path:
        """Write ``directory/NAME.py``, a local plugin (for ``plugin_paths``) that serves this source object to a
        ``postbote`` command run in this process (``postbote.cli.main``); loaded in another process, it fails to load,
        naming this source."""
        key = id(self)
        _SHARED[key] = self
        path = directory / f"{name}.py"
        path.write_text(_PLUGIN_FILE.format(key=key))
        return path

    @hookimpl
    def parse_source(self, protocol: str, section: Any, problems: Any, base_dir: Path) -> FakeSourceSettings | None:
        if protocol != FAKE_PROTOCOL:
            return None
        return FakeSourceSettings(str(section.get("name", str, "")))

    @hookimpl
    def open_mailbox(self, account: Any, poll: Any) -> FakeMailbox | None:
        if account.protocol != FAKE_PROTOCOL:
            return None
        return self.mailbox(account.name).open()


def shared_source(key: int) -> FakeSource:
    """The `FakeSource` whose `FakeSource.plugin_file` names ``key`` (a plugin file loaded in the same process)."""
    try:
        return _SHARED[key]
    except KeyError:
        raise LookupError(f"no FakeSource {key} in this process: its plugin file serves only the process (the test) "
                          "that wrote it") from None
