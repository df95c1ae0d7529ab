"""An SMTP (RFC 5321) and LMTP (RFC 2033) client for handing messages on, one session for many messages.

Written for postbote's delivery rules rather than taken from smtplib: a message is sent only when every recipient
was accepted (so a partial refusal never leaves some recipients served and others not), MAIL and RCPT are
pipelined when the server offers PIPELINING (RFC 2920), the message is streamed with the line-ending and
dot-stuffing rules of `postbote.wire`, LMTP's per-recipient replies are read, and every reply the server sends is
bounded and checked, since the MTA side is attack surface too. Failures raise `DeliveryError` marked temporary
(4xx, connection trouble, garbled replies) or permanent (5xx).

For a submission relay: implicit TLS (port 465) or STARTTLS, which fails closed (`SessionRefused`) when the server
does not offer it, and SMTP AUTH (RFC 4954) driven by any SASL mechanism object (`authenticate`); a refused sender
is a `SenderRefused`, so that the caller can try once more with another. With ``postbote -v`` every command and
reply line is traced (`postbote.trace`), the data as one ``[... N bytes ...]`` line.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from postbote.errors import DeliveryError
from postbote.tls import TLSError, TLSPolicy
from postbote.trace import protocol_trace
from postbote.wire import crlf_lines, smtp_data

MAX_REPLY_LINE = 4096
MAX_REPLY_LINES = 100
WRITE_BUFFER = 1 << 16
BDAT_CHUNK = 1 << 20
MAX_AUTH_ROUNDS = 10


class SessionRefused(DeliveryError):
    """The session cannot be used for any message: TLS could not be had (STARTTLS not offered, a certificate not
    trusted) or the login was refused. Temporary for the messages, which wait; trying again for every message of
    the poll would only repeat it (and a login tried per message can lock the account)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, temporary=True)


class AuthRefused(SessionRefused):
    """The server refused SMTP AUTH (or the exchange broke off)."""


class SenderRefused(DeliveryError):
    """The server refused the envelope sender (MAIL FROM); the recipients were never tried."""


