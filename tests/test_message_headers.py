"""The header API of `postbote.message.Message` that filters (ours and third-party ones) call.

Two promises, checked with hypothesis:

* On any bytes at all, every header call returns within a bounded time and raises nothing but its documented
  errors (``ValueError`` for a field name or value that cannot be written).
* On a well-formed header block, it agrees with the standard library's parser
  (``email.parser.BytesHeaderParser(policy=email.policy.compat32)``). "Agrees" means, precisely:

  - ``get_header(name)`` is ``None`` exactly when the stdlib finds no field of that name (any case); otherwise it is
    the stdlib's raw value of the *first* such field (``raw_items()``, turned back into the received bytes), with
    every line break that precedes a continuation line removed (unfolding, RFC 5322 2.2.3), surrounding ASCII
    whitespace stripped, and decoded as UTF-8 when that is valid, else as Latin-1.
  - ``remove_header(name)`` returns how many fields the stdlib lists under that name; afterwards the stdlib finds
    none, and every other field is still there, in order, with the same raw value.
  - after ``replace_header(name, value)`` the stdlib finds exactly one such field, with that value, where the
    first one stood; after ``add_header``/``prepend_header`` it finds the new field last/first.

"Well-formed" here: fields ``name: value`` with names of printable ASCII without a colon, values of any bytes but
CR and LF (so 8-bit values included), continuation lines starting with a space or tab, CRLF or LF line ends, an
empty line, a body.
"""

from __future__ import annotations

import email.parser
import email.policy
import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from postbote.message import Message

from tests.servers import interrupt_after

CALL_LIMIT = 10.0  # seconds for one call on a few kB: generous, only a hang can exceed it
NAME_POOL = ["Message-ID", "Message-IDs", "X-Message-ID", "Subject", "Return-Path", "Return-Paths", "From", "To",
             "Received", "message-id"]
FIELD_NAME_CHARS = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != ":")
VALUE_BYTES = [b for b in range(256) if b not in (0x0A, 0x0D)]


# --- the reported hang ---


def test_get_header_skips_a_first_field_whose_name_only_starts_with_the_wanted_one() -> None:
    message = Message.from_bytes(b"Message-IDs: x\r\n\r\nbody\r\n")
    with interrupt_after(CALL_LIMIT, "get_header"):
        assert message.get_header("Message-ID") is None
        assert message.message_id is None


def test_get_header_finds_the_field_after_one_whose_name_only_starts_with_it() -> None:
    message = Message.from_bytes(b"Message-IDs: x\r\nSubject: s\r\nmessage-id: <a@b>\r\n\r\nbody\r\n")
    with interrupt_after(CALL_LIMIT, "get_header"):
        assert message.get_header("Message-ID") == "<a@b>"


def test_get_header_of_a_name_that_no_field_can_have_is_the_default() -> None:
    message = Message.from_bytes(b"?: question\r\nA b: c\r\n\r\nbody")
    assert message.get_header("Ä", "none") == "none"
    assert message.get_header("A b") is None
    assert message.get_header("") is None


# --- any bytes: every call ends, and only documented errors ---

header_ish = st.lists(st.sampled_from([b"Message-ID", b"Message-IDs", b"message-id", b"Return-Path", b":", b" ",
                                       b"\t", b"\r\n", b"\n", b"\r", b"x", b"<a@b>", b"\xc3\xa9", b"\xff", b""]),
                      max_size=60).map(b"".join)
any_bytes = st.one_of(st.binary(max_size=3000), header_ish)
any_name = st.one_of(st.sampled_from(NAME_POOL), st.text(max_size=12))


@dataclass
class Outcome:
    value: object = None
    error: BaseException | None = None


def attempt(call: Callable[[], object]) -> Outcome:
    with interrupt_after(CALL_LIMIT, "a header call"):
        try:
            return Outcome(value=call())
        except ValueError as exc:  # the documented error: a field name or value that cannot be written
            return Outcome(error=exc)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=any_bytes, name=any_name, value=st.text(max_size=40))
def test_every_header_call_on_any_bytes_returns(data: bytes, name: str, value: str) -> None:
    message = Message.from_bytes(data)
    body = data[len(message.header_bytes):]
    for read in (lambda: message.get_header(name), lambda: message.message_id, lambda: message.return_path,
                 lambda: message.headers.get_all(name)):
        result = attempt(read)
        assert result.error is None
    assert attempt(lambda: message.remove_header(name)).error is None
    for edit in (message.replace_header, message.add_header, message.prepend_header):
        result = attempt(lambda edit=edit: edit(name, value))  # type: ignore[misc]
        if result.error is not None:
            assert "invalid header field name" in str(result.error)
        assert attempt(lambda: message.get_header(name)).error is None
    assert message.as_bytes().endswith(body)


# --- well-formed blocks: agreement with the stdlib parser ---

field_names = st.one_of(st.sampled_from(NAME_POOL), st.text(FIELD_NAME_CHARS, min_size=1, max_size=12))
value_lines = st.lists(st.binary(max_size=30).map(lambda b: bytes(c for c in b if c in VALUE_BYTES)),
                       min_size=1, max_size=3)


