"""The POP3 client stays in step with the server or ends the session (issue 11, items 1, 2, 10 and 12).

Only a well-formed ``-ERR`` keeps a session going (`POP3Error`). A reply that is neither ``+OK`` nor ``-ERR``, data
where no reply is owed, a malformed listing, a line too long, a message too large, a deadline passed: each raises
`POP3ProtocolError` or another `POP3ConnectionError`, and the poller then ends the session without QUIT, so the
server deletes nothing. The scripted `POP3Server` plays the misbehaving servers; the ends of the file poll through
the real poller (`Rig`) for what a user sees.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from postbote.digest import header_block_digest
from postbote.mailbox import NotFetched
from postbote.message import Message
from postbote.plugins.pop3.client import (
    DATA_READ_SIZE,
    LineEnding,
    MessageTooLarge,
    POP3Client,
    POP3ConnectionError,
    POP3Error,
    POP3ProtocolError,
)
from postbote.plugins.pop3.mailbox import POP3Mailbox
from postbote.testing.pop3server import Action, Faults, POP3Server, Stuffing
from postbote.tls import TLSPolicy

from tests.harness import (
    MaildirTarget,
    RigFactory,
    corpus,
    corpus_message,
    corpus_number,
)
from tests.servers import interrupt_after

pytestmark = pytest.mark.usefixtures("time_limit")

TIME_LIMIT = 30.0
NO_PIPELINING = ("TOP", "USER", "UIDL", "RESP-CODES")




def logged_in(server: POP3Server, *, timeout: float = 2.0, deadline: float | None = None) -> POP3Client:
    client = POP3Client.connect(server.host, server.port, implicit_tls=False, tls=TLSPolicy(), timeout=timeout,
                                deadline=deadline)
    client.capa()
    client.login_user("demo", _Secret("demo"))
    return client


class _Secret:
    def __init__(self, value: str) -> None:
        self.value = value

    def reveal(self) -> str:
        return self.value


def retrieve(client: POP3Client, number: int, *, limit: int | None = None) -> bytes:
    chunks: list[bytes] = []
    client.send_retrieve(number, limit=limit)
    client.read_retrieved(chunks.append)
    return b"".join(chunks)


def without_trace_field(delivered: bytes) -> bytes:
    """A Maildir file less the ``Received:`` field postbote puts first (up to the line after the one ending in
    ``;``)."""
    assert delivered.startswith(b"Received: "), delivered[:80]
    end = 0
    while not delivered[:end].rstrip(b"\r\n").endswith(b";"):
        end = delivered.index(b"\n", end) + 1
    return delivered[delivered.index(b"\n", end) + 1:]


# --- item 1: only -ERR keeps the session in step -----------------------------------------------------------


def test_an_err_reply_to_retr_is_a_pop3_error_and_the_session_goes_on() -> None:
    faults = Faults().on("RETR 1", action=Action.reply("-ERR [SYS/TEMP] cannot open"))
    with POP3Server(corpus(2), faults=faults) as server:
        client = logged_in(server)
        with pytest.raises(POP3Error) as raised:
            retrieve(client, 1)
        assert not isinstance(raised.value, POP3ConnectionError)
        assert corpus_number(retrieve(client, 2)) == 2
        client.quit()


GARBAGE_AT = ["GREETING", "CAPA", "USER", "PASS", "UIDL", "LIST", "RETR 1", "TOP 1 0", "DELE 1", "QUIT"]


@pytest.mark.parametrize("command", GARBAGE_AT)
@pytest.mark.parametrize("garbage", [b"", b"what?", b"+OKAY", b"-ERRor", b"\x00+OK"], ids=repr)
def test_a_reply_that_is_neither_ok_nor_err_is_a_protocol_error_wherever_it_comes(command: str,
                                                                                 garbage: bytes) -> None:
    faults = Faults().on(command, action=Action.reply(garbage))
    with POP3Server(corpus(2), faults=faults) as server, pytest.raises(POP3ProtocolError, match="not a POP3 reply"):
        client = logged_in(server)
        entries = client.listing()
        client.top_headers(1)
        retrieve(client, entries[0].number)
        client.delete(1)
        client.quit()


def test_an_err_to_dele_is_a_refusal_but_anything_else_ends_the_session() -> None:
    faults = Faults().on("DELE 1", action=Action.reply("-ERR [SYS/TEMP] read-only")).on("DELE 2", action=Action.reply(
        "deleted, probably"))
    with POP3Server(corpus(2), faults=faults) as server:
        client = logged_in(server)
        client.delete(1)
        assert client.refused_deletions == {1: "-ERR [SYS/TEMP] read-only"}
        with pytest.raises(POP3ProtocolError):
            client.delete(2)
        assert list(client.refused_deletions) == [1], "a garbled DELE reply was counted as a refusal"


@pytest.mark.parametrize("stray", [b"\r\n", b"+OK\r\n", b"-ERR stray\r\n", b"x"], ids=repr)
def test_a_stray_line_after_a_message_ends_the_session_before_that_message_is_handed_on(stray: bytes) -> None:
    """The issue's scenario: one extra line after message 1's terminator would be read as the reply to RETR 2. It
    is seen where it arrives, before message 1 is returned (its data cannot be trusted to be only its own)."""
    with POP3Server(corpus(3), faults=Faults().on("RETR 1", action=Action.followed_by(stray))) as server:
        client = logged_in(server)
        client.send_retrieve(1)
        with pytest.raises(POP3ProtocolError, match="no reply was expected"):
            client.read_retrieved(lambda _data: None)


def test_stray_data_before_a_command_ends_the_session_before_the_command_is_sent() -> None:
    with POP3Server(corpus(1), faults=Faults().on("LIST", action=Action.followed_by(b"+OK stray\r\n"))) as server:
        client = logged_in(server)
        client.listing()
        with pytest.raises(POP3ProtocolError, match="nobody asked for before DELE"):
            client.delete(1)
    assert "DELE 1" not in server.commands


def test_a_stray_line_between_pipelined_replies_ends_the_session_at_that_message() -> None:
    with POP3Server(corpus(3), faults=Faults().on("RETR 2", action=Action.followed_by(b"\r\n"))) as server:
        client = logged_in(server)
        for number in (1, 2, 3):
            client.send_retrieve(number)
        assert corpus_number(b"".join(_read_one(client))) == 1
        with pytest.raises(POP3ProtocolError, match="not a reply"):
            _read_one(client)


def test_a_stray_err_line_read_as_a_refused_retr_ends_the_session_before_a_message_gets_anothers_data() -> None:
    """The stray ``-ERR`` looks like a refused RETR 2; read on, RETR 3 would get message 2's data. With a DELE sent
    behind the RETRs (a reply owed, so nothing looks out of turn) that went through in CI: the -ERR must be proven
    to belong to RETR 2 before another message is read."""
    faults = Faults().on("RETR 1", action=Action.followed_by(b"-ERR no such message\r\n"))
    with POP3Server(corpus(4), faults=faults) as server:
        mailbox = POP3Mailbox(logged_in(server), max_size=None)
        fetched = mailbox.fetch(mailbox.listing(), stop=lambda: False)
        first, message = next(fetched)
        assert isinstance(message, Message) and corpus_number(message.as_bytes()) == first.ref == 1
        mailbox.delete(first)
        handed_on: list[tuple[int, bytes]] = []
        with pytest.raises(POP3ProtocolError, match="out of step"):
            for entry, item in fetched:
                if isinstance(item, Message):
                    handed_on.append((entry.ref, item.as_bytes()))
        assert all(corpus_number(data) == number for number, data in handed_on), handed_on


def test_a_refused_retr_among_pipelined_ones_is_confirmed_and_the_messages_behind_it_are_asked_for_again() -> None:
    faults = Faults().on("RETR 2", action=Action.reply("-ERR [SYS/TEMP] cannot open"))
    with POP3Server(corpus(4), faults=faults) as server:
        mailbox = POP3Mailbox(logged_in(server), max_size=None)
        results = [(entry.ref, item) for entry, item in mailbox.fetch(mailbox.listing(), stop=lambda: False)]
        mailbox.finish()
    assert [number for number, item in results if isinstance(item, NotFetched)] == [2]
    assert [(number, corpus_number(item.as_bytes())) for number, item in results if isinstance(item, Message)] \
        == [(1, 1), (3, 3), (4, 4)]
    assert "LIST 3" in server.commands and server.commands.count("RETR 3") == 2


def _read_one(client: POP3Client) -> list[bytes]:
    chunks: list[bytes] = []
    client.read_retrieved(chunks.append)
    return chunks


def test_data_after_the_reply_to_quit_is_a_protocol_error() -> None:
    with POP3Server(corpus(1), faults=Faults().on("QUIT", action=Action.followed_by(b"+OK and more\r\n"))) as server:
        client = logged_in(server)
        with pytest.raises(POP3ProtocolError, match="after the reply to QUIT"):
            client.quit()


@pytest.mark.parametrize("listing", [b"+OK\r\n1\r\n.\r\n", b"+OK\r\n1 a b\r\n.\r\n", b"+OK\r\none a\r\n.\r\n"],
                         ids=["no uid", "three words", "no number"])
def test_a_malformed_listing_line_is_a_protocol_error(listing: bytes) -> None:
    faults = Faults().on("UIDL", action=Action.reply(listing))
    with POP3Server(corpus(1), faults=faults) as server, pytest.raises(POP3ProtocolError, match="malformed listing"):
        logged_in(server).listing()


def test_a_reply_line_too_long_is_a_protocol_error() -> None:
    faults = Faults().on("RETR 1", action=Action.reply(b"+OK " + b"x" * 9000))
    with POP3Server(corpus(1), faults=faults) as server, pytest.raises(POP3ProtocolError, match="longer than"):
        retrieve(logged_in(server), 1)


@pytest.mark.parametrize("broken", [b".\n", b".\rx\r\n"], ids=repr)
def test_a_mangled_terminator_is_a_protocol_error_not_the_end_of_a_shorter_message(broken: bytes) -> None:
    reply = b"+OK\r\nSubject: x\r\n\r\nbody\r\n" + broken + b"more\r\n.\r\n"
    faults = Faults().on("RETR 1", action=Action.reply(reply))
    with POP3Server(corpus(1), faults=faults) as server, pytest.raises(POP3ProtocolError, match="broken terminator"):
        retrieve(logged_in(server), 1)


def test_a_dot_line_the_server_did_not_stuff_is_kept_as_data() -> None:
    unstuffed = b"+OK\r\n.first\r\nSubject: x\r\n\r\n.not stuffed\r\n..stuffed\r\n.\r\n"
    with POP3Server(corpus(1), faults=Faults().on("RETR 1", action=Action.reply(unstuffed))) as server:
        assert retrieve(logged_in(server), 1) == b".first\r\nSubject: x\r\n\r\n.not stuffed\r\n.stuffed\r\n"


def test_message_too_large_ends_the_session_like_any_protocol_error() -> None:
    assert issubclass(MessageTooLarge, POP3ProtocolError) and issubclass(POP3ProtocolError, POP3ConnectionError)
    assert not issubclass(POP3ProtocolError, POP3Error)


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "one command at a time"])
def test_an_extra_empty_line_after_a_message_deletes_nothing_and_no_message_gets_anothers_data(
        make_rig: RigFactory, tmp_path: Path, pipelining: bool) -> None:
    """Issue 11 item 1, end to end: the stray line ends the session without QUIT; no DELE names a message whose
    delivered data was not its own; the next poll delivers every message once."""
    capabilities = None if pipelining else NO_PIPELINING
    faults = Faults().on("RETR 2", action=Action.followed_by(b"\r\n"))
    maildir = MaildirTarget(tmp_path / "Maildir")
    rig = make_rig(corpus(4), faults, target=maildir, capabilities=capabilities)

    first = rig.poll()

    assert not first.ok and "out of step" in (first.error or "")
    assert "QUIT" not in rig.server.commands
    assert rig.audit().on_server == (1, 2, 3, 4)
    delivered = {corpus_number(data) for data in maildir.delivered()}
    deleted = {int(command.split()[1]) for command in rig.server.commands if command.startswith("DELE")}
    assert deleted <= delivered
    assert all(data.endswith(corpus_message(corpus_number(data) or 0).split(b"\r\n\r\n", 1)[1].replace(b"\r\n", b"\n"))
               for data in maildir.delivered())
    rig.poll_until_done()
    assert rig.audit().everything_delivered_once_and_deleted


@pytest.mark.parametrize("stray", [b"+OK marked\r\n", b"-ERR no such message\r\n"], ids=["+OK", "-ERR"])
def test_a_stray_status_line_between_pipelined_replies_deletes_nothing_and_no_message_gets_a_line_too_many(
        make_rig: RigFactory, tmp_path: Path, stray: bytes) -> None:
    """A well-formed status line after RETR 2's data looks like the start of RETR 3's reply; RETR 3's real reply
    then arrives as the first line of its data (or, after a stray -ERR, as a later message's reply). A message never
    starts with a status line, so the session ends there: no DELE for a message delivered with another's bytes."""
    faults = Faults().on("RETR 2", action=Action.followed_by(stray))
    maildir = MaildirTarget(tmp_path / "Maildir")
    rig = make_rig(corpus(4), faults, target=maildir)

    first = rig.poll()

    assert not first.ok and "out of step" in (first.error or "")
    assert "QUIT" not in rig.server.commands
    originals = {number: corpus_message(number).replace(b"\r\n", b"\n") for number in range(1, 5)}
    assert all(any(data.endswith(originals[number]) for number in originals) for data in maildir.delivered()), \
        "every delivered message is an original, byte for byte after the trace header"
    rig.poll_until_done()
    assert rig.audit().everything_delivered_once_and_deleted


# --- item 2: in a CRLF session only CRLF "." CRLF ends a message ----------------------------------------------

BARE_LF_DOT = b"Subject: bare LF dot\r\nMessage-ID: <corpus-1@postbote.test>\r\n\r\nbefore\n.\nx\r\n..\n.\r\nend\r\n"


def test_a_bare_lf_dot_line_in_a_crlf_session_is_data_and_the_message_arrives_whole() -> None:
    faults = Faults(raw_line_endings=True, stuffing=Stuffing.AFTER_CRLF)
    with POP3Server([BARE_LF_DOT, corpus_message(2)], faults=faults) as server:
        client = logged_in(server)
        assert client.line_ending is LineEnding.CRLF
        assert retrieve(client, 1) == BARE_LF_DOT
        assert retrieve(client, 2) == corpus_message(2)
        client.quit()


def test_a_server_greeting_in_bare_lf_gets_bare_lf_terminators() -> None:
    message = b"Subject: lf\n\nline\n.dot\n"
    with POP3Server([message, b"Subject: two\n\n"], faults=Faults(raw_line_endings=True)) as server:
        client = logged_in(server)
        assert client.line_ending is LineEnding.LF
        assert retrieve(client, 1) == message
        assert retrieve(client, 2) == b"Subject: two\n\n"


def test_a_message_with_a_bare_lf_dot_line_is_delivered_whole_byte_exact(make_rig: RigFactory,
                                                                          tmp_path: Path) -> None:
    """Issue 11 item 2, end to end: cut at "\\n.\\n" it was delivered short (within the truncation tolerance),
    recorded and deleted."""
    maildir = MaildirTarget(tmp_path / "Maildir")
    rig = make_rig([BARE_LF_DOT, corpus_message(2)], Faults(raw_line_endings=True, stuffing=Stuffing.AFTER_CRLF),
                   target=maildir)

    stats = rig.poll()

    assert (stats.ok, stats.delivered, stats.deleted) == (True, 2, 2), stats
    first = [data for data in maildir.delivered() if corpus_number(data) == 1]
    assert [without_trace_field(data) for data in first] == [BARE_LF_DOT.replace(b"\r\n", b"\n")]


# --- item 10: every byte counts against the limit ------------------------------------------------------------


@pytest.mark.parametrize("prefix", [b".", b"..", b".\r", b"x"], ids=repr)
def test_an_endless_line_after_a_dot_stops_at_the_limit_with_bounded_memory(prefix: bytes) -> None:
    """A RETR whose data is "." and a line that never ends: every byte counts, and the receiver's buffer never
    holds much more than one read."""
    limit = 2_000_000
    faults = Faults().on("RETR 1", action=Action.endless_line(prefix))
    with POP3Server(corpus(1), faults=faults) as server, interrupt_after(15, "the endless line"):
        client = logged_in(server)
        receiver = client._receiver
        fill, peaks = receiver.fill, [0]

        def measured_fill() -> bool:
            more = fill()
            peaks[0] = max(peaks[0], receiver.pending)
            return more

        receiver.fill = measured_fill  # type: ignore[method-assign]
        # ".\r" and more is a broken terminator, seen at once; every other line runs into the limit
        expected = POP3ProtocolError if prefix == b".\r" else MessageTooLarge
        with pytest.raises(expected):
            retrieve(client, 1, limit=limit)
        client.close()
    assert peaks[0] <= 2 * DATA_READ_SIZE


def test_an_endless_retr_after_a_dot_is_rejected_at_max_size_end_to_end(make_rig: RigFactory) -> None:
    rig = make_rig(corpus(2), Faults().on("RETR 1", action=Action.endless_line(b".")))

    started = time.monotonic()
    first = rig.poll(max_size="500kB")

    assert time.monotonic() - started < 10
    assert not first.ok and "exceeds 500000 bytes" in (first.error or "")
    rig.poll(max_size="500kB")
    audit = rig.audit()
    assert audit.on_server == (1,) and audit.delivered_once == [2] and 1 in audit.rejected


def test_a_top_reply_past_its_limit_ends_the_session() -> None:
    faults = Faults().on("TOP 1 0", action=Action.flood(b"X-Header: " + b"h" * 100, count=1000))
    with POP3Server(corpus(1), faults=faults) as server, pytest.raises(MessageTooLarge):
        logged_in(server).top_headers(1, limit=10_000)


# --- item 12: a deadline for each line and one for the session ----------------------------------------------


def test_a_server_trickling_a_reply_line_fails_after_the_timeout_not_per_byte() -> None:
    """One byte every 0.1 s never lets a single receive time out; the line as a whole must arrive in time."""
    faults = Faults().on("GREETING", action=Action.trickle(0.1))
    with POP3Server(corpus(1), faults=faults) as server:
        started = time.monotonic()
        with pytest.raises(POP3ConnectionError, match="reply line must arrive whole within the timeout"):
            logged_in(server, timeout=0.5)
        assert time.monotonic() - started < 2.5


def test_a_server_trickling_message_data_fails_at_the_session_deadline() -> None:
    faults = Faults().on("RETR 1", action=Action.trickle(0.02))
    with POP3Server(corpus(1, body_lines=100), faults=faults) as server:
        started = time.monotonic()
        client = logged_in(server, timeout=0.5, deadline=started + 1.5)
        with pytest.raises(POP3ConnectionError, match=r"longer than its poll_timeout \(1.5 s\)"):
            retrieve(client, 1)
        assert time.monotonic() - started < 4


def test_a_deadline_already_passed_ends_the_session_at_the_next_wait() -> None:
    with POP3Server(corpus(1)) as server:
        client = logged_in(server)
        client.deadline = time.monotonic() - 1
        with pytest.raises(POP3ConnectionError, match="poll_timeout"):
            client.listing()


def test_a_trickling_server_ends_the_poll_within_about_the_timeout_and_nothing_is_lost(make_rig: RigFactory) -> None:
    rig = make_rig(corpus(2), Faults().on("UIDL", action=Action.trickle(0.2)))

    started = time.monotonic()
    first = rig.poll(timeout="0.5s")

    assert time.monotonic() - started < 3
    assert not first.ok and "timed out" in (first.error or "")
    assert rig.audit().on_server == (1, 2)


# --- item 3's TOP: the header block and its digest ------------------------------------------------------------


def test_top_headers_is_the_header_block_and_none_without_top() -> None:
    message = b"Subject: top\r\n.Dotted: yes\r\n\r\nbody\r\n"
    with POP3Server([message]) as server:
        client = logged_in(server)
        assert client.top_headers(1) == b"Subject: top\r\n.Dotted: yes\r\n\r\n"
        assert header_block_digest(client.top_headers(1) or b"") == header_block_digest(retrieve(client, 1))
    with POP3Server([message], faults=Faults().on("TOP", action=Action.reply("-ERR unknown command"))) as server:
        client = logged_in(server)
        assert client.top_headers(1) is None
        assert retrieve(client, 1) == message  # still in step


def test_retr_and_top_from_dovecot_give_the_same_header_digest(dovecot) -> None:  # type: ignore[no-untyped-def]
    messages = [b"Subject: one\nMessage-ID: <1@x>\nX-Folded: a\n b\n\nbody\n.dot\n",
                b"Subject: no body\n", b"Subject: crlf\r\nTo: a@b\r\n\r\n\r\nstarts empty\r\n"]
    for message in messages:
        dovecot.deliver("alice", message)
    client = POP3Client.connect("127.0.0.1", dovecot.pop3_port, implicit_tls=False, tls=TLSPolicy(), timeout=5)
    try:
        client.capa()
        client.login_user("alice", _Secret("alice-secret"))
        entries = client.listing()
        assert len(entries) == len(messages)
        for entry in entries:
            whole = Message(entry.uid, entry.size)
            client.send_retrieve(entry.number)
            client.read_retrieved(whole.write)
            whole.close_writing()
            headers = client.top_headers(entry.number)
            assert headers is not None
            assert header_block_digest(whole.as_bytes()) == header_block_digest(headers), entry
        client.quit()
    finally:
        client.close()


header_fields = st.lists(st.from_regex(rb"\A[A-Za-z-]{1,10}: [ -~]{0,20}\Z").map(lambda f: f.rstrip(b"\n")),
                         min_size=1, max_size=6)


@settings(max_examples=200, deadline=None)
@given(header_fields, st.sampled_from([b"\r\n", b"\n"]), st.binary(max_size=60), st.binary(max_size=60))
def test_the_header_digest_depends_on_the_headers_only(fields: list[bytes], line_end: bytes, body: bytes,
                                                       other_body: bytes) -> None:
    """Prefix-stable: the same header block with any body, any line ends, with or without the empty line (TOP
    of a message without a body), gives the same digest; other headers give another."""
    head = b"".join(field + line_end for field in fields)
    digest = header_block_digest(head + line_end + body)
    assert digest == header_block_digest(head + line_end + other_body)
    assert digest == header_block_digest(head.replace(b"\r\n", b"\n") + b"\n")
    assert digest == header_block_digest(head)
    assert digest == header_block_digest(head.replace(b"\n", b"\r\n").replace(b"\r\r", b"\r") + b"\r\n")
    assert digest != header_block_digest(b"X-Other: 1" + line_end + head + line_end + body)
    assert len(digest) == 64 and digest == hashlib.sha256(head.replace(b"\r", b"").rstrip(b"\n")).hexdigest()
