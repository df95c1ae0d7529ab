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
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from agent.credentials import Secret
from agent.errors import AccountError
from agent.tls import TLSPolicy

MAX_REPLY_LINE = 8192
MAX_LISTING_ENTRIES = 2_000_000
MAX_LISTING_LINE = 100  # "NUMBER UID" with a UID of at most 70 characters (RFC 1939 7), with room to spare
DATA_READ_SIZE = 1 << 18
FLUSH_AFTER = 16  # pipelined commands sent together at most: few writes, and the server is never left idle
_UID = re.compile(rb"[\x21-\x7e]{1,70}")
_APOP_TIMESTAMP = re.compile(rb"<[^<>\s]+@[^<>\s]+>")


class POP3Error(AccountError):
    """The server answered -ERR, or said something that is not POP3."""

    def __init__(self, message: str, reply: str = "") -> None:
        super().__init__(message)
        self.reply = reply


class POP3AuthError(POP3Error):
    """The server refused the login."""


class POP3ConnectionError(AccountError):
    """The connection failed, timed out or was closed while waiting for the server."""


class MessageTooLarge(POP3Error):
    """The server sent more data for a message than the reader was told to accept."""


class SASLMechanism(Protocol):
    """One SASL exchange (RFC 4422) as `POP3Client.authenticate` drives it: implemented in `agent.sasl`."""

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


