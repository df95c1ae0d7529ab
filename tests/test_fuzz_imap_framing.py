"""A framing fuzzer for the IMAP client (issue 13: "anything out of step ends the session").

Each case renders what a well-behaved server sends to the client's commands (greeting, LOGIN, SELECT, the UID FETCH
listing, a pipelined UID FETCH of each message plus one of a UID that does not exist, LOGOUT) for a few random
messages (protocol look-alikes, CR, LF, 8-bit, braces), in one of two server styles -- each fetch's data followed
by its tagged OK, or Dovecot's: the data of later fetches before the tagged OKs of earlier ones -- then applies one
or two random byte-level mutations (a flipped bit, an inserted stray line -- tagged, untagged, a continuation, a
BYE, message data for another UID --, a deleted run, a duplicated line, a truncation that drops the connection,
a literal announced longer or shorter than sent), and plays it to `IMAPClient` through a fake socket: each answer
is released only when its command has been sent, in random chunk sizes; a read with nothing left to release times
out at once, so no case can hang.

The property: every `read_fetched` that returns hands over, for UID u, either message u exactly as the server had
it, or exactly the data of a mutated answer that is still one well-formed FETCH answer for u; never None for a
message whose answer was untouched, never bytes for a UID the server does not have, never more than the limit; and
any failure is an `IMAPConnectionError` (`IMAPProtocolError` is one) or `IMAPError`, within the deadline.

A second test plays random mutations through the real `postbote.testing.imapserver` over TCP.

CI runs ``POSTBOTE_FUZZ_EXAMPLES`` cases (default 300), derandomised; a soak::

    POSTBOTE_TEST_BACKSTOP=0 POSTBOTE_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest tests/test_fuzz_imap_framing.py -q
"""

from __future__ import annotations

import os
import random
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import hypothesis
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from postbote import Secret, TLSPolicy
from postbote.plugins.imap.client import IMAPClient, IMAPConnectionError, IMAPError
from postbote.testing.imapserver import Action, Faults, IMAPServer

EXAMPLES = int(os.environ.get("POSTBOTE_FUZZ_EXAMPLES", "300"))
CRLF = b"\r\n"
LIMIT = 4096
MISSING_UID = 77
SESSION_SECONDS = 20.0
TAG, PREVIOUS = b"\0T\0", b"\0P\0"  # placeholders no message body holds (the bodies have no NUL)


# --- the messages and what a good server sends -------------------------------------------------------------

_pieces = st.sampled_from([b"\r\n", b"\n", b"\r", b"\xff\xfe", b"a", b"text ", b")", b"(", b"{3}\r\n", b"{5}",
                           b"* 1 FETCH (UID 2 BODY[] {3}\r\n", b"A0005 OK done\r\n", b"+ go\r\n", b"\"", b" ",
                           b"BODY[]", b"UID 9"])
bodies = st.lists(_pieces, max_size=20).map(b"".join) | st.binary(max_size=60).map(lambda b: b.replace(b"\0", b""))


def message_of(uid: int, body: bytes) -> bytes:
    return b"Subject: fuzz %d\r\nMessage-ID: <fuzz-%d@postbote.test>\r\n\r\n" % (uid, uid) + body


@dataclass
class Segment:
    command: str  # the command (without its tag) whose answer this is; "" for the greeting
    data: bytes  # TAG stands for the command's tag, PREVIOUS for the tag of the command before it
    uid: int | None = None  # the UID a body fetch asks for


def fetch_command(uid: int) -> str:
    return f"UID FETCH {uid} (UID BODY.PEEK[])"


def fetch_answer(number: int, uid: int, data: bytes) -> bytes:
    return b"* %d FETCH (UID %d BODY[] {%d}\r\n" % (number, uid, len(data)) + data + b")\r\n"


