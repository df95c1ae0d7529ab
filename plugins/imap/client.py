"""An IMAP4rev1 client (RFC 3501, and RFC 9051 servers) that distrusts the server, shared by the IMAP source and the
IMAP APPEND destination.

Why our own client rather than a library: the standard library's ``imaplib`` reads every literal whole into memory
(a 200 MB message would be 200 MB of RSS, and a hostile server can announce any size), has no IDLE before Python
3.14, no pipelining and only a socket timeout per read; IMAPClient (the well-kept third-party library) is built on
``imaplib`` and inherits all of that. This client is on the same footing as the POP3 one
(`postbote.plugins.pop3.client`): its own buffered receiver over the socket; responses framed and parsed as they
arrive (`postbote.plugins.imap.wire`), the literal of a message streamed into a sink in chunks, never held whole;
every response line, literal, response count and listing bounded; every wait bounded by ``timeout`` per read, by
``timeout`` per whole response line and by the session's ``deadline``; commands written ahead and their answers
read in order (pipelined UID FETCH and APPEND, tags ``A0001``...); IDLE in pieces for a selector loop.

Only a well-formed tagged NO or BAD (`IMAPError`) leaves the session usable. A BYE, a closed connection or a timeout
is an `IMAPConnectionError`; anything out of step, malformed or over a bound an `IMAPProtocolError` (a subclass):
the caller then closes the connection without expunging anything. No secret (a LOGIN password, an AUTHENTICATE
response) ever appears in an exception message; what the server says is cleaned of them too.

A session, as the IMAP source drives it::

    client = IMAPClient.connect(host, 143, implicit_tls=False, tls=policy, timeout=30, deadline=poll_deadline)
    client.starttls(policy)                         # IMAPError when not offered: never goes on in clear
    client.login(user, password)                    # or client.authenticate(mechanism)
    client.select("INBOX")                          # SelectedFolder(exists, uidvalidity, uidnext, read_only)
    listed = client.listing()                       # [ListedMessage(uid, size, flags)], ascending UID
    for entry in listed[:window]:
        client.send_fetch(entry.uid, limit=cap)     # pipelined: written ahead
    size = client.read_fetched(spool.write)         # in order: None when the message is gone
    client.store_flags([uid], ["\\Deleted"]); client.uid_expunge([uid])   # never a bare EXPUNGE
    client.logout()

and IDLE in a selector loop: ``idle_start()`` (True: news came already), then ``idle_read()`` whenever ``fileno()``
is readable (True: an EXISTS, or the server ended IDLE), ``idle_done()`` before any other command.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import itertools
import re
import socket
import ssl
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any, Protocol, TypeVar, cast

from postbote import AccountError, LoginRefused, Secret, StartTLS, TLSPolicy, protocol_trace
from postbote.plugins.imap import wire
from postbote.plugins.imap.wire import Atom, Response, Streamed, Value, WireError

MAX_LINE = 64 * 1024  # one response line (a segment between literals)
STARTTLS = StartTLS(greeting=b"* OK", command=b"P STARTTLS", granted=b"P OK")
"""How a second connection asks for TLS, to read a refused certificate again (`TLSPolicy.wrap`)."""
# What IMAP4rev2 (RFC 9051, appendix E) makes part of the base protocol: a server that speaks it offers these
# commands and answers whether or not it names them (and a rev2-only server answers SEARCH with ESEARCH).
IMAP4REV2_INCLUDES = frozenset({"UIDPLUS", "MOVE", "ESEARCH", "LITERAL-", "IDLE", "NAMESPACE", "ENABLE", "SASL-IR",
                                "UNSELECT", "SPECIAL-USE", "CHILDREN", "LIST-EXTENDED", "LIST-STATUS", "BINARY",
                                "STATUS=SIZE", "SEARCHRES"})
MAX_SEARCH_LINE = 16 * 1024 * 1024  # a SEARCH answer is one line for all the UIDs (~1.5 million; ESEARCH: compact)
MAX_SMALL_LITERAL = 64 * 1024  # a literal nobody asked to stream (a folder name, a label, ...)
MAX_LITERALS = 1000  # literals in one response
MAX_KEPT_LITERALS = 1024 * 1024  # octets of kept (not streamed) literals in one response
MAX_RESPONSES = 100_000  # untagged responses absorbed while waiting for one command's answer
MAX_LISTING = 2_000_000  # messages in one listing
MAX_FOLDERS = 100_000  # folders in one LIST answer
MAX_HEADER_BLOCK = 256 * 1024
_UID_ITEM = re.compile(rb"[( ]UID ([0-9]{1,10}) ", re.IGNORECASE)
READ_SIZE = 1 << 18
WRITE_SIZE = 64 * 1024  # a literal's small pieces are gathered into writes of this size
LARGE_WRITE = 256 * 1024  # a literal's large pieces go out in writes of at most this size
FLUSH_AFTER = 32  # pipelined commands collected before a write at most
LITERAL_MINUS_MAX = 4096  # RFC 7888: LITERAL- allows non-synchronizing literals up to 4096 octets
IDLE_RECEIVES = 64  # reads of data TLS already holds in one idle_read() at most


class IMAPError(AccountError):
    """The server answered a command with a well-formed tagged NO or BAD: the session is still in step.

    ``status`` is "NO" or "BAD", ``code`` the response code's atom upper-case ("TRYCREATE", "OVERQUOTA",
    "ALREADYEXISTS", ... or None), ``text`` the human text (cleaned of any secret we sent)."""

    def __init__(self, message: str, *, status: str = "NO", code: str | None = None, text: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.text = text


class IMAPAuthError(IMAPError, LoginRefused):
    """LOGIN or AUTHENTICATE was refused."""


class IMAPConnectionError(AccountError):
    """Connecting failed, a wait timed out, the connection closed or the server said BYE: the session is over."""


class IMAPProtocolError(IMAPConnectionError):
    """The server said something out of step, malformed or over a bound: nothing more on this connection can be
    trusted to answer the command it seems to answer, so the session ends without expunging."""


class LiteralTooLarge(IMAPProtocolError):
    """A literal larger than the limit given for it (the rest of it is unread, so the session cannot go on)."""


class SASLMechanism(Protocol):
    """One SASL exchange as `IMAPClient.authenticate` drives it (implemented by `postbote.plugins.signin.sasl`)."""

    name: str

    def initial_response(self) -> bytes | None:
        """The client-first data, or None for server-first mechanisms."""

    def respond(self, challenge: bytes) -> bytes:
        """The answer to one server challenge (decoded from base64)."""


@dataclass(frozen=True)
class SelectedFolder:
    name: str
    exists: int
    uidvalidity: int
    uidnext: int | None
    read_only: bool


@dataclass(frozen=True)
class FolderInfo:
    name: str
    delimiter: str | None
    flags: frozenset[str]  # upper-case: "\\NOSELECT", "\\HASCHILDREN", "\\TRASH", ...


@dataclass(frozen=True, slots=True)  # slots: a listing may hold a million of them
class ListedMessage:
    uid: int
    size: int
    flags: frozenset[str]  # as the server spells them: "\\Seen", "$Forwarded"
    gm_msgid: int | None = None


@dataclass(frozen=True)
class AppendResult:
    uidvalidity: int | None  # from [APPENDUID v u] when the server has UIDPLUS
    uid: int | None


class Wait(Enum):
    """The limit that bounds the wait in progress, so that a timeout says which one expired."""

    READ = "timeout"
    LINE = "line"
    SESSION = "deadline"


Sink = Callable[[bytes], None]


@dataclass
class _Command:
    """A command sent (or queued) whose answer has not been read."""

    tag: str
    kind: str  # "FETCH", "APPEND", "IDLE", "SIMPLE"
    shown: str  # how it is named in messages (never with a secret)
    uid: int | None = None  # FETCH: the UID asked for
    limit: int = 0  # FETCH: the most octets of the message accepted
    done: Response | None = None  # the tagged answer, once read
    returned: bool = False  # the caller has had its answer (a fetch's data may come before its tagged OK)
    had_data: bool = False  # FETCH: its message data arrived


class _Later(Exception):
    """The message data arriving belongs to a later UID FETCH in line: the one being read has none."""


class Receiver:
    """The receiving side of the connection: a buffer the client looks into, filled from the socket."""

    def __init__(self, sock: socket.socket, size: int = READ_SIZE) -> None:
        self.size = size
        self._sock = sock
        self._data = b""
        self._pos = 0

    @property
    def pending(self) -> int:
        return len(self._data) - self._pos

    def peek(self, count: int) -> bytes:
        return self._data[self._pos:self._pos + count]

    def fill(self) -> bool:
        """Receive what the server sent (waiting for it); False at the end of the stream."""
        more = self._sock.recv(self.size)
        if not more:
            return False
        self._data = self._data[self._pos:] + more if self._pos < len(self._data) else more
        self._pos = 0
        return True

    def line(self, limit: int) -> bytes | None:
        """The next line with its LF (or ``limit`` bytes of a longer one), None when it has not arrived whole."""
        end = self._data.find(b"\n", self._pos, self._pos + limit)
        if end == -1:
            if self.pending < limit:
                return None
            end = self._pos + limit - 1
        return self._take(end + 1)

    def has_line(self) -> bool:
        return self._data.find(b"\n", self._pos) != -1

    def take(self, count: int) -> bytes:
        """Up to ``count`` bytes of what has arrived."""
        return self._take(min(len(self._data), self._pos + count))

    def _take(self, end: int) -> bytes:
        data = self._data
        taken = data[self._pos:end]  # (all of it: the same object, no copy)
        if end >= len(data):  # drained: let the last read go (an idle connection keeps no 256 KiB buffer)
            self._data, self._pos = b"", 0
        else:
            self._pos = end
        return taken


def _fetch_items(response: Response) -> dict[str, Value]:
    """The items of a ``* n FETCH (...)`` response, names upper-cased; malformed -> WireError."""
    if len(response.values) != 1 or not isinstance(response.values[0], list):
        raise WireError("a FETCH response without its parenthesised list")
    items = response.values[0]
    if len(items) % 2:
        raise WireError("a FETCH response with an item without its value")
    result: dict[str, Value] = {}
    for index in range(0, len(items), 2):
        name = items[index]
        if not isinstance(name, Atom):
            raise WireError("a FETCH item name that is not an atom")
        key = name.upper()
        if key in result:
            raise WireError(f"a FETCH response with {key} twice")
        result[key] = items[index + 1]
    return result


def _flags_of(value: Value) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(flag, Atom) for flag in value):
        raise WireError("FLAGS that are not a list of atoms")
    return frozenset(str(flag) for flag in value)


def _is_body(name: str) -> bool:
    """``BODY[]`` (maybe with an origin ``<0>``) or ``RFC822``: the whole message."""
    return name in ("BODY[]", "RFC822") or (name.startswith("BODY[]<") and name.endswith(">"))


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _session_over_on_error(method: _Method) -> _Method:
    """An `IMAPConnectionError` (a protocol error too) closes the socket before it is raised: nothing more that
    arrives can be trusted, and whatever the caller tries next fails at once instead of reading out of step."""

    @functools.wraps(method)
    def guarded(self: IMAPClient, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except IMAPConnectionError:
            self.close()
            raise

    return cast(_Method, guarded)


class IMAPClient:
    """An IMAP session that stays in step with the server or ends; see the module docstring."""

    def __init__(self, sock: socket.socket, *, host: str, timeout: float, deadline: float | None = None,
                 read_buffer: int = READ_SIZE) -> None:
        self.host = host
        self.timeout = timeout
        self.deadline = deadline
        self._sock = sock
        self._socket_timeout: float | None = sock.gettimeout()
        self._receiver = Receiver(sock, read_buffer)
        self._started = time.monotonic()
        self._wait = Wait.READ
        self._doing = "reading the greeting"
        self._next_tag = 1
        self._outgoing = bytearray()
        self._queued = 0
        self._in_flight: deque[_Command] = deque()
        self._secrets: list[str] = []
        self._trace = protocol_trace("IMAP")  # None unless ``postbote -v``: each hook below is one ``if``
        self._sink: Sink | None = None  # where the literal of the FETCH being read goes
        self._fetching: _Command | None = None  # the UID FETCH whose answer is being read
        self._partial: tuple[list[bytes], list[bytes | Streamed], int, str] | None = None  # a response begun
        self._header_limit = 0  # set while a BODY[HEADER] is read
        self._idle: _Command | None = None
        self._closed = False
        self._idle_news = False  # an EXISTS or RECENT arrived (what idle_read reports)
        self._idle_over = False  # the server ended IDLE by itself
        self._logging_out = False  # the BYE that LOGOUT brings is no error
        self._bye_seen = False
        self.greeting = ""
        self.capabilities: frozenset[str] = frozenset()
        self.login_choice = ""  # the auth choice the login used (set by the IMAP plugin's login)
        self.exists: int | None = None  # the selected folder's message count, as EXISTS/EXPUNGE tell
        # the UID of each message number of the selected folder as far as FETCH responses told it (0: not yet),
        # kept in step with EXISTS and EXPUNGE: a FETCH whose number and UID disagree with it is out of step
        self._seqs: array[int] | None = None
        self.selected: SelectedFolder | None = None
        self.copied: dict[int, int] = {}  # what the last move() copied: source UID -> UID in the target folder
        self.copy_confirmed: list[int] = []  # the UIDs the last move() by UID COPY has copied (COPYUID or not)

    # --- connecting -------------------------------------------------------------------------------------------

    @classmethod
    def connect(cls, host: str, port: int, *, implicit_tls: bool, tls: TLSPolicy, timeout: float,
                deadline: float | None = None) -> IMAPClient:
        """Connect and read the greeting (and the capabilities, when the greeting does not carry them)."""
        where = f"{host}:{port}"
        connect_timeout = timeout if deadline is None else max(0.0, min(timeout, deadline - time.monotonic()))
        try:
            sock = socket.create_connection((host, port), timeout=connect_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except TimeoutError:
            raise IMAPConnectionError(f"connecting to {where} timed out after {connect_timeout:g} s") from None
        except OSError as exc:
            raise IMAPConnectionError(f"cannot connect to {where}: {exc.strerror or exc}") from None
        try:
            if implicit_tls:
                sock = tls.wrap(sock, host, where, implicit=True)
            client = cls(sock, host=host, timeout=timeout, deadline=deadline)
            client.read_greeting()
        except BaseException:
            sock.close()
            raise
        return client

    def read_greeting(self) -> str:
        """``* OK`` (or ``* PREAUTH``) and its text; ``* BYE`` raises `IMAPConnectionError`."""
        self._doing = "reading the greeting"
        try:
            response = self._read_response()
        except IMAPConnectionError as exc:
            if self.encrypted or "timed out" not in str(exc):
                raise
            raise IMAPConnectionError(f"{exc}: if this port speaks TLS from the first byte (IMAPS, usually 993), "
                                      "set tls: implicit") from None
        if response.tag != "*" or response.kind not in ("OK", "PREAUTH", "BYE"):
            raise IMAPProtocolError(f"{self.host}: not an IMAP greeting: {response.kind}")
        if response.kind == "BYE":
            raise IMAPConnectionError(f"{self.host}: the server refused the connection: {self._clean(response.text)}")
        self.greeting = response.text
        if response.code == "CAPABILITY":
            self._set_capabilities(response.code_args)
        else:
            self.capability()
        return self.greeting

    @property
    def encrypted(self) -> bool:
        """Whether the session runs over TLS now (implicit, or after STARTTLS)."""
        return isinstance(self._sock, ssl.SSLSocket)

    def tls_facts(self) -> dict[str, str]:
        """The server certificate as ``check --connect`` shows it ({} without TLS)."""
        from postbote import certificate_facts

        return certificate_facts(self._sock) if isinstance(self._sock, ssl.SSLSocket) else {}

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def in_flight(self) -> int:
        """Commands sent (or queued) whose answers the caller has not read yet. (A UID FETCH whose message was
        read may still await its tagged OK, which comes later: Dovecot sends the data of pipelined fetches first;
        it is read with the next answer.)"""
        return sum(not command.returned for command in self._in_flight)

    def _next_in_line(self) -> _Command | None:
        return next((command for command in self._in_flight if not command.returned), None)

    # --- capabilities, TLS, login ---------------------------------------------------------------------------

    @_session_over_on_error
    def capability(self) -> frozenset[str]:
        self._simple("CAPABILITY")
        return self.capabilities

    def has(self, capability: str) -> bool:
        """Whether the server offers ``capability``: named, or part of IMAP4rev2 (RFC 9051), which a server that
        speaks it need not name on its own."""
        wanted = capability.upper()
        return wanted in self.capabilities or (wanted in IMAP4REV2_INCLUDES and "IMAP4REV2" in self.capabilities)

    @_session_over_on_error
    def starttls(self, tls: TLSPolicy) -> None:
        """Upgrade the connection; fails closed (`IMAPError` when STARTTLS is not offered, never goes on in clear).
        Whatever the server sent before the handshake is discarded, and the capabilities are asked for again."""
        if not self.has("STARTTLS"):
            raise IMAPError(f"{self.host} does not offer STARTTLS; refusing to log in without TLS (tls: starttls)",
                            status="NO")
        self._simple("STARTTLS")
        self._receiver = Receiver(self._sock, self._receiver.size)  # drop what came before the handshake
        self._sock = tls.wrap(self._sock, self.host, self.host, starttls=STARTTLS)
        self._socket_timeout = self._sock.gettimeout()
        self._receiver = Receiver(self._sock, self._receiver.size)
        self.capabilities = frozenset()
        self.capability()

    @_session_over_on_error
    def login(self, username: str, password: Secret) -> None:
        """LOGIN, with each argument quoted or, when it needs one, sent as a literal; `IMAPAuthError` if refused."""
        if self.has("LOGINDISABLED"):
            raise IMAPAuthError(f"{self.host}: LOGIN is disabled on this connection (LOGINDISABLED)", status="NO")
        secret = password.reveal()
        self._secrets.append(secret)
        if "\0" in username or "\0" in secret:
            raise IMAPAuthError(f"{self.host}: the username or password contains a NUL, which IMAP LOGIN cannot "
                                "send", status="NO")
        command = self._new_command("SIMPLE", "LOGIN")
        self._write_with_literals(command, "LOGIN", [username.encode("utf-8"), secret.encode("utf-8")])
        self._auth_finish(command)

    def sasl_mechanisms(self) -> list[str]:
        return sorted(c[5:] for c in self.capabilities if c.startswith("AUTH="))

    @_session_over_on_error
    def authenticate(self, mechanism: SASLMechanism, *, max_rounds: int = 10) -> None:
        """AUTHENTICATE (RFC 3501 6.2.2), with the initial response on the command line when the server has
        SASL-IR (RFC 4959)."""
        name = mechanism.name.upper()
        initial = mechanism.initial_response()
        encoded = None if initial is None else (base64.b64encode(initial).decode("ascii") or "=")
        if encoded is not None:
            self._secrets.append(encoded)
        command = self._new_command("SIMPLE", f"AUTHENTICATE {name}")
        if encoded is not None and self.has("SASL-IR"):
            self._write_line(f"{command.tag} AUTHENTICATE {name} {encoded}")
            encoded = None
        else:
            self._write_line(f"{command.tag} AUTHENTICATE {name}")
        for _ in range(max_rounds):
            response = self._until_continuation(command)
            if response is None:
                self._auth_finish(command)
                return
            if encoded is not None:
                reply, encoded = encoded, None
            else:
                try:
                    challenge = base64.b64decode(response.text.strip(), validate=True)
                except binascii.Error:
                    self._cancel_authentication(command)
                    raise IMAPAuthError(f"{self.host}: invalid base64 in an AUTHENTICATE {name} challenge",
                                        status="NO") from None
                try:
                    reply = base64.b64encode(mechanism.respond(challenge)).decode("ascii")
                except Exception:
                    self._cancel_authentication(command)
                    raise
                self._secrets.append(reply)
            self._write_line(reply)
        self._cancel_authentication(command)
        raise IMAPAuthError(f"{self.host}: AUTHENTICATE {name} took more than {max_rounds} rounds", status="NO")

    def _cancel_authentication(self, command: _Command) -> None:
        """Send "*" (RFC 3501: cancels the exchange) and read the tagged BAD/NO that ends it."""
        self._write_line("*")
        with contextlib.suppress(IMAPError):
            self._finish(command)

    def _auth_finish(self, command: _Command) -> None:
        try:
            response = self._finish(command)
        except IMAPAuthError:
            raise
        except IMAPError as exc:
            raise IMAPAuthError(str(exc), status=exc.status, code=exc.code, text=exc.text) from None
        if response.code != "CAPABILITY":
            self.capability()  # RFC 3501: the capabilities may change after login

    # --- folders ----------------------------------------------------------------------------------------------

    @_session_over_on_error
    def list_folders(self, pattern: str = "*") -> list[FolderInfo]:
        """``LIST "" pattern``: the folders, names decoded from modified UTF-7."""
        command = self._command("SIMPLE", f'LIST "" {self._mailbox(pattern)}', shown="LIST")
        folders: list[FolderInfo] = []

        def keep(response: Response) -> bool:
            if response.kind != "LIST":
                return False
            if len(folders) >= MAX_FOLDERS:
                raise IMAPProtocolError(f"{self.host}: more than {MAX_FOLDERS} folders in a LIST answer")
            folders.append(self._folder_info(response))
            return True

        self._finish(command, keep)
        return folders

    def _folder_info(self, response: Response) -> FolderInfo:
        values = response.values
        if len(values) < 3 or not isinstance(values[0], list):  # extended data (RFC 5258) may follow: ignored
            raise self._malformed("LIST", "not (flags) delimiter name")
        flags = frozenset(str(flag).upper() for flag in values[0] if isinstance(flag, Atom))
        if len(flags) != len(values[0]):
            raise self._malformed("LIST", "a flag that is not an atom")
        delimiter: str | None = None
        if values[1] is not None:
            try:
                delimiter = wire.string_of(values[1], "delimiter").decode("ascii")
            except (WireError, UnicodeDecodeError):
                raise self._malformed("LIST", "a bad delimiter") from None
        try:
            name = wire.decode_mailbox(wire.string_of(values[2], "name"))
        except WireError as exc:
            raise self._malformed("LIST", str(exc)) from None
        if name.upper() == "INBOX":
            name = "INBOX"  # case-insensitive (RFC 3501 5.1): one spelling for the state records
        return FolderInfo(name, delimiter, flags)

    @_session_over_on_error
    def select(self, folder: str, *, read_only: bool = False) -> SelectedFolder:
        """SELECT (or EXAMINE with ``read_only``); a server that does not say the UIDVALIDITY is out of step."""
        verb = "EXAMINE" if read_only else "SELECT"
        self.selected = None
        self.exists = None
        self._seqs = array("I")
        command = self._command("SIMPLE", f"{verb} {self._mailbox(folder)}", shown=f"{verb} {folder}")
        found: dict[str, int] = {}

        def keep(response: Response) -> bool:
            if response.kind == "OK" and response.code in ("UIDVALIDITY", "UIDNEXT"):
                try:
                    found[response.code] = wire.number_of(Atom(response.code_args.strip()), response.code,
                                                          minimum=1)
                except WireError:
                    raise self._malformed(verb, f"a bad {response.code}") from None
                return True
            return False

        done = self._finish(command, keep)
        if "UIDVALIDITY" not in found:
            raise IMAPProtocolError(f"{self.host}: {verb} {folder}: the server did not say the UIDVALIDITY")
        if self.exists is None:
            raise IMAPProtocolError(f"{self.host}: {verb} {folder}: the server did not say how many messages exist")
        self.selected = SelectedFolder(folder, self.exists, found["UIDVALIDITY"], found.get("UIDNEXT"),
                                       read_only or done.code == "READ-ONLY")
        return self.selected

    @_session_over_on_error
    def create(self, folder: str) -> None:
        """CREATE; a folder that exists already ([ALREADYEXISTS]) counts as created."""
        try:
            self._simple(f"CREATE {self._mailbox(folder)}", shown=f"CREATE {folder}")
        except IMAPError as exc:
            if exc.code != "ALREADYEXISTS":
                raise

    # --- listing and fetching ---------------------------------------------------------------------------------

    @_session_over_on_error
    def listing(self, *, unseen_only: bool = False, gmail: bool = False) -> list[ListedMessage]:
        """Every message of the selected folder (or the unseen ones), ascending UID, with size and flags."""
        if self.selected is None:
            raise RuntimeError("listing() without a selected folder")
        items = "UID RFC822.SIZE FLAGS" + (" X-GM-MSGID" if gmail else "")
        if unseen_only:
            uids = self.search_unseen()
            if not uids:
                return []
            commands = [self._command("SIMPLE", f"UID FETCH {part} ({items})", shown="UID FETCH", defer=True)
                        for part in wire.uid_sets(uids)]
        else:
            if not self.exists:
                return []
            commands = [self._command("SIMPLE", f"UID FETCH 1:* ({items})", shown="UID FETCH")]
        listed: dict[int, ListedMessage] = {}
        flag_sets: dict[frozenset[str], frozenset[str]] = {}

        def keep(response: Response) -> bool:
            if response.kind != "FETCH":
                return False
            try:
                fetched = _fetch_items(response)
                if "UID" not in fetched:
                    return True  # an unsolicited flag change
                uid = wire.number_of(fetched["UID"], "UID", minimum=1)
                self._check_number(response.number, uid)
                if "RFC822.SIZE" not in fetched or "FLAGS" not in fetched:
                    return True
                size = wire.number_of(fetched["RFC822.SIZE"], "RFC822.SIZE", maximum=2**63)
                flags = _flags_of(fetched["FLAGS"])
                flags = flag_sets.setdefault(flags, flags)  # one object for each combination of flags
                msgid = None
                if gmail and "X-GM-MSGID" in fetched:
                    msgid = wire.number_of(fetched["X-GM-MSGID"], "X-GM-MSGID", maximum=2**64 - 1)
            except WireError as exc:
                raise self._malformed("UID FETCH", str(exc)) from None
            if uid not in listed and len(listed) >= MAX_LISTING:
                raise IMAPProtocolError(f"{self.host}: more than {MAX_LISTING} messages listed")
            listed[uid] = ListedMessage(uid, size, flags, msgid)
            return True

        for command in commands:
            self._finish(command, keep, max_responses=MAX_LISTING + MAX_RESPONSES)
        return [listed[uid] for uid in sorted(listed)]

    def search_unseen(self) -> list[int]:
        """UID SEARCH UNSEEN: the UIDs of the unseen messages of the selected folder, ascending."""
        return self.search("UNSEEN")

    def search_message(self, message_id: bytes, size: int) -> list[int]:
        """The UIDs of the messages of the selected folder with this Message-ID (a substring of the field, as
        SEARCH HEADER matches) and exactly ``size`` octets; WireError when the Message-ID cannot be quoted."""
        form = wire.quoted(message_id)
        if form is None or not message_id:
            raise WireError("a Message-ID that cannot be sent as a quoted string")
        return self.search(f"HEADER Message-ID {form.decode('ascii')} LARGER {max(size - 1, 0)} SMALLER {size + 1}")

    @_session_over_on_error
    def search(self, criteria: str) -> list[int]:
        """UID SEARCH ``criteria`` in the selected folder: the UIDs found, ascending. With ESEARCH (RFC 4731) the
        answer is a compact UID set instead of one long line of every UID."""
        esearch = self.has("ESEARCH")
        command = self._command("SIMPLE", f"UID SEARCH RETURN (ALL) {criteria}" if esearch
                                else f"UID SEARCH {criteria}", shown="UID SEARCH")
        found: list[int] = []

        def keep(response: Response) -> bool:
            try:
                if response.kind == "SEARCH":
                    found.extend(wire.number_of(value, "SEARCH", minimum=1) for value in response.values)
                elif response.kind == "ESEARCH" and esearch:
                    found.extend(self._esearch_all(response, command.tag))
                else:
                    return False
            except WireError as exc:
                raise self._malformed("UID SEARCH", str(exc)) from None
            if len(found) > MAX_LISTING:
                raise IMAPProtocolError(f"{self.host}: more than {MAX_LISTING} UIDs in a SEARCH answer")
            return True

        self._finish(command, keep, line_limit=MAX_SEARCH_LINE)
        return sorted(set(found))

    @staticmethod
    def _esearch_all(response: Response, tag: str) -> list[int]:
        """The UIDs of ``* ESEARCH (TAG "tag") UID ALL set`` (none when ALL is missing: nothing matched)."""
        values = response.values
        if not values or not isinstance(values[0], list) or len(values[0]) != 2 or \
                str(values[0][0]).upper() != "TAG" or values[0][1] != tag.encode():
            raise WireError("an ESEARCH answer to another command")
        rest = values[1:]
        if not rest or not isinstance(rest[0], Atom) or rest[0].upper() != "UID":
            raise WireError("an ESEARCH answer without UID")
        found: list[int] = []
        for index in range(1, len(rest) - 1, 2):
            name, value = rest[index], rest[index + 1]
            if isinstance(name, Atom) and name.upper() == "ALL":
                if not isinstance(value, Atom):
                    raise WireError("ESEARCH ALL without a UID set")
                found = wire.parse_uid_set(value, MAX_LISTING)
        return found

    @_session_over_on_error
    def header_block(self, uid: int, *, limit: int = MAX_HEADER_BLOCK) -> bytes | None:
        """The header block of message ``uid`` (``BODY.PEEK[HEADER]``), or None when it is gone."""
        command = self._command("SIMPLE", f"UID FETCH {uid} (UID BODY.PEEK[HEADER])", shown=f"UID FETCH {uid}")
        found: list[bytes] = []

        def keep(response: Response) -> bool:
            if response.kind != "FETCH":
                return False
            items = self._items_for(response, uid)
            if items is None:
                return True
            value = items.get("BODY[HEADER]")
            if isinstance(value, bytes):
                if found:
                    raise self._malformed("UID FETCH", "the header block twice")
                found.append(value)
            return True

        self._header_limit = limit
        try:
            done = self._finish(command, keep, check=False)
        finally:
            self._header_limit = 0
        if done.kind == "BAD":
            raise self._refused(command, done)
        return found[0] if found and done.kind == "OK" else None

    def _items_for(self, response: Response, uid: int) -> dict[str, Value] | None:
        """The items of a FETCH response for ``uid``; None for a FETCH about another message (a flag change) --
        unless it carries message data, which is out of step."""
        try:
            items = _fetch_items(response)
            got = wire.number_of(items["UID"], "UID", minimum=1) if "UID" in items else None
        except WireError as exc:
            raise self._malformed("UID FETCH", str(exc)) from None
        if got is not None:
            self._check_number(response.number, got)
        carries_data = any(_is_body(name) or name.startswith("BODY[") for name in items)
        if got == uid:
            return items
        if carries_data:
            raise IMAPProtocolError(f"{self.host}: message data for UID {got} in the answer to UID FETCH {uid}: "
                                    "the session is out of step")
        return None

    @_session_over_on_error
    def send_fetch(self, uid: int, *, limit: int) -> None:
        """UID FETCH ``uid`` (UID BODY.PEEK[]) -- which never sets \\Seen -- sent ahead; its answer is read in
        order by `read_fetched`, which accepts at most ``limit`` octets of the message."""
        command = self._command("FETCH", f"UID FETCH {uid} (UID BODY.PEEK[])", shown=f"UID FETCH {uid}",
                                defer=True)
        command.uid = uid
        command.limit = limit

    def read_fetched(self, sink: Sink) -> int | None:
        """The next fetch answer in line: the message streamed into ``sink``; the octets read, or None when the
        server had no such message (a tagged OK without its data, or a NO). If this raises, whatever went into
        ``sink`` must be thrown away (the session is over)."""
        command = self._next_in_line()
        if command is None or command.kind != "FETCH":
            raise RuntimeError("read_fetched() with no UID FETCH next in line")
        uid = command.uid
        assert uid is not None
        counted = [0, 0]  # octets, message data items

        def counting(data: bytes) -> None:
            counted[0] += len(data)
            sink(data)

        self._doing = f"waiting for the answer to {command.shown}"
        self._sink = counting
        self._fetching = command
        responses = 0
        try:
            # Read on past the message's data until something shows its answer is over: its tagged OK, or the
            # data of the next fetch in line starting (Dovecot sends that before the OK). A second copy of this
            # UID's data (a stray answer taken for the real one) is out of step: raised before anything is returned.
            while command.done is None:
                try:
                    response = self._read_response()
                except _Later:
                    break  # the data of a later fetch: this one's answer is over (without data: None)
                if response.tag == "*" and response.kind == "FETCH":
                    self._fetched(command, response, counted, counting)
                elif response.tag == "+":
                    raise IMAPProtocolError(f"{self.host}: a continuation request {self._doing}: out of step")
                else:
                    self._dispatch(response)
                responses += 1
                if responses > MAX_RESPONSES:
                    raise IMAPProtocolError(f"{self.host}: more than {MAX_RESPONSES} responses {self._doing}")
        except BaseException:
            self.close()  # whatever failed (the sink too), the rest of this answer is unread: the session is over
            raise
        finally:
            self._sink = None
            self._fetching = None
        command.returned = True
        self._drop_answered()
        done = command.done
        if done is not None and done.kind == "BAD":
            raise self._refused(command, done)
        if not command.had_data or (done is not None and done.kind == "NO"):
            return None
        return counted[0]

    def _fetched(self, command: _Command, response: Response, counted: list[int], counting: Sink) -> None:
        """A FETCH response while ``command``'s answer is read: its message data, or a flag change."""
        assert command.uid is not None
        items = self._items_for(response, command.uid)
        if items is None:
            return
        for name, value in items.items():
            if not _is_body(name):
                continue
            if not isinstance(value, (Streamed, bytes, type(None))):
                raise self._malformed(command.shown, "message data that is not a string")
            if value is None:
                continue
            counted[1] += 1
            if isinstance(value, bytes):  # a quoted string (a tiny message)
                if len(value) > command.limit:
                    raise LiteralTooLarge(f"{self.host}: a message over {command.limit} octets {self._doing}")
                counting(value)
        if counted[1] > 1:
            raise self._malformed(command.shown, "the message data twice")
        command.had_data = counted[1] == 1

    def _drop_answered(self) -> None:
        """Forget the commands at the head of the line that are answered and returned to the caller."""
        while self._in_flight and self._in_flight[0].returned and self._in_flight[0].done is not None:
            self._in_flight.popleft()

    # --- changing messages ------------------------------------------------------------------------------------

    @_session_over_on_error
    def store_flags(self, uids: Sequence[int], flags: Sequence[str], *, add: bool = True) -> None:
        """UID STORE +FLAGS.SILENT (or -FLAGS.SILENT); IMAPError when refused."""
        if not uids:
            return
        sign = "+" if add else "-"
        flag_list = wire.flag_list(flags)
        commands = [self._command("SIMPLE", f"UID STORE {part} {sign}FLAGS.SILENT {flag_list}", shown="UID STORE",
                                  defer=True) for part in wire.uid_sets(uids)]
        self._finish_all(commands)

    @_session_over_on_error
    def uid_expunge(self, uids: Sequence[int]) -> None:
        """UID EXPUNGE (RFC 4315): removes only the given messages (those flagged \\Deleted). Without UIDPLUS an
        IMAPError: a bare EXPUNGE would remove every message flagged \\Deleted, other clients' too."""
        if not uids:
            return
        if not self.has("UIDPLUS"):
            raise IMAPError(f"{self.host} does not offer UIDPLUS: UID EXPUNGE is not possible, and a bare EXPUNGE "
                            "could remove other clients' deleted messages", status="NO")
        commands = [self._command("SIMPLE", f"UID EXPUNGE {part}", shown="UID EXPUNGE", defer=True)
                    for part in wire.uid_sets(uids)]
        self._finish_all(commands)

    @_session_over_on_error
    def move(self, uids: Sequence[int], folder: str) -> dict[int, int]:
        """UID MOVE (RFC 6851) when offered; else UID COPY, then (only once the copy is confirmed) UID STORE
        \\Deleted and UID EXPUNGE, which needs UIDPLUS (else IMAPError). Never a bare EXPUNGE.

        Returns the UIDs the messages have in ``folder`` as the server said them ([COPYUID], UIDPLUS), source UID
        -> new UID (empty when it did not say). ``copied`` holds the same as soon as the copies are confirmed: when
        the STORE or UID EXPUNGE after a UID COPY fails, it tells the caller the copies exist already."""
        self.copied = {}
        self.copy_confirmed = []
        if not uids:
            return {}
        target = self._mailbox(folder)
        if self.has("MOVE"):
            commands = [self._command("SIMPLE", f"UID MOVE {part} {target}", shown=f"UID MOVE to {folder}",
                                      defer=True) for part in wire.uid_sets(uids)]
            self._finish_all(commands, self._copyuid_keeper(uids))
            return dict(self.copied)
        if not self.has("UIDPLUS"):
            raise IMAPError(f"{self.host} offers neither MOVE nor UIDPLUS: the messages cannot be moved without "
                            "a bare EXPUNGE, which could remove other clients' deleted messages", status="NO")
        commands = [self._command("SIMPLE", f"UID COPY {part} {target}", shown=f"UID COPY to {folder}", defer=True)
                    for part in wire.uid_sets(uids)]
        self._finish_all(commands, self._copyuid_keeper(uids))  # the copies are confirmed before the originals go
        self.copy_confirmed = list(uids)  # should the rest fail, the caller knows not to copy these again
        self.store_flags(uids, ["\\Deleted"])
        self.uid_expunge(uids)
        return dict(self.copied)

    def _copyuid_keeper(self, uids: Sequence[int]) -> Callable[[Response], bool]:
        """Takes [COPYUID v source-set new-set] (untagged with UID MOVE, tagged with UID COPY) into ``copied``."""
        asked = set(uids)

        def keep(response: Response) -> bool:
            if response.kind != "OK" or response.code != "COPYUID":
                return False
            words = response.code_args.split()
            try:
                if len(words) != 3:
                    raise WireError("COPYUID needs a UIDVALIDITY and two UID sets")
                sources = wire.parse_uid_set(words[1], len(asked), ordered=True)
                targets = wire.parse_uid_set(words[2], len(asked), ordered=True)
            except WireError as exc:
                raise self._malformed("COPYUID", str(exc)) from None
            if len(sources) != len(targets) or not asked.issuperset(sources):
                raise self._malformed("COPYUID", "the UID sets do not fit the messages asked for")
            self.copied.update(zip(sources, targets, strict=True))
            return True

        return keep

    # --- appending --------------------------------------------------------------------------------------------

    @_session_over_on_error
    def send_append(self, folder: str, chunks: Iterable[bytes], length: int, *, flags: Sequence[str] = (),
                    internaldate: datetime | None = None) -> None:
        """APPEND a message of ``length`` octets (``chunks``, CRLF line ends already) to ``folder``. With LITERAL+
        (or LITERAL- and at most 4096 octets) it goes out without waiting; otherwise this waits for the server's
        "+" (a tagged NO instead is kept for `read_append`). The answer is read by `read_append`, in order."""
        if self._idle is not None:
            raise RuntimeError("send_append() during IDLE")
        parts = [f"APPEND {self._mailbox(folder)}"]
        if flags:
            parts.append(wire.flag_list(flags))
        if internaldate is not None:
            parts.append(wire.date_time(internaldate))
        sync = not (self.has("LITERAL+") or (self.has("LITERAL-") and length <= LITERAL_MINUS_MAX))
        command = self._new_command("APPEND", f"APPEND to {folder}")
        marker = f"{{{length}}}" if sync else f"{{{length}+}}"
        self._write_line(f"{command.tag} {' '.join(parts)} {marker}", flush=sync)
        if sync and self._until_continuation(command) is None:
            return  # refused before the literal: the answer is kept
        # The command is complete on the wire when this returns (so the server stores the message while the caller
        # goes on), in as few writes as the message allows: a small one goes out with its command line in one.
        try:
            self._send_literal(chunks, length, command.shown)
        except BaseException:
            self.close()  # the server waits for the rest of the literal: the session cannot go on
            raise

    @_session_over_on_error
    def read_append(self) -> AppendResult:
        """The next APPEND answer in line: the UIDVALIDITY and UID the server gave the message ([APPENDUID], with
        UIDPLUS), or Nones; IMAPError when refused (``code`` says TRYCREATE, OVERQUOTA, ...)."""
        command = self._next_in_line()
        if command is None or command.kind != "APPEND":
            raise RuntimeError("read_append() with no APPEND next in line")
        done = self._finish(command)
        if done.code == "APPENDUID":
            words = done.code_args.split()
            try:
                if len(words) != 2:
                    raise WireError("APPENDUID needs two numbers")
                return AppendResult(wire.number_of(Atom(words[0]), "UIDVALIDITY", minimum=1),
                                    wire.number_of(Atom(words[1]), "UID", minimum=1))
            except WireError as exc:
                raise self._malformed("APPEND", str(exc)) from None
        return AppendResult(None, None)

    def append(self, folder: str, chunks: Iterable[bytes], length: int, *, flags: Sequence[str] = (),
               internaldate: datetime | None = None) -> AppendResult:
        self.send_append(folder, chunks, length, flags=flags, internaldate=internaldate)
        return self.read_append()

    def _send_literal(self, chunks: Iterable[bytes], length: int, shown: str) -> None:
        """Write the literal's ``length`` octets as they come, and the CRLF that ends the command, then flush:
        small pieces are gathered into writes of up to `WRITE_SIZE`, large ones go out as they are. More or fewer
        octets than announced break the session."""
        sent = 0
        for chunk in chunks:
            if not chunk:
                continue
            sent += len(chunk)
            if sent > length:
                self.close()
                raise IMAPProtocolError(f"{self.host}: {shown}: the message is longer than the {length} octets "
                                        "announced; the session is closed")
            if len(chunk) >= WRITE_SIZE:
                self._flush(shown)
                view = memoryview(chunk)
                for start in range(0, len(chunk), LARGE_WRITE):  # each write bounded by the timeout on its own
                    self._sendall(view[start:start + LARGE_WRITE], shown)
                continue
            self._outgoing += chunk
            if len(self._outgoing) >= WRITE_SIZE:
                self._flush(shown)
        if sent != length:
            self.close()
            raise IMAPProtocolError(f"{self.host}: {shown}: the message has {sent} octets, not the {length} "
                                    "announced; the session is closed")
        self._outgoing += b"\r\n"
        self._flush(shown)
        if self._trace:
            self._trace.elided(length, sent=True)

    # --- other commands ---------------------------------------------------------------------------------------

    @_session_over_on_error
    def identify(self, fields: dict[str, str]) -> dict[str, str]:
        """ID (RFC 2971): tell the server who we are (some, like NetEase's, refuse SELECT without it) and return
        what it says of itself. Only with the ID capability (else an empty dict, nothing sent)."""
        if not self.has("ID"):
            return {}
        parts: list[bytes] = []
        for key, value in list(fields.items())[:30]:
            for text in (key[:30], value[:1024]):
                form = wire.quoted(text.encode("utf-8"))
                if form is None:
                    raise ValueError(f"an ID field cannot hold {text!r}")
                parts.append(form)
        command = self._command("SIMPLE", f"ID ({b' '.join(parts).decode('utf-8')})" if parts else "ID NIL",
                                shown="ID")
        said: dict[str, str] = {}

        def keep(response: Response) -> bool:
            if response.kind != "ID":
                return False
            values = response.values[0] if response.values else None
            if isinstance(values, list):
                for index in range(0, len(values) - 1, 2):
                    key, value = values[index], values[index + 1]
                    if isinstance(key, bytes) and isinstance(value, bytes):
                        said[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
            return True

        self._finish(command, keep)
        return said

    @_session_over_on_error
    def noop(self) -> None:
        self._simple("NOOP")

    @_session_over_on_error
    def idle_start(self) -> bool:
        """IDLE (RFC 2177): sent, and its "+" waited for; then `idle_read` whenever the socket is readable. True when
        news came with the "+" already (an EXISTS or RECENT, or the server ending IDLE at once): what arrived with
        it is read here, since a selector cannot see what is already buffered."""
        if self.in_flight:
            raise RuntimeError("idle_start() with answers still to be read")
        self._idle_news = False
        self._idle_over = False
        command = self._command("IDLE", "IDLE")
        if self._until_continuation(command) is None:
            self._finish(command)  # a tagged NO/BAD instead of "+": raised here
            raise IMAPProtocolError(f"{self.host}: IDLE ended at once")
        self._idle = command
        return self._idle_responses(command)

    @property
    def idling(self) -> bool:
        """Whether the session is in IDLE (started, and neither done nor ended by the server)."""
        return self._idle is not None

    @_session_over_on_error
    def idle_read(self) -> bool:
        """Read what has arrived during IDLE (call it when the socket is readable; it waits only for the rest of a
        response already begun): True when an EXISTS (or RECENT) was among it -- or when the server ended IDLE by
        itself (a tagged OK: look for mail, then `idle_start` again; `idle_done` is then a no-op). BYE, EOF or
        anything out of step raise `IMAPConnectionError`."""
        command = self._idle
        if command is None:
            raise RuntimeError("idle_read() outside IDLE")
        self._doing = "idling"
        if not self._receiver.has_line():
            self._receive_ready()
        return self._idle_responses(command)

    def _receive_ready(self) -> None:
        """Take what the socket holds without waiting: readable may mean no application data at all (a TLS 1.3
        session ticket, say), and a watcher thread must not sit in recv() for it."""
        if self._socket_timeout != 0.0:
            self._sock.settimeout(0.0)
            self._socket_timeout = 0.0
        try:
            received = self._receiver.fill()
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except ssl.SSLError as exc:
            raise IMAPConnectionError(f"{self.host}: TLS error {self._doing}: {exc.reason or exc}") from None
        except OSError as exc:
            raise IMAPConnectionError(f"{self.host}: connection lost {self._doing}: {exc.strerror or exc}") from None
        if not received:
            raise IMAPConnectionError(f"{self.host}: connection closed by the server {self._doing}")

    def _idle_responses(self, command: _Command) -> bool:
        """The whole responses that have arrived during IDLE (none is waited for); whether there is news. A server
        that floods the connection cannot keep the caller here: at most `IDLE_RECEIVES` reads of what TLS holds."""
        receives = 0
        while True:
            while self._receiver.has_line():
                response = self._read_response()
                if response.tag == "+":
                    raise IMAPProtocolError(f"{self.host}: a continuation request during IDLE: out of step")
                self._dispatch(response)
                if command.done is not None:  # the server ended IDLE (some do after a while)
                    self._idle = None
                    self._idle_over = True
                    command.returned = True
                    self._drop_answered()
                    if command.done.kind != "OK":
                        raise self._refused(command, command.done)
                    self._idle_news = False
                    return True
            if not (isinstance(self._sock, ssl.SSLSocket) and self._sock.pending()) or receives >= IDLE_RECEIVES:
                break
            self._receive()
            receives += 1
        news, self._idle_news = self._idle_news, False
        return news

    @_session_over_on_error
    def idle_done(self) -> None:
        """DONE, and the tagged OK that ends IDLE (EXISTS that arrive meanwhile are remembered in ``exists``)."""
        command = self._idle
        if command is None:
            if self._idle_over:  # the server ended it already
                self._idle_over = False
                return
            raise RuntimeError("idle_done() outside IDLE")
        self._idle = None
        self._write_line("DONE")
        self._finish(command)

    def logout(self) -> None:
        """LOGOUT (the BYE it brings is expected), then close."""
        try:
            command = self._command("SIMPLE", "LOGOUT")
            self._logging_out = True
            self._finish(command)
        except IMAPConnectionError:
            if not self._bye_seen:  # a server may close right after its BYE, without the tagged OK
                raise
        finally:
            self.close()

    def close(self) -> None:
        """Close the socket at once (abort)."""
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.close()

    # --- commands and answers ---------------------------------------------------------------------------------

    def _new_command(self, kind: str, shown: str) -> _Command:
        if self._closed:
            raise IMAPConnectionError(f"{self.host}: the session is closed; {shown} cannot be sent")
        if self._idle is not None:
            raise RuntimeError(f"{shown} during IDLE: call idle_done() first")
        pending = {command.kind for command in self._in_flight if not command.returned}
        if pending and (pending != {kind} or kind not in ("FETCH", "APPEND", "SIMPLE")):
            # pipelines are of one kind: fetches, appends, or the pieces of one simple command
            raise RuntimeError(f"{shown} while the answers to {', '.join(sorted(pending))} are still to be read")
        tag = f"A{self._next_tag:04d}"
        self._next_tag += 1
        command = _Command(tag, kind, shown)
        self._in_flight.append(command)
        return command

    def _command(self, kind: str, text: str, *, shown: str | None = None, defer: bool = False) -> _Command:
        command = self._new_command(kind, shown or text.split(" ")[0])
        self._write_line(f"{command.tag} {text}", flush=not defer)
        return command

    def _simple(self, text: str, *, shown: str | None = None) -> Response:
        return self._finish(self._command("SIMPLE", text, shown=shown))

    def _finish_all(self, commands: list[_Command], keep: Callable[[Response], bool] | None = None) -> None:
        """Read the answers of ``commands`` (sent together); the first refusal is raised after all are read.
        ``keep`` sees the untagged responses and the tagged OKs."""
        error: IMAPError | None = None
        for command in commands:
            try:
                done = self._finish(command, keep)
                if keep is not None:
                    keep(done)
            except IMAPError as exc:
                error = error or exc
        if error is not None:
            raise error

    def _mailbox(self, name: str) -> str:
        if name.upper() == "INBOX":
            return "INBOX"
        form = wire.quoted(wire.encode_mailbox(name).encode("ascii"))
        assert form is not None  # modified UTF-7 is printable ASCII
        return form.decode("ascii")

    def _write_with_literals(self, command: _Command, verb: str, arguments: list[bytes]) -> None:
        """A command line whose arguments are astrings: quoted when they can be, else literals -- synchronizing
        ones wait for "+", non-synchronizing ones (LITERAL+, or LITERAL- up to 4096 octets) do not."""
        line = f"{command.tag} {verb}".encode("ascii")
        if self._trace:  # as one line, literals inline (LOGIN's arguments are redacted by the trace)
            self._trace.sent(b" ".join([line, *arguments]))
        for argument in arguments:
            form = wire.astring_or_literal(argument)
            if isinstance(form, bytes):
                line += b" " + form
                continue
            sync = not (self.has("LITERAL+") or (self.has("LITERAL-") and form <= LITERAL_MINUS_MAX))
            line += b" {%d%s}" % (form, b"" if sync else b"+")
            self._write_raw(line + b"\r\n", flush=sync)
            if sync and self._until_continuation(command) is None:
                return
            line = b""
            self._write_raw(argument, flush=False)
        self._write_raw(line + b"\r\n", flush=True)

    def _write_line(self, line: str, *, flush: bool = True) -> None:
        if self._trace:
            self._trace.sent(line)
        self._write_raw(line.encode("utf-8") + b"\r\n", flush=flush)

    def _write_raw(self, data: bytes, *, flush: bool) -> None:
        if self._closed:
            raise IMAPConnectionError(f"{self.host}: the session is closed")
        self._outgoing += data
        self._queued += 1
        if flush or self._queued >= FLUSH_AFTER:
            self._flush()

    def _flush(self, what: str = "commands") -> None:
        if not self._outgoing:
            return
        data, self._outgoing, self._queued = bytes(self._outgoing), bytearray(), 0
        self._sendall(data, what)

    def _sendall(self, data: bytes | memoryview, what: str) -> None:
        doing, self._doing = self._doing, f"sending {what}"
        self._limit_wait(None)
        try:
            self._sock.sendall(data)
        except TimeoutError:
            raise IMAPConnectionError(self._timed_out()) from None
        except OSError as exc:
            raise IMAPConnectionError(f"{self.host}: connection lost {self._doing}: {exc.strerror or exc}") from None
        self._doing = doing

    def _until_continuation(self, command: _Command) -> Response | None:
        """Read until the server's "+" for ``command`` (returned) or its tagged answer (kept: None)."""
        self._doing = f"waiting for the server to accept {command.shown}"
        count = 0
        while True:
            response = self._read_response()
            if response.tag == "+":
                if self._in_flight and self._in_flight[-1] is command and self._undone_before(command) == 0:
                    return response
                raise IMAPProtocolError(f"{self.host}: a continuation request nobody asked for "
                                        f"{self._doing}: out of step")
            self._dispatch(response)
            if command.done is not None:
                return None
            count += 1
            if count > MAX_RESPONSES:
                raise IMAPProtocolError(f"{self.host}: more than {MAX_RESPONSES} responses {self._doing}")

    def _undone_before(self, command: _Command) -> int:
        """How many commands sent before ``command`` still wait for their answers."""
        count = 0
        for other in self._in_flight:
            if other is command:
                break
            if other.done is None:
                count += 1
        return count

    def _finish(self, command: _Command, keep: Callable[[Response], bool] | None = None, *, check: bool = True,
                max_responses: int | None = None, line_limit: int | None = None) -> Response:
        """Read responses until ``command``'s tagged answer (earlier commands must have had theirs); untagged ones
        go to ``keep`` (True: it took it) or are absorbed. With ``check`` a NO or BAD raises `IMAPError`."""
        if self._next_in_line() is not command:
            raise RuntimeError(f"the answer to {command.shown} is not next in line")
        self._doing = f"waiting for the answer to {command.shown}"
        if max_responses is None:
            max_responses = MAX_RESPONSES
        count = 0
        while command.done is None:
            response = self._read_response(line_limit=line_limit)
            if response.tag == "*" and keep is not None and keep(response):
                pass
            elif response.tag == "+":
                raise IMAPProtocolError(f"{self.host}: a continuation request {self._doing}: out of step")
            else:
                self._dispatch(response)
            count += 1
            if count > max_responses:
                raise IMAPProtocolError(f"{self.host}: more than {max_responses} responses {self._doing}")
        command.returned = True
        self._drop_answered()
        done = command.done
        if check and done.kind != "OK":
            raise self._refused(command, done)
        return done

    def _dispatch(self, response: Response) -> None:
        """A response that is not a continuation and not kept: a tagged answer completes the oldest command still
        waiting -- or, among pipelined APPENDs, any of them, since a server may store them side by side and answer
        in the order it finished (RFC 3501 5.5); any other tag is out of step. Untagged ones update what the client
        tracks."""
        if response.tag == "*":
            self._untagged(response)
            return
        for command in self._in_flight:
            if command.done is not None:
                continue
            if command.tag != response.tag:
                if command.kind == "APPEND":
                    continue  # an APPEND still unanswered: a later one may have finished first
                break
            command.done = response
            if command.returned and response.kind != "OK" and (response.kind == "BAD" or command.had_data):
                raise IMAPProtocolError(f"{self.host}: {response.kind} for {command.shown} after its data was "
                                        "read: out of step")
            if response.code == "CAPABILITY":
                self._set_capabilities(response.code_args)
            return
        raise IMAPProtocolError(f"{self.host}: an answer tagged {response.tag!r} {self._doing}: out of step")

    def _untagged(self, response: Response) -> None:
        kind = response.kind
        if kind == "BYE":
            if self._logging_out:
                self._bye_seen = True
                return
            self.close()
            raise IMAPConnectionError(f"{self.host}: the server closed the session {self._doing}: "
                                      f"{self._clean(response.text)}")
        if kind == "EXISTS":
            assert response.number is not None
            self.exists = response.number
            self._idle_news = True
            seqs = self._seqs
            if seqs is not None:
                if response.number > MAX_LISTING:
                    self._seqs = None  # too many to follow: the number check is off for this folder
                elif response.number >= len(seqs):
                    seqs.extend(itertools.repeat(0, response.number - len(seqs)))
                else:
                    del seqs[response.number:]  # EXISTS never shrinks (RFC 3501 7.3.1); followed anyway
        elif kind == "RECENT":
            self._idle_news = True
        elif kind == "EXPUNGE":
            number = response.number
            assert number is not None
            if self._seqs is not None:
                if not 1 <= number <= len(self._seqs):
                    raise IMAPProtocolError(f"{self.host}: EXPUNGE of message {number}, but {len(self._seqs)} "
                                            f"exist {self._doing}: out of step")
                del self._seqs[number - 1]
            if self.exists:
                self.exists -= 1
        elif kind == "CAPABILITY":
            self._set_capabilities(" ".join(str(v) for v in response.values if isinstance(v, Atom)))
        elif response.code == "CAPABILITY":
            self._set_capabilities(response.code_args)
        elif kind == "PREAUTH":
            raise IMAPProtocolError(f"{self.host}: a PREAUTH {self._doing}: out of step")
        elif kind == "BAD":  # RFC 3501 7.1.3: a protocol error whose command cannot be told (ours are well-formed)
            raise IMAPProtocolError(f"{self.host}: the server says BAD without a tag {self._doing}: "
                                    f"{self._clean(response.text)}")
        elif kind == "FETCH":
            try:
                items = _fetch_items(response)
            except WireError as exc:
                raise self._malformed("an unsolicited FETCH", str(exc)) from None
            if any(name.startswith(("BODY[", "BINARY[", "RFC822")) and name != "RFC822.SIZE" for name in items):
                raise IMAPProtocolError(f"{self.host}: message data nobody asked for {self._doing}: out of step")
            if "UID" in items:
                try:
                    uid = wire.number_of(items["UID"], "UID", minimum=1)
                except WireError as exc:
                    raise self._malformed("an unsolicited FETCH", str(exc)) from None
                self._check_number(response.number, uid)
        # FETCH (flag changes), FLAGS, OK [ALERT] and the like: absorbed

    def _check_number(self, number: int | None, uid: int) -> None:
        """A FETCH response says message ``number`` has ``uid``: it must exist, and no other UID may have been said
        for it (a stray answer, or one read out of step, shows here)."""
        seqs = self._seqs
        if seqs is None or number is None:
            return
        if not 1 <= number <= len(seqs):
            raise IMAPProtocolError(f"{self.host}: a FETCH for message {number}, but {len(seqs)} exist "
                                    f"{self._doing}: out of step")
        known = seqs[number - 1]
        if known == 0:
            seqs[number - 1] = uid
        elif known != uid:
            raise IMAPProtocolError(f"{self.host}: a FETCH says message {number} has UID {uid}, but it has UID "
                                    f"{known} {self._doing}: out of step")

    def _set_capabilities(self, text: str) -> None:
        self.capabilities = frozenset(word.upper() for word in text.split())

    def _refused(self, command: _Command, done: Response) -> IMAPError:
        text = self._clean(done.text)
        code = f" [{done.code}]" if done.code else ""
        return IMAPError(f"{self.host}: {command.shown} refused: {done.kind}{code} {text}".rstrip(),
                         status=done.kind, code=done.code, text=text)

    def _malformed(self, what: str, why: str) -> IMAPProtocolError:
        return IMAPProtocolError(f"{self.host}: a malformed answer to {what}: {why}")

    def _clean(self, text: str) -> str:
        """Server text without any secret we sent (a server that echoes a password must not put it in our logs)."""
        for secret in self._secrets:
            if secret and secret in text:
                text = text.replace(secret, "********")
        return text[:300]

    # --- reading responses ------------------------------------------------------------------------------------

    def _read_response(self, *, line_limit: int | None = None) -> Response:
        """One whole response: its lines and the literals between them. The literal after a message's ``BODY[]``
        goes into the current sink (bounded by the command's limit); other literals are kept, bounded small."""
        if line_limit is None:
            line_limit = MAX_LINE
        if self._partial is not None:
            segments, literals, kept, kind = self._partial
            self._partial = None
        else:
            first = self._read_line(line_limit)
            try:
                _tag, kind, _number = wire.head_of(first)
            except WireError as exc:
                raise IMAPProtocolError(f"{self.host}: not an IMAP response {self._doing}: {exc}: "
                                        f"{self._clean(first[:80].decode('latin-1'))!r}") from None
            segments = [first]
            literals = []
            kept = 0
        if wire.takes_literals(kind):
            while True:
                try:
                    size = wire.literal_marker(segments[-1])
                except WireError as exc:
                    raise IMAPProtocolError(f"{self.host}: {exc} {self._doing}") from None
                if size is None:
                    break
                if len(literals) >= MAX_LITERALS:
                    raise IMAPProtocolError(f"{self.host}: more than {MAX_LITERALS} literals in one response")
                before = segments[-1][:segments[-1].rfind(b"{")].rstrip(b" ").upper()
                name = before[before.rfind(b" ") + 1:].lstrip(b"(")
                if kind == "FETCH" and self._sink is not None and _is_body(name.decode("latin-1")):
                    if self._belongs_later(segments):
                        self._partial = (segments, literals, kept, kind)
                        raise _Later
                    literals.append(self._stream_literal(size))
                else:
                    limit = MAX_SMALL_LITERAL
                    if kind == "FETCH" and name == b"BODY[HEADER]" and self._header_limit:
                        limit = self._header_limit
                    if size > limit or kept + size > max(MAX_KEPT_LITERALS, limit):
                        raise LiteralTooLarge(f"{self.host}: a literal of {size} octets {self._doing} (at most "
                                              f"{limit} accepted)")
                    kept += size
                    literals.append(self._read_literal(size))
                segments.append(self._read_line(line_limit))
        try:
            return wire.parse_response(segments, literals)
        except WireError as exc:
            raise IMAPProtocolError(f"{self.host}: a malformed {kind} response {self._doing}: {exc}") from None

    def _belongs_later(self, segments: list[bytes]) -> bool:
        """Whether the message data about to arrive is for a later UID FETCH in line than the one being read, as
        the UID before it says (Dovecot sends it first). Data for a UID nobody asked for is out of step. Without a
        UID before the data, it is taken for the fetch being read and checked once the response is whole."""
        command = self._fetching
        assert command is not None
        match = _UID_ITEM.search(b" ".join(segments))
        if match is None:
            return False
        uid = int(match.group(1))
        if uid == command.uid:
            return False
        if any(other.uid == uid and not other.returned for other in self._in_flight if other is not command):
            return True
        raise IMAPProtocolError(f"{self.host}: message data for UID {uid}, which nobody asked for, {self._doing}: "
                                "the session is out of step")

    def _stream_literal(self, size: int) -> Streamed:
        command = self._fetching
        limit = command.limit if command is not None else MAX_SMALL_LITERAL
        if size > limit:
            raise LiteralTooLarge(f"{self.host}: a message of {size} octets {self._doing} (at most {limit} "
                                  "accepted)")
        sink = self._sink
        assert sink is not None
        left = size
        while left:
            if not self._receiver.pending:
                self._receive()
            piece = self._receiver.take(left)
            left -= len(piece)
            sink(piece)
        if self._trace:
            self._trace.elided(size, sent=False)
        return Streamed(size)

    def _read_literal(self, size: int) -> bytes:
        pieces: list[bytes] = []
        left = size
        while left:
            if not self._receiver.pending:
                self._receive()
            piece = self._receiver.take(left)
            left -= len(piece)
            pieces.append(piece)
        if self._trace:
            self._trace.elided(size, sent=False)
        return b"".join(pieces)

    def _read_line(self, limit: int) -> bytes:
        """One line without its CRLF; the whole line must arrive within ``timeout``. A bare LF ends a line too."""
        line = self._receiver.line(limit + 2)
        if line is None:
            line_deadline = time.monotonic() + self.timeout
            while (line := self._receiver.line(limit + 2)) is None:
                self._receive(line_deadline)
        if not line.endswith(b"\n"):
            raise IMAPProtocolError(f"{self.host}: a response line longer than {limit} octets {self._doing}")
        if self._trace:
            self._trace.received(line)
        return line[:-2] if line.endswith(b"\r\n") else line[:-1]

    def _receive(self, line_deadline: float | None = None) -> None:
        """Wait for more data (sending the queued commands first, or the server would wait too)."""
        if self._outgoing:
            self._flush()
        self._limit_wait(line_deadline)
        try:
            received = self._receiver.fill()
        except TimeoutError:
            raise IMAPConnectionError(self._timed_out()) from None
        except ssl.SSLError as exc:
            raise IMAPConnectionError(f"{self.host}: TLS error {self._doing}: {exc.reason or exc}") from None
        except OSError as exc:
            raise IMAPConnectionError(f"{self.host}: connection lost {self._doing}: {exc.strerror or exc}") from None
        if not received:
            raise IMAPConnectionError(f"{self.host}: connection closed by the server {self._doing}")

    def _limit_wait(self, line_deadline: float | None) -> None:
        """Give the next socket operation ``timeout``, or less when the line's or the session's deadline is
        nearer; past a deadline, end the session at once."""
        wait, self._wait = self.timeout, Wait.READ
        if line_deadline is not None or self.deadline is not None:
            now = time.monotonic()
            if self.deadline is not None and self.deadline - now < wait:
                wait, self._wait = self.deadline - now, Wait.SESSION
            if line_deadline is not None and line_deadline - now < wait:
                wait, self._wait = line_deadline - now, Wait.LINE
            if wait <= 0:
                raise IMAPConnectionError(self._timed_out())
        if wait != self._socket_timeout:
            self._sock.settimeout(wait)
            self._socket_timeout = wait

    def _timed_out(self) -> str:
        if self._wait is Wait.SESSION:
            budget = (self.deadline or 0.0) - self._started
            return (f"{self.host}: timed out {self._doing}: the session took longer than its deadline "
                    f"({budget:.3g} s); it ends without expunging anything")
        if self._wait is Wait.LINE:
            return (f"{self.host}: timed out after {self.timeout:g} s {self._doing}: a response line must arrive "
                    "whole within the timeout (the server sends too slowly)")
        return f"{self.host}: timed out after {self.timeout:g} s {self._doing}"
