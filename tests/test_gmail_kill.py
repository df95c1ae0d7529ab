"""Process death during a Gmail import (issue 14): ``postbote poll`` from a real Dovecot (POP3) into the fake Gmail
API, killed with SIGKILL right after Gmail answered 200 to an import and before postbote recorded it. The message
is then in Gmail but not in postbote's state, and still on the POP3 server (the killed session never reached
QUIT), so the next poll imports it once more: the one duplicate a kill may cost, which Gmail shows as two copies
(docs/gmail.md says so). Nothing is lost, and nothing else arrives twice.
"""

from __future__ import annotations

import os
import re
import signal
import threading
from collections import Counter
from pathlib import Path

import pytest
import yaml
from postbote.state import StateStore
from postbote.testing.gmail_api import Fault, GmailAPIServer, Logged

from tests.harness import (
    OAUTH_CLIENT_ID,
    OAUTH_CLIENT_SECRET,
    corpus_message,
    corpus_number,
    run_postbote,
    secret_file,
    uidls,
    wait_until,
)
from tests.servers.certs import TestPKI
from tests.servers.dovecot import DovecotServer
from tests.servers.dovecot_sasl import FakeOAuthProvider

pytestmark = [pytest.mark.usefixtures("time_limit"), pytest.mark.dovecot]

TIME_LIMIT = 180.0
MESSAGES = 12
KILL_AFTER = [3, 2, 4]  # the n-th 200 of each killed run


class Killer:
    """Kills the postbote child once the n-th import of its run was answered 200, and notes that import's id."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.after = 0
        self.seen = 0
        self.killed = threading.Event()
        self.killed_at = ""  # the Gmail id of the import whose 200 the kill followed

    def arm(self, after: int) -> None:
        self.after, self.seen, self.pid, self.killed_at = after, 0, None, ""
        self.killed.clear()

    def answered(self, entry: Logged) -> None:
        if not self.after or entry.status != 200 or entry.kind not in ("import", "upload"):
            return
        self.seen += 1
        if self.seen == self.after and self.pid is not None:
            os.kill(self.pid, signal.SIGKILL)
            self.killed_at = entry.message_id
            self.killed.set()


def recorded_ids(state_dir: Path) -> set[str]:
    """The Gmail ids postbote's state names as delivered (the record says "imported as message ID")."""
    store = StateStore(state_dir, readonly=True)
    try:
        reasons = [record.reason for record in store.records("old").values()]
    finally:
        store.close()
    return {match.group(1) for reason in reasons for match in [re.search(r"imported as message (\S+)", reason)]
            if match}


def write_config(tmp_path: Path, dovecot: DovecotServer, gmail: GmailAPIServer, provider: FakeOAuthProvider,
                 pki: TestPKI) -> Path:
    """alice's POP3 mailbox on Dovecot into the fake Gmail API, authorized by the fake provider."""
    config = tmp_path / "postbote.yaml"
    config.write_text(yaml.safe_dump({
        "state_dir": str(tmp_path / "state"), "log": {"level": "info", "format": "json"},
        "accounts": [{"name": "old", "host": dovecot.host, "port": dovecot.pop3_port, "tls": "none",
                      "username": "alice", "password": dovecot.password("alice"), "timeout": "10s",
                      "deliver": {"gmail": {
                          "api_url": gmail.base_url, "tls_ca_file": str(pki.ca_file), "timeout": "10s",
                          "oauth2": {"client_id": OAUTH_CLIENT_ID,
                                     "client_secret_file": str(secret_file(tmp_path / "cs", OAUTH_CLIENT_SECRET)),
                                     "token_url": provider.token_url, "ca_file": str(pki.ca_file),
                                     "refresh_token_file": str(secret_file(
                                         tmp_path / "rt", provider.issue_refresh_token("alice", OAUTH_CLIENT_ID)))},
                      }}}]}))
    config.chmod(0o600)
    return config


