"""Polling rules that keep mail safe, proven against a mailbox and a real Maildir (issues #2, #3).

Each test says what a user would check afterwards: what is still on the server, what was delivered, how often.
The mailbox is a `FakeMailbox` in memory (``source="fake"``) unless the test is about what POP3 itself does: a
login refused, a stalling server, a listing or RETR data that cannot be trusted, pipelined commands.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from postbote import DeliveryError, Verdict, hookimpl
from postbote.errors import StateLockedError
from postbote.state import REJECTED, StateLock, StateStore
from postbote.testing.pop3server import Action, Faults, POP3Server

from tests.harness import Setup, mail


def test_fetches_delivers_and_deletes_every_message(make_setup) -> None:
    setup = make_setup([mail(1), mail(2), mail(3)], source="fake")
    stats = setup.poll()
    assert (stats.ok, stats.delivered, stats.deleted) == (True, 3, 3)
    assert setup.subjects() == ["Subject: message 1", "Subject: message 2", "Subject: message 3"]
    assert setup.server.uids() == []


def test_trace_header_is_the_only_change_and_disk_gets_lf_line_endings(make_setup) -> None:
    original = b"Subject: x\r\n\r\n.\r\n..\r\n\x00 nul and 8-bit \xe4\xf6\r\n"
    setup = make_setup([original], source="fake")
    setup.poll()
    (data,) = setup.delivered()
    assert data.startswith(b"Received: from localhost by ") and b" with FAKE (postbote, account test)" in data
    assert data.split(b"\nSubject: x\n", 1)[1] == b"\n.\n..\n\x00 nul and 8-bit \xe4\xf6\n"


def test_a_session_broken_while_fetching_leaves_every_message_for_the_next_poll(make_setup) -> None:
    setup = make_setup([mail(1), mail(2), mail(3)], source="fake")
    setup.server.break_after = 1  # the connection drops while the second message is fetched
    first = setup.poll()
    assert not first.ok and first.delivered == 1 and "dropped the connection" in first.error
    assert len(setup.server.uids()) == 3  # the session never ended properly: nothing deleted
    setup.server.break_after = None
    second = setup.poll()
    assert second.ok and second.delivered == 2 and second.deleted == 3
    assert setup.subjects() == ["Subject: message 1", "Subject: message 2", "Subject: message 3"]
    assert setup.server.uids() == []


def test_delivered_message_whose_deletion_never_reached_the_server_is_deleted_without_redelivery(make_setup) -> None:
    setup = make_setup([mail(1), mail(2)], source="fake")
    setup.server.break_at_finish = True  # POP3: the QUIT that applies the deletions is lost
    first = setup.poll()
    assert first.delivered == 2 and len(setup.server.uids()) == 2
    setup.server.break_at_finish = False
    second = setup.poll()
    assert (second.delivered, second.deleted) == (0, 2)
    assert setup.server.uids() == []
    assert len(setup.delivered()) == 2


def test_state_is_committed_before_the_deletion_is_asked_for(make_setup) -> None:
    """If asking for the deletion (POP3: DELE) kills the connection, the message was already recorded: no second
    delivery."""
    setup = make_setup([mail(1)], source="fake")
    setup.server.break_at_delete = True
    assert setup.poll().delivered == 1
    assert setup.server.uids() == ["uid-1"]
    setup.server.break_at_delete = False
    assert setup.poll().delivered == 0
    assert len(setup.delivered()) == 1 and setup.server.uids() == []


def test_keep_leaves_mail_on_the_server_and_fetches_only_new_messages(make_setup) -> None:
    setup = make_setup([mail(1), mail(2)], source="fake")
    assert setup.poll(extra="keep: true\n").delivered == 2
    assert setup.poll(extra="keep: true\n").delivered == 0
    setup.server.add(mail(3))
    assert setup.poll(extra="keep: true\n").delivered == 1
    assert len(setup.server.uids()) == 3 and len(setup.delivered()) == 3


def test_fetch_all_with_keep_fetches_everything_again(make_setup) -> None:
    setup = make_setup([mail(1)], source="fake")
    setup.poll(extra="keep: true\n")
    assert setup.poll(extra="keep: true\nfetch_all: true\n").delivered == 1


def test_messages_over_max_size_are_left_on_the_server(make_setup) -> None:
    big = b"Subject: big\r\n\r\n" + b"x" * 5000 + b"\r\n"
    setup = make_setup([mail(1), big], source="fake")
    stats = setup.poll(extra="max_size: 1kB\n")
    assert (stats.delivered, stats.left) == (1, 1)
    assert len(setup.server.uids()) == 1


def test_max_messages_limits_one_poll(make_setup) -> None:
    setup = make_setup([mail(n) for n in range(5)], source="fake")
    assert setup.poll(extra="max_messages: 2\n").delivered == 2
    assert len(setup.server.uids()) == 3


class Explodes:
    @hookimpl
    def filter_message(self, message):
        if b"message 2" in message.header_bytes:
            raise RuntimeError("kaboom")


def test_a_filter_that_raises_keeps_that_message_on_the_server_and_names_the_plugin(make_setup, caplog) -> None:
    setup = make_setup([mail(1), mail(2), mail(3)], source="fake")
    stats = setup.poll(Explodes())
    assert (stats.ok, stats.delivered, stats.deferred) == (True, 2, 1)
    assert len(setup.server.uids()) == 1
    assert "Subject: message 2" not in setup.subjects()


class DropNewsletters:
    @hookimpl
    def filter_message(self, message):
        return Verdict.drop("newsletter") if b"message 1" in message.header_bytes else None


def test_a_dropped_message_is_handled_deleted_and_not_delivered(make_setup) -> None:
    setup = make_setup([mail(1), mail(2)], source="fake")
    stats = setup.poll(DropNewsletters())
    assert (stats.dropped, stats.delivered, stats.deleted) == (1, 1, 2)
    assert setup.subjects() == ["Subject: message 2"]
    assert setup.server.uids() == []


class FailingBackup:
    @hookimpl
    def backup_message(self, message):
        raise OSError(28, "No space left on device")


def test_a_failing_backup_keeps_the_message_on_the_server_undelivered(make_setup) -> None:
    setup = make_setup([mail(1)], source="fake")
    stats = setup.poll(FailingBackup())
    assert (stats.delivered, stats.deferred) == (0, 1)
    assert setup.delivered() == [] and len(setup.server.uids()) == 1


class BrokenObserver:
    @hookimpl
    def message_delivered(self):
        raise RuntimeError("metrics backend down")


def test_a_failing_observer_never_affects_the_mail(make_setup) -> None:
    setup = make_setup([mail(1)], source="fake")
    assert setup.poll(BrokenObserver()).delivered == 1
    assert setup.server.uids() == []


class RefusingTarget:
    DESTINATION_KINDS = ("refuse",)

    def __init__(self, temporary: bool) -> None:
        self.temporary = temporary
        self.calls = 0

    @hookimpl
    def parse_destination(self, kind, options):
        return {"label": "refuse"} if kind == "refuse" else None

    @hookimpl
    def deliver_message(self, destination):
        if destination.kind != "refuse":
            return None
        self.calls += 1
        raise DeliveryError("550 5.7.1 no thanks", temporary=self.temporary)


def test_a_permanent_refusal_is_recorded_and_not_retried_every_poll(make_setup, tmp_path: Path) -> None:
    setup = make_setup([mail(1)], source="fake")
    target = RefusingTarget(temporary=False)
    deliver = "deliver: {refuse: {}}\n"
    assert setup.poll(target, deliver=deliver).rejected == 1
    assert setup.poll(target, deliver=deliver).rejected == 0
    assert target.calls == 1 and len(setup.server.uids()) == 1
    store = StateStore(tmp_path / "state")
    (record,) = store.records("test").values()
    assert record.status == REJECTED and "550 5.7.1 no thanks" in record.reason
    assert store.clear_rejected("test") == [record.uid]
    store.close()
    setup.poll(target, deliver=deliver)
    assert target.calls == 2


class AcceptingTarget:
    DESTINATION_KINDS = ("accept",)

    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    def parse_destination(self, kind):
        return {"label": "accept"} if kind == "accept" else None

    @hookimpl
    def deliver_message(self, destination):
        if destination.kind != "accept":
            return None
        self.calls += 1
        return "250 ok"


def test_with_two_destinations_a_retry_skips_the_one_that_already_took_the_message(make_setup) -> None:
    setup = make_setup([mail(1)], source="fake")
    accepting, refusing = AcceptingTarget(), RefusingTarget(temporary=True)
    both = "deliver:\n  - accept: {}\n  - refuse: {}\n"
    assert setup.poll(accepting, refusing, deliver=both).deferred == 1
    assert setup.poll(accepting, refusing, deliver=both).deferred == 1
    assert (accepting.calls, refusing.calls) == (1, 2)
    assert len(setup.server.uids()) == 1


def test_a_maildir_copy_is_kept_and_not_written_again_when_another_destination_fails(make_setup) -> None:
    """With several destinations each one's success is recorded on its own: the Maildir keeps its one copy while
    the other destination refuses, however many polls that lasts (issue 11, item 4)."""
    setup = make_setup([mail(1)], source="fake")
    refusing = RefusingTarget(temporary=True)
    both = f"deliver:\n  - maildir: {setup.maildir}\n  - refuse: {{}}\n"
    for _ in range(3):
        assert setup.poll(refusing, deliver=both).deferred == 1
    assert len(setup.delivered()) == 1 and list((setup.maildir / "tmp").iterdir()) == []
    assert len(setup.server.uids()) == 1


def test_a_server_listing_one_uid_twice_gets_neither_message_touched(make_setup) -> None:
    setup = make_setup([mail(1), mail(2), mail(3)], Faults(uidl_override=lambda _s, uids: [uids[0], uids[0], uids[2]]))
    stats = setup.poll()
    assert (stats.delivered, stats.left) == (1, 2)
    assert len(setup.server.uids()) == 2


def test_login_refused_is_an_account_error_and_nothing_is_touched(make_setup) -> None:
    setup = make_setup([mail(1)], Faults().on("PASS", action=Action.reply("-ERR [AUTH] invalid credentials")))
    stats = setup.poll()
    assert not stats.ok and "login refused: [AUTH] invalid credentials" in stats.error
    assert len(setup.server.uids()) == 1


def test_a_stalling_server_times_out(make_setup) -> None:
    setup = make_setup([mail(1)], Faults().on("UIDL", action=Action.stall(10)))
    stats = setup.poll(extra="timeout: 0.3s\n")
    assert not stats.ok and "timed out" in stats.error


def test_a_stop_request_finishes_the_message_in_hand_then_quits(make_setup) -> None:
    stop = threading.Event()

    class StopAfterFirst:
        @hookimpl
        def filter_message(self):
            stop.set()

    setup = make_setup([mail(1), mail(2), mail(3)], source="fake")
    stats = setup.poll(StopAfterFirst(), stop=stop)
    assert (stats.ok, stats.delivered) == (True, 1)
    assert len(setup.server.uids()) == 2


def test_two_processes_cannot_use_one_state_directory(tmp_path: Path) -> None:
    with StateLock(tmp_path), pytest.raises(StateLockedError, match=f"pid {os.getpid()}"):
        StateLock(tmp_path).acquire()


def test_a_refused_deletion_keeps_the_record_and_the_next_poll_deletes_without_redelivery(make_setup) -> None:
    setup = make_setup([mail(1), mail(2)], source="fake")
    setup.server.refuse_deletion = {"uid-1"}  # POP3: -ERR to the first DELE
    first = setup.poll()
    assert (first.ok, first.delivered, first.deleted) == (True, 2, 1)
    assert setup.server.uids() == ["uid-1"]
    setup.server.refuse_deletion = set()
    second = setup.poll()
    assert (second.delivered, second.deleted) == (0, 1)
    assert setup.server.uids() == [] and len(setup.delivered()) == 2


def test_data_far_beyond_the_listed_size_is_rejected_and_the_rest_still_flows(make_setup) -> None:
    setup = make_setup([mail(1), mail(2)], Faults().on("RETR 1", action=Action.extend(b"x" * 70 + b"\r\n")))
    first = setup.poll(extra="max_size: 100\n")
    assert not first.ok and "exceeds 100 bytes" in first.error
    second = setup.poll(extra="max_size: 100\n")
    assert (second.ok, second.delivered, second.left) == (True, 1, 1)
    assert setup.subjects() == ["Subject: message 2"]


def test_retr_commands_are_pipelined_when_the_server_offers_it(make_setup) -> None:
    setup = make_setup([mail(n) for n in range(4)])
    setup.poll()
    commands = [c.split()[0] for c in setup.server.commands]
    assert commands.index("DELE") > commands.index("RETR") + 3, commands


def test_a_server_without_pipelining_is_polled_command_by_command(tmp_path: Path) -> None:
    with POP3Server([mail(1), mail(2)], capabilities=["UIDL", "USER"]) as server:
        stats = Setup(tmp_path, server).poll()
        assert (stats.ok, stats.delivered) == (True, 2) and server.uids() == []
        assert [c.split()[0] for c in server.commands][-5:] == ["RETR", "RETR", "DELE", "DELE", "QUIT"]


def test_a_crash_between_commit_and_rename_is_finished_by_the_next_poll(make_setup, tmp_path: Path) -> None:
    """The journal of staged renames: recorded as delivered, file still in tmp/ -> moved into new/, not refetched."""
    setup = make_setup([mail(1)], source="fake")
    assert setup.poll(extra="keep: true\n").delivered == 1
    (delivered,) = (setup.maildir / "new").iterdir()
    interrupted = setup.maildir / "tmp" / delivered.name
    delivered.rename(interrupted)
    store = StateStore(tmp_path / "state")
    (uid,) = store.records("test")
    store.record_batch("test", [], renames=[(uid, str(interrupted), str(delivered))])
    store.close()
    assert setup.poll(extra="keep: true\n").delivered == 0
    assert delivered.exists() and not interrupted.exists()
    assert len(setup.delivered()) == 1


def test_files_a_killed_poll_left_in_maildir_tmp_are_removed_after_36_hours(make_setup) -> None:
    setup = make_setup([mail(1)], source="fake")
    (setup.maildir / "tmp").mkdir(parents=True)
    stale, fresh = setup.maildir / "tmp" / "1.M1P1Q1.host", setup.maildir / "tmp" / "2.M2P2Q2.host"
    for leftover in (stale, fresh):
        leftover.write_bytes(b"partial")
    old = time.time() - 37 * 3600
    os.utime(stale, (old, old))
    assert setup.poll().delivered == 1
    assert not stale.exists() and fresh.exists()


def test_empty_files_a_killed_poll_had_created_ahead_are_removed_by_the_next_poll(make_setup) -> None:
    """Maildir delivery creates a few files in ``tmp/`` ahead of need; a poll killed mid-way leaves them empty.
    The next poll removes those of a process that is gone -- and nothing that might still be written to."""
    setup = make_setup([mail(1)], source="fake")
    (setup.maildir / "tmp").mkdir(parents=True)
    host = socket.gethostname().replace("/", "_").replace(":", "_")
    gone = setup.maildir / "tmp" / f"1764000000.M1P{_exited_pid()}Q1.{host}"
    alive_empty = setup.maildir / "tmp" / f"1764000000.M2P{os.getppid()}Q2.{host}"
    other_host = setup.maildir / "tmp" / f"1764000000.M3P{_exited_pid()}Q3.elsewhere"
    written = setup.maildir / "tmp" / f"1764000000.M4P{_exited_pid()}Q4.{host}"
    for path in (gone, alive_empty, other_host):
        path.write_bytes(b"")
    written.write_bytes(b"partial message")

    assert setup.poll().delivered == 1

    left = sorted(path.name for path in (setup.maildir / "tmp").iterdir())
    assert left == sorted([alive_empty.name, other_host.name, written.name]), \
        "the dead poll's empty file is gone, and the poll's own files created ahead are removed when it ends"


def _exited_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid
