"""POP3 faults: whatever the server does wrong, every message ends up still on the server, delivered exactly once,
or recorded as rejected with the reason -- never lost.

The harness these tests share with the other fault suites (the corpus, `Rig`, `Audit`, the targets) is
``tests/harness.py``; its fixtures are in ``tests/conftest.py``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from postbote.testing.pop3server import Action, Faults

from tests.harness import MaildirTarget, RigFactory, SinkTarget, corpus, corpus_message, corpus_number
from tests.servers.smtp_sink import SMTPSink

pytestmark = pytest.mark.usefixtures("time_limit")

# Each fault fires once (``times=1``); the polls after it meet a well-behaved server. What a user checks after
# the first, faulty poll: nothing was deleted that was not delivered; after the later polls: every message was
# delivered exactly once and the mailbox is empty.

BROKEN_AT: dict[str, tuple[str, Action]] = {
    "greeting never sent": ("GREETING", Action.drop()),
    "dropped at CAPA": ("CAPA", Action.drop()),
    "dropped at USER": ("USER", Action.drop()),
    "dropped at PASS": ("PASS", Action.drop()),
    "dropped at UIDL": ("UIDL", Action.drop()),
    "dropped midway through UIDL": ("UIDL", Action.drop_midway(after_bytes=30)),
    "dropped at LIST": ("LIST", Action.drop()),
    "dropped at the first RETR": ("RETR 1", Action.drop()),
    "dropped midway through RETR": ("RETR 2", Action.drop_midway(after_bytes=60)),
    "dropped after RETR's status line": ("RETR 3", Action.drop_midway(after_bytes=0)),
    "dropped at DELE": ("DELE 2", Action.drop()),
    "dropped after DELE's reply": ("DELE 1", Action.drop_after_reply()),
    "dropped before QUIT": ("QUIT", Action.drop()),
    "dropped after QUIT's +OK": ("QUIT", Action.drop_after_reply()),
    "QUIT applied but its reply lost": ("QUIT", Action.drop_midway(after_bytes=0)),
    "-ERR to RETR": ("RETR 2", Action.reply("-ERR [SYS/TEMP] cannot open message")),
    "-ERR to UIDL": ("UIDL", Action.reply("-ERR [SYS/TEMP] index busy")),
    "-ERR to LIST": ("LIST", Action.reply("-ERR [SYS/TEMP] index busy")),
    "-ERR to DELE": ("DELE 1", Action.reply("-ERR [SYS/TEMP] cannot delete now")),
    "-ERR to QUIT": ("QUIT", Action.reply("-ERR [SYS/TEMP] expunge failed")),
    "garbage greeting": ("GREETING", Action.reply("HTTP/1.1 400 Bad Request")),
    "garbage reply to PASS": ("PASS", Action.reply("\x00\x01\x02 nonsense")),
    "garbage reply to UIDL": ("UIDL", Action.reply("+OK\r\nthis is not a listing\r\n.")),
    "garbage reply to LIST": ("LIST", Action.reply("+OK\r\n1 many\r\n.")),
    "garbage reply to RETR": ("RETR 1", Action.reply("OK here it comes")),
    "garbage reply to DELE": ("DELE 2", Action.reply("what?")),
    "garbage reply to QUIT": ("QUIT", Action.reply("bye?")),
    "over-long greeting": ("GREETING", Action.reply(b"+OK " + b"x" * 100_000)),
    "over-long reply to UIDL": ("UIDL", Action.reply(b"+OK " + b"x" * 100_000)),
    "over-long reply to RETR": ("RETR 2", Action.reply(b"+OK " + b"x" * 100_000)),
    "over-long reply to DELE": ("DELE 1", Action.reply(b"-ERR " + b"x" * 100_000)),
    "over-long UIDL line": ("UIDL", Action.flood(b"1 " + b"u" * 20_000, count=1)),
}


@pytest.mark.parametrize("fault", BROKEN_AT.values(), ids=BROKEN_AT.keys())
def test_whatever_breaks_in_the_session_no_message_is_lost_and_each_arrives_once(
        make_rig: RigFactory, fault: tuple[str, Action]) -> None:
    command, action = fault
    faults = Faults().on(command, action=action)
    rig = make_rig(corpus(4), faults)

    rig.poll()
    after_fault = rig.audit()
    assert after_fault.duplicates == 0

    rig.poll_until_done()
    assert faults.fired, "the fault never fired: the test proves nothing"
    assert rig.audit().everything_delivered_once_and_deleted


def test_a_drop_midway_through_retr_keeps_that_message_and_those_after_it(make_rig: RigFactory,
                                                                          tmp_path: Path) -> None:
    maildir = MaildirTarget(tmp_path / "Maildir")
    rig = make_rig(corpus(5), Faults().on("RETR 3", action=Action.drop_midway(after_bytes=100)), target=maildir)

    first = rig.poll()

    assert not first.ok and "connection closed by the server" in (first.error or "")
    audit = rig.audit()
    assert audit.on_server == (1, 2, 3, 4, 5)  # no QUIT reached the server: nothing is deleted
    assert audit.delivered_once == [1, 2] and audit.undelivered == [3, 4, 5]
    assert maildir.files("tmp") == [], "a partial message was left in the Maildir"
    second = rig.poll()
    assert (second.ok, second.delivered, second.deleted) == (True, 3, 5)
    assert rig.audit().everything_delivered_once_and_deleted


def test_a_drop_midway_through_retr_to_smtp_delivers_nothing_partial(make_rig: RigFactory,
                                                                      smtp_sink: SMTPSink) -> None:
    rig = make_rig(corpus(3, body_lines=200), Faults().on("RETR 2", action=Action.drop_midway(after_bytes=2000)),
                   target=SinkTarget(smtp_sink))

    rig.poll()

    assert [corpus_number(m.data) for m in smtp_sink.messages] == [1]
    assert rig.audit().on_server == (1, 2, 3)
    rig.poll()
    assert rig.audit().everything_delivered_once_and_deleted


def test_retr_data_much_shorter_than_list_said_is_not_trusted_and_stays_on_the_server(make_rig: RigFactory) -> None:
    """A properly terminated reply that is far shorter than LIST said is a broken transfer (a server or proxy cut
    the message), not the message: delivering it and sending DELE would destroy the rest."""
    rig = make_rig(corpus(3, body_lines=40), Faults().on("RETR 2", action=Action.truncate(n_bytes=150)))

    rig.poll()

    audit = rig.audit()
    assert 2 in audit.on_server, "the truncated message was deleted from the server"
    assert all(len(data) > 1000 for data in rig.target.delivered()), "a truncated copy was delivered"


def test_retr_data_a_little_longer_than_list_said_is_delivered_as_the_server_sent_it(make_rig: RigFactory) -> None:
    """Servers that count LF-only sizes announce less than they send; the data is the message."""
    extra = b"X-Appended-By-Server: yes\r\n"
    rig = make_rig(corpus(2), Faults().on("RETR 1", action=Action.extend(extra)))

    assert rig.poll().ok

    assert rig.audit().everything_delivered_once_and_deleted
    (first,) = [data for data in rig.target.delivered() if corpus_number(data) == 1]
    assert first.endswith(extra.replace(b"\r\n", b"\n"))


def test_retr_data_far_longer_than_list_said_is_rejected_with_the_reason_and_left_on_the_server(
        make_rig: RigFactory) -> None:
    rig = make_rig(corpus(3), Faults().on("RETR 2", action=Action.extend(b"y" * 100 + b"\r\n" * 3_000_000)))

    first = rig.poll()

    assert not first.ok and "exceeds" in (first.error or "")
    second = rig.poll()
    assert second.ok and second.left == 1
    audit = rig.audit()
    assert audit.on_server == (2,) and audit.delivered_once == [1, 3]
    assert "message data exceeds" in audit.rejected[2]


def test_an_endless_retr_is_cut_off_at_max_size_and_the_message_recorded_as_rejected(make_rig: RigFactory) -> None:
    rig = make_rig(corpus(2), Faults().on("RETR 1", action=Action.flood(b"z" * 998)))

    first = rig.poll(max_size="200kB")

    assert not first.ok and "exceeds 200000 bytes" in (first.error or "")
    rig.poll(max_size="200kB")
    audit = rig.audit()
    assert audit.on_server == (1,) and audit.delivered_once == [2] and 1 in audit.rejected


def test_a_retr_without_its_terminating_dot_times_out_and_the_message_stays(make_rig: RigFactory) -> None:
    rig = make_rig(corpus(3), Faults().on("RETR 2", action=Action.no_terminator()))

    started = time.monotonic()
    first = rig.poll(timeout="0.5s")

    assert time.monotonic() - started < 3.0
    assert not first.ok and "timed out" in (first.error or "")
    assert rig.audit().on_server == (1, 2, 3)
    rig.poll_until_done()
    assert rig.audit().everything_delivered_once_and_deleted


STALLS = ["GREETING", "USER", "PASS", "UIDL", "LIST", "RETR 2", "DELE 1", "QUIT"]


@pytest.mark.parametrize("command", STALLS)
def test_a_stalling_server_is_given_up_on_after_the_timeout_and_nothing_is_lost(make_rig: RigFactory,
                                                                               command: str) -> None:
    rig = make_rig(corpus(3), Faults().on(command, action=Action.stall(0.9)))

    started = time.monotonic()
    first = rig.poll(timeout="0.2s")

    assert time.monotonic() - started < 0.8, "the poll waited for the stalled server instead of timing out"
    assert not first.ok and "timed out" in (first.error or "")
    assert rig.audit().duplicates == 0
    time.sleep(0.7)  # until the stalled server session lets go of the mailbox
    rig.poll_until_done()
    assert rig.audit().everything_delivered_once_and_deleted


def test_a_server_listing_one_uid_twice_gets_neither_message_touched(make_rig: RigFactory) -> None:
    rig = make_rig(corpus(3), Faults(uidl_override=lambda _session, uids: [uids[0], *uids[:-1]]))

    for _ in range(2):
        stats = rig.poll()
        assert stats.ok and stats.left == 2

    audit = rig.audit()
    assert audit.on_server == (1, 2) and audit.undelivered == [1, 2] and audit.delivered_once == [3]


def test_an_invalid_uid_fails_the_poll_without_touching_any_message(make_rig: RigFactory) -> None:
    rig = make_rig(corpus(2), Faults(uidl_override=lambda _session, uids: ["u" * 71, uids[1]]))

    stats = rig.poll()

    assert not stats.ok and "invalid unique id" in (stats.error or "")
    audit = rig.audit()
    assert audit.on_server == (1, 2) and audit.undelivered == [1, 2]


def test_uids_renumbered_between_polls_cost_at_most_one_duplicate_and_lose_nothing(make_rig: RigFactory) -> None:
    """A server that re-indexes (a new UIDVALIDITY) gives every message a new UID. Messages delivered but not yet
    deleted (here: QUIT was lost) then look new and are delivered once more -- never lost."""
    renumbered = Faults(uidl_override=lambda session, uids: uids if session == 1 else [f"new-{u}" for u in uids])
    rig = make_rig(corpus(4), renumbered.on("QUIT", action=Action.drop()))

    rig.poll()
    rig.poll_until_done()

    audit = rig.audit()
    assert not audit.on_server
    assert all(1 <= audit.copies[n] <= 2 for n in audit.numbers)


def test_a_uid_that_the_server_gives_to_another_message_does_not_get_that_message_deleted(
        make_rig: RigFactory) -> None:
    """RFC 1939 forbids it, but servers that derive UIDs from message numbers do it: poll 1 delivers message 1
    (UID a), cannot fetch message 2 (UID b) and loses QUIT; in poll 2 the UIDs have swapped."""
    swapped = Faults(uidl_override=lambda session, uids: uids if session == 1 else list(reversed(uids)))
    swapped.on("RETR 2", action=Action.reply("-ERR [SYS/TEMP] try later")).on("QUIT", action=Action.drop())
    rig = make_rig([corpus_message(1), corpus_message(2, body_lines=30)], swapped)

    rig.poll_until_done()

    audit = rig.audit()
    assert 2 in audit.copies or 2 in audit.on_server, "message 2 was deleted without ever being delivered"


def test_a_refused_dele_keeps_the_record_and_the_next_poll_deletes_without_delivering_again(
        make_rig: RigFactory) -> None:
    rig = make_rig(corpus(3), Faults().on("DELE", times=None, action=Action.reply("-ERR [SYS/TEMP] read-only")))

    first = rig.poll()

    assert (first.ok, first.delivered, first.deleted) == (True, 3, 0)
    assert rig.audit().on_server == (1, 2, 3)
    rig.server.faults = None
    second = rig.poll()
    assert (second.delivered, second.deleted) == (0, 3)
    assert rig.audit().everything_delivered_once_and_deleted


@pytest.mark.parametrize("refusal", [("USER", "-ERR [AUTH] no such user"),
                                     ("PASS", "-ERR [AUTH] Authentication failed"),
                                     ("PASS", "-ERR [IN-USE] mailbox locked by another session"),
                                     ("PASS", "-ERR [SYS/TEMP] try again later")])
def test_a_refused_login_fails_the_account_with_the_servers_reason_and_touches_nothing(
        make_rig: RigFactory, refusal: tuple[str, str]) -> None:
    command, reply = refusal
    rig = make_rig(corpus(2), Faults().on(command, action=Action.reply(reply)))

    stats = rig.poll()

    assert not stats.ok and f"login refused: {reply[5:]}" in (stats.error or "")
    audit = rig.audit()
    assert audit.on_server == (1, 2) and audit.undelivered == [1, 2]
    assert not any(c.split()[0] in ("RETR", "DELE") for c in rig.server.commands)


def test_a_wrong_password_is_refused_and_nothing_is_fetched(make_rig: RigFactory) -> None:
    rig = make_rig(corpus(1))

    stats = rig.poll(password="not-the-password")

    assert not stats.ok and "login refused" in (stats.error or "")
    assert rig.audit().on_server == (1,)


def test_a_message_the_server_cannot_send_does_not_hold_up_the_others(make_rig: RigFactory) -> None:
    rig = make_rig(corpus(4), Faults().on("RETR 2", action=Action.reply("-ERR message is damaged")))

    stats = rig.poll()

    assert stats.ok and stats.left == 1
    audit = rig.audit()
    assert audit.on_server == (2,) and audit.delivered_once == [1, 3, 4]
    rig.poll()
    assert rig.audit().everything_delivered_once_and_deleted
