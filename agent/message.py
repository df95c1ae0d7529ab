"""The message object that plugins receive.

A message is its header block (small, kept in memory, editable) and its body (spooled: in memory while small, in a
temporary file beyond `SPOOL_THRESHOLD`). Plugins get cheap header access without a MIME parse of the whole
message; the bytes after the header block are never touched, so what arrives at the destination is what the
server sent apart from the header edits plugins make (the ``Received:`` trace header, tags).
"""

from __future__ import annotations

import contextlib
import enum
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    from email.message import Message as EmailMessage

SPOOL_THRESHOLD = 1 << 20
MAX_HEADER_BYTES = 1 << 20
CHUNK_SIZE = 1 << 16

_FIELD_START = re.compile(rb"^([^\s:]+)[ \t]*:", re.MULTILINE)
_FIELD_END = re.compile(rb"\n(?![ \t])")  # a line end not followed by a continuation line
_FOLD = re.compile(rb"\r?\n(?=[ \t])")
_FIELD_NAME = re.compile(r"[!-9;-~]+")
_BARE_LINE_BREAK = re.compile(r"\r?\n(?![ \t])")  # a line break in a value not followed by folding white space


class VerdictAction(enum.StrEnum):
    ACCEPT = "accept"  # deliver without asking the remaining filters
    DROP = "drop"  # deliver nowhere; the message counts as handled


@dataclass
class Verdict:
    """What a filter decided: ``accept`` ends filtering and delivers; ``drop`` ends it and delivers nowhere."""

    action: VerdictAction
    reason: str = ""

    @classmethod
    def accept(cls) -> Verdict:
        return cls(VerdictAction.ACCEPT)

    @classmethod
    def drop(cls, reason: str) -> Verdict:
        return cls(VerdictAction.DROP, reason)

    @property
    def dropped(self) -> bool:
        return self.action is VerdictAction.DROP


