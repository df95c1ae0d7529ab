"""The digest that tells whether a listed message is the one delivered before under its UID (issue 11 item 3).

It is taken once over the start of a retrieved message and later over a ``TOP n 0`` reply, so it must not depend
on what differs between the two: carriage returns (a server may send LF or CRLF, a destination may store either),
and the empty line that ends the header block (``TOP n 0`` sends it; a message without a body has none).
"""

from __future__ import annotations

import hashlib


def header_block(data: bytes) -> bytes:
    """The header lines of a message, from the whole message, any start of it that holds the header block, or a
    ``TOP n 0`` reply alike: carriage returns left out, and so is everything from the line end before the empty
    line that ends the header block (the whole data when it has none, less its trailing line ends)."""
    text = data.replace(b"\r", b"")
    if text.startswith(b"\n"):
        return b""  # the first line is empty: no header fields at all
    end = text.find(b"\n\n")
    return text[:end] if end != -1 else text.rstrip(b"\n")


def header_block_digest(data: bytes) -> str:
    """SHA-256 (hex) of `header_block` of ``data``."""
    return hashlib.sha256(header_block(data)).hexdigest()
