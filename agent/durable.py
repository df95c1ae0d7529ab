"""Making written files survive a crash: fsync a file or a directory, sync whole file systems, rename durably.

One error behaviour for all of them: when the kernel reports that data may not have reached the disk (EIO, ENOSPC,
a missing path, …) they raise the `OSError` it gave, with its ``errno`` and ``strerror``, and leave the file in
place. Callers turn that into their own error (a temporary `DeliveryError`, an `AccountError`, …) or, where the
sync is only a courtesy, suppress it. Nothing here logs or retries.

A rename is durable once the directory holding the new name is fsynced: before that a crash may undo it.
"""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Callable, Iterable

AnyPath = str | os.PathLike[str]


def fsync_file(path: AnyPath) -> None:
    """Flush the data of the file at ``path`` to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(path: AnyPath) -> None:
    """Flush the directory at ``path``, making the creations, renames and removals of names in it durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rename_durably(source: AnyPath, target: AnyPath) -> None:
    """Rename ``source`` to ``target`` and fsync the target's directory. ``source``'s data must be durable already
    (`fsync_file`, `sync_filesystems`): the rename makes the name durable, not the content."""
    rename_all_durably([(source, target)])


def rename_all_durably(renames: Iterable[tuple[AnyPath, AnyPath]]) -> None:
    """Rename each ``(source, target)`` in order, then fsync each target directory once (a batch in one Maildir
    costs one directory fsync, not one per file). Stops at the first failure: the renames before it are done,
    the ones after it are not, and no directory is fsynced."""
    directories: dict[str, None] = {}  # ordered and unique: each directory fsynced once, in the order first seen
    for source, target in renames:
        os.rename(source, target)
        directories[os.path.dirname(os.fspath(target))] = None
    for directory in directories:
        fsync_directory(directory)


def sync_filesystems(paths: Iterable[AnyPath]) -> None:
    """Flush the data of many files with one ``syncfs`` per file system instead of one ``fsync`` per file.

    Uses syncfs(2), which reports writeback errors (EIO, ENOSPC) since Linux 5.8; where the C library has no
    syncfs, or the kernel answers ENOSYS, plain sync(), which flushes everything and reports nothing."""
    seen_devices: set[int] = set()
    for directory in {os.path.dirname(os.fspath(path)) for path in paths}:
        device = os.stat(directory).st_dev
        if device in seen_devices:
            continue
        seen_devices.add(device)
        fd = os.open(directory, os.O_RDONLY)
        try:
            _syncfs(fd)
        finally:
            os.close(fd)


def _syncfs(fd: int) -> None:
    syncfs = _find_syncfs()
    if syncfs is None:
        os.sync()
        return
    if syncfs(fd) != 0:
        import ctypes

        error = ctypes.get_errno()
        if error == errno.ENOSYS:
            os.sync()
            return
        raise OSError(error, f"syncfs: {os.strerror(error)}")


@functools.cache
def _find_syncfs() -> Callable[[int], int] | None:
    """syncfs from the C library Python runs on (looked up on first use: ``find_library`` would run ldconfig)."""
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).syncfs  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None