class SASLMechanism(Protocol):
    """What `SMTPClient.authenticate` needs of a SASL mechanism (``postbote.plugins.signin.sasl``'s classes)."""

    name: str

    def initial_response(self) -> bytes | None: ...

    def respond(self, challenge: bytes) -> bytes: ...


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

    def __init__(self, sock: socket.socket, *, server: str, timeout: float, lmtp: bool, host: str = "localhost",
                 encrypted: bool = False) -> None:
        self.server = server
        self.host = host  # the name TLS verified, and OAUTHBEARER names
        self.timeout = timeout
        self.lmtp = lmtp
        self.encrypted = encrypted  # TLS from the first byte, or since STARTTLS
        self.extensions: dict[str, str] = {}
        self.usable = True
        self._sock = sock
        self._reader = sock.makefile("rb")
        self._outstanding: Delivery | None = None
        self._trace = protocol_trace("LMTP" if lmtp else "SMTP")

    @classmethod
    def connect(cls, *, host: str | None = None, port: int = 25, unix_socket: str | None = None, timeout: float,
                lmtp: bool = False, helo: str, starttls: bool = False, tls: TLSPolicy | None = None,
                implicit_tls: bool = False) -> SMTPClient:
        """A greeted session; ``implicit_tls``: TLS from the first byte (submissions, port 465); ``starttls``:
        upgraded before anything else is said, or `SessionRefused`."""
        server = unix_socket or f"{host}:{port}"
        sock = _open_socket(host, port, unix_socket, timeout, server)
        if implicit_tls:
            try:
                sock = (tls or TLSPolicy()).wrap(sock, host or "localhost", server, implicit=True)
            except TLSError as exc:
                raise SessionRefused(f"TLS to {server}: {exc}") from None
        client = cls(sock, server=server, timeout=timeout, lmtp=lmtp, host=host or "localhost",
                     encrypted=implicit_tls)
        try:
            client._expect(client._read_reply(), "greeting", 220)
            client.hello(helo)
            if starttls:
                client.starttls(tls or TLSPolicy(), host or "localhost", helo)
        except BaseException:
            client.close()
            raise
        return client

    def offers(self, extension: str) -> bool:
        """Whether the server named ``extension`` (``SMTPUTF8``, ``PIPELINING``…) in its EHLO/LHLO reply."""
        return extension.upper() in self.extensions

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
        """Upgrade to TLS, or refuse to go on: nothing is ever sent in the clear when TLS was asked for."""
        if "STARTTLS" not in self.extensions:
            self.usable = False
            raise SessionRefused(f"{self.server} does not offer STARTTLS, which the config requires (tls: "
                                 "starttls); nothing was sent in the clear")
        reply = self._command("STARTTLS")
        if reply.code != 220:
            self.usable = False
            raise SessionRefused(f"{self.server} answered STARTTLS with {reply}; nothing was sent in the clear")
        self._reader.close()
        try:
            self._sock = tls.wrap(self._sock, host, self.server)
        except TLSError as exc:
            self.usable = False
            raise SessionRefused(f"STARTTLS to {self.server}: {exc}") from None
        self._reader = self._sock.makefile("rb")
        self.encrypted = True
        self.hello(helo)

    def sasl_mechanisms(self) -> list[str]:
        """The SASL mechanisms the server named in its EHLO reply (``AUTH PLAIN LOGIN ...``)."""
        return self.extensions.get("AUTH", "").upper().split()

    def authenticate(self, mechanism: SASLMechanism, *, max_rounds: int = MAX_AUTH_ROUNDS) -> None:
        """SMTP AUTH (RFC 4954) with ``mechanism``; the initial response rides on the AUTH line. Raises
        `AuthRefused` (with the server's reply, never a secret) unless the server answers 235."""
        initial = mechanism.initial_response()
        line = f"AUTH {mechanism.name}"
        if initial is not None:
            line += " " + (base64.b64encode(initial).decode("ascii") or "=")
        reply = self._command(line)
        for _ in range(max_rounds):
            if reply.code != 334:
                break
            try:
                challenge = base64.b64decode(reply.text.strip(), validate=True)
            except binascii.Error:
                self._cancel_auth()
                raise AuthRefused(f"{self.server}: invalid base64 in an AUTH {mechanism.name} challenge") from None
            try:
                response = mechanism.respond(challenge)
            except Exception:
                self._cancel_auth()
                raise
            reply = self._command(base64.b64encode(response).decode("ascii"))
        else:
            self._cancel_auth()
            raise AuthRefused(f"{self.server}: AUTH {mechanism.name} took more than {max_rounds} rounds")
        if reply.code != 235:
            raise AuthRefused(f"{self.server} refused AUTH {mechanism.name}: {reply}")

    def _cancel_auth(self) -> None:
        """``*`` ends an exchange (RFC 4954 4); its 501 is read, so the session stays in step (or is dropped)."""
        with contextlib.suppress(DeliveryError):
            self._command("*")

    def send(self, sender: str, recipients: list[str], chunks: Iterable[bytes], *, eight_bit: bool = False) -> str:
        """Deliver one message to all ``recipients``; returns the server's final answer. All or nothing."""
        return self.start(sender, recipients, chunks, eight_bit=eight_bit).result()

    def start(self, sender: str, recipients: list[str], chunks: Iterable[bytes], *,
              eight_bit: bool = False) -> Delivery:
        """Send one message and return without waiting for the server's answer to its data: `Delivery.result`
        reads it, as late as the caller likes, so the next message can be fetched and filtered meanwhile. Any later
        command reads it first; one message at a time is ever left unanswered.

        With one recipient on a server that offers PIPELINING and CHUNKING (RFC 3030), the whole transaction --
        MAIL, RCPT, BDAT with the data -- goes out in one write and nothing is waited for. With one recipient the
        all-or-nothing rule holds without waiting: a refused recipient leaves no transaction for the data.
        """
        self.finish_outstanding()
        params = self._mail_parameters(sender, recipients, eight_bit)
        commands = [f"MAIL FROM:<{sender}>{params}"] + [f"RCPT TO:<{rcpt}>" for rcpt in recipients]
        pipelining = "PIPELINING" in self.extensions
        chunking = pipelining and "CHUNKING" in self.extensions
        if chunking and len(recipients) == 1:
            envelope = "".join(c + "\r\n" for c in commands).encode("utf-8")
            if self._trace:
                self._trace.sent("\r\n".join(commands))
            return self._track(Delivery(self, recipients, commands, self._write_chunks(chunks, envelope)))
        self._send_envelope(commands, pipelining, data_follows=not chunking)
        if chunking:
            return self._track(Delivery(self, recipients, [], self._write_chunks(chunks, b"")))
        self._write_data(chunks)
        return self._track(Delivery(self, recipients, [], 0))

    def finish_outstanding(self) -> None:
        """Read the answer still owed for the previous message, if any (its `Delivery` keeps it)."""
        if self._outstanding is not None:
            self._outstanding.settle()

    def quit(self) -> None:
        if self.usable:
            with contextlib.suppress(DeliveryError):
                self.finish_outstanding()
                self._command("QUIT")
        self.close()

    def close(self) -> None:
        self.usable = False
        for closable in (self._reader, self._sock):
            with contextlib.suppress(OSError):
                closable.close()

    # --- internals ---

    def _track(self, delivery: Delivery) -> Delivery:
        self._outstanding = delivery
        return delivery

    def _send_envelope(self, commands: list[str], pipelining: bool, *, data_follows: bool) -> None:
        """MAIL and RCPT, waiting for their answers (several recipients: all must be accepted before any data is
        sent). With one recipient DATA joins the pipeline (RFC 2920): if that recipient is refused, the server has
        no recipient to start a transaction for and refuses DATA too, so all-or-nothing still holds."""
        data_pipelined = data_follows and pipelining and len(commands) == 2
        if pipelining:
            pipeline = "".join(c + "\r\n" for c in commands + ["DATA"] * data_pipelined)
            if self._trace:
                self._trace.sent(pipeline)
            self._write(pipeline.encode("utf-8"))
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
            raise self._refusal(refused)
        if not data_follows:
            return
        if reply is None:
            reply = self._command("DATA")
        if reply.code != 354:
            self._reset()
            raise DeliveryError(f"{self.server} answered DATA with {reply}", temporary=reply.code < 500)

    def _refusal(self, refused: list[tuple[str, Reply]]) -> DeliveryError:
        """The error for a refused envelope: a refused MAIL decides (the RCPTs pipelined behind it were refused for
        lack of a transaction), else the worst of the refused recipients."""
        mail_refused = refused[0][0].startswith("MAIL")
        command, worst = refused[0] if mail_refused else max(refused, key=lambda item: item[1].code)
        error = SenderRefused if mail_refused else DeliveryError
        return error(f"{self.server} refused {command.split(':')[0]} {command.partition(':')[2]}: {worst}",
                     temporary=not worst.code >= 500)

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

    def _judge_data_replies(self, recipients: list[str], replies: list[Reply]) -> str:
        """SMTP answers the data once; LMTP once per recipient (RFC 2033 4.2), and some may take it while others
        refuse: those that took it are named in the error, so that a retry goes only to the others."""
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
        written = 0
        for piece in smtp_data(chunks):
            buffer += piece
            if len(buffer) >= WRITE_BUFFER:
                written += len(buffer)
                self._write(bytes(buffer))
                buffer.clear()
        self._write(bytes(buffer))
        if self._trace:
            self._trace.elided(written + len(buffer) - 3, sent=True)  # without the ".\r\n" that ends it
            self._trace.sent(".")

    def _write_chunks(self, chunks: Iterable[bytes], envelope: bytes) -> int:
        """The message as BDAT chunks (RFC 3030: CRLF line endings, no dot-stuffing, no terminator) behind
        ``envelope``: a small message is one write of envelope, ``BDAT n LAST`` and data. Returns the number of BDAT
        commands sent; a chunk is at most `BDAT_CHUNK` bytes, so a 200 MB message has 200 answers to read later,
        which fit the socket buffers."""
        prefix, pending, count = envelope, bytearray(), 0
        for piece in crlf_lines(chunks):
            pending += piece
            if len(pending) >= BDAT_CHUNK:
                if self._trace:
                    self._trace.sent(f"BDAT {len(pending)}")
                    self._trace.elided(len(pending), sent=True)
                self._write(prefix + b"BDAT %d\r\n" % len(pending) + pending)
                prefix, count = b"", count + 1
                pending.clear()
        if self._trace:
            self._trace.sent(f"BDAT {len(pending)} LAST")
            self._trace.elided(len(pending), sent=True)
        self._write(prefix + b"BDAT %d LAST\r\n" % len(pending) + pending)
        return count + 1

    def _final_answers(self, recipients: list[str], envelope: list[str], chunks: int) -> str:
        """Read what a sent message is owed, in order: the answers to a pipelined envelope, to its BDAT chunks but
        the last, then the final answer (LMTP: one per recipient)."""
        try:
            envelope_replies = [self._read_reply() for _ in envelope]
            chunk_replies = [self._read_reply() for _ in range(chunks - 1)]
            final = [self._read_reply() for _ in (recipients if self.lmtp else recipients[:1])]
        except DeliveryError as exc:  # the whole message went out; its answer was lost: it may have arrived
            raise DeliveryError(f"{exc.reason} (after the whole message was sent: it may have arrived)",
                                temporary=True, in_doubt=True) from None
        refused = [(c, r) for c, r in zip(envelope, envelope_replies, strict=True) if not r.ok]
        if refused:
            self._reset()
            raise self._refusal(refused)
        failed_chunk = next((reply for reply in chunk_replies if not reply.ok), None)
        if failed_chunk is not None:
            self._reset()
            raise DeliveryError(f"{self.server} refused part of the message (BDAT): {failed_chunk}",
                                temporary=failed_chunk.code < 500)
        return self._judge_data_replies(recipients, final)

    def _reset(self) -> None:
        try:
            self._command("RSET")
        except DeliveryError:
            self.usable = False

    def _command(self, line: str) -> Reply:
        self.finish_outstanding()
        if self._trace:
            self._trace.sent(line)
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
            if self._trace:
                self._trace.received(raw)
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


class Delivery:
    """A message `SMTPClient.start` has sent, whose answers may still be on their way: `result` reads them."""

    def __init__(self, client: SMTPClient, recipients: list[str], envelope: list[str], chunks: int) -> None:
        self._client = client
        self._recipients = recipients
        self._envelope = envelope  # MAIL and RCPT commands pipelined with the data, answers unread
        self._chunks = chunks  # BDAT commands sent (0 for DATA)
        self._settled = False
        self._answer = ""
        self._error: DeliveryError | None = None

    def result(self) -> str:
        """The server's final answer once the message is accepted; raises `DeliveryError` if it was not."""
        self.settle()
        if self._error is not None:
            raise self._error
        return self._answer

    def settle(self) -> None:
        if self._settled:
            return
        self._settled = True
        client = self._client
        if client._outstanding is self:
            client._outstanding = None
        try:
            self._answer = client._final_answers(self._recipients, self._envelope, self._chunks)
        except DeliveryError as exc:
            self._error = exc


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
