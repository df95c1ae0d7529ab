"""IMAP as a source (issue 13) against a real Dovecot: ``postbote poll`` of ``protocol: imap`` accounts into a
Maildir, driven as a user drives it (a YAML config, the command in process), the server inspected and changed
behind postbote's back with a second IMAP client (the stdlib's imaplib).

Dovecot serves Maildir++ folders, whose hierarchy delimiter is ".": ``Lists.*`` is every folder below Lists.
"""

from __future__ import annotations

import dataclasses
import hashlib
import imaplib
import json
import re
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from postbote import hookimpl
from postbote.plugins.imap.client import IMAPClient, IMAPConnectionError, ListedMessage
from postbote.testing import poll_once

from tests.harness import MaildirTarget, Postbote, make_message, run_postbote
from tests.servers.certs import TestPKI
from tests.servers.dovecot import DovecotServer

pytestmark = pytest.mark.dovecot


# --- the second client, and what the server holds ---------------------------------------------------------------


@contextmanager
def other_client(dovecot: DovecotServer, user: str = "alice") -> Iterator[imaplib.IMAP4]:
    """Another mail client of ``user``'s (a phone, a webmail), logged in over plain IMAP."""
    client = imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=10)
    client.login(user, dovecot.password(user))
    try:
        yield client
    finally:
        client.logout()


def append(dovecot: DovecotServer, folder: str, *messages: bytes, flags: str = "") -> None:
    with other_client(dovecot) as client:
        for data in messages:
            status, answer = client.append(folder, flags or None, None, data.replace(b"\n", b"\r\n"))
            if status != "OK" and b"TRYCREATE" in answer[0]:
                client.create(folder)
                status, answer = client.append(folder, flags or None, None, data.replace(b"\n", b"\r\n"))
            assert status == "OK", answer


def subjects_in(dovecot: DovecotServer, folder: str = "INBOX") -> list[str]:
    """The subjects of the messages in ``folder``, in UID order (read without setting \\Seen)."""
    with other_client(dovecot) as client:
        status, _ = client.select(folder, readonly=True)
        assert status == "OK", folder
        _, data = client.uid("FETCH", "1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    return [re.sub(rb"^Subject: |\r\n", b"", item[1]).decode() for item in data if isinstance(item, tuple)]


def flags_in(dovecot: DovecotServer, folder: str = "INBOX") -> list[set[str]]:
    with other_client(dovecot) as client:
        client.select(folder, readonly=True)
        _, data = client.uid("FETCH", "1:*", "(FLAGS)")
    return [set(re.search(rb"FLAGS \(([^)]*)\)", line).group(1).decode().split())  # type: ignore[union-attr]
            for line in data if isinstance(line, bytes)]


def delivered_subjects(maildir: Path) -> list[str]:
    target = MaildirTarget(maildir)
    found = []
    for data in target.delivered():
        match = re.search(rb"^Subject: (.*)$", data, re.MULTILINE)
        found.append(match.group(1).decode() if match else "?")
    return sorted(found)


# --- postbote ---------------------------------------------------------------------------------------------------


class IMAPRig:
    """Alice's IMAP account in front, a Maildir behind, postbote run in this process (its JSON log captured)."""

    def __init__(self, dovecot: DovecotServer, postbote: Postbote, capsys: pytest.CaptureFixture[str]) -> None:
        self.dovecot = dovecot
        self.postbote = postbote
        self.capsys = capsys
        self.maildir = postbote.directory / "Maildir"
        self.output = ""

    def account(self, **keys: Any) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": "alice", "protocol": "imap", "host": self.dovecot.host,
                                 "port": self.dovecot.imap_port, "tls": "none", "username": "alice",
                                 "password": self.dovecot.password("alice"), "timeout": "10s",
                                 "deliver": {"maildir": str(self.maildir)}}
        entry.update(keys)
        return {key: value for key, value in entry.items() if value is not None}

    def configure(self, **keys: Any) -> Path:
        return self.postbote.configure([self.account(**keys)])

    def poll(self, **keys: Any) -> int:
        self.configure(**keys)
        self.capsys.readouterr()
        status = self.postbote.poll()
        captured = self.capsys.readouterr()
        self.output = captured.out + captured.err
        print(self.output)  # shown when the test fails
        return status

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for line in self.output.splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("event") == name:
                found.append(event)
        return found

    def finished(self) -> dict[str, Any]:
        (event,) = self.events("poll.finished")
        return event

    def delivered(self) -> list[str]:
        return delivered_subjects(self.maildir)


