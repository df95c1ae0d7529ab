"""Messages a source keeps after handling them (``MailboxEntry.stays``: IMAP's ``after_fetch: seen`` and ``keep``):
handed on once, marked once, never fetched or marked again while they stay listed, fetched again only as new
messages when they come back after an absence with other headers."""

from __future__ import annotations

from pathlib import Path

import pytest
from postbote.testing import FakeSource, poll_once


def mail(number: int) -> bytes:
    return (f"From: a@example.org\r\nSubject: message {number}\r\nMessage-ID: <{number}@example.org>\r\n\r\n"
            "body\r\n").encode()


@pytest.fixture
def source() -> FakeSource:
    source = FakeSource()
    source.mailbox("fake").stays = True
    return source


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "fake.yaml"
    path.write_text(f"state_dir: {tmp_path / 'state'}\naccounts:\n"
                    f"  - {{name: fake, protocol: fake, deliver: {{maildir: {tmp_path / 'Maildir'}}}}}\n")
    return path


def delivered(maildir: Path) -> int:
    return len(list((maildir / "new").iterdir())) if (maildir / "new").exists() else 0


def test_a_message_that_stays_is_delivered_once_and_marked_once_over_many_polls(config: Path, tmp_path: Path,
                                                                               source: FakeSource) -> None:
    mailbox = source.mailbox("fake")
    for number in (1, 2):
        mailbox.add(mail(number))
    first = poll_once(config, plugins=[source])
    later = [poll_once(config, plugins=[source]) for _ in range(3)]
    assert (first.delivered, first.deleted, first.left) == (2, 0, 2)
    assert all((stats.delivered, stats.deleted) == (0, 0) for stats in later)
    assert delivered(tmp_path / "Maildir") == 2
    assert mailbox.marked == ["uid-1", "uid-2"] and mailbox.fetched == ["uid-1", "uid-2"]
    assert mailbox.uids() == ["uid-1", "uid-2"]  # still on the server


def test_a_message_added_beside_ones_that_stay_is_the_only_one_fetched(config: Path, tmp_path: Path,
                                                                       source: FakeSource) -> None:
    mailbox = source.mailbox("fake")
    mailbox.add(mail(1))
    poll_once(config, plugins=[source])
    mailbox.add(mail(2))
    stats = poll_once(config, plugins=[source])
    assert stats.delivered == 1 and mailbox.fetched == ["uid-1", "uid-2"] and mailbox.marked == ["uid-1", "uid-2"]


def test_a_message_that_stays_but_failed_is_neither_marked_nor_lost(config: Path, tmp_path: Path,
                                                                     source: FakeSource) -> None:
    mailbox = source.mailbox("fake")
    mailbox.add(mail(1))
    mailbox.unavailable.add("uid-1")
    stats = poll_once(config, plugins=[source])
    assert stats.delivered == 0 and mailbox.marked == []
    mailbox.unavailable.clear()
    stats = poll_once(config, plugins=[source])
    assert stats.delivered == 1 and mailbox.marked == ["uid-1"] and delivered(tmp_path / "Maildir") == 1
