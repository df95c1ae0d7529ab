"""Local faults: a Maildir or backup directory that is full or read-only, writeback that fails, a state database
that is locked, corrupt or on a full disk. Each time postbote must fail clearly and delete nothing it has not
durably handed off.

The faults come from the real kernel, never from a mock of postbote: small tmpfs mounts (root), an ext4 file
system on a loop device whose backing store runs out of space (writeback errors), and, where nothing can be
mounted, RLIMIT_FSIZE on a child process (EFBIG from the kernel).

Polls in this process fetch from a `FakeMailbox` (``source="fake"``): the faults are local, the mailbox is only where
the mail waits. The tests that run ``postbote`` as a child process (its limits, its $TMPDIR, its one-line errors
before any connection) keep the scripted POP3 server, which a child process can reach.
"""

from __future__ import annotations

import os
import resource
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from postbote import hookimpl
from postbote.state import DATABASE_NAME, DELIVERED, StateLock
from postbote.testing.pop3server import Action, Faults

from tests.harness import (
    MaildirTarget,
    RigFactory,
    child_env,
    corpus,
    corpus_message,
    postbote_argv,
    run_postbote,
)

pytestmark = pytest.mark.usefixtures("time_limit")

BIG_BODY_LINES = 60_000  # about 2 MB: more than the small file systems below can take


def big_message(number: int) -> bytes:
    return corpus_message(number, body_lines=BIG_BODY_LINES)


def _ok(*argv: str) -> bool:
    return subprocess.run(argv, capture_output=True, timeout=60, check=False).returncode == 0


