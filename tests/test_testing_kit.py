"""The testing kit's `poll_once`: one poll of one account, set up the way ``postbote poll`` sets it up."""

from __future__ import annotations

import os
import poplib
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from postbote import ConfigError, hookimpl
from postbote.config import load_config
from postbote.pluginmanager import make_plugin_manager
from postbote.state import DATABASE_NAME, StateStore
from postbote.testing import poll_once
from postbote.testing.pop3server import POP3Server

from tests.harness import mail


class Recorder:
    """A plugin that notes the lifecycle hooks it sees, in order."""

    name = "recorder"

    def __init__(self) -> None:
        self.seen: list[str] = []

    @hookimpl
    def configure(self, config: Any) -> None:
        self.seen.append("configure")

    @hookimpl
    def poll_finished(self, account: Any, stats: Any) -> None:
        self.seen.append(f"poll_finished {account.name}")

    @hookimpl
    def unconfigure(self, config: Any) -> None:
        self.seen.append("unconfigure")


@pytest.fixture
def servers() -> Iterator[tuple[POP3Server, POP3Server]]:
    first, second = POP3Server([mail(1)]).start(), POP3Server([mail(2), mail(3)]).start()
    yield first, second
    first.stop()
    second.stop()


@pytest.fixture
def config_path(tmp_path: Path, servers: tuple[POP3Server, POP3Server]) -> Path:
    path = tmp_path / "postbote.yaml"
    accounts = "".join(
        f"  - {{name: {name}, host: 127.0.0.1, port: {server.port}, tls: none, username: demo, password: demo,\n"
        f"     timeout: 2s, deliver: {{maildir: {tmp_path / name}}}}}\n"
        for name, server in zip(("first", "second"), servers, strict=True))
    path.write_text(textwrap.dedent(f"""\
        state_dir: {tmp_path / 'state'}
        accounts:
        """) + accounts)
    os.chmod(path, 0o600)
    return path


def delivered(maildir: Path) -> int:
    return len(list((maildir / "new").iterdir())) if (maildir / "new").is_dir() else 0


def test_it_polls_the_first_account_and_closes_the_state_store(config_path: Path, tmp_path: Path,
                                                                servers: tuple[POP3Server, POP3Server]) -> None:
    stats = poll_once(config_path)

    assert (stats.ok, stats.delivered, stats.deleted) == (True, 1, 1)
    assert servers[0].uids() == [] and len(servers[1].uids()) == 2
    # SQLite removes the write-ahead log when the last connection to the database closes
    assert not (tmp_path / "state" / f"{DATABASE_NAME}-wal").exists()


def test_it_polls_the_account_named(config_path: Path, tmp_path: Path) -> None:
    stats = poll_once(config_path, account="second")

    assert stats.delivered == 2
    assert (delivered(tmp_path / "first"), delivered(tmp_path / "second")) == (0, 2)


def test_an_account_not_in_the_config_is_a_config_error_naming_it(config_path: Path) -> None:
    with pytest.raises(ConfigError, match="no account named 'third'"):
        poll_once(config_path, account="third")


def test_a_loaded_config_is_read_again_with_a_fresh_plugin_manager(config_path: Path) -> None:
    recorder = Recorder()
    config = load_config(config_path, make_plugin_manager(entry_points=False))

    poll_once(config, plugins=[recorder])

    assert recorder.seen == ["poll_finished first"]


def test_a_store_given_is_used_and_left_open(config_path: Path, tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    try:
        poll_once(config_path, store=store)
        assert len(store.records("first")) == 1
    finally:
        store.close()


def test_plugins_are_started_around_the_poll_only_when_asked(config_path: Path) -> None:
    plain, started = Recorder(), Recorder()

    poll_once(config_path, plugins=[plain])
    poll_once(config_path, plugins=[started], account="second", start_plugins=True)

    assert plain.seen == ["poll_finished first"]
    assert started.seen == ["configure", "poll_finished second", "unconfigure"]


def test_the_server_says_when_no_session_holds_the_mailbox_any_more() -> None:
    with POP3Server([mail(1)]) as server:
        client = poplib.POP3("127.0.0.1", server.port, timeout=5)
        client.user("demo")
        client.pass_("demo")  # the session now holds the mailbox

        assert server.wait_until_unlocked(0.05) is False
        client.quit()
        assert server.wait_until_unlocked(5) is True


# --- the FakeMailbox: a mailbox in memory behind the Mailbox seam ----------------------------------------------------


def fetched_all(mailbox: Any) -> list[tuple[str, Any]]:
    return [(entry.uid, item) for entry, item in mailbox.fetch(mailbox.listing(), stop=lambda: False)]


def test_the_fake_mailbox_deletes_at_the_end_of_the_session_and_not_when_it_is_aborted() -> None:
    from postbote.testing import FakeMailbox

    mailbox = FakeMailbox()
    first, second = mailbox.add(mail(1)), mailbox.add(mail(2))
    session = mailbox.open()
    (entry, _), _ = session.fetch(session.listing(), stop=lambda: False)
    session.delete(entry)
    session.abort()
    assert mailbox.uids() == [first, second] and mailbox.deleted == []
    session = mailbox.open()
    session.delete(session.listing()[0])
    assert [entry.uid for entry in session.finish()] == [first]
    assert mailbox.uids() == [second] and mailbox.deleted == [first] and mailbox.sessions == 2


def test_the_fake_mailbox_plays_the_faults_it_is_given() -> None:
    from postbote import Message, NotFetched, TooLarge
    from postbote.testing import FakeMailbox

    mailbox = FakeMailbox()
    fine, later, big = mailbox.add(mail(1)), mailbox.add(mail(2)), mailbox.add(mail(3))
    mailbox.unavailable.add(later)
    mailbox.too_large.add(big)
    kinds = [(uid, type(item)) for uid, item in fetched_all(mailbox.open())]
    assert kinds == [(fine, Message), (later, NotFetched), (big, TooLarge)]
    assert mailbox.open().headers(mailbox.listing()[0]) == mail(1).split(b"\r\n\r\n", 1)[0]
    mailbox.shows_headers = False
    assert mailbox.open().headers(mailbox.listing()[0]) is None
    mailbox.refuse_deletion.add(fine)
    session = mailbox.open()
    session.delete(session.listing()[0])
    assert session.finish() == [] and fine in mailbox.uids()


def test_a_poll_of_a_fake_account_delivers_and_deletes_like_a_pop3_one(tmp_path: Path) -> None:
    from postbote.testing import FakeSource

    source = FakeSource()
    for number in (1, 2, 3):
        source.mailbox("fake").add(mail(number))
    config = tmp_path / "fake.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\naccounts:\n"
                      f"  - {{name: fake, protocol: fake, deliver: {{maildir: {tmp_path / 'Maildir'}}}}}\n")
    stats = poll_once(config, plugins=[source])
    assert (stats.listed, stats.delivered, stats.deleted) == (3, 3, 3)
    assert delivered(tmp_path / "Maildir") == 3 and source.mailbox("fake").uids() == []
