"""An IMAP source against a misbehaving server (issue 13): connections dropped, NO, BYE, garbage, stalls, a
literal out of step, refused deletions -- played by the scriptable `postbote.testing.imapserver.IMAPServer`.

Whatever the fault, no message is lost: each is still on the server or delivered, a message delivered before a
fault is not delivered again (its record has the next poll finish its deletion), and once the server behaves,
every message arrives exactly once.
"""

from __future__ import annotations

import imaplib
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from postbote.poll import PollStats
from postbote.testing import poll_once
from postbote.testing.imapserver import DEFAULT_CAPABILITIES, REV2_ONLY, Action, Faults, IMAPServer

from tests.harness import MaildirTarget, corpus_message, corpus_number

pytestmark = pytest.mark.usefixtures("time_limit")

TIME_LIMIT = 60.0


class Rig:
    """The account ``test`` (user demo) on an `IMAPServer`, delivering into a Maildir."""

    def __init__(self, directory: Path, server: IMAPServer, count: int) -> None:
        self.directory = directory
        self.server = server
        self.target = MaildirTarget(directory / "Maildir")
        self.numbers = tuple(range(1, count + 1))
        directory.mkdir(parents=True, exist_ok=True)
        for number in self.numbers:
            server.add_message("INBOX", corpus_message(number))

    def poll(self, **account: Any) -> PollStats:
        entry = {"name": "test", "protocol": "imap", "host": self.server.host, "port": self.server.port,
                 "tls": "none", "username": "demo", "password": "demo", "timeout": "2s",
                 "deliver": {"maildir": str(self.target.path)}, **account}
        path = self.directory / "postbote.yaml"
        path.write_text(yaml.safe_dump({"state_dir": str(self.directory / "state"),
                                        "log": {"level": "debug", "format": "json"}, "accounts": [entry]}))
        os.chmod(path, 0o600)
        return poll_once(path)

    def on_server(self, folder: str = "INBOX") -> list[int]:
        return [n for m in self.server.messages(folder) if (n := corpus_number(m.data)) is not None]

    def copies(self) -> Counter[int]:
        return Counter(n for data in self.target.delivered() if (n := corpus_number(data)) is not None)

    def check(self) -> Counter[int]:
        """Nothing lost: each message still in INBOX or delivered."""
        copies, inbox = self.copies(), set(self.on_server())
        lost = [n for n in self.numbers if n not in inbox and not copies[n]]
        assert lost == [], f"messages lost: {lost}"
        return copies

    def healthy_poll_finishes(self, **account: Any) -> None:
        """With the faults gone, one poll delivers the rest; every message then arrived exactly once."""
        if self.server.faults is not None:
            assert self.server.faults.fired, "the fault never fired: the test tested nothing"
        self.server.faults = None
        stats = self.poll(**account)
        assert stats.ok, stats.error
        copies = self.check()
        assert {n: copies[n] for n in self.numbers} == dict.fromkeys(self.numbers, 1)
        assert self.server.errors == []


@pytest.fixture
def make_rig(tmp_path: Path) -> Iterator[Any]:
    servers: list[IMAPServer] = []

    def make(count: int = 5, faults: Faults | None = None, **options: Any) -> Rig:
        server = IMAPServer(faults=faults, **options).start()
        servers.append(server)
        return Rig(tmp_path / f"rig{len(servers)}", server, count)

    yield make
    for server in servers:
        server.stop()


# The listing is the first UID FETCH of a poll; the messages' own fetches follow it.
FIRST_BODY_FETCH = 2


