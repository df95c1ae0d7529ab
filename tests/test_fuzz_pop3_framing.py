"""A framing fuzzer for the POP3 client, driven through the real poller (issue 11, "How we test from now on").

Each case renders what a well-behaved server would send to postbote's commands (greeting, CAPA, USER and PASS or one
AUTH PLAIN, UIDL, LIST, RETR of each message, DELE of each, QUIT) for a few random messages (dot lines, bare CR and
LF, NUL, 8-bit), applies one or two random byte-level mutations (flip, insert, delete, duplicate a line, truncate, a
stray line, a changed terminator), and plays it to a real `Poller` through a fake socket: each reply is released
only when its command has been sent (as from a real server), in random chunk sizes; a read with nothing left to
release times out at once, so no case can hang.

The property: a ``DELE n`` is only ever sent for message n when the Maildir holds, byte for byte, either message n
as the server had it or exactly what the (mutated) reply to ``RETR n`` carried as one well-formed reply; and QUIT,
which commits the deletions, only then. Anything else means the client took another reply's data for message n.
Then a second poll of the same state from a server that behaves (TOP included) must bring every message not yet in
the Maildir: a message recorded as delivered with another's bytes is found out there by its headers, not skipped and
deleted. (A message may arrive followed by more, when the server broke or dropped its terminator in a way no client
can tell from data: then it arrives as the server had it or as it sent it.)

CI runs ``POSTBOTE_FUZZ_EXAMPLES`` cases (default 300); a soak::

    POSTBOTE_TEST_BACKSTOP=0 POSTBOTE_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest tests/test_fuzz_pop3_framing.py -q
"""

from __future__ import annotations

import os
import random
import re
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import hypothesis
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from postbote.testing import poll_once

EXAMPLES = int(os.environ.get("POSTBOTE_FUZZ_EXAMPLES", "300"))
CRLF = b"\r\n"


# --- the messages and what a good server sends -------------------------------------------------------------

_pieces = st.sampled_from([b".", b"..", b"\r\n", b"\n", b"\r", b"\x00", b"\xff\xfe", b"a", b"text ", b"\r\n.\r\n",
                           b"\n.\n", b"+OK", b"-ERR", b" "])
bodies = st.lists(_pieces, max_size=30).map(b"".join) | st.binary(max_size=80)


def message_of(number: int, body: bytes) -> bytes:
    """A message as the server sends it (ending in CRLF, as RFC 1939 servers make it)."""
    data = b"Subject: fuzz %d\r\nMessage-ID: <fuzz-%d@postbote.test>\r\n\r\n" % (number, number) + body
    return data if data.endswith(CRLF) else data + CRLF


def stuffed(data: bytes) -> bytes:
    """RFC 1939 byte-stuffing of CRLF lines (a bare LF is data) and the terminator."""
    return re.sub(rb"(\A|\r\n)\.", rb"\1..", data) + b".\r\n"


@dataclass
class Segment:
    command: str  # the command whose reply this is ("" for the greeting)
    data: bytes
    message: int | None = None  # for a RETR reply: the message number


def transcript(messages: list[bytes], pipelining: bool, sasl: bool = False,
               uids: list[int] | None = None) -> list[Segment]:
    """``sasl``: the login is one AUTH PLAIN line with its initial response (RFC 5034), in place of USER and PASS.
    ``uids``: the number in each message's UID (``uid-N``), when it is not its place in the list (a later poll)."""
    uids = uids or list(range(1, len(messages) + 1))
    capabilities = ["USER", "UIDL", "TOP", *(["PIPELINING"] if pipelining else []), *(["SASL PLAIN"] if sasl else [])]
    login = [Segment("AUTH", b"+OK logged in\r\n")] if sasl else [Segment("USER", b"+OK\r\n"),
                                                                   Segment("PASS", b"+OK logged in\r\n")]
    segments = [Segment("", b"+OK fuzz server ready\r\n"),
                Segment("CAPA", b"+OK\r\n" + b"".join(c.encode() + CRLF for c in capabilities) + b".\r\n"),
                *login,
                Segment("UIDL", b"+OK\r\n" + b"".join(b"%d uid-%d\r\n" % (n, uid) for n, uid in enumerate(uids, 1))
                        + b".\r\n"),
                Segment("LIST", b"+OK\r\n" + b"".join(b"%d %d\r\n" % (n, len(m)) for n, m in enumerate(messages, 1))
                        + b".\r\n")]
    segments += [Segment(f"RETR {n}", b"+OK %d octets\r\n" % len(m) + stuffed(m), n) for n, m in enumerate(messages, 1)]
    segments += [Segment(f"TOP {n} 0", b"+OK\r\n" + stuffed(m[:m.index(CRLF * 2) + 4]))
                 for n, m in enumerate(messages, 1)]
    segments += [Segment(f"DELE {n}", b"+OK marked\r\n") for n in range(1, len(messages) + 1)]
    segments.append(Segment("QUIT", b"+OK bye\r\n"))
    return segments


