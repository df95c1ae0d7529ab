"""Delivery into a Maildir: ``deliver: {maildir: /srv/mail/alice}`` (or ``{maildir: {path: …, create: false}}``).

The message is written to ``tmp/`` under a unique name, fsynced, linked into ``new/``, and the directory is fsynced
before the delivery counts: after a crash the file is either complete in ``new/`` or not there at all.
Line endings become LF, the Maildir convention.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import queue
import re
import socket
import threading
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from postbote import (
    DeliveryError,
    Destination,
    Message,
    Node,
    Problems,
    Section,
    Staged,
    boolean,
    fsync_directory,
    hookimpl,
    lf_lines,
    path_relative_to,
)

if TYPE_CHECKING:
    from postbote import Poll

DESTINATION_KINDS = ("maildir",)
_counter = itertools.count()


@dataclass(frozen=True)
class MaildirSettings:
    path: Path
    create: bool = True
    # Files are staged (`postbote.Staged`): made visible in the transaction that records the message.
    stages_delivery: ClassVar[bool] = True

    @property
    def label(self) -> str:
        return str(self.path)


@hookimpl
def parse_destination(kind: str, options: Node, problems: Problems, base_dir: Path) -> MaildirSettings | None:
    if kind != "maildir":
        return None
    if not isinstance(options.value, dict):
        path = Section(Node({"path": options}, options.line, options.path), problems).get(
            "path", path_relative_to(base_dir), required=True)
        return MaildirSettings(path) if path else None
    section = Section(options, problems)
    settings = MaildirSettings(path=section.get("path", path_relative_to(base_dir), required=True),
                               create=section.get("create", boolean, True))
    section.finish()
    return settings


@hookimpl
def deliver_message(message: Message, destination: Destination, poll: Poll) -> Staged | None:
    if destination.kind != "maildir":
        return None
    settings: MaildirSettings = destination.settings
    try:
        # Checked once per poll, not per message: a Maildir vanishing mid-poll still fails the open below.
        files: NewFiles = poll.resource(("maildir", settings.path), lambda: _opened(settings),
                                        usable=lambda files: not files.failed, close=NewFiles.close)
        name, fd = files.take()
        temporary, final = f"{files.folder}/tmp/{name}", f"{files.folder}/new/{name}"
        write_into(fd, temporary, message, sync=False)
    except OSError as exc:
        raise DeliveryError(f"maildir {settings.path}: {exc.strerror or exc}", temporary=True) from None
    # Made durable together with the rest of the poll's batch, then renamed into new/ (group commit); at once when
    # the message has other destinations too, each of which must be recorded on its own.
    return Staged(answer=final, source=temporary, target=final)


def _opened(settings: MaildirSettings) -> NewFiles:
    ensure_maildir(settings.path, create=settings.create)
    remove_stale_temporary_files(settings.path)
    return NewFiles(str(settings.path))


class NewFiles:
    """Empty files under unique names in a Maildir's ``tmp/``, created a few ahead by a background thread.

    Creating a file is the slowest step of a Maildir delivery (an inode and a directory entry; on a busy ext4
    it can wait on the journal for a millisecond), and it does not depend on the message: so it overlaps with
    fetching and filtering instead of holding them up. Files not used by the end of the poll are removed; a killed
    poll leaves empty files in ``tmp/``, cleaned up after 36 hours like any stale temporary file.
    """

    AHEAD = 16

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.failed = False
        self._ready: queue.Queue[tuple[str, int] | OSError] = queue.Queue(self.AHEAD)
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._create, name=f"maildir {folder}", daemon=True)
        self._thread.start()

    def take(self) -> tuple[str, int]:
        """The next new file's name and descriptor; raises the OSError that stopped the creating (after which
        this object is spent: the poll opens a new one for the next message)."""
        while True:
            try:
                item = self._ready.get(timeout=1.0)
            except queue.Empty:
                if self._thread.is_alive():
                    continue
                item = OSError(errno.EIO, "the thread creating files stopped")
            if isinstance(item, OSError):
                self.failed = True
                raise item
            return item

    def _create(self) -> None:
        while not self._closing.is_set():
            name = unique_name()
            try:
                item: tuple[str, int] | OSError = (name, os.open(f"{self.folder}/tmp/{name}", _NEW_FILE, 0o600))
            except OSError as exc:
                item = exc
            while not self._closing.is_set():
                with contextlib.suppress(queue.Full):
                    self._ready.put(item, timeout=0.2)
                    break
            else:
                self._remove(item)
            if isinstance(item, OSError):
                return

    def close(self) -> None:
        self._closing.set()
        while self._thread.is_alive() or not self._ready.empty():
            with contextlib.suppress(queue.Empty):
                self._remove(self._ready.get(timeout=0.05))

    def _remove(self, item: tuple[str, int] | OSError) -> None:
        if isinstance(item, OSError):
            return
        name, fd = item
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(f"{self.folder}/tmp/{name}")


_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


STALE_AFTER = 36 * 3600


def remove_stale_temporary_files(path: Path, now: float | None = None) -> int:
    """Delete files left in ``tmp/`` for over 36 hours (the Maildir convention), e.g. by a killed poll, and at once
    the empty files a killed poll of ours had created ahead (`NewFiles`: named for this host and a process that is
    gone).

    Such a file was never renamed into ``new/``, so its message was not recorded as delivered or, if it was (a
    crash between the commit and the rename), the poll's journal renames it before this runs: nothing is lost.
    """
    limit = (now or time.time()) - STALE_AFTER
    removed = 0
    with os.scandir(path / "tmp") as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                if not entry.is_file(follow_symlinks=False):
                    continue
                status = entry.stat(follow_symlinks=False)
                if status.st_mtime < limit or (status.st_size == 0 and _created_ahead_by_a_dead_poll(entry.name)):
                    os.unlink(entry.path)
                    removed += 1
    return removed


def _created_ahead_by_a_dead_poll(name: str) -> bool:
    match = re.fullmatch(r"\d+\.M\d+P(\d+)Q\d+\.(.+)", name)
    if match is None or match.group(2) != _host_part() or int(match.group(1)) == os.getpid():
        return False
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # alive, someone else's
    return False


def ensure_maildir(path: Path, *, create: bool) -> None:
    for sub in ("tmp", "new", "cur"):
        folder = path / sub
        if not folder.is_dir():
            if not create:
                raise FileNotFoundError(2, f"not a Maildir (no {sub}/)")
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)


@cache
def _host_part() -> str:
    return socket.gethostname().replace("/", "_").replace(":", "_")


def unique_name() -> str:
    """``time.M<usec>P<pid>Q<counter>.host``, unique per process and time as the Maildir convention asks."""
    now = time.time()
    return f"{int(now)}.M{int(now % 1 * 1_000_000)}P{os.getpid()}Q{next(_counter)}.{_host_part()}"


def write_file(path: str | Path, message: Message, *, sync: bool) -> None:
    """Write ``message`` with LF line endings to a new file ``path``; removed again if anything fails."""
    write_into(os.open(path, _NEW_FILE, 0o600), path, message, sync=sync)


def write_into(fd: int, path: str | Path, message: Message, *, sync: bool) -> None:
    """Write ``message`` with LF line endings into the new, empty file ``path`` open as ``fd``, and close it;
    the file is removed again if anything fails."""
    try:
        for chunk in lf_lines(message.chunks()):
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
        closing, fd = fd, -1
        os.close(closing)  # may report a deferred write error (NFS, quota): the file is then removed too
    except BaseException:
        if fd != -1:
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


def write_maildir(path: Path, message: Message, *, create: bool = True) -> Path:
    """Write ``message`` durably into ``path/new`` on its own (fsync file, link, fsync directory)."""
    ensure_maildir(path, create=create)
    name = unique_name()
    temporary, final = path / "tmp" / name, path / "new" / name
    write_file(temporary, message, sync=True)
    try:
        os.link(temporary, final)
    finally:
        temporary.unlink(missing_ok=True)
    fsync_directory(final.parent)
    return final

