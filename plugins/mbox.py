"""Delivery into an mbox file: ``deliver: {mbox: ~/mail/inbox}`` (or ``{mbox: {path: …, create: false}}``).

The format is mboxrd: each message starts with a ``From <sender> <date>`` separator line, every line matching
``^>*From `` gets one more ``>`` (so a reader that strips one ``>`` gets the message back exactly), lines end in LF,
and an empty line follows each message.

Other programs (MUAs, procmail, Dovecot) read and write the same file, so postbote takes both locks they may use:
a dot-lock (``PATH.lock``, created exclusively; one left behind by a dead process is removed) and an exclusive
fcntl lock on the file. While another program holds either, postbote waits up to ``lock_timeout`` and then fails
temporarily: the message stays on the server for the next poll.

Where postbote may not create the dot-lock (Debian's ``/var/mail`` is root:mail 2775, and postbote runs as the user,
not in group ``mail``), it locks with fcntl and flock only, as mutt and Python's ``mailbox`` do there, and logs
``mbox.dotlock_unavailable`` once per mbox.

A delivery counts only after the data is fsynced. On any error the file is truncated back to its size before the
message, so a half-written message never remains to corrupt the mailbox.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from postbote import (
    Delivered,
    DeliveryError,
    Destination,
    Message,
    Node,
    Problems,
    Section,
    boolean,
    duration,
    fsync_directory,
    get_logger,
    hookimpl,
    lf_lines,
    path_relative_to,
)

log = get_logger("postbote.mbox")

DESTINATION_KINDS = ("mbox",)
DEFAULT_LOCK_TIMEOUT = 10.0
STALE_DOTLOCK_AGE = 300.0
LOCK_RETRY_INTERVAL = 0.1
DEFAULT_SENDER = "MAILER-DAEMON"

_NEEDS_QUOTING = re.compile(rb">*From ")
_LINE = re.compile(rb"[^\n]*\n|[^\n]+")
_FROM_ = b"From "
_NOT_IN_SENDER = re.compile(r"[\x00-\x20\x7f]")
DOTLOCK_NOT_ALLOWED = (errno.EACCES, errno.EPERM, errno.EROFS)
"""Errors creating ``PATH.lock`` that mean the directory does not let us dot-lock at all (not: the lock is held)."""

_dotlock_unavailable_noted: set[Path] = set()
_noted_lock = threading.Lock()


@dataclass(frozen=True)
class MboxSettings:
    path: Path
    create: bool = True
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT

    @property
    def label(self) -> str:
        return str(self.path)


@hookimpl
def parse_destination(kind: str, options: Node, problems: Problems, base_dir: Path) -> MboxSettings | None:
    if kind != "mbox":
        return None
    if not isinstance(options.value, dict):
        path = Section(Node({"path": options}, options.line, options.path), problems).get(
            "path", path_relative_to(base_dir), required=True)
        return MboxSettings(path) if path else None
    section = Section(options, problems)
    settings = MboxSettings(path=section.get("path", path_relative_to(base_dir), required=True),
                            create=section.get("create", boolean, True),
                            lock_timeout=section.get("lock_timeout", duration, DEFAULT_LOCK_TIMEOUT))
    section.finish()
    return settings


@hookimpl
def deliver_message(message: Message, destination: Destination) -> Delivered | None:
    if destination.kind != "mbox":
        return None
    settings: MboxSettings = destination.settings
    try:
        offset = append_to_mbox(settings.path, message, create=settings.create, lock_timeout=settings.lock_timeout)
    except OSError as exc:
        raise DeliveryError(f"mbox {settings.path}: {exc.strerror or exc}", temporary=True) from None
    return Delivered(f"mbox {settings.path} (offset {offset})")


def append_to_mbox(path: Path, message: Message, *, create: bool = True,
                   lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> int:
    """Append ``message`` durably to the mbox at ``path``; returns the offset of its ``From`` line.

    Raises `OSError` (`TimeoutError` when the mailbox stays locked) and leaves the file as it was.
    """
    if create:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    elif not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "no such mbox file (create: false)")
    deadline = time.monotonic() + lock_timeout
    with dot_lock(path, deadline) as dotlock, \
            locked_mbox(path, deadline, create=create, flock=dotlock is None) as (fd, created):
        offset = _append_or_restore(fd, message)
    if created:
        fsync_directory(path.parent)
    return offset


# --- the mboxrd format ---


def separator_line(message: Message) -> bytes:
    """``From sender date``: the sender from Return-Path (``MAILER-DAEMON`` when absent or ``<>``), asctime date."""
    sender = _NOT_IN_SENDER.sub("_", message.return_path or "") or DEFAULT_SENDER
    date = time.asctime()
    return f"From {sender} {date}\n".encode("utf-8", "surrogateescape")


def mbox_entry(message: Message) -> Iterator[bytes]:
    """The message as it goes into the file: separator line, quoted body with LF line endings, empty line."""
    yield separator_line(message)
    last = b"\n"
    for chunk in mboxrd_quoted(lf_lines(message.chunks())):
        yield chunk
        last = chunk
    yield b"\n" if last.endswith(b"\n") else b"\n\n"


def mboxrd_quoted(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Add one ``>`` to every line matching ``^>*From `` in an LF-delimited stream split anywhere.

    Only the start of a line that might still become ``>…>From `` is held back, never a whole long line.
    """
    pending = b""
    at_line_start = True
    for chunk in chunks:
        out = bytearray()
        for piece in _LINE.findall(pending + chunk):
            pending = b""
            if not at_line_start:
                out += piece
            elif piece.endswith(b"\n") or _decided(piece):
                out += _quote(piece)
            else:
                pending = piece
                continue
            at_line_start = piece.endswith(b"\n")
        if out:
            yield bytes(out)
    if pending:
        yield _quote(pending)