# --- mutations ---------------------------------------------------------------------------------------------

STRAYS = [b"\r\n", b"\n", b".\r\n", b"+OK\r\n", b"-ERR stray\r\n", b"+OK 12 octets\r\n", b"garbage\r\n", b"\x00",
          b"\r\n.\r\n", b"..\r\n"]


def mutate(segments: list[Segment], rng: random.Random) -> str:
    """Apply one mutation in place; returns what it did (shown when a case fails)."""
    index = rng.randrange(len(segments))
    segment = segments[index]
    data = segment.data
    at = rng.randrange(len(data) + 1)
    kind = rng.choice(["flip", "insert", "delete", "duplicate line", "truncate", "stray line", "terminator"])
    if kind == "flip" and data:
        at = min(at, len(data) - 1)
        segment.data = data[:at] + bytes([data[at] ^ (1 << rng.randrange(8))]) + data[at + 1:]
    elif kind == "insert":
        segment.data = data[:at] + rng.choice(STRAYS + [bytes(rng.randrange(256) for _ in range(3))]) + data[at:]
    elif kind == "delete":
        segment.data = data[:at] + data[at + rng.randrange(1, 8):]
    elif kind == "duplicate line":
        lines = data.split(CRLF)
        line = rng.randrange(len(lines))
        lines.insert(line, lines[line])
        segment.data = CRLF.join(lines)
    elif kind == "truncate":
        segment.data = data[:at]
        del segments[index + 1:]
    elif kind == "stray line":
        segment.data = data + rng.choice(STRAYS)
    elif kind == "terminator" and data.endswith(b".\r\n"):
        segment.data = data[:-3] + rng.choice([b".\n", b".\r", b".", b"\n.\r\n", b".\r\n\r\n", b". \r\n"])
    return f"{kind} in the reply to {segment.command or 'greeting'!r} at {at}"


def decoded(segment: Segment) -> bytes | None:
    """The message a RETR reply carries when it is exactly one well-formed reply (+OK, stuffed CRLF lines, the
    terminator, nothing after), else None."""
    data = segment.data
    status_end = data.find(CRLF)
    if status_end == -1 or not re.fullmatch(rb"\+OK([ \t].*)?", data[:status_end], re.DOTALL):
        return None
    rest = data[status_end + 2:]
    if rest == b".\r\n":
        return b""
    if not rest.endswith(b"\r\n.\r\n") or b"\r\n.\r\n" in rest[:-3] or rest.startswith(b".\r\n"):
        return None
    body = rest[:-3]
    if re.search(rb"(\A|\r\n)\.[\r\n]", body):
        return None
    body = body[1:] if body.startswith(b"..") else body
    return body.replace(b"\r\n..", b"\r\n.")


# --- the fake connection -------------------------------------------------------------------------------------