def transcript(messages: list[bytes], dovecot_style: bool) -> list[Segment]:
    uids = list(range(1, len(messages) + 1))
    listing = b"".join(b"* %d FETCH (UID %d RFC822.SIZE %d FLAGS (\\Recent))\r\n" % (n, n, len(m))
                       for n, m in enumerate(messages, 1))
    segments = [
        Segment("", b"* OK [CAPABILITY IMAP4rev1 LITERAL+ UIDPLUS] fuzz server ready\r\n"),
        Segment("LOGIN", TAG + b" OK [CAPABILITY IMAP4rev1 LITERAL+ UIDPLUS IDLE] Logged in\r\n"),
        Segment('SELECT INBOX', b"* FLAGS (\\Seen \\Deleted)\r\n* %d EXISTS\r\n* 0 RECENT\r\n"
                b"* OK [UIDVALIDITY 42] ok\r\n* OK [UIDNEXT %d] ok\r\n" % (len(messages), len(messages) + 1)
                + TAG + b" OK [READ-WRITE] Select completed\r\n"),
        Segment("UID FETCH 1:* (UID RFC822.SIZE FLAGS)", listing + TAG + b" OK Fetch completed\r\n"),
    ]
    asked = [*uids, MISSING_UID]
    for index, uid in enumerate(asked):
        data = fetch_answer(uid, uid, messages[uid - 1]) if uid != MISSING_UID else b""
        if dovecot_style:  # the data first, the previous fetch's tagged OK after it (the last one's own too)
            data += PREVIOUS + b" OK Fetch completed\r\n" if index else b""
        if not dovecot_style or uid == MISSING_UID:
            data += TAG + b" OK Fetch completed\r\n"
        segments.append(Segment(fetch_command(uid), data, uid))
    segments.append(Segment("LOGOUT", b"* BYE logging out\r\n" + TAG + b" OK Logout completed\r\n"))
    return segments


# --- mutations ---------------------------------------------------------------------------------------------

STRAYS = [b"\r\n", b"* 3 EXISTS\r\n", b"* 1 EXPUNGE\r\n", b"A0004 OK stray\r\n", TAG + b" OK early\r\n",
          b"* 1 FETCH (UID 2 BODY[] {3}\r\nabc)\r\n", b"* 1 FETCH (UID 1 BODY[] {3}\r\nabc)\r\n", b"+ go\r\n",
          b"* BYE bye\r\n", b"garbage\r\n", b"* OK [ALERT] x\r\n", b")\r\n", b"{5}\r\n", b"* BAD what\r\n",
          b"* 2 FETCH (FLAGS (\\Seen))\r\n", b"* 2 FETCH (UID 2 FLAGS (\\Seen))\r\n", b"* SEARCH 1 2\r\n"]


def mutate(segments: list[Segment], rng: random.Random) -> tuple[str, int]:
    """Apply one mutation in place; what it did (shown when a case fails) and the segment it changed."""
    index = rng.randrange(len(segments))
    segment = segments[index]
    data = segment.data
    at = rng.randrange(len(data) + 1)
    kind = rng.choice(["flip", "insert", "delete", "duplicate line", "truncate", "stray line", "literal length"])
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
    elif kind == "literal length":
        markers = list(re.finditer(rb"\{([0-9]+)\}", data))
        if markers:
            marker = rng.choice(markers)
            size = max(0, int(marker.group(1)) + rng.choice([-3, -1, 1, 2, 10**9]))
            segment.data = data[:marker.start()] + b"{%d}" % size + data[marker.end():]
    return f"{kind} in the answer to {segment.command or 'greeting'!r} at {at}", index


HARMLESS = (rb"(\* [0-9]+ (EXISTS|EXPUNGE|RECENT)|\* OK [^\r\n]*"
            rb"|\* [0-9]+ FETCH \((UID [0-9]+ )?FLAGS \([^()\r\n]*\)\))\r\n")
TAGGED_OK = rb"A[0-9]{4} OK[^\r\n]*\r\n"