def _decided(line_start: bytes) -> bool:
    """Whether the start of a line is long enough to know if the whole line needs quoting."""
    unquoted = line_start.lstrip(b">")
    return len(unquoted) >= len(_FROM_) or not _FROM_.startswith(unquoted)


def _quote(line: bytes) -> bytes:
    return b">" + line if _NEEDS_QUOTING.match(line) else line


def mboxrd_messages(data: bytes) -> list[bytes]:
    """Split an mboxrd file into its messages, unquoted (the inverse of the writer; used by tests and tools)."""
    messages: list[list[bytes]] = []
    for line in _LINE.findall(data):
        if line.startswith(_FROM_):
            messages.append([])
        elif not messages:
            raise ValueError("not an mbox file: it does not start with a 'From ' line")
        else:
            messages[-1].append(line[1:] if line.startswith(b">") and _NEEDS_QUOTING.match(line, 1) else line)
    return [b"".join(lines[:-1] if lines and lines[-1] == b"\n" else lines) for lines in messages]


# --- writing ---


def _append_or_restore(fd: int, message: Message) -> int:
    """Append the entry at the end of the file and fsync it; on any failure cut the file back and re-raise."""
    size_before = os.fstat(fd).st_size
    try:
        padding = _padding_before_entry(fd, size_before)
        _write_all(fd, [padding, *mbox_entry(message)])
        os.fsync(fd)
    except BaseException as exc:
        _truncate(fd, size_before, exc)
        raise
    return size_before + len(padding)


def _padding_before_entry(fd: int, size: int) -> bytes:
    """Newlines so that the new ``From`` line follows an empty line even if the file's last message lacks it."""
    if size == 0:
        return b""
    tail = os.pread(fd, 2, max(0, size - 2))
    if tail.endswith(b"\n\n") or tail == b"\n":
        return b""
    return b"\n" if tail.endswith(b"\n") else b"\n\n"


def _write_all(fd: int, chunks: Iterable[bytes]) -> None:
    buffer = bytearray()
    for chunk in chunks:
        buffer += chunk
        if len(buffer) >= 1 << 16:
            _write_fully(fd, buffer)
            buffer.clear()
    _write_fully(fd, buffer)


def _write_fully(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _truncate(fd: int, size: int, cause: BaseException) -> None:
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    except OSError as exc:
        cause.add_note(f"the mbox could not be cut back to {size} bytes ({exc.strerror or exc}): "
                       f"it may end with a partial message")


# --- locking ---


@contextlib.contextmanager
def locked_mbox(path: Path, deadline: float, *, create: bool, flock: bool = False) -> Iterator[tuple[int, bool]]:
    """The mbox opened for appending under an exclusive fcntl lock (and flock with ``flock``): ``(fd, created)``.

    The lock is taken on the file the path names once locked: if another program replaced the file meanwhile
    (an MUA rewriting the mailbox), it is opened again.
    """
    while True:
        fd, created = _open_mbox(path, create=create)
        try:
            _fcntl_lock(fd, path, deadline)
            if flock:
                _flock(fd, path, deadline)
            if _same_file(fd, path):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield fd, created
    finally:
        os.close(fd)


def _open_mbox(path: Path, *, create: bool) -> tuple[int, bool]:
    flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
    created = False
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        if not create:
            raise FileNotFoundError(errno.ENOENT, "no such mbox file (create: false)") from None
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
            created = True
        except FileExistsError:
            fd = os.open(path, flags)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file")
    return fd, created


def _fcntl_lock(fd: int, path: Path, deadline: float) -> None:
    _lock_or_wait(lambda: fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB), (errno.EACCES, errno.EAGAIN),
                  f"another program holds the fcntl lock on {path}", deadline)


