"""The durability helpers (`postbote.durable`): what each one does to real files, and their one error behaviour,
the kernel's `OSError` raised as it is.

Writeback errors from a real disk (EIO, ENOSPC through syncfs) are covered end to end by tests/test_faults_local.py;
here the C library's syncfs is replaced only to reach the fallbacks a current kernel never takes (no syncfs in the
C library, ENOSYS from an old kernel)."""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable
from pathlib import Path

import postbote
import pytest
from postbote import durable


def written(path: Path, content: bytes = b"a message\n") -> Path:
    path.write_bytes(content)
    return path


def test_the_face_names_the_helpers_plugins_use() -> None:
    assert postbote.fsync_directory is durable.fsync_directory
    assert postbote.fsync_file is durable.fsync_file
    assert postbote.rename_durably is durable.rename_durably
    assert postbote.sync_filesystems is durable.sync_filesystems


def test_fsync_file_and_fsync_directory_accept_str_and_path(tmp_path: Path) -> None:
    message = written(tmp_path / "message")
    for path in (message, str(message)):
        durable.fsync_file(path)
    for directory in (tmp_path, str(tmp_path)):
        durable.fsync_directory(directory)
    assert message.read_bytes() == b"a message\n"


def test_a_missing_file_raises_the_kernels_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as raised:
        durable.fsync_file(tmp_path / "gone")
    assert raised.value.errno == errno.ENOENT


def test_fsync_directory_refuses_a_file(tmp_path: Path) -> None:
    with pytest.raises(NotADirectoryError):
        durable.fsync_directory(written(tmp_path / "message"))


def test_rename_durably_moves_the_file_into_place(tmp_path: Path) -> None:
    (tmp_path / "tmp").mkdir()
    (tmp_path / "new").mkdir()
    source = written(tmp_path / "tmp" / "1")
    durable.rename_durably(source, tmp_path / "new" / "1")
    assert not source.exists()
    assert (tmp_path / "new" / "1").read_bytes() == b"a message\n"


def test_rename_durably_of_a_missing_source_raises_and_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        durable.rename_durably(tmp_path / "gone", tmp_path / "target")
    assert not (tmp_path / "target").exists()


def test_rename_all_durably_fsyncs_each_target_directory_once(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    for folder in (first, second):
        folder.mkdir()
    renames = [(written(tmp_path / f"{n}.tmp"), folder / str(n)) for n, folder in enumerate([first, first, second])]
    fsynced = recording(monkeypatch, "fsync_directory")
    durable.rename_all_durably(renames)
    assert sorted(fsynced) == [str(first), str(second)]
    assert all(target.read_bytes() == b"a message\n" for _, target in renames)


def test_rename_all_durably_stops_at_the_first_failure_and_fsyncs_nothing(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    done, missing, after = written(tmp_path / "done.tmp"), tmp_path / "missing.tmp", written(tmp_path / "after.tmp")
    fsynced = recording(monkeypatch, "fsync_directory")
    with pytest.raises(FileNotFoundError):
        durable.rename_all_durably([(done, tmp_path / "done"), (missing, tmp_path / "missing"),
                                    (after, tmp_path / "after")])
    assert (tmp_path / "done").exists()
    assert after.exists()
    assert not (tmp_path / "after").exists()
    assert fsynced == []


def test_sync_filesystems_syncs_each_file_system_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many files in several directories of one file system cost one syncfs, through the real C library."""
    real_syncfs = durable._find_syncfs()
    if real_syncfs is None:
        pytest.skip("this C library has no syncfs")
    calls: list[int] = []

    def counting_syncfs(fd: int) -> int:
        calls.append(fd)
        return real_syncfs(fd)

    monkeypatch.setattr(durable, "_find_syncfs", lambda: counting_syncfs)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    files = [written(tmp_path / folder / str(n)) for folder in ("a", "b") for n in range(3)]
    durable.sync_filesystems(files)
    assert len(calls) == 1


def test_sync_filesystems_of_nothing_syncs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(durable, "_find_syncfs", lambda: pytest.fail("no file, no syncfs"))
    durable.sync_filesystems([])


def test_sync_filesystems_of_a_missing_directory_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        durable.sync_filesystems([tmp_path / "gone" / "message"])


def test_without_syncfs_in_the_c_library_it_falls_back_to_sync(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(durable, "_find_syncfs", lambda: None)
    synced = counting_sync(monkeypatch)
    durable.sync_filesystems([written(tmp_path / "message")])
    assert synced == [True]


def test_a_kernel_without_syncfs_falls_back_to_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(durable, "_find_syncfs", lambda: failing_syncfs(errno.ENOSYS))
    synced = counting_sync(monkeypatch)
    durable.sync_filesystems([written(tmp_path / "message")])
    assert synced == [True]


@pytest.mark.parametrize("error", [errno.EIO, errno.ENOSPC])
def test_a_writeback_error_is_raised_as_oserror_with_its_errno(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               error: int) -> None:
    monkeypatch.setattr(durable, "_find_syncfs", lambda: failing_syncfs(error))
    synced = counting_sync(monkeypatch)
    with pytest.raises(OSError) as raised:
        durable.sync_filesystems([written(tmp_path / "message")])
    assert raised.value.errno == error
    assert raised.value.strerror == f"syncfs: {os.strerror(error)}"
    assert synced == [], "a reported writeback error is not papered over with sync()"


def test_the_c_librarys_syncfs_is_found_once() -> None:
    assert durable._find_syncfs() is durable._find_syncfs()


# --- helpers ---


def recording(monkeypatch: pytest.MonkeyPatch, name: str) -> list[str]:
    """Replace ``durable.<name>`` (a one-path helper) by a wrapper that records its argument and calls it."""
    original: Callable[[str], None] = getattr(durable, name)
    calls: list[str] = []

    def record(path: str) -> None:
        calls.append(os.fspath(path))
        original(path)

    monkeypatch.setattr(durable, name, record)
    return calls


def counting_sync(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    calls: list[bool] = []
    monkeypatch.setattr(os, "sync", lambda: calls.append(True))
    return calls


def failing_syncfs(error: int) -> Callable[[int], int]:
    """A syncfs that fails as the C library does: -1, with ``error`` left in errno."""

    def syncfs(fd: int) -> int:
        ctypes.set_errno(error)
        return -1

    return syncfs