@pytest.fixture
def rig(dovecot: DovecotServer, postbote: Postbote, capsys: pytest.CaptureFixture[str]) -> IMAPRig:
    return IMAPRig(dovecot, postbote, capsys)


def messages(*subjects: str) -> list[bytes]:
    return [make_message(subject) for subject in subjects]


# --- after fetch ------------------------------------------------------------------------------------------------


def test_delete_delivers_each_message_and_expunges_exactly_those(rig: IMAPRig, dovecot: DovecotServer) -> None:
    append(dovecot, "INBOX", *messages("one", "two", "three"))

    assert rig.poll() == 0

    assert rig.delivered() == ["one", "three", "two"]
    assert subjects_in(dovecot) == []
    assert rig.finished()["deleted"] == 3


def test_delete_leaves_what_another_client_marked_deleted_alone(rig: IMAPRig, dovecot: DovecotServer) -> None:
    """Never a bare EXPUNGE: a message another client flagged \\Deleted (and has not expunged yet) is neither
    fetched nor expunged by postbote."""
    append(dovecot, "INBOX", *messages("mine", "theirs"))
    with other_client(dovecot) as client:
        client.select("INBOX")
        client.uid("STORE", "2", "+FLAGS.SILENT", r"(\Deleted)")

    assert rig.poll() == 0

    assert rig.delivered() == ["mine"]
    assert subjects_in(dovecot) == ["theirs"]
    assert "\\Deleted" in flags_in(dovecot)[0]


