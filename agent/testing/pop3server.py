"""A small, threaded, scriptable POP3 server (RFC 1939 + RFC 2449 CAPA).

It serves two masters:

* ``postbote demo`` runs it on a loopback port with sample messages, so it
  behaves like a real server: per-session message snapshots, deletions applied
  only in the UPDATE state (QUIT after TRANSACTION), a mailbox lock answered
  with ``-ERR [IN-USE]``, STLS and implicit TLS, pipelining, command-line and
  idle limits.
* Fault-injection tests script it to misbehave in ways a real Dovecot won't::

      faults = Faults().on("RETR", nth=2, action=Action.drop_midway(after_bytes=100))
      with POP3Server([b"Subject: hi\\r\\n\\r\\nbody\\r\\n"], faults=faults) as server:
          ...

All users share one mailbox; any name in ``users`` with its password opens it.
Only one session at a time may be in the TRANSACTION state; a second login
waits up to ``lock_timeout`` seconds and then gets ``-ERR [IN-USE]``.  (The wait
absorbs the tiny window in which a client has closed its socket but the
server thread has not yet noticed, so a reconnect right after a drop works.)

Sizes reported by LIST/STAT/RETR are the octet counts of the CRLF-normalised
message, like Dovecot: the CRLF that RETR appends to a message that does not
end in a newline is *not* counted.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import selectors
import socket
import ssl
import threading
import time
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

__all__ = [
    "DEFAULT_CAPABILITIES",
    "GREETING",
    "Action",
    "Drop",
    "DropAfterReply",
    "DropMidway",
    "EndlessLine",
    "Extend",
    "Faults",
    "Flood",
    "FollowedBy",
    "NoTerminator",
    "POP3Server",
    "Reply",
    "Stall",
    "Stuffing",
    "Trickle",
    "Truncate",
    "crlf_normalised",
]

CRLF = b"\r\n"
TERMINATOR = b".\r\n"
MAX_COMMAND_LINE = 512
DEFAULT_IDLE_TIMEOUT = 60.0
DEFAULT_LOCK_TIMEOUT = 1.0
DEFAULT_CAPABILITIES: tuple[str, ...] = (
    "TOP",
    "USER",
    "UIDL",
    "PIPELINING",
    "RESP-CODES",
    "AUTH-RESP-CODE",
    "IMPLEMENTATION postbote-test",
)
GREETING = "GREETING"
"""Pseudo-command for :meth:`Faults.on` that targets the server greeting."""

_STOP_JOIN_SECONDS = 5.0
_FLOOD_CHUNK_BYTES = 64 * 1024
_RECV_BYTES = 16 * 1024
_DEFAULT_USERS = types.MappingProxyType({"demo": "demo"})

UidlOverride = Callable[[int, list[str]], list[str]]


# --------------------------------------------------------------------------- actions


class Action:
    """Base of all fault actions; build them with the static constructors."""

    @staticmethod
    def drop() -> Drop:
        """Close the connection at once; the command is not executed, nothing is sent."""
        return Drop()

    @staticmethod
    def drop_midway(after_bytes: int) -> DropMidway:
        """Execute the command, send the status line plus ``after_bytes`` of the
        multi-line data (or ``after_bytes`` of a single-line reply), then close."""
        return DropMidway(after_bytes)

    @staticmethod
    def reply(line: str | bytes) -> Reply:
        """Send ``line`` (CRLF added unless it ends in LF) instead of executing the command."""
        return Reply(line if isinstance(line, bytes) else line.encode("latin-1"))

    @staticmethod
    def stall(seconds: float, then: Action | None = None) -> Stall:
        """Sleep (interruptible by stop()), then apply ``then`` or answer normally."""
        return Stall(seconds, then)

    @staticmethod
    def truncate(n_bytes: int) -> Truncate:
        """Keep only the first ``n_bytes`` of the multi-line data, still properly terminated."""
        return Truncate(n_bytes)

    @staticmethod
    def extend(extra: bytes) -> Extend:
        """Append ``extra`` to the multi-line data (dot-stuffed, properly terminated)."""
        return Extend(extra)

    @staticmethod
    def no_terminator() -> NoTerminator:
        """Send the reply without the final ".", then ignore the client until it
        hangs up, the idle timeout passes or the server stops."""
        return NoTerminator()

    @staticmethod
    def drop_after_reply() -> DropAfterReply:
        """Execute and answer normally, then close.  On QUIT the deletions are applied."""
        return DropAfterReply()

    @staticmethod
    def followed_by(extra: bytes, then: Action | None = None) -> FollowedBy:
        """Answer normally (or apply ``then``), then send ``extra`` verbatim: a stray line after a reply."""
        return FollowedBy(extra, then)

    @staticmethod
    def trickle(interval: float) -> Trickle:
        """Answer normally, but one byte at a time with ``interval`` seconds between bytes (interruptible)."""
        return Trickle(interval)

    @staticmethod
    def endless_line(prefix: bytes = b".") -> EndlessLine:
        """Answer "+OK", then ``prefix`` and an endless line (no line end ever), until the client hangs up or the
        server stops."""
        return EndlessLine(prefix)

    @staticmethod
    def flood(line: bytes, count: int | None = None) -> Flood:
        """Answer "+OK" followed by ``line`` ``count`` times (forever when None),
        streamed in chunks; a finite flood is terminated with ".".  ``line`` is
        sent verbatim (no dot-stuffing), with CRLF added unless it ends in LF."""
        return Flood(line, count)


@dataclass(frozen=True)
class Drop(Action):
    pass


@dataclass(frozen=True)
class DropMidway(Action):
    after_bytes: int


@dataclass(frozen=True)
class Reply(Action):
    line: bytes


@dataclass(frozen=True)
class Stall(Action):
    seconds: float
    then: Action | None = None


@dataclass(frozen=True)
class Truncate(Action):
    n_bytes: int


@dataclass(frozen=True)
class Extend(Action):
    extra: bytes


@dataclass(frozen=True)
class NoTerminator(Action):
    pass


@dataclass(frozen=True)
class DropAfterReply(Action):
    pass


@dataclass(frozen=True)
class Flood(Action):
    line: bytes
    count: int | None = None


@dataclass(frozen=True)
class FollowedBy(Action):
    extra: bytes
    then: Action | None = None


@dataclass(frozen=True)
class Trickle(Action):
    interval: float


@dataclass(frozen=True)
class EndlessLine(Action):
    prefix: bytes = b"."


class Stuffing(Enum):
    """Which line starts a server dot-stuffs when it sends stored bytes raw (``Faults(raw_line_endings=True)``)."""

    AFTER_LF = "after every LF"  # a bare-LF server: its greeting ends in a bare LF too
    AFTER_CRLF = "after CRLF only"  # a CRLF server (RFC 1939 lines) that sends a bare LF inside a message as data


# --------------------------------------------------------------------------- faults


@dataclass
class _Rule:
    keyword: str
    arguments: str | None
    first: int
    last: int | None
    action: Action
    seen: int = 0

    def fires_on(self, keyword: str, arguments: str) -> bool:
        if keyword != self.keyword or (self.arguments is not None and arguments != self.arguments):
            return False
        self.seen += 1
        return self.seen >= self.first and (self.last is None or self.seen <= self.last)


class Faults:
    """Scripted misbehaviour for a :class:`POP3Server`.

    ``raw_line_endings``: RETR/TOP send stored bytes without LF -> CRLF
    normalisation; sizes are then the raw sizes. ``stuffing`` says which line
    starts are dot-stuffed then: `Stuffing.AFTER_LF` (the default) is a bare-LF
    server -- stuffed after each LF, and its greeting ends in a bare LF, which is
    how a client knows; `Stuffing.AFTER_CRLF` is a CRLF server that stuffs only
    lines after CRLF, so "\n.\n" inside a message goes out as it is, and ends the
    data with CRLF "." CRLF (adding a CRLF when the message does not end in one).

    ``uidl_override(session_no, uids) -> uids``: rewrites the UIDs a session
    sees (``session_no`` counts accepted connections from 1), e.g. to report
    duplicates or UIDs that change between sessions.

    ``fired`` logs every command (or ``GREETING``) that triggered a rule.
    """

    def __init__(
        self, *, raw_line_endings: bool = False, uidl_override: UidlOverride | None = None,
        stuffing: Stuffing = Stuffing.AFTER_LF,
    ) -> None:
        self.raw_line_endings = raw_line_endings
        self.stuffing = stuffing
        self.uidl_override = uidl_override
        self.fired: list[str] = []
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()

    def on(self, command: str, *, nth: int = 1, times: int | None = 1, action: Action) -> Faults:
        """Apply ``action`` to the ``nth`` matching command (1-based, counted
        across sessions) and the ``times - 1`` after it; ``times=None`` means
        every match from the ``nth`` on.

        ``command`` is a keyword ("RETR", "PASS", ..., or ``GREETING``) matching
        any arguments, or a keyword with arguments ("RETR 3") matching exactly
        those.  When several rules fire, the one registered first wins.
        """
        if nth < 1 or (times is not None and times < 1):
            raise ValueError("nth and times must be >= 1")
        if not isinstance(action, Action):
            raise TypeError(f"action must be an Action, not {type(action).__name__}")
        keyword, _, arguments = command.strip().partition(" ")
        last = None if times is None else nth + times - 1
        rule = _Rule(keyword.upper(), _normalised_arguments(arguments) or None, nth, last, action)
        with self._lock:
            self._rules.append(rule)
        return self

    def action_for(self, keyword: str, arguments: str) -> Action | None:
        """Count this command against every rule and return the action to apply, if any."""
        normalised = _normalised_arguments(arguments)
        with self._lock:
            firing = [rule for rule in self._rules if rule.fires_on(keyword, normalised)]
            if not firing:
                return None
            self.fired.append(f"{keyword} {normalised}".rstrip())
            return firing[0].action


def _normalised_arguments(arguments: str) -> str:
    return " ".join(arguments.split())


# --------------------------------------------------------------------------- wire format


def crlf_normalised(data: bytes) -> bytes:
    """Turn every LF (with or without a preceding CR) into CRLF."""
    return re.sub(rb"\r?\n", CRLF, data)


def _dot_stuffed(data: bytes, stuffing: Stuffing = Stuffing.AFTER_LF) -> bytes:
    if stuffing is Stuffing.AFTER_CRLF:
        return re.sub(rb"(\A|\r\n)\.", rb"\1..", data)
    return re.sub(rb"(?m)^\.", b"..", data)


def _multiline_data(body: bytes, *, terminated: bool = True, stuffing: Stuffing = Stuffing.AFTER_LF) -> bytes:
    """Dot-stuff ``body``, make it end in a newline (CRLF for `Stuffing.AFTER_CRLF`) and add the terminator."""
    stuffed = _dot_stuffed(body, stuffing)
    line_end = CRLF if stuffing is Stuffing.AFTER_CRLF else b"\n"
    if stuffed and not stuffed.endswith(line_end):
        stuffed += CRLF
    return stuffed + TERMINATOR if terminated else stuffed


def _lines_with_endings(data: bytes) -> list[bytes]:
    """Split on LF only (a bare CR is not a line end), keeping the endings."""
    return re.findall(rb"[^\n]*\n|[^\n]+$", data)


def _top_of(data: bytes, body_lines: int) -> bytes:
    """Headers, the blank separator line and the first ``body_lines`` body lines."""
    lines = _lines_with_endings(data)
    for index, line in enumerate(lines):
        if line in (b"\n", b"\r\n"):
            return b"".join(lines[: index + 1 + body_lines])
    return data


@dataclass
class _Response:
    status: bytes
    body: bytes | None = None
    closes: bool = False
    after_sent: Callable[[], None] | None = None
    stuffing: Stuffing = Stuffing.AFTER_LF
    line_end: bytes = CRLF

    @property
    def status_line(self) -> bytes:
        return self.status + self.line_end

    def data(self, *, terminated: bool = True) -> bytes:
        if self.body is None:
            return b""
        return _multiline_data(self.body, terminated=terminated, stuffing=self.stuffing)

    def encoded(self) -> bytes:
        return self.status_line + self.data()


def _ok(text: str = "", body: bytes | None = None) -> _Response:
    return _Response(f"+OK {text}".rstrip().encode("latin-1"), body)


def _lines(items: Iterable[str]) -> bytes:
    return b"".join(item.encode("latin-1") + CRLF for item in items)


class _Refusal(Exception):
    """A command failed; the message becomes an ``-ERR`` reply."""


class _EndSession(Exception):
    """Close the connection now."""


class _LineTooLong(Exception):
    pass


# --------------------------------------------------------------------------- mailbox


@dataclass(eq=False)
class _StoredMessage:
    uid: str
    data: bytes


class _LineReader:
    """Buffered line reader over a socket that can drop its buffer (for STLS)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = b""

    def readline(self, limit: int) -> bytes:
        """Next line including its LF, or b"" at EOF.

        A line longer than ``limit`` is consumed entirely and reported as
        :class:`_LineTooLong`, so the session can answer -ERR and go on.
        """
        too_long = False
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line, self._buffer = self._buffer[: end + 1], self._buffer[end + 1 :]
                if too_long or len(line) > limit:
                    raise _LineTooLong
                return line
            if len(self._buffer) > limit:
                too_long, self._buffer = True, b""
            chunk = self._sock.recv(_RECV_BYTES)
            if not chunk:
                return b""
            self._buffer += chunk

    def discard_buffered(self) -> None:
        self._buffer = b""


