"""SMTP sinks for the benchmark: accept every message, optionally keep it for verification.

Two flavours, one selectors-based single-threaded server (run it as its own process so that it never
competes with the benchmark driver for the GIL):

``prompt``
    Sets ``TCP_NODELAY`` on every connection and re-arms ``TCP_QUICKACK`` after every read, so neither
    Nagle's algorithm on our side nor a delayed ACK towards the client ever holds anything back. The sink
    answers as fast as the wire allows and is not what is measured.

``delayed-ack``
    Plain kernel defaults, as a real MTA runs: Nagle on, delayed ACKs on (Linux: up to 40 ms when the
    receiver has nothing to send). Replies are written the way Postfix's smtpd writes them -- every reply
    to the commands that are waiting is collected and sent with one ``send()`` once no more input is
    pending. A client that writes the end of its message (``.<CRLF>``) or a command as a small separate
    segment after unacknowledged data then waits for the sink's delayed ACK, which is exactly what such a
    client meets in production.

Both speak just enough ESMTP (EHLO with PIPELINING, 8BITMIME, SIZE, CHUNKING; HELO, MAIL, RCPT, DATA, BDAT,
RSET, NOOP, QUIT). CHUNKING (RFC 3030) is offered as Postfix (since 3.0) and Dovecot's LMTP offer it;
``--no-chunking`` leaves it out. With ``--spool DIR`` each message is written, dot-unstuffed and with its CRLF
line endings, to ``DIR/NNNNNNNN.eml`` (no fsync) before the ``250`` goes out.

Run as ``python -m bench.sinks --mode prompt --port 0 --spool DIR``; it prints ``READY <port>`` when it
listens. ``python -m bench.sinks --selftest`` measures the sink alone with a trivial client.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import selectors
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.children import stop_child

MODES = ("prompt", "delayed-ack")
MAX_COMMAND_LINE = 4096
READ_SIZE = 1 << 18
EHLO_REPLY = b"250-sink.bench.example\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 0\r\n250 HELP\r\n"
EHLO_REPLY_CHUNKING = EHLO_REPLY.replace(b"250 HELP", b"250-CHUNKING\r\n250 HELP")
END_OF_DATA = b"\r\n.\r\n"


@dataclass
class _Session:
    sock: socket.socket
    inbox: bytearray = field(default_factory=bytearray)
    outbox: bytearray = field(default_factory=bytearray)
    in_data: bool = False
    data_scanned: int = 0
    chunk_left: int = 0  # BDAT data still to come for the current chunk
    chunk_last: bool = False
    chunks: bytearray = field(default_factory=bytearray)
    closing: bool = False
    closed: bool = False


class SMTPSink:
    """The server loop; ``serve_forever`` until SIGTERM/SIGINT."""

    def __init__(self, host: str, port: int, mode: str, spool: Path | None, chunking: bool = True) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.prompt = mode == "prompt"
        self.chunking = chunking
        self.spool = spool
        self.counter = itertools.count(1)
        self.accepted = 0
        self.selector = selectors.DefaultSelector()
        self.listener = socket.create_server((host, port), backlog=256, reuse_port=False)
        self.listener.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ, None)
        self.port = self.listener.getsockname()[1]
        self.running = True

    # -- event loop -----------------------------------------------------------

    def serve_forever(self) -> None:
        while self.running:
            for key, events in self.selector.select(timeout=0.5):
                if key.data is None:
                    self._accept()
                    continue
                session: _Session = key.data
                if events & selectors.EVENT_READ:
                    self._read(session)
                if events & selectors.EVENT_WRITE and not session.closed:
                    self._flush(session)

    def stop(self, *_args: object) -> None:
        self.running = False

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        if self.prompt:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._quickack(sock)
        session = _Session(sock)
        self.selector.register(sock, selectors.EVENT_READ, session)
        session.outbox += b"220 sink.bench.example ESMTP bench sink\r\n"
        self._flush(session)

    def _quickack(self, sock: socket.socket) -> None:
        if hasattr(socket, "TCP_QUICKACK"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)

    def _read(self, session: _Session) -> None:
        try:
            data = session.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if self.prompt and data:
            self._quickack(session.sock)
        if not data:
            self._close(session)
            return
        session.inbox += data
        self._process(session)
        if not session.closed:
            self._flush(session)

    def _flush(self, session: _Session) -> None:
        if session.outbox:
            try:
                sent = session.sock.send(session.outbox)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._close(session)
                return
            del session.outbox[:sent]
        wanted = selectors.EVENT_READ | (selectors.EVENT_WRITE if session.outbox else 0)
        self.selector.modify(session.sock, wanted, session)
        if session.closing and not session.outbox:
            self._close(session)

    def _close(self, session: _Session) -> None:
        if session.closed:
            return
        session.closed = True
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(session.sock)
        session.sock.close()

    # -- protocol -------------------------------------------------------------

    def _process(self, session: _Session) -> None:
        """Handle every complete command (and message) in the input; replies are collected in ``outbox``."""
        while session.inbox and not session.closing:
            if session.in_data:
                if not self._take_message(session):
                    return
                continue
            if session.chunk_left or session.chunk_last:
                if not self._take_chunk(session):
                    return
                continue
            end = session.inbox.find(b"\n")
            if end < 0:
                if len(session.inbox) > MAX_COMMAND_LINE:
                    session.outbox += b"500 5.5.2 line too long\r\n"
                    session.closing = True
                return
            line = bytes(session.inbox[:end]).rstrip(b"\r")
            del session.inbox[: end + 1]
            session.outbox += self._command(session, line)

    def _command(self, session: _Session, line: bytes) -> bytes:
        verb = line[:4].upper()
        if verb == b"EHLO":
            return EHLO_REPLY_CHUNKING if self.chunking else EHLO_REPLY
        if verb == b"BDAT" and self.chunking:
            size, _, last = line[5:].partition(b" ")
            session.chunk_left, session.chunk_last = int(size), last.strip().upper() == b"LAST"
            if session.chunk_left == 0:
                return self._chunk_done(session)
            return b""
        if verb in (b"HELO", b"MAIL", b"RCPT", b"RSET", b"NOOP"):
            return b"250 2.0.0 Ok\r\n"
        if verb == b"DATA":
            session.in_data = True
            session.data_scanned = 0
            return b"354 End data with <CR><LF>.<CR><LF>\r\n"
        if verb == b"QUIT":
            session.closing = True
            return b"221 2.0.0 Bye\r\n"
        if verb == b"VRFY":
            return b"252 2.0.0 Cannot VRFY user\r\n"
        return b"502 5.5.2 Command not recognized\r\n"

    def _take_message(self, session: _Session) -> bool:
        """Consume one message if its end has arrived; False when more input is needed."""
        inbox = session.inbox
        if inbox.startswith(b".\r\n"):
            payload, consumed = b"", 3
        else:
            end = inbox.find(END_OF_DATA, max(0, session.data_scanned - len(END_OF_DATA)))
            if end < 0:
                session.data_scanned = len(inbox)
                return False
            payload, consumed = bytes(inbox[: end + 2]), end + len(END_OF_DATA)
        del inbox[:consumed]
        session.in_data = False
        number = next(self.counter)
        self._store(number, payload)
        self.accepted += 1
        session.outbox += b"250 2.0.0 Ok: queued as B%08d\r\n" % number
        return True

    def _take_chunk(self, session: _Session) -> bool:
        """Consume the data of the current BDAT chunk as far as it has arrived; False when more input is needed."""
        taken = min(session.chunk_left, len(session.inbox))
        session.chunks += session.inbox[:taken]
        del session.inbox[:taken]
        session.chunk_left -= taken
        if session.chunk_left:
            return False
        session.outbox += self._chunk_done(session)
        return True

    def _chunk_done(self, session: _Session) -> bytes:
        if not session.chunk_last:
            return b"250 2.0.0 chunk received\r\n"
        session.chunk_last = False
        payload = bytes(session.chunks)
        session.chunks.clear()
        number = next(self.counter)
        self._store(number, payload, stuffed=False)
        self.accepted += 1
        return b"250 2.0.0 Ok: queued as B%08d\r\n" % number

    def _store(self, number: int, payload: bytes, *, stuffed: bool = True) -> None:
        if self.spool is None:
            return
        if stuffed:
            payload = (b"\r\n" + payload).replace(b"\r\n..", b"\r\n.")[2:]
        (self.spool / f"{number:08d}.eml").write_bytes(payload)


# -- driver side ----------------------------------------------------------------


class SinkProcess:
    """A sink running in a child process, for the benchmark driver."""

    def __init__(self, mode: str, spool: Path | None, host: str = "127.0.0.1", chunking: bool = True) -> None:
        self.mode = mode
        self.spool = spool
        self.chunking = chunking
        self.host = host
        self.port = 0
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        argv = [sys.executable, "-m", "bench.sinks", "--mode", self.mode, "--host", self.host, "--port", "0"]
        if self.spool is not None:
            self.spool.mkdir(parents=True, exist_ok=True)
            argv += ["--spool", str(self.spool)]
        if not self.chunking:
            argv.append("--no-chunking")
        repo = Path(__file__).resolve().parent.parent
        self._proc = subprocess.Popen(argv, cwd=repo, stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline().split()
        if len(line) != 2 or line[0] != "READY":
            self.stop()
            raise RuntimeError(f"SMTP sink ({self.mode}) did not start")
        self.port = int(line[1])

    def stored(self) -> list[Path]:
        return sorted(self.spool.glob("*.eml")) if self.spool else []

    def clear(self) -> None:
        for path in self.stored():
            path.unlink()

    def stop(self) -> None:
        stop_child(self._proc)
        self._proc = None


def selftest(mode: str, count: int) -> float:
    """Messages per second the sink takes from a lock-step client sending small messages on one connection."""
    sink = SinkProcess(mode, None)
    sink.start()
    try:
        body = (b"Subject: selftest\r\n\r\n" + b"x" * 70 + b"\r\n") * 40
        with socket.create_connection(("127.0.0.1", sink.port)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            reader = sock.makefile("rb")
            reader.readline()
            sock.sendall(b"EHLO client\r\n")
            while not reader.readline().startswith(b"250 "):
                pass
            started = time.perf_counter()
            for _ in range(count):
                sock.sendall(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
                for _ in range(3):
                    reader.readline()
                sock.sendall(body + b".\r\n")
                reader.readline()
            elapsed = time.perf_counter() - started
            sock.sendall(b"QUIT\r\n")
        return count / elapsed
    finally:
        sink.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sinks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=MODES, default="prompt")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--spool", type=Path, help="store every accepted message here")
    parser.add_argument("--no-chunking", action="store_true", help="do not offer CHUNKING (BDAT)")
    parser.add_argument("--selftest", action="store_true", help="measure the sink alone and exit")
    parser.add_argument("--count", type=int, default=5000, help="messages for --selftest")
    args = parser.parse_args(argv)
    if args.selftest:
        for mode in MODES:
            print(f"{mode}: {selftest(mode, args.count):,.0f} msg/s (lock-step client, one connection)")
        return 0
    sink = SMTPSink(args.host, args.port, args.mode, args.spool, chunking=not args.no_chunking)
    signal.signal(signal.SIGTERM, sink.stop)
    signal.signal(signal.SIGINT, sink.stop)
    print(f"READY {sink.port}", flush=True)
    sink.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
