"""An SMTP (RFC 5321) and LMTP (RFC 2033) client for handing messages on, one session for many messages.

Written for postbote's delivery rules rather than taken from smtplib: a message is sent only when every recipient
was accepted (so a partial refusal never leaves some recipients served and others not), MAIL and RCPT are
pipelined when the server offers PIPELINING (RFC 2920), the message is streamed with the line-ending and
dot-stuffing rules of `agent.wire`, LMTP's per-recipient replies are read, and every reply the server sends is
bounded and checked, since the MTA side is attack surface too. Failures raise `DeliveryError` marked temporary
(4xx, connection trouble, garbled replies) or permanent (5xx).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from agent.errors import DeliveryError
from agent.tls import TLSError, TLSPolicy
from agent.wire import smtp_data

MAX_REPLY_LINE = 4096
MAX_REPLY_LINES = 100
WRITE_BUFFER = 1 << 16


@dataclass(frozen=True)
class Reply:
    code: int
    text: str

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 400

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    def __str__(self) -> str:
        return f"{self.code} {self.text}".strip()


class SMTPClient:
    """A connected, greeted (EHLO/LHLO) session; `send` delivers one message, `quit` ends the session."""

    def __init__(self, sock: socket.socket, *, server: str, timeout: float, lmtp: bool) -> None:
        self.server = server
        self.timeout = timeout
        self.lmtp = lmtp
        self.extensions: dict[str, str] = {}
        self.usable = True
        self._sock = sock
        self._reader = sock.makefile("rb")

    @classmethod
    def connect(cls, *, host: str | None = None, port: int = 25, unix_socket: str | None = None, timeout: float,
                lmtp: bool = False, helo: str, starttls: bool = False, tls: TLSPolicy | None = None) -> SMTPClient:
        server = unix_socket or f"{host}:{port}"
        sock = _open_socket(host, port, unix_socket, timeout, server)
        client = cls(sock, server=server, timeout=timeout, lmtp=lmtp)
        try:
            client._expect(client._read_reply(), "greeting", 220)
            client.hello(helo)
            if starttls:
                client.starttls(tls or TLSPolicy(), host or "localhost", helo)
        except BaseException:
            client.close()
            raise
        return client

    def hello(self, helo: str) -> None:
        verb = "LHLO" if self.lmtp else "EHLO"
        reply = self._command(f"{verb} {helo}")
        if not reply.ok and not self.lmtp:
            reply = self._command(f"HELO {helo}")
            self._expect(reply, "HELO", 250)
            self.extensions = {}
            return
        self._expect(reply, verb, 250)
        self.extensions = {}
        for line in reply.text.splitlines()[1:]:
            keyword, _, params = line.partition(" ")
            self.extensions[keyword.upper()] = params

    def starttls(self, tls: TLSPolicy, host: str, helo: str) -> None:
        if "STARTTLS" not in self.extensions:
            raise DeliveryError(f"{self.server} does not offer STARTTLS (starttls: true in the config)", temporary=True)
        self._expect(self._command("STARTTLS"), "STARTTLS", 220)
        self._reader.close()
        try:
            self._sock = tls.wrap(self._sock, host, self.server)
        except TLSError as exc:
            self.usable = False
            raise DeliveryError(f"STARTTLS to the MTA: {exc}", temporary=True) from None
        self._reader = self._sock.makefile("rb")
        self.hello(helo)

    def send(self, sender: str, recipients: list[str], chunks: Iterable[bytes], *, eight_bit: bool = False) -> str:
        """Deliver one message to all ``recipients``; returns the server's final answer. All or nothing."""
        params = self._mail_parameters(sender, recipients, eight_bit)
        commands = [f"MAIL FROM:<{sender}>{params}"] + [f"RCPT TO:<{rcpt}>" for rcpt in recipients]
        pipelining = "PIPELINING" in self.extensions
        # With one recipient DATA can join the pipeline (RFC 2920): if that recipient is refused, the server has no
        # recipient to start a transaction for and refuses DATA too, so all-or-nothing still holds.
        data_pipelined = pipelining and len(recipients) == 1
        if pipelining:
            self._write("".join(c + "\r\n" for c in commands + ["DATA"] * data_pipelined).encode("utf-8"))
            replies = [self._read_reply() for _ in commands]
        else:
            replies = []
            for command in commands:
                replies.append(self._command(command))
                if not replies[-1].ok:
                    break
        reply = self._read_reply() if data_pipelined else None
        refused = [(c, r) for c, r in zip(commands, replies, strict=False) if not r.ok]
        if refused:
            if reply is not None and reply.code == 354:
                self.close()  # the server would take data for nobody we want: abandon the session, send nothing
            else:
                self._reset()
            command, worst = max(refused, key=lambda item: item[1].code)
            raise DeliveryError(f"{self.server} refused {command.split(':')[0]} "
                                f"{command.partition(':')[2]}: {worst}", temporary=not worst.code >= 500)
        if reply is None:
            reply = self._command("DATA")
        if reply.code != 354:
            self._reset()
            raise DeliveryError(f"{self.server} answered DATA with {reply}", temporary=reply.code < 500)
        self._write_data(chunks)
        return self._data_replies(recipients)

    def quit(self) -> None:
        if self.usable:
            with contextlib.suppress(DeliveryError):
                self._command("QUIT")
        self.close()

    def close(self) -> None:
        self.usable = False
        for closable in (self._reader, self._sock):
            with contextlib.suppress(OSError):
                closable.close()

    # --- internals ---

    def _mail_parameters(self, sender: str, recipients: list[str], eight_bit: bool) -> str:
        params = ""
        if eight_bit and "8BITMIME" in self.extensions:
            params += " BODY=8BITMIME"
        if not all(a.isascii() for a in [sender, *recipients]):
            if "SMTPUTF8" not in self.extensions:
                raise DeliveryError(f"{self.server} does not offer SMTPUTF8, needed for a non-ASCII address",
                                    temporary=False)
            params += " SMTPUTF8"
        return params

    def _data_replies(self, recipients: list[str]) -> str:
        """SMTP answers the data once; LMTP once per recipient (RFC 2033 4.2), and some may take it while others
        refuse: those that took it are named in the error, so that a retry goes only to the others."""
        replies = [self._read_reply() for _ in (recipients if self.lmtp else recipients[:1])]
        failed = [r for r in replies if not r.ok]
        if failed:
            worst = max(failed, key=lambda r: r.code)
            accepted = tuple(rcpt for rcpt, reply in zip(recipients, replies, strict=False) if reply.ok and self.lmtp)
            what = f"{len(failed)} of {len(replies)} recipients" if self.lmtp and len(replies) > 1 else "the message"
            raise DeliveryError(f"{self.server} refused {what} after DATA: {worst}", temporary=worst.code < 500,
                                accepted=accepted)
        return str(replies[-1])

    def _write_data(self, chunks: Iterable[bytes]) -> None:
        """Stream the payload in large writes, so the end of a message never waits alone in a small segment."""
        buffer = bytearray()
        for piece in smtp_data(chunks):
            buffer += piece
            if len(buffer) >= WRITE_BUFFER:
                self._write(bytes(buffer))
                buffer.clear()
        self._write(bytes(buffer))

    def _reset(self) -> None:
        try:
            self._command("RSET")
        except DeliveryError:
            self.usable = False

    def _command(self, line: str) -> Reply:
        self._write(line.encode("utf-8") + b"\r\n")
        return self._read_reply()

    def _expect(self, reply: Reply, what: str, code: int) -> None:
        if reply.code != code:
            if what in ("greeting", "EHLO", "LHLO", "HELO", "STARTTLS"):
                self.usable = False
            raise DeliveryError(f"{self.server} answered {what} with {reply}", temporary=reply.code < 500)

    def _write(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as exc:
            self.usable = False
            raise DeliveryError(f"{self.server}: connection lost while sending: {_reason(exc)}",
                                temporary=True) from None

    def _read_reply(self) -> Reply:
        lines: list[str] = []
        code = 0
        while True:
            raw = self._read_line()
            if len(raw) < 3 or not raw[:3].isdigit() or (len(raw) > 3 and raw[3:4] not in (b" ", b"-")):
                self.usable = False
                raise DeliveryError(f"{self.server} sent an invalid reply: {raw[:80]!r}", temporary=True)
            line_code = int(raw[:3])
            if code and line_code != code:
                self.usable = False
                raise DeliveryError(f"{self.server} sent a reply with mixed codes", temporary=True)
            code = line_code
            lines.append(raw[4:].decode("utf-8", "replace"))
            if raw[3:4] != b"-":
                if code == 421:
                    self.usable = False  # RFC 5321 3.8: the server is closing the channel
                return Reply(code, "\n".join(lines))
            if len(lines) >= MAX_REPLY_LINES:
                self.usable = False
                raise DeliveryError(f"{self.server} sent a reply of more than {MAX_REPLY_LINES} lines", temporary=True)

    def _read_line(self) -> bytes:
        try:
            raw = self._reader.readline(MAX_REPLY_LINE + 1)
        except OSError as exc:
            self.usable = False
            raise DeliveryError(f"{self.server}: no reply: {_reason(exc)}", temporary=True) from None
        if not raw:
            self.usable = False
            raise DeliveryError(f"{self.server} closed the connection without a reply", temporary=True)
        if not raw.endswith(b"\n"):
            self.usable = False
            raise DeliveryError(f"{self.server} sent a reply line longer than {MAX_REPLY_LINE} bytes", temporary=True)
        return raw.rstrip(b"\r\n")


def _open_socket(host: str | None, port: int, unix_socket: str | None, timeout: float, server: str) -> socket.socket:
    try:
        if unix_socket:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(unix_socket)
            return sock
        sock = socket.create_connection((host or "localhost", port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    except OSError as exc:
        raise DeliveryError(f"cannot connect to {server}: {_reason(exc)}", temporary=True) from None


def _reason(exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return exc.strerror or str(exc) or type(exc).__name__