def test_messages_flagged_deleted_by_a_session_that_broke_before_expunge_are_expunged_next_poll(
        rig: IMAPRig, dovecot: DovecotServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """postbote's own \\Deleted flags are not "another client's": a session lost between UID STORE and UID
    EXPUNGE leaves them flagged, and the next poll finishes their deletion without delivering them again."""
    append(dovecot, "INBOX", *messages("one", "two"))

    def connection_lost(self: IMAPClient, uids: Any) -> None:
        raise IMAPConnectionError("connection lost (test)")

    with monkeypatch.context() as patched:
        patched.setattr(IMAPClient, "uid_expunge", connection_lost)
        assert rig.poll() == 1
    assert subjects_in(dovecot) == ["one", "two"] and all("\\Deleted" in flags for flags in flags_in(dovecot))

    assert rig.poll() == 0

    assert rig.delivered() == ["one", "two"]
    assert subjects_in(dovecot) == []


def test_move_moves_delivered_messages_into_move_to_created_when_missing(rig: IMAPRig,
                                                                         dovecot: DovecotServer) -> None:
    append(dovecot, "INBOX", *messages("one", "two"))

    assert rig.poll(after_fetch="move", move_to="Fetched") == 0

    assert rig.delivered() == ["one", "two"]
    assert subjects_in(dovecot) == []
    assert subjects_in(dovecot, "Fetched") == ["one", "two"]
    assert rig.poll(after_fetch="move", move_to="Fetched") == 0
    assert rig.delivered() == ["one", "two"]


def test_seen_marks_delivered_messages_seen_and_fetches_each_once(rig: IMAPRig, dovecot: DovecotServer) -> None:
    append(dovecot, "INBOX", *messages("one", "two"))

    assert rig.poll(after_fetch="seen") == 0
    assert rig.poll(after_fetch="seen") == 0

    assert rig.delivered() == ["one", "two"]
    assert subjects_in(dovecot) == ["one", "two"]
    assert all("\\Seen" in flags for flags in flags_in(dovecot))


def test_keep_leaves_messages_untouched_unread_and_fetches_each_once(rig: IMAPRig, dovecot: DovecotServer) -> None:
    append(dovecot, "INBOX", *messages("one", "two"))

    assert rig.poll(after_fetch="keep") == 0
    assert rig.poll(after_fetch="keep") == 0

    assert rig.delivered() == ["one", "two"]
    assert subjects_in(dovecot) == ["one", "two"]
    assert not any("\\Seen" in flags for flags in flags_in(dovecot)), "fetching must not set \\Seen"


def test_account_keep_true_keeps_imap_messages(rig: IMAPRig, dovecot: DovecotServer) -> None:
    append(dovecot, "INBOX", *messages("one"))

    assert rig.poll(keep=True) == 0
    assert rig.poll(keep=True) == 0

    assert rig.delivered() == ["one"]
    assert subjects_in(dovecot) == ["one"]


# --- folders ----------------------------------------------------------------------------------------------------


def test_several_folders_and_a_wildcard_are_fetched_and_other_folders_are_not(rig: IMAPRig,
                                                                              dovecot: DovecotServer) -> None:
    append(dovecot, "INBOX", *messages("inbox"))
    append(dovecot, "Lists.python", *messages("python list"))
    append(dovecot, "Lists.rust", *messages("rust list"))
    append(dovecot, "Work", *messages("work"))
    append(dovecot, "Private", *messages("private"))

    assert rig.poll(folders=["INBOX", "Lists.*", {"name": "Work", "after_fetch": "seen"}]) == 0

    assert rig.delivered() == ["inbox", "python list", "rust list", "work"]
    assert subjects_in(dovecot, "Lists.python") == subjects_in(dovecot, "Lists.rust") == []
    assert subjects_in(dovecot, "Work") == ["work"] and "\\Seen" in flags_in(dovecot, "Work")[0]
    assert subjects_in(dovecot, "Private") == ["private"]


def test_inbox_named_in_any_case_and_matched_by_a_wildcard_is_read_once(rig: IMAPRig,
                                                                         dovecot: DovecotServer) -> None:
    append(dovecot, "INBOX", *messages("once"))

    assert rig.poll(folders=["inbox", "*"], after_fetch="keep") == 0

    assert rig.delivered() == ["once"]


def test_a_folder_made_later_that_matches_a_wildcard_is_fetched_by_the_next_poll(
        rig: IMAPRig, dovecot: DovecotServer) -> None:
    append(dovecot, "Lists.one", *messages("first"))
    assert rig.poll(folders=["Lists.*"]) == 0

    append(dovecot, "Lists.two", *messages("second"))
    assert rig.poll(folders=["Lists.*"]) == 0

    assert rig.delivered() == ["first", "second"]


def test_the_move_to_folder_is_not_fetched_even_when_a_wildcard_matches_it(rig: IMAPRig,
                                                                           dovecot: DovecotServer) -> None:
    append(dovecot, "INBOX", *messages("one"))

    for _ in range(2):
        assert rig.poll(folders=["*"], after_fetch="move", move_to="Archive") == 0

    assert rig.delivered() == ["one"]
    assert subjects_in(dovecot, "Archive") == ["one"]


def test_a_configured_folder_that_does_not_exist_fails_the_account_clearly(rig: IMAPRig,
                                                                           dovecot: DovecotServer) -> None:
    assert rig.poll(folders=["INBOX", "Nope"]) == 1

    (failed,) = rig.events("account.failed")
    assert "cannot open folder 'Nope'" in failed["error"]


def test_a_uidvalidity_change_fetches_the_folder_again_and_is_logged(rig: IMAPRig, dovecot: DovecotServer) -> None:
    append(dovecot, "INBOX", *messages("one", "two"))
    assert rig.poll(after_fetch="keep") == 0
    old = uidvalidity(dovecot)

    change_uidvalidity(dovecot, "alice", old + 1000)
    assert rig.poll(after_fetch="keep") == 0

    assert rig.delivered() == ["one", "one", "two", "two"]
    (changed,) = rig.events("imap.uidvalidity_changed")
    assert (changed["folder"], changed["old"], changed["new"]) == ("INBOX", old, old + 1000)
    assert "all 2 messages in this folder count as new" in changed["reason"]
    assert rig.poll(after_fetch="keep") == 0
    assert len(rig.delivered()) == 4


def uidvalidity(dovecot: DovecotServer, folder: str = "INBOX") -> int:
    with other_client(dovecot) as client:
        _, data = client.status(folder, "(UIDVALIDITY)")
    return int(re.search(rb"UIDVALIDITY (\d+)", data[0]).group(1))  # type: ignore[union-attr]


def change_uidvalidity(dovecot: DovecotServer, user: str, value: int) -> None:
    """What a server restored from a backup or a migrated mailbox does: a new UIDVALIDITY for the same mail.
    Dovecot keeps it in the Maildir's dovecot-uidlist (its first line's V field) and its indexes (rebuilt)."""
    maildir = dovecot.maildir(user)
    uidlist = maildir / "dovecot-uidlist"
    header, _, rest = uidlist.read_text().partition("\n")
    uidlist.write_text(re.sub(r" V\d+", f" V{value}", header, count=1) + "\n" + rest)
    for index in maildir.glob("dovecot.index*"):
        index.unlink()
    assert uidvalidity(dovecot) == value


# --- selection --------------------------------------------------------------------------------------------------


def test_a_message_appended_between_polls_is_fetched_once(rig: IMAPRig, dovecot: DovecotServer) -> None:
    append(dovecot, "INBOX", *messages("early"))
    assert rig.poll(after_fetch="keep") == 0

    append(dovecot, "INBOX", *messages("late"))
    assert rig.poll(after_fetch="keep") == 0
    assert rig.poll(after_fetch="keep") == 0

    assert rig.delivered() == ["early", "late"]


def test_unseen_only_fetches_only_unread_messages(rig: IMAPRig, dovecot: DovecotServer) -> None:
    append(dovecot, "INBOX", *messages("unread"))
    append(dovecot, "INBOX", *messages("read"), flags=r"(\Seen)")

    assert rig.poll(unseen_only=True, after_fetch="seen") == 0

    assert rig.delivered() == ["unread"]
    assert subjects_in(dovecot) == ["unread", "read"]


def test_max_messages_fetches_that_many_per_poll(rig: IMAPRig, dovecot: DovecotServer) -> None:
    append(dovecot, "INBOX", *messages("one", "two", "three"))

    assert rig.poll(max_messages=2) == 0
    assert len(rig.delivered()) == 2
    assert rig.poll(max_messages=2) == 0

    assert rig.delivered() == ["one", "three", "two"]
    assert subjects_in(dovecot) == []


def test_a_message_over_max_size_stays_on_the_server_and_the_others_are_delivered(
        rig: IMAPRig, dovecot: DovecotServer) -> None:
    append(dovecot, "INBOX", make_message("big", b"x" * 5000 + b"\n"), *messages("small"))

    rig.poll(max_size="2KB")  # a rejected message makes the exit status 1; the poll itself went well

    assert rig.finished()["ok"] and rig.delivered() == ["small"]
    assert subjects_in(dovecot) == ["big"]
    (rejected,) = rig.events("message.rejected")
    assert "larger than max_size" in rejected["reason"]


def test_a_rejected_message_is_released_by_its_imap_uid_with_postbote_retry(rig: IMAPRig,
                                                                            dovecot: DovecotServer) -> None:
    append(dovecot, "INBOX", make_message("big", b"x" * 5000 + b"\n"))
    rig.poll(max_size="2KB")
    (rejected,) = rig.events("message.rejected")
    assert re.fullmatch(r"INBOX;UIDVALIDITY=\d+;UID=1", rejected["uid"])

    assert rig.postbote.retry("alice", rejected["uid"]) == 0
    assert rig.poll(max_size="10KB") == 0

    assert rig.delivered() == ["big"]
    assert subjects_in(dovecot) == []


# --- TLS and login ----------------------------------------------------------------------------------------------


def test_starttls_with_the_configured_ca_delivers(rig: IMAPRig, dovecot: DovecotServer, pki: TestPKI) -> None:
    append(dovecot, "INBOX", *messages("over starttls"))

    assert rig.poll(tls="starttls", tls_ca_file=str(pki.ca_file)) == 0

    assert rig.delivered() == ["over starttls"]


def test_implicit_tls_with_the_configured_ca_delivers(rig: IMAPRig, dovecot: DovecotServer, pki: TestPKI) -> None:
    append(dovecot, "INBOX", *messages("over tls"))

    assert rig.poll(tls="implicit", port=dovecot.imaps_port, tls_ca_file=str(pki.ca_file)) == 0

    assert rig.delivered() == ["over tls"]


def test_implicit_tls_refuses_a_certificate_the_system_does_not_trust(rig: IMAPRig, dovecot: DovecotServer) -> None:
    append(dovecot, "INBOX", *messages("stays"))

    assert rig.poll(tls="implicit", port=dovecot.imaps_port) == 1

    assert rig.delivered() == []
    assert subjects_in(dovecot) == ["stays"]
    assert "certificate" in rig.events("account.failed")[0]["error"]


def fingerprint(pki: TestPKI) -> str:
    """The SHA-256 pin of the test server's certificate, as tls_fingerprint takes it."""
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(Path(pki.cert_file).read_text())).hexdigest()


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
def test_a_pinned_certificate_fingerprint_is_trusted_without_a_ca(rig: IMAPRig, dovecot: DovecotServer,
                                                                  pki: TestPKI, tls: str) -> None:
    append(dovecot, "INBOX", *messages("pinned"))
    port = dovecot.imaps_port if tls == "implicit" else dovecot.imap_port

    assert rig.poll(tls=tls, port=port, tls_fingerprint=fingerprint(pki)) == 0

    assert rig.delivered() == ["pinned"]


