"""A small, threaded, scriptable IMAP server (RFC 3501 subset) on loopback, for fault tests and fuzzing.

It keeps folders in memory (each with its UIDVALIDITY, UIDNEXT and messages with UIDs and flags) and serves enough
of IMAP4rev1 for postbote's IMAP source and destination: CAPABILITY, STARTTLS, LOGIN, AUTHENTICATE PLAIN (with
SASL-IR), LIST, SELECT/EXAMINE, CREATE, UID FETCH (UID, RFC822.SIZE, FLAGS, X-GM-MSGID with ``gmail=True``,
BODY.PEEK[] / BODY[] / BODY.PEEK[HEADER]), UID SEARCH (ALL, UNSEEN, HEADER, LARGER, SMALLER), UID STORE,
EXPUNGE, UID EXPUNGE, UID COPY, UID MOVE, APPEND (with APPENDUID), IDLE/DONE, NOOP and LOGOUT. Synchronizing
literals get their "+"; a non-synchronizing one (``{n+}``) is refused with BAD unless LITERAL+ (or LITERAL- and at
most 4096 octets) is advertised. UID EXPUNGE and UID MOVE are only understood when UIDPLUS and MOVE are
advertised: take them out of ``capabilities`` to play a server without them.

Faults are scripted per command, as for `postbote.testing.pop3server`::

    from postbote.testing.imapserver import Action, Faults, IMAPServer

    faults = Faults().on("UID FETCH", nth=2, action=Action.drop())        # the 2nd UID FETCH: connection dropped
    faults.on("APPEND", action=Action.no("OVERQUOTA", "over quota"))     # the 1st APPEND: NO [OVERQUOTA]
    with IMAPServer(faults=faults) as server:                             # user "demo", password "demo"
        server.add_message("INBOX", b"Subject: hi\\r\\n\\r\\nbody\\r\\n")
        client = IMAPClient.connect(server.host, server.port, implicit_tls=False, tls=TLSPolicy(), timeout=5)
        ...
        assert server.messages("INBOX")[0].flags == {"\\\\Seen"}

Commands are named by their keyword, with ``UID`` for the UID forms ("UID FETCH", "UID STORE", "APPEND",
"LOGIN", "IDLE", ...) or ``GREETING``. The actions (`Action`): ``drop()`` (close, nothing executed),
``drop_midway(after_bytes)`` (execute, send that much of the answer, close), ``reply(data)`` (send ``data`` instead,
``{tag}`` in it replaced by the command's tag), ``no(code, text)``, ``bad(text)``, ``bye(text)`` (untagged BYE, then
close), ``before(data)`` / ``after(data)`` (stray or unsolicited lines -- ``* 3 EXPUNGE``, ``* 9 EXISTS``, garbage --
around the normal answer), ``stall(seconds, then)``, ``trickle(interval)`` (the answer one byte at a time),
``literal_delta(delta)`` (a FETCH body literal announced ``delta`` octets longer (+) or shorter (-) than the data
sent) and ``mutate(function)`` (the answer's bytes passed through ``function`` before they are sent). During IDLE,
a message added to the selected folder (`IMAPServer.add_message`, or another session's APPEND) is announced with
``* n EXISTS``; `IMAPServer.disconnect_all` drops every session (with a BYE first, if given).

``server.commands`` logs every command received (LOGIN's password and AUTHENTICATE's data masked);
``server.errors`` collects server bugs (exceptions inside sessions) and should stay empty.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import re
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

__all__ = [
    "DEFAULT_CAPABILITIES",
    "GREETING",
    "Action",
    "Faults",
    "IMAPServer",
    "StoredMessage",
]

CRLF = b"\r\n"
GREETING = "GREETING"
# Play an IMAP4rev2-only server with ``capabilities=REV2_ONLY``: it names nothing that rev2 includes, and answers
# every UID SEARCH with ESEARCH, as RFC 9051 says.
REV2_ONLY: tuple[str, ...] = ("IMAP4rev2", "AUTH=PLAIN")
_REV2_INCLUDES = frozenset({"UIDPLUS", "MOVE", "ESEARCH", "LITERAL-", "IDLE", "SASL-IR"})
DEFAULT_CAPABILITIES: tuple[str, ...] = ("IMAP4rev1", "LITERAL+", "SASL-IR", "AUTH=PLAIN", "UIDPLUS", "MOVE", "IDLE")
MAX_COMMAND_LINE = 64 * 1024
MAX_LITERAL = 256 * 1024 * 1024
DEFAULT_IDLE_TIMEOUT = 60.0
_STOP_JOIN_SECONDS = 5.0
_RECV_BYTES = 64 * 1024
_IDLE_POLL = 0.02
_SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")


# --------------------------------------------------------------------------- actions


class Action:
    """A scripted misbehaviour; build one with the static constructors."""

    @staticmethod
    def drop() -> Action:
        """Close the connection at once; the command is not executed, nothing is sent."""
        return _Drop()

    @staticmethod
    def drop_midway(after_bytes: int) -> Action:
        """Execute the command, send the first ``after_bytes`` of its answer, close."""
        return _DropMidway(after_bytes)

    @staticmethod
    def reply(data: str | bytes) -> Action:
        """Send ``data`` (CRLF added unless it ends in LF; ``{tag}`` replaced by the tag) instead of executing."""
        return _Reply(data.encode("latin-1") if isinstance(data, str) else data)

    @staticmethod
    def no(code: str | None = None, text: str = "refused") -> Action:
        """``tag NO [code] text`` instead of executing."""
        return _Reply(f"{{tag}} NO {f'[{code}] ' if code else ''}{text}".encode("latin-1"))

    @staticmethod
    def bad(text: str = "bad command") -> Action:
        return _Reply(f"{{tag}} BAD {text}".encode("latin-1"))

    @staticmethod
    def bye(text: str = "server shutting down") -> Action:
        """``* BYE text`` instead of executing, then close."""
        return _Bye(text)

    @staticmethod
    def before(data: bytes, then: Action | None = None) -> Action:
        """Send ``data`` verbatim, then answer normally (or apply ``then``)."""
        return _Before(data, then)

    @staticmethod
    def after(data: bytes) -> Action:
        """Answer normally, then send ``data`` verbatim."""
        return _After(data)

    @staticmethod
    def stall(seconds: float, then: Action | None = None) -> Action:
        """Wait (interrupted by stop()), then answer normally or apply ``then``."""
        return _Stall(seconds, then)

    @staticmethod
    def trickle(interval: float) -> Action:
        """Answer normally, one byte at a time, ``interval`` seconds apart."""
        return _Trickle(interval)

    @staticmethod
    def literal_delta(delta: int) -> Action:
        """In a UID FETCH answer, announce every message literal ``delta`` octets longer or shorter than sent."""
        return _LiteralDelta(delta)

    @staticmethod
    def mutate(function: Callable[[bytes], bytes]) -> Action:
        """Answer with ``function(answer)``: the normal answer's bytes changed at will."""
        return _Mutate(function)


