"""Delivery into a Maildir: ``deliver: {maildir: /srv/mail/alice}`` (or ``{maildir: {path: …, create: false}}``).

The message is written to ``tmp/`` under a unique name, fsynced, linked into ``new/``, and the directory is fsynced
before the delivery counts: after a crash the file is either complete in ``new/`` or not there at all.
Line endings become LF, the Maildir convention.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from agent import DeliveryError, Message, hookimpl
from agent import settings as s
from agent.config import Destination
from agent.poller import PollContext
from agent.settings import Node, Problems, Section
from agent.wire import lf_lines

DESTINATION_KINDS = ("maildir",)
_counter = itertools.count()


@dataclass(frozen=True)
class MaildirSettings:
    path: Path
    create: bool = True

    @property
    def label(self) -> str:
        return str(self.path)


@hookimpl
def parse_destination(kind: str, options: Node, problems: Problems, base_dir: Path) -> MaildirSettings | None:
    if kind != "maildir":
        return None
    if not isinstance(options.value, dict):
        path = Section(Node({"path": options}, options.line, options.path), problems).get(
            "path", s.path_relative_to(base_dir), required=True)
        return MaildirSettings(path) if path else None
    section = Section(options, problems)
    settings = MaildirSettings(path=section.get("path", s.path_relative_to(base_dir), required=True),
                               create=section.get("create", s.boolean, True))
    section.finish()
    return settings


@hookimpl
def deliver_message(message: Message, destination: Destination, poll: PollContext) -> str | None:
    if destination.kind != "maildir":
        return None
    settings: MaildirSettings = destination.settings
    try:
        # Checked once per poll, not per message: a Maildir vanishing mid-poll still fails the open below.
        folder = poll.resource(("maildir", settings.path), lambda: _checked(settings), close=lambda _: None)
        name = unique_name()
        temporary, final = f"{folder}/tmp/{name}", f"{folder}/new/{name}"
        write_file(temporary, message, sync=False)
    except OSError as exc:
        raise DeliveryError(f"maildir {settings.path}: {exc.strerror or exc}", temporary=True) from None
    # Made durable together with the rest of the poll's batch, then renamed into new/ (group commit).
    poll.stage_rename(temporary, final)
    return str(final)


def _checked(settings: MaildirSettings) -> str:
    ensure_maildir(settings.path, create=settings.create)
    remove_stale_temporary_files(settings.path)
    return str(settings.path)


STALE_AFTER = 36 * 3600


def remove_stale_temporary_files(path: Path, now: float | None = None) -> int:
    """Delete files left in ``tmp/`` for over 36 hours (the Maildir convention), e.g. by a killed poll.

    Such a file was never renamed into ``new/``, so its message was not recorded as delivered or, if it was (a
    crash between the commit and the rename), it is still on the server and fetched again: nothing is lost.
    """
    limit = (now or time.time()) - STALE_AFTER
    removed = 0
    with os.scandir(path / "tmp") as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < limit:
                    os.unlink(entry.path)
                    removed += 1
    return removed


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
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb", buffering=1 << 16) as handle:
            for chunk in lf_lines(message.chunks()):
                handle.write(chunk)
            handle.flush()
            if sync:
                os.fsync(handle.fileno())
    except BaseException:
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


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