class POP3Client:
    def __init__(self, sock: socket.socket, *, host: str, timeout: float, read_buffer: int = DATA_READ_SIZE) -> None:
        self.host = host
        self.timeout = timeout
        self._sock = sock
        self._receiver = Receiver(sock, read_buffer)
        self._doing = "reading the greeting"
        self.greeting = ""
        self.capabilities: dict[str, list[str]] = {}
        self.refused_deletions: dict[int, str] = {}
        self._outgoing = bytearray()
        self._queued = 0
        self._in_flight: deque[tuple[str, int, int | None]] = deque()  # (command, message number, data limit)

    @classmethod
    def connect(cls, host: str, port: int, *, implicit_tls: bool, tls: TLSPolicy, timeout: float) -> POP3Client:
        where = f"{host}:{port}"
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # pipelined commands must not wait
        except TimeoutError:
            raise POP3ConnectionError(f"connecting to {where} timed out after {timeout:g} s") from None
        except OSError as exc:
            raise POP3ConnectionError(f"cannot connect to {where}: {exc.strerror or exc}") from None
        try:
            if implicit_tls:
                sock = tls.wrap(sock, host, where)
            client = cls(sock, host=host, timeout=timeout)
            client.greeting = client._expect_ok()
        except BaseException:
            sock.close()
            raise
        return client

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
        self._sock = tls.wrap(self._sock, self.host, self.host)
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
        text = line.decode("utf-8", "replace")
        if line.startswith(b"+OK"):
            return
        if line.startswith(b"-ERR"):
            raise POP3AuthError(f"{self.host}: login refused: {text[4:].strip() or 'no reason given'}", text)
        raise POP3Error(f"{self.host}: not a POP3 reply {self._doing}: {text[:100]!r}", text)

    @property
    def pipelining(self) -> bool:
        """Whether commands may be sent before earlier replies are read (RFC 2449 PIPELINING)."""
        return "PIPELINING" in self.capabilities

    def listing(self) -> list[ListingEntry]:
        """UIDL joined with LIST: every message's number, UID and size. Malformed lines are errors."""
        if self.pipelining:
            self._send_all(["UIDL", "LIST"])
        else:
            self._send("UIDL")
        self._expect_ok()
        uids: dict[int, str] = {}
        for line in self._read_listing(limit=MAX_LISTING_ENTRIES, line_limit=MAX_LISTING_LINE):
            number, rest = _number_and_rest(line, "UIDL")
            if not _UID.fullmatch(rest):
                raise POP3Error(f"UIDL: invalid unique id for message {number} (RFC 1939: 1-70 printable characters)",
                                line[:100].decode("ascii", "replace"))
            uids[number] = rest.decode("ascii")
        if not self.pipelining:
            self._send("LIST")
        self._expect_ok()
        sizes: dict[int, int] = {}
        for line in self._read_listing(limit=MAX_LISTING_ENTRIES, line_limit=MAX_LISTING_LINE):
            number, rest = _number_and_rest(line, "LIST")
            if not rest.isdigit():
                raise POP3Error(f"LIST: invalid size for message {number}", line[:100].decode("ascii", "replace"))
            sizes[number] = int(rest)
        return [ListingEntry(n, uid, sizes.get(n, 0)) for n, uid in sorted(uids.items()) if n in sizes]

    # RETR and DELE may be pipelined: each command sent is queued in ``_in_flight`` and its reply is read in
    # order. DELE replies are read lazily; a -ERR to DELE is remembered in ``refused_deletions``, not raised,
    # because the message was already recorded as handled: the next poll simply deletes it again.

    def send_retrieve(self, number: int, *, limit: int | None = None) -> None:
        """RETR ``number``; at most ``limit`` octets of its data will be accepted when it is read."""
        self._send(f"RETR {number}", defer=self.pipelining)
        self._in_flight.append(("RETR", number, limit))

    def read_retrieved(self, sink: Callable[[bytes], None]) -> int:
        """Read the next RETR reply in line (after the DELE replies queued before it) into ``sink``."""
        self._read_deletion_replies(stop_at_retrieve=True)
        if not self._in_flight:
            raise POP3Error(f"{self.host}: no RETR in flight")
        _, number, limit = self._in_flight.popleft()
        self._doing = f"waiting for the reply to RETR {number}"
        self._expect_ok()
        return self._read_data(sink, limit)

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
                self.read_retrieved(lambda _data: None)  # bounded by the limit given when it was sent
            else:
                self._read_deletion_replies(stop_at_retrieve=True)

    def _read_deletion_replies(self, *, stop_at_retrieve: bool) -> None:
        while self._in_flight and self._in_flight[0][0] == "DELE":
            _, number, _ = self._in_flight.popleft()
            self._doing = f"waiting for the reply to DELE {number}"
            try:
                self._expect_ok()
            except POP3Error as exc:
                if isinstance(exc, POP3ConnectionError):
                    raise
                self.refused_deletions[number] = exc.reply
        if not stop_at_retrieve and self._in_flight:
            raise POP3Error(f"{self.host}: DELE reply expected, but RETR replies are still in flight")

    def quit(self) -> None:
        """QUIT: the server now removes the messages marked with DELE (RFC 1939 UPDATE state)."""
        self.settle()
        self._send("QUIT")
        self._expect_ok()
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()

    # --- wire ---

    def _send_all(self, commands: list[str]) -> None:
        """Several commands in one write (pipelining); their replies are read in order by the caller."""
        self._send("\r\n".join(commands), shown=" + ".join(commands))

    def _send(self, command: str, *, shown: str | None = None, defer: bool = False) -> None:
        """Write a command; ``defer`` (pipelining only) collects it with others until a read has to wait for the
        server, or `FLUSH_AFTER` commands are waiting -- enough for few writes, soon enough to keep the server busy."""
        self._outgoing += command.encode("utf-8") + b"\r\n"
        self._queued += 1
        if not defer or self._queued >= FLUSH_AFTER:
            self._flush(shown or command.split(" ")[0])
        self._doing = f"waiting for the reply to {shown or command.split(' ')[0]}"

    def _flush(self, what: str = "commands") -> None:
        if not self._outgoing:
            return
        data, self._outgoing, self._queued = bytes(self._outgoing), bytearray(), 0
        self._doing = f"sending {what}"
        try:
            self._sock.sendall(data)
        except TimeoutError:
            raise POP3ConnectionError(f"{self.host}: timed out after {self.timeout:g} s {self._doing}") from None
        except OSError as exc:
            raise POP3ConnectionError(f"{self.host}: connection lost {self._doing}: {exc.strerror or exc}") from None

    def _receive(self) -> None:
        """Wait for more data from the server (sending the commands still queued first, or it would wait too)."""
        if self._outgoing:
            self._flush()
        try:
            received = self._receiver.fill()
        except TimeoutError:
            raise POP3ConnectionError(f"{self.host}: timed out after {self.timeout:g} s {self._doing}") from None
        except ssl.SSLError as exc:
            raise POP3ConnectionError(f"{self.host}: TLS error {self._doing}: {exc.reason or exc}") from None
        except OSError as exc:
            raise POP3ConnectionError(f"{self.host}: connection lost {self._doing}: {exc.strerror or exc}") from None
        if not received:
            raise POP3ConnectionError(f"{self.host}: connection closed by the server {self._doing}")

    def _readline(self, limit: int) -> bytes:
        """One line with its line end, or ``limit`` bytes of a longer one."""
        while (line := self._receiver.line(limit)) is None:
            self._receive()
        return line

    def _read_reply_line(self, limit: int = MAX_REPLY_LINE) -> bytes:
        line = self._readline(limit + 1)
        if not line.endswith(b"\n"):
            raise POP3Error(f"{self.host}: reply line longer than {limit} bytes {self._doing}")
        return line.rstrip(b"\r\n")

    def _expect_ok(self, *, auth: bool = False) -> str:
        line = self._read_reply_line()
        text = line.decode("utf-8", "replace")
        if line.startswith(b"+OK"):
            return text[3:].strip()
        if line.startswith(b"-ERR"):
            reason = text[4:].strip()
            if auth:
                raise POP3AuthError(f"{self.host}: login refused: {reason or 'no reason given'}", text)
            raise POP3Error(f"{self.host}: server said -ERR {self._doing}: {reason or 'no reason given'}", text)
        raise POP3Error(f"{self.host}: not a POP3 reply {self._doing}: {text[:100]!r}", text)

    def _read_listing(self, *, limit: int, line_limit: int) -> Iterator[bytes]:
        """The lines of a multi-line reply with short lines (CAPA, UIDL, LIST), one at a time so the caller keeps
        only what it parsed; at most ``limit`` lines of at most ``line_limit`` bytes each."""
        count = 0
        while True:
            line = self._read_reply_line(line_limit)
            if line == b".":
                return
            count += 1
            if count > limit:
                raise POP3Error(f"{self.host}: more than {limit} lines {self._doing}")
            yield line[1:] if line.startswith(b"..") else line

    def _read_data(self, sink: Callable[[bytes], None], limit: int | None) -> int:
        """Read a multi-line data block up to its terminating ``.`` line, undoing the byte-stuffing of line starts.

        Works on everything that has arrived at once (a small message is one step), not line by line; only a line
        starting with a dot that is not complete yet waits for more data before it is judged.
        """
        received = 0
        at_line_start = True
        while True:
            if not self._receiver.pending:
                self._receive()
            piece, done = self._receiver.data_lines(at_line_start)
            if piece is None:
                self._receive()  # a dot at a line start, and the rest of its line still to come
                continue
            if piece:
                at_line_start = piece.endswith(b"\n")
                received += len(piece)
                if limit is not None and received > limit:
                    raise MessageTooLarge(f"{self.host}: message data exceeds {limit} bytes {self._doing}")
                sink(piece)
            if done:
                return received


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
            if self.pending < limit:
                return None
            end = self._pos + limit - 1
        return self._take(end + 1)

    def data_lines(self, at_line_start: bool) -> tuple[bytes | None, bool]:
        """The whole lines of a POP3 data block that have arrived, unstuffed, and whether its terminating ``.``
        line was among them (what follows it is left for the next reply). ``(None, False)``: the buffer ends
        inside a line that starts with a dot, which cannot be judged yet."""
        data, start = self._data, self._pos
        if at_line_start and data.startswith(b".", start):
            if data.startswith(b".\r\n", start) or data.startswith(b".\n", start):
                self._take(data.index(b"\n", start) + 1)
                return b"", True
            if data.find(b"\n", start) == -1:
                return None, False
        end = data.find(b"\n.\r\n", start)
        # Bare-LF terminators (rare servers) only before the first CRLF one: the buffer may hold many messages.
        bare = data.find(b"\n.\n", start, len(data) if end == -1 else end)
        end = bare if bare != -1 else end
        if end != -1:
            end += 1
            block = self._take(end)
            self._take(data.index(b"\n", end) + 1)
            return _unstuffed(block, at_line_start), True
        last_line_end = data.rfind(b"\n", start)
        if last_line_end == -1:
            return self._take(len(data)), False  # a piece of a long line
        return _unstuffed(self._take(last_line_end + 1), at_line_start), False

    def _take(self, end: int) -> bytes:
        taken = self._data[self._pos:end]
        self._pos = end
        return taken


def _unstuffed(block: bytes, at_line_start: bool) -> bytes:
    """Undo RFC 1939 byte-stuffing: a line that starts with a dot lost one to the server's stuffing."""
    if at_line_start and block.startswith(b".."):
        block = block[1:]
    return block.replace(b"\n..", b"\n.") if b"\n.." in block else block


def _number_and_rest(line: bytes, what: str) -> tuple[int, bytes]:
    parts = line.split()
    if len(parts) != 2 or not parts[0].isdigit():
        raise POP3Error(f"{what}: malformed listing line", line[:100].decode("ascii", "replace"))
    return int(parts[0]), parts[1]