# --------------------------------------------------------------------------- session


class _Session:
    """One client connection, run in its own thread."""

    def __init__(self, server: POP3Server, sock: socket.socket, number: int) -> None:
        self.number = number
        self._server = server
        self._sock = sock
        self._control = sock.dup()  # shutdown() on it works whatever wraps self._sock
        self._reader = _LineReader(sock)
        self._tls_active = False
        self._timestamp = f"<{os.getpid()}.{time.time_ns()}.{number}@{socket.gethostname()}>"
        self._pending_user: str | None = None
        self._snapshot: list[_StoredMessage] | None = None
        self._snapshot_uids: list[str] = []
        self._deleted: set[int] = set()

    # ---- lifecycle

    def run(self) -> None:
        try:
            self._serve()
        except (OSError, _EndSession):
            pass
        except Exception as error:  # a session bug must not kill the server
            self._server.errors.append(error)
        finally:
            self._release_mailbox()
            self._close()
            self._server._session_finished(self)

    def abort(self) -> None:
        """Wake the session thread from any blocking socket call (used by stop())."""
        with contextlib.suppress(OSError):
            self._control.shutdown(socket.SHUT_RDWR)

    def _close(self) -> None:
        self.abort()
        for sock in (self._sock, self._control):
            with contextlib.suppress(OSError):
                sock.close()

    def _serve(self) -> None:
        if self._server.ssl_context is not None:
            self._switch_to_tls(self._server.ssl_context)
        greeting = "POP3 ready " + self._timestamp if self._server.timestamp_banner else "POP3 ready"
        self._respond(GREETING, "", lambda: self._greeting(greeting))
        while not self._server._stopping.is_set():
            try:
                line = self._reader.readline(MAX_COMMAND_LINE)
            except _LineTooLong:
                self._send(b"-ERR Command line too long" + CRLF)
                continue
            if not line:
                return
            self._handle(line.rstrip(b"\r\n").decode("latin-1"))

    def _handle(self, command: str) -> None:
        keyword, _, arguments = command.partition(" ")
        keyword = keyword.upper()
        self._server._log_command("PASS ****" if keyword == "PASS" else command)
        self._respond(keyword, arguments, lambda: self._execute(keyword, arguments))

    # ---- faults

    def _respond(self, keyword: str, arguments: str, execute: Callable[[], _Response]) -> None:
        faults = self._server.faults
        action = faults.action_for(keyword, arguments) if faults is not None else None
        self._perform(action, execute)

    def _perform(self, action: Action | None, execute: Callable[[], _Response]) -> None:
        match action:
            case None:
                self._send_response(execute())
            case Drop():
                raise _EndSession
            case Reply(line=line):
                self._send(line if line.endswith(b"\n") else line + CRLF)
            case Stall(seconds=seconds, then=then):
                if self._server._stopping.wait(seconds):
                    raise _EndSession
                self._perform(then, execute)
            case DropAfterReply():
                self._send(execute().encoded())
                raise _EndSession
            case DropMidway(after_bytes=after_bytes):
                response = execute()
                if response.body is None:
                    self._send(response.status_line[:after_bytes])
                else:
                    self._send(response.status_line + response.data()[:after_bytes])
                raise _EndSession
            case Truncate(n_bytes=n_bytes):
                response = execute()
                if response.body is not None:
                    response.body = response.body[:n_bytes]
                self._send_response(response)
            case Extend(extra=extra):
                response = execute()
                if response.body is not None:
                    response.body += extra
                self._send_response(response)
            case NoTerminator():
                response = execute()
                self._send(response.status_line + response.data(terminated=False))
                self._ignore_client()
            case Flood(line=line, count=count):
                self._flood(line, count)
            case FollowedBy(extra=extra, then=None):
                response = execute()
                self._send(response.encoded() + extra)  # one write: the stray bytes arrive with the reply
                if response.after_sent is not None:
                    response.after_sent()
                if response.closes:
                    raise _EndSession
            case FollowedBy(extra=extra, then=then):
                self._perform(then, execute)
                self._send(extra)
            case Trickle(interval=interval):
                response = execute()
                self._trickle(response.encoded(), interval)
                if response.closes:
                    raise _EndSession
            case EndlessLine(prefix=prefix):
                self._endless_line(prefix)
            case _:
                raise TypeError(f"unknown fault action {action!r}")

    def _greeting(self, text: str) -> _Response:
        response = _ok(text)
        faults = self._server.faults
        if faults is not None and faults.raw_line_endings and faults.stuffing is Stuffing.AFTER_LF:
            response.line_end = b"\n"  # a bare-LF server says so from its first line on
        return response

    def _raw_stuffing(self) -> Stuffing:
        faults = self._server.faults
        return faults.stuffing if faults is not None and faults.raw_line_endings else Stuffing.AFTER_LF

    def _trickle(self, data: bytes, interval: float) -> None:
        for index in range(len(data)):
            self._send(data[index:index + 1])
            if self._server._stopping.wait(interval):
                raise _EndSession

    def _endless_line(self, prefix: bytes) -> None:
        self._send(b"+OK endless line follows" + CRLF + prefix)
        chunk = b"x" * _FLOOD_CHUNK_BYTES
        while not self._server._stopping.is_set():
            self._send(chunk)
        raise _EndSession

    def _ignore_client(self) -> None:
        """Read and discard input until EOF, idle timeout or server stop, then end."""
        while self._sock.recv(_RECV_BYTES):
            pass
        raise _EndSession

    def _flood(self, line: bytes, count: int | None) -> None:
        if not line.endswith(b"\n"):
            line += CRLF
        per_chunk = max(1, _FLOOD_CHUNK_BYTES // len(line))
        chunk = line * per_chunk
        self._send(b"+OK flood follows" + CRLF)
        remaining = count
        while remaining is None or remaining > 0:
            if self._server._stopping.is_set():
                raise _EndSession
            lines_now = per_chunk if remaining is None else min(per_chunk, remaining)
            self._send(chunk if lines_now == per_chunk else line * lines_now)
            if remaining is not None:
                remaining -= lines_now
        self._send(TERMINATOR)

    # ---- I/O

    def _send(self, data: bytes) -> None:
        self._sock.sendall(data)

    def _send_response(self, response: _Response) -> None:
        self._send(response.encoded())
        if response.after_sent is not None:
            response.after_sent()
        if response.closes:
            raise _EndSession

    def _switch_to_tls(self, context: ssl.SSLContext) -> None:
        self._reader.discard_buffered()  # bytes sent before the handshake must not count (CVE-2021-38084)
        self._sock = context.wrap_socket(self._sock, server_side=True)
        self._reader = _LineReader(self._sock)
        self._tls_active = True
        self._pending_user = None

    # ---- commands

    def _execute(self, keyword: str, arguments: str) -> _Response:
        handlers = self._transaction_handlers if self._in_transaction else self._authorization_handlers
        handler = None if keyword in self._server.without else handlers.get(keyword)
        try:
            if handler is not None:
                return handler(self, arguments)
            if keyword not in self._server.without and (keyword in self._authorization_handlers
                                                        or keyword in self._transaction_handlers):
                raise _Refusal("Command not valid in this state")
            raise _Refusal("Unknown command")
        except _Refusal as refusal:
            return _Response(f"-ERR {refusal}".encode("latin-1"))

    @property
    def _in_transaction(self) -> bool:
        return self._snapshot is not None

    def _capa(self, arguments: str) -> _Response:
        _expect_arguments(arguments, 0)
        return _ok("Capability list follows", _lines(self._capabilities()))

    def _capabilities(self) -> list[str]:
        server = self._server
        if server.capabilities is not None:
            listed = list(server.capabilities)
        else:
            listed = list(DEFAULT_CAPABILITIES)
            if server.starttls_context is not None:
                listed.insert(-1, "STLS")
        if self._tls_active:
            listed = [capability for capability in listed if capability.upper() != "STLS"]
        return [capability for capability in listed if capability.split(" ")[0].upper() not in server.without]

    def _user(self, arguments: str) -> _Response:
        (self._pending_user,) = _expect_arguments(arguments, 1)
        return _ok()

    def _pass(self, arguments: str) -> _Response:
        user, self._pending_user = self._pending_user, None
        if user is None:
            raise _Refusal("USER first")
        if self._server.users.get(user) != arguments:
            raise _Refusal("[AUTH] Authentication failed")
        return self._open_mailbox()

    def _apop(self, arguments: str) -> _Response:
        user, digest = _expect_arguments(arguments, 2)
        password = self._server.users.get(user)
        if not self._server.timestamp_banner or password is None:
            raise _Refusal("[AUTH] Authentication failed")
        expected = hashlib.md5((self._timestamp + password).encode("latin-1")).hexdigest()
        if digest.lower() != expected:
            raise _Refusal("[AUTH] Authentication failed")
        return self._open_mailbox()

    def _stls(self, arguments: str) -> _Response:
        _expect_arguments(arguments, 0)
        context = self._server.starttls_context
        if context is None or self._tls_active:
            raise _Refusal("STLS not available")
        response = _ok("Begin TLS negotiation")
        response.after_sent = lambda: self._switch_to_tls(context)
        return response

    def _quit_unauthenticated(self, arguments: str) -> _Response:
        return _Response(b"+OK Bye", closes=True)

    def _open_mailbox(self) -> _Response:
        snapshot = self._server._lock_mailbox(self)
        if snapshot is None:
            raise _Refusal("[IN-USE] Mailbox is locked by another session")
        uids = [message.uid for message in snapshot]
        override = self._server.faults.uidl_override if self._server.faults is not None else None
        if override is not None:
            uids = list(override(self.number, uids))
        self._snapshot, self._snapshot_uids = snapshot, uids
        return _ok(f"Logged in, {len(snapshot)} messages")

    def _release_mailbox(self) -> None:
        if self._snapshot is not None:
            self._snapshot = None
            self._server._unlock_mailbox(self)

    def _wire_body(self, message: _StoredMessage) -> bytes:
        faults = self._server.faults
        if faults is not None and faults.raw_line_endings:
            return message.data
        return crlf_normalised(message.data)

    def _live_numbers(self) -> list[int]:
        assert self._snapshot is not None
        return [number for number in range(1, len(self._snapshot) + 1) if number not in self._deleted]

    def _message_number(self, argument: str) -> int:
        assert self._snapshot is not None
        if not re.fullmatch(r"[0-9]{1,9}", argument):
            raise _Refusal("Invalid message number")
        number = int(argument)
        if not 1 <= number <= len(self._snapshot):
            raise _Refusal("No such message")
        if number in self._deleted:
            raise _Refusal("Message is deleted")
        return number

    def _size(self, number: int) -> int:
        assert self._snapshot is not None
        return len(self._wire_body(self._snapshot[number - 1]))

    def _uid(self, number: int) -> str:
        uids = self._snapshot_uids
        assert self._snapshot is not None
        return uids[number - 1] if number <= len(uids) else self._snapshot[number - 1].uid

    def _stat(self, arguments: str) -> _Response:
        _expect_arguments(arguments, 0)
        numbers = self._live_numbers()
        return _ok(f"{len(numbers)} {sum(self._size(number) for number in numbers)}")

    def _list(self, arguments: str) -> _Response:
        if argument := _optional_argument(arguments):
            number = self._message_number(argument)
            return _ok(f"{number} {self._size(number)}")
        numbers = self._live_numbers()
        sizes = {number: self._size(number) for number in numbers}
        summary = f"{len(numbers)} messages ({sum(sizes.values())} octets)"
        return _ok(summary, _lines(f"{number} {size}" for number, size in sizes.items()))

    def _uidl(self, arguments: str) -> _Response:
        if argument := _optional_argument(arguments):
            number = self._message_number(argument)
            return _ok(f"{number} {self._uid(number)}")
        return _ok("", _lines(f"{number} {self._uid(number)}" for number in self._live_numbers()))

    def _retr(self, arguments: str) -> _Response:
        (argument,) = _expect_arguments(arguments, 1)
        number = self._message_number(argument)
        assert self._snapshot is not None
        body = self._wire_body(self._snapshot[number - 1])
        response = _ok(f"{len(body)} octets", body)
        response.stuffing = self._raw_stuffing()
        return response

    def _top(self, arguments: str) -> _Response:
        message_argument, lines_argument = _expect_arguments(arguments, 2)
        number = self._message_number(message_argument)
        if not re.fullmatch(r"[0-9]{1,9}", lines_argument):
            raise _Refusal("Invalid line count")
        assert self._snapshot is not None
        body = _top_of(self._wire_body(self._snapshot[number - 1]), int(lines_argument))
        response = _ok("", body)
        response.stuffing = self._raw_stuffing()
        return response

    def _dele(self, arguments: str) -> _Response:
        (argument,) = _expect_arguments(arguments, 1)
        number = self._message_number(argument)
        self._deleted.add(number)
        return _ok(f"Message {number} deleted")

    def _noop(self, arguments: str) -> _Response:
        _expect_arguments(arguments, 0)
        return _ok()

    def _rset(self, arguments: str) -> _Response:
        _expect_arguments(arguments, 0)
        self._deleted.clear()
        return _ok(f"{len(self._live_numbers())} messages")

    def _quit_transaction(self, arguments: str) -> _Response:
        """Enter the UPDATE state: apply deletions, unlock, then say goodbye."""
        assert self._snapshot is not None
        doomed = [self._snapshot[number - 1] for number in sorted(self._deleted)]
        self._server._expunge(doomed)
        self._release_mailbox()
        return _Response(f"+OK Bye, {len(doomed)} messages deleted".encode("latin-1"), closes=True)

    _authorization_handlers: ClassVar[dict[str, Callable[[_Session, str], _Response]]] = {
        "CAPA": _capa,
        "USER": _user,
        "PASS": _pass,
        "APOP": _apop,
        "STLS": _stls,
        "QUIT": _quit_unauthenticated,
    }
    _transaction_handlers: ClassVar[dict[str, Callable[[_Session, str], _Response]]] = {
        "CAPA": _capa,
        "STAT": _stat,
        "LIST": _list,
        "UIDL": _uidl,
        "RETR": _retr,
        "TOP": _top,
        "DELE": _dele,
        "NOOP": _noop,
        "RSET": _rset,
        "QUIT": _quit_transaction,
    }


def _expect_arguments(arguments: str, count: int) -> list[str]:
    words = arguments.split()
    if len(words) != count:
        raise _Refusal(f"Syntax error: expected {count} argument(s)")
    return words


def _optional_argument(arguments: str) -> str | None:
    words = arguments.split()
    if len(words) > 1:
        raise _Refusal("Syntax error: too many arguments")
    return words[0] if words else None


# --------------------------------------------------------------------------- server


class POP3Server:
    """Threaded POP3 server with one shared mailbox; see the module docstring.

    ``faults`` may be replaced while the server runs; each command consults
    the current value.  ``capabilities`` only changes what CAPA advertises:
    pipelining, for instance, keeps working when it is not listed.
    ``without`` names optional commands the server does not know at all
    (``{"UIDL"}``, ``{"UIDL", "TOP"}``: old servers): they get ``-ERR Unknown
    command`` and are left out of CAPA.
    """

    def __init__(
        self,
        messages: Iterable[bytes | tuple[str, bytes]] = (),
        *,
        users: Mapping[str, str] = _DEFAULT_USERS,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        starttls_context: ssl.SSLContext | None = None,
        capabilities: Sequence[str] | None = None,
        timestamp_banner: bool = True,
        faults: Faults | None = None,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
        without: Iterable[str] = (),
    ) -> None:
        self.host = host
        self.without = frozenset(command.upper() for command in without)
        self.port = port
        self.users = dict(users)
        self.ssl_context = ssl_context
        self.starttls_context = starttls_context
        self.capabilities = None if capabilities is None else tuple(capabilities)
        self.timestamp_banner = timestamp_banner
        self.faults = faults
        self.idle_timeout = idle_timeout
        self.lock_timeout = lock_timeout
        self.commands: list[str] = []
        self.sessions = 0
        self.errors: list[BaseException] = []
        """Unexpected exceptions raised inside sessions (server bugs); should stay empty."""

        self._mailbox: list[_StoredMessage] = []
        self._added = 0
        self._mailbox_guard = threading.Condition()
        self._mailbox_owner: _Session | None = None
        self._active: dict[_Session, threading.Thread] = {}
        self._active_guard = threading.Lock()
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._wakeup: tuple[socket.socket, socket.socket] | None = None
        self._accept_thread: threading.Thread | None = None
        for message in messages:
            if isinstance(message, tuple):
                self.add_message(message[1], uid=message[0])
            else:
                self.add_message(message)

    # ---- mailbox

    def add_message(self, data: bytes, uid: str | None = None) -> str:
        """Append a message and return its UID.

        Generated UIDs ("msg-000001-<sha1 prefix>") are unique within the
        server and stable: the same messages in the same order give the same
        UIDs in a new server, as after a real server restart.
        """
        with self._mailbox_guard:
            self._added += 1
            if uid is None:
                uid = f"msg-{self._added:06d}-{hashlib.sha1(data).hexdigest()[:10]}"
            self._mailbox.append(_StoredMessage(uid, bytes(data)))
        return uid

    def messages(self) -> list[tuple[str, bytes]]:
        with self._mailbox_guard:
            return [(message.uid, message.data) for message in self._mailbox]

    def uids(self) -> list[str]:
        with self._mailbox_guard:
            return [message.uid for message in self._mailbox]

    def wait_until_unlocked(self, timeout: float) -> bool:
        """Wait until no session holds the mailbox (one the client gave up on may still be stalled, holding it);
        whether it was let go within ``timeout`` seconds."""
        with self._mailbox_guard:
            return self._mailbox_guard.wait_for(lambda: self._mailbox_owner is None, timeout=timeout)

    def _lock_mailbox(self, session: _Session) -> list[_StoredMessage] | None:
        """Take the TRANSACTION lock and return a snapshot, or None if still busy."""
        with self._mailbox_guard:
            self._mailbox_guard.wait_for(
                lambda: self._mailbox_owner is None or self._stopping.is_set(),
                timeout=self.lock_timeout,
            )
            if self._mailbox_owner is not None or self._stopping.is_set():
                return None
            self._mailbox_owner = session
            return list(self._mailbox)

    def _unlock_mailbox(self, session: _Session) -> None:
        with self._mailbox_guard:
            if self._mailbox_owner is session:
                self._mailbox_owner = None
                self._mailbox_guard.notify_all()

    def _expunge(self, doomed: list[_StoredMessage]) -> None:
        doomed_ids = {id(message) for message in doomed}
        with self._mailbox_guard:
            self._mailbox = [message for message in self._mailbox if id(message) not in doomed_ids]

    # ---- lifecycle

    def start(self) -> POP3Server:
        if self._listener is not None:
            raise RuntimeError("server already started")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._listener = socket.create_server((self.host, self.port), family=family, backlog=64)
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self._wakeup = socket.socketpair()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"pop3-accept-{self.port}", daemon=True
        )
        self._accept_thread.start()
        return self

    def stop(self) -> None:
        """Close the listener and every session; waits a bounded time for threads."""
        if self._listener is None or self._stopping.is_set():
            return
        self._stopping.set()
        with self._mailbox_guard:
            self._mailbox_guard.notify_all()
        assert self._wakeup is not None and self._accept_thread is not None
        self._wakeup[1].send(b"x")
        self._accept_thread.join(_STOP_JOIN_SECONDS)
        with self._active_guard:
            active = list(self._active.items())
        for session, _ in active:
            session.abort()
        deadline = time.monotonic() + _STOP_JOIN_SECONDS
        for _, thread in active:
            thread.join(max(0.0, deadline - time.monotonic()))
        for sock in (self._listener, *self._wakeup):
            sock.close()

    def __enter__(self) -> POP3Server:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        assert self._listener is not None and self._wakeup is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._wakeup[0], selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in selector.select():
                    if key.fileobj is self._wakeup[0]:
                        return
                    self._accept_one()

    def _accept_one(self) -> None:
        assert self._listener is not None
        try:
            sock, _ = self._listener.accept()
        except OSError:  # BlockingIOError when the client vanished, EMFILE, ...
            return
        sock.settimeout(self.idle_timeout)
        # Replies are written one by one: without this, Nagle holds the answer to a pipelined command (LIST after
        # UIDL) until the client's delayed ACK, ~40 ms per poll.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            session = _Session(self, sock, self.sessions + 1)
        except OSError:  # dup() failed, e.g. out of descriptors: refuse only this client
            sock.close()
            return
        thread = threading.Thread(target=session.run, name=f"pop3-session-{session.number}", daemon=True)
        with self._active_guard:
            self.sessions = session.number
            self._active[session] = thread
        thread.start()

    def _session_finished(self, session: _Session) -> None:
        with self._active_guard:
            self._active.pop(session, None)

    def _log_command(self, command: str) -> None:
        with self._active_guard:
            self.commands.append(command)
