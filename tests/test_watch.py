"""Push (the ``watch_mailbox`` hook): ``postbote run`` polls an account as soon as one of its watches reports new
mail, falls back to the account's ``poll_interval`` when a watch breaks, and watches again after the next poll.

The daemon runs in-process with a fake mailbox and a watch over a socket pair the test speaks into: the test is the
server saying "new mail". IMAP IDLE against a real Dovecot is tested with the IMAP source."""

from __future__ import annotations

import random
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from postbote import hookimpl
from postbote.config import load_config
from postbote.daemon import Daemon
from postbote.pluginmanager import make_plugin_manager
from postbote.state import StateStore
from postbote.testing import FakeSource
from structlog.testing import capture_logs

from tests.harness import mail, wait_until


class SocketWatch:
    """A watch whose "server" is the other end of a socket pair: ``NEW`` announces mail, closing breaks it."""

    name = "INBOX"

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def readable(self) -> bool:
        data = self.sock.recv(100)
        if not data:
            raise OSError("the server closed the connection")
        if b"BUG" in data:
            raise RuntimeError("a bug in the plugin's watch")
        return b"NEW" in data

    def refresh_at(self) -> float:
        return time.monotonic() + 3600

    def refresh(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True
        self.sock.close()


class PushSource:
    """Answers ``watch_mailbox`` with one `SocketWatch`; keeps the server ends."""

    def __init__(self) -> None:
        self.servers: list[socket.socket] = []
        self.watches: list[SocketWatch] = []

    @hookimpl
    def watch_mailbox(self, account, state_dir):  # type: ignore[no-untyped-def]
        server, ours = socket.socketpair()
        self.servers.append(server)
        self.watches.append(SocketWatch(ours))
        return [self.watches[-1]]


class Soonest(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return a


@pytest.fixture
def fake() -> FakeSource:
    return FakeSource()


@pytest.fixture
def push() -> Iterator[PushSource]:
    push = PushSource()
    yield push
    for server in push.servers:
        server.close()


@contextmanager
def running_daemon(tmp_path: Path, *plugins: object) -> Iterator[Daemon]:
    """``postbote run`` in this process, one fake account polled hourly into a Maildir, with ``plugins``."""
    config = tmp_path / "push.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\naccounts:\n"
                      f"  - {{name: fake, protocol: fake, poll_interval: 1h, "
                      f"deliver: {{maildir: {tmp_path / 'Maildir'}}}}}\n")
    pm = make_plugin_manager(entry_points=False, extra=list(plugins))
    loaded = load_config(config, pm)
    store = StateStore(loaded.state_dir)
    daemon = Daemon(pm, loaded, store, rng=Soonest())
    thread = threading.Thread(target=daemon.run, daemon=True)
    with capture_logs():  # the daemon's events are kept, not printed into the test run's output
        thread.start()
        try:
            yield daemon
        finally:
            daemon.request(signal.SIGTERM)
            thread.join(30)
            store.close()
    assert not thread.is_alive()


@pytest.fixture
def daemon(tmp_path: Path, fake: FakeSource, push: PushSource) -> Iterator[Daemon]:
    with running_daemon(tmp_path, fake, push) as daemon:
        yield daemon


def delivered(tmp_path: Path) -> int:
    new = tmp_path / "Maildir" / "new"
    return len(list(new.iterdir())) if new.exists() else 0


def test_hook_watch_mailbox(tmp_path: Path, fake: FakeSource, push: PushSource) -> None:
    """New mail a watch reports is fetched at once, not at the next poll interval."""
    fake.mailbox("fake").add(mail(1))  # before the start: the first poll finds it, however quick it is
    with running_daemon(tmp_path, fake, push) as daemon:
        assert wait_until(lambda: delivered(tmp_path) == 1 and push.watches, 15)
        fake.mailbox("fake").add(mail(2))
        push.servers[0].send(b"NEW")
        assert wait_until(lambda: delivered(tmp_path) == 2, 15), "the watch's news did not start a poll"
        assert fake.mailbox("fake").sessions == 2 and len(push.watches) == 1  # the watch stays open across polls
        assert "1 watched for new mail" in daemon._status_line()  # systemd's STATUS= shows push at work


def test_a_broken_watch_is_closed_and_the_next_successful_poll_watches_again(
        tmp_path: Path, fake: FakeSource, push: PushSource, daemon: Daemon) -> None:
    assert wait_until(lambda: push.watches, 15)
    push.servers[0].close()
    assert wait_until(lambda: push.watches[0].closed, 15)
    assert fake.mailbox("fake").sessions == 1  # no poll for a broken watch: the account waits for its interval
    daemon.request(signal.SIGUSR1)  # the next poll, however it comes
    assert wait_until(lambda: len(push.watches) == 2, 15)
    fake.mailbox("fake").add(mail(3))
    push.servers[1].send(b"NEW")
    assert wait_until(lambda: delivered(tmp_path) == 1, 15)


def test_a_watch_that_raises_an_unexpected_error_is_closed_and_the_watcher_goes_on(
        tmp_path: Path, fake: FakeSource, push: PushSource, daemon: Daemon) -> None:
    assert wait_until(lambda: push.watches, 15)
    push.servers[0].send(b"BUG")
    assert wait_until(lambda: push.watches[0].closed, 15)
    daemon.request(signal.SIGUSR1)  # the next poll watches again, through the same watcher thread
    assert wait_until(lambda: len(push.watches) == 2, 15)
    fake.mailbox("fake").add(mail(4))
    push.servers[1].send(b"NEW")
    assert wait_until(lambda: delivered(tmp_path) == 1, 15), "the watcher thread died with the first watch"


def test_a_watch_that_says_nothing_new_starts_no_poll(tmp_path: Path, fake: FakeSource, push: PushSource,
                                                       daemon: Daemon) -> None:
    assert wait_until(lambda: push.watches, 15)
    push.servers[0].send(b"NOOP")
    daemon.request(signal.SIGUSR1)  # a poll that is asked for, to know the watcher read the NOOP before it
    assert wait_until(lambda: fake.mailbox("fake").sessions == 2, 15)
    time.sleep(0.2)
    assert fake.mailbox("fake").sessions == 2


def test_stopping_the_daemon_closes_every_watch(fake: FakeSource, push: PushSource, daemon: Daemon) -> None:
    assert wait_until(lambda: push.watches, 15)
    daemon.request(signal.SIGTERM)
    assert wait_until(lambda: push.watches[0].closed, 15)


class NoPushSource:
    """Answers ``watch_mailbox`` with no watch, counting the questions: ``[]`` (an IMAP server without IDLE), or
    None with ``no_watcher`` (no plugin watches this source: POP3)."""

    def __init__(self, *, no_watcher: bool = False) -> None:
        self.asked = 0
        self.no_watcher = no_watcher

    @hookimpl
    def watch_mailbox(self, account, state_dir):  # type: ignore[no-untyped-def]
        self.asked += 1
        return None if self.no_watcher else []


def test_a_source_that_offers_no_push_is_not_asked_again_after_every_poll(tmp_path: Path, fake: FakeSource) -> None:
    """Asking opens a session of its own (an IMAP login to read the capabilities): once an hour is enough."""
    no_push = NoPushSource()
    fake.mailbox("fake").add(mail(1))  # before the start: the first poll finds it, however quick it is
    with running_daemon(tmp_path, fake, no_push) as daemon:
        assert wait_until(lambda: delivered(tmp_path) == 1, 15)
        for number in (2, 3):
            fake.mailbox("fake").add(mail(number))
            daemon.request(signal.SIGUSR1)  # poll every account now
            assert wait_until(lambda number=number: delivered(tmp_path) == number, 15)
        assert fake.mailbox("fake").sessions == 3
        assert no_push.asked == 1, "asked for watches after every poll"


def test_an_account_no_plugin_watches_is_not_asked_again_while_the_config_stays(
        tmp_path: Path, fake: FakeSource, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server without push is asked again after a while (it may gain IDLE); a source no plugin watches is not
    asked again until a reload could have brought one: a POP3 account's polls pay nothing for push."""
    monkeypatch.setattr("postbote.daemon.NO_PUSH_RECHECK", 0.0)  # a server without push: asked after every poll
    no_watcher, no_push = NoPushSource(no_watcher=True), NoPushSource()
    fake.mailbox("fake").add(mail(1))  # before the start: the first poll finds it, however quick it is
    with running_daemon(tmp_path, fake, no_watcher) as daemon:
        assert wait_until(lambda: delivered(tmp_path) == 1, 15)
        for number in (2, 3):
            fake.mailbox("fake").add(mail(number))
            daemon.request(signal.SIGUSR1)
            assert wait_until(lambda number=number: delivered(tmp_path) == number, 15)
    assert no_watcher.asked == 1
    (tmp_path / "again").mkdir()
    with running_daemon(tmp_path / "again", fake, no_push) as daemon:
        assert wait_until(lambda: no_push.asked == 1, 15)
        daemon.request(signal.SIGUSR1)
        assert wait_until(lambda: no_push.asked == 2, 15), "a server without push was never asked again"