def test_a_kill_between_gmails_200_and_the_record_costs_at_most_one_copy_and_loses_nothing(
        tmp_path: Path, pki: TestPKI, dovecot: DovecotServer, provider: FakeOAuthProvider) -> None:
    for number in range(1, MESSAGES + 1):
        dovecot.deliver("alice", corpus_message(number, body_lines=20 + number * 50))
    killer = Killer()

    def token_user(token: str) -> str | None:
        entry = provider.state.access_tokens.get(token)
        return entry[0] if entry else None

    with GmailAPIServer(pki.server_context(), tmp_path / "gmail", token_user, after_answer=killer.answered) as gmail:
        config = write_config(tmp_path, dovecot, gmail, provider, pki)

        def remember(pid: int) -> None:
            killer.pid = pid

        unrecorded: list[str] = []  # the imports whose 200 a kill followed before postbote recorded them
        for after in KILL_AFTER:
            killer.arm(after)
            run = run_postbote(config, "poll", while_running=remember)
            assert killer.killed.is_set() and killer.killed_at, run.output  # the kill landed after a 200 ...
            assert run.status == -signal.SIGKILL, run.output  # ... and it was the kill that ended the process
            if killer.killed_at not in recorded_ids(tmp_path / "state"):
                unrecorded.append(killer.killed_at)
        killer.arm(0)
        final = run_postbote(config, "poll")
        assert final.status == 0, final.output

        number_of = {message.id: corpus_number(message.data()) for message in gmail.imported}
        arrived = Counter(number_of.values())
        assert gmail.refused == []
        # Imports Gmail has that no record names: the copies the kills cost. Usually the import whose 200 the kill
        # followed; on a slow machine the signal may land after postbote recorded that one and sent the next.
        recorded = recorded_ids(tmp_path / "state")
        in_doubt = [message.id for message in gmail.imported if message.id not in recorded]
    assert sorted(arrived) == list(range(1, MESSAGES + 1))  # none lost
    # the kill comes as Gmail's 200 is written, long before postbote could record it: it landed in between at least
    # once (if one came after the record, that kill costs no copy)
    assert unrecorded, "no kill landed between Gmail's 200 and postbote's record: the test proved nothing"
    assert set(unrecorded) <= set(in_doubt)
    assert len(in_doubt) <= len(KILL_AFTER), f"more copies than kills: {in_doubt}"
    duplicated = sorted(number for number, count in arrived.items() if count > 1)
    assert all(count <= 2 for count in arrived.values()), arrived
    assert duplicated == sorted(number_of[message_id] for message_id in in_doubt), (arrived, in_doubt)
    assert uidls(dovecot, "alice") == []


def test_a_kill_in_the_middle_of_a_large_upload_leaves_nothing_in_gmail_and_the_next_poll_imports_it_once(
        tmp_path: Path, pki: TestPKI, dovecot: DovecotServer, provider: FakeOAuthProvider) -> None:
    """A resumable upload cut short by the kill never completes its session: Gmail imports nothing from it."""
    line = b"k" * 79 + b"\n"
    dovecot.deliver("alice", corpus_message(1, body_lines=3))
    big = corpus_message(2, body_lines=3) + line * (8 * 1024 * 1024 // len(line))
    dovecot.deliver("alice", big)
    pid: list[int] = []

    def kill() -> None:
        os.kill(wait_until(lambda: pid[0] if pid else None, what="the child's pid"), signal.SIGKILL)

    def token_user(token: str) -> str | None:
        entry = provider.state.access_tokens.get(token)
        return entry[0] if entry else None

    with GmailAPIServer(pki.server_context(), tmp_path / "gmail", token_user) as gmail:
        gmail.faults.append(Fault("upload", status=503, after_bytes=2 * 1024 * 1024, then=kill))
        config = write_config(tmp_path, dovecot, gmail, provider, pki)

        killed = run_postbote(config, "poll", while_running=pid.append)
        assert killed.status != 0 and gmail.fired, killed.output
        assert [corpus_number(message.data()) for message in gmail.imported] == [1]  # not the cut one

        final = run_postbote(config, "poll")
        assert final.status == 0, final.output
        arrived = Counter(corpus_number(message.data()) for message in gmail.imported)
        assert gmail.refused == []
    assert arrived == {1: 1, 2: 1} or arrived == {1: 2, 2: 1}  # message 1 again only if the kill beat its record
    assert uidls(dovecot, "alice") == []