@dataclass(frozen=True)
class _Drop(Action):
    pass


@dataclass(frozen=True)
class _DropMidway(Action):
    after_bytes: int


@dataclass(frozen=True)
class _Reply(Action):
    data: bytes


@dataclass(frozen=True)
class _Bye(Action):
    text: str


@dataclass(frozen=True)
class _Before(Action):
    data: bytes
    then: Action | None = None


@dataclass(frozen=True)
class _After(Action):
    data: bytes


@dataclass(frozen=True)
class _Stall(Action):
    seconds: float
    then: Action | None = None


@dataclass(frozen=True)
class _Trickle(Action):
    interval: float


@dataclass(frozen=True)
class _LiteralDelta(Action):
    delta: int


@dataclass(frozen=True)
class _Mutate(Action):
    function: Callable[[bytes], bytes]


@dataclass
class _Rule:
    command: str
    first: int
    last: int | None
    action: Action
    arguments: re.Pattern[str] | None = None
    seen: int = 0

    def fires_on(self, command: str, arguments: str) -> bool:
        if command != self.command or (self.arguments is not None and not self.arguments.search(arguments)):
            return False
        self.seen += 1
        return self.seen >= self.first and (self.last is None or self.seen <= self.last)


class Faults:
    """Scripted misbehaviour for an `IMAPServer`; ``fired`` lists the commands a rule fired on."""

    def __init__(self) -> None:
        self.fired: list[str] = []
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()

    def on(self, command: str, *, nth: int = 1, times: int | None = 1, action: Action,
           arguments: str | None = None) -> Faults:
        """Apply ``action`` to the ``nth`` ``command`` (counted across sessions, from 1) and the ``times - 1``
        after it (``times=None``: every one from the ``nth`` on). ``arguments``, a regular expression, narrows the
        rule to the commands whose arguments it finds (``on("UID FETCH", arguments="PEEK", ...)``:
        the message fetches, not the listing); only those are counted. The first rule registered wins."""
        if nth < 1 or (times is not None and times < 1):
            raise ValueError("nth and times must be >= 1")
        if not isinstance(action, Action):
            raise TypeError(f"action must be an Action, not {type(action).__name__}")
        last = None if times is None else nth + times - 1
        with self._lock:
            self._rules.append(_Rule(" ".join(command.upper().split()), nth, last, action,
                                     None if arguments is None else re.compile(arguments)))
        return self

    def action_for(self, command: str, arguments: str = "") -> Action | None:
        with self._lock:
            firing = [rule for rule in self._rules if rule.fires_on(command, arguments)]
            if not firing:
                return None
            self.fired.append(f"{command} {arguments}".strip())
            return firing[0].action


# --------------------------------------------------------------------------- mailbox


@dataclass(eq=False)
class StoredMessage:
    uid: int
    data: bytes
    flags: set[str] = field(default_factory=set)
    msgid: int = 0  # X-GM-MSGID


@dataclass(eq=False)
class _Folder:
    name: str
    uidvalidity: int
    uidnext: int = 1
    messages: list[StoredMessage] = field(default_factory=list)


def _matches(message: StoredMessage, criteria: list[object]) -> bool:
    """Whether ``message`` meets every search key of ``criteria``: ALL, UNSEEN, HEADER field string (a
    case-insensitive substring of the field's unfolded value, as RFC 3501 says), LARGER n, SMALLER n."""
    while criteria:
        key = _text(criteria.pop(0)).upper()
        if key == "ALL":
            continue
        if key == "UNSEEN":
            if "\\Seen" in message.flags:
                return False
        elif key in ("LARGER", "SMALLER") and criteria:
            size = int(_text(criteria.pop(0)))
            if (len(message.data) <= size) if key == "LARGER" else (len(message.data) >= size):
                return False
        elif key == "HEADER" and len(criteria) >= 2:
            name, wanted = _text(criteria.pop(0)).lower(), _text(criteria.pop(0)).lower()
            values = [value for field_name, value in _header_fields(message.data) if field_name == name]
            if not any(wanted in value.lower() for value in values):
                return False
        else:
            raise _Refusal("unsupported search", "BAD")
    return True