@st.composite
def header_blocks(draw: st.DrawFn) -> tuple[bytes, list[str]]:
    """A well-formed message (header block, empty line, body) and the field names used in it."""
    newline = draw(st.sampled_from([b"\r\n", b"\n"]))
    names = draw(st.lists(field_names, min_size=1, max_size=8))
    block = b""
    for name in names:
        first, *continuations = draw(value_lines)
        block += name.encode() + b":" + draw(st.sampled_from([b" ", b"", b"\t"])) + first + newline
        for line in continuations:
            block += draw(st.sampled_from([b" ", b"\t"])) + line + newline
    return block + newline + b"body" + newline, names


def stdlib_fields(data: bytes) -> list[tuple[str, bytes]]:
    """Each field's name and raw value as the stdlib parser reads it, value turned back into the received bytes."""
    parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(data)
    return [(name, value.encode("ascii", "surrogateescape")) for name, value in parsed.raw_items()]


def as_get_header_returns(raw: bytes) -> str:
    unfolded = re.sub(rb"\r?\n(?=[ \t])", b"", raw).strip()
    try:
        return unfolded.decode("utf-8")
    except UnicodeDecodeError:
        return unfolded.decode("latin-1")


def queried_names(names: list[str]) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(names), st.sampled_from(names).map(str.swapcase), st.sampled_from(NAME_POOL))


@settings(max_examples=300, deadline=None)
@given(block=header_blocks(), data=st.data())
def test_get_header_agrees_with_the_stdlib_parser(block: tuple[bytes, list[str]], data: st.DataObject) -> None:
    raw_message, names = block
    name = data.draw(queried_names(names))
    fields = stdlib_fields(raw_message)
    expected = next((as_get_header_returns(v) for n, v in fields if n.lower() == name.lower()), None)
    message = Message.from_bytes(raw_message)
    with interrupt_after(CALL_LIMIT, "get_header"):
        assert message.get_header(name) == expected


@settings(max_examples=200, deadline=None)
@given(block=header_blocks(), data=st.data())
def test_remove_header_removes_what_the_stdlib_parser_sees_and_nothing_else(
        block: tuple[bytes, list[str]], data: st.DataObject) -> None:
    raw_message, names = block
    name = data.draw(queried_names(names))
    before = stdlib_fields(raw_message)
    message = Message.from_bytes(raw_message)
    removed = message.remove_header(name)
    assert removed == sum(1 for n, _ in before if n.lower() == name.lower())
    assert stdlib_fields(message.as_bytes()) == [(n, v) for n, v in before if n.lower() != name.lower()]


@settings(max_examples=200, deadline=None)
@given(block=header_blocks(), data=st.data(),
       value=st.text(st.characters(blacklist_categories=["Cs", "Cc"]), max_size=30).map(str.strip))
def test_header_edits_are_read_back_by_the_stdlib_parser(block: tuple[bytes, list[str]], data: st.DataObject,
                                                        value: str) -> None:
    raw_message, names = block
    name = data.draw(queried_names(names))
    before = stdlib_fields(raw_message)
    first_index = next((i for i, (n, _) in enumerate(before) if n.lower() == name.lower()), len(before))

    replaced = Message.from_bytes(raw_message)
    replaced.replace_header(name, value)
    after = stdlib_fields(replaced.as_bytes())
    matching = [(i, v) for i, (n, v) in enumerate(after) if n.lower() == name.lower()]
    assert [(i, as_get_header_returns(v)) for i, v in matching] == [(first_index, value)]
    assert replaced.get_header(name) == value

    added = Message.from_bytes(raw_message)
    added.add_header("X-Added", value)
    added.prepend_header("X-Prepended", value)
    after = stdlib_fields(added.as_bytes())
    assert after[0][0] == "X-Prepended" and after[-1][0] == "X-Added"
    assert after[1:-1] == before
    assert as_get_header_returns(after[-1][1]) == value


@pytest.mark.parametrize("name", ["Message-ID", "Subject"])
def test_a_header_block_of_many_near_miss_fields_is_searched_in_linear_time(name: str) -> None:
    """Near misses (``Message-IDs``, ``Subjects``) on every line: each is passed over once."""
    block = b"".join(name.encode() + b"s: x\r\n" for _ in range(50_000))
    message = Message.from_bytes(block + name.encode() + b": found\r\n\r\nbody")
    with interrupt_after(CALL_LIMIT, "get_header over 50,000 near misses"):
        assert message.get_header(name) == "found"


def test_received_names_the_host_name_where_the_fqdn_resolves_to_localhost(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from postbote.plugins import received

    monkeypatch.setattr(socket, "getfqdn", lambda: "localhost.localdomain")
    monkeypatch.setattr(socket, "gethostname", lambda: "mailhost")
    received.local_hostname.cache_clear()
    try:
        assert received.local_hostname() == "mailhost"
        monkeypatch.setattr(socket, "gethostname", lambda: "localhost")
        received.local_hostname.cache_clear()
        assert received.local_hostname() == "localhost"  # nothing better is known
    finally:
        received.local_hostname.cache_clear()
