"""A TCP proxy in front of a real IMAP server (Dovecot) that sees every APPEND and can play faults with it.

Dovecot stores what it is sent and answers truthfully; it cannot refuse one chosen message on demand. The proxy can,
without ever lying about what the server holds: a refused APPEND never reaches the server (the proxy swallows the
command and its literal and answers ``NO`` itself, in the place of the server's answer to a NOOP sent instead), and
a cut connection is cut in the middle of the literal, so the server never has the whole message. It can also call a
function at a chosen point of the n-th APPEND (to SIGKILL postbote there): when the command line arrives, halfway
through the literal, or when the server's answer arrives (the server has the message, postbote does not know it
yet). When the function returns True the connection is cut right there, as if postbote had died before sending the
rest: the server never gets what the proxy still holds.

APPENDs are counted across connections since the last `AppendProxy.reset`.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

from tests.servers import LOOPBACK

_LITERAL = re.compile(rb"~?\{(\d+)(\+?)\}\r\n\Z")
_APPEND = re.compile(rb"(\S+) APPEND ", re.IGNORECASE)
MAX_LINE = 1 << 20


@dataclass(frozen=True)
class Refuse:
    """Answer the APPEND with ``response`` (e.g. ``NO [OVERQUOTA] full``); the server never sees it."""

    response: str


@dataclass(frozen=True)
class Cut:
    """Close both connections halfway through the APPEND's literal."""


Fault = Refuse | Cut
Phase = str  # "command" | "literal" | "answer"


class AppendProxy:
    """Forwards loopback connections to ``upstream``; `faults` maps the n-th APPEND (1-based) to a `Fault`,
    ``at(n, phase)`` is called at each point of each APPEND (``command``, ``literal``, ``answer``); True from it
    cuts the connection there."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.faults: dict[int, Fault] = {}
        self.at: Callable[[int, Phase], bool | None] | None = None
        self.appends = 0
        self.fired: list[tuple[int, Fault]] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server((LOOPBACK, 0))
        self.host, self.port = LOOPBACK, int(self._listener.getsockname()[1])
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True, name="append-proxy").start()

    def reset(self, faults: dict[int, Fault] | None = None,
              at: Callable[[int, Phase], bool | None] | None = None) -> None:
        with self._lock:
            self.appends = 0
            self.faults = dict(faults or {})
            self.at = at

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread, which close() alone does not
        self._listener.close()
        for sock in list(self._open):
            _close(sock)

    # ---- plumbing

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                _close(client)
                continue
            server.settimeout(None)
            self.connections += 1
            self._open += [client, server]
            session = _Session(self, client, server)
            threading.Thread(target=session.upstream, daemon=True).start()
            threading.Thread(target=session.downstream, daemon=True).start()


class _Session:
    def __init__(self, proxy: AppendProxy, client: socket.socket, server: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.server = server
        self.to_client = threading.Lock()
        self.watched: dict[bytes, int] = {}  # tag -> APPEND number, for the "answer" phase
        self.refusals: dict[bytes, bytes] = {}  # tag -> the refusal to give in place of the server's answer

    def close(self) -> None:
        _close(self.client)
        _close(self.server)

    def tell_client(self, data: bytes) -> None:
        with self.to_client:
            self.client.sendall(data)

    def call(self, number: int, phase: Phase) -> None:
        """Tell ``at``; raises `_CutHere` (after closing both ends) when it says to cut."""
        at = self.proxy.at
        if at is not None and at(number, phase):
            self.close()
            raise _CutHere

    def upstream(self) -> None:
        """Client to server: lines and literals, APPENDs watched."""
        reader = _Reader(self.client)
        try:
            while (line := reader.line()) is not None:
                match = _APPEND.match(line)
                if match is None:
                    self.forward_command(reader, line)
                    continue
                with self.proxy._lock:
                    self.proxy.appends += 1
                    number = self.proxy.appends
                    fault = self.proxy.faults.get(number)
                    if fault is not None:
                        self.proxy.fired.append((number, fault))
                self.call(number, "command")
                if isinstance(fault, Refuse):
                    self.swallow(reader, line, match.group(1), fault)
                elif isinstance(fault, Cut):
                    self.cut(reader, line)
                    return
                else:
                    self.watched[match.group(1)] = number
                    self.forward_command(reader, line, number)
        except (OSError, _CutHere):
            pass
        finally:
            self.close()

    def forward_command(self, reader: _Reader, line: bytes, number: int | None = None) -> None:
        """The command line and any literals that follow it, to the server."""
        while True:
            self.server.sendall(line)
            literal = _LITERAL.search(line)
            if literal is None:
                return
            size = int(literal.group(1))
            half = size // 2
            self.server.sendall(reader.exactly(half))
            if number is not None:
                self.call(number, "literal")
            self.server.sendall(reader.exactly(size - half))
            rest = reader.line()
            if rest is None:
                return
            line = rest

    def swallow(self, reader: _Reader, line: bytes, tag: bytes, fault: Refuse) -> None:
        while True:
            literal = _LITERAL.search(line)
            if literal is None:
                break
            if not literal.group(2):
                self.tell_client(b"+ go ahead\r\n")
            reader.exactly(int(literal.group(1)))
            rest = reader.line()
            if rest is None:
                return
            line = rest
        # The server answers a NOOP in the APPEND's place, and `downstream` turns that answer into the refusal: the
        # answers of pipelined APPENDs reach the client in the order the commands were sent, as a server gives them.
        self.refusals[tag] = fault.response.encode()
        self.server.sendall(tag + b" NOOP\r\n")

    def cut(self, reader: _Reader, line: bytes) -> None:
        self.server.sendall(line)
        literal = _LITERAL.search(line)
        if literal is not None:
            self.server.sendall(reader.exactly(int(literal.group(1)) // 2))
        self.close()

    def downstream(self) -> None:
        """Server to client, line by line (so that an answer the proxy gives is never spliced into another)."""
        reader = _Reader(self.server)
        try:
            while (line := reader.line()) is not None:
                tag = line.split(b" ", 1)[0]
                number = self.watched.pop(tag, None)
                if number is not None:
                    self.call(number, "answer")
                refusal = self.refusals.pop(tag, None)
                if refusal is not None:
                    line = tag + b" " + refusal + b"\r\n"
                self.tell_client(line)
                literal = _LITERAL.search(line)
                if literal is not None:
                    self.tell_client(reader.exactly(int(literal.group(1))))
        except (OSError, _CutHere):
            pass
        finally:
            self.close()


class _CutHere(Exception):
    """``at`` asked for the connection to be cut at this point."""


class _Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buffer += data
        return True

    def line(self) -> bytes | None:
        """The next line with its CRLF; None at the end of the stream."""
        while (end := self.buffer.find(b"\r\n")) < 0:
            if len(self.buffer) > MAX_LINE or not self._fill():
                return None
        line = bytes(self.buffer[:end + 2])
        del self.buffer[:end + 2]
        return line

    def exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if not self._fill():
                raise OSError("the stream ended inside a literal")
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
