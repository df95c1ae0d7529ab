"""``postbote poll --dry-run`` against a real Dovecot, over POP3 and IMAP (issue 15): the output says per message
where a poll would deliver it or which rule drops it, and nothing changes -- the server's messages and flags, and
the state database, are the same before and after."""

from __future__ import annotations

import hashlib
import imaplib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.harness import MaildirTarget, Postbote, make_message, uidls
from tests.servers.dovecot import DovecotServer

pytestmark = [pytest.mark.dovecot, pytest.mark.usefixtures("time_limit")]



def rules(invoices: Path) -> dict[str, Any]:
    return {"rules": [
        {"name": "newsletters", "match": {"header": "List-Id", "contains": "news"}, "action": "drop"},
        {"name": "invoices", "match": {"header": "Subject", "contains": "invoice"},
         "action": {"deliver": {"maildir": str(invoices)}}},
    ]}


@contextmanager
def imap_session(dovecot: DovecotServer) -> Iterator[imaplib.IMAP4]:
    client = imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=10)
    client.login("alice", dovecot.password("alice"))
    try:
        yield client
    finally:
        client.logout()


def server_view(dovecot: DovecotServer) -> list[tuple[bytes, frozenset[str]]]:
    """Every message in alice's INBOX with its flags (but \\Recent, which any session changes), read-only."""
    with imap_session(dovecot) as client:
        client.select("INBOX", readonly=True)
        _, data = client.uid("FETCH", "1:*", "(FLAGS BODY.PEEK[])")
    found = []
    for item in data:
        if isinstance(item, tuple):
            flags = re.search(rb"FLAGS \(([^)]*)\)", item[0])
            found.append((item[1], frozenset(flag for flag in (flags.group(1).decode().split() if flags else [])
                                             if flag != "\\Recent")))
    return sorted(found)


def state_files(state_dir: Path) -> dict[str, str]:
    """The state database's files (and its write-ahead log), by content."""
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(state_dir.glob("state.sqlite3*"))}


def account(dovecot: DovecotServer, postbote: Postbote, protocol: str, **keys: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": "alice", "protocol": protocol, "host": dovecot.host, "tls": "none", "username": "alice",
        "port": dovecot.imap_port if protocol == "imap" else dovecot.pop3_port,
        "password": dovecot.password("alice"), "timeout": "10s",
        "deliver": {"maildir": str(postbote.directory / "Maildir")},
        "plugins": {"rules": rules(postbote.directory / "Invoices")}}
    entry.update(keys)
    return entry


def dry_run(postbote: Postbote, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    status = postbote.run("poll", "--dry-run")
    out = capsys.readouterr().out
    print(out)  # shown when the test fails
    return status, out


def line_of(out: str, subject: str) -> str:
    (line,) = [line for line in out.splitlines() if f"'{subject}'" in line]
    return line


@pytest.mark.parametrize("protocol", ["pop3", "imap"])
def test_dry_run_names_each_messages_destination_or_dropping_rule_and_changes_nothing(
        protocol: str, dovecot: DovecotServer, postbote: Postbote, capsys: pytest.CaptureFixture[str]) -> None:
    dovecot.deliver("alice", make_message("delivered before"))
    postbote.configure([account(dovecot, postbote, protocol, keep=True)])
    assert postbote.poll() == 0  # one message recorded as delivered; kept on the server
    dovecot.deliver("alice", make_message("hello"))
    dovecot.deliver("alice", make_message("weekly news", headers=b"List-Id: <news.example.org>\n"))
    dovecot.deliver("alice", make_message("your invoice"))
    before = (server_view(dovecot), state_files(postbote.state_dir), uidls(dovecot, "alice"))

    status, out = dry_run(postbote, capsys)

    assert status == 0
    assert "4 message(s) on the server" in out and "filters, on the headers only" in out and "rules" in out
    assert f"-> maildir:{postbote.directory / 'Maildir'}" in line_of(out, "hello")
    assert "dropped by rules: rule newsletters" in line_of(out, "weekly news")
    assert f"-> maildir:{postbote.directory / 'Invoices'}" in line_of(out, "your invoice")
    assert "leave: delivered before (keep)" in out
    assert (server_view(dovecot), state_files(postbote.state_dir), uidls(dovecot, "alice")) == before
    assert len(MaildirTarget(postbote.directory / "Maildir").delivered()) == 1  # only the real poll's
    assert not (postbote.directory / "Invoices").exists()


def test_dry_run_of_a_fetch_and_delete_account_deletes_nothing_and_says_what_a_poll_would_delete(
        dovecot: DovecotServer, postbote: Postbote, capsys: pytest.CaptureFixture[str]) -> None:
    dovecot.deliver("alice", make_message("new one"))
    postbote.configure([account(dovecot, postbote, "pop3")])
    before = (server_view(dovecot), uidls(dovecot, "alice"))

    status, out = dry_run(postbote, capsys)

    assert status == 0 and "-> maildir:" in line_of(out, "new one")
    assert (server_view(dovecot), uidls(dovecot, "alice")) == before
    assert not (postbote.state_dir / "state.sqlite3").exists()  # a dry run before any poll creates no state


def test_dry_run_exits_1_and_says_so_when_an_account_cannot_log_in(
        dovecot: DovecotServer, postbote: Postbote, capsys: pytest.CaptureFixture[str]) -> None:
    postbote.configure([account(dovecot, postbote, "pop3", password="wrong")])

    status, out = dry_run(postbote, capsys)

    assert status == 1 and "alice: FAILED:" in out and "wrong" not in out
