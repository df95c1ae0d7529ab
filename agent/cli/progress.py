"""Progress of long fetches on a terminal: ``alice: 120/3400 messages, 12.3/450.0 MB (3%)``, redrawn in place.

Part of the CLI, not a built-in plugin: ``postbote poll`` registers a `ProgressDisplay` as an observer plugin when
stderr is a terminal, so a daemon or a timer never draws anything. A line appears only once a poll has been fetching
for `SHOW_AFTER` seconds, so quick polls stay quiet. Log lines printed meanwhile first wipe the progress line (a
logging filter does that), so the two never end up mixed on one line.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from postbote import Message, hookimpl
from postbote.config import Account

SHOW_AFTER = 1.0
REDRAW_EVERY = 0.2
CLEAR_LINE = "\r\x1b[K"


@dataclass
class Progress:
    account: str
    count: int
    octets: int
    started: float
    done: int = 0
    done_octets: int = 0

    def line(self) -> str:
        percent = f" ({100 * self.done_octets // self.octets}%)" if self.octets else ""
        return (f"{self.account}: {self.done}/{self.count} messages, "
                f"{_megabytes(self.done_octets)}/{_megabytes(self.octets)} MB{percent}")


def _megabytes(octets: int) -> str:
    return f"{octets / 1_000_000:.1f}"


class _ClearBeforeLogging(logging.Filter):
    def __init__(self, clear: Callable[[], None]) -> None:
        super().__init__()
        self._clear = clear

    def filter(self, record: logging.LogRecord) -> bool:
        self._clear()
        return True


class ProgressDisplay:
    """An observer plugin drawing one progress line per running poll on ``stream``."""

    def __init__(self, stream: TextIO, clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self._clock = clock
        self._lock = threading.RLock()
        self._polls: dict[str, Progress] = {}
        self._shown = False
        self._last_draw = 0.0
        self._filter = _ClearBeforeLogging(self.clear)
        self._handlers = list(logging.getLogger().handlers)
        for handler in self._handlers:
            handler.addFilter(self._filter)

    @hookimpl
    def messages_listed(self, account: Account, count: int, octets: int) -> None:
        with self._lock:
            self._polls[account.name] = Progress(account.name, count, octets, self._clock())

    @hookimpl
    def message_delivered(self, message: Message, account: Account) -> None:
        self._advance(account, message)

    @hookimpl
    def message_dropped(self, message: Message, account: Account) -> None:
        self._advance(account, message)

    @hookimpl
    def message_failed(self, message: Message, account: Account) -> None:
        self._advance(account, message)

    @hookimpl
    def poll_finished(self, account: Account) -> None:
        with self._lock:
            self._polls.pop(account.name, None)
            self.clear()

    def _advance(self, account: Account, message: Message) -> None:
        with self._lock:
            progress = self._polls.get(account.name)
            if progress is None:
                return
            progress.done += 1
            progress.done_octets = min(progress.octets, progress.done_octets + message.size)
            self._draw(progress)

    def _draw(self, progress: Progress) -> None:
        now = self._clock()
        if now - progress.started < SHOW_AFTER or (now - self._last_draw < REDRAW_EVERY
                                                   and progress.done < progress.count):
            return
        self._last_draw = now
        self.stream.write(CLEAR_LINE + progress.line())
        self.stream.flush()
        self._shown = True

    def clear(self) -> None:
        with self._lock:
            if self._shown:
                self.stream.write(CLEAR_LINE)
                self.stream.flush()
                self._shown = False

    def close(self) -> None:
        self.clear()
        for handler in self._handlers:
            handler.removeFilter(self._filter)
