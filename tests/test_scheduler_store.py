"""What the daemon's scheduling asks of the state store, at scale (issue 16).

The daemon notes every account's next poll (100,000 of them at start-up, a few hundred a second while polling) in
one transaction per batch, reads every account's waiting messages in one query at start-up, and an empty poll does
not sync the disk before its QUIT: only a message's record must be on disk before the server deletes it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from postbote.state import DEFERRED, DELIVERED, REJECTED, StateStore


@pytest.fixture
def store(state_store: StateStore) -> StateStore:
    """Each test runs on SQLite and on PostgreSQL (the ``state_store`` fixture in conftest)."""
    return state_store


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[StateStore]:
    opened = StateStore(tmp_path / "state")
    yield opened
    opened.close()


@pytest.fixture
def syncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The file descriptors fsync'd (the real fsync still runs)."""
    synced: list[int] = []
    real = os.fsync

    def counted(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counted)
    return synced


def test_next_polls_of_many_accounts_are_noted_at_once_and_cleared_at_once(store: StateStore) -> None:
    store.set_next_polls({f"a{index}": 1000.0 + index for index in range(10_000)})
    assert store.next_poll("a0") == 1000.0 and store.next_poll("a9999") == 10_999.0
    store.set_next_polls(dict.fromkeys((f"a{index}" for index in range(10_000)), None))
    assert store.next_poll("a5000") is None


def test_the_waiting_messages_of_every_account_come_in_one_read(store: StateStore) -> None:
    store.record("alice", "1", DEFERRED, reason="451 try later")
    store.record("alice", "2", DELIVERED)
    store.record("bob", "7", REJECTED, reason="550 no")
    everywhere = store.waiting_everywhere()
    assert sorted(everywhere) == ["alice", "bob"]
    for account, messages in everywhere.items():
        assert messages == store.waiting(account)
    assert [message.uid for message in everywhere["alice"]] == ["1"]


def test_an_empty_poll_does_not_sync_the_disk_but_a_recorded_message_does(sqlite_store: StateStore,
                                                                          syncs: list[int]) -> None:
    """SQLite's own: PostgreSQL flushes every commit to its disk before the commit returns."""
    store = sqlite_store
    store.make_durable()  # whatever the store held when opened
    syncs.clear()
    store.record_poll("alice", ok=True, duration=0.01, counts={}, error=None)
    store.set_next_poll("alice", 2000.0)
    store.make_durable()
    assert syncs == [], "a poll's record and the next-poll note need no sync before QUIT"
    store.record("alice", "1", DELIVERED)
    store.make_durable()
    assert len(syncs) == 1, "a message's record is synced before the server may delete the message"
    store.make_durable()
    assert len(syncs) == 1, "nothing new since: no second sync"