class Message:
    """One message fetched from the server.

    ``uid`` is its POP3 unique id, ``server_size`` the octet count LIST announced. ``recipients`` is ``None`` (each
    destination's configured recipients) until a filter reroutes the message by setting it to a list of addresses;
    ``destinations`` likewise is ``None`` (the account's ``deliver:``) until a filter sends it elsewhere.
    """

    def __init__(self, uid: str, server_size: int = 0) -> None:
        self.uid = uid
        self.server_size = server_size
        self.recipients: list[str] | None = None
        self.destinations: list[Any] | None = None
        self.tags: dict[str, str] = {}
        self._header = bytearray()
        self._header_done = False
        self._body: BinaryIO = io.BytesIO()  # a temporary file once it grows beyond SPOOL_THRESHOLD
        self._body_size = 0
        self._eight_bit = False
        self._parsed: EmailMessage | None = None
        self._spans: list[tuple[str, tuple[int, int]]] | None = None
        self._lowered: bytes | None = None  # the header block in lower case, for finding fields by name
        self._message_id: Any = ...

    @classmethod
    def from_bytes(cls, data: bytes, uid: str = "local") -> Message:
        message = cls(uid, len(data))
        message.write(data)
        message.close_writing()
        return message

    # --- building (used by the POP3 reader) ---

    def write(self, data: bytes) -> None:
        """Append raw message bytes as they arrive; the header block is split off at the first empty line."""
        if not data:
            return
        if not self._eight_bit and not data.isascii():
            self._eight_bit = True
        if self._header_done:
            self._write_body(data)
            return
        scan_from = max(0, len(self._header) - 3)
        self._header += data
        self._spans = self._lowered = None
        end = _header_end(self._header, scan_from)
        if end is not None:
            rest = bytes(self._header[end:])
            del self._header[end:]
            self._header_done = True
            self._write_body(rest)
        elif len(self._header) > MAX_HEADER_BYTES:
            # No empty line within the first MiB: treat it all as body, to be passed on untouched.
            rest = bytes(self._header)
            self._header.clear()
            self._header_done = True
            self._write_body(rest)

    def _write_body(self, data: bytes) -> None:
        if not data:
            return
        if self._body_size + len(data) > SPOOL_THRESHOLD and isinstance(self._body, io.BytesIO):
            import tempfile  # only for large messages

            spool = tempfile.TemporaryFile()  # noqa: SIM115 - closed by discard()
            spool.write(self._body.getbuffer())
            self._body = spool
        self._body.write(data)
        self._body_size += len(data)

    def close_writing(self) -> None:
        self._header_done = True
        self._body.seek(0)

    # --- reading ---

    @property
    def size(self) -> int:
        """Octets as received (header block as now edited, plus body)."""
        return len(self._header) + self._body_size

    @property
    def eight_bit(self) -> bool:
        return self._eight_bit

    @property
    def header_bytes(self) -> bytes:
        return bytes(self._header)

    def chunks(self, size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """The whole message, header block first, in chunks of at most ``size`` bytes of body."""
        if self._header:
            yield bytes(self._header)
        self._body.seek(0)
        while chunk := self._body.read(size):
            yield chunk

    def as_bytes(self) -> bytes:
        return b"".join(self.chunks())

    @property
    def headers(self) -> EmailMessage:
        """The header fields parsed (header block only, never the body); read-only view, use the methods to edit."""
        if self._parsed is None:
            import email.parser  # the full parser only for plugins that ask for it
            import email.policy

            parser = email.parser.BytesHeaderParser(policy=email.policy.compat32)
            self._parsed = parser.parsebytes(bytes(self._header))
        return self._parsed

    def get_header(self, name: str, default: str | None = None) -> str | None:
        """The first field called ``name``, unfolded, as text: UTF-8 where it is valid, else Latin-1, so 8-bit
        bytes are never lost to replacement characters. RFC 2047 encoded words are left as they are.

        A ``name`` that cannot be a field name (empty, or with a colon, a space or a non-ASCII character) is in no
        header block: the default comes back."""
        if not _FIELD_NAME.fullmatch(name):
            return default
        value_start = self._value_start(name)
        if value_start is None:
            return default
        end_of_field = _FIELD_END.search(self._header, value_start)
        raw = bytes(self._header[value_start: end_of_field.start() if end_of_field else len(self._header)])
        return _decode_header_bytes(_FOLD.sub(b"", raw).strip() if b"\n" in raw else raw.strip())

    def _value_start(self, name: str) -> int | None:
        """Where the value of the first field called ``name`` (any case) starts: just after its colon.

        Candidates are found with ``find`` (a line that starts with the name); a candidate whose name goes on
        (``Message-IDs:`` when looking for ``Message-ID``) is passed over. Each search starts after the previous
        candidate, so the scan always ends.
        """
        if self._lowered is None:
            self._lowered = bytes(self._header).lower()
        lowered, key = self._lowered, name.lower().encode("ascii")
        candidate = 0 if lowered.startswith(key) else _line_starting_with(lowered, key, 0)
        while candidate is not None:
            after = candidate + len(key)
            while lowered[after:after + 1] in (b" ", b"\t"):
                after += 1
            if lowered[after:after + 1] == b":":
                return after + 1
            candidate = _line_starting_with(lowered, key, candidate + 1)
        return None

    @property
    def message_id(self) -> str | None:
        if self._message_id is ...:
            value = self.get_header("Message-ID")
            self._message_id = value.strip() if value else None
        return self._message_id

    @property
    def return_path(self) -> str | None:
        """The address from the Return-Path header without angle brackets; ``""`` for ``<>``; None when absent."""
        value = self.get_header("Return-Path")
        if value is None:
            return None
        value = value.strip()
        if value.startswith("<") and ">" in value:
            value = value[1 : value.index(">")]
        return value.strip()

    # --- editing the header block ---

    def prepend_header(self, name: str, value: str) -> None:
        """Add a field at the top of the header block, as trace fields go (RFC 5321 section 4.4)."""
        self._header[0:0] = _field(name, value, self._newline())
        self._edited()

    def add_header(self, name: str, value: str) -> None:
        """Add a field at the end of the header block."""
        field_bytes = _field(name, value, self._newline())
        if self._header and not self._header.endswith(b"\n"):
            self._header += self._newline()
        self._header += field_bytes
        self._edited()

    def remove_header(self, name: str) -> int:
        """Remove every field called ``name`` (with its continuation lines); returns how many were removed."""
        spans = [span for field_name, span in self._field_spans() if field_name.lower() == name.lower()]
        for start, end in reversed(spans):
            del self._header[start:end]
        if spans:
            self._edited()
        return len(spans)

    def replace_header(self, name: str, value: str) -> None:
        """Rewrite the first field called ``name`` where it stands (others of that name go); add it if absent."""
        spans = [span for field_name, span in self._field_spans() if field_name.lower() == name.lower()]
        if not spans:
            self.add_header(name, value)
            return
        for start, end in reversed(spans[1:]):
            del self._header[start:end]
        start, end = spans[0]
        self._header[start:end] = _field(name, value, self._newline())
        self._edited()

    def _field_spans(self) -> list[tuple[str, tuple[int, int]]]:
        """Each field's name and byte span in the header block; kept until the next edit."""
        if self._spans is None:
            starts = [(m.start(), m.group(1).decode("ascii", "replace")) for m in _FIELD_START.finditer(self._header)]
            ends = [start for start, _ in starts[1:]] + ([len(self._header)] if starts else [])
            self._spans = [(name, (start, max(end, start))) for (start, name), end in zip(starts, ends, strict=True)]
        return self._spans

    def _edited(self) -> None:
        self._parsed = None
        self._spans = self._lowered = None
        self._message_id = ...

    def _newline(self) -> bytes:
        return b"\r\n" if self._header.find(b"\r\n", 0, 4096) != -1 or not self._header else b"\n"

    def discard(self) -> None:
        """Free the spool; a failure to flush a half-written spool file (disk full) no longer matters."""
        with contextlib.suppress(OSError):
            self._body.close()


def _line_starting_with(lowered: bytes, key: bytes, search_from: int) -> int | None:
    """The offset of the first line at or after ``search_from`` that starts with ``key``, or None."""
    newline = lowered.find(b"\n" + key, max(0, search_from - 1))
    return None if newline == -1 else newline + 1


def _decode_header_bytes(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _field(name: str, value: str, newline: bytes) -> bytes:
    if not _FIELD_NAME.fullmatch(name):
        raise ValueError(f"invalid header field name {name!r}")
    if "\r" in value or "\n" in value:
        value = _BARE_LINE_BREAK.sub("\n ", value).replace("\r", "")
        value = value.replace("\n", newline.decode())
    return f"{name}: {value}".encode() + newline


def _header_end(buffer: bytearray, scan_from: int = 0) -> int | None:
    """Offset of the empty line that ends the header block, or None if it has not arrived yet."""
    if buffer.startswith(b"\r\n") or buffer.startswith(b"\n"):
        return 0
    positions = [p + len(sep) - len(tail) for sep, tail in ((b"\r\n\r\n", b"\r\n"), (b"\n\n", b"\n"))
                 if (p := buffer.find(sep, scan_from)) != -1]
    return min(positions) if positions else None
