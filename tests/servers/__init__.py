"""Real servers on loopback for postbote's tests.

* :mod:`tests.servers.certs` -- a throw-away test CA and a server certificate
  for ``localhost``/``127.0.0.1``, made with the ``openssl`` command line tool.
* :mod:`tests.servers.dovecot` -- a private Dovecot instance (POP3 with STLS,
  POP3S, LMTP) with its own configuration, users and Maildirs.
* :mod:`tests.servers.smtp_sink` -- an aiosmtpd SMTP server that records what
  arrives and answers as scripted.

The pytest fixtures wrapping them live in ``tests/conftest.py``.  This module
holds the small networking helpers the servers share.
"""

from __future__ import annotations

import faulthandler
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

LOOPBACK = "127.0.0.1"


_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port on *host* that was free a moment ago, and that this process has not handed out before.

    The kernel picks it (bind to port 0); there is a small window in which another process could take it, which is
    acceptable for tests. Within this process no port is handed out twice: the kernel readily offers a port again
    once its socket is closed, so a server asking for several ports in a row (Dovecot: POP3, POP3S, LMTP) could
    otherwise be given one twice ("duplicate listener").
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        with _handed_out_lock:
            if port not in _handed_out:
                _handed_out.add(port)
                return port


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll *predicate* until it is true or *timeout* seconds have passed.

    Returns the last result, so callers can ``assert wait_until(...)``.
    """
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


class Overtime(BaseException):
    """Raised into a test that ran past its time limit (a BaseException, so that postbote's own
    ``except Exception`` handlers cannot swallow it)."""


@contextmanager
def interrupt_after(seconds: float, what: str) -> Iterator[None]:
    """Interrupt the main thread with `Overtime` after ``seconds``: a hang fails a test, never blocks CI.

    Nested uses keep the outer bound: the inner one interrupts at the earlier of the two, and on leaving the
    outer timer runs on with what was left of it (less the time spent inside)."""

    def expire(signum: int, frame: object) -> None:
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)  # where every thread was: the report shows it
        raise Overtime(f"{what} did not finish within {seconds:g} s")

    started = time.monotonic()
    outer_left, _ = signal.getitimer(signal.ITIMER_REAL)
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, min(seconds, outer_left) if outer_left else seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_left:
            # at least a moment, so that an outer bound already past still fires
            signal.setitimer(signal.ITIMER_REAL, max(outer_left - (time.monotonic() - started), 0.001))
