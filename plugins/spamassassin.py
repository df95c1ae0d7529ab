"""Spam scoring by SpamAssassin's spamd, speaking the spamc protocol (SPAMC/1.5) over TCP or a Unix socket.

Optional: enable it under ``plugins:`` (globally or per account)::

    plugins:
      spamassassin:
        host: localhost        # or socket: /run/spamd.sock (not both)
        port: 783
        timeout: 30s           # the whole exchange: connect, send, scan, reply
        max_size: 500KiB       # larger messages pass unscanned, with a log note (as spamc does)
        user: alice            # spamc's -u: whose spamd preferences apply (optional)
        drop_score: 10         # optional: drop messages scoring at or above this
        on_error: keep         # keep | pass

Each message is sent with ``HEADERS``: spamd answers with the header block it would give the message, and only
its ``X-Spam-*`` fields are copied onto the message (at the end of its header block), so the body bytes are never
rewritten, whatever spamd's ``report_safe`` says. As spamd itself does, ``X-Spam-*`` fields the message arrived
with (other than ``X-Spam-Prev-*``) are removed first, so a sender cannot forge a verdict.

When spamd cannot be asked (unreachable, timed out, an error status, a reply that breaks the protocol or its size
bounds), ``on_error: keep`` raises: the message stays on the server and is tried again on the next poll. With
``on_error: pass`` it is delivered unscanned, marked with an ``X-Spam-Checker-Error`` field, and a warning is
logged. The reply is read within fixed bounds: spamd is a network peer like any other.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from postbote import (
    Account,
    Message,
    Node,
    Parser,
    PostboteError,
    Problems,
    Section,
    Verdict,
    choice,
    duration,
    get_logger,
    hookimpl,
    nonempty_text,
    path_relative_to,
    port_number,
    size,
)

NAME = "spamassassin"
PROTOCOL = b"SPAMC/1.5"
DEFAULT_PORT = 783
DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_SIZE = 500 * 1024
ON_ERROR = ("keep", "pass")
OPTION_KEYS = {"host", "port", "socket", "timeout", "max_size", "user", "drop_score", "on_error"}

MAX_REPLY_LINE = 1024
MAX_REPLY_HEADERS = 16
HEADER_SLACK = 64 * 1024
MAX_SPAM_FIELDS = 64
MAX_ERROR_TEXT = 200
UNIX_PATH_MAX = 107
RECV_SIZE = 1 << 16

_STATUS = re.compile(rb"SPAMD/(\d{1,3})\.(\d{1,3}) (\d{1,3}) ([ -~]*)")
_NUMBER = r"-?\d{1,9}(?:\.\d{1,9})?"
_SPAM = re.compile(rf"(True|False|Yes|No) ; ({_NUMBER}) / ({_NUMBER})")
_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:(.*)", re.DOTALL)
_SPAM_FIELD = re.compile(r"x-spam-(?!prev-)[!-9;-~]+", re.IGNORECASE)
_USER = re.compile(r"[!-~]{1,128}")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")

log = get_logger("postbote.spamassassin")


class SpamdError(PostboteError):
    """spamd could not give a verdict: unreachable, too slow, an error status or a reply that breaks the protocol."""


@dataclass(frozen=True)
class SpamdSettings:
    host: str = "localhost"
    port: int = DEFAULT_PORT
    socket: Path | None = None
    timeout: float = DEFAULT_TIMEOUT
    max_size: int = DEFAULT_MAX_SIZE
    user: str | None = None
    drop_score: float | None = None
    on_error: str = "keep"

    @property
    def address(self) -> str:
        return f"unix:{self.socket}" if self.socket is not None else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class SpamdVerdict:
    """spamd's answer: its ``Spam:`` line (verdict, score, threshold) and the ``X-Spam-*`` fields it would add."""

    spam: bool
    score: float
    threshold: float
    fields: tuple[tuple[str, str], ...]


# --- configuration ---


@hookimpl
def parse_plugin_options(name: str, options: Node, problems: Problems, base_dir: Path) -> SpamdSettings | None:
    if name != NAME:
        return None
    section = Section(options, problems)
    socket_path = section.get("socket", _socket_path(base_dir), None)
    if socket_path is not None and ("host" in section or "port" in section):
        section.problem("give either socket or host and port, not both", section.raw("socket"))
    settings = SpamdSettings(
        host=section.get("host", nonempty_text, "localhost"),
        port=section.get("port", port_number, DEFAULT_PORT),
        socket=socket_path,
        timeout=section.get("timeout", duration, DEFAULT_TIMEOUT),
        max_size=section.get("max_size", size, DEFAULT_MAX_SIZE),
        user=section.get("user", _user, None),
        drop_score=section.get("drop_score", _score, None),
        on_error=section.get("on_error", choice(*ON_ERROR), "keep"),
    )
    section.finish(OPTION_KEYS)
    return settings


