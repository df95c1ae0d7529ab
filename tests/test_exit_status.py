"""Failures are visible (issue 11, item 17): the exit status of ``postbote poll`` and ``postbote status``, and what
``status`` shows, when a destination cannot take the mail.

The messages wait in a `FakeMailbox`; each test breaks one destination the way it breaks in life (a Maildir that
cannot be written, an MDA that is missing or exits 75, an MTA answering 451 or 550), checks what a cron job or an
admin would see, repairs the destination and checks that the next poll delivers and both commands exit 0 again.
The commands are ``postbote.cli.main`` run in this process, as ``python -m postbote`` runs it (the process exits
with ``main``'s return value), with the fake source loaded from ``plugin_paths``. That a child process exits with
it is shown where postbote runs as one (``test_faults_local``: a poll that defers a message exits 1; ``test_cli``,
``test_status``).

The contract: ``poll`` exits 0 only when every listed message was delivered, dropped by a filter or left on
purpose; 1 when some message was deferred or rejected in this poll or some account failed. ``status`` exits 1 while
any message waits on the server or an account's last poll failed, and lists the waiting messages.
"""

from __future__ import annotations

import json
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from postbote.testing import FakeMailbox, FakeSource

from tests.harness import Postbote, make_message, to_crlf
from tests.servers import free_port
from tests.servers.faulty_smtp import FaultySMTP

USER = "alice"
SUBJECTS = ("first", "second", "third")


@dataclass(frozen=True)
class Seen:
    """What a user sees after one command: its exit status and what it printed."""

    status: int
    text: str


@dataclass(frozen=True)
class Observed:
    """``postbote status`` and ``postbote status --json`` after a poll."""

    text: Seen
    report: dict[str, Any]

    @property
    def waiting(self) -> list[dict[str, Any]]:
        (account,) = self.report["accounts"]
        return account["waiting"]


@dataclass
class Admin:
    """What an admin (or a cron job) does with alice's account: configure it, run ``postbote`` commands on the config
    and read what they print. Her mail waits in ``server``, a FakeMailbox served by ``source``."""

    postbote: Postbote
    capsys: pytest.CaptureFixture[str]
    source: FakeSource

    @property
    def server(self) -> FakeMailbox:
        return self.source.mailbox(USER)

    def configure(self, deliver: dict[str, Any], **extra: Any) -> None:
        self.postbote.configure([{"name": USER, "protocol": "fake", "deliver": deliver, **extra}],
                                top={"plugin_paths": [str(self.source.plugin_file(self.postbote.directory))]})

    def run(self, *args: str) -> Seen:
        self.capsys.readouterr()  # only what this command prints
        status = self.postbote.run(*args)
        printed = self.capsys.readouterr()
        assert "Traceback" not in printed.err, printed.err
        return Seen(status, printed.out + printed.err)

    def observe(self) -> Observed:
        text = self.run("status")
        self.capsys.readouterr()
        status = self.postbote.run("status", "--json")
        as_json = self.capsys.readouterr().out
        assert status == text.status
        return Observed(text, json.loads(as_json))


@pytest.fixture
def admin(postbote: Postbote, capsys: pytest.CaptureFixture[str]) -> Admin:
    return Admin(postbote, capsys, FakeSource())


@pytest.fixture
def mailbox(admin: Admin) -> list[str]:
    """Three messages in alice's mailbox (CRLF, as a POP3 server sends them); their UIDs."""
    for subject in SUBJECTS:
        admin.server.add(to_crlf(make_message(subject)))
    return admin.server.uids()


def assert_waiting(observed: Observed, uids: list[str], state: str, reason: str) -> None:
    """``status`` exits 1 and names every message with its state and reason; ``--json`` carries the same."""
    assert observed.text.status == 1
    assert f"{USER}  WAITING" in observed.text.text
    assert f"{len(uids)} messages waiting on the server: {len(uids)} {state}" in observed.text.text
    for uid in uids:
        assert f"  {uid}  {state} since " in observed.text.text
    assert reason in observed.text.text
    assert sorted(m["uid"] for m in observed.waiting) == sorted(uids)
    for message in observed.waiting:
        assert message["status"] == state and reason in message["reason"]
        assert message["since"].endswith("+00:00") and message["attempts"] >= 1
        assert message["size"] > 0 and message["message_id"].endswith("@example.net>")
    (account,) = observed.report["accounts"]
    assert account["stale"] is False  # waiting for seconds, not for stale_after (an hour by default)


def assert_recovers(admin: Admin, delivered: Callable[[], int]) -> None:
    """Once the destination works, one poll delivers everything, and both commands exit 0."""
    poll = admin.run("poll")
    assert poll.status == 0, poll.text
    assert delivered() == len(SUBJECTS)
    assert admin.server.uids() == []
    after = admin.observe()
    assert after.text.status == 0, after.text.text
    assert after.waiting == [] and "waiting" not in after.text.text.replace('"waiting"', "")
    assert f"{USER}  ok, last poll" in after.text.text


def files_in(maildir: Path) -> int:
    return len(list((maildir / "new").iterdir())) if (maildir / "new").is_dir() else 0


# --- one test per symptom of the issue


