"""Delivery into an IMAP mailbox by APPEND: ``deliver: {imap: {...}}`` (issue 13).

The connection and login keys (``host``, ``port``, ``tls``, ``username``, ``password``/``password_file``/…,
``auth``, ``tls_verify``, ``tls_ca_file``, ``tls_fingerprint``) are read and used exactly as for an IMAP source
(`postbote.plugins.imap.settings.connection_settings`, `postbote.plugins.imap.login.open_session`); this module adds:

- ``folder`` (``INBOX``): where messages go, as the server names it, with its hierarchy delimiter (``Archive/2026``
  on most servers, ``Archive.2026`` on a Dovecot with Maildir++ folders);
- ``create_folder`` (true): when the server answers ``NO [TRYCREATE]`` the folder is created and the APPEND tried
  once more; with false the message is deferred with a reason that says so;
- ``flags`` (none, so the message shows as unread): e.g. ``["\\Seen"]``; system flags and keywords, checked when the
  config is read, since a flag the server cannot parse makes it take the message's bytes for commands;
- ``internaldate`` (``date``): the message's ``Date:``, so the mailbox sorts by when mail was sent, falling back to
  the time of fetch when it is missing, cannot be read, or lies more than a day in the future; ``fetch``: always
  the time of fetch;
- ``timeout`` (60s): for each wait on the server.

What counts: the message is delivered when the server answers the APPEND with a tagged OK (the answer names the
APPENDUID when the server has UIDPLUS). ``NO [OVERQUOTA]``, a folder that cannot be created, other codes that say
"not now" (UNAVAILABLE, INUSE, SERVERBUG, NOPERM, …), a NO without such a code whose text says it (quota, "try again
later", throttling: `not_now`), a dropped connection or a BAD (after which the session is ended: the server may be
out of step) leave the message on the source server, to be retried (temporary); any other NO (TOOBIG, LIMIT, PARSE,
no code) is the server refusing this message for good: it is rejected, like an SMTP 5xx.

The wire: one session per poll and destination (``poll.resource``), reused for every message and opened again
once it broke. A message goes as a literal of its CRLF form (`postbote.crlf_lines`: a bare CR or LF becomes CRLF,
every other byte passes untouched, 8-bit and long lines included); the literal's length is counted by a first pass
over the spooled message, so a 200 MB message is streamed, never held. With LITERAL+ the command and the literal go
out at once, and the tagged answer is read later (`postbote.Pending`): the server stores this message while the
source sends the next. Without LITERAL+ (Outlook; Gmail above 4 KB, where its LITERAL- stops) each literal waits
for the server's "+", one round trip, and its tagged answer is still read later. MULTIAPPEND (RFC 3502) is not
used where offered: it takes no round trip off (every literal of a MULTIAPPEND waits for its "+" just the same
without LITERAL+, and with LITERAL+ there is none to take off), and it is all or nothing -- one message the server
refuses for good would fail the whole batch, so each message's own answer (delivered, deferred, rejected) would
be lost; neither Gmail nor Outlook offers it.

A message holding a NUL byte, which IMAP allows only in a BINARY literal (RFC 3516), goes as a plain literal all
the same: Dovecot, for one, stores it as sent; a server that refuses it (NO, or BAD) rejects
the message for good, with a reason that names the NUL, and it stays on the source.

Once the session cannot be opened (the server is unreachable, the login is refused), every later message of the
poll is deferred at once with the same reason: no login attempt per message (which can lock an account), no
timeout per message. A session that breaks is opened again, until `MAX_REOPENS` sessions in a row took no message.

OAuth2 (``auth: xoauth2`` with ``oauth2:`` or ``token_command``, as for a source): ``postbote auth ACCOUNT`` runs the
destination's authorization when the account's source needs none (the usual move: an old POP3 account with a
password into Gmail or Outlook); its access token is cached as ``STATE_DIR/oauth2/ACCOUNT.imap-USER@HOST_PORT.json``,
apart from any token of the source.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from postbote import (
    AccountError,
    CredentialError,
    CRLFEncoder,
    Delivered,
    DeliveryError,
    Destination,
    LengthChanged,
    Message,
    Node,
    Pending,
    Problems,
    Section,
    boolean,
    checked_length,
    choice,
    crlf_lines,
    duration,
    get_logger,
    hookimpl,
    nonempty_text,
    text_list,
)

if TYPE_CHECKING:
    from postbote import Account, Poll
    from postbote.plugins.imap.client import AppendResult, IMAPClient
    from postbote.plugins.imap.settings import ConnectionSettings

DESTINATION_KINDS = ("imap",)
INTERNALDATE_CHOICES = ("date", "fetch")
FUTURE_SLACK = timedelta(days=1)  # a Date: further ahead than this is not believed (it would sort on top for ever)
NUL_NOTE = " (the message holds a NUL byte, which IMAP allows only in a BINARY literal)"
# Messages of one Message-ID and size whose headers are compared, newest first: a server (or a folder) with more
# costs no more time than this; not found among them, the message is appended again -- a copy, never a loss.
MAX_FIND_CANDIDATES = 20
MAX_MESSAGE_ID = 900  # longer Message-IDs are not searched for (a line must fit in 1,000 octets)
MAX_REOPENS = 3  # sessions opened again in a row, none taking a message, before the rest of the poll is deferred

# RFC 3501 flag syntax: a system flag, or a keyword atom (no specials, no controls, ASCII). \Recent cannot be set.
SYSTEM_FLAGS = {flag.lower(): flag for flag in ("\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft")}
_KEYWORD = re.compile(r"[!#$&'+-Z^-z|~]+")  # ATOM-CHAR without "(){ %*\"\\]" (and "]", which resp-specials adds)

# NO response codes that mean "not now" (RFC 5530 and the extensions): the message is deferred, not rejected.
TEMPORARY_CODES = frozenset({
    "OVERQUOTA", "TRYCREATE", "UNAVAILABLE", "INUSE", "SERVERBUG", "NOPERM", "CONTACTADMIN", "EXPIRED",
    "AUTHORIZATIONFAILED", "AUTHENTICATIONFAILED", "PRIVACYREQUIRED", "CLIENTBUG",
})

# NO codes that say this message can never be stored there: rejected whatever the text says.
PERMANENT_CODES = frozenset({"TOOBIG", "LIMIT", "PARSE", "CANNOT", "UNKNOWN-CTE", "BADCHARSET"})
# Without a code (or with only [ALERT]), servers still say "not now" in words: Gmail's "Account exceeded command or
# bandwidth limits", "Mailbox is full", "try again later". Such a NO defers; any other is a rejection.
_NOT_NOW_TEXT = re.compile(r"quota|mailbox (is )?full|try (again|later)|temporar|unavailable|throttl|too many|"
                           r"rate limit|bandwidth|busy", re.IGNORECASE)

log = get_logger("postbote.imap_append")


def not_now(code: str | None, text: str) -> bool:
    """Whether a NO means "not now" (deferred) rather than "never" (rejected)."""
    if code in TEMPORARY_CODES:
        return True
    if code in PERMANENT_CODES:
        return False
    return bool(_NOT_NOW_TEXT.search(text))


@dataclass(frozen=True)
class IMAPAppendSettings:
    connection: ConnectionSettings  # host, port, TLS, login: read as for an IMAP source
    folder: str
    create_folder: bool = True
    flags: tuple[str, ...] = ()
    internaldate: str = "date"
    timeout: float = 60.0

    @property
    def label(self) -> str:
        """``user@host:port/folder``: names the destination in logs, answers and the state's delivery notes."""
        return f"{self.connection.server}/{self.folder}"

    # What postbote asks of an account's source, here for the destination: ``check`` reads the files, an inline
    # password needs a config file only its owner can read, ``describe`` says how it logs in.
    @property
    def files(self) -> Mapping[str, tuple[Path, int, str]]:
        return self.connection.files

    @property
    def holds_inline_password(self) -> bool:
        return self.connection.holds_inline_password

    def describe(self) -> str:
        flags = f", flags {' '.join(self.flags)}" if self.flags else ""
        return (f"{self.connection.describe()}; into {self.folder}"
                f"{'' if self.create_folder else ' (not created)'}{flags}, INTERNALDATE from {self.internaldate}")


