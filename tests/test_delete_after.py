"""``keep: true`` with ``delete_after``: a delivered message stays on the server as a safety net, and is deleted by
the first poll after that time since its delivery (getmail's ``delete_after``), never delivered again."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from postbote import ConfigError
from postbote.testing import FakeSource, poll_once

from tests.harness import mail


def config(tmp_path: Path, delete_after: str, keep: bool = True) -> Path:
    path = tmp_path / "postbote.yaml"
    path.write_text(f"state_dir: {tmp_path / 'state'}\naccounts:\n"
                    f"  - {{name: fake, protocol: fake, keep: {str(keep).lower()}, delete_after: {delete_after}, "
                    f"deliver: {{maildir: {tmp_path / 'Maildir'}}}}}\n")
    return path


def delivered(tmp_path: Path) -> int:
    return len(list((tmp_path / "Maildir" / "new").iterdir()))


def test_a_kept_message_is_deleted_once_its_delete_after_is_up(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    source = FakeSource()
    source.mailbox("fake").add(mail(1))
    first = poll_once(config(tmp_path, "7d"), plugins=[source])
    assert (first.delivered, first.deleted) == (1, 0) and source.mailbox("fake").uids() == ["uid-1"]
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 7 * 86400 + 60)  # a week and a minute later
    second = poll_once(config(tmp_path, "7d"), plugins=[source])
    assert (second.delivered, second.deleted) == (0, 1) and source.mailbox("fake").uids() == []
    assert delivered(tmp_path) == 1


def test_a_kept_message_stays_while_its_delete_after_runs(tmp_path: Path) -> None:
    source = FakeSource()
    source.mailbox("fake").add(mail(1))
    for _ in range(3):
        poll_once(config(tmp_path, "7d"), plugins=[source])
    assert source.mailbox("fake").uids() == ["uid-1"] and delivered(tmp_path) == 1


def test_delete_after_without_keep_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="delete_after is for keep: true"):
        poll_once(config(tmp_path, "7d", keep=False), plugins=[FakeSource()])


def test_poll_keep_leaves_even_a_message_whose_delete_after_is_up(tmp_path: Path) -> None:
    """``postbote poll -k``: this time every message stays, whatever delete_after says."""
    import argparse

    from postbote.cli.poll import this_time
    from postbote.config import load_config
    from postbote.pluginmanager import make_plugin_manager

    loaded = load_config(config(tmp_path, "7d"), make_plugin_manager(entry_points=False, extra=[FakeSource()]))
    args = argparse.Namespace(keep=True, fetch_all=False, limit=None, max_size=None)
    assert [(a.keep, a.delete_after) for a in this_time(loaded, args).accounts] == [(True, None)]
    assert loaded.accounts[0].delete_after == 7 * 86400  # the config itself is left as it is