def _socket_path(base_dir: Path) -> Parser[Path]:
    relative = path_relative_to(base_dir)

    def parse(value: Any) -> Path:
        path = relative(value)
        if len(os.fsencode(path)) > UNIX_PATH_MAX:
            raise ValueError(f"expected a Unix socket path of at most {UNIX_PATH_MAX} bytes")
        return path

    return parse


def _user(value: Any) -> str:
    user = nonempty_text(value)
    if not _USER.fullmatch(user):
        raise ValueError("expected a user name of up to 128 printable ASCII characters without spaces")
    return user


def _score(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError("expected a spam score such as 10 or 7.5")
    return float(value)


# --- filtering ---


@hookimpl
def filter_message(message: Message, account: Account) -> Verdict | None:
    settings: SpamdSettings = account.options_for(NAME) or SpamdSettings()
    if message.size > settings.max_size:
        log.info("spamassassin.skipped", reason="larger than max_size, passed on unscanned", size=message.size,
                 max_size=settings.max_size)
        return None
    try:
        verdict = scan(message, settings)
    except SpamdError as exc:
        if settings.on_error == "keep":
            raise
        log.warning("spamassassin.unscanned", error=str(exc), on_error="pass")
        message.add_header("X-Spam-Checker-Error", f"not scanned: {exc}")
        return None
    apply_verdict(message, verdict)
    log.info("spamassassin.scanned", spam=verdict.spam, score=verdict.score, threshold=verdict.threshold)
    if settings.drop_score is not None and verdict.score >= settings.drop_score:
        return Verdict.drop(f"spam score {verdict.score:.1f} ≥ {settings.drop_score:.1f}")
    return None


def apply_verdict(message: Message, verdict: SpamdVerdict) -> None:
    """Replace the message's own ``X-Spam-*`` fields (not ``X-Spam-Prev-*``) with spamd's, as spamd would."""
    for name in {name.lower() for name in message.headers if _SPAM_FIELD.fullmatch(name)}:
        message.remove_header(name)
    for name, value in verdict.fields:
        message.add_header(name, value)


# --- the spamc protocol ---


def scan(message: Message, settings: SpamdSettings) -> SpamdVerdict:
    """Ask spamd about ``message`` with ``HEADERS``; every failure is a `SpamdError` naming spamd's address."""
    deadline = time.monotonic() + settings.timeout
    try:
        with _Connection(_connect(settings), deadline) as connection:
            connection.send(_request_head(message, settings))
            for chunk in message.chunks():
                connection.send(chunk)
            connection.finish_sending()
            return _read_reply(connection, reply_limit=message.size + HEADER_SLACK)
    except SpamdError as exc:
        raise SpamdError(f"spamd at {settings.address}: {exc}") from None
    except TimeoutError:
        raise SpamdError(f"spamd at {settings.address}: timed out after {settings.timeout:g} s") from None
    except OSError as exc:
        raise SpamdError(f"spamd at {settings.address}: {exc.strerror or exc}") from None


def _connect(settings: SpamdSettings) -> socket.socket:
    if settings.socket is None:
        return socket.create_connection((settings.host, settings.port), timeout=settings.timeout)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(settings.timeout)
        sock.connect(os.fsencode(settings.socket))
    except BaseException:
        sock.close()
        raise
    return sock


def _request_head(message: Message, settings: SpamdSettings) -> bytes:
    """spamd matches ``Content-length`` case-sensitively, so it is spelt exactly as spamc spells it."""
    lines = [b"HEADERS " + PROTOCOL, b"Content-length: %d" % message.size]
    if settings.user:
        lines.append(b"User: " + settings.user.encode("ascii"))
    return b"\r\n".join(lines) + b"\r\n\r\n"


class _Connection:
    """A socket with one deadline for the whole exchange, so that a reply dripping in byte by byte still ends."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.buffer = bytearray()

    def __enter__(self) -> _Connection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.sock.close()

    def _arm(self) -> None:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        self.sock.settimeout(remaining)

    def send(self, data: bytes) -> None:
        self._arm()
        self.sock.sendall(data)

    def finish_sending(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def _fill(self) -> None:
        self._arm()
        chunk = self.sock.recv(RECV_SIZE)
        if not chunk:
            raise SpamdError("connection closed before the reply was complete")
        self.buffer += chunk

    def read_line(self, limit: int) -> bytes:
        """One line without its line end; longer than ``limit`` bytes is a protocol error."""
        while (end := self.buffer.find(b"\n", 0, limit + 2)) == -1:
            if len(self.buffer) > limit + 1:
                raise SpamdError(f"bad reply: a line longer than {limit} bytes")
            self._fill()
        line = bytes(self.buffer[:end]).removesuffix(b"\r")
        del self.buffer[: end + 1]
        if len(line) > limit:
            raise SpamdError(f"bad reply: a line longer than {limit} bytes")
        return line

    def read_exact(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self._fill()
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data


def _read_reply(connection: _Connection, *, reply_limit: int) -> SpamdVerdict:
    _check_status(connection.read_line(MAX_REPLY_LINE))
    headers = _reply_headers(connection)
    length = _content_length(headers.get("content-length"), reply_limit)
    spam, score, threshold = _spam_line(headers.get("spam"))
    block = connection.read_exact(length)
    return SpamdVerdict(spam=spam, score=score, threshold=threshold, fields=spam_fields(block))


def _check_status(line: bytes) -> None:
    match = _STATUS.fullmatch(line)
    if match is None:
        raise SpamdError(f"bad reply: expected a SPAMD/1.x status line, got {_shown(line)}")
    if match.group(1) != b"1":
        raise SpamdError(f"bad reply: unsupported protocol version {_shown(line)}")
    if int(match.group(3)) != 0:
        raise SpamdError(f"spamd refused the message: {_shown(match.group(3) + b' ' + match.group(4))}")


def _reply_headers(connection: _Connection) -> dict[str, str]:
    headers: dict[str, str] = {}
    for _ in range(MAX_REPLY_HEADERS + 1):
        line = connection.read_line(MAX_REPLY_LINE)
        if not line:
            return headers
        name, colon, value = line.partition(b":")
        if not colon or not re.fullmatch(rb"[A-Za-z-]+", name):
            raise SpamdError(f"bad reply: expected a 'Name: value' header line, got {_shown(line)}")
        key = name.decode("ascii").lower()
        if key in headers:
            raise SpamdError(f"bad reply: header {name.decode('ascii')!r} given twice")
        headers[key] = value.strip(b" \t").decode("ascii", "replace")
    raise SpamdError(f"bad reply: more than {MAX_REPLY_HEADERS} header lines")


def _content_length(value: str | None, limit: int) -> int:
    if value is None or not re.fullmatch(r"\d{1,12}", value):
        raise SpamdError(f"bad reply: expected a Content-length header, got {_shown(value)}")
    length = int(value)
    if length > limit:
        raise SpamdError(f"bad reply: {length} bytes of headers announced, more than the {limit} allowed")
    return length


def _spam_line(value: str | None) -> tuple[bool, float, float]:
    match = _SPAM.fullmatch(value or "")
    if match is None:
        raise SpamdError(f"bad reply: expected a header like 'Spam: True ; 7.5 / 5.0', got {_shown(value)}")
    return match.group(1) in ("True", "Yes"), float(match.group(2)), float(match.group(3))


def spam_fields(block: bytes) -> tuple[tuple[str, str], ...]:
    """The ``X-Spam-*`` fields (not ``X-Spam-Prev-*``) of a header block, folding kept, control characters masked.

    Lines that are not header fields are skipped rather than refused: they are the message's own header lines,
    which spamd hands back as it got them, and a malformed one must not keep the message from ever being scanned.
    """
    fields: list[tuple[str, list[str]]] = []
    current: list[str] | None = None
    for raw in block.split(b"\n"):
        line = raw.removesuffix(b"\r")
        if not line:
            break
        if line[:1] in (b" ", b"\t"):
            if current is not None:
                current.append(_clean(line))
            continue
        current = None
        match = _FIELD.fullmatch(line)
        if match is None or not _SPAM_FIELD.fullmatch(name := match.group(1).decode("ascii")):
            continue
        if len(fields) == MAX_SPAM_FIELDS:
            raise SpamdError(f"bad reply: more than {MAX_SPAM_FIELDS} X-Spam fields")
        current = [_clean(match.group(2)).lstrip(" \t")]
        fields.append((name, current))
    return tuple((name, "\n".join(lines)) for name, lines in fields)


def _clean(data: bytes) -> str:
    return _CONTROL.sub("?", data.decode("utf-8", "replace"))


def _shown(data: bytes | str | None) -> str:
    """Reply text fit for a log line and a header field: printable ASCII only, cut short."""
    if data is None:
        return "nothing"
    text = data if isinstance(data, str) else data.decode("ascii", "replace")
    shown = ascii(text[:MAX_ERROR_TEXT])
    return shown + "..." if len(text) > MAX_ERROR_TEXT else shown
