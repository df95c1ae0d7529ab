"""The systemd notification protocol (sd_notify(3)), spoken directly over the ``$NOTIFY_SOCKET`` datagram socket.

Used by ``postbote run`` under ``Type=notify``: ``READY=1`` once the config is loaded, ``STATUS=`` with the last poll
summary, ``RELOADING=1`` around a SIGHUP reload, ``STOPPING=1`` on the way out and ``WATCHDOG=1`` every half
``WatchdogSec``. Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op. A notification that cannot be
sent is logged once and never stops the daemon: telling systemd is a courtesy, fetching mail is the job. The socket
is non-blocking: when nobody reads it (a supervisor that is slow or gone) and its queue is full, the notification
is dropped instead of waited for -- a blocked send would keep the daemon from its signals, SIGTERM included.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

from postbote.logconfig import get_logger

log = get_logger("postbote.sdnotify")

NOTIFY_SOCKET = "NOTIFY_SOCKET"
WATCHDOG_USEC = "WATCHDOG_USEC"
WATCHDOG_PID = "WATCHDOG_PID"
MAX_STATUS_LENGTH = 1000


def socket_address(value: str) -> str | bytes:
    """The address to send to: a path, or ``@name`` for the abstract namespace (a leading NUL byte)."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    raise ValueError(f"{NOTIFY_SOCKET}={value!r}: expected an absolute path or @abstract-name")


def watchdog_period(environ: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between two ``WATCHDOG=1`` pings (half of ``WatchdogSec``), or None when no watchdog is asked for."""
    environ = os.environ if environ is None else environ
    usec = environ.get(WATCHDOG_USEC, "")
    owner = environ.get(WATCHDOG_PID, "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if owner and owner != str(os.getpid() if pid is None else pid):
        return None
    return int(usec) / 1_000_000 / 2


class Notifier:
    """Sends state changes to systemd; a disabled one (``address`` None) accepts every call and sends nothing."""

    def __init__(self, address: str | None, watchdog: float | None = None) -> None:
        self.address = socket_address(address) if address else None
        self.watchdog = watchdog if self.address is not None else None
        self._sock: socket.socket | None = None
        self._failed = False
        self._dropping = False  # a full queue was reported, and nothing got through since
        self._last_ping = 0.0

    @classmethod
    def from_environment(cls) -> Notifier:
        """Read ``$NOTIFY_SOCKET`` and the watchdog settings, then remove them from the environment, so that
        programs postbote starts (``password_command``, an MDA) do not talk to systemd in its name."""
        address = os.environ.pop(NOTIFY_SOCKET, None)
        watchdog = watchdog_period()
        os.environ.pop(WATCHDOG_USEC, None)
        os.environ.pop(WATCHDOG_PID, None)
        try:
            return cls(address, watchdog)
        except ValueError as exc:
            log.warning("sdnotify.unusable", error=str(exc))
            return cls(None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def ready(self, status: str | None = None) -> None:
        self.send("READY=1", *self._status_field(status))

    def reloading(self) -> None:
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self, status: str | None = None) -> None:
        self.send("STOPPING=1", *self._status_field(status))

    def status(self, text: str) -> None:
        self.send(*self._status_field(text))

    def ping_if_due(self, now: float | None = None) -> None:
        """``WATCHDOG=1`` when half the watchdog period has passed since the last ping."""
        if self.watchdog is None:
            return
        now = time.monotonic() if now is None else now
        if now - self._last_ping >= self.watchdog:
            self._last_ping = now
            self.send("WATCHDOG=1")

    def seconds_to_next_ping(self, now: float | None = None) -> float | None:
        if self.watchdog is None:
            return None
        now = time.monotonic() if now is None else now
        return max(0.0, self._last_ping + self.watchdog - now)

    def send(self, *fields: str) -> bool:
        """Send ``fields`` as one datagram (``KEY=value`` lines); False when disabled or the send failed."""
        if self.address is None or not fields:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX,
                                           socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
            self._sock.sendto("\n".join(fields).encode("utf-8", "replace"), self.address)
        except BlockingIOError:
            if not self._dropping:
                log.warning("sdnotify.dropped", fields=[f.split("=", 1)[0] for f in fields],
                            reason="the notify socket's queue is full: nobody reads it")
                self._dropping = True
            return False
        except OSError as exc:
            if not self._failed:
                log.warning("sdnotify.failed", error=str(exc), fields=[f.split("=", 1)[0] for f in fields])
                self._failed = True
            return False
        self._dropping = False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    @staticmethod
    def _status_field(text: str | None) -> list[str]:
        if text is None:
            return []
        one_line = " ".join(text.split())
        return [f"STATUS={one_line[:MAX_STATUS_LENGTH]}"]