class FileSystems:
    """Small file systems mounted for one test; all unmounted again at its end, innermost first."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mounted: list[Path] = []
        self.backings: set[Path] = set()
        self.loops: list[str] = []

    def tmpfs(self, name: str, size: str) -> Path | None:
        """A fresh tmpfs of ``size`` (e.g. ``1m``), or None where this process may not mount."""
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0 or not _ok("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)):
            return None
        self.mounted.append(path)
        return path

    def remount(self, path: Path, options: str) -> None:
        assert _ok("mount", "-o", f"remount,{options}", str(path)), f"cannot remount {path} {options}"

    def ext4_on_a_full_disk(self, name: str) -> Path | None:
        """ext4 on a loop device whose backing file lives on a 2 MB tmpfs: writes succeed into the page cache,
        writeback then fails (ENOSPC/EIO from the loop device). None where loop devices are not available."""
        backing = self.tmpfs(f"{name}-backing", "2m")
        if backing is None:
            return None
        self.backings.add(backing)
        image = backing / "ext4.img"
        image.touch()
        os.truncate(image, 64 << 20)
        if not _ok("mkfs.ext4", "-q", "-F", str(image)):
            return None
        loop = subprocess.run(["losetup", "-f", "--show", str(image)], capture_output=True, text=True, timeout=60,
                              check=False)
        if loop.returncode != 0:
            return None
        self.loops.append(loop.stdout.strip())
        path = self.root / name
        path.mkdir(exist_ok=True)
        if not _ok("mount", loop.stdout.strip(), str(path)):
            return None
        self.mounted.append(path)
        return path

    def unmount(self, path: Path) -> None:
        if path in self.mounted:
            self.mounted.remove(path)
            if not _ok("umount", str(path)):
                _ok("umount", "-l", str(path))

    def cleanup(self) -> None:
        """File systems on loop devices first, then the loop devices, then the tmpfs mounts holding their images."""
        for path in reversed([p for p in self.mounted if p not in self.backings]):
            self.unmount(path)
        for loop in self.loops:
            _ok("losetup", "-d", loop)
        for path in reversed(list(self.mounted)):
            self.unmount(path)


@pytest.fixture
def filesystems(tmp_path: Path) -> Iterator[FileSystems]:
    systems = FileSystems(tmp_path / "mnt")
    try:
        yield systems
    finally:
        systems.cleanup()


def need(path: Path | None) -> Path:
    if path is None:
        pytest.skip("cannot mount a small file system here (needs root and mount/loop devices)")
    return path


# --- the Maildir --------------------------------------------------------------------------------------


def test_a_full_maildir_defers_the_message_that_does_not_fit_and_leaves_no_partial_file(
        make_rig: RigFactory, filesystems: FileSystems) -> None:
    disk = need(filesystems.tmpfs("maildir", "1m"))
    rig = make_rig([corpus_message(1), big_message(2), corpus_message(3)], target=MaildirTarget(disk / "Maildir"),
                   source="fake")
    rig.other_faults += 1

    stats = rig.poll()

    assert (stats.ok, stats.delivered, stats.deferred) == (True, 2, 1)
    audit = rig.audit()
    assert audit.on_server == (2,) and audit.delivered_once == [1, 3]
    assert list((disk / "Maildir" / "tmp").iterdir()) == [], "a partial message was left in tmp/"
    filesystems.remount(disk, "size=16m")
    rig.poll()
    assert rig.audit().everything_delivered_once_and_deleted


def test_a_read_only_maildir_defers_every_message_until_it_is_writable_again(
        make_rig: RigFactory, filesystems: FileSystems) -> None:
    disk = need(filesystems.tmpfs("maildir", "4m"))
    for sub in ("tmp", "new", "cur"):
        (disk / "Maildir" / sub).mkdir(parents=True)
    filesystems.remount(disk, "ro")
    rig = make_rig(corpus(3), target=MaildirTarget(disk / "Maildir"), source="fake")
    rig.other_faults += 1

    stats = rig.poll()

    assert (stats.ok, stats.deferred, stats.deleted) == (True, 3, 0)
    assert rig.audit().on_server == (1, 2, 3)
    filesystems.remount(disk, "rw")
    rig.poll()
    assert rig.audit().everything_delivered_once_and_deleted


def test_a_maildir_write_the_kernel_refuses_defers_the_message(make_rig: RigFactory) -> None:
    """The fallback that needs no mount: the child poll may write no file beyond 512 kB (RLIMIT_FSIZE), so the
    kernel answers the Maildir write of the 800 kB message with EFBIG. (The message itself stays in memory: only
    messages over 1 MiB are spooled to disk.)"""
    rig = make_rig([corpus_message(1), corpus_message(2, body_lines=25_000)])
    rig.other_faults += 1
    config = rig.configure()

    limit = 512 << 10
    done = subprocess.run(postbote_argv(config, "poll"), env=child_env(), capture_output=True, text=True,
                          timeout=60, check=False,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))

    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr  # 1: a message was deferred
    assert "File too large" in done.stderr
    audit = rig.audit()
    assert audit.on_server == (2,) and audit.delivered_once == [1]
    rig.poll()
    assert rig.audit().everything_delivered_once_and_deleted


def test_a_full_spool_directory_fails_the_poll_with_a_clear_error_and_deletes_nothing(
        make_rig: RigFactory, filesystems: FileSystems) -> None:
    """Messages over 1 MiB are spooled to a temporary file ($TMPDIR) while they are fetched."""
    spool = need(filesystems.tmpfs("spool", "1m"))
    rig = make_rig([corpus_message(1), big_message(2)])
    rig.other_faults += 1

    run = run_postbote(rig.configure(), "poll", timeout=30, env=child_env(TMPDIR=str(spool)))

    assert "Traceback" not in run.output, run.output
    assert run.status == 1 and "No space left on device" in run.output
    audit = rig.audit()
    assert audit.on_server == (1, 2) and audit.duplicates == 0


def test_data_that_never_reaches_the_disk_is_not_recorded_as_delivered(make_rig: RigFactory,
                                                                       filesystems: FileSystems) -> None:
    """The write goes into the page cache; the kernel reports the failure only when postbote syncs. Only a sync
    that succeeded may count as a durable hand-off."""
    disk = need(filesystems.ext4_on_a_full_disk("maildir"))
    rig = make_rig([corpus_message(1, body_lines=150_000)], target=MaildirTarget(disk / "Maildir"),  # 3.7 MB
                   source="fake")
    rig.other_faults += 1

    stats = rig.poll()

    assert not stats.ok
    assert rig.audit().on_server == (1,)
    assert all(record.status != DELIVERED for record in rig.records().values()), \
        "recorded as delivered although the data never reached the disk"
    filesystems.unmount(disk)
    need(filesystems.tmpfs("maildir", "16m"))
    rig.poll()
    assert rig.audit().everything_delivered_once_and_deleted


# --- the backup directory -------------------------------------------------------------------------------


def backup_plugin(path: Path) -> dict[str, object]:
    return {"plugins": {"backup": {"maildir": str(path)}}}


def test_a_full_backup_directory_keeps_the_message_on_the_server_and_undelivered(
        make_rig: RigFactory, filesystems: FileSystems) -> None:
    """Nothing is delivered without its backup: the backup is written first, and its failure stops the message."""
    disk = need(filesystems.tmpfs("backup", "1m"))
    rig = make_rig([corpus_message(1), big_message(2)], source="fake")
    rig.other_faults += 1

    stats = rig.poll(top=backup_plugin(disk / "backup"))

    assert (stats.delivered, stats.deferred) == (1, 1)
    audit = rig.audit()
    assert audit.on_server == (2,) and audit.undelivered == [2]
    filesystems.remount(disk, "size=16m")
    rig.poll(top=backup_plugin(disk / "backup"))
    assert rig.audit().everything_delivered_once_and_deleted
    assert len(list((disk / "backup" / "new").iterdir())) == 2


def test_a_read_only_backup_directory_keeps_every_message_on_the_server(make_rig: RigFactory,
                                                                        filesystems: FileSystems) -> None:
    disk = need(filesystems.tmpfs("backup", "4m"))
    filesystems.remount(disk, "ro")
    rig = make_rig(corpus(2), source="fake")
    rig.other_faults += 1

    stats = rig.poll(top=backup_plugin(disk / "backup"))

    assert (stats.delivered, stats.deferred) == (0, 2)
    assert rig.audit().on_server == (1, 2)


# --- the state database -------------------------------------------------------------------------------------


def first_line_of_error(output: str) -> str:
    errors = [line for line in output.splitlines() if line.startswith("postbote: error: ")]
    assert len(errors) == 1, output
    return errors[0]


class LetGoWhenThePollFails:
    """Ends the other writer's transaction once the poll has failed on its lock (the ``account_error`` hook runs
    before the poll's summary is recorded), so that recording the summary does not wait for the lock too."""

    def __init__(self, holder: sqlite3.Connection) -> None:
        self.holder = holder

    @hookimpl
    def account_error(self) -> None:
        if self.holder.in_transaction:
            self.holder.execute("ROLLBACK")