def test_a_maildir_that_cannot_be_written_defers_every_message_and_poll_and_status_exit_1(
        admin: Admin, mailbox: list[str], tmp_path: Path) -> None:
    blocker = tmp_path / "mail"  # a file where the Maildir's parent directory should be: ENOTDIR, even for root
    blocker.write_text("not a directory")
    maildir = blocker / "Maildir"
    admin.configure({"maildir": str(maildir)})
    poll = admin.run("poll")
    assert poll.status == 1
    assert admin.server.uids() == mailbox
    assert_waiting(admin.observe(), mailbox, "deferred", "Not a directory")
    blocker.unlink()
    assert_recovers(admin, lambda: files_in(maildir))


def mda_script(path: Path, body: str) -> Path:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.mark.parametrize("broken", ["missing", "exits 75"])
def test_an_mda_that_is_missing_or_exits_75_defers_every_message(
        admin: Admin, mailbox: list[str], tmp_path: Path, broken: str) -> None:
    command, out = tmp_path / "deliver-mail", tmp_path / "delivered"
    out.mkdir()
    if broken == "exits 75":
        mda_script(command, "cat >/dev/null; exit 75")
    admin.configure({"mda": [str(command)]})
    assert admin.run("poll").status == 1
    assert admin.server.uids() == mailbox
    reason = "No such file or directory" if broken == "missing" else "75"
    assert_waiting(admin.observe(), mailbox, "deferred", reason)
    mda_script(command, f'cat > "$(mktemp {out}/mail.XXXXXX)"')
    assert_recovers(admin, lambda: len(list(out.iterdir())))


@pytest.fixture
def mta() -> Iterator[FaultySMTP]:
    with FaultySMTP() as server:
        yield server


def smtp_to(server: FaultySMTP) -> dict[str, Any]:
    return {"smtp": {"host": server.host, "port": server.port, "recipients": ["alice@example.org"],
                     "starttls": False}}


def test_an_mta_answering_451_defers_every_message_and_the_next_poll_delivers(
        admin: Admin, mailbox: list[str], mta: FaultySMTP) -> None:
    mta.on("END", "451 4.3.0 try again later", times=None)
    admin.configure(smtp_to(mta))
    assert admin.run("poll").status == 1
    assert admin.server.uids() == mailbox
    assert_waiting(admin.observe(), mailbox, "deferred", "451 4.3.0 try again later")
    mta.clear_rules()
    assert_recovers(admin, lambda: len(mta.copies_for("alice@example.org")))


def test_messages_refused_with_550_are_listed_with_their_uids_and_replies_until_retried(
        admin: Admin, mailbox: list[str], mta: FaultySMTP) -> None:
    mta.on("END", "550 5.7.1 message refused", times=None)
    admin.configure(smtp_to(mta))
    assert admin.run("poll").status == 1
    assert admin.server.uids() == mailbox
    refused = admin.observe()
    assert_waiting(refused, mailbox, "rejected", "550 5.7.1 message refused")
    assert f"postbote retry {USER}" in refused.text.text
    again = admin.run("poll")  # rejected messages are not tried again, and that is no news for this poll
    assert again.status == 0, again.text
    assert admin.observe().text.status == 1  # but they still wait, and status keeps saying so
    mta.clear_rules()
    assert admin.run("retry", USER).status == 0
    assert_recovers(admin, lambda: len(mta.copies_for("alice@example.org")))


def test_mail_waiting_longer_than_stale_after_makes_the_account_stale(
        admin: Admin, mailbox: list[str], mta: FaultySMTP) -> None:
    mta.on("END", "451 4.3.0 try again later", times=None)
    admin.configure(smtp_to(mta), stale_after="1s")
    assert admin.run("poll").status == 1
    time.sleep(1.1)  # the messages have now waited longer than stale_after, whatever the machine's speed
    observed = admin.observe()
    (account,) = observed.report["accounts"]
    assert account["stale"] is True and account["stale_after"] == 1.0
    assert f"{USER}  STALE" in observed.text.text and "longer than stale_after (1s)" in observed.text.text


def test_messages_left_on_purpose_keep_the_exit_status_0(
        admin: Admin, mailbox: list[str], tmp_path: Path) -> None:
    admin.configure({"maildir": str(tmp_path / "Maildir")}, keep=True)
    assert admin.run("poll").status == 0
    second = admin.run("poll")  # every message already delivered and kept: left on purpose
    assert second.status == 0, second.text
    assert admin.server.uids() == mailbox and files_in(tmp_path / "Maildir") == len(SUBJECTS)
    assert admin.observe().text.status == 0


def test_spamd_down_with_on_error_keep_defers_every_message(
        admin: Admin, mailbox: list[str], tmp_path: Path) -> None:
    maildir = tmp_path / "Maildir"
    scanner = {"spamassassin": {"host": "127.0.0.1", "port": free_port(), "timeout": "2s", "on_error": "keep"}}
    admin.configure({"maildir": str(maildir)}, plugins=scanner)
    assert admin.run("poll").status == 1
    assert admin.server.uids() == mailbox
    assert_waiting(admin.observe(), mailbox, "deferred", "spamassassin")
    admin.configure({"maildir": str(maildir)})  # the admin turns the scanner off until spamd is back
    assert_recovers(admin, lambda: files_in(maildir))
