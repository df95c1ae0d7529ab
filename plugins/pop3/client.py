"""A POP3 client (RFC 1939, RFC 2449 CAPA, RFC 2595 STLS) that distrusts the server.

Unlike the standard library's poplib it reads message lines of any length, streams message data into a sink
instead of holding it as a list of lines, bounds every reply line and listing, validates UIDs, and puts a timeout
on every network operation. Commands are written and their replies read by separate methods, so several commands
can be put in flight at once (RFC 2449 PIPELINING) without changing the reading side.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import re
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from postbote import AccountError, LoginRefused, Secret, StartTLS, TLSPolicy, protocol_trace

MAX_REPLY_LINE = 8192
STLS = StartTLS(greeting=b"+OK", command=b"STLS", granted=b"+OK")
"""How a second connection asks for TLS, to read a refused certificate again (`TLSPolicy.wrap`)."""
MAX_LISTING_ENTRIES = 2_000_000
MAX_LISTING_LINE = 100  # "NUMBER UID" with a UID of at most 70 characters (RFC 1939 7), with room to spare
MAX_HEADER_BLOCK = 256 * 1024  # the most a ``TOP n 0`` reply may carry
DATA_READ_SIZE = 1 << 18
FIRST_LINE_HEAD = 64  # how much of a message's first line tells whether it is a POP3 status line
FLUSH_AFTER = 16  # pipelined commands sent together at most: few writes, and the server is never left idle
_UID = re.compile(rb"[\x21-\x7e]{1,70}")
_BLANKS = b" \t"
_UIDL_LINE = re.compile(rb"([0-9]+) ([\x21-\x7e]{1,70})")
_LIST_LINE = re.compile(rb"([0-9]+) ([0-9]+)")
_APOP_TIMESTAMP = re.compile(rb"<[^<>\s]+@[^<>\s]+>")


class POP3Error(AccountError):
    """The server answered with a well-formed ``-ERR``: the only failure after which the session is still in step
    (``reply`` holds the line). Anything else that goes wrong is a `POP3ConnectionError`, which ends the session."""

    def __init__(self, message: str, reply: str = "") -> None:
        super().__init__(message)
        self.reply = reply


class POP3AuthError(POP3Error, LoginRefused):
    """The server refused the login."""


class POP3ConnectionError(AccountError):
    """The connection failed, timed out or was closed while waiting for the server: the session ends without QUIT,
    so nothing is deleted."""


class POP3ProtocolError(POP3ConnectionError):
    """The server said something out of step or malformed: a reply that is neither ``+OK`` nor ``-ERR``, a line too
    long, data where no reply was owed, a malformed listing or message data that breaks the framing. Nothing more
    that arrives on this connection can be trusted to belong to the command it seems to answer, so the session
    ends without QUIT, like for a lost connection."""

    def __init__(self, message: str, reply: str = "") -> None:
        super().__init__(message)
        self.reply = reply


class MessageTooLarge(POP3ProtocolError):
    """The server sent more data for a message than the reader was told to accept (the rest of it is unread, so
    the session cannot go on)."""


class SASLMechanism(Protocol):
    """One SASL exchange (RFC 4422) as `POP3Client.authenticate` drives it: implemented in
    `postbote.plugins.signin.sasl`."""

    name: str

    def initial_response(self) -> bytes | None:
        """The client-first data (sent with AUTH when it is short enough), or None for server-first mechanisms."""

    def respond(self, challenge: bytes) -> bytes:
        """The answer to one server challenge (decoded from base64)."""


@dataclass(frozen=True)
class ListingEntry:
    number: int
    uid: str
    size: int


class LineEnding(Enum):
    """How the server ends its lines, as its greeting shows. It decides which ``.`` line ends a data block: with
    CRLF (RFC 1939) only CRLF "." CRLF does, and a bare LF inside a message is data like any other byte."""

    CRLF = "CRLF"
    LF = "LF"


class Wait(Enum):
    """The limit that bounds the wait in progress, so that a timeout says which one expired."""

    READ = "timeout"  # `timeout` for each receive
    LINE = "line"  # `timeout` for a whole reply line
    POLL = "poll_timeout"  # the session's deadline


class _BrokenTerminator(Exception):
    """A data line is a dot and a CR or LF, yet not the terminator (".\n" or ".\r" in a CRLF session): a mangled
    terminator, or a stream out of step. (A dot followed by anything else is a line the server did not stuff: data.)"""


class POP3Client:
    """A POP3 session that stays in step with the server or ends.

    Only a well-formed ``-ERR`` (`POP3Error`) leaves the session usable. Whatever is out of step or malformed
    raises `POP3ProtocolError`, a `POP3ConnectionError`: the caller ends the session without QUIT, so nothing is
    deleted. Every wait is bounded three ways: ``timeout`` for each receive, ``timeout`` for each whole reply line
    (a server trickling one byte at a time cannot stretch a line), and the session's ``deadline``
    (a ``time.monotonic()`` value, the end of the poll) for everything.
    """

    def __init__(self, sock: socket.socket, *, host: str, timeout: float, read_buffer: int = DATA_READ_SIZE,
                 line_ending: LineEnding | None = None, deadline: float | None = None) -> None:
        self.host = host
        self.timeout = timeout
        self._sock = sock
        self._socket_timeout: float | None = sock.gettimeout()
        self._receiver = Receiver(sock, read_buffer)
        self._doing = "reading the greeting"
        self._started = time.monotonic()
        self._deadline: float | None = None
        self._wait = Wait.READ
        self.deadline = deadline
        self.line_ending = line_ending  # None until the greeting is read: a bare LF then ends a line too
        self.greeting = ""
        self.capabilities: dict[str, list[str]] = {}
        self.refused_deletions: dict[int, str] = {}
        self.has_uidl = True  # until the server answers -ERR to UIDL
        self._first_line = b""  # the start of the data block read last
        self._outgoing = bytearray()
        self._queued = 0
        self._in_flight: deque[tuple[str, int, int | None]] = deque()  # (command, message number, data limit)
        self._trace = protocol_trace("POP3")  # None unless ``postbote -v``: each hook below is one ``if``

    @classmethod
    def connect(cls, host: str, port: int, *, implicit_tls: bool, tls: TLSPolicy, timeout: float,
                deadline: float | None = None) -> POP3Client:
        """Connect and read the greeting; ``deadline`` (``time.monotonic()`` based) bounds the whole session."""
        where = f"{host}:{port}"
        connect_timeout = timeout if deadline is None else max(0.0, min(timeout, deadline - time.monotonic()))
        try:
            sock = socket.create_connection((host, port), timeout=connect_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # pipelined commands must not wait
        except TimeoutError:
            raise POP3ConnectionError(f"connecting to {where} timed out after {connect_timeout:g} s") from None
        except OSError as exc:
            raise POP3ConnectionError(f"cannot connect to {where}: {exc.strerror or exc}") from None
        try:
            if implicit_tls:
                sock = tls.wrap(sock, host, where, implicit=True)
            client = cls(sock, host=host, timeout=timeout, deadline=deadline)
            client.read_greeting()
        except BaseException:
            sock.close()
            raise
        return client

    @property
    def deadline(self) -> float | None:
        """When the session must end (``time.monotonic()``), whatever the server does; None: no such limit."""
        return self._deadline

    @deadline.setter
    def deadline(self, value: float | None) -> None:
        self._deadline = value

    def read_greeting(self) -> str:
        """The server's greeting, which also tells how it ends its lines (`LineEnding`)."""
        self._doing = "reading the greeting"
        try:
            line = self._readline(MAX_REPLY_LINE + 1)
        except POP3ConnectionError as exc:
            if self.encrypted or "timed out" not in str(exc):
                raise
            raise POP3ConnectionError(f"{exc}: if this port speaks TLS from the first byte (POP3S, usually 995), "
                                      "set tls: implicit") from None
        self._check_complete(line, MAX_REPLY_LINE)
        if self._trace:
            self._trace.received(line)
        self.line_ending = LineEnding.CRLF if line.endswith(b"\r\n") else LineEnding.LF
        self.greeting = self._ok_text(line.rstrip(b"\r\n"))
        return self.greeting

    # --- session commands ---

    def capa(self) -> dict[str, list[str]]:
        """The server's capabilities (empty when it does not know CAPA, as plain RFC 1939 servers don't)."""
        self._send("CAPA")
        try:
            self._expect_ok()
        except POP3Error:
            self.capabilities = {}
            return self.capabilities
        capabilities: dict[str, list[str]] = {}
        for line in self._read_listing(limit=1000, line_limit=MAX_REPLY_LINE):
            words = line.decode("ascii", "replace").split()
            if words:
                capabilities[words[0].upper()] = words[1:]
        self.capabilities = capabilities
        return capabilities

    def starttls(self, tls: TLSPolicy) -> None:
        """Upgrade the connection with STLS; raises unless the server offered and completed it (never downgrades)."""
        if "STLS" not in self.capabilities:
            raise POP3Error(f"{self.host} does not offer STLS; refusing to log in without TLS (tls: starttls)")
        self._send("STLS")
        self._expect_ok()
        # Anything the server (or a man in the middle) sent before the handshake is discarded with the old receiver.
        self._sock = tls.wrap(self._sock, self.host, self.host, starttls=STLS)
        self._socket_timeout = self._sock.gettimeout()
        self._receiver = Receiver(self._sock, self._receiver.size)
        self.capa()

    def login_user(self, username: str, password: Secret) -> None:
        self._send(f"USER {username}")
        self._expect_ok(auth=True)
        self._send(f"PASS {password.reveal()}", shown="PASS ********")
        self._expect_ok(auth=True)

    def login_apop(self, username: str, password: Secret) -> None:
        match = _APOP_TIMESTAMP.search(self.greeting.encode("ascii", "replace"))
        if not match:
            raise POP3AuthError(f"{self.host} does not support APOP (no timestamp in its greeting)")
        digest = hashlib.md5(match.group(0) + password.reveal().encode("utf-8"), usedforsecurity=False).hexdigest()
        self._send(f"APOP {username} {digest}")
        self._expect_ok(auth=True)

    @property
    def encrypted(self) -> bool:
        """Whether the session runs over TLS now (implicit, or after STLS)."""
        return isinstance(self._sock, ssl.SSLSocket)

    def tls_facts(self) -> dict[str, str]:
        """The server certificate as ``check --connect`` shows it ({} without TLS)."""
        from postbote import certificate_facts

        return certificate_facts(self._sock) if isinstance(self._sock, ssl.SSLSocket) else {}

    def sasl_mechanisms(self) -> list[str]:
        return [m.upper() for m in self.capabilities.get("SASL", [])]

    def authenticate(self, mechanism: SASLMechanism, *, max_rounds: int = 10) -> None:
        """POP3 AUTH (RFC 5034) with SASL-IR: the initial response rides on the AUTH line when it fits in 255 octets."""
        initial = mechanism.initial_response()
        encoded = None if initial is None else (base64.b64encode(initial).decode("ascii") or "=")
        if encoded is not None and len(encoded) <= 255 - len(f"AUTH {mechanism.name} "):
            self._send(f"AUTH {mechanism.name} {encoded}", shown=f"AUTH {mechanism.name}")
            encoded = None
        else:
            self._send(f"AUTH {mechanism.name}")
        for _ in range(max_rounds):
            line = self._read_reply_line()
            if not line.startswith(b"+ ") and line != b"+":
                self._auth_result(line)
                return
            if encoded is not None:
                reply, encoded = encoded, None
            else:
                try:
                    challenge = base64.b64decode(line[2:], validate=True)
                except binascii.Error:
                    self._send("*")
                    self._read_reply_line()
                    raise POP3AuthError(f"{self.host}: invalid base64 in an AUTH {mechanism.name} challenge") from None
                try:
                    reply = base64.b64encode(mechanism.respond(challenge)).decode("ascii")
                except Exception:
                    self._send("*")  # cancel the exchange (RFC 5034) before reporting why
                    self._read_reply_line()
                    raise
            self._send(reply, shown=f"AUTH {mechanism.name} response")
        raise POP3AuthError(f"{self.host}: AUTH {mechanism.name} took more than {max_rounds} rounds")

    def _auth_result(self, line: bytes) -> None:
        self._ok_text(line, auth=True)

    @property
    def pipelining(self) -> bool:
        """Whether commands may be sent before earlier replies are read (RFC 2449 PIPELINING)."""
        return "PIPELINING" in self.capabilities

    def listing(self) -> list[ListingEntry]:
        """UIDL joined with LIST: every message's number, UID and size. Malformed lines end the session.

        A server without UIDL (it is optional in RFC 1939) answers ``-ERR`` and does not list UIDL in CAPA: its
        entries come with an empty ``uid`` and `has_uidl` turns false, for the caller to name the messages another
        way. A ``-ERR`` from a server whose CAPA lists UIDL is a passing refusal, raised: naming its messages
        another way for one poll would fetch them all again."""
        if self.pipelining:
            self._send_all(["UIDL", "LIST"])
        else:
            self._send("UIDL")
        self._doing = "waiting for the reply to UIDL"
        try:
            self._expect_ok()
        except POP3Error:
            if "UIDL" in self.capabilities:
                raise
            self.has_uidl = False
        uids = self._unique_ids() if self.has_uidl else {}
        if not self.pipelining:
            self._send("LIST")
        self._doing = "waiting for the reply to LIST"
        self._expect_ok()
        sizes: dict[int, int] = {}
        for line in self._read_listing(limit=MAX_LISTING_ENTRIES, line_limit=MAX_LISTING_LINE):
            if match := _LIST_LINE.fullmatch(line):
                sizes[int(match[1])] = int(match[2])
                continue
            number, rest = self._number_and_rest(line, "LIST")
            if not rest.isdigit():
                raise POP3ProtocolError(f"LIST: invalid size for message {number}",
                                        line[:100].decode("ascii", "replace"))
            sizes[number] = int(rest)
        if not self.has_uidl:
            return [ListingEntry(n, "", size) for n, size in sorted(sizes.items())]
        return [ListingEntry(n, uid, sizes.get(n, 0)) for n, uid in sorted(uids.items()) if n in sizes]

    def _unique_ids(self) -> dict[int, str]:
        """The lines of a UIDL reply: message number -> UID."""
        uids: dict[int, str] = {}
        for line in self._read_listing(limit=MAX_LISTING_ENTRIES, line_limit=MAX_LISTING_LINE):
            if match := _UIDL_LINE.fullmatch(line):  # the usual line, in one step; anything else is judged below
                uids[int(match[1])] = match[2].decode("ascii")
                continue
            number, rest = self._number_and_rest(line, "UIDL")
            if not _UID.fullmatch(rest):
                raise POP3ProtocolError(f"UIDL: invalid unique id for message {number} (RFC 1939: 1-70 printable "
                                        "characters)", line[:100].decode("ascii", "replace"))
            uids[number] = rest.decode("ascii")
        return uids

    def top_headers(self, number: int, *, limit: int = MAX_HEADER_BLOCK) -> bytes | None:
        """The header block of message ``number`` as ``TOP number 0`` shows it (un-dot-stuffed, the empty line
        that ends it included when the server sends one), or None when the server answers ``-ERR`` (no TOP). More
        than ``limit`` octets raise `MessageTooLarge`, which ends the session."""
        self._read_deletion_replies(stop_at_retrieve=True)
        if self._in_flight:
            raise RuntimeError("top_headers() while RETR replies are still in flight")
        self._send(f"TOP {number} 0")
        self._in_flight.append(("TOP", number, limit))
        return self.read_top()

    def send_top(self, number: int, *, limit: int = MAX_HEADER_BLOCK) -> None:
        """``TOP number 0`` sent ahead (pipelined when the server allows it); `read_top` reads the replies in
        order. For naming the messages of a server without UIDL: one round trip for many messages, not one each."""
        self._send(f"TOP {number} 0", defer=self.pipelining)
        self._in_flight.append(("TOP", number, limit))

    def read_top(self) -> bytes | None:
        """The header block of the next TOP in line (as `top_headers` gives it), or None for a ``-ERR``."""
        if not self._in_flight or self._in_flight[0][0] != "TOP":
            raise RuntimeError("read_top() with no TOP next in line")
        _, number, limit = self._in_flight.popleft()
        self._doing = f"waiting for the reply to TOP {number} 0"
        try:
            self._expect_ok()
        except POP3Error:
            self._check_in_step()
            return None
        chunks: list[bytes] = []
        self._read_data(chunks.append, limit)
        self._check_in_step()
        return b"".join(chunks)

    # RETR and DELE may be pipelined: each command sent is queued in ``_in_flight`` and its reply is read in
    # order. DELE replies are read lazily; a -ERR to DELE is remembered in ``refused_deletions``, not raised,
    # because the message was already recorded as handled: the next poll simply deletes it again.

    def send_retrieve(self, number: int, *, limit: int | None = None) -> None:
        """RETR ``number``; at most ``limit`` octets of its data will be accepted when it is read."""
        self._send(f"RETR {number}", defer=self.pipelining)
        self._in_flight.append(("RETR", number, limit))

    def read_retrieved(self, sink: Callable[[bytes], None]) -> int:
        """Read the next RETR reply in line (after the DELE replies queued before it) into ``sink``.

        After the data, what has already arrived must be the start of the next reply (or nothing, when no reply
        is owed): a stray line after a message's terminator ends the session before that message is handed on.
        A message whose first line is a status line (``+OK …``, ``-ERR …``) is a reply read one step late -- a
        stray, well-formed status line before it was taken for this RETR's reply -- and ends the session too: a
        message starts with its header fields, never with a POP3 status.
        """
        self._read_deletion_replies(stop_at_retrieve=True)
        if not self._in_flight:
            raise RuntimeError("read_retrieved() with no RETR in flight")
        _, number, limit = self._in_flight.popleft()
        self._doing = f"waiting for the reply to RETR {number}"
        try:
            self._expect_ok()
        except POP3Error:
            self._check_in_step()
            raise
        received = self._read_data(sink, limit)
        line = self._first_line.split(b"\n", 1)[0].rstrip(b"\r")
        if line[:1] in b"+-" and line and (_is_status(line, b"+OK") or _is_status(line, b"-ERR")):
            raise POP3ProtocolError(f"{self.host}: the data of RETR {number} starts with a status line {line[:40]!r}: "
                                    "a stray reply came before it; the session is out of step")
        self._check_in_step()
        return received

    def delete(self, number: int, *, wait: bool = True) -> None:
        """DELE ``number``; with ``wait=False`` on a pipelining server its reply is read later."""
        self._send(f"DELE {number}", defer=self.pipelining and not wait)
        self._in_flight.append(("DELE", number, None))
        if wait or not self.pipelining:
            self._read_deletion_replies(stop_at_retrieve=False)

    def settle(self) -> None:
        """Read every reply still owed (abandoning the data of RETRs nobody will read)."""
        while self._in_flight:
            if self._in_flight[0][0] == "RETR":
                with contextlib.suppress(POP3Error):  # a -ERR to an abandoned RETR: nothing to read
                    self.read_retrieved(lambda _data: None)  # bounded by the limit given when it was sent
            elif self._in_flight[0][0] == "TOP":
                self.read_top()
            else:
                self._read_deletion_replies(stop_at_retrieve=True)

    def confirm_in_step(self, number: int, size: int) -> None:
        """Prove that replies are still read against their own commands, after a ``-ERR`` to a RETR.

        A ``-ERR`` line the server sent twice, or out of turn, looks exactly like a refused RETR, and every reply
        after it would then be read one command late: the next message would be handed on with the data of the
        one before. So every reply still owed is read (the data of RETRs sent behind it discarded; the caller asks
        for those messages again), and ``LIST number`` of a message listed and not deleted must be answered with
        its own number and size, with nothing behind it. Anything else ends the session as out of step."""
        self.settle()
        self._doing = f"confirming the session is in step (LIST {number})"
        self._send(f"LIST {number}")
        try:
            fields = self._expect_ok().split()
        except POP3Error as exc:
            raise POP3ProtocolError(f"{self.host}: -ERR {self._doing}, a message the server listed: the replies "
                                    "cannot be told apart from replies read one command late; the session is out "
                                    "of step", exc.reply) from None
        if fields[:2] != [str(number), str(size)]:
            raise POP3ProtocolError(f"{self.host}: the reply {self._doing} names {' '.join(fields[:2])!r}, not "
                                    f"'{number} {size}': a reply came out of turn; the session is out of step",
                                    " ".join(fields))
        self._check_in_step()

    def _read_deletion_replies(self, *, stop_at_retrieve: bool) -> None:
        while self._in_flight and self._in_flight[0][0] == "DELE":
            _, number, _ = self._in_flight.popleft()
            self._doing = f"waiting for the reply to DELE {number}"
            try:
                self._expect_ok()
            except POP3Error as exc:  # a well-formed -ERR: refused, and the session is still in step
                self.refused_deletions[number] = exc.reply
        if not stop_at_retrieve and self._in_flight:
            raise RuntimeError("DELE reply expected, but RETR replies are still in flight")

    def quit(self) -> None:
        """QUIT: the server now removes the messages marked with DELE (RFC 1939 UPDATE state). Data after QUIT's
        reply means the replies were out of step: raised, so that no deletion counts as confirmed."""
        self.settle()
        self._send("QUIT")
        try:
            self._expect_ok()
            if self._receiver.pending:
                raise POP3ProtocolError(f"{self.host}: data after the reply to QUIT: the replies were out of step; "
                                        "no deletion is taken as done")
        finally:
            self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()

    # --- wire ---

    @property
    def _replies_owed(self) -> int:
        """Commands sent (not merely queued) whose replies have not been read."""
        return len(self._in_flight) - self._queued

    def _check_in_step(self) -> None:
        """What has arrived after a complete reply must be the start of the next one: ``+OK``/``-ERR`` when a
        reply is owed, nothing otherwise. A cheap look at the buffer, no wait."""
        ahead = self._receiver.peek(4)
        if not ahead:
            return
        if self._replies_owed <= 0:
            raise POP3ProtocolError(f"{self.host}: data arrived where no reply was expected ({ahead!r}, after "
                                    f"{self._doing}): the session is out of step", ahead.decode("latin-1"))
        if not (ahead.startswith((b"+OK", b"-ERR")) or b"+OK".startswith(ahead) or b"-ERR".startswith(ahead)):
            raise POP3ProtocolError(f"{self.host}: what follows the reply is not a reply ({ahead!r}, after "
                                    f"{self._doing}): the session is out of step", ahead.decode("latin-1"))

    def _send_all(self, commands: list[str]) -> None:
        """Several commands in one write (pipelining); their replies are read in order by the caller."""
        self._send("\r\n".join(commands), shown=" + ".join(commands))

    def _send(self, command: str, *, shown: str | None = None, defer: bool = False) -> None:
        """Write a command; ``defer`` (pipelining only) collects it with others until a read has to wait for the
        server, or `FLUSH_AFTER` commands are waiting -- enough for few writes, soon enough to keep the server busy.

        Data the server sent when no reply was owed is out of step: the session ends before the command goes out."""
        if self._receiver.pending and self._replies_owed <= 0:
            stray = self._receiver.peek(40)
            raise POP3ProtocolError(f"{self.host}: the server sent data nobody asked for before "
                                    f"{shown or command.split(' ')[0]}: {stray!r}; the session is out of step",
                                    stray.decode("latin-1"))
        if self._trace:
            self._trace.sent(command)
        self._outgoing += command.encode("utf-8") + b"\r\n"
        self._queued += 1
        what = shown or command.split(" ", 1)[0]
        if not defer or self._queued >= FLUSH_AFTER:
            self._flush(what)
        self._doing = f"waiting for the reply to {what}"

    def _flush(self, what: str = "commands") -> None:
        if not self._outgoing:
            return
        data, self._outgoing, self._queued = bytes(self._outgoing), bytearray(), 0
        doing, self._doing = self._doing, f"sending {what}"
        self._limit_wait(None)
        try:
            self._sock.sendall(data)
        except TimeoutError:
            raise POP3ConnectionError(self._timed_out()) from None
        except OSError as exc:
            raise POP3ConnectionError(f"{self.host}: connection lost {self._doing}: {exc.strerror or exc}") from None
        self._doing = doing

    def _limit_wait(self, line_deadline: float | None) -> None:
        """Give the next socket operation ``timeout``, or less when the line's or the session's deadline is
        nearer; past a deadline, end the session at once."""
        wait, self._wait = self.timeout, Wait.READ
        if line_deadline is not None or self._deadline is not None:
            now = time.monotonic()
            if self._deadline is not None and self._deadline - now < wait:
                wait, self._wait = self._deadline - now, Wait.POLL
            if line_deadline is not None and line_deadline - now < wait:
                wait, self._wait = line_deadline - now, Wait.LINE
            if wait <= 0:
                raise POP3ConnectionError(self._timed_out())
        if wait != self._socket_timeout:
            self._sock.settimeout(wait)
            self._socket_timeout = wait

    def _timed_out(self) -> str:
        """Why the wait in progress ended, naming the limit that expired."""
        if self._wait is Wait.POLL:
            budget = (self._deadline or 0.0) - self._started
            return (f"{self.host}: timed out {self._doing}: the poll took longer than its poll_timeout "
                    f"({budget:.3g} s); the session ends without QUIT, nothing is deleted")
        if self._wait is Wait.LINE:
            return (f"{self.host}: timed out after {self.timeout:g} s {self._doing}: a reply line must arrive whole "
                    "within the timeout (the server sends too slowly)")
        return f"{self.host}: timed out after {self.timeout:g} s {self._doing}"

    def _receive(self, line_deadline: float | None = None) -> None:
        """Wait for more data from the server (sending the commands still queued first, or it would wait too)."""
        if self._outgoing:
            self._flush()
        self._limit_wait(line_deadline)
        try:
            received = self._receiver.fill()
        except TimeoutError:
            raise POP3ConnectionError(self._timed_out()) from None
        except ssl.SSLError as exc:
            raise POP3ConnectionError(f"{self.host}: TLS error {self._doing}: {exc.reason or exc}") from None
        except OSError as exc:
            raise POP3ConnectionError(f"{self.host}: connection lost {self._doing}: {exc.strerror or exc}") from None
        if not received:
            raise POP3ConnectionError(f"{self.host}: connection closed by the server {self._doing}")

    def _readline(self, limit: int) -> bytes:
        """One line with its line end, or ``limit`` bytes of a longer one; the whole line must arrive within
        ``timeout``, however the server spreads it over time."""
        line = self._receiver.line(limit)
        return line if line is not None else self._wait_for_line(limit)

    def _wait_for_line(self, limit: int) -> bytes:
        """The next line, which has not arrived whole yet (see `_readline`)."""
        line_deadline = time.monotonic() + self.timeout
        while True:
            self._receive(line_deadline)
            line = self._receiver.line(limit)
            if line is not None:
                return line

    def _check_complete(self, line: bytes, limit: int) -> None:
        if not line.endswith(b"\n"):
            raise POP3ProtocolError(f"{self.host}: reply line longer than {limit} bytes {self._doing}")

    def _read_reply_line(self, limit: int = MAX_REPLY_LINE) -> bytes:
        line = self._receiver.line(limit + 1)  # the line has often arrived already: no wait to bound
        if line is None:
            line = self._wait_for_line(limit + 1)
        if self._trace:
            self._trace.received(line)
        if line.endswith(b"\r\n"):
            return line.rstrip(b"\r\n")
        self._check_complete(line, limit)
        if self.line_ending is LineEnding.CRLF:
            raise POP3ProtocolError(f"{self.host}: a reply line ends in a bare LF {self._doing}, but this server ends "
                                    f"its lines in CRLF: {line[:100]!r}", line[:100].decode("latin-1"))
        return line.rstrip(b"\r\n")

    def _expect_ok(self, *, auth: bool = False) -> str:
        return self._ok_text(self._read_reply_line(), auth=auth)

    def _ok_text(self, line: bytes, *, auth: bool = False) -> str:
        """The text of a ``+OK`` status line; a well-formed ``-ERR`` raises `POP3Error` (`POP3AuthError` for a
        login), anything else `POP3ProtocolError`."""
        text = line.decode("utf-8", "replace")
        if line.startswith(b"+OK") and (len(line) == 3 or line[3] in _BLANKS):
            return text[3:].strip()
        if _is_status(line, b"-ERR"):
            reason = text[4:].strip() or "no reason given"
            if auth:
                raise POP3AuthError(f"{self.host}: login refused: {reason}", text)
            raise POP3Error(f"{self.host}: server said -ERR {self._doing}: {reason}", text)
        raise POP3ProtocolError(f"{self.host}: not a POP3 reply {self._doing}: {text[:100]!r}", text)

    def _read_listing(self, *, limit: int, line_limit: int) -> Iterator[bytes]:
        """The lines of a multi-line reply with short lines (CAPA, UIDL, LIST), one at a time so the caller keeps
        only what it parsed; at most ``limit`` lines of at most ``line_limit`` bytes each."""
        count = 0
        crlf = self.line_ending is LineEnding.CRLF
        while True:
            # The lines that have arrived whole, taken together; the terminator, a line still arriving and anything
            # malformed go the careful way, one line at a time.
            block = self._receiver.crlf_listing_lines(line_limit) if crlf else []
            count += len(block)
            if count > limit:
                raise POP3ProtocolError(f"{self.host}: more than {limit} lines {self._doing}")
            if self._trace:  # once per block, not per line: a listing can have millions
                for line in block:
                    self._trace.received(line)
            for line in block:
                yield line[1:] if line.startswith(b"..") else line
            line = self._read_reply_line(line_limit)
            if line == b".":
                return
            count += 1
            if count > limit:
                raise POP3ProtocolError(f"{self.host}: more than {limit} lines {self._doing}")
            yield line[1:] if line.startswith(b"..") else line

    def _number_and_rest(self, line: bytes, what: str) -> tuple[int, bytes]:
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise POP3ProtocolError(f"{self.host}: {what}: malformed listing line",
                                    line[:100].decode("ascii", "replace"))
        return int(parts[0]), parts[1]

    def _read_data(self, sink: Callable[[bytes], None], limit: int | None) -> int:
        """Read a multi-line data block up to its terminating ``.`` line, undoing the byte-stuffing of line starts.

        Works on everything that has arrived at once (a small message is one step), not line by line; only the
        first two bytes of a line starting with a dot wait for more data before they are judged, so every byte
        received is counted against ``limit`` as it arrives.
        """
        received = 0
        at_line_start = True
        self._first_line = b""  # enough of the first line to judge it (see `read_retrieved`)
        crlf = self.line_ending is LineEnding.CRLF
        line_end = b"\r\n" if crlf else b"\n"
        read = self._receiver.crlf_data_lines if crlf else self._receiver.lf_data_lines
        while True:
            if not self._receiver.pending:
                self._receive()
            try:
                piece, done = read(at_line_start)
            except _BrokenTerminator:
                raise POP3ProtocolError(f"{self.host}: a dot line that does not end the data {self._doing} (a dot "
                                        "and a stray line end, or a dot glued to a status line): a broken "
                                        "terminator, out of step") from None
            if piece is None:
                self._receive()  # a dot at a line start, and the one or two bytes that tell what it is still to come
                continue
            if piece:
                if received < FIRST_LINE_HEAD and b"\n" not in self._first_line:
                    self._first_line += piece[:FIRST_LINE_HEAD]
                received += len(piece)
                if limit is not None and received > limit:
                    raise MessageTooLarge(f"{self.host}: message data exceeds {limit} bytes {self._doing}")
                at_line_start = piece.endswith(line_end)
                sink(piece)
            if done:
                if self._trace:
                    self._trace.elided(received, sent=False)
                return received