@pytest.mark.parametrize("fault", [
    Action.drop(), Action.bye("shutting down"), Action.drop_midway(60), Action.literal_delta(-7),
    Action.literal_delta(+7), Action.reply(b"* 3 FETCH (UID 3 BODY[] {5}\r\nxx\r\n"), Action.stall(5),
], ids=["drop", "bye", "drop-midway", "literal-short", "literal-long", "garbage", "stall"])
def test_a_fault_while_fetching_ends_the_session_without_losing_or_expunging_anything(
        make_rig: Any, fault: Action) -> None:
    rig = make_rig(faults=Faults().on("UID FETCH", nth=FIRST_BODY_FETCH + 2, action=fault))

    stats = rig.poll()

    assert not stats.ok
    assert stats.deleted == 0 and rig.on_server() == list(rig.numbers)
    rig.check()
    rig.healthy_poll_finishes()


@pytest.mark.parametrize("command", ["GREETING", "AUTHENTICATE", "SELECT", "UID FETCH"])
def test_a_dropped_connection_before_anything_is_fetched_fails_the_poll_cleanly(make_rig: Any,
                                                                                command: str) -> None:
    rig = make_rig(faults=Faults().on(command, action=Action.drop()))

    stats = rig.poll()

    assert not stats.ok and stats.delivered == 0
    rig.healthy_poll_finishes()


def test_a_no_to_one_message_leaves_it_for_the_next_poll_and_delivers_the_others(make_rig: Any) -> None:
    rig = make_rig(faults=Faults().on("UID FETCH", nth=FIRST_BODY_FETCH + 1, action=Action.no(text="try later")))

    stats = rig.poll()

    assert stats.ok and stats.delivered == 4 and stats.left == 1
    assert rig.on_server() == [2]
    rig.healthy_poll_finishes()


@pytest.mark.parametrize("command, fault", [
    ("UID STORE", Action.drop()), ("UID STORE", Action.no(text="read-only")), ("UID EXPUNGE", Action.drop()),
    ("UID EXPUNGE", Action.no(text="not now")), ("UID EXPUNGE", Action.bye()), ("LOGOUT", Action.drop()),
])
def test_a_fault_when_deleting_never_redelivers_and_the_next_poll_deletes(make_rig: Any, command: str,
                                                                           fault: Action) -> None:
    rig = make_rig(faults=Faults().on(command, action=fault))

    rig.poll()

    assert rig.copies() == Counter(dict.fromkeys(rig.numbers, 1))
    rig.healthy_poll_finishes()
    assert rig.on_server() == []


def test_a_refused_move_is_tried_again_next_poll_without_redelivery(make_rig: Any) -> None:
    rig = make_rig(faults=Faults().on("UID MOVE", action=Action.no(text="quota")), folders=["Archive"])

    assert rig.poll(after_fetch="move", move_to="Archive").ok

    assert rig.on_server() == list(rig.numbers) and rig.on_server("Archive") == []
    rig.healthy_poll_finishes(after_fetch="move", move_to="Archive")
    assert rig.on_server() == [] and rig.on_server("Archive") == list(rig.numbers)


def test_an_expunge_announced_by_another_client_mid_poll_is_absorbed(make_rig: Any) -> None:
    rig = make_rig(faults=Faults().on("UID FETCH", nth=FIRST_BODY_FETCH + 1,
                                      action=Action.before(b"* 9 EXISTS\r\n* 1 RECENT\r\n")))

    assert rig.poll().ok

    rig.healthy_poll_finishes()


def test_without_uidplus_and_move_the_account_is_refused_and_nothing_is_fetched(make_rig: Any) -> None:
    capabilities = [c for c in DEFAULT_CAPABILITIES if c not in ("UIDPLUS", "MOVE")]
    rig = make_rig(capabilities=capabilities)

    stats = rig.poll()

    assert not stats.ok and "needs UIDPLUS" in (stats.error or "")
    assert stats.delivered == 0 and rig.on_server() == list(rig.numbers)
    assert not any(command.split()[:1] == ["EXPUNGE"] for command in rig.server.commands), "no bare EXPUNGE"