def well_formed_body(segment: Segment, tag: str, previous: str) -> bytes | None:
    """The message data a (mutated) fetch answer carries when it is still one well-formed FETCH answer for its UID,
    with nothing around it but tagged OKs and untagged responses any server may send at any time (EXISTS, EXPUNGE,
    RECENT, OK, flag changes); else None."""
    data = segment.data.replace(TAG, tag.encode()).replace(PREVIOUS, previous.encode())
    match = re.match(rb"(?:%s|%s)*\* ([0-9]+) FETCH \(UID ([0-9]+) BODY\[\] \{([0-9]+)\}\r\n" % (HARMLESS, TAGGED_OK),
                     data)
    if match is None or int(match.group(5)) != segment.uid:
        return None
    size = int(match.group(6))
    body = data[match.end():match.end() + size]
    rest = data[match.end() + size:]
    own_ok = re.search(rb"(?:^|\r\n)%s OK[^\r\n]*\r\n" % re.escape(tag.encode()), rest)
    if own_ok is not None:
        rest = rest[:own_ok.end()]  # the answer is over at its tagged OK: what follows is another matter
    if len(body) != size or not re.fullmatch(rb"\)\r\n(?:%s|%s)*" % (HARMLESS, TAGGED_OK), rest):
        return None
    return body


# --- the fake connection -------------------------------------------------------------------------------------

@dataclass
class FakeServer:
    """Releases the answer to each command when the command's line arrives (the next unused answer for that command
    text, its tag put in); "BAD" for a command the transcript has no answer for; the end of the stream once a
    truncated transcript ran out."""

    segments: list[Segment]
    rng: random.Random
    truncated: bool = False
    sent: bytearray = field(default_factory=bytearray)
    commands: list[str] = field(default_factory=list)
    tags: dict[int, str] = field(default_factory=dict)  # id(segment) -> the tag it was released for
    released: bytearray = field(default_factory=bytearray)
    closed: bool = False
    previous_tag: str = ""

    def __post_init__(self) -> None:
        self.unused = list(self.segments)
        self._release("", "*")

    def _release(self, command: str, tag: str) -> None:
        keyword = "LOGIN" if command.startswith("LOGIN ") else command
        for segment in self.unused:
            if segment.command == keyword:
                self.unused.remove(segment)
                self.tags[id(segment)] = tag
                self.released += segment.data.replace(TAG, tag.encode()).replace(
                    PREVIOUS, self.previous_tag.encode())
                self.previous_tag = tag
                return
        if self.truncated:
            self.closed = True
        else:
            self.released += f"{tag} BAD no answer scripted\r\n".encode()

    def sendall(self, data: bytes) -> None:
        self.sent += data
        while (end := self.sent.find(CRLF)) != -1:
            line = bytes(self.sent[:end]).decode("latin-1")
            del self.sent[:end + 2]
            tag, _, command = line.partition(" ")
            self.commands.append(command)
            if not self.closed:
                self._release(command, tag)

    def recv(self, size: int) -> bytes:
        if not self.released:
            if self.closed:
                return b""
            raise TimeoutError("nothing to send until the next command")
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


# --- one session ---------------------------------------------------------------------------------------------------

def session(server: FakeServer) -> tuple[dict[int, bytes | None], BaseException | None]:
    """What the client returned for each fetch, and the error that ended the session (None: a clean LOGOUT)."""
    results: dict[int, bytes | None] = {}
    with connected_to(server):
        try:
            client = IMAPClient.connect("fuzz.test", 143, implicit_tls=False, tls=TLSPolicy(), timeout=1.0,
                                        deadline=time.monotonic() + SESSION_SECONDS)
            client.login("demo", Secret("demo"))
            client.select("INBOX")
            uids = [entry.uid for entry in client.listing()]
            for uid in [*uids, MISSING_UID]:
                client.send_fetch(uid, limit=LIMIT)
            for uid in [*uids, MISSING_UID]:
                chunks: list[bytes] = []
                size = client.read_fetched(chunks.append)
                data = b"".join(chunks)
                assert size is None or size == len(data) <= LIMIT, (size, len(data))
                results[uid] = None if size is None else data
            client.logout()
        except (IMAPConnectionError, IMAPError) as exc:
            return results, exc
    return results, None


def note(text: str) -> None:
    if currently_in_test_context():
        hypothesis.note(text)
    else:
        print(text)


