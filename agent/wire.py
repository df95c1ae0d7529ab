"""Line-ending and dot-stuffing codecs for the two wires and the disk.

A message is kept as the POP3 server sent it (after undoing its dot-stuffing). On the way out only the line-ending
convention of the destination is applied: CRLF everywhere on the SMTP/LMTP wire (a bare CR or LF is never sent as
such) with dot-stuffing, LF on disk. Both encoders work on chunks of any size and split anywhere, so a message can
be streamed without holding it whole.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

CRLF = b"\r\n"


class CRLFEncoder:
    """Turns message bytes into CRLF lines, the SMTP wire's form (RFC 5321 2.3.8): a bare CR or LF becomes CRLF,
    and a message not ending in a line break gets one. What BDAT sends (RFC 3030), and what DATA sends stuffed."""

    def __init__(self) -> None:
        self._carry = b""
        self._at_line_start = True

    def encode(self, chunk: bytes) -> bytes:
        data = self._carry + chunk
        if data.endswith(b"\r"):
            # The CR may be the first half of a CRLF split across chunks: decide when the next byte is known.
            self._carry, data = b"\r", data[:-1]
        else:
            self._carry = b""
        if not data:
            return b""
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        data = data.replace(b"\n", CRLF)
        self._at_line_start = data.endswith(CRLF)
        return data

    def finish(self) -> bytes:
        """A pending CR, or a line end if the message lacks a final one."""
        tail = CRLF if self._carry or not self._at_line_start else b""
        self._carry, self._at_line_start = b"", True
        return tail


class SMTPDataEncoder(CRLFEncoder):
    """Turns message bytes into the DATA payload of RFC 5321 section 4.5.2, including the final ``.`` line."""

    def encode(self, chunk: bytes) -> bytes:
        at_line_start = self._at_line_start
        data = super().encode(chunk)
        if not data:
            return b""
        data = data.replace(b"\r\n.", b"\r\n..")
        if at_line_start and data.startswith(b"."):
            data = b"." + data
        return data

    def finish(self) -> bytes:
        """The rest of the payload and ``.CRLF``."""
        return super().finish() + b"." + CRLF


def crlf_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    return _encoded(CRLFEncoder(), chunks)


def smtp_data(chunks: Iterable[bytes]) -> Iterator[bytes]:
    return _encoded(SMTPDataEncoder(), chunks)


class LFEncoder:
    """CRLF to LF for files on disk (Maildir, mbox); a bare CR is data and stays."""

    def __init__(self) -> None:
        self._carry = b""

    def encode(self, chunk: bytes) -> bytes:
        data = self._carry + chunk
        if data.endswith(b"\r"):
            self._carry, data = b"\r", data[:-1]
        else:
            self._carry = b""
        return data.replace(CRLF, b"\n")

    def finish(self) -> bytes:
        tail, self._carry = self._carry, b""
        return tail


def lf_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    return _encoded(LFEncoder(), chunks)


class _Encoder(Protocol):
    def encode(self, chunk: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


def _encoded(encoder: _Encoder, chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The non-empty pieces ``encoder`` makes of ``chunks``, then what it holds back for the end."""
    for chunk in chunks:
        if encoded := encoder.encode(chunk):
            yield encoded
    if tail := encoder.finish():
        yield tail


class LengthChanged(Exception):
    """A message's bytes were not as many as announced before they were sent (an IMAP literal, an HTTP body): the
    other side would take message bytes for commands, or wait for bytes that never come."""


def checked_length(chunks: Iterable[bytes], length: int) -> Iterator[bytes]:
    """``chunks``, checked against the announced ``length``: `LengthChanged` as soon as they run past it, or at the
    end when they fall short. A caller ends the session on it, since the stream is out of step."""
    sent = 0
    for chunk in chunks:
        sent += len(chunk)
        if sent > length:
            raise LengthChanged(f"the message grew past the {length} octets announced")
        yield chunk
    if sent != length:
        raise LengthChanged(f"the message had {sent} octets, not the {length} announced")