def flag(value: Any) -> str:
    text = nonempty_text(value)
    if text.startswith("\\"):
        canonical = SYSTEM_FLAGS.get(text.lower())
        if canonical is None:
            raise ValueError(f"expected one of the system flags {', '.join(SYSTEM_FLAGS.values())} or a keyword "
                             f"(\\Recent cannot be set), got {text!r}")
        return canonical
    if not _KEYWORD.fullmatch(text):
        raise ValueError(f"expected a keyword of ASCII letters, digits and -_.$&'+!#^|~ (no spaces, brackets, "
                         f"quotes or %*\\), got {text!r}")
    return text


def flags(value: Any) -> list[str]:
    """The flags a message is appended with; ``[]`` says none, as the default does (docs/imap.md shows it)."""
    if value == []:
        return []
    return list(dict.fromkeys(flag(item) for item in text_list(value)))


@hookimpl
def parse_destination(kind: str, options: Node, problems: Problems, base_dir: Path) -> IMAPAppendSettings | None:
    if kind not in DESTINATION_KINDS:
        return None
    from postbote.plugins.imap.settings import connection_settings

    section = Section(options, problems)
    connection = connection_settings(section, base_dir)
    folder = section.get("folder", nonempty_text, "INBOX")
    create_folder = section.get("create_folder", boolean, True)
    append_flags = tuple(section.get("flags", flags, []))
    internaldate = section.get("internaldate", choice(*INTERNALDATE_CHOICES), "date")
    timeout = section.get("timeout", duration, 60.0)
    section.finish()
    if connection is None:
        return None
    return IMAPAppendSettings(connection=connection, folder=folder, create_folder=create_folder, flags=append_flags,
                              internaldate=internaldate, timeout=timeout)