def test_a_wrong_pin_is_refused_even_with_a_trusting_ca_file(rig: IMAPRig, dovecot: DovecotServer,
                                                             pki: TestPKI) -> None:
    append(dovecot, "INBOX", *messages("stays"))

    assert rig.poll(tls="implicit", port=dovecot.imaps_port, tls_ca_file=str(pki.ca_file),
                    tls_fingerprint="00" * 32) == 1

    assert "does not match tls_fingerprint" in rig.events("account.failed")[0]["error"]
    assert rig.delivered() == [] and subjects_in(dovecot) == ["stays"]


def test_starttls_to_an_untrusted_server_shows_the_certificate_and_the_line_that_pins_it(
        rig: IMAPRig, dovecot: DovecotServer, pki: TestPKI) -> None:
    """The certificate is read again on a second connection that says only STARTTLS; pinned, the poll goes on."""
    append(dovecot, "INBOX", *messages("stays"))
    digest = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pki.cert_file.read_text())).hexdigest().upper()
    pin = ":".join(digest[index:index + 2] for index in range(0, len(digest), 2))

    assert rig.poll(tls="starttls") == 1

    error = rig.events("account.failed")[0]["error"]
    assert "not trusted" in error and f"tls_fingerprint: {pin}" in error and "out of band" in error
    assert rig.poll(tls="starttls", tls_fingerprint=pin) == 0
    assert rig.delivered() == ["stays"]


