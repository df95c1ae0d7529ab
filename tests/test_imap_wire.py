"""Property tests of the IMAP wire format (issue 13): the response parser and the modified UTF-7 codec.

* Modified UTF-7 (RFC 3501 5.1.3): every name survives encode/decode; the encoding is printable ASCII; decoding
  accepts only the canonical form (so a name read from a server goes back to it unchanged) and raises `WireError`
  for anything else -- never another exception.
* Responses: any value tree (atoms, quoted strings, literals, NIL, nested lists) written out the way a server would
  is parsed back to itself; read through the client's receiver in arbitrary chunks it parses the same; arbitrary
  bytes either parse or raise `WireError`.
* The command-side helpers: quoted strings, UID sets, flag lists.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from postbote.plugins.imap import wire
from postbote.plugins.imap.client import IMAPClient, IMAPConnectionError, IMAPProtocolError
from postbote.plugins.imap.wire import Atom, Response, Streamed, WireError

settings.register_profile("imap-wire", max_examples=300, deadline=None, derandomize=bool(os.environ.get("CI")),
                          print_blob=True)
PROFILE = settings.get_profile("imap-wire")


# --- modified UTF-7 -------------------------------------------------------------------------------------------------

@PROFILE
@given(st.text())
@example("&")
@example("Entwürfe")
@example("日本語 & more/Sub")
@example("\U0001f600 emoji")
def test_mailbox_names_survive_a_round_trip(name: str) -> None:
    encoded = wire.encode_mailbox(name)
    assert all(0x20 <= ord(char) <= 0x7E for char in encoded)
    assert wire.decode_mailbox(encoded) == name
    assert wire.decode_mailbox(encoded.encode("ascii")) == name


@pytest.mark.parametrize("encoded, name", [
    ("INBOX", "INBOX"), ("&-", "&"), ("Entw&APw-rfe", "Entwürfe"), ("&ZeVnLIqe-", "日本語"),
    ("~peter/mail/&U,BTFw-/&ZeVnLIqe-", "~peter/mail/台北/日本語"),
])
def test_mailbox_names_as_rfc_3501_spells_them(encoded: str, name: str) -> None:
    assert wire.decode_mailbox(encoded) == name and wire.encode_mailbox(name) == encoded


@pytest.mark.parametrize("bad", ["&", "&Jjo", "&Jjo!-", "&AGE-", "&2D0-", "a\x7fb", "é", "&U,BTFw-&ZeVnLIqe-",
                                 "&Jjo=-"])
def test_non_canonical_or_broken_modified_utf7_is_refused(bad: str) -> None:
    with pytest.raises(WireError):
        wire.decode_mailbox(bad)


@PROFILE
@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30) | st.binary(max_size=30))
@example("&AGEAYgBj-")  # "abc" in base64: printable ASCII must not be encoded
@example(b"\xff")
def test_decoding_any_input_gives_a_canonical_name_or_wire_error(data: str | bytes) -> None:
    try:
        name = wire.decode_mailbox(data)
    except WireError:
        return
    assert wire.encode_mailbox(name) == (data.decode("ascii") if isinstance(data, bytes) else data)


# --- values written as a server writes them -------------------------------------------------------------------------

ATOM_CHARS = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '(){"[]%*\\')
atoms = st.text(alphabet=ATOM_CHARS, min_size=1, max_size=12).filter(lambda a: a.upper() != "NIL").map(Atom)
flags = st.text(alphabet=ATOM_CHARS, min_size=1, max_size=8).filter(lambda a: a.upper() != "NIL").map(
    lambda a: Atom("\\" + a))
strings = st.binary(max_size=40)
values: st.SearchStrategy[Any] = st.recursive(
    atoms | flags | strings | st.none(),
    lambda inner: st.lists(inner, max_size=5),
    max_leaves=25,
)


class Written:
    """A response as segments and literals, the way `parse_response` takes it, and as bytes on the wire."""

    def __init__(self, head: bytes) -> None:
        self.segments: list[bytes] = [head]
        self.literals: list[bytes] = []

    def text(self, data: bytes) -> None:
        self.segments[-1] += data

    def literal(self, data: bytes) -> None:
        self.segments[-1] += b"{%d}" % len(data)
        self.literals.append(data)
        self.segments.append(b"")

    def value(self, value: Any, rng: random.Random) -> None:
        if value is None:
            self.text(rng.choice([b"NIL", b"nil", b"Nil"]))
        elif isinstance(value, Atom):
            self.text(value.encode("ascii"))
        elif isinstance(value, bytes):
            form = wire.quoted(value)
            if form is not None and rng.random() < 0.6:
                self.text(form)
            else:
                self.literal(value)
        else:
            self.text(b"(")
            for index, item in enumerate(value):
                if index:
                    self.text(b" ")
                self.value(item, rng)
            self.text(b")")

    def wire_bytes(self) -> bytes:
        out = b""
        for index, segment in enumerate(self.segments):
            out += segment + b"\r\n"
            if index < len(self.literals):
                out += self.literals[index]
        return out


def written(items: list[Any], seed: int, head: bytes = b"* 7 FETCH ") -> Written:
    rng = random.Random(seed)
    response = Written(head)
    response.value(items, rng)
    return response


@PROFILE
@given(st.lists(values, max_size=6), st.integers(0, 2**32))
def test_a_written_response_parses_back_to_its_values(items: list[Any], seed: int) -> None:
    response = written(items, seed)
    parsed = wire.parse_response(response.segments, response.literals)
    assert (parsed.tag, parsed.kind, parsed.number) == ("*", "FETCH", 7)
    assert parsed.values == [items]


class ChunkedSocket:
    """A socket that hands out ``data`` in the chunk sizes ``sizes`` (cycled), then the end of the stream."""

    def __init__(self, data: bytes, sizes: list[int]) -> None:
        self.data = data
        self.sizes = sizes or [len(data) or 1]
        self.index = 0
        self.timeout: float | None = None

    def recv(self, size: int) -> bytes:
        count = min(size, self.sizes[self.index % len(self.sizes)])
        self.index += 1
        chunk, self.data = self.data[:count], self.data[count:]
        return chunk

    def gettimeout(self) -> float | None:
        return self.timeout

    def settimeout(self, value: float | None) -> None:
        self.timeout = value

    def sendall(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass

    def fileno(self) -> int:
        return -1


def read_responses(data: bytes, sizes: list[int], count: int) -> list[Response]:
    """``count`` responses read by the client's own framing (`IMAPClient._read_response`) from ``data`` arriving in
    chunks of ``sizes``."""
    client = IMAPClient(ChunkedSocket(data, sizes), host="test", timeout=5.0)  # type: ignore[arg-type]
    return [client._read_response() for _ in range(count)]


@PROFILE
@given(st.lists(st.lists(values, max_size=4), min_size=1, max_size=4), st.lists(st.integers(1, 50), max_size=8),
       st.integers(0, 2**32))
def test_any_chunking_of_the_input_gives_the_same_parse(responses: list[list[Any]], sizes: list[int],
                                                         seed: int) -> None:
    writtens = [written(items, seed + index, head=b"* %d FETCH " % (index + 1))
                for index, items in enumerate(responses)]
    data = b"".join(w.wire_bytes() for w in writtens) + b"A0001 OK [APPENDUID 3 4] done\r\n"
    whole = read_responses(data, [], len(writtens) + 1)
    chunked = read_responses(data, sizes, len(writtens) + 1)
    assert whole == chunked
    assert [response.values for response in whole[:-1]] == [[items] for items in responses]
    assert (whole[-1].tag, whole[-1].kind, whole[-1].code, whole[-1].code_args, whole[-1].text) == (
        "A0001", "OK", "APPENDUID", "3 4", "done")


@PROFILE
@given(st.lists(st.binary(max_size=60), min_size=1, max_size=3), st.lists(st.binary(max_size=10), max_size=2))
@example([b"* 1 FETCH (BODY[] {3}", b")"], [b"abc"])
@example([b"* 1 FETCH (((((((((((((((((((((((((((((((((((((((((((((((((((((("], [])
@example([b"* OK [CODE"], [])
@example([b'* 1 FETCH ("a\\'], [])
def test_arbitrary_bytes_parse_or_raise_wire_error(segments: list[bytes], literals: list[bytes]) -> None:
    literals = literals[:len(segments) - 1]
    segments = [segment.replace(b"\r", b"").replace(b"\n", b"") for segment in segments]
    segments = [s + b"{%d}" % len(literals[i]) if i < len(literals) else s for i, s in enumerate(segments)]
    with contextlib.suppress(WireError):
        wire.parse_response(segments, literals)
    for segment in segments:
        with contextlib.suppress(WireError):
            wire.head_of(segment)
        with contextlib.suppress(WireError):
            wire.literal_marker(segment)


@PROFILE
@given(st.binary(max_size=300), st.lists(st.integers(1, 20), max_size=5))
@example(b"* 1 FETCH (BODY[] {99999999999999999999999}\r\n", [])
@example(b"+\r\n* OK\r\n", [])
@example(b"* 1 FETCH (UID 1 BODY[] {3}\r\nab", [])
def test_the_client_framing_of_arbitrary_bytes_raises_only_its_own_errors(data: bytes, sizes: list[int]) -> None:
    """Whatever arrives, the client's reader returns responses or raises IMAPConnectionError (the stream ended) /
    IMAPProtocolError: never another exception."""
    client = IMAPClient(ChunkedSocket(data, sizes), host="test", timeout=5.0)  # type: ignore[arg-type]
    with pytest.raises(IMAPConnectionError):
        for _ in range(100):
            client._read_response()


def test_status_responses_and_continuations() -> None:
    ok = wire.parse_response([b"A0001 OK [CAPABILITY IMAP4rev1 LITERAL+] Logged in {5}"])
    assert (ok.tag, ok.kind, ok.code, ok.code_args, ok.text) == ("A0001", "OK", "CAPABILITY", "IMAP4rev1 LITERAL+",
                                                                 "Logged in {5}")
    assert not wire.takes_literals("OK") and wire.literal_marker(b"Logged in {5}") == 5
    no = wire.parse_response([b"a1 no [trycreate] Mailbox doesn't exist"])
    assert (no.kind, no.code) == ("NO", "TRYCREATE")
    plus = wire.parse_response([b"+ aGVsbG8="])
    assert (plus.tag, plus.kind, plus.text) == ("+", "+", "aGVsbG8=")
    bare = wire.parse_response([b"+"])
    assert (bare.kind, bare.text) == ("+", "")
    exists = wire.parse_response([b"* 23 EXISTS"])
    assert (exists.kind, exists.number, exists.values) == ("EXISTS", 23, [])
    listed = wire.parse_response([b'* LIST (\\HasNoChildren \\Trash) "/" {5}', b""], [b"Trash"])
    assert listed.values == [[Atom("\\HasNoChildren"), Atom("\\Trash")], b"/", b"Trash"]
    fetch = wire.parse_response([b"* 1 FETCH (UID 5 BODY[]<0> {3}", b" BODY[HEADER.FIELDS (SUBJECT)] NIL)"],
                                [Streamed(3)])
    assert fetch.values == [[Atom("UID"), Atom("5"), Atom("BODY[]<0>"), Streamed(3),
                             Atom("BODY[HEADER.FIELDS (SUBJECT)]"), None]]


@pytest.mark.parametrize("line", [b"", b"A1", b"A1 FETCH (x)", b"* 1 OK hi", b"(x) OK", b"A1 OK [", b"* 1",
                                  b"A\x80 OK", b"+x", b"* 1 FETCH (a", b"* 1 FETCH a)", b"* 1 FETCH \"x",
                                  b"* 1 FETCH [x]", b"* 1 FETCH (\"a\\x\")", b"* 1 FETCH {x}", b"* 1 FETCH ( )x"])
def test_malformed_responses_raise_wire_error(line: bytes) -> None:
    with pytest.raises(WireError):
        wire.parse_response([line])


# --- the command side -------------------------------------------------------------------------------------------

@PROFILE
@given(st.binary(max_size=50))
def test_quoted_strings_read_back_as_sent(value: bytes) -> None:
    form = wire.quoted(value)
    if form is None:
        assert re.search(rb"[\r\n\x00\x80-\xff]", value)
        return
    parsed = wire.parse_response([b"* X " + form])
    assert parsed.values == [value]


@PROFILE
@given(st.sets(st.integers(1, 2**32 - 1), min_size=1, max_size=200) | st.sets(st.integers(1, 3000), min_size=1,
                                                                               max_size=2000),
       st.integers(10, 200))
def test_uid_sets_cover_exactly_the_uids(uids: set[int], max_length: int) -> None:
    def expand(text: str) -> set[int]:
        found: set[int] = set()
        for piece in text.split(","):
            low, _, high = piece.partition(":")
            found.update(range(int(low), int(high or low) + 1))
        return found

    assert expand(wire.uid_set(uids)) == uids
    assert wire.parse_uid_set(wire.uid_set(uids), len(uids)) == sorted(uids)
    parts = wire.uid_sets(uids, max_length)
    assert set().union(*(expand(part) for part in parts)) == uids
    assert all(len(part) <= max_length or "," not in part for part in parts)


@pytest.mark.parametrize("bad", [[0], [2**32], []])
def test_uid_sets_refuse_what_is_not_a_uid(bad: list[int]) -> None:
    with pytest.raises(WireError):
        wire.uid_set(bad)


@pytest.mark.parametrize("bad", ["", "1:", ":2", "0", "1:4294967296", "1,,2", "*", "1:*", "a", "1:3000000"])
def test_server_uid_sets_are_checked_before_they_are_expanded(bad: str) -> None:
    with pytest.raises(WireError):
        wire.parse_uid_set(bad, 2_000_000)
    assert wire.parse_uid_set("5:3,9,4", 10) == [3, 4, 5, 9]


def test_flag_lists_and_dates() -> None:
    from datetime import datetime, timedelta, timezone

    assert wire.flag_list(["\\Seen", "$Label1"]) == "(\\Seen $Label1)"
    for bad in ["\\", "a b", "(x)", "", "\\Seen\r\n"]:
        with pytest.raises(WireError):
            wire.flag_list([bad])
    moment = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=-5, minutes=-30)))
    assert wire.date_time(moment) == '"02-Jan-2026 03:04:05 -0530"'


def test_protocol_errors_from_the_client_framing() -> None:
    client = IMAPClient(ChunkedSocket(b"* 1 FETCH (BODY[] {3}\r\nabc)\r\nA0001 BOGUS\r\n", []), host="t",
                        timeout=1.0)  # type: ignore[arg-type]
    client._read_response()
    with pytest.raises(IMAPProtocolError):
        client._read_response()