@dataclass
class FakeServer:
    """Releases the reply to each command when the command arrives (the next unused reply for that command; -ERR
    for a command the transcript has no reply for; end of stream once a truncated transcript ran out), and
    records what the client sent."""

    segments: list[Segment]
    rng: random.Random
    truncated: bool = False
    sent: bytearray = field(default_factory=bytearray)
    commands: list[str] = field(default_factory=list)
    released: bytearray = field(default_factory=bytearray)
    closed: bool = False

    def __post_init__(self) -> None:
        self.unused = list(self.segments)
        self._release("")  # the greeting

    def _release(self, command: str) -> None:
        keyword = command.split(" ")[0] if command.split(" ")[0] in ("USER", "PASS", "AUTH") else command
        for segment in self.unused:
            if segment.command == keyword:
                self.unused.remove(segment)
                self.released += segment.data
                return
        if self.truncated:
            self.closed = True
        else:
            self.released += b"-ERR no reply scripted for this command\r\n"

    def sendall(self, data: bytes) -> None:
        self.sent += data
        while (end := self.sent.find(CRLF)) != -1:
            command = bytes(self.sent[:end]).decode("latin-1")
            del self.sent[:end + 2]
            self.commands.append(command)
            if not self.closed:
                self._release(command)

    def recv(self, size: int) -> bytes:
        if not self.released:
            if self.closed:
                return b""  # the server closed the connection
            raise TimeoutError("nothing to send until the next command")  # the client's timeout, at once
        count = min(size, len(self.released), self.rng.choice([1, 2, 3, 7, 64, 1 << 20]))
        chunk = bytes(self.released[:count])
        del self.released[:count]
        return chunk


class FakeSocket:
    def __init__(self, server: FakeServer) -> None:
        self.server = server
        self.timeout: float | None = None

    def setsockopt(self, *args: Any) -> None:
        pass

    def settimeout(self, value: float | None) -> None:
        self.timeout = value

    def gettimeout(self) -> float | None:
        return self.timeout

    def sendall(self, data: bytes) -> None:
        self.server.sendall(data)

    def recv(self, size: int) -> bytes:
        return self.server.recv(size)

    def close(self) -> None:
        pass


@contextmanager
def connected_to(server: FakeServer) -> Iterator[None]:
    with mock.patch.object(socket, "create_connection", lambda *args, **kwargs: FakeSocket(server)):
        yield


# --- one poll -----------------------------------------------------------------------------------------------------


def poll(directory: Path, server: FakeServer, *, sasl: bool = False) -> list[bytes]:
    """Poll the fake server with the real poller into a Maildir; the delivered messages, less postbote's trace
    field, with CRLF as the Maildir stores it (LF)."""
    maildir = directory / "Maildir"
    config = directory / "postbote.yaml"
    config.write_text(yaml.safe_dump({
        "state_dir": str(directory / "state"), "log": {"level": "error"},
        "accounts": [{"name": "fuzz", "host": "127.0.0.1", "port": 110, "tls": "none", "username": "demo",
                      "password": "demo-password", "timeout": "1s", "deliver": {"maildir": str(maildir)},
                      **({"auth": "plain"} if sasl else {})}]}))
    config.chmod(0o600)
    with connected_to(server):
        poll_once(config)
    return [without_trace_field(path.read_bytes()) for sub in ("new", "cur") if (maildir / sub).is_dir()
            for path in sorted((maildir / sub).iterdir())]


def without_trace_field(delivered: bytes) -> bytes:
    end = 0
    while not delivered[:end].rstrip(b"\r\n").endswith(b";"):
        end = delivered.index(b"\n", end) + 1
    return delivered[delivered.index(b"\n", end) + 1:]


def on_disk(data: bytes) -> bytes:
    return data.replace(CRLF, b"\n")


# --- the property --------------------------------------------------------------------------------------------------

cases = st.tuples(st.lists(bodies, min_size=1, max_size=4), st.booleans(), st.integers(min_value=0, max_value=2),
                  st.integers(min_value=0, max_value=2**32), st.booleans())


def note(text: str) -> None:
    """Shown with a failing case (printed outside hypothesis, where pytest shows it on failure)."""
    if currently_in_test_context():
        hypothesis.note(text)
    else:
        print(text)