@hookimpl
def deliver_message(message: Message, destination: Destination, account: Account,
                    poll: Poll) -> Delivered | Pending | None:
    """APPEND the message; the tagged answer is read later (`Pending`), after the source has sent the next one."""
    if destination.kind not in DESTINATION_KINDS:
        return None
    settings: IMAPAppendSettings = destination.settings
    session: AppendSession = poll.resource(("imap_append", destination.label),
                                           lambda: AppendSession(settings, account, poll),
                                           close=AppendSession.close)
    return Pending(session.append(message), confirmable=findable(message))


@hookimpl
def find_delivered(message: Message, destination: Destination, account: Account, poll: Poll) -> str | None:
    """After an APPEND that went out whole but was never answered: whether the folder holds the message already
    (see `AppendSession.find`), so that the poll records it instead of appending a second copy."""
    if destination.kind not in DESTINATION_KINDS or not findable(message):
        return None
    settings: IMAPAppendSettings = destination.settings
    session: AppendSession = poll.resource(("imap_append", destination.label),
                                           lambda: AppendSession(settings, account, poll),
                                           close=AppendSession.close)
    return session.find(message)


def findable(message: Message) -> bool:
    """Whether `AppendSession.find` can look for this message: it has a Message-ID to search by."""
    message_id = message.message_id or ""
    return 0 < len(message_id) <= MAX_MESSAGE_ID and message_id.isascii() and message_id.isprintable()


@hookimpl(tryfirst=True)
def authorize(account: Account, state_dir: Path, out: TextIO, flow: str, open_browser: bool,
              destination: str | None) -> int | None:
    """``postbote auth ACCOUNT`` for an account whose IMAP destination logs in with OAuth2 (``oauth2:``) while its
    source needs no authorization (the usual move: an old POP3 account with a password into Gmail or Outlook);
    ``postbote auth ACCOUNT --destination imap`` (or the destination's label) when the source needs one too."""
    targets = [d.settings for d in account.destinations
               if d.kind in DESTINATION_KINDS and d.settings.connection.credentials.oauth2 is not None
               and destination in (None, d.kind, d.label)]
    source_needs_one = getattr(getattr(account.source, "credentials", None), "oauth2", None) is not None
    if not targets or (destination is None and source_needs_one):
        return None
    from postbote.plugins.signin.authorize import run_auth  # HTTP and a browser: only for `postbote auth`
    from postbote.plugins.signin.login import AuthSettings

    settings: IMAPAppendSettings = targets[0]
    name = token_cache_name(account, settings)
    auth = AuthSettings.from_source(name, settings.connection, state_dir)
    return run_auth(auth.oauth2, out, account=name, cache_dir=auth.cache_dir, flow=flow, open_browser=open_browser)


