"""Push: a source tells ``postbote run`` that new mail has arrived, so the account is polled at once (IMAP IDLE).

A source plugin answers the ``watch_mailbox(account, state_dir)`` hook with `Watch` objects, each an open connection
waiting for the server's word (one per IMAP folder). The daemon opens them after a successful poll, in the poll's
thread, and hands them to one `Watcher` thread that waits on all of them with a selector: an idle account costs a
socket and a little memory, never a thread. When a watch says "new mail", the account is queued for a poll, as
SIGUSR1 would queue it. A watch that fails is closed; the account falls back to its ``poll_interval`` and the next
successful poll opens a new watch.

A watch never fetches or deletes anything: polls do that, with all of their safety rules.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import structlog
from postbote.errors import PostboteError
from postbote.logconfig import get_logger

log = get_logger("postbote.watch")
MAX_WAIT = 60.0  # the watcher looks at its deadlines at least this often


@runtime_checkable
class Watch(Protocol):
    """One connection waiting for new mail (IMAP: a selected folder in IDLE)."""

    name: str  # what the logs call it (IMAP: the folder)

    def fileno(self) -> int:
        """The socket to wait on: readable when the server has said something."""
        ...

    def readable(self) -> bool:
        """Read what has arrived (never blocking for long); True when it announces new mail. Raises
        `PostboteError` (or OSError) when the connection is broken: the watch is then closed."""
        ...

    def refresh_at(self) -> float:
        """``time.monotonic()`` by which `refresh` must be called (IMAP: re-issue IDLE before the server's 30-minute
        limit)."""
        ...

    def refresh(self) -> bool:
        """Renew the wait; True when new mail was announced meanwhile. Raises like `readable`."""
        ...

    def close(self) -> None:
        """Close the connection (politely if it can, at once otherwise); never raises."""
        ...


@dataclass(eq=False)
class _Watched:
    account: str
    watch: Watch
    fd: int = -1  # as registered: a closed socket's fileno() is -1


class Watcher:
    """One thread waiting on every open `Watch`; ``on_new_mail(account)`` is called from that thread."""

    def __init__(self, on_new_mail: Callable[[str], None]) -> None:
        self._on_new_mail = on_new_mail
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._added: list[_Watched] = []
        self._accounts: dict[str, list[_Watched]] = {}
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self._selector.register(self._wake_reader, selectors.EVENT_READ, None)
        self._stopping = False
        self._closing: set[str] = set()
        self._thread: threading.Thread | None = None

    def watching(self, account: str) -> bool:
        with self._lock:
            return account in self._accounts or any(w.account == account for w in self._added)

    def count(self) -> int:
        """Open watches."""
        with self._lock:
            return sum(len(watched) for watched in self._accounts.values()) + len(self._added)

    def add(self, account: str, watches: list[Watch]) -> None:
        """Start waiting on ``watches`` (thread-safe); the thread starts with the first."""
        with self._lock:
            if self._stopping:
                for watch in watches:
                    watch.close()
                return
            self._closing.discard(account)
            self._added.extend(_Watched(account, watch) for watch in watches)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="watcher", daemon=True)
                self._thread.start()
        self._poke()

    def drop(self, account: str) -> None:
        """Close the account's watches (thread-safe): its config changed or it is gone."""
        with self._lock:
            self._closing.add(account)
        self._poke()

    def stop(self, timeout: float = 5.0) -> None:
        """Close every watch and end the thread."""
        with self._lock:
            self._stopping = True
            thread = self._thread
        self._poke()
        if thread is not None:
            thread.join(timeout)
        else:
            self._close_everything()

    def _poke(self) -> None:
        with contextlib.suppress(OSError):  # full: a wake-up is already waiting
            self._wake_writer.send(b"\0")

    # --- the watcher thread

    def _run(self) -> None:
        structlog.contextvars.clear_contextvars()
        try:
            while True:
                if self._take_changes():
                    break
                for key, _ in self._selector.select(self._wait_time()):
                    if key.data is None:
                        self._drain_wakeups()
                    else:
                        self._serve(key.data, lambda watch: watch.readable())
                now = time.monotonic()
                for watched in self._all():
                    if watched.watch.refresh_at() <= now:
                        self._serve(watched, lambda watch: watch.refresh())
        finally:
            self._close_everything()

    def _take_changes(self) -> bool:
        """Register added watches and close dropped ones; True when the watcher is to stop."""
        with self._lock:
            added, self._added = self._added, []
            closing, self._closing = self._closing, set()
            stopping = self._stopping
        for watched in added:
            try:
                watched.fd = watched.watch.fileno()
                self._selector.register(watched.fd, selectors.EVENT_READ, watched)
            except (OSError, ValueError) as exc:
                log.warning("watch.failed", account=watched.account, folder=watched.watch.name, error=str(exc))
                watched.watch.close()
                continue
            with self._lock:
                self._accounts.setdefault(watched.account, []).append(watched)
            log.info("watch.started", account=watched.account, folder=watched.watch.name)
        for account in closing:
            for watched in list(self._accounts.get(account, ())):
                self._close(watched, reason="the account's config changed")
        return stopping

    def _all(self) -> list[_Watched]:
        with self._lock:
            return [watched for group in self._accounts.values() for watched in group]

    def _wait_time(self) -> float:
        now = time.monotonic()
        due = [watched.watch.refresh_at() - now for watched in self._all()]
        return max(0.0, min([MAX_WAIT, *due]))

    def _drain_wakeups(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while self._wake_reader.recv(4096):
                pass

    def _serve(self, watched: _Watched, step: Callable[[Watch], bool]) -> None:
        try:
            new_mail = step(watched.watch)
        except (PostboteError, OSError) as exc:
            self._close(watched, reason=str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - a plugin's bug closes its watch, never the thread watching all
            log.exception("watch.crashed", account=watched.account, folder=watched.watch.name)
            self._close(watched, reason=f"{type(exc).__name__}: {exc}")
            return
        if new_mail:
            log.info("watch.new_mail", account=watched.account, folder=watched.watch.name)
            self._on_new_mail(watched.account)

    def _close(self, watched: _Watched, *, reason: str) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(watched.fd)
        with self._lock:
            group = self._accounts.get(watched.account, [])
            if watched in group:
                group.remove(watched)
            if not group:
                self._accounts.pop(watched.account, None)
        watched.watch.close()
        if not self._stopping:
            log.info("watch.closed", account=watched.account, folder=watched.watch.name, reason=reason,
                     effect="polled at its poll_interval until the next successful poll watches again")

    def _close_everything(self) -> None:
        for watched in self._all():
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(watched.fd)
            watched.watch.close()
        with self._lock:
            self._accounts.clear()
            for watched in self._added:
                watched.watch.close()
            self._added.clear()
        with contextlib.suppress(OSError):
            self._selector.close()
        self._wake_reader.close()
        self._wake_writer.close()