def run_case(messages_bodies: list[bytes], pipelining: bool, mutations: int, seed: int, sasl: bool = False) -> None:
    rng = random.Random(seed)
    messages = [message_of(n, body) for n, body in enumerate(messages_bodies, 1)]
    segments = transcript(messages, pipelining, sasl)
    done = [mutate(segments, rng) for _ in range(mutations)]
    note(f"mutations: {done}")
    server = FakeServer(segments, rng, truncated=any(kind.startswith("truncate") for kind in done))
    replies = {segment.message: decoded(segment) for segment in segments if segment.message is not None}
    allowed = {number: {on_disk(message)} | ({on_disk(reply)} if (reply := replies.get(number)) is not None else set())
               for number, message in enumerate(messages, 1)}
    # A reply read leniently counts as the message only when it holds the message's own header block whole: a
    # shorter one (a truncated reply) would be a prefix of anything.
    sent = {number: form for segment in segments if (number := segment.message) is not None
            and (form := on_disk(as_sent(segment))).startswith(header_block_of(messages[number - 1]))}
    with tempfile.TemporaryDirectory() as scratch:
        delivered = poll(Path(scratch), server, sasl=sasl)
        note(f"commands: {server.commands}")
        marked = {int(command.split()[1]) for command in server.commands if command.startswith("DELE ")}
        for number in marked:
            assert allowed[number] & set(delivered), f"DELE {number} sent, but message {number} never arrived whole"
        if not done:
            assert "QUIT" in server.commands and sorted(delivered) == sorted(on_disk(m) for m in messages)
        # The next poll, from a server that behaves, must bring what is left: a message recorded as delivered with
        # another's bytes must be found out there (its headers are not the ones recorded), not skipped and deleted.
        left = [number for number in allowed if number not in marked or "QUIT" not in server.commands]
        again = FakeServer(transcript([messages[n - 1] for n in left], pipelining, sasl, left), rng)
        delivered = poll(Path(scratch), again, sasl=sasl)
        note(f"next poll: {again.commands}")
        for command in again.commands:
            if command.startswith("DELE "):
                number = left[int(command.split()[1]) - 1]
                assert arrived(allowed[number], sent.get(number), delivered), \
                    f"next poll: DELE {number}, but it never arrived whole"
    renamed = any("'UIDL'" in mutation for mutation in done)  # a mislabelled message is no client's to catch
    for number in allowed if not renamed else ():
        assert arrived(allowed[number], sent.get(number), delivered), \
            f"message {number} never reached the Maildir, after a good poll too"


def arrived(forms: set[bytes], sent: bytes | None, delivered: list[bytes]) -> bool:
    """Whether a message is in the Maildir in one of its allowed forms -- or, followed by more, as the server had it
    or ``sent`` it: a terminator the server broke or left out lets the next reply into the data, and no client can
    tell that from the message. What must never happen is a message missing, or recorded with another's bytes."""
    if forms & set(delivered):
        return True
    prefixes = forms | ({sent} if sent else set())
    return any(data.startswith(prefix) for data in delivered for prefix in prefixes)


def header_block_of(message: bytes) -> bytes:
    """A message's header fields and the empty line after them, as the Maildir holds them."""
    data = on_disk(message)
    return data[:data.index(b"\n\n") + 2]


def as_sent(segment: Segment) -> bytes:
    """The data of a (maybe mutated) RETR reply read leniently: after its status line, without a final
    terminator, unstuffed -- what a client hands on when the server broke the terminator."""
    data = segment.data
    data = data[data.find(CRLF) + 2:] if CRLF in data else b""
    data = data[:-3] if data.endswith(b"\r\n.\r\n") else data
    return re.sub(rb"(\A|\r\n)\.\.", rb"\1.", data)


def test_an_unmutated_transcript_delivers_everything_and_quits() -> None:
    """The harness itself: a good server's transcript is a clean poll (else the fuzzer proves nothing)."""
    run_case([b"one\r\n", b".dot\r\n..two\r\n", b"bare\nlf\n.\nx"], True, 0, 1)
    run_case([b"one\r\n", b"\x00\xff\r\n"], False, 0, 2)
    run_case([b"one\r\n", b".dot\r\n"], True, 0, 3, True)  # one AUTH PLAIN line instead of USER and PASS


# CI, which decides whether a change lands, runs the same cases every time; the soak explores new ones.
@settings(max_examples=EXAMPLES, deadline=None, print_blob=True, derandomize=bool(os.environ.get("CI")))
@given(cases)
@example(([b"", b"", b"\r\n.\r\n.", b""], True, 1, 551, False))  # a stray "+OK" after RETR 3: RETR 4's reply read late
@example(([b"\x00", b""], True, 1, 8285895, True))  # RETR 1's last line and terminator gone: the next reply is data
def test_a_dele_is_only_sent_for_a_message_whose_exact_bytes_were_delivered(case: tuple[Any, ...]) -> None:
    run_case(*case)