def token_cache_name(account: Account, settings: IMAPAppendSettings) -> str:
    """The name a destination's cached OAuth2 access token goes by (STATE_DIR/oauth2/NAME.json): its own, so that
    it never meets the source's token of the same account."""
    return f"{account.name}.imap-" + re.sub(r"[^\w.@+-]", "_", settings.connection.server)


# ------------------------------------------------------------------ the session


@dataclass
class _Append:
    """One APPEND on the wire: what was sent, and once read, its answer (a result or the error it came to)."""

    message: Message
    length: int
    has_nul: bool
    internaldate: datetime | None
    answered: bool = False
    result: AppendResult | None = None
    error: Exception | None = None
    retried: bool = False


@dataclass
class AppendSession:
    """The destination's IMAP session for one poll: opened on the first message, opened again after it broke
    (`MAX_REOPENS` times in a row at most without a message taken), and given up for the rest of the poll once it
    cannot be opened."""

    settings: IMAPAppendSettings
    account: Account
    poll: Poll
    client: IMAPClient | None = None
    failure: DeliveryError | None = None  # why the session cannot be opened in this poll
    reopens: int = 0  # sessions opened since the server last took a message
    created: bool = False
    in_flight: deque[_Append] = field(default_factory=deque)

    @property
    def where(self) -> str:
        return f"imap {self.settings.label}"

    # ---- opening and closing

    def session(self) -> IMAPClient:
        if self.client is not None:
            return self.client
        if self.failure is not None:
            raise self.failure
        if self.reopens > MAX_REOPENS:
            self.failure = DeliveryError(f"{self.where}: the connection broke {self.reopens} times in a row; "
                                         "the remaining messages are tried on the next poll", temporary=True)
            raise self.failure
        from postbote.plugins.imap.login import open_session

        try:
            # No session deadline: ``poll.deadline`` is the source's first budget (login and listing), which a long
            # poll outlives; each wait here is bounded by the timeout, a whole answer line within it (as for SMTP).
            self.client = open_session(self.settings.connection, account=token_cache_name(self.account, self.settings),
                                       state_dir=self.poll.state_dir, timeout=self.settings.timeout, deadline=None)
        except (AccountError, CredentialError, OSError) as exc:
            self.failure = DeliveryError(f"{self.where}: {exc}", temporary=True)
            log.warning("imap_append.session_failed", destination=self.settings.label, error=str(exc),
                        reason="the messages of this poll stay on the source server and are tried on the next poll")
            raise self.failure from None
        self.reopens += 1
        log.debug("imap_append.session_opened", destination=self.settings.label,
                  capabilities=sorted(self.client.capabilities))
        return self.client

    def drop(self, reason: str) -> None:
        """End a session that is broken or out of step; every APPEND still unanswered fails with ``reason``."""
        client, self.client = self.client, None
        if client is not None:
            client.close()
        while self.in_flight:  # each of these went out whole: the server may have stored it before the break
            entry = self.in_flight.popleft()
            entry.answered = True
            entry.error = DeliveryError(f"{reason} (after the whole message was sent: it may have arrived)",
                                        temporary=True, in_doubt=True)

    def close(self) -> None:
        client, self.client = self.client, None
        if client is None:
            return
        if self.in_flight:  # answers nobody will record: the messages stay on the source and come again
            client.close()
            return
        try:
            client.logout()
        except Exception:  # noqa: BLE001 - the messages are recorded; a failed LOGOUT loses nothing
            client.close()

    # ---- appending

    def append(self, message: Message) -> Callable[[], str]:
        """Send the APPEND of ``message``; returns the wait for its answer."""
        client = self.session()
        length, has_nul = measure(message)
        entry = _Append(message, length, has_nul, internaldate=self.internaldate_of(message))
        self.send(client, entry)
        return lambda: self.wait(entry)

    def send(self, client: IMAPClient, entry: _Append) -> None:
        from postbote.plugins.imap.client import IMAPConnectionError, IMAPError

        try:
            self.send_append(client, entry)
        except IMAPError as exc:  # answered at once (without LITERAL+ the server may refuse instead of "+")
            entry.answered, entry.error = True, exc
            return
        except (IMAPConnectionError, OSError, LengthChanged) as exc:
            self.drop(f"{self.where}: {exc}")
            raise DeliveryError(f"{self.where}: sending the message failed: {exc}", temporary=True) from None
        self.in_flight.append(entry)

    def send_append(self, client: IMAPClient, entry: _Append) -> None:
        chunks = checked_length(crlf_lines(entry.message.chunks()), entry.length)
        client.send_append(self.settings.folder, chunks, entry.length, flags=self.settings.flags,
                           internaldate=entry.internaldate)

    def internaldate_of(self, message: Message) -> datetime | None:
        """The Date: field as a time, unless ``internaldate: fetch`` or it cannot be believed: then None, which
        leaves INTERNALDATE to the server (the time of the APPEND: of the fetch, within seconds)."""
        if self.settings.internaldate == "fetch":
            return None
        return sent_at(message.get_header("Date"), now=datetime.now(UTC))

    def wait(self, entry: _Append) -> str:
        """The answer to ``entry``'s APPEND (read in turn after those sent before it): its text, or it raises."""
        self.read_until(entry)
        if entry.error is None:
            self.reopens = 0
            return self.answer(entry.result)
        return self.refused(entry, entry.error)

    def read_until(self, entry: _Append) -> None:
        """Read answers, in the order their APPENDs went out, until ``entry``'s has come."""
        from postbote.plugins.imap.client import IMAPConnectionError, IMAPError

        while not entry.answered:
            head = self.in_flight[0]
            client = self.client
            assert client is not None, "an APPEND is in flight without a session"
            try:
                head.result = client.read_append()
            except IMAPError as exc:
                head.error = exc
            except (IMAPConnectionError, OSError) as exc:
                self.drop(f"{self.where}: the session ended before the server confirmed the message ({exc}); "
                          "it stays on the source server and is tried again")
                continue
            head.answered = True
            self.in_flight.popleft()

    def answer(self, result: AppendResult | None) -> str:
        if result is not None and result.uid is not None:
            return (f"imap: appended to {self.settings.folder} as UID {result.uid} "
                    f"(UIDVALIDITY {result.uidvalidity})")
        return f"imap: appended to {self.settings.folder}"

    def refused(self, entry: _Append, error: Exception) -> str:
        """What a NO or BAD (or a dropped session) means for the message: raises, or retries after a CREATE."""
        from postbote.plugins.imap.client import IMAPError

        if isinstance(error, DeliveryError):
            raise error
        assert isinstance(error, IMAPError)
        said = f"{self.where}: {error.status} {f'[{error.code}] ' if error.code else ''}{error.text}"
        if error.status == "BAD":
            self.drop(f"{self.where}: the session was ended after a BAD answer")
            if entry.has_nul:
                raise DeliveryError(said + NUL_NOTE, temporary=False)
            raise DeliveryError(f"{said}; the session was ended, the message is tried again", temporary=True)
        if error.code == "TRYCREATE":
            if not self.settings.create_folder:
                raise DeliveryError(f"{said}; the folder {self.settings.folder!r} does not exist and create_folder "
                                    "is false: create it on the server, or set create_folder: true", temporary=True)
            if not entry.retried:
                return self.create_and_retry(entry)
        if not_now(error.code, error.text):
            raise DeliveryError(said, temporary=True)
        reason = said
        if entry.has_nul:
            reason += NUL_NOTE
        raise DeliveryError(reason, temporary=False)

    def create_and_retry(self, entry: _Append) -> str:
        """CREATE the folder (once per session), then APPEND the message again and wait for that answer."""
        from postbote.plugins.imap.client import IMAPConnectionError, IMAPError

        client = self.client
        if client is None:
            raise DeliveryError(f"{self.where}: the session ended before the folder could be created", temporary=True)
        self.drain()
        if not self.created:
            try:
                client.create(self.settings.folder)
            except IMAPError as exc:
                raise DeliveryError(f"{self.where}: creating the folder {self.settings.folder!r} failed: "
                                    f"{exc.status} {exc.text}", temporary=True) from None
            except (IMAPConnectionError, OSError) as exc:
                self.drop(f"{self.where}: {exc}")
                raise DeliveryError(f"{self.where}: creating the folder failed: {exc}", temporary=True) from None
            self.created = True
            log.info("imap_append.folder_created", destination=self.settings.label, folder=self.settings.folder)
        entry.retried, entry.answered, entry.result, entry.error = True, False, None, None
        self.send(client, entry)
        return self.wait(entry)

    # ---- finding a message whose APPEND was never answered

    def find(self, message: Message) -> str | None:
        """Where the folder holds ``message`` already, or None. Found means: a message with its Message-ID, exactly
        its size as it would be appended now, and the same header fields apart from our ``Received:`` trace
        field (which carries the time of each fetch). So another message with the same Message-ID (a copy sent to
        two addresses, a list's copy) is never taken for this one."""
        from postbote.plugins.imap.client import IMAPConnectionError, IMAPError
        from postbote.plugins.imap.wire import WireError

        client = self.session()
        self.drain()
        length, _ = measure(message)
        ours = fields_besides_our_trace(crlf_header_block(message.header_bytes))
        try:
            self.select_folder(client)
            if client.selected is None:
                return None
            found = client.search_message((message.message_id or "").encode("ascii"), length)
            for uid in sorted(found, reverse=True)[:MAX_FIND_CANDIDATES]:  # ours is most likely the newest
                theirs = client.header_block(uid)
                if theirs is not None and fields_besides_our_trace(theirs) == ours:
                    return f"{self.settings.folder}, UID {uid} (UIDVALIDITY {client.selected.uidvalidity})"
        except IMAPError as exc:
            raise DeliveryError(f"{self.where}: looking for a message whose delivery was not answered failed: "
                                f"{exc.status} {exc.text}", temporary=True) from None
        except (IMAPConnectionError, OSError, WireError) as exc:
            self.drop(f"{self.where}: {exc}")
            raise DeliveryError(f"{self.where}: looking for a message whose delivery was not answered failed: "
                                f"{exc}", temporary=True) from None
        return None

    def select_folder(self, client: IMAPClient) -> None:
        """EXAMINE the destination folder (read-only: nothing is marked seen), once per session; a folder that does
        not exist holds nothing."""
        from postbote.plugins.imap.client import IMAPError

        if client.selected is not None and client.selected.name == self.settings.folder:
            return
        try:
            client.select(self.settings.folder, read_only=True)
        except IMAPError as exc:
            if exc.status != "NO":
                raise
            client.selected = None

    def drain(self) -> None:
        """Read every answer still on its way, so that the next command's answer is the next one read."""
        if self.in_flight:
            self.read_until(self.in_flight[-1])


