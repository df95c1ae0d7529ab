"""The message object: header edits touch only the header block; the body passes through untouched (issue #2)."""

from __future__ import annotations

import io

from postbote.message import SPOOL_THRESHOLD, Message

RAW = (b"Return-Path: <list-bounces@example.org>\r\nSubject: Hello\r\nX-Long: a\r\n folded\r\n"
       b"Message-ID: <m1@example.org>\r\n\r\nbody line\r\n.\r\nSubject: not a header\r\n")


def test_headers_are_read_from_the_header_block_only() -> None:
    message = Message.from_bytes(RAW)
    assert message.get_header("subject") == "Hello"
    assert message.message_id == "<m1@example.org>"
    assert message.return_path == "list-bounces@example.org"
    assert message.headers.get_all("Subject") == ["Hello"]


def test_prepending_a_field_leaves_every_other_byte_as_it_was() -> None:
    message = Message.from_bytes(RAW)
    message.prepend_header("Received", "from a\n\tby b; date")
    assert message.as_bytes() == b"Received: from a\r\n\tby b; date\r\n" + RAW


def test_eight_bit_header_values_are_read_without_replacement_characters() -> None:
    message = Message.from_bytes(b"Subject: caf\xe9 \xc3\xa0\r\nX-Utf8: gr\xc3\xbc\xc3\x9fe\r\n\r\n")
    assert message.get_header("Subject") == "caf\xe9 \xc3\xa0"  # not UTF-8: read as Latin-1, byte for byte
    assert message.get_header("X-Utf8") == "grüße"


def test_removing_and_replacing_fields_keeps_the_body_and_the_field_order() -> None:
    message = Message.from_bytes(RAW)
    assert message.remove_header("x-long") == 1
    message.replace_header("Subject", "[list] Hello")
    data = message.as_bytes()
    assert b"X-Long" not in data and b"folded" not in data
    assert data == (b"Return-Path: <list-bounces@example.org>\r\nSubject: [list] Hello\r\n"
                    b"Message-ID: <m1@example.org>\r\n\r\nbody line\r\n.\r\nSubject: not a header\r\n")
    assert message.get_header("Subject") == "[list] Hello"


def test_a_message_without_a_blank_line_is_all_header_and_passes_through() -> None:
    message = Message.from_bytes(b"Subject: only headers\r\nX: y")
    assert message.as_bytes() == b"Subject: only headers\r\nX: y"
    message.add_header("X-Tag", "1")
    assert message.as_bytes() == b"Subject: only headers\r\nX: y\r\nX-Tag: 1\r\n"


def test_an_empty_message_and_a_message_starting_with_a_blank_line() -> None:
    assert Message.from_bytes(b"").as_bytes() == b""
    message = Message.from_bytes(b"\r\nbody")
    message.prepend_header("Received", "x")
    assert message.as_bytes() == b"Received: x\r\n\r\nbody"


def test_bytes_arriving_in_pieces_split_the_header_at_the_first_empty_line() -> None:
    message = Message("u")
    for piece in (b"A: 1\r", b"\n", b"\r", b"\nB: not header\r\n"):
        message.write(piece)
    message.close_writing()
    assert message.header_bytes == b"A: 1\r\n"
    assert message.as_bytes() == b"A: 1\r\n\r\nB: not header\r\n"


def test_large_bodies_are_spooled_to_disk_not_held_in_memory() -> None:
    message = Message("big")
    message.write(b"Subject: big\r\n\r\n")
    line = b"x" * 998 + b"\r\n"
    for _ in range(2 * SPOOL_THRESHOLD // len(line)):
        message.write(line)
    message.close_writing()
    assert not isinstance(message._body, io.BytesIO), "the body went to a temporary file"
    assert message.size == len(b"Subject: big\r\n\r\n") + len(line) * (2 * SPOOL_THRESHOLD // len(line))
    assert max(len(chunk) for chunk in message.chunks()) <= 1 << 16


def test_eight_bit_content_is_noticed_for_8bitmime() -> None:
    assert not Message.from_bytes(RAW).eight_bit
    assert Message.from_bytes(b"Subject: Gr\xc3\xbc\xc3\x9fe\r\n\r\n").eight_bit


def test_the_trace_date_is_rfc5322_like_the_standard_library_writes_it() -> None:
    import email.utils
    import time

    from postbote.plugins.received import rfc5322_date

    for moment in (0.0, 1_700_000_000.0, time.time()):
        assert rfc5322_date(moment) == email.utils.formatdate(moment, localtime=True)