def run_case(bodies_: list[bytes], dovecot_style: bool, mutations: int, seed: int) -> None:
    rng = random.Random(seed)
    messages = [message_of(uid, body) for uid, body in enumerate(bodies_, 1)]
    segments = transcript(messages, dovecot_style)
    pristine = {id(segment): segment.data for segment in segments}
    done = [mutate(segments, rng) for _ in range(mutations)]
    note(f"mutations: {[what for what, _ in done]}")
    server = FakeServer(segments, rng, truncated=any(what.startswith("truncate") for what, _ in done))
    started = time.monotonic()
    results, error = session(server)
    note(f"commands: {server.commands}\nresults: {results}\nerror: {error!r}")
    assert time.monotonic() - started < SESSION_SECONDS + 5
    by_uid = {segment.uid: segment for segment in segments if segment.uid is not None}
    tags = list(server.tags.items())
    for uid, data in results.items():
        segment = by_uid.get(uid)
        if uid == MISSING_UID or uid > len(messages):
            assert data is None, f"bytes returned for UID {uid}, which the server does not have"
            continue
        untouched = segment is not None and segment.data == pristine[id(segment)]
        if data is None:
            assert not untouched or error is not None or server.closed, f"UID {uid}: None for an untouched answer"
            continue
        allowed = {messages[uid - 1]}
        if segment is not None and id(segment) in server.tags:
            tag = server.tags[id(segment)]
            previous = next((t for (key, t), (_, nxt) in zip(tags, tags[1:], strict=False) if nxt == tag), "")
            body = well_formed_body(segment, tag, previous)
            if body is not None:
                allowed.add(body)
        assert data in allowed, f"UID {uid}: the client returned bytes the server never sent as message {uid}"
    if not done:
        assert error is None and results == {**{uid: m for uid, m in enumerate(messages, 1)}, MISSING_UID: None}


def test_an_unmutated_transcript_fetches_everything() -> None:
    """The harness itself: a good server's transcript is a clean session in both styles."""
    run_case([b"one\r\n", b"{3}\r\n)\r\n* 1 FETCH (UID 2 BODY[] {3}\r\n", b"\xff\r\n.\r\n"], False, 0, 1)
    run_case([b"one\r\n", b"two"], True, 0, 2)


cases = st.tuples(st.lists(bodies, min_size=1, max_size=4), st.booleans(), st.integers(min_value=0, max_value=2),
                  st.integers(min_value=0, max_value=2**32))


@settings(max_examples=EXAMPLES, deadline=None, print_blob=True, derandomize=bool(os.environ.get("CI")))
@given(cases)
@example(([b"a", b"b"], True, 1, 3))
def test_a_fetch_returns_only_the_bytes_the_server_sent_for_that_uid(case: tuple[Any, ...]) -> None:
    run_case(*case)


# --- through the real fault server over TCP ----------------------------------------------------------------------

def _mutation(seed: int) -> Action:
    rng = random.Random(seed)

    def change(data: bytes) -> bytes:
        segments = [Segment("x", data)]
        mutate(segments, rng)
        return segments[0].data if segments else b""

    return Action.mutate(change)