def test_a_state_database_locked_by_another_writer_fails_the_poll_clearly_and_deletes_nothing(
        make_rig: RigFactory) -> None:
    """SQLite waits for the lock (``state_busy_timeout``, 2 s), then postbote gives up: the Maildir copies it
    staged are thrown away, so the next poll delivers every message once."""
    rig = make_rig(corpus(3), source="fake")
    rig.other_faults += 1
    rig.poll(keep=True, max_messages=1)  # creates the database; message 1 is delivered and kept
    holder = sqlite3.connect(rig.state_dir / DATABASE_NAME, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    try:
        stats = rig.poll(plugins=(LetGoWhenThePollFails(holder),))
    finally:
        holder.close()

    assert not stats.ok and "state database" in (stats.error or "") and "locked" in (stats.error or "")
    audit = rig.audit()
    assert audit.on_server == (1, 2, 3) and audit.delivered_once == [1]
    rig.poll()
    assert rig.audit().everything_delivered_once_and_deleted


def test_a_state_directory_in_use_by_another_postbote_is_refused_at_once(make_rig: RigFactory) -> None:
    rig = make_rig(corpus(1))
    rig.other_faults += 1
    config = rig.configure()

    with StateLock(rig.state_dir, role="poll"):  # (a "daemon" holder would be asked to poll by SIGUSR1)
        run = run_postbote(config, "poll", timeout=30)

    assert run.status == 1 and "Traceback" not in run.output
    assert f"another postbote poll (pid {os.getpid()})" in first_line_of_error(run.output)
    assert rig.server.commands == [], "postbote talked to the server without holding the state directory"


def test_a_state_database_that_is_not_a_database_is_a_one_line_error_before_any_connection(
        make_rig: RigFactory) -> None:
    rig = make_rig(corpus(2))
    rig.other_faults += 1
    rig.state_dir.mkdir(parents=True)
    (rig.state_dir / DATABASE_NAME).write_bytes(b"this is not SQLite\n" * 500)

    run = run_postbote(rig.configure(), "poll", timeout=30)

    assert run.status == 1 and "Traceback" not in run.output
    assert "state database" in first_line_of_error(run.output)
    assert rig.server.commands == []
    assert rig.audit().on_server == (1, 2)


def test_a_state_database_with_damaged_pages_fails_the_poll_and_deletes_nothing(make_rig: RigFactory) -> None:
    """Records of messages delivered but not yet deleted (QUIT was lost) sit in damaged pages: postbote can no
    longer tell what it handled, so it must neither delete nor deliver anything."""
    rig = make_rig(corpus(40), Faults().on("QUIT", action=Action.drop()))
    rig.other_faults += 1
    rig.poll()
    assert len(rig.records()) == 40
    database = rig.state_dir / DATABASE_NAME
    data = bytearray(database.read_bytes())
    page = 4096
    assert len(data) > 3 * page, "the database is too small to damage its data pages"
    data[page:] = (bytes(range(256)) * len(data))[: len(data) - page]
    database.write_bytes(bytes(data))

    run = run_postbote(rig.configure(), "poll", timeout=30)

    assert run.status == 1 and "Traceback" not in run.output
    assert "database disk image is malformed" in run.output
    audit = rig.audit()
    assert audit.on_server == tuple(range(1, 41)) and audit.duplicates == 0


def fill(disk: Path, *, leave: int = 0) -> None:
    """Fill ``disk`` up, then give ``leave`` bytes back."""
    with open(disk / "filler", "wb") as filler:
        try:
            while True:
                filler.write(b"\0" * 65536)
                filler.flush()
        except OSError:
            pass
    size = (disk / "filler").stat().st_size
    os.truncate(disk / "filler", max(0, size - leave))


def test_a_state_database_on_a_full_disk_fails_the_poll_and_deletes_nothing(make_rig: RigFactory,
                                                                           filesystems: FileSystems) -> None:
    disk = need(filesystems.tmpfs("state", "1m"))
    rig = make_rig(corpus(3))
    rig.other_faults += 1
    rig.state_dir = disk / "state"
    rig.poll(keep=True, max_messages=1)
    fill(disk, leave=4096)  # room for the lock file's pid, none for the database

    run = run_postbote(rig.configure(), "poll", timeout=30)

    assert run.status == 1 and "Traceback" not in run.output, run.output
    assert "state database" in run.output
    audit = rig.audit()
    assert audit.on_server == (1, 2, 3) and audit.delivered_once == [1]
    (disk / "filler").unlink()
    rig.poll()
    assert rig.audit().everything_delivered_once_and_deleted


def test_a_completely_full_state_disk_is_a_one_line_error(make_rig: RigFactory, filesystems: FileSystems) -> None:
    disk = need(filesystems.tmpfs("state", "1m"))
    rig = make_rig(corpus(1))
    rig.other_faults += 1
    rig.state_dir = disk / "state"
    rig.poll(keep=True)
    fill(disk)

    run = run_postbote(rig.configure(), "poll", timeout=30)

    assert run.status == 1 and "Traceback" not in run.output, run.output
    assert "No space left on device" in first_line_of_error(run.output)


def test_a_read_only_state_directory_is_a_one_line_error_and_nothing_is_touched(
        make_rig: RigFactory, filesystems: FileSystems) -> None:
    disk = need(filesystems.tmpfs("state", "1m"))
    filesystems.remount(disk, "ro")
    rig = make_rig(corpus(1))
    rig.other_faults += 1
    rig.state_dir = disk / "state"

    run = run_postbote(rig.configure(), "poll", timeout=30)

    assert run.status == 1 and "Traceback" not in run.output
    assert "Read-only file system" in first_line_of_error(run.output)
    assert rig.server.commands == []

