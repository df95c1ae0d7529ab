"""``postbote run`` under a supervisor that does not read its notify socket (issue 16).

A supervisor that is slow or gone leaves the ``$NOTIFY_SOCKET`` queue full. The daemon once blocked inside the
send and ignored SIGTERM for minutes; now each notification that finds the queue full is dropped (and said once),
and the daemon answers its signals as ever.
"""

from __future__ import annotations

import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import DaemonRun, account, write_config

pytestmark = pytest.mark.usefixtures("time_limit")


@pytest.fixture
def full_notify_socket() -> Iterator[str]:
    """A bound datagram socket nobody reads, its queue filled to the brim before the daemon starts."""
    directory = Path(tempfile.mkdtemp(prefix="pb-", dir="/tmp"))  # socket paths must stay under 108 bytes
    address = str(directory / "notify")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(address)
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    filler.setblocking(False)
    try:
        for _ in range(100_000):
            filler.sendto(b"STATUS=the supervisor reads nothing", address)
        pytest.fail("the notify socket's queue never filled")
    except BlockingIOError:
        pass  # full: the next send would wait for a reader that never comes
    try:
        yield address
    finally:
        filler.close()
        receiver.close()
        shutil.rmtree(directory, ignore_errors=True)


def test_sigterm_stops_the_daemon_when_nobody_reads_the_notify_socket(tmp_path: Path,
                                                                       full_notify_socket: str) -> None:
    config = write_config(tmp_path / "postbote.yaml", [account("box", None, tmp_path / "Maildir",
                                                               poll_interval="1h")])
    daemon = DaemonRun(config, env={"NOTIFY_SOCKET": full_notify_socket})
    daemon.wait_for("daemon.started")
    daemon.send(signal.SIGUSR1)  # a poll, so a STATUS= update too, into the full queue
    daemon.wait_for("sdnotify.dropped")
    assert daemon.stop(timeout=20) == 0, daemon.log()
    assert daemon.events("daemon.stopped")
    assert len(daemon.events("sdnotify.dropped")) == 1, "a full queue is said once, not per notification"
