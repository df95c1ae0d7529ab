"""The systemd notification protocol, against real ``AF_UNIX`` datagram sockets (issue: runs as a service).

What systemd would receive from ``postbote run``: READY=1 once the config is loaded, STATUS= lines with the last
poll, RELOADING=1/READY=1 around SIGHUP, STOPPING=1 on SIGTERM, WATCHDOG=1 when asked for; on a socket path or
in the abstract namespace. No notification ever breaks the daemon.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from postbote.sdnotify import Notifier, socket_address, watchdog_period
from postbote.testing.pop3server import POP3Server

from tests.harness import DaemonRun, account, mail, subjects, wait_until, write_config


class Listener:
    """A bound ``SOCK_DGRAM`` socket standing in for systemd; collects the messages it receives."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(socket_address(address))
        self.sock.settimeout(0.05)
        self.messages: list[str] = []

    def receive(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(65536).decode())
            except TimeoutError:
                return self.messages

    def fields(self) -> list[str]:
        return [field for message in self.receive() for field in message.split("\n")]

    def wait_for(self, field_prefix: str, timeout: float = 5.0, count: int = 1) -> list[str]:
        return wait_until(lambda: (found := [f for f in self.fields() if f.startswith(field_prefix)])
                          and len(found) >= count and found, timeout, field_prefix)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """Socket paths must stay under 108 bytes, which pytest's tmp_path does not promise."""
    path = Path(tempfile.mkdtemp(prefix="pb-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def path_listener(short_dir: Path) -> Iterator[Listener]:
    listener = Listener(str(short_dir / "notify"))
    yield listener
    listener.close()


@pytest.fixture
def abstract_listener() -> Iterator[Listener]:
    listener = Listener(f"@postbote-test-{uuid.uuid4().hex}")
    yield listener
    listener.close()


# --- the protocol


def test_addresses_are_paths_or_abstract_names() -> None:
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@sd-notify/42") == b"\0sd-notify/42"
    with pytest.raises(ValueError, match="absolute path or @abstract-name"):
        socket_address("relative/socket")


def test_ready_status_and_stopping_reach_a_socket_path(path_listener: Listener) -> None:
    notifier = Notifier(path_listener.address)
    notifier.ready("2 accounts")
    notifier.status("line one\nline two")
    notifier.stopping()
    assert path_listener.receive() == ["READY=1\nSTATUS=2 accounts", "STATUS=line one line two", "STOPPING=1"]


def test_abstract_namespace_sockets_work(abstract_listener: Listener) -> None:
    Notifier(abstract_listener.address).ready()
    assert abstract_listener.receive() == ["READY=1"]


def test_reloading_carries_the_monotonic_clock(path_listener: Listener) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    Notifier(path_listener.address).reloading()
    (message,) = path_listener.receive()
    reloading, monotonic = message.split("\n")
    assert reloading == "RELOADING=1" and int(monotonic.removeprefix("MONOTONIC_USEC=")) >= before


def test_watchdog_pings_every_half_period(path_listener: Listener) -> None:
    notifier = Notifier(path_listener.address, watchdog=1.0)
    for now in (100.0, 100.5, 101.0, 101.2, 102.1):
        notifier.ping_if_due(now)
    assert path_listener.receive() == ["WATCHDOG=1"] * 3
    assert notifier.seconds_to_next_ping(102.5) == pytest.approx(0.6)


def test_watchdog_period_is_half_watchdog_usec_and_only_for_the_named_pid() -> None:
    assert watchdog_period({"WATCHDOG_USEC": "10000000"}) == 5.0
    assert watchdog_period({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())}) == 5.0
    assert watchdog_period({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_period({"WATCHDOG_USEC": "0"}) is None and watchdog_period({}) is None


def test_without_notify_socket_nothing_is_sent_and_nothing_fails() -> None:
    notifier = Notifier(None, watchdog=1.0)
    assert not notifier.enabled and notifier.seconds_to_next_ping() is None
    assert notifier.send("READY=1") is False


def test_an_unreachable_socket_is_reported_once_and_never_raises(short_dir: Path) -> None:
    notifier = Notifier(str(short_dir / "nobody-listens"))
    assert notifier.send("READY=1") is False
    assert notifier.send("STATUS=still fine") is False


def test_the_environment_is_read_once_and_not_passed_on(monkeypatch, path_listener: Listener) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", path_listener.address)
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    notifier = Notifier.from_environment()
    assert notifier.enabled and notifier.watchdog == 2.0
    assert "NOTIFY_SOCKET" not in os.environ and "WATCHDOG_USEC" not in os.environ


# --- the daemon as systemd sees it


def test_the_daemon_notifies_ready_status_reloading_and_stopping(tmp_path: Path, path_listener: Listener) -> None:
    server = POP3Server([mail(1)]).start()
    try:
        seen_by_child = tmp_path / "child-env"
        config = write_config(tmp_path / "postbote.yaml", [account(
            "box", server, tmp_path / "Maildir", poll_interval="1h", password=None,
            password_command=["sh", "-c", f'echo "${{NOTIFY_SOCKET:-unset}}" > {seen_by_child}; echo demo'])])
        daemon = DaemonRun(config, env={"NOTIFY_SOCKET": path_listener.address})
        (ready,) = path_listener.wait_for("READY=1")
        assert any(f.startswith("STATUS=1 account(s)") for f in path_listener.fields())
        daemon.send(signal.SIGUSR1)
        status = path_listener.wait_for("STATUS=1 account(s), all fine; last poll: box ok")[0]
        assert "1 delivered, 0 dropped, 0 deferred, 0 rejected, 0 left on the server" in status
        assert subjects(tmp_path / "Maildir") == ["Subject: message 1"]
        assert seen_by_child.read_text().strip() == "unset"
        daemon.send(signal.SIGHUP)
        path_listener.wait_for("RELOADING=1")
        path_listener.wait_for("READY=1", count=2)
        assert daemon.stop() == 0
        assert "STOPPING=1" in path_listener.fields()
    finally:
        server.stop()


def test_the_daemon_pings_the_watchdog_on_an_abstract_socket(tmp_path: Path, abstract_listener: Listener) -> None:
    config = write_config(tmp_path / "postbote.yaml", [account("box", None, tmp_path / "Maildir",
                                                               poll_interval="1h")])
    daemon = DaemonRun(config, env={"NOTIFY_SOCKET": abstract_listener.address, "WATCHDOG_USEC": "200000"})
    try:
        abstract_listener.wait_for("READY=1")
        started = time.monotonic()
        abstract_listener.wait_for("WATCHDOG=1", count=4, timeout=3)
        assert time.monotonic() - started < 1.5
    finally:
        assert daemon.stop() == 0
    assert "STOPPING=1" in abstract_listener.fields()


def test_the_status_line_names_the_accounts_whose_mail_waits(tmp_path: Path, path_listener: Listener) -> None:
    """systemctl status shows mail that is not arriving, not only accounts that cannot be polled."""
    mda = tmp_path / "mda"
    mda.write_text("#!/bin/sh\ncat >/dev/null\nexit 75\n")
    mda.chmod(0o755)
    server = POP3Server([mail(1), mail(2)]).start()
    try:
        config = write_config(tmp_path / "postbote.yaml", [
            account("box", server, tmp_path / "Maildir", poll_interval="1h", deliver={"mda": [str(mda)]})])
        daemon = DaemonRun(config, env={"NOTIFY_SOCKET": path_listener.address})
        path_listener.wait_for("READY=1")
        listed = server.uids()
        daemon.send(signal.SIGUSR1)
        (status,) = path_listener.wait_for("STATUS=1 account(s), waiting: box 2 deferred; last poll: box ok")
        assert "0 delivered, 0 dropped, 2 deferred, 0 rejected, 2 left on the server" in status
        assert daemon.stop() == 0
    finally:
        server.stop()
    assert len(listed) == 2 and server.uids() == listed


def test_a_notify_socket_nobody_reads_never_blocks_the_daemon(path_listener: Listener) -> None:
    """A supervisor that is slow or gone: its socket's queue fills up. Each notification is then dropped at once
    (and said once), instead of blocking the daemon in the send, where it would not see SIGTERM."""
    notifier = Notifier(path_listener.address)
    finished = threading.Event()
    sent: list[int] = []

    def notify_until_full_and_more() -> None:
        while notifier.send(f"STATUS=filling the queue {len(sent)}"):  # nobody reads: the queue is soon full
            sent.append(1)
            if len(sent) > 100_000:
                return  # the queue never filled: `finished` stays unset and the test fails
        notifier.status("one more")
        notifier.ping_if_due()
        notifier.stopping("stopping")
        finished.set()

    threading.Thread(target=notify_until_full_and_more, daemon=True).start()
    assert finished.wait(20), "a notification blocked on the full socket (or the queue never filled)"
    assert sent, "some notifications went through before the queue was full"
    assert path_listener.sock.recv(65536).startswith(b"STATUS=filling the queue 0")
    assert notifier.send("STATUS=room again"), "once the queue drains, notifications go through"
    notifier.close()