# ------------------------------------------------------------------ the bytes


def measure(message: Message) -> tuple[int, bool]:
    """The octets of the message's CRLF form (the literal's length, which must be known before it is sent), and
    whether it holds a NUL byte: one pass over the spooled message, never holding it whole."""
    encoder = CRLFEncoder()
    length = 0
    has_nul = False
    for chunk in message.chunks():
        length += len(encoder.encode(chunk))
        has_nul = has_nul or b"\0" in chunk
    return length + len(encoder.finish()), has_nul


def crlf_header_block(header_bytes: bytes) -> bytes:
    encoder = CRLFEncoder()
    return encoder.encode(header_bytes) + encoder.finish()


_OUR_TRACE = re.compile(rb"received:[^\r\n]*\(postbote, account ", re.IGNORECASE)


def fields_besides_our_trace(block: bytes) -> list[bytes]:
    """The header fields of a CRLF header block (each with its folded lines), without postbote's ``Received:``
    fields and the blank line that ends the block."""
    fields: list[bytes] = []
    for line in block.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\r\n" + line
        elif line:
            fields.append(line)
    return [field for field in fields if not _OUR_TRACE.match(field)]


def sent_at(date_field: str | None, *, now: datetime) -> datetime | None:
    """The time a ``Date:`` field names, or None when it is missing, unreadable, or more than a day ahead."""
    if not date_field:
        return None
    try:
        import email.utils  # only for an APPEND: every poll imports this plugin

        when = email.utils.parsedate_to_datetime(date_field)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:  # "-0000": no zone known (RFC 5322 3.3); taken as UTC
        when = when.replace(tzinfo=UTC)
    try:
        if when.year < 1970 or when - now > FUTURE_SLACK:
            return None
    except OverflowError:
        return None
    return when