def _uid_set(uids: list[int]) -> str:
    """A sequence set of ``uids``: ranges of consecutive UIDs as ``a:b``."""
    parts: list[str] = []
    for uid in sorted(uids):
        if parts and parts[-1].split(":")[-1] == str(uid - 1):
            parts[-1] = f"{parts[-1].split(':')[0]}:{uid}"
        else:
            parts.append(str(uid))
    return ",".join(parts)


def _header_fields(data: bytes) -> list[tuple[str, str]]:
    fields: list[tuple[str, str]] = []
    for line in _header_of(data).decode("latin-1").split("\r\n"):
        if line[:1] in (" ", "\t") and fields:
            fields[-1] = (fields[-1][0], fields[-1][1] + line)
        elif ":" in line:
            name, _, value = line.partition(":")
            fields.append((name.strip().lower(), value.strip()))
    return fields


class _Refusal(Exception):
    """A command failed: ``tag NO text`` (or BAD)."""

    def __init__(self, text: str, status: str = "NO") -> None:
        super().__init__(text)
        self.status = status


class _EndSession(Exception):
    pass


class _Reader:
    """Buffered reading of command lines and literals over a socket that can be replaced (STARTTLS)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def line(self) -> bytes:
        """The next line without its line end; b"" and _EndSession at EOF."""
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line, self.buffer = self.buffer[:end], self.buffer[end + 1:]
                return line.rstrip(b"\r")
            if len(self.buffer) > MAX_COMMAND_LINE:
                raise _EndSession
            self._more()

    def exactly(self, count: int) -> bytes:
        while len(self.buffer) < count:
            self._more()
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def _more(self) -> None:
        chunk = self.sock.recv(_RECV_BYTES)
        if not chunk:
            raise _EndSession
        self.buffer += chunk


_LITERAL_AT_END = re.compile(rb"\{([0-9]{1,10})(\+?)\}\Z")
_TOKEN = re.compile(rb'\s*(?:(\()|(\))|"((?:[^"\\]|\\.)*)"|([^\s()"]+))')


@dataclass
class _Literal:
    data: bytes


def _tokens(parts: list[bytes | _Literal]) -> list[object]:
    """Arguments of a command: atoms (str), strings (bytes), lists; literals are bytes."""
    stack: list[list[object]] = [[]]
    for part in parts:
        if isinstance(part, _Literal):
            stack[-1].append(part.data)
            continue
        pos = 0
        while pos < len(part):
            if part[pos:].strip() == b"":
                break
            match = _TOKEN.match(part, pos)
            if match is None:
                raise _Refusal("syntax error", "BAD")
            pos = match.end()
            if match.group(1):
                stack.append([])
            elif match.group(2):
                if len(stack) == 1:
                    raise _Refusal("unbalanced parentheses", "BAD")
                inner = stack.pop()
                stack[-1].append(inner)
            elif match.group(3) is not None:
                stack[-1].append(re.sub(rb"\\(.)", rb"\1", match.group(3)))
            else:
                stack[-1].append(match.group(4).decode("latin-1"))
    if len(stack) != 1:
        raise _Refusal("unbalanced parentheses", "BAD")
    return stack[0]


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, str):
        return value
    raise _Refusal("a string expected", "BAD")


def _quote(name: str) -> bytes:
    return b'"' + name.encode("utf-8").replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _uids_in(spec: str, folder: _Folder) -> set[int]:
    """The UIDs of ``folder``'s messages in the UID set ``spec`` ("1:5,7,9:*")."""
    highest = folder.messages[-1].uid if folder.messages else 0
    existing = {message.uid for message in folder.messages}
    wanted: set[int] = set()
    for piece in spec.split(","):
        ends = piece.split(":")
        if len(ends) > 2 or not all(re.fullmatch(r"[0-9]+|\*", end) for end in ends):
            raise _Refusal("invalid UID set", "BAD")
        numbers = [highest if end == "*" else int(end) for end in ends]
        low, high = min(numbers), max(numbers)
        wanted.update(uid for uid in existing if low <= uid <= high)
    return wanted


def _header_of(data: bytes) -> bytes:
    match = re.search(rb"\r?\n\r?\n", data)
    return data if match is None else data[:match.end()]


# --------------------------------------------------------------------------- session