def test_starttls_against_an_implicit_tls_port_says_to_set_tls_implicit(rig: IMAPRig, dovecot: DovecotServer,
                                                                         pki: TestPKI) -> None:
    """The server waits for a TLS handshake while postbote waits for a greeting: the timeout says why."""
    append(dovecot, "INBOX", *messages("stays"))

    assert rig.poll(tls="starttls", port=dovecot.imaps_port, tls_ca_file=str(pki.ca_file), timeout="1s") == 1

    error = rig.events("account.failed")[0]["error"]
    assert "timed out" in error and "set tls: implicit" in error and "993" in error
    assert rig.delivered() == [] and subjects_in(dovecot) == ["stays"]


def test_starttls_fails_closed_when_the_server_does_not_offer_it(rig: IMAPRig, dovecot_factory: Any,
                                                                  pki: TestPKI) -> None:
    plain_only = dovecot_factory(tls=False)
    rig.dovecot = plain_only
    append(plain_only, "INBOX", *messages("must not leak"))
    mark = plain_only.log_mark()

    assert rig.poll(tls="starttls", tls_ca_file=str(pki.ca_file)) == 1

    assert "does not offer STARTTLS" in rig.events("account.failed")[0]["error"]
    plain_only.wait_for_log(r"imap-login: .*Disconnected.*\(no auth attempts", since=mark)
    assert rig.delivered() == []


@pytest.mark.parametrize("auth", ["plain", "login", "auto"])
def test_password_mechanisms_log_in(rig: IMAPRig, dovecot: DovecotServer, pki: TestPKI, auth: str) -> None:
    append(dovecot, "INBOX", *messages(f"via {auth}"))

    assert rig.poll(tls="starttls", tls_ca_file=str(pki.ca_file), auth=auth) == 0

    assert rig.delivered() == [f"via {auth}"]


