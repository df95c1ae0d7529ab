"""No flood of old mail on switching (issue 15, Migration): fetchmail's .fetchids, getmail's oldmail files and mpop's
UIDL file read in their real formats and recorded as delivered (``postbote import-state``), and ``postbote
mark-seen``, which records what is on the server without fetching or deleting; then a poll with ``keep: true`` of a
server holding those messages and one new one delivers only the new one."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from postbote.cli import main
from postbote.migrate import MigrationError
from postbote.migrate.uidfiles import read_uid_file
from postbote.state import DELIVERED, REJECTED, StateStore
from postbote.testing.imapserver import IMAPServer
from postbote.testing.mailbox import FakeSource
from postbote.testing.pop3server import POP3Server

DATA = Path(__file__).parent / "data" / "migration"
NEW = "new-one-0001"


def message(uid: str) -> bytes:
    return f"From: a@example.net\r\nSubject: message {uid}\r\nMessage-ID: <{uid}@test>\r\n\r\nbody\r\n".encode()


def write_config(tmp_path: Path, server: POP3Server, *, keep: bool = True, username: str = "joe.sixpack") -> Path:
    path = tmp_path / "postbote.yaml"
    path.write_text(f"state_dir: {tmp_path / 'state'}\naccounts:\n  - name: joe\n    host: 127.0.0.1\n"
                    f"    port: {server.port}\n    tls: none\n    username: {username}\n    password: demo\n"
                    f"    timeout: 5s\n    keep: {'true' if keep else 'false'}\n"
                    f"    deliver: {{maildir: {tmp_path / 'Maildir'}}}\n")
    os.chmod(path, 0o600)
    return path


def delivered_subjects(tmp_path: Path) -> list[str]:
    folder = tmp_path / "Maildir" / "new"
    files = sorted(folder.iterdir()) if folder.is_dir() else []
    return sorted(line.decode() for file in files for line in file.read_bytes().splitlines()
                  if line.startswith(b"Subject:"))


# --- the readers ------------------------------------------------------------------------------------------------


def test_fetchids_lines_are_user_at_server_and_a_uid() -> None:
    lists = {item.label: item.uids for item in read_uid_file(DATA / "fetchids")}
    assert lists == {"joe.sixpack@pop.isp.example": ["<20261201.1@isp>", "000001a2b3c4"],
                     "other@pop.isp.example": ["77aa"],
                     "lotus notes user@pop.isp.example": ["id-with@sign"]}  # spaces in the user, @ in the UID


def test_getmail_oldmail_files_hold_uid_nul_timestamp_lines() -> None:
    [pop] = read_uid_file(DATA / "oldmail-pop.isp.example-995-joe.sixpack")
    assert (pop.tool, pop.user, pop.host, pop.uids) == ("getmail", "joe.sixpack", "pop.isp.example", ["1001", "1002"])
    [imap] = read_uid_file(DATA / "oldmail-imap.work.example-993-ann-INBOX")
    assert imap.uids == ["INBOX;UIDVALIDITY=1764547200;UID=17", "INBOX;UIDVALIDITY=1764547200;UID=18"]


def test_mpop_uidl_files_with_and_without_timestamps() -> None:
    lists = {item.label: item.uids for item in read_uid_file(DATA / "mpop_uidls")}
    # after the first list starts, a line starting with # is a UID, not a comment (as mpop reads it)
    assert lists == {"joe.sixpack@pop.isp.example": ["#starts-with-hash", "u-0002"],
                     "someone@pop.other.example": ["zz9"]}
    [stamped] = read_uid_file(DATA / "mpop_uidls-timestamps")
    assert stamped.uids == ["AAA111", "BBB222"]


@pytest.mark.parametrize(("tool", "text", "words"), [
    ("fetchmail", "no-at-sign here\n", "uids:1: expected 'USER@SERVER UID'"),
    ("getmail", "1001\0001\nbroken line\n", "uids:2: expected 'UID\\0TIMESTAMP'"),
    ("getmail", "1001\000yesterday\n", "uids:1: the timestamp after the UID is not a number"),
    ("mpop", " 3 host user\nA\nB\n", "too few UIDs for user@host (2 of 3)"),
    ("mpop", "A\n", "uids:1: expected ' COUNT HOST USER'"),
])
def test_a_malformed_uid_file_is_an_error_with_file_and_line(tmp_path: Path, tool: str, text: str,
                                                             words: str) -> None:
    path = tmp_path / "uids"
    path.write_text(text)
    with pytest.raises(MigrationError) as caught:
        read_uid_file(path, tool)
    assert words in str(caught.value)


# --- the state store ------------------------------------------------------------------------------------------


def test_record_imported_adds_delivered_records_and_keeps_existing_ones(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    try:
        store.record("acct", "b", REJECTED, reason="refused by the MTA")
        assert store.record_imported("acct", ["a", "b", "c", "a"], reason="imported from fetchmail",
                                     sizes={"a": 10}) == 2
        records = store.records("acct")
        assert (records["a"].status, records["a"].reason, records["a"].size) == \
            (DELIVERED, "imported from fetchmail", 10)
        assert records["c"].status == DELIVERED and records["c"].size is None
        assert records["b"].status == REJECTED  # postbote's own knowledge wins
        assert store.record_imported("acct", ["a"], reason="again") == 0
    finally:
        store.close()


# --- import-state, then a poll with keep: true --------------------------------------------------------------


@pytest.mark.parametrize(("file", "old_uids"), [
    ("fetchids", ["<20261201.1@isp>", "000001a2b3c4"]),
    ("oldmail-pop.isp.example-995-joe.sixpack", ["1001", "1002"]),
    ("mpop_uidls", ["#starts-with-hash", "u-0002"]),
    ("mpop_uidls-timestamps", ["AAA111", "BBB222"]),
])
def test_after_import_state_a_keep_poll_delivers_only_the_new_message(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], file: str, old_uids: list[str]) -> None:
    messages = [(uid, message(uid)) for uid in old_uids] + [(NEW, message(NEW))]
    with POP3Server(messages, users={"joe.sixpack": "demo"}) as server:
        config = write_config(tmp_path, server)
        assert main(["-c", str(config), "import-state", "joe", str(DATA / file)]) == 0
        out = capsys.readouterr().out
        assert "joe: 2 of 2 UID(s) from" in out and "recorded as delivered" in out
        assert main(["-c", str(config), "poll"]) == 0
        assert delivered_subjects(tmp_path) == [f"Subject: message {NEW}"]
        assert len(server.messages()) == 3  # keep: everything stays on the server
    store = StateStore(tmp_path / "state")
    try:
        reasons = {uid: record.reason for uid, record in store.records("joe").items()}
    finally:
        store.close()
    assert all(reasons[uid].startswith("imported from ") for uid in old_uids)


def test_import_state_takes_the_list_of_the_accounts_login_or_the_one_named(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with POP3Server([], users={"someone": "demo"}) as server:
        config = write_config(tmp_path, server, username="nobody")
        assert main(["-c", str(config), "import-state", "joe", str(DATA / "fetchids")]) == 2
        err = capsys.readouterr().err
        assert "no UID list for account joe" in err and "other@pop.isp.example" in err and "--user" in err
        assert main(["import-state", "joe", str(DATA / "fetchids"), "-c", str(config),  # -c after the command too
                     "--user", "other@pop.isp.example"]) == 0
        assert "1 of 1 UID(s)" in capsys.readouterr().out


def test_imap_uids_are_not_imported_into_a_pop3_account(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    with POP3Server([]) as server:
        config = write_config(tmp_path, server, username="ann")
        assert main(["-c", str(config), "import-state", "joe",
                     str(DATA / "oldmail-imap.work.example-993-ann-INBOX")]) == 2
    assert "these are IMAP UIDs" in capsys.readouterr().err


# --- mark-seen ----------------------------------------------------------------------------------------------


def test_mark_seen_records_the_server_without_fetching_or_deleting_then_only_new_mail_is_delivered(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = [(f"old-{n}", message(f"old-{n}")) for n in range(3)]
    with POP3Server(old, users={"joe.sixpack": "demo"}) as server:
        config = write_config(tmp_path, server)
        assert main(["-c", str(config), "mark-seen", "joe"]) == 0
        assert "joe: 3 message(s) on the server, 3 newly recorded as delivered" in capsys.readouterr().out
        verbs = {command.split()[0].upper() for command in server.commands if command.strip()}
        assert not verbs & {"RETR", "TOP", "DELE"}  # nothing fetched, nothing deleted
        assert len(server.messages()) == 3
        server.add_message(message(NEW), uid=NEW)
        assert main(["-c", str(config), "poll"]) == 0
        assert delivered_subjects(tmp_path) == [f"Subject: message {NEW}"]
        assert main(["-c", str(config), "mark-seen", "joe"]) == 0  # again: nothing new to record
        assert "4 message(s) on the server, 0 newly recorded" in capsys.readouterr().out


def test_mark_seen_warns_that_without_keep_the_next_poll_deletes_what_it_recorded(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with POP3Server([("old-1", message("old-1"))], users={"joe.sixpack": "demo"}) as server:
        config = write_config(tmp_path, server, keep=False)
        assert main(["-c", str(config), "mark-seen", "joe"]) == 0
        assert "keep is false, so the next poll deletes these 1 message(s)" in capsys.readouterr().err


def test_mark_seen_of_an_unreachable_server_exits_1_and_records_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with POP3Server([]) as server:
        config = write_config(tmp_path, server)
    assert main(["-c", str(config), "mark-seen", "joe"]) == 1  # the server is gone
    assert "joe: failed:" in capsys.readouterr().err
    store = StateStore(tmp_path / "state")
    try:
        assert store.records("joe") == {}
    finally:
        store.close()


def test_mark_seen_works_through_any_source_plugin_and_with_keep_false_the_next_poll_deletes_unfetched(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """mark-seen opens the mailbox through the ``open_mailbox`` hook, as a poll does: here a FakeSource plugin.
    Recorded messages count as delivered, so with keep: false the next poll removes them without fetching them --
    what the warning says."""
    source = FakeSource()
    mailbox = source.mailbox("joe")
    for n in range(2):
        mailbox.add(message(f"old-{n}"), uid=f"old-{n}")
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    source.plugin_file(plugins)
    config = tmp_path / "postbote.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\nplugin_paths: [{plugins}]\naccounts:\n  - name: joe\n"
                      f"    protocol: fake\n    deliver: {{maildir: {tmp_path / 'Maildir'}}}\n")
    assert main(["-c", str(config), "mark-seen", "joe"]) == 0
    assert mailbox.fetched == [] and mailbox.deleted == [] and mailbox.sessions == 1
    assert "keep is false, so the next poll deletes these 2 message(s)" in capsys.readouterr().err
    mailbox.add(message(NEW), uid=NEW)
    assert main(["-c", str(config), "poll"]) == 0
    assert mailbox.fetched == [NEW]  # the old ones were never fetched ...
    assert sorted(mailbox.deleted) == sorted(["old-0", "old-1", NEW])  # ... and are gone from the server
    assert delivered_subjects(tmp_path) == [f"Subject: message {NEW}"]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["fetchmail", "getmail", "mpop"]),
       st.lists(st.sampled_from(["a@b 1", "@", " ", " 2 h u", " 1 h u", "x", "1\0002", "1/2\0003", "#c", "",
                                 "u@h x y", "1\000z", "7/8/9\0001", " 0 h u", "\t"]), max_size=12))
def test_any_uid_file_reads_or_is_one_migration_error(tmp_path_factory: pytest.TempPathFactory, tool: str,
                                                      lines: list[str]) -> None:
    path = tmp_path_factory.mktemp("uids") / "uids"
    path.write_text("\n".join(lines) + "\n")
    try:
        read_uid_file(path, tool, folder="INBOX")
    except MigrationError as exc:
        assert str(exc).startswith(str(path))


def write_imap_config(tmp_path: Path, server: IMAPServer, *, folders: str = "[INBOX, Lists/dev]") -> Path:
    path = tmp_path / "postbote.yaml"
    path.write_text(f"state_dir: {tmp_path / 'state'}\naccounts:\n  - name: ann\n    protocol: imap\n"
                    f"    host: 127.0.0.1\n    port: {server.port}\n    tls: none\n    username: ann\n"
                    f"    password: demo\n    timeout: 5s\n    keep: true\n    folders: {folders}\n"
                    f"    deliver: {{maildir: {tmp_path / 'Maildir'}}}\n")
    os.chmod(path, 0o600)
    return path


def test_getmails_imap_oldmail_files_one_per_folder_then_a_keep_poll_delivers_only_new_mail(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with IMAPServer(["Lists/dev"], users={"ann": "demo"}, uidvalidity=5000) as server:
        old_inbox = [server.add_message("INBOX", message(f"inbox-{n}")) for n in range(2)]
        old_lists = [server.add_message("Lists/dev", message("lists-0"))]
        server.add_message("INBOX", message(NEW))
        validity = {name: uidvalidity for name, uidvalidity in (("INBOX", 5000), ("Lists/dev", 5001))}
        inbox = tmp_path / "oldmail-127.0.0.1-143-ann-INBOX"
        inbox.write_text("".join(f"{validity['INBOX']}/{uid}\0{1764547200 + uid}\n" for uid in old_inbox))
        lists = tmp_path / "oldmail-127.0.0.1-143-ann-Lists.dev"  # getmail turns / into . in the file name
        lists.write_text("".join(f"{validity['Lists/dev']}/{uid}\0{1764547200}\n" for uid in old_lists))
        config = write_imap_config(tmp_path, server)
        assert main(["-c", str(config), "import-state", "ann", str(inbox)]) == 0
        assert main(["-c", str(config), "import-state", "ann", str(lists)]) == 0  # Lists.dev: the folder Lists/dev
        assert "ann: 1 of 1 UID(s)" in capsys.readouterr().out.splitlines()[-1]
        other = tmp_path / "oldmail-127.0.0.1-143-ann-Elsewhere"
        other.write_text("5000/1\0001764547200\n")
        assert main(["-c", str(config), "import-state", "ann", str(other)]) == 2  # no such folder: say which
        assert "--folder" in capsys.readouterr().err
        assert main(["-c", str(config), "poll"]) == 0
        assert delivered_subjects(tmp_path) == [f"Subject: message {NEW}"]
        assert len(server.messages("INBOX")) == 3 and len(server.messages("Lists/dev")) == 1


def test_mark_seen_over_imap_lists_every_folder_and_fetches_nothing(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    with IMAPServer(["Lists/dev"], users={"ann": "demo"}) as server:
        server.add_message("INBOX", message("inbox-0"))
        server.add_message("Lists/dev", message("lists-0"))
        config = write_imap_config(tmp_path, server)
        assert main(["-c", str(config), "mark-seen", "ann"]) == 0
        assert "ann: 2 message(s) on the server, 2 newly recorded" in capsys.readouterr().out
        fetching = re.compile(r"BODY(\.PEEK)?\[|RFC822(?!\.SIZE)|STORE|EXPUNGE|MOVE", re.IGNORECASE)
        assert not [command for command in server.commands if fetching.search(command)]  # listed only
        server.add_message("Lists/dev", message(NEW))
        assert main(["-c", str(config), "poll"]) == 0
        assert delivered_subjects(tmp_path) == [f"Subject: message {NEW}"]