def test_seen_without_uidplus_works_and_never_expunges(make_rig: Any) -> None:
    capabilities = [c for c in DEFAULT_CAPABILITIES if c not in ("UIDPLUS", "MOVE")]
    rig = make_rig(capabilities=capabilities)

    assert rig.poll(after_fetch="seen").ok

    assert all("\\Seen" in message.flags for message in rig.server.messages())
    assert rig.copies() == Counter(dict.fromkeys(rig.numbers, 1))
    assert rig.poll(after_fetch="seen").delivered == 0


@pytest.mark.parametrize("after_fetch", ["delete", "move", "seen"])
def test_an_imap4rev2_only_server_gets_uid_expunge_move_and_esearch_without_naming_them(
        make_rig: Any, after_fetch: str) -> None:
    """RFC 9051 makes UIDPLUS, MOVE, ESEARCH and LITERAL- part of IMAP4rev2: a server that speaks only rev2 need not
    name them, and answers every SEARCH with ESEARCH."""
    rig = make_rig(count=0, capabilities=REV2_ONLY, folders=["Archive"])
    for number in range(1, 6):  # unseen_only leaves the read message 2 where it is
        rig.server.add_message("INBOX", corpus_message(number), flags=["\\Seen"] if number == 2 else [])

    stats = rig.poll(after_fetch=after_fetch, unseen_only=True,
                     **({"move_to": "Archive"} if after_fetch == "move" else {}))

    assert stats.ok and stats.delivered == 4, stats.error
    assert rig.copies() == Counter({1: 1, 3: 1, 4: 1, 5: 1})
    expected_inbox = {"delete": [2], "move": [2], "seen": [1, 2, 3, 4, 5]}[after_fetch]
    assert rig.on_server() == expected_inbox
    assert rig.on_server("Archive") == ([1, 3, 4, 5] if after_fetch == "move" else [])
    commands = " | ".join(rig.server.commands)
    assert "UID SEARCH RETURN (ALL) UNSEEN" in commands
    assert ("UID EXPUNGE" in commands) is (after_fetch == "delete")
    assert ("UID MOVE" in commands) is (after_fetch == "move")
    assert not any(command.split()[:1] == ["EXPUNGE"] for command in rig.server.commands), "no bare EXPUNGE"


def test_a_uidvalidity_change_between_polls_fetches_the_folder_again(make_rig: Any) -> None:
    rig = make_rig(count=3)
    assert rig.poll(after_fetch="keep").delivered == 3

    rig.server.renumber("INBOX")

    assert rig.poll(after_fetch="keep").delivered == 3
    assert rig.poll(after_fetch="keep").delivered == 0


def test_gmail_lists_a_message_in_two_labels_once_with_a_real_x_gm_msgid(make_rig: Any) -> None:
    rig = make_rig(count=3, gmail=True, folders=["[Gmail]/All Mail"])
    client = imaplib.IMAP4(rig.server.host, rig.server.port, timeout=5)
    client.login("demo", "demo")
    client.select("INBOX")
    client.uid("COPY", "1:*", '"[Gmail]/All Mail"')
    client.logout()

    stats = rig.poll(gmail=True, folders=["INBOX", "[Gmail]/All Mail"], after_fetch="keep")

    assert stats.ok and stats.listed == 3 and stats.delivered == 3
    assert rig.copies() == Counter(dict.fromkeys(rig.numbers, 1))
    assert any("X-GM-MSGID" in command for command in rig.server.commands)


def test_a_server_trickling_a_message_is_cut_off_by_the_poll_deadline(make_rig: Any) -> None:
    """A byte now and then keeps every single read alive; the whole session's deadline (poll_timeout) still ends
    it, with nothing expunged."""
    rig = make_rig(faults=Faults().on("UID FETCH", nth=FIRST_BODY_FETCH, action=Action.trickle(0.05)))

    stats = rig.poll(poll_timeout="2s")  # the module's time limit fails the test if the deadline did not hold

    assert not stats.ok, "the session outlived its deadline"
    assert stats.deleted == 0 and rig.on_server() == list(rig.numbers)
    rig.healthy_poll_finishes()
