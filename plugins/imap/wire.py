"""The IMAP wire format (RFC 3501 section 9, RFC 9051): what the client needs to read responses and to write commands.

Reading: a response arrives as *segments* (the bytes of its lines, without CRLF) separated by *literals*. Every
segment but the last ends in a literal marker ``{n}``, and n octets of literal data follow it on the wire; the
client (`postbote.plugins.imap.client`) does that framing over its socket, and streams the literals it wants
streamed into a sink instead of keeping them. `parse_response` then turns segments and literals into a `Response`:
the tag, the keyword, the number of ``* n EXISTS``-like responses, the response code ``[CODE args]`` and text of
status responses, and for data responses the values -- atoms (`Atom`), strings (``bytes``, from a quoted string or
a literal), `Streamed` for a literal that went into a sink, ``None`` for NIL and parenthesised lists (``list``).
Anything that does not parse raises `WireError`; nothing else is raised for malformed input.

Writing: `quoted` (a quoted string, or None when the value needs a literal), `astring_or_literal`, `uid_set`,
`flag_list`, `date_time` and the modified UTF-7 mailbox-name codec of RFC 3501 section 5.1.3
(`encode_mailbox` / `decode_mailbox`).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeAlias

MAX_LITERAL_DIGITS = 19  # more than any sane size, less than what makes int() slow
MAX_NESTING = 32  # parenthesised lists inside lists: deeper is hostile
MAX_UID = 2**32 - 1

STATUS_KINDS = frozenset({"OK", "NO", "BAD", "BYE", "PREAUTH"})
TAGGED_KINDS = frozenset({"OK", "NO", "BAD"})


class WireError(ValueError):
    """Input that is not valid IMAP (or a value that cannot be put on the wire as asked)."""


class Atom(str):
    """An atom as the server sent it (numbers, flags, keywords, ``BODY[HEADER]``): a `str`, told apart from a
    string (``bytes``) and NIL (``None``)."""

    __slots__ = ()


@dataclass(frozen=True)
class Streamed:
    """A literal that was streamed into a sink rather than kept: its size only."""

    size: int


Value: TypeAlias = "Atom | bytes | Streamed | None | list[Value]"


@dataclass
class Response:
    """One server response.

    ``tag``: ``"*"`` (untagged), ``"+"`` (a continuation request) or the tag of the command it completes.
    ``kind``: the keyword, upper-case: ``OK`` ``NO`` ``BAD`` ``BYE`` ``PREAUTH`` for status responses, ``EXISTS``
    ``FETCH`` ``LIST`` ``CAPABILITY`` ``SEARCH``... for data, ``+`` for a continuation request.
    ``number``: the leading number of ``* n EXISTS`` / ``* n FETCH`` / ``* n EXPUNGE``.
    ``code``/``code_args``/``text``: the response code (upper-case atom) and its raw arguments, and the human text
    of a status response (a continuation request's text is its ``text``).
    ``values``: what follows the keyword in a data response, parsed.
    """

    tag: str
    kind: str
    number: int | None = None
    code: str | None = None
    code_args: str = ""
    text: str = ""
    values: list[Value] = field(default_factory=list)

    @property
    def is_status(self) -> bool:
        return self.kind in STATUS_KINDS


# --- reading ----------------------------------------------------------------------------------------------------

_LITERAL_MARKER = re.compile(rb"\{([0-9]+)(\+?)\}\Z")
_TAG = re.compile(rb"[A-Za-z0-9!#$&',\-./:;<=>?@^_`|~]{1,64}")  # astring chars less "+" and the quoted specials
_NUMBER = re.compile(rb"[0-9]{1,10}")
_KEYWORD = re.compile(rb"[A-Za-z][A-Za-z0-9.\-_]{0,31}")
# Atom characters, leniently: anything printable but SP ( ) { " ] and [ (which starts a section); 8-bit is not.
_ATOM_BYTES = frozenset(range(0x21, 0x7F)) - frozenset(b'(){"[]')


def literal_marker(segment: bytes) -> int | None:
    """The size of the literal announced at the end of ``segment`` (a line without its CRLF), or None when the line
    does not end in ``{n}`` (``{n+}`` is accepted too). A marker with absurdly many digits raises `WireError`."""
    if not segment.endswith(b"}"):
        return None
    match = _LITERAL_MARKER.search(segment, max(0, len(segment) - MAX_LITERAL_DIGITS - 4))
    if match is None:
        start = segment.rfind(b"{")
        if start != -1 and re.fullmatch(rb"\{[0-9]+\+?\}", segment[start:]):
            raise WireError("a literal size with too many digits")
        return None
    return int(match.group(1))


def head_of(line: bytes) -> tuple[str, str, int | None]:
    """(tag, keyword, number) of a response's first line, checked: the keyword tells whether literals may follow
    (data responses) or not (status responses and continuation requests, whose text may end in anything)."""
    if line.startswith(b"+"):
        if line[1:2] not in (b"", b" "):
            raise WireError("a continuation request is '+' and a space")
        return "+", "+", None
    tag_end = line.find(b" ")
    if tag_end <= 0:
        raise WireError("a response without a tag and a keyword")
    tag = line[:tag_end]
    rest = line[tag_end + 1:]
    number = None
    if tag == b"*":
        word, _, after = rest.partition(b" ")
        if _NUMBER.fullmatch(word):
            number = int(word)
            rest = after
    elif not _TAG.fullmatch(tag):
        raise WireError("a malformed tag")
    word = rest.split(b" ", 1)[0]
    if not _KEYWORD.fullmatch(word):
        raise WireError("a malformed response keyword")
    kind = word.decode("ascii").upper()
    if tag != b"*" and kind not in TAGGED_KINDS:
        raise WireError(f"a tagged response must be OK, NO or BAD, not {kind}")
    if number is not None and kind in STATUS_KINDS:
        raise WireError("a status response with a number")
    return tag.decode("ascii"), kind, number


def takes_literals(kind: str) -> bool:
    """Whether a literal marker at the end of a line of this kind of response announces a literal (data responses)
    or is just text (status responses, continuation requests)."""
    return kind not in STATUS_KINDS and kind != "+"


def parse_response(segments: Sequence[bytes], literals: Sequence[bytes | Streamed] = ()) -> Response:
    """A whole response: ``segments`` are its lines without CRLF, each but the last ending in a literal marker,
    ``literals`` the data of those literals (or `Streamed` for one that went into a sink)."""
    if not segments or len(literals) != len(segments) - 1:
        raise WireError("segments and literals do not fit together")
    first = segments[0]
    tag, kind, number = head_of(first)
    if not takes_literals(kind):
        if len(segments) != 1:
            raise WireError("a literal in a status response")
        if kind == "+":
            return Response(tag, kind, text=_text(first[2:]))
        return _status(tag, kind, first.split(b" ", 2)[2] if first.count(b" ") >= 2 else b"")
    # the data after the keyword: skip "tag [number] keyword"
    skip = 2 if number is None else 3
    start = 0
    for _ in range(skip):
        space = first.find(b" ", start)
        if space == -1:
            start = len(first)
            break
        start = space + 1
    cursor = _Cursor(segments, literals, start)
    values = cursor.values()
    return Response(tag, kind, number=number, values=values)


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def _status(tag: str, kind: str, rest: bytes) -> Response:
    """``[CODE args] text`` of a status response."""
    code = None
    args = b""
    if rest.startswith(b"["):
        end = rest.find(b"]")
        if end == -1:
            raise WireError("a response code without its closing ']'")
        inner = rest[1:end]
        name, _, args = inner.partition(b" ")
        if not _KEYWORD.fullmatch(name):
            raise WireError("a malformed response code")
        code = name.decode("ascii").upper()
        rest = rest[end + 1:].lstrip(b" ")
    return Response(tag, kind, code=code, code_args=_text(args), text=_text(rest))


_ATOM_CLASS = b"[" + b"".join(re.escape(bytes([c])) for c in sorted(_ATOM_BYTES)) + b"]"
# One token of a data response: "(", ")", a space, a quoted string (only \\ and \" escaped; no CR, LF or NUL),
# or an atom -- which may hold bracketed sections such as BODY[HEADER.FIELDS (SUBJECT)] and an origin <0>.
_TOKEN = re.compile(rb'(?P<space> ?)(?:(?P<open>\()|(?P<close>\))|"(?P<quoted>(?:[^"\\\r\n\x00]|\\[\\"])*)"'
                    rb"|(?P<atom>" + _ATOM_CLASS + rb"+(?:\[[^\]\r\n]*\]" + _ATOM_CLASS + rb"*)*))")
_ESCAPE = re.compile(rb'\\([\\"])')


class _Cursor:
    """Walks the segments and literals of a data response, token by token (`_TOKEN`: a token and the single space
    before it, if any), keeping the lists open at the moment on a stack."""

    def __init__(self, segments: Sequence[bytes], literals: Sequence[bytes | Streamed], start: int) -> None:
        self.segments = segments
        self.literals = literals
        self.start = start
        # where the marker of each segment's literal starts (the last segment has none)
        self.markers = [segment.rfind(b"{") for segment in segments[:-1]]
        if any(marker == -1 for marker in self.markers):
            raise WireError("a segment that does not end in a literal marker")

    def values(self) -> list[Value]:
        """The values up to the end of the response: separated by single spaces, inside lists strictly (a literal
        announced too short would leave a message's tail for a lenient parser to skip); trailing spaces at the end
        of the response are forgiven."""
        stack: list[list[Value]] = [[]]
        current = stack[0]
        first = True  # no value yet in the current list (or at the top): no space before the next one
        last = len(self.segments) - 1
        index, pos = 0, self.start
        segment = self.segments[0]
        end = self.markers[0] if last else len(segment)
        token = _TOKEN.match
        while True:
            if pos >= end:
                if index < last:  # the literal announced at the end of this segment, after a space
                    if not first and not segment[:end].endswith(b" "):
                        raise WireError("a literal right after a value, without a space")
                    if segment[:end].endswith(b"  ") or (first and segment[:end].endswith(b"( ")):
                        raise WireError("two spaces, or a space after '(', before a literal")
                    current.append(self.literals[index])
                    first = False
                    index += 1
                    segment, pos = self.segments[index], 0
                    end = self.markers[index] if index < last else len(segment)
                    continue
                if len(stack) > 1:
                    raise WireError("a list without its closing ')'")
                return stack[0]
            match = token(segment, pos, end)
            if match is None:
                if len(stack) == 1 and index == last and not segment[pos:].strip(b" "):
                    return stack[0]  # trailing spaces
                if segment.startswith(b" ", pos) and pos + 1 == end and index < last:
                    pos += 1  # the space before a literal
                    continue
                raise WireError(f"unexpected {segment[pos:pos + 2]!r} where a value should be")
            pos = match.end()
            spaced = match.start("space") != match.end("space")
            if match.group("close") is not None:
                if spaced or len(stack) == 1:
                    raise WireError("a ')' after a space, or without its '('")
                inner = stack.pop()
                current = stack[-1]
                current.append(inner)
                first = False
                continue
            if spaced == first:  # a value needs a space before it, except the first one of a list
                if spaced:
                    raise WireError("a space where no value came before it")
                raise WireError("values not separated by a space")
            if match.group("open") is not None:
                if len(stack) > MAX_NESTING:
                    raise WireError("lists nested too deep")
                current = []
                stack.append(current)
                first = True
                continue
            quoted = match.group("quoted")
            if quoted is not None:
                current.append(_ESCAPE.sub(rb"\1", quoted) if b"\\" in quoted else quoted)
            else:
                word = match.group("atom")
                current.append(None if len(word) == 3 and word.upper() == b"NIL" else Atom(word.decode("ascii")))
            first = False


def number_of(value: Value, what: str, *, maximum: int = MAX_UID, minimum: int = 0) -> int:
    """An atom that is a number within bounds (RFC 3501 number / nz-number), else `WireError`."""
    if not isinstance(value, Atom) or not _NUMBER.fullmatch(value.encode("ascii")):
        raise WireError(f"{what}: not a number")
    number = int(value)
    if not minimum <= number <= maximum:
        raise WireError(f"{what}: {number} out of range")
    return number


def string_of(value: Value, what: str) -> bytes:
    """An astring: an atom, a quoted string or a literal (kept), as bytes."""
    if isinstance(value, Atom):
        return value.encode("ascii")
    if isinstance(value, bytes):
        return value
    raise WireError(f"{what}: not a string")


# --- writing ----------------------------------------------------------------------------------------------------

_QUOTABLE = re.compile(rb"[\x01-\x09\x0b\x0c\x0e-\x7f]*")


def quoted(value: bytes) -> bytes | None:
    """``value`` as a quoted string, or None when it cannot be one (CR, LF, NUL or 8-bit: it needs a literal)."""
    if not _QUOTABLE.fullmatch(value):
        return None
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def astring_or_literal(value: bytes) -> bytes | int:
    """How to send ``value`` as an astring: the quoted form, or the size of the literal it needs. NUL cannot be
    sent at all (it would need literal8): `WireError`."""
    if b"\x00" in value:
        raise WireError("a NUL cannot be sent in a string")
    form = quoted(value)
    return len(value) if form is None else form


def uid_set(uids: Iterable[int]) -> str:
    """A compact UID set ("1:5,7,9:10") of ``uids`` (sorted, duplicates removed); each must be 1..2^32-1."""
    ordered = sorted(set(uids))
    if not ordered:
        raise WireError("an empty UID set")
    if ordered[0] < 1 or ordered[-1] > MAX_UID:
        raise WireError("a UID out of range")
    parts: list[str] = []
    first = last = ordered[0]
    for uid in ordered[1:]:
        if uid == last + 1:
            last = uid
            continue
        parts.append(str(first) if first == last else f"{first}:{last}")
        first = last = uid
    parts.append(str(first) if first == last else f"{first}:{last}")
    return ",".join(parts)


_SET_PIECE = re.compile(r"([0-9]{1,10})(?::([0-9]{1,10}))?")


def parse_uid_set(text: str, max_count: int, *, ordered: bool = False) -> list[int]:
    """The UIDs of a UID set as a server sends it (ESEARCH ``ALL 1:5,7``), ascending -- or with ``ordered`` in the
    order written (COPYUID's sets correspond by position); a malformed set, a UID out of range or more than
    ``max_count`` UIDs raise `WireError` (before any range is expanded)."""
    ranges: list[tuple[int, int]] = []
    total = 0
    for piece in text.split(","):
        match = _SET_PIECE.fullmatch(piece)
        if match is None:
            raise WireError("a malformed UID set")
        low = int(match.group(1))
        high = int(match.group(2) or low)
        low, high = min(low, high), max(low, high)
        if low < 1 or high > MAX_UID:
            raise WireError("a UID out of range in a UID set")
        total += high - low + 1
        if total > max_count:
            raise WireError(f"more than {max_count} UIDs in a UID set")
        ranges.append((low, high))
    if ordered:
        return [uid for low, high in ranges for uid in range(low, high + 1)]
    return sorted({uid for low, high in ranges for uid in range(low, high + 1)})


def uid_sets(uids: Iterable[int], max_length: int = 4000) -> list[str]:
    """`uid_set` of ``uids`` split so that each set is at most about ``max_length`` characters (servers limit the
    length of a command line; Dovecot to 64 KiB)."""
    pieces = uid_set(uids).split(",")
    sets: list[str] = []
    current: list[str] = []
    length = 0
    for piece in pieces:
        if current and length + len(piece) + 1 > max_length:
            sets.append(",".join(current))
            current, length = [], 0
        current.append(piece)
        length += len(piece) + 1
    sets.append(",".join(current))
    return sets


_FLAG = re.compile(r"\\?[!#$&'+\-.0-9:;<=>?@A-Z^_`a-z|~]{1,200}")


def flag_list(flags: Iterable[str]) -> str:
    """``(\\Seen \\Deleted $Label)``; a flag that is not an atom (or ``\\`` and an atom) raises `WireError`."""
    flags = list(flags)
    for flag in flags:
        if not _FLAG.fullmatch(flag):
            raise WireError(f"not a valid IMAP flag: {flag!r}")
    return "(" + " ".join(flags) + ")"


_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def date_time(moment: datetime) -> str:
    """An IMAP date-time (``"07-Dec-2026 02:03:04 +0100"``, quoted) for APPEND's INTERNALDATE; a naive datetime is
    taken as local time."""
    if moment.tzinfo is None:
        moment = moment.astimezone()
    offset = moment.utcoffset()
    minutes = int(offset.total_seconds() // 60) if offset is not None else 0
    sign = "+" if minutes >= 0 else "-"
    hours, mins = divmod(abs(minutes), 60)
    return (f'"{moment.day:02d}-{_MONTHS[moment.month - 1]}-{moment.year:04d} '
            f'{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d} {sign}{hours:02d}{mins:02d}"')


# --- modified UTF-7 (RFC 3501 5.1.3) ------------------------------------------------------------------------------

def encode_mailbox(name: str) -> str:
    """A mailbox name in modified UTF-7: printable ASCII stays (``&`` becomes ``&-``), every other run of
    characters is UTF-16BE in base64 with ``,`` for ``/``, between ``&`` and ``-``."""
    out: list[str] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            try:
                utf16 = "".join(run).encode("utf-16-be")
            except UnicodeEncodeError:
                raise WireError("a mailbox name with a lone surrogate") from None
            out.append("&" + base64.b64encode(utf16).decode("ascii").rstrip("=").replace("/", ",") + "-")
            run.clear()

    for char in name:
        if 0x20 <= ord(char) <= 0x7E:
            flush()
            out.append("&-" if char == "&" else char)
        else:
            run.append(char)
    flush()
    return "".join(out)


_MUTF7 = re.compile(r"&([A-Za-z0-9+,]*)-|([\x20-\x25\x27-\x7e]+)")


def decode_mailbox(name: str | bytes) -> str:
    """The mailbox name a server sent, decoded from modified UTF-7. Only the canonical form is accepted (what
    `encode_mailbox` makes of the result is exactly the input), so a name survives a round trip to the server
    unchanged; anything else raises `WireError`."""
    if isinstance(name, bytes):
        try:
            name = name.decode("ascii")
        except UnicodeDecodeError:
            raise WireError("8-bit characters in a mailbox name") from None
    out: list[str] = []
    pos = 0
    while pos < len(name):
        match = _MUTF7.match(name, pos)
        if match is None:
            raise WireError("not modified UTF-7")
        if match.group(2) is not None:
            out.append(match.group(2))
        elif match.group(1) == "":
            out.append("&")
        else:
            encoded = match.group(1).replace(",", "/")
            try:
                utf16 = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
                out.append(utf16.decode("utf-16-be"))
            except (binascii.Error, UnicodeDecodeError, ValueError):
                raise WireError("bad base64 or UTF-16 in a modified UTF-7 mailbox name") from None
        pos = match.end()
    decoded = "".join(out)
    if encode_mailbox(decoded) != name:
        raise WireError("a mailbox name not in canonical modified UTF-7")
    return decoded