def _is_status(line: bytes, word: bytes) -> bool:
    """``+OK`` or ``-ERR`` alone or followed by white space: "+OKAY" is not a status line."""
    return line.startswith(word) and line[len(word):len(word) + 1] in (b"", b" ", b"\t")


class Receiver:
    """The receiving side of a connection, with a buffer the client can look into: whether a reply has arrived
    already decides whether queued commands must go out now, and a message's data is taken in whole runs of lines
    instead of line by line."""

    def __init__(self, sock: socket.socket, size: int) -> None:
        self.size = size
        self._sock = sock
        self._data = b""
        self._pos = 0

    @property
    def pending(self) -> int:
        return len(self._data) - self._pos

    def peek(self, count: int) -> bytes:
        """Up to ``count`` bytes that have arrived and not been taken, left in place."""
        return self._data[self._pos:self._pos + count]

    def fill(self) -> bool:
        """Receive what the server has sent (waiting for it); False at the end of the stream."""
        more = self._sock.recv(self.size)
        if not more:
            return False
        self._data = self._data[self._pos:] + more if self._pos < len(self._data) else more
        self._pos = 0
        return True

    def line(self, limit: int) -> bytes | None:
        """The next line (at most ``limit`` bytes of it), or None when it has not arrived yet."""
        end = self._data.find(b"\n", self._pos, self._pos + limit)
        if end == -1:
            if len(self._data) - self._pos < limit:  # not yet arrived whole
                return None
            end = self._pos + limit - 1
        return self._take(end + 1)

    def crlf_listing_lines(self, line_limit: int) -> list[bytes]:
        """The whole CRLF-ended lines of a listing that have arrived, up to (not including) its terminating "."
        line, without their line ends; [] when the next line is the terminator, is still arriving, or when a line
        among them is too long or has a bare LF (the caller's line-by-line reading then reports it)."""
        data, start = self._data, self._pos
        if data.startswith(b".\r\n", start):
            return []
        end = data.find(b"\r\n.\r\n", start)
        end = data.rfind(b"\r\n", start) if end == -1 else end
        if end < start:
            return []
        block = data[start:end]
        lines = block.split(b"\r\n")
        if block.count(b"\n") != len(lines) - 1 or max(map(len, lines)) + 2 > line_limit:  # a bare LF, a long line
            return []
        self._pos = end + 2
        return lines

    def crlf_data_lines(self, at_line_start: bool) -> tuple[bytes | None, bool]:
        """Data of a block from a server whose lines end in CRLF (RFC 1939): what has arrived, unstuffed, and
        whether the terminating CRLF "." CRLF was among it (what follows is left for the next reply). Only CRLF
        ends a line: a bare LF followed by a dot is data. ``(None, False)``: the buffer ends in the first bytes of
        a line starting with a dot, or in a CR that may start a line end -- at most two bytes wait."""
        data, start = self._data, self._pos
        if at_line_start and data.startswith(b".", start):
            head = data[start:start + 3]
            if head == b".\r\n":
                self._pos = start + 3
                return b"", True
            if len(head) < 3 and b".\r\n".startswith(head):
                return None, False
            if head[1:2] in (b"\r", b"\n"):
                raise _BrokenTerminator
            if self._glued_status(start):
                return None, False
        end = data.find(b"\r\n.\r\n", start)
        if end != -1:
            block = self._take(end + 2)
            self._pos += 3
            return _unstuffed(block, at_line_start, b"\r\n"), True
        last_line_end = data.rfind(b"\r\n", start)
        if last_line_end != -1:
            return _unstuffed(self._take(last_line_end + 2), at_line_start, b"\r\n"), False
        stop = len(data) - 1 if data.endswith(b"\r") else len(data)  # a CR may be the start of the line end
        if stop <= start:
            return None, False
        return _unstuffed(self._take(stop), at_line_start, b"\r\n"), False  # a piece of a long line

    def lf_data_lines(self, at_line_start: bool) -> tuple[bytes | None, bool]:
        """The same for a server whose lines end in a bare LF: "." LF or "." CRLF after any LF ends the block
        (bare-LF terminators only before the first CRLF one: the buffer may hold many messages)."""
        data, start = self._data, self._pos
        if at_line_start and data.startswith(b".", start):
            head = data[start:start + 3]
            if head.startswith(b".\n") or head == b".\r\n":
                self._pos = data.index(b"\n", start) + 1
                return b"", True
            if len(head) < 3 and b".\r\n".startswith(head):
                return None, False
            if head[1:2] == b"\r":
                raise _BrokenTerminator
            if self._glued_status(start):
                return None, False
        end = data.find(b"\n.\r\n", start)
        bare = data.find(b"\n.\n", start, len(data) if end == -1 else end)
        end = bare if bare != -1 else end
        if end != -1:
            end += 1
            block = self._take(end)
            self._pos = data.index(b"\n", end) + 1
            return _unstuffed(block, at_line_start, b"\n"), True
        last_line_end = data.rfind(b"\n", start)
        if last_line_end == -1:
            return _unstuffed(self._take(len(data)), at_line_start, b"\n"), False  # a piece of a long line
        return _unstuffed(self._take(last_line_end + 1), at_line_start, b"\n"), False

    def _glued_status(self, start: int) -> bool:
        """Whether the dot line at ``start`` is still too short to tell from a dot glued to a status line (True:
        wait for more); raises `_BrokenTerminator` when it is one."""
        head = self._data[start:start + 6]
        for status in _GLUED_HEAD:
            if head[:len(status)] == status:
                if len(head) == len(status):
                    return True
                if head[len(status):len(status) + 1] in b" \t\r\n":
                    raise _BrokenTerminator
            elif status.startswith(head):
                return True
        return False

    def _take(self, end: int) -> bytes:
        taken = self._data[self._pos:end]
        self._pos = end
        return taken