def test_a_wrong_password_fails_with_a_clear_error_exit_1_and_no_traceback(rig: IMAPRig,
                                                                           dovecot: DovecotServer) -> None:
    append(dovecot, "INBOX", *messages("stays"))
    config = rig.configure(password="not-the-password")

    run = run_postbote(config, "poll", timeout=60)

    assert run.status == 1, run.output
    assert "Traceback" not in run.output and "not-the-password" not in run.output
    assert re.search(r"user alice, (PLAIN|LOGIN)\); check the username and the password", run.output), run.output
    assert subjects_in(dovecot) == ["stays"]


def test_a_password_crosses_a_plain_connection_only_with_tls_none_and_a_warning(rig: IMAPRig,
                                                                                dovecot: DovecotServer) -> None:
    append(dovecot, "INBOX", *messages("sent in clear"))

    assert rig.poll(tls="none", auth="plain") == 0

    assert rig.events("login.cleartext")
    assert rig.delivered() == ["sent in clear"]


# --- size -------------------------------------------------------------------------------------------------------


def test_a_200_mb_message_is_streamed_to_disk_under_64_mb_of_memory(rig: IMAPRig, dovecot: DovecotServer) -> None:
    line = b"0123456789" * 99 + b"abcdef\n"
    big = b"Subject: a 200 MB message\n\n" + line * (200_000_000 // len(line))
    dovecot.deliver("alice", big)
    config = rig.configure(timeout="60s", max_size="300MB")

    run = run_postbote(config, "poll", timeout=180, address_space=2 << 30)

    assert run.status == 0, run.output[-2000:]
    print(f"peak RSS {run.peak_rss_mb:.0f} MB, {run.duration:.1f} s for a 200 MB message")
    assert run.peak_rss_mb < 64, f"peak RSS {run.peak_rss_mb:.0f} MB for a 200 MB message"
    (delivered,) = MaildirTarget(rig.maildir).files("new")
    assert delivered.stat().st_size > len(big)  # the message and the trace field
    assert dovecot.count("alice") == 0


# --- servers without UIDPLUS or MOVE ----------------------------------------------------------------------------


def narrowed(dovecot_factory: Any, capabilities: str) -> DovecotServer:
    """A Dovecot that announces only ``capabilities`` after login (as an older or simpler server would)."""
    return dovecot_factory(extra_config=f"protocol imap {{\n  imap_capability = {capabilities}\n}}\n")


def test_delete_without_uidplus_is_refused_before_anything_is_fetched(rig: IMAPRig, dovecot_factory: Any) -> None:
    """Without UID EXPUNGE only a bare EXPUNGE could remove the messages, and it would also remove what other
    clients flagged: postbote refuses, saying what to do instead."""
    rig.dovecot = narrowed(dovecot_factory, "IMAP4rev1 LITERAL+ SASL-IR IDLE")
    append(rig.dovecot, "INBOX", *messages("stays"))

    assert rig.poll() == 1

    (failed,) = rig.events("account.failed")
    assert "after_fetch: delete needs UIDPLUS" in failed["error"] and "never sends a bare EXPUNGE" in failed["error"]
    assert rig.delivered() == [] and subjects_in(rig.dovecot) == ["stays"]


def test_delete_without_uidplus_moves_to_move_to_when_the_server_can_move(rig: IMAPRig,
                                                                           dovecot_factory: Any) -> None:
    rig.dovecot = narrowed(dovecot_factory, "IMAP4rev1 LITERAL+ SASL-IR IDLE MOVE")
    append(rig.dovecot, "INBOX", *messages("one", "two"))

    assert rig.poll(move_to="Trash") == 0

    assert rig.delivered() == ["one", "two"]
    assert subjects_in(rig.dovecot) == []
    assert subjects_in(rig.dovecot, "Trash") == ["one", "two"]


def test_move_without_the_move_extension_copies_and_expunges_exactly_those(rig: IMAPRig,
                                                                           dovecot_factory: Any) -> None:
    rig.dovecot = narrowed(dovecot_factory, "IMAP4rev1 LITERAL+ SASL-IR IDLE UIDPLUS")
    append(rig.dovecot, "INBOX", *messages("one", "theirs"))
    with other_client(rig.dovecot) as client:
        client.select("INBOX")
        client.uid("STORE", "2", "+FLAGS.SILENT", r"(\Deleted)")

    assert rig.poll(after_fetch="move", move_to="Archive") == 0

    assert rig.delivered() == ["one"]
    assert subjects_in(rig.dovecot) == ["theirs"]
    assert subjects_in(rig.dovecot, "Archive") == ["one"]


# --- stopping -----------------------------------------------------------------------------------------------------


class StopAfterFirst:
    """A filter that asks the poll to stop (as SIGTERM does) while it handles the first message."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop

    @hookimpl
    def filter_message(self, message: Any) -> None:
        self.stop.set()


def test_a_stopped_poll_finishes_the_message_in_hand_and_leaves_the_rest_on_the_server(
        rig: IMAPRig, dovecot: DovecotServer) -> None:
    append(dovecot, "INBOX", *messages(*(f"message {n}" for n in range(1, 11))))
    stop = threading.Event()

    stats = poll_once(rig.configure(), plugins=[StopAfterFirst(stop)], stop=stop)

    assert stats.ok and stats.delivered == stats.deleted >= 1
    assert len(rig.delivered()) == stats.delivered
    assert len(subjects_in(dovecot)) == 10 - stats.delivered
    assert poll_once(rig.configure()).delivered == 10 - stats.delivered
    assert subjects_in(dovecot) == []


# --- Gmail ------------------------------------------------------------------------------------------------------


@pytest.fixture
def gmail_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dovecot speaking a little Gmail: X-GM-MSGID, the same for a message wherever it is (derived here from its
    Message-ID), as Gmail gives one message under several labels (INBOX, All Mail, a user label)."""
    real_listing = IMAPClient.listing

    def listing(self: IMAPClient, *, unseen_only: bool = False, gmail: bool = False) -> list[ListedMessage]:
        listed = real_listing(self, unseen_only=unseen_only)
        if not gmail:
            return listed
        ids = []
        for message in listed:
            header = self.header_block(message.uid) or b""
            match = re.search(rb"Message-ID: <([^>]*)>", header)
            ids.append(int.from_bytes(match.group(1)[:7], "big") if match else None)
        return [dataclasses.replace(message, gm_msgid=gm) for message, gm in zip(listed, ids, strict=True)]

    monkeypatch.setattr(IMAPClient, "listing", listing)


@pytest.mark.usefixtures("gmail_ids")
def test_gmail_fetches_a_message_under_several_labels_once(rig: IMAPRig, dovecot: DovecotServer) -> None:
    append(dovecot, "INBOX", *messages("labelled", "inbox only"))
    append(dovecot, "AllMail", *messages("labelled", "archived"))

    assert rig.poll(gmail=True, folders=["INBOX", "AllMail"], after_fetch="keep") == 0
    assert rig.poll(gmail=True, folders=["INBOX", "AllMail"], after_fetch="keep") == 0

    assert rig.delivered() == ["archived", "inbox only", "labelled"]
    assert rig.events("message.delivered") == []  # in the second poll


@pytest.mark.usefixtures("gmail_ids")
def test_gmail_uids_name_the_message_not_the_folder(rig: IMAPRig, dovecot: DovecotServer) -> None:
    append(dovecot, "INBOX", *messages("labelled"))
    append(dovecot, "AllMail", *messages("labelled"))

    assert rig.poll(gmail=True, folders=["INBOX", "AllMail"]) == 0

    (delivered,) = rig.events("message.delivered")
    assert re.fullmatch(r"gmail;X-GM-MSGID=\d+", delivered["uid"])
    assert rig.delivered() == ["labelled"]
    assert subjects_in(dovecot) == [] and subjects_in(dovecot, "AllMail") == ["labelled"]


def test_check_connect_shows_the_imap_session_and_what_a_poll_would_fetch_without_touching_it(
        rig: IMAPRig, dovecot: DovecotServer, capsys: pytest.CaptureFixture[str]) -> None:
    from postbote.cli import main

    from tests.harness import logging_restored

    append(dovecot, "INBOX", *messages("one", "two"))
    path = rig.configure()

    with logging_restored():
        status = main(["-c", str(path), "check", "--connect"])

    out = capsys.readouterr().out
    assert status == 0, out
    assert "logged in (" in out and "IMAP4REV1" in out and "2 not delivered yet (a poll would fetch them)" in out
    assert subjects_in(dovecot) == ["one", "two"] and flags_in(dovecot) == [set(), set()]  # nothing seen or moved
