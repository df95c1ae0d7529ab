"""IMAP destination faults a real Dovecot will not produce on demand (issue 13), played by the scriptable IMAP server
`postbote.testing.imapserver`: servers without UIDPLUS or LITERAL+, a connection dropped before or after the APPEND
was stored, BYE, a stall past the timeout, garbage instead of an answer, untagged chatter before it. Whatever
happens, a message leaves the source only with the server's tagged OK; an answer that never arrives costs at most
one more copy, never the message.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from postbote.state import DEFERRED, DELIVERED
from postbote.testing.imapserver import DEFAULT_CAPABILITIES, REV2_ONLY, Action, Faults, IMAPServer

from tests.harness import RigFactory, corpus, corpus_number

pytestmark = pytest.mark.usefixtures("time_limit")


class FaultyIMAPTarget:
    """The scriptable server's folder as a rig's destination."""

    def __init__(self, server: IMAPServer, folder: str = "INBOX", **options: Any) -> None:
        self.server = server
        self.folder = folder
        self.options = options

    def deliver(self) -> dict[str, Any]:
        return {"imap": {"host": self.server.host, "port": self.server.port, "tls": "none", "username": "demo",
                         "password": "demo", "folder": self.folder, "timeout": "1s", **self.options}}

    def delivered(self) -> list[bytes]:
        return [message.data for message in self.server.messages(self.folder)]


@pytest.fixture
def imap_server(request: pytest.FixtureRequest) -> Iterator[IMAPServer]:
    """The scripted server; parametrize indirectly with a capability list to replace the default one."""
    capabilities = getattr(request, "param", DEFAULT_CAPABILITIES)
    with IMAPServer(capabilities=capabilities, faults=Faults()) as server:
        yield server
    assert server.errors == []


def faults(server: IMAPServer) -> Faults:
    assert server.faults is not None
    return server.faults


WITHOUT = {name: tuple(c for c in DEFAULT_CAPABILITIES if c != name) for name in ("UIDPLUS", "LITERAL+")}


@pytest.mark.parametrize("imap_server", [WITHOUT["UIDPLUS"]], indirect=True)
def test_without_uidplus_the_answer_names_the_folder_only(make_rig: RigFactory, imap_server: IMAPServer) -> None:
    rig = make_rig(corpus(2), target=FaultyIMAPTarget(imap_server), source="fake")

    assert rig.poll().delivered == 2
    assert {record.reason for record in rig.records().values()} == {"imap: appended to INBOX"}
    assert rig.audit().everything_delivered_once_and_deleted


@pytest.mark.parametrize("imap_server", [REV2_ONLY], indirect=True)
def test_an_imap4rev2_only_server_takes_appends_and_an_unanswered_one_is_found_by_esearch(
        make_rig: RigFactory, imap_server: IMAPServer) -> None:
    """IMAP4rev2 (RFC 9051) includes UIDPLUS and LITERAL-: small messages go without waiting for "+", APPENDUID
    names the UID, and the search for a message whose answer was lost is answered with ESEARCH."""
    faults(imap_server).on("APPEND", action=Action.drop_midway(after_bytes=3))
    rig = make_rig(corpus(3), target=FaultyIMAPTarget(imap_server), source="fake")

    first = rig.poll()
    assert first.delivered == 0 and first.deferred == 3, first

    second = rig.poll()
    assert second.delivered == 3, second
    assert rig.audit().everything_delivered_once_and_deleted
    records = rig.records()
    assert records["uid-1"].reason.startswith("found already delivered: INBOX, UID 1 ")
    assert any(record.reason.startswith("imap: appended to INBOX as UID ") for record in records.values())
    assert any("UID SEARCH RETURN (ALL) HEADER Message-ID" in command for command in imap_server.commands)


@pytest.mark.parametrize("imap_server", [WITHOUT["LITERAL+"]], indirect=True)
def test_without_literal_plus_each_message_waits_for_the_go_ahead_and_arrives(
        make_rig: RigFactory, imap_server: IMAPServer) -> None:
    rig = make_rig(corpus(5, body_lines=30), target=FaultyIMAPTarget(imap_server), source="fake")

    stats = rig.poll()

    assert stats.ok and stats.delivered == 5, stats
    assert [corpus_number(m.data) for m in imap_server.messages()] == [1, 2, 3, 4, 5]
    assert imap_server.sessions == 1


@pytest.mark.parametrize("imap_server", [WITHOUT["LITERAL+"]], indirect=True)
def test_without_literal_plus_a_missing_folder_is_created_and_the_message_sent_again(
        make_rig: RigFactory, imap_server: IMAPServer) -> None:
    target = FaultyIMAPTarget(imap_server, folder="Archive/Old")
    rig = make_rig(corpus(2), target=target, source="fake")

    assert rig.poll().delivered == 2
    assert [corpus_number(m.data) for m in imap_server.messages("Archive/Old")] == [1, 2]
    assert sum(command.startswith("CREATE") for command in imap_server.commands) == 1


@pytest.mark.parametrize(("action", "what"), [
    (Action.drop(), "the connection dropped before the APPEND was done"),
    (Action.bye("shutting down"), "BYE instead of an answer"),
    (Action.stall(3.0), "no answer within the timeout"),
    (Action.reply("{tag} WHAT is this"), "garbage instead of an answer"),
    (Action.reply("* OK [ALERT] hello\r\n{tag} OK [APPENDUID oops] done"), "an APPENDUID that is no number"),
])
def test_an_append_without_a_clear_ok_defers_it_and_those_sent_after_it_and_the_next_poll_delivers_each_once(
        make_rig: RigFactory, imap_server: IMAPServer, action: Action, what: str) -> None:
    """The APPENDs go out without waiting for each answer: when the second one's answer does not come, the session
    ends with the later ones unanswered too. They stay on the source; the next poll finds the ones the server
    stored after all (by Message-ID, size and header) and appends only the others -- no message twice."""
    faults(imap_server).on("APPEND", nth=2, action=action)
    rig = make_rig(corpus(4), target=FaultyIMAPTarget(imap_server), source="fake")

    stats = rig.poll()

    # the first one's OK may be lost with the session too, when the break came while a later APPEND was sent
    assert stats.ok and stats.delivered <= 1 and stats.delivered + stats.deferred == 4, (what, stats)
    assert {2, 3, 4} <= set(rig.audit().on_server)
    second = rig.records()["uid-2"]
    assert second.status == DEFERRED and second.reason.startswith("imap ") \
        and "it may have arrived" in second.reason
    assert rig.poll().delivered == 4 - stats.delivered
    assert rig.audit().everything_delivered_once_and_deleted, what


def test_an_answer_lost_after_the_server_stored_the_message_costs_no_copy_when_the_next_poll_finds_it(
        make_rig: RigFactory, imap_server: IMAPServer) -> None:
    """The ambiguous case (RFC 1047's for SMTP): the server stored the message and the connection died before its
    OK arrived. postbote cannot know then; it keeps the message on the source, and the next poll looks for it in
    the folder before appending it again."""
    faults(imap_server).on("APPEND", action=Action.drop_midway(after_bytes=3))
    rig = make_rig(corpus(2), target=FaultyIMAPTarget(imap_server), source="fake")

    first = rig.poll()
    assert first.deferred == 2 and first.delivered == 0  # the second APPEND was on its way behind the first
    assert rig.audit().on_server == (1, 2)
    with structlog.testing.capture_logs() as logs:
        assert rig.poll().delivered == 2

    audit = rig.audit()
    assert audit.everything_delivered_once_and_deleted and audit.copies[1] == 1
    (found,) = [entry for entry in logs if entry["event"] == "message.found_delivered"]
    assert found["answer"].startswith("found already delivered: INBOX, UID 1 ")


def test_the_search_for_a_lost_answer_compares_at_most_twenty_candidates_and_else_appends_again(
        make_rig: RigFactory, imap_server: IMAPServer) -> None:
    """A folder (or a server) with many messages of one Message-ID and size costs at most 20 header fetches; the
    message is then appended again -- one copy more, never taken for one of the others."""
    faults(imap_server).on("APPEND", action=Action.drop_midway(after_bytes=3))
    rig = make_rig(corpus(1), target=FaultyIMAPTarget(imap_server), source="fake")
    assert rig.poll().deferred == 1
    (stored,) = imap_server.messages()
    for number in range(30):  # the same size, another Subject: newer than the message, so compared first
        decoy = stored.data.replace(b"corpus message 1", f"decoy message {number:02d}".encode())
        imap_server.add_message("INBOX", decoy)
    before = len(imap_server.commands)

    assert rig.poll().delivered == 1

    header_fetches = [c for c in imap_server.commands[before:] if c.startswith("UID FETCH") and "HEADER" in c]
    assert len(header_fetches) == 20
    ours = [m for m in imap_server.messages() if b"Subject: corpus message 1\r\n" in m.data]
    assert len(ours) == 2 and not rig.audit().on_server  # the decoys share its Message-ID: counted apart


def test_a_message_that_cannot_be_searched_for_costs_one_copy_after_a_lost_answer_never_the_message(
        make_rig: RigFactory, imap_server: IMAPServer) -> None:
    """A message without a Message-ID to search by (here: one too long to send in a SEARCH) is appended again when
    its answer was lost -- one copy more -- and no other APPEND goes out while its answer is awaited, so a break
    costs at most that one copy."""
    faults(imap_server).on("APPEND", action=Action.drop_midway(after_bytes=3))
    unsearchable = [message.replace(b"@postbote.test>", b"@postbote.test> (" + b"x" * 1000 + b")", 1)
                    for message in corpus(2)]
    rig = make_rig(unsearchable, target=FaultyIMAPTarget(imap_server), source="fake")

    first = rig.poll()
    assert first.deferred == 1 and first.delivered == 1
    rig.poll()

    audit = rig.audit()
    assert not audit.on_server and audit.copies[1] == 2 and audit.copies[2] == 1


def test_untagged_chatter_before_the_answer_is_taken_in_stride(make_rig: RigFactory,
                                                               imap_server: IMAPServer) -> None:
    faults(imap_server).on("APPEND", times=None,
                           action=Action.before(b"* 7 EXISTS\r\n* 3 RECENT\r\n* OK [ALERT] maintenance tonight\r\n"))
    rig = make_rig(corpus(3), target=FaultyIMAPTarget(imap_server), source="fake")

    assert rig.poll().delivered == 3
    assert all(r.status == DELIVERED for r in rig.records().values())
    assert imap_server.sessions == 1


def test_a_temporary_refusal_keeps_the_session(make_rig: RigFactory, imap_server: IMAPServer) -> None:
    faults(imap_server).on("APPEND", nth=1, action=Action.no("OVERQUOTA", "mailbox full"))
    rig = make_rig(corpus(3), target=FaultyIMAPTarget(imap_server), source="fake")

    stats = rig.poll()

    assert stats.deferred == 1 and stats.delivered == 2
    assert imap_server.sessions == 1


@pytest.mark.parametrize("action", [Action.bad("8-bit NUL in literal"), Action.no(None, "invalid message")],
                         ids=["BAD", "NO"])
def test_a_server_that_refuses_a_nul_byte_rejects_the_message_and_says_why(
        make_rig: RigFactory, imap_server: IMAPServer, action: Action) -> None:
    """IMAP allows NUL only in a BINARY literal (RFC 3516); postbote sends it in a plain one (Dovecot stores it as
    sent). A server that refuses it can never take the message: rejected, with the NUL named, kept on the source."""
    faults(imap_server).on("APPEND", action=action)
    rig = make_rig([b"Message-ID: <corpus-1@postbote.test>\r\n\r\nnul\x00byte\r\n"],
                   target=FaultyIMAPTarget(imap_server), source="fake")

    stats = rig.poll()

    assert stats.rejected == 1 and stats.deferred == 0, stats
    audit = rig.audit()
    assert audit.on_server == (1,) and "NUL byte" in audit.rejected[1], audit.rejected