# A dot line that does not end the data: a dot and a stray line end, or a dot glued to the next reply's status
# ("." sent without its line end, then "+OK ..."), which would take that reply and the message after it for data.
_GLUED_STATUS = rb"\.(?:\+OK|-ERR)(?:[ \t\r\n]|\Z)"
_BROKEN_TERMINATOR = {b"\r\n": re.compile(rb"\r\n(?:\.[\r\n]|" + _GLUED_STATUS + rb")"),
                      b"\n": re.compile(rb"\n(?:\.\r(?!\n)|" + _GLUED_STATUS + rb")")}
_GLUED_HEAD = (b".+OK", b".-ERR")


def _unstuffed(block: bytes, at_line_start: bool, line_end: bytes) -> bytes:
    """Undo RFC 1939 byte-stuffing: a line that starts with two dots lost one to the server's stuffing; one that
    starts with a single dot and more text was not stuffed by the server and stays as it is -- unless that text is
    a status line. A dot and a line end that is not the terminator, or a dot and a status line, is a broken
    terminator (the caller judged the first line already)."""
    if at_line_start and block.startswith(b".."):
        block = block[1:]
    marker = line_end + b"."
    if marker not in block:
        return block
    if _BROKEN_TERMINATOR[line_end].search(block):
        raise _BrokenTerminator
    return block.replace(marker + b".", marker)
