"""A scriptable SMTP/LMTP server for the faults a real MTA will not produce on demand.

aiosmtpd (:mod:`tests.servers.smtp_sink`) can refuse a recipient or answer the end of DATA as told, and Dovecot's
LMTP refuses unknown users; neither can greet with 421, answer MAIL or DATA with 452, close the connection after
the whole message arrived but before answering (the ambiguous case of RFC 1047), stall, or give LMTP recipients
different answers after the data. This server can, one rule at a time::

    server = FaultySMTP()
    server.on("MAIL", "451 4.3.0 try later")             # the first MAIL of the run
    server.on("END", DROP, nth=2)                         # no reply to the second message's data
    server.on("END", ["250 2.0.0 ok", "452 4.2.2 full"])  # LMTP: one answer per recipient
    server.on("RCPT", "550 5.1.1 no such user", argument="bob@example.org", times=None)

Stages: ``CONNECT`` (the greeting), ``EHLO`` (also LHLO/HELO), ``MAIL``, ``RCPT``, ``DATA`` (the reply to the DATA
command itself), ``BDAT`` (the reply to a chunk that is not the last, with ``chunking=True``), ``END`` (the reply
after the message data: after ``.`` or after ``BDAT … LAST``), ``RSET``, ``QUIT``. An action is a reply line, a list
of reply lines (``END`` in LMTP mode: one per accepted recipient), `DROP` (close without answering) or a `Stall`.
Rules count matching commands across connections, like :class:`postbote.testing.pop3server.Faults`.

What arrived is recorded: `received` holds every message whose data was read completely, with the answer given
(None when the connection was dropped instead), so a test can count how many copies the MTA may have kept.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tests.servers import LOOPBACK

STAGES = ("CONNECT", "EHLO", "MAIL", "RCPT", "DATA", "BDAT", "END", "RSET", "QUIT")
MAX_LINE = 1 << 21
IDLE_TIMEOUT = 30.0


class _Drop:
    def __repr__(self) -> str:
        return "DROP"


DROP = _Drop()
"""Close the connection instead of answering (after reading the message data, for ``END``)."""


@dataclass(frozen=True)
class Stall:
    """Say nothing for ``seconds`` (the client's timeout should fire first), then close."""

    seconds: float


Action = str | Sequence[str] | _Drop | Stall


@dataclass
class _Rule:
    stage: str
    action: Action
    first: int
    last: int | None
    argument: str | None
    seen: int = 0

    def fires(self, stage: str, argument: str) -> bool:
        if stage != self.stage or (self.argument is not None and argument.lower() != self.argument.lower()):
            return False
        self.seen += 1
        return self.seen >= self.first and (self.last is None or self.seen <= self.last)


@dataclass(frozen=True)
class Received:
    """A message whose data the server read completely, and what it answered (None: it hung up instead)."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    replies: tuple[str, ...] | None
    via: str = "DATA"  # or "BDAT"

    @property
    def accepted_by(self) -> tuple[str, ...]:
        """The recipients whose copy the server took (SMTP: all or none; LMTP: each its own answer)."""
        if self.replies is None:
            return ()
        if len(self.replies) == 1:
            return self.rcpt_tos if self.replies[0].startswith("2") else ()
        return tuple(rcpt for rcpt, reply in zip(self.rcpt_tos, self.replies, strict=True) if reply.startswith("2"))


@dataclass
class _Transaction:
    mail_from: str | None = None  # None: no MAIL accepted yet
    rcpt_tos: list[str] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)
    failed: bool = False  # a BDAT chunk was refused: the rest of the message is read and refused too


class FaultySMTP:
    """A threaded SMTP (or, with ``lmtp=True``, LMTP) server on 127.0.0.1 that answers as scripted.

    A stopped server's port refuses connections: a stand-in for an MTA that is not running."""

    host = LOOPBACK

    def __init__(self, *, lmtp: bool = False, pipelining: bool = True, chunking: bool = False) -> None:
        self.lmtp = lmtp
        self.pipelining = pipelining
        self.chunking = chunking
        self.on_received: Callable[[Received], None] | None = None  # called before the answer to each message
        self.fired: list[str] = []
        self.commands: list[str] = []
        self.connections = 0
        self._received: list[Received] = []
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = _ThreadingServer((self.host, 0), _handler_for(self))
        self.port: int = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    # -- scripting -----------------------------------------------------------

    def on(self, stage: str, action: Action, *, nth: int = 1, times: int | None = 1,
           argument: str | None = None) -> FaultySMTP:
        """Apply ``action`` to the ``nth`` command of ``stage`` (``argument``: only for that address) and to the
        ``times - 1`` after it; ``times=None``: every one from the ``nth`` on. The first matching rule wins."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r} (known: {', '.join(STAGES)})")
        last = None if times is None else nth + times - 1
        with self._lock:
            self._rules.append(_Rule(stage, action, nth, last, argument))
        return self

    def clear_rules(self) -> None:
        with self._lock:
            self._rules.clear()

    # -- records ---------------------------------------------------------------

    @property
    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    def copies_for(self, recipient: str) -> list[bytes]:
        """The data of every message the server accepted for ``recipient``."""
        return [r.data for r in self.received if recipient in r.accepted_by]

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> FaultySMTP:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.01},
                                        name=f"faulty-smtp-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._server.shutdown()
        self._server.server_close()
        self._server.close_sessions()
        if self._thread is not None:
            self._thread.join(5.0)

    def __enter__(self) -> FaultySMTP:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- called from session threads ------------------------------------------------

    def _action(self, stage: str, argument: str = "") -> Action | None:
        with self._lock:
            firing = [rule for rule in self._rules if rule.fires(stage, argument)]
            if not firing:
                return None
            self.fired.append(f"{stage} {argument}".strip())
            return firing[0].action

    def _record(self, received: Received) -> None:
        with self._lock:
            self._received.append(received)

    def _log(self, line: str) -> None:
        with self._lock:
            self.commands.append(line)


class _ThreadingServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type[socketserver.BaseRequestHandler]) -> None:
        self.sessions: set[socket.socket] = set()
        self.sessions_lock = threading.Lock()
        super().__init__(address, handler)
        # A client gone between the select and the accept (a killed poll) must not block the serving thread in
        # accept, and stop() with it: the accept fails at once instead (postbote.testing.https says more).
        self.socket.setblocking(False)

    def close_sessions(self) -> None:
        with self.sessions_lock:
            for sock in list(self.sessions):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class _HangUp(Exception):
    """End the session now, without a word."""


def _handler_for(owner: FaultySMTP) -> type[socketserver.StreamRequestHandler]:
    class Handler(_Session):
        server_owner = owner

    return Handler


class _Session(socketserver.StreamRequestHandler):
    server_owner: FaultySMTP
    timeout = IDLE_TIMEOUT

    def handle(self) -> None:
        owner = self.server_owner
        server: _ThreadingServer = self.server  # type: ignore[assignment]
        with server.sessions_lock:
            server.sessions.add(self.request)
        with owner._lock:
            owner.connections += 1
        # Each answer is its own write: without this, Nagle holds the second answer to a pipelined group until the
        # client's delayed ACK (40 ms) -- real MTAs answer a group in one write (RFC 2920 3.1).
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self._converse(owner)
        except (_HangUp, OSError):
            pass
        finally:
            with server.sessions_lock:
                server.sessions.discard(self.request)

    def _converse(self, owner: FaultySMTP) -> None:
        self._answer(owner, "CONNECT", "", "220 faulty.test ESMTP ready")
        transaction = _Transaction()
        while not owner._stopping.is_set():
            line = self.rfile.readline(MAX_LINE)
            if not line:
                return
            command = line.rstrip(b"\r\n").decode("utf-8", "replace")
            owner._log(command)
            verb, _, rest = command.partition(" ")
            verb = verb.upper()
            if verb in ("EHLO", "LHLO", "HELO"):
                extensions = ["8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"]
                if owner.pipelining:
                    extensions.insert(0, "PIPELINING")
                if owner.chunking:
                    extensions.append("CHUNKING")
                lines = ["faulty.test", *extensions]
                default = "\r\n".join(f"250-{text}" for text in lines[:-1]) + f"\r\n250 {lines[-1]}"
                self._answer(owner, "EHLO", rest, default)
                transaction = _Transaction()
            elif verb == "MAIL":
                address = _address(rest)
                if self._answer(owner, "MAIL", address, "250 2.1.0 sender ok"):
                    transaction = _Transaction(mail_from=address)
            elif verb == "RCPT" and transaction.mail_from is None:
                self._send("503 5.5.1 MAIL first")
            elif verb == "RCPT":
                address = _address(rest)
                if self._answer(owner, "RCPT", address, "250 2.1.5 recipient ok"):
                    transaction.rcpt_tos.append(address)
            elif verb == "DATA":
                if not transaction.rcpt_tos:
                    self._send("503 5.5.1 no valid recipients")
                    continue
                if self._answer(owner, "DATA", "", "354 end data with <CRLF>.<CRLF>"):
                    self._end_of_data(owner, transaction, self._read_data())
                transaction = _Transaction()
            elif verb == "BDAT" and owner.chunking:
                if self._chunk(owner, transaction, rest):
                    transaction = _Transaction()
            elif verb == "RSET":
                self._answer(owner, "RSET", "", "250 2.0.0 reset")
                transaction = _Transaction()
            elif verb == "QUIT":
                self._answer(owner, "QUIT", "", "221 2.0.0 bye")
                return
            elif verb == "NOOP":
                self._send("250 2.0.0 ok")
            else:
                self._send("502 5.5.2 command not recognised")

    def _answer(self, owner: FaultySMTP, stage: str, argument: str, default: str) -> bool:
        """Answer as scripted (or ``default``); True when the answer was a success (2xx/3xx)."""
        action = owner._action(stage, argument)
        if action is None:
            action = default
        reply = self._perform(action)
        return reply[:1] in ("2", "3")

    def _perform(self, action: Action) -> str:
        if isinstance(action, _Drop):
            raise _HangUp
        if isinstance(action, Stall):
            self.server_owner._stopping.wait(action.seconds)
            raise _HangUp
        if not isinstance(action, str):
            raise TypeError(f"a list of replies is only meaningful at END in LMTP mode: {action!r}")
        self._send(action)
        if action.startswith("421"):
            raise _HangUp  # 421: the server closes the transmission channel (RFC 5321 3.8)
        return action

    def _chunk(self, owner: FaultySMTP, transaction: _Transaction, argument: str) -> bool:
        """One ``BDAT size [LAST]`` (RFC 3030): its data is always read; True when it ended the transaction."""
        size_text, _, last = argument.partition(" ")
        data = self.rfile.read(int(size_text))
        if len(data) != int(size_text):
            raise _HangUp
        is_last = last.strip().upper() == "LAST"
        if not transaction.rcpt_tos or transaction.failed:
            self._send("554 5.5.1 no valid recipients" if not transaction.rcpt_tos else "554 5.6.0 message refused")
            transaction.failed = True
            return is_last
        transaction.chunks.append(data)
        if is_last:
            self._end_of_data(owner, transaction, b"".join(transaction.chunks), via="BDAT")
            return True
        if not self._answer(owner, "BDAT", "", f"250 2.0.0 {len(data)} octets received"):
            transaction.failed = True
        return False

    def _end_of_data(self, owner: FaultySMTP, transaction: _Transaction, data: bytes, via: str = "DATA") -> None:
        count = len(transaction.rcpt_tos) if owner.lmtp else 1
        action = owner._action("END") or ["250 2.0.0 queued"] * count
        if isinstance(action, str):
            action = [action] * count
        received = lambda replies: Received(transaction.mail_from or "", tuple(transaction.rcpt_tos), data,  # noqa: E731
                                            replies, via)
        if isinstance(action, (_Drop, Stall)):
            owner._record(received(None))
            self._perform(action)
            return
        replies = tuple(action)
        if len(replies) != count:
            raise ValueError(f"END needs {count} replies, got {len(replies)}")
        if owner.on_received is not None:
            owner.on_received(received(replies))
        owner._record(received(replies))
        for reply in replies:
            self._send(reply)
        if any(reply.startswith("421") for reply in replies):
            raise _HangUp

    def _read_data(self) -> bytes:
        """The message as the client meant it: the terminator removed and each line's transparency dot undone."""
        lines: list[bytes] = []
        while True:
            line = self.rfile.readline(MAX_LINE)
            if not line:
                raise _HangUp
            if line == b".\r\n":
                return b"".join(lines)
            lines.append(line[1:] if line.startswith(b".") else line)

    def _send(self, reply: str) -> None:
        self.wfile.write(reply.encode("utf-8") + b"\r\n")
        self.wfile.flush()


def _address(argument: str) -> str:
    """``FROM:<a@b> BODY=8BITMIME`` -> ``a@b``."""
    _, _, rest = argument.partition(":")
    rest = rest.strip()
    if rest.startswith("<"):
        return rest[1:rest.find(">")] if ">" in rest else rest[1:]
    return rest.split(" ", 1)[0]
