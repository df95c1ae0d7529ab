"""SMTP and LMTP faults: a message counts as delivered only when the MTA answered 250 to its data (LMTP: for every
recipient); anything else leaves it on the server -- deferred (4xx, connection trouble) or recorded as rejected
with the MTA's reply (5xx). The scripted server of ``tests/servers/faulty_smtp.py`` produces the faults a real MTA
won't on demand; the aiosmtpd sink and Dovecot's LMTP show the same rules against real implementations. The
messages come from a `FakeMailbox` in memory: what is "on the server" is what it still holds.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from postbote.errors import ConfigError
from postbote.state import DELIVERED
from structlog.testing import capture_logs

from tests.conftest import DovecotFactory, SinkFactory
from tests.harness import (
    FaultyTarget,
    RigFactory,
    SinkTarget,
    corpus,
    corpus_message,
    corpus_number,
)
from tests.servers.faulty_smtp import DROP, FaultySMTP, Stall
from tests.servers.smtp_sink import SMTPSink

pytestmark = pytest.mark.usefixtures("time_limit")

TEMPORARY = (421, 451, 452)
PERMANENT = (550, 552, 554)
STAGES = ("CONNECT", "EHLO", "MAIL", "RCPT", "DATA", "END")
# Every stage, once for a server without CHUNKING (the data goes with DATA) and once with it (BDAT, RFC 3030: the
# whole transaction is written without waiting, and the answers are read afterwards).
WIRE_STAGES = [pytest.param(wire, stage, id=f"{wire}-{stage}") for wire in ("DATA", "BDAT") for stage in STAGES
               if not (wire == "BDAT" and stage == "DATA")]


@pytest.fixture
def faulty(request: pytest.FixtureRequest) -> Iterator[FaultySMTP]:
    """The scripted MTA; parametrize it indirectly with ``"BDAT"`` to have it offer CHUNKING."""
    with FaultySMTP(chunking=getattr(request, "param", "DATA") == "BDAT") as server:
        yield server


@pytest.fixture
def faulty_lmtp() -> Iterator[FaultySMTP]:
    with FaultySMTP(lmtp=True) as server:
        yield server


def scripted(code: int) -> str:
    return f"{code} {code // 100}.3.0 scripted refusal"


def expected_fate(stage: str, code: int) -> str:
    """What the matrix expects for the first message: a refused EHLO still leaves HELO (RFC 5321 3.2), except
    after 421, which closes the connection."""
    if stage == "EHLO" and code != 421:
        return "delivered"
    return "deferred" if code < 500 else "rejected"


@pytest.mark.parametrize("code", TEMPORARY + PERMANENT)
@pytest.mark.parametrize(("faulty", "stage"), WIRE_STAGES, indirect=["faulty"])
def test_every_refusal_at_every_stage_keeps_the_message_on_the_server_or_records_why(
        make_rig: RigFactory, faulty: FaultySMTP, stage: str, code: int) -> None:
    faulty.on(stage, scripted(code))
    rig = make_rig(corpus(3), target=FaultyTarget(faulty), source="fake")

    first = rig.poll()

    assert first.ok, "a refusing MTA does not fail the account's poll"
    audit = rig.audit()
    fate = expected_fate(stage, code)
    if fate == "delivered":
        assert audit.delivered_once == [1, 2, 3] and not audit.on_server
        return
    assert audit.on_server == (1,) and audit.delivered_once == [2, 3]
    if fate == "rejected":
        assert str(code) in audit.rejected[1] and "scripted refusal" in audit.rejected[1]
        rig.poll()
        assert rig.audit().on_server == (1,), "a rejected message must wait for `postbote retry`"
        assert sum(1 for c in faulty.commands if c.startswith("MAIL")) <= 3 + (stage != "MAIL")
    else:
        assert audit.rejected == {}
        rig.poll()
        assert rig.audit().everything_delivered_once_and_deleted


@pytest.mark.parametrize(("faulty", "stage"), WIRE_STAGES, indirect=["faulty"])
def test_a_connection_dropped_at_any_stage_defers_the_message(make_rig: RigFactory, faulty: FaultySMTP,
                                                              stage: str) -> None:
    faulty.on(stage, DROP)
    rig = make_rig(corpus(3), target=FaultyTarget(faulty), source="fake")

    assert rig.poll().deferred == 1
    assert rig.audit().on_server == (1,)

    rig.poll()
    audit = rig.audit()
    assert not audit.on_server and audit.undelivered == []
    assert audit.duplicates == 0


@pytest.mark.parametrize("faulty", ["DATA", "BDAT"], indirect=True)
def test_dropped_after_the_data_before_the_reply_the_message_stays_and_costs_at_most_one_duplicate(
        make_rig: RigFactory, faulty: FaultySMTP) -> None:
    """The ambiguous case (RFC 1047): the MTA has the whole message but said nothing. It may or may not have kept
    it; postbote must assume it did not, keep the message on the server and send it again."""
    faulty.on("END", DROP)
    rig = make_rig(corpus(2), target=FaultyTarget(faulty), source="fake")

    rig.poll()

    assert [corpus_number(r.data) for r in faulty.received if r.replies is None] == [1]
    assert rig.audit().on_server == (1,)
    rig.poll()
    assert rig.audit().everything_delivered_once_and_deleted
    copies_the_mta_may_hold = [corpus_number(r.data) for r in faulty.received]
    assert copies_the_mta_may_hold.count(1) == 2 and copies_the_mta_may_hold.count(2) == 1


@pytest.mark.parametrize("faulty", ["DATA", "BDAT"], indirect=True)
def test_an_mta_that_always_drops_after_the_data_gets_at_most_two_copies_then_the_message_is_held(
        make_rig: RigFactory, faulty: FaultySMTP) -> None:
    """Never a copy per poll: an answer lost after the whole message went out keeps the "in flight" note, so the
    next attempt is counted as a possible second copy, and after that the message is held (rejected, with the
    reason) until `postbote retry` -- instead of a copy in the MTA on every poll."""
    faulty.on("END", DROP, times=None)
    rig = make_rig(corpus(1), target=FaultyTarget(faulty), source="fake")

    polls = [rig.poll() for _ in range(5)]

    assert [(p.deferred, p.rejected) for p in polls[:3]] == [(1, 0), (1, 0), (0, 1)]
    assert len(faulty.received) == 2  # two copies the MTA may hold, then no more
    assert rig.audit().on_server == (1,)  # held on the server, never deleted


@pytest.mark.parametrize("faulty", ["DATA", "BDAT"], indirect=True)
def test_an_mta_that_never_answers_the_data_is_given_up_on_after_the_timeout(make_rig: RigFactory,
                                                                             faulty: FaultySMTP) -> None:
    faulty.on("END", Stall(5.0))
    rig = make_rig(corpus(2), target=FaultyTarget(faulty, timeout="0.5s"), source="fake")

    stats = rig.poll()

    assert stats.duration < 3.0 and stats.deferred == 1
    assert rig.audit().on_server == (1,)


@pytest.mark.parametrize("reply", ["garbage instead of a reply", "2", "250" + "x" * 5000,
                                   "\r\n".join(["250-more"] * 150 + ["250 ok"])],
                         ids=["garbage", "too short", "over-long line", "endless multi-line"])
def test_a_garbled_reply_after_the_data_is_a_temporary_failure(make_rig: RigFactory, faulty: FaultySMTP,
                                                               reply: str) -> None:
    """Whatever the MTA meant, postbote cannot know it took the message: like the ambiguous case, the message
    stays and is sent again, at the price of at most one duplicate."""
    faulty.on("END", reply)
    rig = make_rig(corpus(2), target=FaultyTarget(faulty), source="fake")

    assert rig.poll().deferred == 1

    assert rig.audit().on_server == (1,)
    rig.poll()
    audit = rig.audit()
    assert not audit.on_server and audit.undelivered == [] and audit.duplicates <= 1


def test_an_mta_closed_for_maintenance_defers_every_message_and_delivers_them_later(make_rig: RigFactory,
                                                                                  faulty: FaultySMTP) -> None:
    faulty.on("CONNECT", "421 4.3.2 shutting down for maintenance", times=None)
    rig = make_rig(corpus(3), target=FaultyTarget(faulty), source="fake")

    stats = rig.poll()

    assert (stats.ok, stats.deferred, stats.deleted) == (True, 3, 0)
    assert rig.audit().on_server == (1, 2, 3)
    faulty.clear_rules()
    rig.poll()
    assert rig.audit().everything_delivered_once_and_deleted


def test_an_mta_that_is_not_listening_defers_every_message(make_rig: RigFactory) -> None:
    closed = FaultySMTP()
    closed.stop()  # nothing listens on its port any more
    rig = make_rig(corpus(2), target=FaultyTarget(closed), source="fake")

    stats = rig.poll()

    assert (stats.ok, stats.deferred) == (True, 2)
    assert rig.audit().on_server == (1, 2)


def test_all_recipients_must_be_accepted_before_the_data_is_sent(make_rig: RigFactory, faulty: FaultySMTP) -> None:
    faulty.on("RCPT", "452 4.2.2 mailbox full", argument="bob@example.org")
    rig = make_rig(corpus(1),
                   target=FaultyTarget(faulty, recipients=("alice@example.org", "bob@example.org")), source="fake")

    assert rig.poll().deferred == 1

    assert faulty.received == [], "the data was sent although a recipient had been refused"
    rig.poll()
    assert [len(faulty.copies_for(r)) for r in ("alice@example.org", "bob@example.org")] == [1, 1]
    assert not rig.audit().on_server


def test_a_recipient_refused_for_good_gets_the_message_rejected_for_everyone(make_rig: RigFactory,
                                                                            faulty: FaultySMTP) -> None:
    faulty.on("RCPT", "550 5.1.1 no such user", argument="ghost@example.org", times=None)
    rig = make_rig(corpus(1),
                   target=FaultyTarget(faulty, recipients=("alice@example.org", "ghost@example.org")), source="fake")

    assert rig.poll().rejected == 1

    audit = rig.audit()
    assert audit.on_server == (1,) and "550 5.1.1 no such user" in audit.rejected[1]
    assert faulty.received == []


def test_a_partial_lmtp_success_is_retried_only_for_the_recipients_that_did_not_take_it(
        make_rig: RigFactory, faulty_lmtp: FaultySMTP) -> None:
    faulty_lmtp.on("END", ["250 2.0.0 <alice@example.org> saved", "452 4.2.2 <bob@example.org> over quota"])
    rig = make_rig(corpus(1),
                   target=FaultyTarget(faulty_lmtp, recipients=("alice@example.org", "bob@example.org")), source="fake")

    assert rig.poll().deferred == 1
    assert rig.audit().on_server == (1,)
    rig.poll()

    assert not rig.audit().on_server
    assert len(faulty_lmtp.copies_for("bob@example.org")) == 1
    assert len(faulty_lmtp.copies_for("alice@example.org")) == 1, "alice got the message again"


def test_a_partial_lmtp_success_keeps_the_message_on_the_server(make_rig: RigFactory,
                                                                faulty_lmtp: FaultySMTP) -> None:
    faulty_lmtp.on("END", ["250 2.0.0 saved", "452 4.2.2 over quota"], times=None)
    rig = make_rig(corpus(1),
                   target=FaultyTarget(faulty_lmtp, recipients=("alice@example.org", "bob@example.org")), source="fake")

    stats = rig.poll()

    assert stats.deferred == 1 and rig.audit().on_server == (1,)
    assert faulty_lmtp.copies_for("bob@example.org") == []


def test_a_permanent_lmtp_refusal_for_one_recipient_records_the_message_as_rejected(
        make_rig: RigFactory, faulty_lmtp: FaultySMTP) -> None:
    faulty_lmtp.on("END", ["250 2.0.0 saved", "552 5.2.2 mailbox too big"])
    rig = make_rig(corpus(1),
                   target=FaultyTarget(faulty_lmtp, recipients=("alice@example.org", "bob@example.org")), source="fake")

    assert rig.poll().rejected == 1

    audit = rig.audit()
    assert audit.on_server == (1,) and "1 of 2 recipients" in audit.rejected[1] and "552" in audit.rejected[1]


@pytest.mark.parametrize("code", TEMPORARY + PERMANENT)
def test_lmtp_refusal_of_the_data_follows_the_same_rules(make_rig: RigFactory, faulty_lmtp: FaultySMTP,
                                                        code: int) -> None:
    faulty_lmtp.on("END", [scripted(code)])
    rig = make_rig(corpus(2), target=FaultyTarget(faulty_lmtp), source="fake")

    rig.poll()

    audit = rig.audit()
    assert audit.on_server == (1,) and audit.delivered_once == [2]
    assert (1 in audit.rejected) == (code >= 500)


# --- the same rules against real servers ---------------------------------------------------------------


@pytest.mark.parametrize(("reply", "fate"), [("451 4.3.0 queue full", "deferred"),
                                             ("452 4.3.1 insufficient system storage", "deferred"),
                                             ("552 5.3.4 message too big", "rejected"),
                                             ("554 5.6.0 content refused", "rejected")])
def test_the_aiosmtpd_sink_refusing_the_data_leaves_the_message_on_the_server(
        make_rig: RigFactory, smtp_sink: SMTPSink, reply: str, fate: str) -> None:
    smtp_sink.respond_with(reply, count=1)
    rig = make_rig(corpus(2), target=SinkTarget(smtp_sink), source="fake")

    rig.poll()

    audit = rig.audit()
    assert audit.on_server == (1,) and audit.delivered_once == [2]
    assert (reply in audit.rejected.get(1, "")) == (fate == "rejected")
    rig.poll()
    assert rig.audit().on_server == ((1,) if fate == "rejected" else ())


def test_the_aiosmtpd_sink_refusing_a_recipient_rejects_the_message(make_rig: RigFactory,
                                                                    smtp_sink: SMTPSink) -> None:
    smtp_sink.reject_rcpt("ghost@example.org", "550 5.1.1 no such user here")
    rig = make_rig(corpus(1),
                   target=SinkTarget(smtp_sink, recipients=("me@example.org", "ghost@example.org")), source="fake")

    assert rig.poll().rejected == 1

    assert smtp_sink.attempts == []
    assert "550 5.1.1 no such user here" in rig.audit().rejected[1]


@pytest.mark.dovecot
def test_dovecot_lmtp_refusing_an_unknown_recipient_rejects_the_message_and_delivers_to_nobody(
        make_rig: RigFactory, dovecot_factory: DovecotFactory) -> None:
    dovecot = dovecot_factory(tls=False)
    lmtp = {"lmtp": {"socket": str(dovecot.lmtp_socket), "recipients": ["alice", "ghost"], "timeout": "5s"}}
    rig = make_rig(corpus(1), source="fake")

    stats = rig.poll(deliver=lmtp)

    assert stats.rejected == 1
    assert dovecot.count("alice") == 0, "alice got the message although another recipient was refused"
    audit = rig.audit()
    assert audit.on_server == (1,) and "ghost" in audit.rejected[1]


@pytest.mark.dovecot
def test_dovecot_lmtp_delivery_is_byte_exact_and_then_the_message_is_deleted(
        make_rig: RigFactory, dovecot_factory: DovecotFactory) -> None:
    dovecot = dovecot_factory(tls=False)
    lmtp = {"lmtp": {"socket": str(dovecot.lmtp_socket), "recipients": ["alice", "bob"], "timeout": "5s"}}
    messages = corpus(2)
    rig = make_rig(messages, source="fake")

    assert rig.poll(deliver=lmtp).delivered == 2

    assert rig.server.uids() == []
    for user in ("alice", "bob"):
        stored = sorted(dovecot.messages(user), key=lambda data: corpus_number(data) or 0)
        assert [data.split(b"\nFrom: ", 1)[1] for data in stored] == [
            m.replace(b"\r\n", b"\n").split(b"From: ", 1)[1] for m in messages]


# --- answers read late, and BDAT (RFC 3030) -----------------------------------------------------------------------


@pytest.mark.parametrize("faulty", ["DATA", "BDAT"], indirect=True)
def test_each_message_is_recorded_before_the_next_one_reaches_the_mta(make_rig: RigFactory,
                                                                      faulty: FaultySMTP) -> None:
    """The MTA's answer to a message is read late -- while the next message is fetched -- but always before the
    next message's data goes out, and the message is recorded in between: whenever postbote dies, at most one
    message can be with the MTA and not recorded, so a crash costs at most one duplicate."""
    rig = make_rig(corpus(6), target=FaultyTarget(faulty), source="fake")
    recorded_when_the_mta_got_a_message: list[int] = []
    faulty.on_received = lambda _received: recorded_when_the_mta_got_a_message.append(
        sum(1 for record in rig.records().values() if record.status == DELIVERED))

    assert rig.poll().delivered == 6

    assert recorded_when_the_mta_got_a_message == [0, 1, 2, 3, 4, 5]
    assert rig.audit().everything_delivered_once_and_deleted


def test_with_chunking_the_whole_transaction_goes_out_in_bdat_and_arrives_byte_exact(make_rig: RigFactory) -> None:
    awkward = [b"From: a@example.net\r\nSubject: dots\r\n\r\n.\r\n..\r\n.x\r\nend\r\n",
               b"From: b@example.net\nSubject: bare LF, NUL, 8-bit\n\nline\x00one\n\xc3\xa4\xff\n",
               b"From: c@example.net\r\nSubject: no final line break\r\n\r\nlast line"]
    messages = [*corpus(3), *awkward]
    with FaultySMTP(chunking=True) as server:
        rig = make_rig(messages, target=FaultyTarget(server), source="fake")

        assert rig.poll().delivered == len(messages)

        assert [r.via for r in server.received] == ["BDAT"] * len(messages)
        arrived = sorted(strip_received(r.data) for r in server.received)
    assert arrived == sorted(crlf_with_final_line_break(m) for m in messages)
    assert not rig.server.uids()


def test_a_message_larger_than_one_bdat_chunk_arrives_whole(make_rig: RigFactory) -> None:
    big = corpus_message(1, body_lines=60_000)  # ~1.6 MB: two chunks
    with FaultySMTP(chunking=True) as server:
        rig = make_rig([big, corpus_message(2)], target=FaultyTarget(server), source="fake")

        assert rig.poll().delivered == 2

        assert [strip_received(r.data) for r in server.received] == [big, corpus_message(2)]
        assert sum(1 for c in server.commands if c.startswith("BDAT ")) == 3


@pytest.mark.parametrize("code", [452, 554])
def test_a_refused_bdat_chunk_fails_that_message_only(make_rig: RigFactory, code: int) -> None:
    big = corpus_message(1, body_lines=60_000)
    with FaultySMTP(chunking=True) as server:
        server.on("BDAT", scripted(code))
        rig = make_rig([big, corpus_message(2)], target=FaultyTarget(server), source="fake")

        stats = rig.poll()

        assert (stats.delivered, stats.deferred + stats.rejected) == (1, 1)
        audit = rig.audit()
        assert audit.on_server == (1,) and audit.delivered_once == [2]
        if code >= 500:
            assert str(code) in audit.rejected[1]
        else:
            rig.poll()
            assert rig.audit().everything_delivered_once_and_deleted


def strip_received(data: bytes) -> bytes:
    """The message as it left the mailbox: our ``Received:`` field (folded over several lines) removed."""
    assert data.startswith(b"Received: ")
    return re.sub(rb"\AReceived: .*?\r\n(?![ \t])", b"", data, count=1, flags=re.DOTALL)


def crlf_with_final_line_break(data: bytes) -> bytes:
    data = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    return data if data.endswith(b"\r\n") else data + b"\r\n"


# --- a sender the MTA cannot take (issue 11 item 16) ----------------------------------------------------

UTF8_SENDER = "jörg@example.de"


def with_return_path(data: bytes, sender: str) -> bytes:
    return f"Return-Path: <{sender}>\r\n".encode() + data


@pytest.mark.parametrize(("fallback", "expected_sender"),
                         [(None, "<>"), ("bounces@example.org", "bounces@example.org")])
def test_a_non_ascii_return_path_to_an_mta_without_smtputf8_is_sent_with_the_fallback_sender(
        make_rig: RigFactory, smtp_sink_factory: SinkFactory, fallback: str | None, expected_sender: str) -> None:
    smtp_sink = smtp_sink_factory(smtputf8=False)
    target = SinkTarget(smtp_sink)
    options = target.deliver()
    if fallback is not None:
        options["smtp"]["fallback_sender"] = fallback
    rig = make_rig([with_return_path(corpus_message(1), UTF8_SENDER), corpus_message(2)], target=target, source="fake")

    with capture_logs() as logs:
        stats = rig.poll(deliver=options)

    assert (stats.delivered, stats.rejected, stats.deferred) == (2, 0, 0)
    assert rig.audit().on_server == ()
    first, second = smtp_sink.messages
    assert (first.mail_from, first.rcpt_tos) == (expected_sender, ["me@example.org"])
    assert strip_received(first.data) == with_return_path(corpus_message(1), UTF8_SENDER), "the message is unchanged"
    assert second.mail_from == "<>", "a message without Return-Path goes with <> as before"
    replaced = [entry for entry in logs if entry["event"] == "smtp.sender_replaced"]
    shown = "<>" if expected_sender == "<>" else f"<{expected_sender}>"
    assert [(entry["original"], entry["replacement"]) for entry in replaced] == [(f"<{UTF8_SENDER}>", shown)]


def test_a_non_ascii_return_path_is_kept_when_the_mta_offers_smtputf8(make_rig: RigFactory,
                                                                      smtp_sink: SMTPSink) -> None:
    rig = make_rig([with_return_path(corpus_message(1), UTF8_SENDER)], target=SinkTarget(smtp_sink), source="fake")

    assert rig.poll().delivered == 1

    [attempt] = smtp_sink.attempts
    assert attempt.mail_from == UTF8_SENDER and "SMTPUTF8" in attempt.mail_options


def test_a_fallback_sender_that_is_not_ascii_is_a_config_error(make_rig: RigFactory, smtp_sink: SMTPSink) -> None:
    options = SinkTarget(smtp_sink).deliver()
    options["smtp"]["fallback_sender"] = UTF8_SENDER
    rig = make_rig(corpus(1), target=SinkTarget(smtp_sink), source="fake")

    with pytest.raises(ConfigError, match="fallback_sender: expected <> or an ASCII mail address"):
        rig.poll(deliver=options)