class _Session:
    def __init__(self, server: IMAPServer, sock: socket.socket, number: int, control: socket.socket) -> None:
        self.number = number
        self.server = server
        self.sock = sock
        self.control = control  # shutdown() on it works whatever wraps self.sock
        self.reader = _Reader(sock)
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.user: str | None = None
        self.selected: _Folder | None = None
        self.read_only = False
        self.view: list[int] = []  # the UIDs of the selected folder as this client was told, in message-number order
        self.tag = "*"
        self.literal_delta = 0

    # ---- lifecycle

    def run(self) -> None:
        try:
            self.serve()
        except (OSError, _EndSession):
            pass
        except Exception as error:  # a session bug must not kill the server
            self.server.errors.append(error)
        finally:
            for sock in (self.sock, self.control):
                with contextlib.suppress(OSError):
                    sock.close()
            self.server._session_finished(self)

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.control.shutdown(socket.SHUT_RDWR)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def serve(self) -> None:
        greeting = b"* OK [CAPABILITY " + self.capabilities().encode() + b"] postbote test IMAP server ready\r\n"
        self.answer(GREETING, lambda: greeting)
        while True:
            self.tag = "*"
            parts = self.read_command()
            if parts is None:
                continue
            first = parts[0]
            assert isinstance(first, bytes)
            words = first.split(None, 3)
            if len(words) < 2:
                self.send(b"* BAD no tag or command\r\n")
                continue
            self.tag = words[0].decode("latin-1")
            verb = words[1].decode("latin-1").upper()
            rest_index = 2
            if verb == "UID" and len(words) >= 3:
                verb = "UID " + words[2].decode("latin-1").upper()
                rest_index = 3
            head = b" ".join(words[:rest_index])
            remainder = first[len(head):]
            arguments = [remainder, *parts[1:]]
            logged = self.logged(verb, arguments)
            self.server._log_command(logged)
            self.answer(verb, functools.partial(self.execute, self.handlers().get(verb), arguments),
                        logged[len(verb):].strip())

    def logged(self, verb: str, arguments: list[bytes | _Literal]) -> str:
        if verb in ("LOGIN", "AUTHENTICATE"):
            return verb
        shown = b"".join(part if isinstance(part, bytes) else b"{literal}" for part in arguments)
        return f"{verb}{shown.decode('latin-1')}".strip()

    def read_command(self) -> list[bytes | _Literal] | None:
        """A command line with its literals (sending "+" for synchronizing ones); None after a refused one."""
        parts: list[bytes | _Literal] = []
        refused = None
        while True:
            line = self.reader.line()
            match = _LITERAL_AT_END.search(line)
            if match is None:
                parts.append(line)
                break
            size, plus = int(match.group(1)), bool(match.group(2))
            parts.append(line[:match.start()])
            if size > MAX_LITERAL:
                raise _EndSession
            if plus and not (self.has("LITERAL+") or (self.has("LITERAL-") and size <= 4096)):
                refused = "non-synchronizing literal not allowed"
            if not plus:
                self.send(b"+ Ready for literal data\r\n")
            parts.append(_Literal(self.reader.exactly(size)))
        if refused is not None:
            tag = parts[0].split(b" ", 1)[0] if isinstance(parts[0], bytes) and parts[0] else b"*"
            self.send(tag + b" BAD " + refused.encode() + CRLF)
            return None
        if not parts or parts == [b""]:
            return None
        return parts

    def answer(self, command: str, produce: Callable[[], bytes], arguments: str = "") -> None:
        """Produce the normal answer (or not) as the fault script says, and send it."""
        faults = self.server.faults
        action = faults.action_for(command, arguments) if faults is not None else None
        self.apply(action, produce)

    def apply(self, action: Action | None, produce: Callable[[], bytes]) -> None:
        tag = self.tag
        if action is None:
            self.send(produce())
        elif isinstance(action, _Drop):
            raise _EndSession
        elif isinstance(action, _DropMidway):
            self.send(produce()[:action.after_bytes])
            raise _EndSession
        elif isinstance(action, _Reply):
            data = action.data.replace(b"{tag}", tag.encode())
            self.send(data if data.endswith(b"\n") else data + CRLF)
        elif isinstance(action, _Bye):
            self.send(f"* BYE {action.text}\r\n".encode())
            raise _EndSession
        elif isinstance(action, _Before):
            self.send(action.data)
            self.apply(action.then, produce)
        elif isinstance(action, _After):
            self.send(produce() + action.data)
        elif isinstance(action, _Stall):
            if self.server._stopping.wait(action.seconds):
                raise _EndSession
            self.apply(action.then, produce)
        elif isinstance(action, _Trickle):
            for byte in produce():
                self.send(bytes([byte]))
                if self.server._stopping.wait(action.interval):
                    raise _EndSession
        elif isinstance(action, _LiteralDelta):
            self.literal_delta = action.delta
            try:
                self.send(produce())
            finally:
                self.literal_delta = 0
        elif isinstance(action, _Mutate):
            self.send(action.function(produce()))
        else:
            raise TypeError(f"unknown action {action!r}")

    def execute(self, handler: Callable[[_Session, list[object]], bytes] | None,
                arguments: list[bytes | _Literal]) -> bytes:
        tag = self.tag
        if handler is None:
            return f"{tag} BAD unknown command\r\n".encode()
        # What changed meanwhile is said first, as a real server does (numbers in the answer then agree with it).
        news = self.news() if handler not in (_Session._idle, _Session._logout, _Session._select,
                                              _Session._examine) else b""
        try:
            body = handler(self, _tokens(arguments))
        except _Refusal as refusal:
            return news + f"{tag} {refusal.status} {refusal}\r\n".encode()
        return news + body

    # ---- helpers

    def capabilities(self) -> str:
        words = list(self.server.capabilities)
        if self.server.starttls_context is not None and not self.tls:
            words.append("STARTTLS")
        return " ".join(words)

    def has(self, capability: str) -> bool:
        """Named in ``capabilities``, or part of IMAP4rev2 when that is named (RFC 9051 appendix E)."""
        named = {word.upper() for word in self.server.capabilities}
        return capability.upper() in named or ("IMAP4REV2" in named and capability.upper() in _REV2_INCLUDES)

    def ok(self, text: str = "completed", code: str | None = None) -> bytes:
        return f"{self.tag} OK {f'[{code}] ' if code else ''}{text}\r\n".encode()

    def authenticated(self) -> None:
        if self.user is None:
            raise _Refusal("not authenticated", "BAD")

    def folder_selected(self) -> _Folder:
        self.authenticated()
        if self.selected is None:
            raise _Refusal("no mailbox selected", "BAD")
        return self.selected

    def news(self) -> bytes:
        """What changed in the selected folder since this client was last told, as a real server says it: ``* n
        EXPUNGE`` for each message gone (others' expunges, from the highest number down), then ``* n EXISTS``
        when messages came. Message numbers in answers are those of `view`, which this keeps in step."""
        if self.selected is None:
            return b""
        with self.server._lock:
            current = [message.uid for message in self.selected.messages]
        present = set(current)
        out = []
        for index in range(len(self.view) - 1, -1, -1):
            if self.view[index] not in present:
                del self.view[index]
                out.append(f"* {index + 1} EXPUNGE\r\n".encode())
        highest = self.view[-1] if self.view else 0
        known = set(self.view)
        new = [uid for uid in current if uid > highest or uid not in known]
        if new:
            self.view.extend(uid for uid in new if uid not in known)
            out.append(f"* {len(self.view)} EXISTS\r\n".encode())
        return b"".join(out)

    def numbers(self) -> dict[int, int]:
        """UID -> message number, as this client was told."""
        return {uid: number for number, uid in enumerate(self.view, 1)}

    # ---- commands

    def _capability(self, arguments: list[object]) -> bytes:
        return f"* CAPABILITY {self.capabilities()}\r\n".encode() + self.ok()

    def _noop(self, arguments: list[object]) -> bytes:
        return self.news() + self.ok("NOOP completed")

    def _logout(self, arguments: list[object]) -> bytes:
        self.send(b"* BYE logging out\r\n" + self.ok("LOGOUT completed"))
        raise _EndSession

    def _starttls(self, arguments: list[object]) -> bytes:
        context = self.server.starttls_context
        if context is None or self.tls:
            raise _Refusal("STARTTLS not available", "BAD")
        self.send(self.ok("Begin TLS negotiation now"))
        self.reader.buffer = b""
        self.sock = context.wrap_socket(self.sock, server_side=True)
        self.reader.sock = self.sock
        self.tls = True
        return b""

    def _login(self, arguments: list[object]) -> bytes:
        if len(arguments) != 2:
            raise _Refusal("LOGIN needs a user and a password", "BAD")
        return self.log_in(_text(arguments[0]), _text(arguments[1]))

    def log_in(self, user: str, password: str) -> bytes:
        if self.server.users.get(user) != password:
            raise _Refusal("[AUTHENTICATIONFAILED] Authentication failed.")
        self.user = user
        return self.ok("Logged in", code=f"CAPABILITY {self.capabilities()}")

    def _authenticate(self, arguments: list[object]) -> bytes:
        if not arguments or _text(arguments[0]).upper() != "PLAIN":
            raise _Refusal("unsupported mechanism")
        if len(arguments) > 1:
            encoded = _text(arguments[1])
        else:
            self.send(b"+ \r\n")
            encoded = self.reader.line().decode("latin-1")
        if encoded == "*":
            raise _Refusal("authentication cancelled", "BAD")
        try:
            data = base64.b64decode("" if encoded == "=" else encoded, validate=True)
        except binascii.Error:
            raise _Refusal("invalid base64", "BAD") from None
        fields = data.split(b"\0")
        if len(fields) != 3:
            raise _Refusal("[AUTHENTICATIONFAILED] Authentication failed.")
        return self.log_in(fields[1].decode("utf-8", "replace"), fields[2].decode("utf-8", "replace"))

    def _list(self, arguments: list[object]) -> bytes:
        self.authenticated()
        if len(arguments) != 2:
            raise _Refusal("LIST needs a reference and a pattern", "BAD")
        pattern = _text(arguments[1])
        delimiter = self.server.delimiter
        regex = re.compile("".join(".*" if c == "*" else f"[^{re.escape(delimiter)}]*" if c == "%" else re.escape(c)
                                   for c in pattern) + r"\Z")
        lines = [b"* LIST (" + (b"\\HasNoChildren") + b') "' + delimiter.encode() + b'" ' + _quote(name) + CRLF
                 for name in self.server.folder_names() if regex.match(name)]
        return b"".join(lines) + self.ok("LIST completed")

    def _select(self, arguments: list[object], *, read_only: bool = False) -> bytes:
        self.authenticated()
        self.selected = None
        if len(arguments) != 1:
            raise _Refusal("SELECT needs a mailbox", "BAD")
        folder = self.server._folder(_text(arguments[0]))
        if folder is None:
            raise _Refusal("[NONEXISTENT] Mailbox doesn't exist")
        self.selected, self.read_only = folder, read_only
        with self.server._lock:
            count, uidvalidity, uidnext = len(folder.messages), folder.uidvalidity, folder.uidnext
            self.view = [message.uid for message in folder.messages]
        flags = " ".join(_SYSTEM_FLAGS)
        return (f"* FLAGS ({flags})\r\n* OK [PERMANENTFLAGS ({flags} \\*)] Flags permitted.\r\n"
                f"* {count} EXISTS\r\n* 0 RECENT\r\n* OK [UIDVALIDITY {uidvalidity}] UIDs valid\r\n"
                f"* OK [UIDNEXT {uidnext}] Predicted next UID\r\n").encode() + self.ok(
                    "Select completed", code="READ-ONLY" if read_only else "READ-WRITE")

    def _examine(self, arguments: list[object]) -> bytes:
        return self._select(arguments, read_only=True)

    def _create(self, arguments: list[object]) -> bytes:
        self.authenticated()
        if len(arguments) != 1:
            raise _Refusal("CREATE needs a mailbox", "BAD")
        name = _text(arguments[0])
        if self.server._folder(name) is not None:
            raise _Refusal("[ALREADYEXISTS] Mailbox already exists")
        self.server.add_folder(name)
        return self.ok("Create completed")

    def _uid_fetch(self, arguments: list[object]) -> bytes:
        folder = self.folder_selected()
        if len(arguments) != 2:
            raise _Refusal("UID FETCH needs a set and items", "BAD")
        items = arguments[1] if isinstance(arguments[1], list) else [arguments[1]]
        names = [_text(item).upper() for item in items]
        with self.server._lock:
            wanted = _uids_in(_text(arguments[0]), folder)
            numbers = self.numbers()
            found = [(numbers[message.uid], message) for message in folder.messages
                     if message.uid in wanted and message.uid in numbers]
        out = []
        for number, message in found:
            parts = [f"UID {message.uid}".encode()]
            for name in names:
                if name == "UID":
                    continue
                if name == "RFC822.SIZE":
                    parts.append(f"RFC822.SIZE {len(message.data)}".encode())
                elif name == "FLAGS":
                    parts.append(f"FLAGS ({' '.join(sorted(message.flags))})".encode())
                elif name == "X-GM-MSGID" and self.server.gmail:
                    parts.append(f"X-GM-MSGID {message.msgid}".encode())
                elif name in ("BODY.PEEK[]", "BODY[]", "RFC822"):
                    label = "RFC822" if name == "RFC822" else "BODY[]"
                    parts.append(self.literal(label, message.data))
                    if name != "BODY.PEEK[]" and not self.read_only:
                        message.flags.add("\\Seen")
                elif name in ("BODY.PEEK[HEADER]", "BODY[HEADER]"):
                    parts.append(self.literal("BODY[HEADER]", _header_of(message.data)))
                else:
                    raise _Refusal(f"unsupported fetch item {name}", "BAD")
            out.append(f"* {number} FETCH (".encode() + b" ".join(parts) + b")\r\n")
        return b"".join(out) + self.ok("Fetch completed")

    def literal(self, label: str, data: bytes) -> bytes:
        return f"{label} {{{max(0, len(data) + self.literal_delta)}}}\r\n".encode() + data

    def _uid_search(self, arguments: list[object]) -> bytes:
        folder = self.folder_selected()
        criteria = list(arguments)
        returning = bool(criteria) and _text(criteria[0]).upper() == "RETURN"
        if returning:  # RETURN (ALL) of ESEARCH (RFC 4731): only ALL is played
            criteria = criteria[2:]
        with self.server._lock:
            uids = [m.uid for m in folder.messages if _matches(m, list(criteria))]
        if returning or not self.has("IMAP4rev1"):
            found = f" ALL {_uid_set(uids)}" if uids else ""
            return f'* ESEARCH (TAG "{self.tag}") UID{found}\r\n'.encode() + self.ok("Search completed")
        return ("* SEARCH" + "".join(f" {uid}" for uid in uids) + "\r\n").encode() + self.ok("Search completed")

    def _uid_store(self, arguments: list[object]) -> bytes:
        folder = self.folder_selected()
        if len(arguments) != 3:
            raise _Refusal("UID STORE needs a set, an operation and flags", "BAD")
        operation = _text(arguments[1]).upper()
        flags = arguments[2] if isinstance(arguments[2], list) else [arguments[2]]
        names = {_text(flag) for flag in flags}
        if not re.fullmatch(r"[+-]?FLAGS(\.SILENT)?", operation):
            raise _Refusal("bad store operation", "BAD")
        if self.read_only:
            raise _Refusal("mailbox is read-only")
        out = []
        with self.server._lock:
            wanted = _uids_in(_text(arguments[0]), folder)
            numbers = self.numbers()
            for message in folder.messages:
                if message.uid not in wanted or message.uid not in numbers:
                    continue
                number = numbers[message.uid]
                if operation.startswith("+"):
                    message.flags |= names
                elif operation.startswith("-"):
                    message.flags -= names
                else:
                    message.flags = set(names)
                if not operation.endswith(".SILENT"):
                    out.append(f"* {number} FETCH (UID {message.uid} FLAGS ({' '.join(sorted(message.flags))}))\r\n"
                               .encode())
        return b"".join(out) + self.ok("Store completed")

    def expunged(self, folder: _Folder, doomed: Callable[[StoredMessage], bool]) -> bytes:
        """Remove the doomed messages; ``* n EXPUNGE`` for each (numbers of this client's view)."""
        with self.server._lock:
            gone = {message.uid for message in folder.messages if doomed(message)}
            folder.messages = [message for message in folder.messages if message.uid not in gone]
        return self.news()

    def _expunge(self, arguments: list[object]) -> bytes:
        folder = self.folder_selected()
        return self.expunged(folder, lambda m: "\\Deleted" in m.flags) + self.ok("Expunge completed")

    def _uid_expunge(self, arguments: list[object]) -> bytes:
        if not self.has("UIDPLUS"):
            raise _Refusal("unknown command", "BAD")
        folder = self.folder_selected()
        with self.server._lock:
            wanted = _uids_in(_text(arguments[0]), folder) if arguments else set()
        return self.expunged(folder, lambda m: m.uid in wanted and "\\Deleted" in m.flags) + self.ok(
            "Expunge completed")

    def copied(self, arguments: list[object]) -> tuple[_Folder, list[StoredMessage], str]:
        folder = self.folder_selected()
        if len(arguments) != 2:
            raise _Refusal("needs a set and a mailbox", "BAD")
        target = self.server._folder(_text(arguments[1]))
        if target is None:
            raise _Refusal("[TRYCREATE] Mailbox doesn't exist")
        with self.server._lock:
            wanted = _uids_in(_text(arguments[0]), folder)
            sources = [message for message in folder.messages if message.uid in wanted]
            new_uids = []
            for message in sources:
                copy = StoredMessage(target.uidnext, message.data, set(message.flags), message.msgid)
                target.uidnext += 1
                target.messages.append(copy)
                new_uids.append(copy.uid)
        code = ""
        if sources and self.has("UIDPLUS"):
            code = (f"COPYUID {target.uidvalidity} {','.join(str(m.uid) for m in sources)} "
                    f"{','.join(str(uid) for uid in new_uids)}")
        return folder, sources, code

    def _uid_copy(self, arguments: list[object]) -> bytes:
        _, _, code = self.copied(arguments)
        return self.ok("Copy completed", code=code or None)

    def _uid_move(self, arguments: list[object]) -> bytes:
        if not self.has("MOVE"):
            raise _Refusal("unknown command", "BAD")
        folder, sources, code = self.copied(arguments)
        moved = {id(message) for message in sources}
        untagged = (f"* OK [{code}] Moved\r\n".encode() if code else b"")
        return untagged + self.expunged(folder, lambda m: id(m) in moved) + self.ok("Move completed")

    def _append(self, arguments: list[object]) -> bytes:
        self.authenticated()
        if len(arguments) < 2 or not isinstance(arguments[-1], bytes):
            raise _Refusal("APPEND needs a mailbox and a literal", "BAD")
        folder = self.server._folder(_text(arguments[0]))
        flags: set[str] = set()
        for argument in arguments[1:-1]:
            if isinstance(argument, list):
                flags = {_text(flag) for flag in argument}
            elif not isinstance(argument, bytes):
                raise _Refusal("bad APPEND arguments", "BAD")
        if folder is None:
            raise _Refusal("[TRYCREATE] Mailbox doesn't exist")
        uid = self.server.add_message(folder.name, arguments[-1], flags=flags)
        code = f"APPENDUID {folder.uidvalidity} {uid}" if self.has("UIDPLUS") else None
        return self.ok("Append completed", code=code)

    def _idle(self, arguments: list[object]) -> bytes:
        self.authenticated()
        tag = self.tag
        self.send(b"+ idling\r\n")
        previous = self.sock.gettimeout()
        self.sock.settimeout(_IDLE_POLL)
        try:
            while True:
                if self.server._stopping.is_set():
                    raise _EndSession
                news = self.news()
                if news:
                    self.send(news)
                try:
                    line = self.reader.line()
                except (TimeoutError, ssl.SSLWantReadError):
                    continue
                if line.strip().upper() == b"DONE":
                    return f"{tag} OK Idle completed\r\n".encode()
                return f"{tag} BAD expected DONE\r\n".encode()
        finally:
            self.sock.settimeout(previous)

    _handlers: ClassVar[dict[str, Callable[[_Session, list[object]], bytes]]] = {
        "CAPABILITY": _capability,
        "NOOP": _noop,
        "LOGOUT": _logout,
        "STARTTLS": _starttls,
        "LOGIN": _login,
        "AUTHENTICATE": _authenticate,
        "LIST": _list,
        "SELECT": _select,
        "EXAMINE": _examine,
        "CREATE": _create,
        "UID FETCH": _uid_fetch,
        "UID SEARCH": _uid_search,
        "UID STORE": _uid_store,
        "EXPUNGE": _expunge,
        "UID EXPUNGE": _uid_expunge,
        "UID COPY": _uid_copy,
        "UID MOVE": _uid_move,
        "APPEND": _append,
        "IDLE": _idle,
    }

    def handlers(self) -> dict[str, Callable[[_Session, list[object]], bytes]]:
        return self._handlers


