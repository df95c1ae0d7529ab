"""Codecs: dot-stuffing and line endings round-trip for any bytes, however a message is split (issues #2, #5)."""

from __future__ import annotations

import re
import socket
import threading

from hypothesis import given, settings
from hypothesis import strategies as st
from postbote.message import Message
from postbote.plugins.pop3.client import POP3Client
from postbote.wire import LFEncoder, SMTPDataEncoder, crlf_lines, lf_lines, smtp_data

# Messages biased towards the dangerous bytes: dots, CR, LF, NUL and 8-bit.
tricky_bytes = st.lists(st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"\x00", b"\xff", b"a", b"..", b"\r\n.\r\n"]),
                        max_size=60).map(b"".join) | st.binary(max_size=300)


def crlf(data: bytes) -> bytes:
    return re.sub(rb"\r\n|\r|\n", b"\r\n", data)


def smtp_unstuff(payload: bytes) -> bytes:
    """What a receiving MTA does with DATA (RFC 5321 4.5.2): strip the terminator and one leading dot per line."""
    assert payload.endswith(b"\r\n.\r\n") or payload == b".\r\n"
    body = payload[:-3]
    lines = body.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@given(tricky_bytes, st.lists(st.integers(min_value=0, max_value=400), max_size=8))
def test_smtp_payload_never_holds_a_bare_cr_or_lf_and_unstuffs_to_the_message(data: bytes, cuts: list[int]) -> None:
    payload = b"".join(smtp_data(split_at(data, cuts)))
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", payload) is None
    expected = crlf(data)
    if expected and not expected.endswith(b"\r\n"):
        expected += b"\r\n"
    assert smtp_unstuff(payload) == expected


@given(tricky_bytes, st.lists(st.integers(min_value=0, max_value=400), max_size=8))
def test_smtp_encoding_does_not_depend_on_how_the_message_is_split(data: bytes, cuts: list[int]) -> None:
    whole = SMTPDataEncoder()
    expected = whole.encode(data) + whole.finish()
    assert b"".join(smtp_data(split_at(data, cuts))) == expected


@given(tricky_bytes, st.lists(st.integers(min_value=0, max_value=400), max_size=8))
def test_disk_encoding_turns_crlf_into_lf_and_keeps_everything_else(data: bytes, cuts: list[int]) -> None:
    assert b"".join(lf_lines(split_at(data, cuts))) == data.replace(b"\r\n", b"\n")
    encoder = LFEncoder()
    assert encoder.encode(b"a\r") + encoder.encode(b"\nb") + encoder.finish() == b"a\nb"


def test_lines_that_are_only_a_dot_are_stuffed() -> None:
    assert b"".join(smtp_data([b".\r\n..\r\n.x"])) == b"..\r\n...\r\n..x\r\n.\r\n"
    assert b"".join(smtp_data([b""])) == b".\r\n"


def pop3_stuff(data: bytes) -> bytes:
    """How a POP3 server sends a message with CRLF lines: dot-stuffed, terminated."""
    lines = data.split(b"\r\n")
    if lines[-1] == b"":
        lines.pop()
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines) + b".\r\n"


crlf_messages = st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")) |
                         st.sampled_from([b".", b"..", b".x", b"", b"\x00\xff"]), max_size=30).map(
    lambda lines: b"".join(line + b"\r\n" for line in lines))


@settings(max_examples=150, deadline=None)
@given(crlf_messages)
def test_pop3_then_smtp_round_trip_is_byte_exact(data: bytes) -> None:
    """A message read from POP3 and written to SMTP arrives as the server had it, whatever its dots."""
    left, right = socket.socketpair()
    with left, right:
        writer = threading.Thread(target=right.sendall, args=(b"+OK\r\n" + pop3_stuff(data),))
        writer.start()
        client = POP3Client(left, host="test", timeout=5)
        message = Message("1")
        client._expect_ok()
        client._read_data(message.write, None)
        message.close_writing()
        writer.join()
    assert message.as_bytes() == data
    assert smtp_unstuff(b"".join(smtp_data(message.chunks(7)))) == data


def pop3_stuff_lines(data: bytes, newline: bytes) -> bytes:
    """A POP3 data block for ``data`` whose lines end in ``newline`` (some servers send bare LF)."""
    lines = data.split(newline)
    if lines[-1] == b"":
        lines.pop()
    return b"".join((b"." + line if line.startswith(b".") else line) + newline for line in lines) + b"." + newline


def read_one_block(wire: bytes, read_buffer: int) -> tuple[bytes, bytes]:
    """The message the POP3 reader takes from ``wire`` (after a +OK line), and the bytes it leaves unread."""
    left, right = socket.socketpair()
    with left, right:
        right.sendall(wire)
        right.shutdown(socket.SHUT_WR)
        client = POP3Client(left, host="test", timeout=5, read_buffer=read_buffer)
        message = Message("1")
        client._expect_ok()
        received = client._read_data(message.write, None)
        message.close_writing()
        while client._receiver.fill():
            pass
        rest = client._receiver._take(len(client._receiver._data))
    assert received == message.size
    return message.as_bytes(), rest


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")) |
                st.sampled_from([b".", b"..", b"...", b".\r", b"", b"\x00\xff"]), max_size=25),
       st.sampled_from([b"\r\n", b"\n"]), st.integers(min_value=1, max_value=64))
def test_pop3_data_is_unstuffed_exactly_however_the_read_buffer_cuts_it(
        lines: list[bytes], newline: bytes, read_buffer: int) -> None:
    """Bulk reading of whole buffered lines must give what line-by-line reading gave: every cut of the stream
    (mid-line, right before a dot, inside the terminator) ends the message at its own terminator and no later."""
    data = b"".join(line + newline for line in lines)
    next_reply = b"+OK next\r\n.x\r\n"
    message, rest = read_one_block(b"+OK\r\n" + pop3_stuff_lines(data, newline) + next_reply, read_buffer)
    assert message == data
    assert rest == next_reply


@settings(max_examples=200, deadline=None)
@given(tricky_bytes, st.integers(min_value=1, max_value=17))
def test_bdat_data_is_the_message_with_crlf_line_ends_however_it_is_split(data: bytes, size: int) -> None:
    """BDAT (RFC 3030) sends no dot-stuffing and no terminator: the receiver gets the CRLF form of the message as
    DATA would have delivered it, a final line break included."""
    chunks = [data[i:i + size] for i in range(0, len(data), size)]
    sent = b"".join(crlf_lines(chunks))
    assert sent == smtp_unstuff(b"".join(smtp_data([data])))
    assert b"\r" not in sent.replace(b"\r\n", b"") and b"\n" not in sent.replace(b"\r\n", b"")
