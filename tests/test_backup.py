"""The optional backup plugin: a durable copy of every message before delivery, or no delivery at all.

Through real polls: the copy is what the destination got (trace header included), a backup that cannot be written
keeps the message on the server undelivered, and the plugin runs only where the config enables it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from postbote.config import load_config
from postbote.errors import ConfigError
from postbote.pluginmanager import make_plugin_manager
from postbote.plugins.backup import BackupSettings
from postbote.plugins.mbox import mboxrd_messages
from postbote.state import DEFERRED, StateStore

from tests.harness import mail

TRICKY = b"Subject: tricky\r\n\r\n.\r\nFrom here\r\n>From there\r\n\x00 \xe4\xf6\r\n"


def files_in(folder: Path) -> list[bytes]:
    """The contents of the files in ``folder``, sorted (file times are too coarse to tell the order)."""
    return sorted(path.read_bytes() for path in folder.iterdir())


# --- through a poll ---


def test_a_maildir_backup_holds_the_same_bytes_as_the_destination(make_setup) -> None:
    setup = make_setup([TRICKY, mail(2)], source="fake")
    backup = setup.tmp_path / "backup"
    stats = setup.poll(extra=f"plugins:\n  backup: {{maildir: {backup}}}\n")
    assert (stats.delivered, stats.deleted) == (2, 2)
    assert setup.server.uids() == []
    delivered = sorted(setup.delivered())
    assert len(delivered) == 2
    assert files_in(backup / "new") == delivered
    assert all(data.startswith(b"Received: from localhost") for data in delivered)


def test_an_mbox_backup_holds_the_same_bytes_as_the_destination(make_setup) -> None:
    setup = make_setup([TRICKY, mail(2)], source="fake")
    backup = setup.tmp_path / "archive" / "backup.mbox"
    setup.poll(extra=f"plugins:\n  backup: {{mbox: {backup}}}\n")
    assert sorted(mboxrd_messages(backup.read_bytes())) == sorted(setup.delivered())


def test_a_backup_that_cannot_be_written_keeps_the_message_on_the_server_undelivered(make_setup) -> None:
    """A real OS error (ENOTDIR, which stops root too): the backup path runs through a regular file."""
    setup = make_setup([mail(1)], source="fake")
    blocker = setup.tmp_path / "afile"
    blocker.write_text("I am a file, not a directory\n")
    extra = f"plugins:\n  backup: {{maildir: {blocker / 'sub'}}}\n"
    stats = setup.poll(extra=extra)
    assert (stats.delivered, stats.deferred, stats.rejected) == (0, 1, 0)
    assert setup.delivered() == [] and len(setup.server.uids()) == 1
    store = StateStore(setup.tmp_path / "state")
    assert [record.status for record in store.records("test").values()] == [DEFERRED]  # waiting, not handled
    store.close()
    blocker.unlink()
    assert setup.poll(extra=extra).delivered == 1
    assert files_in(blocker / "sub" / "new") == sorted(setup.delivered())
    assert setup.server.uids() == []


def test_an_mbox_backup_that_cannot_be_written_keeps_the_message_on_the_server(make_setup) -> None:
    setup = make_setup([mail(1)], source="fake")
    blocker = setup.tmp_path / "afile"
    blocker.write_text("")
    stats = setup.poll(extra=f"plugins:\n  backup: {{mbox: {blocker / 'backup.mbox'}}}\n")
    assert (stats.delivered, stats.deferred) == (0, 1)
    assert setup.delivered() == [] and len(setup.server.uids()) == 1


def test_without_the_plugin_enabled_no_backup_is_written(make_setup) -> None:
    setup = make_setup([mail(1)], source="fake")
    assert setup.poll().delivered == 1
    assert sorted(p.name for p in setup.tmp_path.iterdir()) == ["Maildir", "postbote.yaml", "state"]


# --- configuration ---


def load(tmp_path: Path, body: str):
    path = tmp_path / "postbote.yaml"
    path.write_text(body)
    os.chmod(path, 0o600)
    return load_config(path, make_plugin_manager(entry_points=False))


def account(plugins: str = "") -> str:
    return f"  - {{name: a, host: h, username: u, password: p, deliver: {{maildir: m}}{plugins}}}\n"


def test_the_backup_is_enabled_globally_or_per_account_with_relative_paths_from_the_config(tmp_path: Path) -> None:
    config = load(tmp_path, "plugins:\n  backup: {mbox: all.mbox}\naccounts:\n"
                  + account()
                  + account(", plugins: {backup: {maildir: /srv/b, mbox: null}}").replace("name: a", "name: b")
                  + account(", plugins: {backup: false}").replace("name: a", "name: c"))
    a, b, c = config.accounts
    assert a.options_for("backup") == BackupSettings("mbox", tmp_path / "all.mbox")
    assert b.options_for("backup") == BackupSettings("maildir", Path("/srv/b"))
    assert not c.uses("backup")


def test_the_backup_is_off_unless_the_config_names_it(tmp_path: Path) -> None:
    (only,) = load(tmp_path, "accounts:\n" + account()).accounts
    assert not only.uses("backup") and only.uses("mbox") and only.uses("mda")


@pytest.mark.parametrize(("plugins", "error"), [
    ("{backup: true}", r"plugins.backup: give exactly one of maildir, mbox: where the backup goes \(found none\)"),
    ("{backup: {maildir: x, mbox: y}}", r":2: accounts\[0\].plugins.backup: give exactly one of maildir, mbox: "
                                        r"where the backup goes \(found maildir, mbox; to change the kind for one "
                                        r"account, set the other one to null there\)"),
    ("{backup: {maildir: null}}", r"plugins.backup: give exactly one of maildir, mbox: where the backup goes "
                                  r"\(found none\)"),
    ("{backup: {maildri: x}}", r"plugins.backup.maildri: unknown key \(did you mean 'maildir'\?\)"),
    ("{backup: {maildir: [a, b]}}", r"plugins.backup.maildir: expected a string"),
])
def test_backup_option_mistakes_are_config_errors_with_their_line(tmp_path: Path, plugins: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        load(tmp_path, "accounts:\n" + account(f", plugins: {plugins}"))