@settings(max_examples=max(20, EXAMPLES // 10), deadline=None, print_blob=True,
          derandomize=bool(os.environ.get("CI")))
@given(st.lists(bodies, min_size=1, max_size=3), st.integers(min_value=2, max_value=5), st.integers(0, 2**32))
def test_through_the_fault_server(bodies_: list[bytes], nth: int, seed: int) -> None:
    messages = [message_of(uid, body) for uid, body in enumerate(bodies_, 1)]
    faults = Faults().on("UID FETCH", nth=nth, action=_mutation(seed))
    with IMAPServer(faults=faults) as server:
        for data in messages:
            server.add_message("INBOX", data)
        results: dict[int, bytes | None] = {}
        try:
            client = IMAPClient.connect(server.host, server.port, implicit_tls=False, tls=TLSPolicy(), timeout=0.5,
                                        deadline=time.monotonic() + SESSION_SECONDS)
            client.login("demo", Secret("demo"))
            client.select("INBOX")
            uids = [entry.uid for entry in client.listing()]
            for uid in uids:
                client.send_fetch(uid, limit=LIMIT)
            for uid in uids:
                chunks: list[bytes] = []
                size = client.read_fetched(chunks.append)
                results[uid] = None if size is None else b"".join(chunks)
            client.logout()
        except (IMAPConnectionError, IMAPError):
            pass
        assert server.errors == []
    for uid, data in results.items():
        assert uid <= len(messages) and data in (None, messages[uid - 1]) or nth - 1 == uid, (uid, data)


# --- IDLE: what a server says while the client idles, in any chunks -----------------------------------------------

IDLE_LINES = [b"* 3 EXISTS\r\n", b"* 1 RECENT\r\n", b"* 2 EXPUNGE\r\n", b"* OK Still here\r\n",
              b"* 1 FETCH (FLAGS (\\Seen))\r\n", b"* BYE shutting down\r\n", b"garbage\r\n", b"+ again\r\n",
              b"A0001 OK IDLE terminated\r\n", b"* 7 EXISTS\r\n", b"* 5 EXI", b"\r\n",
              b"* 1 FETCH (UID 1 BODY[] {3}\r\nabc)\r\n"]


class IdleSocket:
    """Gives "+ idling" once IDLE is sent, then ``stream`` in ``sizes`` chunks; an empty read is EWOULDBLOCK (or
    the end of the stream once ``closes``)."""

    def __init__(self, stream: bytes, sizes: list[int], closes: bool) -> None:
        self.pending = b""
        self.stream = stream
        self.sizes = sizes or [len(stream) or 1]
        self.index = 0
        self.closes = closes
        self.timeout: float | None = None

    def sendall(self, data: bytes) -> None:
        if data.endswith(b"IDLE\r\n"):
            self.pending += b"+ idling\r\n"
        elif data == b"DONE\r\n":
            self.pending += self.stream + b"A0001 OK done\r\n"
            self.stream = b""

    def recv(self, size: int) -> bytes:
        if not self.pending and self.stream:
            count = self.sizes[self.index % len(self.sizes)]
            self.index += 1
            self.pending, self.stream = self.stream[:count], self.stream[count:]
        if not self.pending:
            if self.closes:
                return b""
            if self.timeout == 0.0:
                raise BlockingIOError
            raise TimeoutError
        chunk, self.pending = self.pending[:size], self.pending[size:]
        return chunk

    def gettimeout(self) -> float | None:
        return self.timeout

    def settimeout(self, value: float | None) -> None:
        self.timeout = value

    def fileno(self) -> int:
        return -1

    def close(self) -> None:
        pass


@settings(max_examples=EXAMPLES, deadline=None, print_blob=True, derandomize=bool(os.environ.get("CI")))
@given(st.lists(st.sampled_from(IDLE_LINES), max_size=8), st.lists(st.integers(1, 40), max_size=6), st.booleans())
def test_idle_reads_report_news_or_fail_cleanly(lines: list[bytes], sizes: list[int], closes: bool) -> None:
    stream = b"".join(lines)
    client = IMAPClient(IdleSocket(stream, sizes, closes), host="fuzz.test", timeout=1.0)  # type: ignore[arg-type]
    client.capabilities = frozenset({"IMAP4REV1", "IDLE"})
    news = False
    try:
        news = client.idle_start()
        for _ in range(len(stream) + 2):
            if not client.idling:
                break
            news = client.idle_read() or news
        if client.idling:
            client.idle_done()
    except (IMAPConnectionError, IMAPError):
        return
    whole = stream.split(b"\r\n")[:-1]  # the complete lines as they arrived (a half line joins the next one)
    if b"A0001 OK IDLE terminated" in whole:  # the server ended IDLE: what follows is read with the next command
        whole = whole[:whole.index(b"A0001 OK IDLE terminated")]
    if any(re.fullmatch(rb"\* [0-9]+ EXISTS|\* 1 RECENT", line) for line in whole):
        assert news
    exists = [int(line.split()[1]) for line in whole if re.fullmatch(rb"\* [0-9]+ EXISTS", line)]
    if exists and not any(line.endswith(b" EXPUNGE") for line in whole):
        assert client.exists == exists[-1]
