"""Model messages: unusual but legal bytes, each message identifiable in any destination's copy.

Every message carries its number in a fixed-width header, so a message reusing a deleted one's UID can have exactly
the same size with different bytes. A copy found in a destination is compared with the originals after undoing what
postbote and the destination legitimately change: the ``Received:`` field postbote prepends and the line endings.
"""

from __future__ import annotations

import re

from postbote.testing.pop3server import crlf_normalised

ID_WIDTH = 6
_ID = re.compile(rb"^X-Model-Id: (\d{%d})\r?$" % ID_WIDTH, re.MULTILINE)
_FIRST_RECEIVED = re.compile(rb"\AReceived:[^\n]*\n(?:[ \t][^\n]*\n)*")

# Pieces a body is built from: each is a hazard for a POP3 client, an encoder or a destination.
BODY_PIECES: dict[str, bytes] = {
    "text": b"plain text line\r\n",
    "dot line": b".\r\n",
    "two dots": b"..\r\n",
    "dot text": b".hidden\r\n",
    "bare LF dot": b"x\n.\nafter\r\n",
    "bare LF": b"one\ntwo\r\n",
    "bare CR": b"carriage\rreturn\r\n",
    "NUL": b"nul\x00byte\r\n",
    "8-bit": "Grüße, déjà vu\r\n".encode() + b"\xff\xfe raw\r\n",
    "From line": b"From someone else\r\n",
    "quoted From": b">From quoted\r\n",
    "long line": b"L" * 1500 + b"\r\n",
    "empty line": b"\r\n",
    "CR CR LF": b"odd\r\r\n",
}


def model_message(ident: int, pieces: tuple[str, ...]) -> bytes:
    """Message number ``ident``: a fixed-size header block and a body of the named pieces, ending in CRLF.

    Its Message-ID is shared by a group of three messages (a copy sent to two addresses has one too), and every
    fourth message has none: an IMAP destination that looks for a message whose APPEND went unanswered must tell
    such messages apart by more than the Message-ID (or not look at all), or a message is lost."""
    field = "X-Model-Nn" if ident % 4 == 0 else "Message-ID"  # as long, so that the header block's size is fixed
    message_id = f"{field}: <m{ident // 3:0{ID_WIDTH}d}@model.test>\r\n"
    head = (f"{message_id}Subject: model message\r\n"
            f"X-Model-Id: {ident:0{ID_WIDTH}d}\r\n\r\n").encode()
    return head + b"".join(BODY_PIECES[name] for name in pieces) + b"end\r\n"


def on_the_wire(data: bytes, *, raw_line_endings: bool) -> bytes:
    """The message as the server sends it in RETR (without stuffing): Dovecot-like servers send CRLF lines."""
    return data if raw_line_endings else crlf_normalised(data)


def canonical(data: bytes) -> bytes:
    """What must survive delivery: the bytes without postbote's ``Received:`` field, each run of line-end bytes
    (CR, LF) as one LF.

    Destinations legitimately differ in what they make of a CR that does not end a line (illegal in a message): a
    Maildir drops the CR of ``odd\\r\\r\\n``, SMTP sends it as a line break. Every other byte must arrive as sent."""
    unfolded = _FIRST_RECEIVED.sub(b"", re.sub(rb"\r*\n", b"\n", data), count=1)
    return re.sub(rb"[\r\n]+", b"\n", unfolded)


def ident_of(data: bytes) -> int | None:
    match = _ID.search(data)
    return int(match.group(1)) if match else None
