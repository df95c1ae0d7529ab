"""Nothing lost, for real: the loss and duplicate-storm paths an outside review found, each as the user met it.

Each test names the finding of issue 11 it covers. They poll through the real poller into real destinations: a
Maildir, an mbox, an MDA (a script that appends to a file), an SMTP server (aiosmtpd). The mailbox is a
`FakeMailbox` in memory where the finding is about the destinations or the state store; where it is about what a
POP3 server did (an empty listing, a QUIT acknowledged or lost, a LIST size claim) it is the scripted POP3 server
(`postbote.testing.pop3server`) with that fault.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from postbote.config import DEFAULT_MAX_SIZE
from postbote.state import DEFERRED, DELIVERED, REJECTED, DeliveryKey, Outcome, StateStore
from postbote.testing.pop3server import DEFAULT_CAPABILITIES, Action, Faults

from tests.harness import (
    MaildirTarget,
    Rig,
    RigFactory,
    SinkTarget,
    corpus,
    corpus_message,
    corpus_number,
)
from tests.servers.smtp_sink import SMTPSink

pytestmark = pytest.mark.usefixtures("time_limit")

TIME_LIMIT = 60.0
NO_PIPELINING = [capability for capability in DEFAULT_CAPABILITIES if capability != "PIPELINING"]


# --- destinations that count what they got -----------------------------------------------------------------


class Appender:
    """An MDA: a script that appends each message (with a separator line) to a file and exits with the status
    written in ``status`` (0 when the file is missing)."""

    SEPARATOR = b"\x00--- next message ---\x00\n"

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.out = directory / "received"
        self.status = directory / "status"
        self.script = directory / "append.py"
        self.script.write_text(
            "import sys, pathlib\n"
            f"status = pathlib.Path({str(self.status)!r})\n"
            "code = int(status.read_text()) if status.exists() else 0\n"
            "data = sys.stdin.buffer.read()\n"
            "if code == 0:\n"
            f"    with open({str(self.out)!r}, 'ab') as out:\n"
            f"        out.write(data + {self.SEPARATOR!r})\n"
            "sys.exit(code)\n")

    def deliver(self) -> dict[str, Any]:
        return {"mda": {"command": [sys.executable, str(self.script)]}}

    def fail_with(self, status: int) -> None:
        self.status.write_text(str(status))

    def copies(self) -> list[int | None]:
        data = self.out.read_bytes() if self.out.exists() else b""
        return [corpus_number(part) for part in data.split(self.SEPARATOR) if part]


def mbox_copies(path: Path) -> list[int | None]:
    if not path.exists():
        return []
    return [corpus_number(part) for part in path.read_bytes().split(b"\nFrom ")]


def maildir_copies(path: Path) -> list[int | None]:
    return sorted(corpus_number(data) for data in MaildirTarget(path).delivered())


# --- 4. several destinations after a Maildir ---------------------------------------------------------------


def test_a_failing_mda_after_a_maildir_and_an_mbox_costs_them_no_copy_per_poll(make_rig: RigFactory,
                                                                              tmp_path: Path) -> None:
    """[maildir, mbox, mda] with the MDA down (exit 75): every poll used to append another copy to the mbox."""
    mda = Appender(tmp_path / "mda")
    mda.fail_with(75)
    maildir, mbox = tmp_path / "Maildir", tmp_path / "mbox"
    rig = make_rig(corpus(3), source="fake")
    deliver = [{"maildir": str(maildir)}, {"mbox": str(mbox)}, mda.deliver()]
    for _ in range(3):
        stats = rig.poll(deliver=deliver)
        assert stats.deferred == 3 and stats.deleted == 0
    assert maildir_copies(maildir) == [1, 2, 3]
    assert sorted(mbox_copies(mbox)) == [1, 2, 3]
    assert mda.copies() == []

    mda.fail_with(0)
    stats = rig.poll(deliver=deliver)
    assert stats.delivered == 3 and stats.deleted == 3
    assert maildir_copies(maildir) == [1, 2, 3]
    assert sorted(mbox_copies(mbox)) == [1, 2, 3]
    assert sorted(mda.copies()) == [1, 2, 3]  # type: ignore[type-var]
    assert rig.server.uids() == []


def test_a_failing_mda_after_a_maildir_and_smtp_gives_the_mta_one_copy(make_rig: RigFactory, tmp_path: Path,
                                                                       smtp_sink: SMTPSink) -> None:
    """[maildir, smtp, mda]: the SMTP server used to get a copy on every poll while the MDA failed."""
    mda = Appender(tmp_path / "mda")
    mda.fail_with(75)
    maildir = tmp_path / "Maildir"
    rig = make_rig(corpus(2), target=SinkTarget(smtp_sink), source="fake")
    deliver = [{"maildir": str(maildir)}, SinkTarget(smtp_sink).deliver(), mda.deliver()]
    for _ in range(3):
        assert rig.poll(deliver=deliver).deferred == 2
    mda.fail_with(0)
    assert rig.poll(deliver=deliver).deleted == 2
    assert sorted(corpus_number(m.data) for m in smtp_sink.messages) == [1, 2]  # type: ignore[type-var]
    assert maildir_copies(maildir) == [1, 2]
    assert sorted(mda.copies()) == [1, 2]  # type: ignore[type-var]


def test_a_retried_rejection_goes_only_to_the_destination_that_refused(make_rig: RigFactory, tmp_path: Path) -> None:
    """[maildir, mda] with the MDA refusing for good (exit 1): after `postbote retry`, the MDA gets the message and
    the Maildir, which took it the first time, gets no second copy."""
    mda = Appender(tmp_path / "mda")
    mda.fail_with(1)
    maildir = tmp_path / "Maildir"
    rig = make_rig(corpus(1), source="fake")
    deliver = [{"maildir": str(maildir)}, mda.deliver()]
    assert rig.poll(deliver=deliver).rejected == 1
    store = StateStore(rig.state_dir)
    assert store.clear_rejected("test") == [rig.uid_of[1]]
    store.close()
    mda.fail_with(0)
    assert rig.poll(deliver=deliver).delivered == 1
    assert maildir_copies(maildir) == [1] and mda.copies() == [1]
    assert rig.server.uids() == []


# --- 5. a state store that cannot be written ---------------------------------------------------------------


@pytest.fixture
def locked_state(tmp_path: Path) -> Iterator[Path]:
    """The state database of the rig below, with another process's write transaction open on it."""
    state_dir = tmp_path / "rig0" / "state"
    StateStore(state_dir).close()
    holder = sqlite3.connect(state_dir / "postbote.sqlite3", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    yield state_dir
    holder.execute("ROLLBACK")
    holder.close()


@pytest.mark.parametrize("kind", ["mda", "mbox", "smtp", "maildir"])
def test_a_locked_state_store_hands_nothing_over_and_waits_briefly(make_rig: RigFactory, tmp_path: Path,
                                                                   locked_state: Path, smtp_sink: SMTPSink,
                                                                   kind: str) -> None:
    """With another process holding the SQLite write lock, every `postbote poll` used to deliver again (and each
    write waited 10 s). Now nothing is handed over until its outcome can be recorded, after a short wait."""
    mda = Appender(tmp_path / "mda")
    mbox, maildir = tmp_path / "mbox", tmp_path / "Maildir"
    deliver = {"mda": mda.deliver(), "mbox": {"mbox": str(mbox)}, "smtp": SinkTarget(smtp_sink).deliver(),
               "maildir": {"maildir": str(maildir)}}[kind]
    rig = make_rig(corpus(3), source="fake")
    for _ in range(3):
        started = time.monotonic()
        stats = rig.poll(top={"state_busy_timeout": "0.2s"}, deliver=[deliver])
        assert time.monotonic() - started < 5
        assert not stats.ok and stats.deleted == 0
    assert mda.copies() == [] and mbox_copies(mbox) == [] and smtp_sink.messages == []
    assert maildir_copies(maildir) == []
    assert len(rig.server.uids()) == 3


def test_a_delivery_cut_short_by_a_crash_is_made_again_once_then_held(make_rig: RigFactory, tmp_path: Path,
                                                                      ) -> None:
    """An "in flight" note left by a crash means the MDA may have the message: delivered again once, with a
    warning; if that too ends without an answer, the message is held (rejected) instead of delivered again and
    again."""
    mda = Appender(tmp_path / "mda")
    rig = make_rig(corpus(1), source="fake")
    uid = rig.uid_of[1]
    store = StateStore(rig.state_dir)
    store.begin_delivery("test", uid, DeliveryKey(0, load_mda_label(rig, mda)))  # a crash right after the hand-over
    store.close()
    stats = rig.poll(deliver=[mda.deliver()])
    assert stats.delivered == 1 and mda.copies() == [1]

    rig.server.add(corpus_message(2))
    uid2 = rig.server.uids()[-1]
    store = StateStore(rig.state_dir)
    for _ in range(2):  # two crashes in a row
        store.begin_delivery("test", uid2, DeliveryKey(0, load_mda_label(rig, mda)))
    store.close()
    stats = rig.poll(deliver=[mda.deliver()])
    assert stats.rejected == 1 and mda.copies() == [1]
    assert "ended without an answer" in rig.records()[uid2].reason
    assert len(rig.server.uids()) == 1


def load_mda_label(rig: Rig, mda: Appender) -> str:
    config = rig.load(deliver=[mda.deliver()])
    return config.accounts[0].destinations[0].label


# --- 6. one odd listing --------------------------------------------------------------------------------------


def test_one_empty_listing_with_keep_does_not_deliver_the_mailbox_again(make_rig: RigFactory) -> None:
    """keep: true, and one poll in which the server listed nothing: the next poll used to deliver everything again."""
    empty_listing = Faults().on("UIDL", nth=2, action=Action.reply(b"+OK\r\n.\r\n"))
    rig = make_rig(corpus(4), faults=empty_listing, capabilities=NO_PIPELINING)
    assert rig.poll(keep=True).delivered == 4
    assert rig.poll(keep=True).listed == 0
    assert rig.poll(keep=True).delivered == 0
    assert rig.audit().copies == {1: 1, 2: 1, 3: 1, 4: 1}


def test_records_of_vanished_messages_are_forgotten_after_several_listings_and_a_day(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.record("a", "gone", DELIVERED)
    store.record("a", "here", DELIVERED)
    now = time.time()
    for poll in range(3):
        assert store.note_listing("a", store.records("a"), {"here"}, now=now + poll) == []
    assert store.note_listing("a", store.records("a"), {"here"}, now=now + 86400 + 10) == ["gone"]
    assert set(store.records("a")) == {"here"}


# --- 7. and 3. QUIT acknowledged but not applied; a UID reused ------------------------------------------------


def test_a_server_that_acknowledges_quit_without_deleting_gets_no_second_delivery(make_rig: RigFactory) -> None:
    """+OK to QUIT, and the messages still there: the next poll used to deliver all five again."""
    quit_ignored = Faults().on("QUIT", nth=1, action=Action.reply("+OK bye (but nothing deleted)"))
    rig = make_rig(corpus(5), faults=quit_ignored)
    assert rig.poll().delivered == 5
    assert len(rig.server.messages()) == 5
    stats = rig.poll()
    assert stats.delivered == 0 and stats.deleted == 5
    assert rig.audit().everything_delivered_once_and_deleted


def test_a_reused_uid_of_the_same_size_is_delivered_not_deleted_unread(make_rig: RigFactory) -> None:
    """The QUIT reply was lost (the server did delete), so the record of UID u1 stayed; then the server gave a
    new message the same UID at the same size. It used to be deleted unread; the header digest tells them apart."""
    reply_lost = Faults().on("QUIT", nth=1, action=Action.drop_midway(after_bytes=0))
    first = corpus_message(1)
    rig = make_rig([first], faults=reply_lost)
    uid = rig.uid_of[1]
    assert rig.poll().delivered == 1
    assert rig.server.messages() == []
    second = corpus_message(2)
    assert len(second) == len(first)
    rig.server.add_message(second, uid=uid)
    stats = rig.poll()
    assert stats.delivered == 1 and stats.deleted == 1
    assert sorted(n for data in rig.target.delivered() if (n := corpus_number(data))) == [1, 2]


# --- 11. the spool is bounded by postbote, not by the server's claim ----------------------------------------------


def test_a_message_announced_larger_than_max_size_stays_on_the_server_reported(make_rig: RigFactory) -> None:
    """LIST announcing 10^15 octets used to make postbote spool until $TMPDIR was full."""
    huge_claim = Faults().on("LIST", nth=1, action=Action.reply(b"+OK\r\n1 1000000000000000\r\n.\r\n"))
    rig = make_rig(corpus(1), faults=huge_claim, capabilities=NO_PIPELINING)
    stats = rig.poll()
    assert stats.rejected == 1 and stats.delivered == 0 and not stats.deleted
    store = StateStore(rig.state_dir)
    [waiting] = store.waiting("test")
    store.close()
    assert waiting.status == REJECTED and "larger than max_size" in waiting.reason
    assert len(rig.server.messages()) == 1


def test_accounts_have_a_message_size_cap_by_default(make_rig: RigFactory) -> None:
    rig = make_rig(corpus(1), source="fake")
    config = rig.load()
    assert config.accounts[0].max_size == DEFAULT_MAX_SIZE == 256 * 1024 * 1024


# --- 17 (the record behind it): deferred mail is remembered, with since when -------------------------------------


def test_deferred_messages_are_recorded_with_the_first_failure_and_the_attempts(make_rig: RigFactory,
                                                                                tmp_path: Path) -> None:
    mda = Appender(tmp_path / "mda")
    mda.fail_with(75)
    rig = make_rig(corpus(2), source="fake")
    for _ in range(2):
        assert rig.poll(deliver=[mda.deliver()]).deferred == 2
    store = StateStore(rig.state_dir)
    waiting = store.waiting("test")
    assert [(w.status, w.attempts) for w in waiting] == [(DEFERRED, 2), (DEFERRED, 2)]
    assert all("exit status 75" in w.reason for w in waiting)
    store.close()
    mda.fail_with(0)
    assert rig.poll(deliver=[mda.deliver()]).delivered == 2
    store = StateStore(rig.state_dir)
    assert store.waiting("test") == []
    store.close()


# --- 19. and a COMMIT that fails ------------------------------------------------------------------------------


def test_the_state_database_is_private_whatever_the_umask(tmp_path: Path, umask_022: None) -> None:
    store = StateStore(tmp_path / "state")
    store.record("a", "1", DELIVERED)
    for name in ("postbote.sqlite3", "postbote.sqlite3-wal", "postbote.sqlite3-shm"):
        path = tmp_path / "state" / name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, name
    store.close()


@pytest.fixture
def tiny_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (the tests run as root in CI; elsewhere this is skipped with the reason)."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(path: Path) -> None:
    """Write ``path`` until the file system is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"x" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)


def test_a_commit_that_fails_on_a_full_disk_leaves_no_record_behind(tiny_filesystem: Path) -> None:
    """Disk full at COMMIT, then space freed: what was never committed must not be read back, nor committed later."""
    store = StateStore(tiny_filesystem / "state")
    store.record("a", "before", DELIVERED)
    filler = tiny_filesystem / "filler"
    fill(filler)
    big = [Outcome(f"lost-{n}", DELIVERED, reason="r" * 2000) for n in range(400)]
    with pytest.raises(Exception, match="state database"):
        store.record_batch("a", big)
    assert set(store.records("a")) == {"before"}
    filler.unlink()
    store.record("a", "after", DELIVERED)
    assert set(store.records("a")) == {"before", "after"}
    store.close()
    reopened = StateStore(tiny_filesystem / "state")
    assert set(reopened.records("a")) == {"before", "after"}
    reopened.close()