def _flock(fd: int, path: Path, deadline: float) -> None:
    """The BSD lock some MUAs take instead of fcntl's; on Linux the two do not see each other."""
    _lock_or_wait(lambda: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB), (errno.EWOULDBLOCK, errno.EAGAIN),
                  f"another program holds the flock lock on {path}", deadline)


def _lock_or_wait(try_lock: Callable[[], None], busy: tuple[int, ...], held: str, deadline: float) -> None:
    """Try a non-blocking lock until it is taken or ``deadline`` passes (then `TimeoutError` saying ``held``)."""
    while True:
        try:
            try_lock()
            return
        except OSError as exc:
            if exc.errno not in busy:
                raise
        if time.monotonic() >= deadline:
            raise TimeoutError(errno.ETIMEDOUT, held)
        time.sleep(LOCK_RETRY_INTERVAL)


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (opened.st_dev, opened.st_ino)


class DotLockNotAllowed(OSError):
    """The mbox's directory does not let us create ``PATH.lock`` (permissions, read-only file system)."""


@contextlib.contextmanager
def dot_lock(path: Path, deadline: float) -> Iterator[Path | None]:
    """Hold ``PATH.lock`` (created with O_EXCL, holding our pid) until the block ends; None where the directory
    does not allow creating it (then the caller relies on fcntl and flock, and this is logged once per mbox).

    A lock file is stale, and removed, when the pid it names is not running on this host or when it is older than
    `STALE_DOTLOCK_AGE` (a lock held that long by a live delivery is not plausible; the rule other MDAs use).
    """
    lock = path.with_name(path.name + ".lock")
    try:
        _acquire_dot_lock(lock, deadline)
    except DotLockNotAllowed as exc:
        _note_dotlock_unavailable(path, exc)
        yield None
        return
    try:
        yield lock
    finally:
        lock.unlink(missing_ok=True)


def _acquire_dot_lock(lock: Path, deadline: float) -> None:
    while not _create_lock_file(lock):
        if _remove_if_stale(lock):
            continue
        if time.monotonic() >= deadline:
            raise TimeoutError(errno.ETIMEDOUT, f"{lock} is held by another program")
        time.sleep(LOCK_RETRY_INTERVAL)


def _note_dotlock_unavailable(path: Path, exc: OSError) -> None:
    with _noted_lock:
        if path in _dotlock_unavailable_noted:
            return
        _dotlock_unavailable_noted.add(path)
    log.warning("mbox.dotlock_unavailable", mbox=str(path), reason=exc.strerror,
                locking="fcntl and flock only, as other programs without the right to dot-lock here do")


def _create_lock_file(lock: Path) -> bool:
    """Take the dot-lock: write our pid into a file of our own, then link it to ``PATH.lock`` (the link fails if
    the lock exists). The lock never exists without the pid in it, so a poll killed at any moment leaves a lock
    that the next one sees is stale -- an empty lock file could only be judged by its age, minutes later."""
    mine = lock.with_name(f"{lock.name}.{socket.gethostname()}.{os.getpid()}")
    try:
        fd = os.open(mine, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno in DOTLOCK_NOT_ALLOWED:
            raise DotLockNotAllowed(exc.errno, f"cannot create the dot-lock {lock}: {exc.strerror}") from None
        raise OSError(exc.errno, f"cannot create the dot-lock {lock}: {exc.strerror}") from None
    try:
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
        finally:
            os.close(fd)
        os.link(mine, lock)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno in DOTLOCK_NOT_ALLOWED:
            raise DotLockNotAllowed(exc.errno, f"cannot create the dot-lock {lock}: {exc.strerror}") from None
        raise OSError(exc.errno, f"cannot create the dot-lock {lock}: {exc.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(mine)
    return True


def _remove_if_stale(lock: Path) -> bool:
    """Remove ``lock`` if it is stale; True when it is gone (so creating it may be tried again at once)."""
    try:
        seen = os.stat(lock)
        content = lock.read_bytes()[:32]
    except FileNotFoundError:
        return True
    if not _holder_is_dead(content) and time.time() - seen.st_mtime < STALE_DOTLOCK_AGE:
        return False
    try:
        current = os.stat(lock)
        if (current.st_ino, current.st_mtime_ns) == (seen.st_ino, seen.st_mtime_ns):
            lock.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno in DOTLOCK_NOT_ALLOWED:  # a stale lock we may not remove: we could not create ours either
            raise DotLockNotAllowed(exc.errno, f"cannot remove the stale dot-lock {lock}: {exc.strerror}") from None
        raise
    return True


def _holder_is_dead(content: bytes) -> bool:
    """True only when the lock names a pid that does not exist here; locks without a pid are judged by age."""
    try:
        pid = int(content.strip() or b"0")
    except ValueError:
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