# --------------------------------------------------------------------------- server


class IMAPServer:
    """Threaded IMAP server with in-memory folders; see the module docstring.

    ``folders``: names to create at start (INBOX always exists). ``capabilities`` replaces the advertised list
    (STARTTLS is added while a ``starttls_context`` is given and the session is not yet encrypted). ``faults`` may
    be replaced while the server runs.
    """

    def __init__(
        self,
        folders: Iterable[str] = (),
        *,
        users: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        starttls_context: ssl.SSLContext | None = None,
        capabilities: Sequence[str] = DEFAULT_CAPABILITIES,
        faults: Faults | None = None,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        gmail: bool = False,
        delimiter: str = "/",
        uidvalidity: int = 1000,
    ) -> None:
        self.host = host
        self.port = port
        self.users = dict(users) if users is not None else {"demo": "demo"}
        self.ssl_context = ssl_context
        self.starttls_context = starttls_context
        self.capabilities = tuple(capabilities)
        self.faults = faults
        self.idle_timeout = idle_timeout
        self.gmail = gmail
        self.delimiter = delimiter
        self.commands: list[str] = []
        self.sessions = 0
        self.errors: list[BaseException] = []
        self._next_uidvalidity = uidvalidity
        self._next_msgid = 1_000_000
        self._folders: dict[str, _Folder] = {}
        self._lock = threading.RLock()
        self._active: dict[_Session, threading.Thread] = {}
        self._active_lock = threading.Lock()
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._wakeup: tuple[socket.socket, socket.socket] | None = None
        self._accept_thread: threading.Thread | None = None
        for name in ("INBOX", *folders):
            self.add_folder(name)

    # ---- folders and messages

    def add_folder(self, name: str, *, uidvalidity: int | None = None) -> None:
        """Create a folder (nothing happens if it exists)."""
        with self._lock:
            if self._folder(name) is None:
                if uidvalidity is None:
                    uidvalidity = self._next_uidvalidity
                    self._next_uidvalidity += 1
                self._folders[name] = _Folder(name, uidvalidity)

    def folder_names(self) -> list[str]:
        with self._lock:
            return list(self._folders)

    def add_message(self, folder: str, data: bytes, *, flags: Iterable[str] = ()) -> int:
        """Put a message into ``folder`` (created if missing); its UID."""
        with self._lock:
            self.add_folder(folder)
            stored = self._folder(folder)
            assert stored is not None
            message = StoredMessage(stored.uidnext, bytes(data), set(flags), self._next_msgid)
            self._next_msgid += 1
            stored.uidnext += 1
            stored.messages.append(message)
            return message.uid

    def messages(self, folder: str = "INBOX") -> list[StoredMessage]:
        """The messages of ``folder`` now (copies)."""
        with self._lock:
            stored = self._folder(folder)
            if stored is None:
                return []
            return [StoredMessage(m.uid, m.data, set(m.flags), m.msgid) for m in stored.messages]

    def uidvalidity(self, folder: str = "INBOX") -> int:
        with self._lock:
            stored = self._folder(folder)
            assert stored is not None
            return stored.uidvalidity

    def renumber(self, folder: str = "INBOX", *, uidvalidity: int | None = None) -> int:
        """A new UIDVALIDITY for ``folder``, its messages numbered from 1 again (as after a server rebuild)."""
        with self._lock:
            stored = self._folder(folder)
            assert stored is not None
            stored.uidvalidity = uidvalidity if uidvalidity is not None else stored.uidvalidity + 1000
            for uid, message in enumerate(stored.messages, 1):
                message.uid = uid
            stored.uidnext = len(stored.messages) + 1
            return stored.uidvalidity

    def _folder(self, name: str) -> _Folder | None:
        with self._lock:
            if name.upper() == "INBOX":
                name = "INBOX"
            return self._folders.get(name)

    # ---- lifecycle

    def start(self) -> IMAPServer:
        if self._listener is not None:
            raise RuntimeError("server already started")
        self._listener = socket.create_server((self.host, self.port), backlog=64)
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self._wakeup = socket.socketpair()
        self._accept_thread = threading.Thread(target=self._accept_loop, name=f"imap-accept-{self.port}",
                                               daemon=True)
        self._accept_thread.start()
        return self

    def stop(self) -> None:
        """Close the listener and every session; waits a bounded time for the threads."""
        if self._listener is None or self._stopping.is_set():
            return
        self._stopping.set()
        assert self._wakeup is not None and self._accept_thread is not None
        self._wakeup[1].send(b"x")
        self._accept_thread.join(_STOP_JOIN_SECONDS)
        self.disconnect_all()
        for sock in (self._listener, *self._wakeup):
            sock.close()

    def disconnect_all(self, bye: str | None = None) -> None:
        """Drop every open session (a ``* BYE`` first when ``bye`` is given) and wait a bounded time for them."""
        with self._active_lock:
            active = list(self._active.items())
        for session, _ in active:
            if bye is not None:
                with contextlib.suppress(OSError):
                    session.send(f"* BYE {bye}\r\n".encode())
            session.abort()
        deadline = time.monotonic() + _STOP_JOIN_SECONDS
        for _, thread in active:
            thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> IMAPServer:
        return self if self._listener is not None else self.start()

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
        except OSError:
            return
        sock.setblocking(True)
        sock.settimeout(self.idle_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._active_lock:
            self.sessions += 1
            number = self.sessions
        thread = threading.Thread(target=self._serve, args=(sock, number), name=f"imap-session-{number}",
                                  daemon=True)
        thread.start()

    def _serve(self, sock: socket.socket, number: int) -> None:
        """A session's thread: the TLS handshake (implicit TLS) happens here, not in the accept loop."""
        try:
            control = sock.dup()
        except OSError:
            sock.close()
            return
        try:
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(sock, server_side=True)
        except (OSError, ssl.SSLError):
            sock.close()
            control.close()
            return
        session = _Session(self, sock, number, control)
        with self._active_lock:
            self._active[session] = threading.current_thread()
        if self._stopping.is_set():
            session.abort()
        session.run()

    def _session_finished(self, session: _Session) -> None:
        with self._active_lock:
            self._active.pop(session, None)

    def _log_command(self, command: str) -> None:
        with self._active_lock:
            self.commands.append(command)
