"""The Gmail import destination (issue 14): ``deliver: {gmail: {...}}`` puts each message into a Gmail mailbox with
``users.messages.import``, and the message leaves the source only after Gmail answered 200 with its id.

The first part checks the keys; the rest polls a real Dovecot (POP3, user alice) into `GmailAPIServer`, the local
stand-in for the API that refuses every request the real one would refuse (``gmail.refused`` stays empty), with
access tokens from the fake OAuth2 provider the IMAP destination's tests use.
"""

from __future__ import annotations

import json
import re
import stat
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from datetime import time as time_of_day
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml
from postbote.cli import main
from postbote.config import load_config
from postbote.errors import ConfigError
from postbote.pluginmanager import make_plugin_manager
from postbote.plugins import gmail as gmail_plugin
from postbote.plugins.gmail.api import MULTIPART_LIMIT, retry_after, skip
from postbote.state import DEFERRED, DELIVERED, REJECTED, StateStore
from postbote.testing.gmail_api import Fault, GmailAPIServer

from tests.harness import OAUTH_CLIENT_ID as CLIENT_ID
from tests.harness import OAUTH_CLIENT_SECRET as CLIENT_SECRET
from tests.harness import make_message, run_postbote, secret_file, strip_trace_header, to_crlf, uidls, wait_until
from tests.servers.certs import TestPKI
from tests.servers.dovecot import DovecotServer
from tests.servers.dovecot_sasl import FakeOAuthProvider

pytestmark = pytest.mark.usefixtures("time_limit")

TIME_LIMIT = 120.0

# ================================================================== the keys


def write(tmp_path: Path, deliver: str) -> Path:
    path = tmp_path / "postbote.yaml"
    path.write_text("accounts:\n  - name: a\n    host: pop.example.org\n    username: u\n    password: p\n"
                    "    deliver:\n" + textwrap.indent(textwrap.dedent(deliver), " " * 6))
    path.chmod(0o600)
    return path


OAUTH = "oauth2: {provider: google, client_id: id.apps.googleusercontent.com, client_secret_file: cs, " \
        "refresh_token_file: rt}"


def test_a_gmail_destination_defaults_to_inbox_unread_the_date_header_and_the_narrow_import_scopes(
        tmp_path: Path) -> None:
    config = load_config(write(tmp_path, f"gmail: {{{OAUTH}}}\n"), make_plugin_manager(entry_points=False))
    (destination,) = config.accounts[0].destinations
    settings = destination.settings
    assert destination.kind == "gmail" and destination.label == f"gmail:me ({tmp_path / 'rt'})"
    assert settings.labels == ("INBOX", "UNREAD") and settings.create_labels
    assert settings.internal_date_source.api_name == "dateHeader"
    assert not settings.never_mark_spam and not settings.process_for_calendar
    assert settings.oauth2.scope == ("https://www.googleapis.com/auth/gmail.insert "
                                     "https://www.googleapis.com/auth/gmail.labels")
    assert settings.oauth2.token_url == "https://oauth2.googleapis.com/token"


def test_labels_dates_and_flags_are_read_and_system_labels_take_their_ids(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, f"""\
        gmail:
          {OAUTH}
          labels: [inbox, Old ISP, starred]
          create_labels: false
          internal_date_source: received_time
          never_mark_spam: true
          process_for_calendar: true
          rate_limit: 2.5
    """), make_plugin_manager(entry_points=False))
    settings = config.accounts[0].destinations[0].settings
    assert settings.labels == ("INBOX", "Old ISP", "STARRED") and settings.user_labels == ("Old ISP",)
    assert (settings.create_labels, settings.internal_date_source.api_name, settings.never_mark_spam,
            settings.process_for_calendar, settings.rate_limit) == (False, "receivedTime", True, True, 2.5)


@pytest.mark.parametrize(("options", "expected"), [
    ("{labels: [SENT]}", "deliver.gmail.labels: the system label SENT cannot be given"),
    ("{internal_date_source: dateHeader}", "deliver.gmail.internal_date_source: expected one of"),
    ("{rate_limit: 0}", "deliver.gmail.rate_limit: expected a number of imports a second"),
    ("{api_url: 'http://127.0.0.1:1'}", "deliver.gmail.api_url: expected an https:// URL"),
    ("{user: 'not an address'}", "deliver.gmail.user: expected me or the mailbox's address"),
    ("{labels: [INBOX], lables: [x]}", "deliver.gmail.lables: unknown key (did you mean 'labels'?)"),
])
def test_a_mistake_in_the_options_names_file_line_and_key(tmp_path: Path, options: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, f"gmail: {options[:-1]}, {OAUTH}}}\n"), make_plugin_manager(entry_points=False))
    assert expected in str(caught.value)


def test_a_gmail_destination_needs_oauth2_or_a_token_command(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, "gmail: {labels: [INBOX]}\n"), make_plugin_manager(entry_points=False))
    assert "give exactly one of oauth2" in str(caught.value) and "--destination gmail" in str(caught.value)


def test_check_shows_the_gmail_destination(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "gmail: {token_command: [/usr/local/bin/gmail-token], labels: [INBOX, Old]}\n")
    assert main(["-c", str(path), "check"]) == 0
    assert "-> gmail:me (/usr/local/bin/gmail-token)" in capsys.readouterr().out


def test_a_retry_after_is_read_as_seconds_or_a_date_and_an_upload_resumes_at_any_offset() -> None:
    assert retry_after("30") == 30.0 and retry_after("soon") is None and retry_after(None) is None
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past: now
    chunks = [b"abc", b"defg", b"hi"]
    for offset in range(10):
        assert b"".join(skip(chunks, offset)) == b"abcdefghi"[offset:]


# ================================================================== against the fake API


@dataclass
class Rig:
    tmp_path: Path
    dovecot: DovecotServer
    gmail: GmailAPIServer
    provider: FakeOAuthProvider

    @property
    def state_dir(self) -> Path:
        return self.tmp_path / "state"

    def configure(self, **gmail: Any) -> Path:
        options = {"api_url": self.gmail.base_url, "tls_ca_file": str(self.gmail_ca), "timeout": "10s",
                   "oauth2": {"client_id": CLIENT_ID, "client_secret_file": str(self.tmp_path / "client-secret"),
                              "token_url": self.provider.token_url, "refresh_token_file": str(self.refresh_file),
                              "ca_file": str(self.gmail_ca)}, **gmail}
        config = self.tmp_path / "postbote.yaml"
        config.write_text(yaml.safe_dump({
            "state_dir": str(self.state_dir), "log": {"level": "debug", "format": "json"},
            "accounts": [{"name": "old", "host": self.dovecot.host, "port": self.dovecot.pop3_port, "tls": "none",
                          "username": "alice", "password": self.dovecot.password("alice"), "timeout": "10s",
                          "deliver": {"gmail": options}}]}))
        config.chmod(0o600)
        return config

    gmail_ca: Path = Path()
    refresh_file: Path = Path()

    def poll(self, **gmail: Any) -> int:
        return main(["-c", str(self.configure(**gmail)), "poll"])

    def send(self, *messages: bytes) -> None:
        for data in messages:
            self.dovecot.deliver("alice", data)

    def on_source(self) -> int:
        return len(uidls(self.dovecot, "alice"))

    def records(self) -> dict[str, Any]:
        store = StateStore(self.state_dir, readonly=True)
        try:
            return dict(store.records("old"))
        finally:
            store.close()

    def subjects(self) -> list[str]:
        found = []
        for imported in self.gmail.imported:
            match = re.search(rb"^Subject: (.*?)\r?$", imported.data(), re.MULTILINE)
            found.append(match.group(1).decode() if match else "")
        return found


def valid_user(provider: FakeOAuthProvider, token: str) -> str | None:
    entry = provider.state.access_tokens.get(token)
    return entry[0] if entry is not None and entry[1] > time.time() else None


@pytest.fixture
def gmail(pki: TestPKI, provider: FakeOAuthProvider, tmp_path: Path) -> Iterator[GmailAPIServer]:
    with GmailAPIServer(pki.server_context(), tmp_path / "gmail", lambda token: valid_user(provider, token)) as server:
        yield server
    assert server.refused == [], "postbote sent requests the real API would refuse"


@pytest.fixture
def rig(tmp_path: Path, dovecot: DovecotServer, gmail: GmailAPIServer, provider: FakeOAuthProvider,
        pki: TestPKI) -> Rig:
    secret_file(tmp_path / "client-secret", CLIENT_SECRET)
    made = Rig(tmp_path, dovecot, gmail, provider)
    made.gmail_ca = pki.ca_file
    made.refresh_file = secret_file(tmp_path / "refresh-token", provider.issue_refresh_token("alice", CLIENT_ID))
    with gmail_plugin._LIMITS_LOCK:  # each test starts with the rate limits of a fresh process
        gmail_plugin._LIMITS.clear()
    return made


def test_messages_from_a_pop3_account_arrive_in_gmail_unchanged_in_the_inbox_unread_and_leave_the_source(
        rig: Rig) -> None:
    originals = [make_message(f"old mail {n}", b"caf\xc3\xa9 \xff 8-bit\n" * 3) for n in range(3)]
    rig.send(*originals)

    assert rig.poll() == 0

    assert rig.on_source() == 0
    imported = rig.gmail.imported
    assert [strip_trace_header(message.data()) for message in imported] == [to_crlf(data) for data in originals]
    assert all(message.label_ids == ["INBOX", "UNREAD"] for message in imported)
    assert all(message.upload_type == "multipart" for message in imported)
    assert imported[0].params == {"internalDateSource": "dateHeader", "neverMarkSpam": "false",
                                  "processForCalendar": "false"}
    records = rig.records()
    assert sorted(record.reason for record in records.values()) == \
        sorted(f"gmail: imported as message {message.id} (labels INBOX, UNREAD)" for message in imported)
    assert {record.status for record in records.values()} == {DELIVERED}


def test_a_message_is_deleted_from_the_source_only_after_gmail_answered_200(rig: Rig) -> None:
    on_source_when_answered: list[tuple[int, int]] = []
    rig.send(make_message("one"), make_message("two"))
    rig.gmail.after_answer = lambda entry: on_source_when_answered.append((entry.status, rig.dovecot.count("alice")))
    rig.gmail.faults.append(Fault("import", status=503, reason="backendError", retry_after="0"))

    assert rig.poll() == 1  # the first import got the 503: deferred; the poll stops for this mailbox

    assert wait_until(lambda: on_source_when_answered == [(503, 2)], what="the 503 noted")
    assert rig.on_source() == 2 and rig.gmail.imported == []
    assert rig.poll() == 0
    assert wait_until(lambda: len(on_source_when_answered) == 3, what="the 200s noted")
    assert on_source_when_answered[1:] == [(200, 2), (200, 2)]  # both still there when Gmail said 200
    assert rig.on_source() == 0 and sorted(rig.subjects()) == ["one", "two"]


def test_user_labels_are_looked_up_once_per_poll_and_created_on_first_use(rig: Rig) -> None:
    existing = rig.gmail.add_label("Old ISP")
    rig.send(make_message("a"), make_message("b"))

    assert rig.poll(labels=["old isp", "From vanity domain", "STARRED"]) == 0

    assert rig.gmail.requests("labels.list") == 1 and rig.gmail.requests("labels.create") == 1
    (created,) = [label_id for label_id, label in rig.gmail.labels.items() if label["name"] == "From vanity domain"]
    assert [message.label_ids for message in rig.gmail.imported] == [[existing, created, "STARRED"]] * 2
    assert rig.gmail.label_names(rig.gmail.imported[0]) == ["Old ISP", "From vanity domain", "STARRED"]


def test_a_label_another_client_created_first_is_used_after_gmails_409(
        rig: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    rig.gmail.race_label("Old ISP")
    rig.send(make_message("a"))

    assert rig.poll(labels=["Old ISP"]) == 0

    assert [label["name"] for label in rig.gmail.labels.values()].count("Old ISP") == 1
    assert rig.gmail.label_names(rig.gmail.imported[0]) == ["Old ISP"]
    assert '"event": "gmail.label_exists"' in capsys.readouterr().err


def test_a_label_gmail_says_exists_but_does_not_list_defers_the_messages_with_the_fix_and_asks_once(
        rig: Rig) -> None:
    """Gmail's 409 for a name that conflicts with something the label list does not show: the messages wait with a
    reason that says what to do; postbote asks once a poll, it does not loop."""
    rig.send(make_message("a"), make_message("b"))
    rig.gmail.faults.append(Fault("labels.create", status=409, reason="conflict",
                                  message="Label name exists or conflicts"))

    assert rig.poll(labels=["INBOX", "Old ISP"]) == 1

    assert rig.gmail.requests("labels.create") == 1 and rig.gmail.requests("labels.list") == 2  # the re-list
    assert rig.gmail.imported == [] and rig.on_source() == 2
    assert {record.status for record in rig.records().values()} == {DEFERRED}
    reasons = {record.reason for record in rig.records().values()}
    assert len(reasons) == 1
    reason = reasons.pop()
    assert "creating the label 'Old ISP'" in reason and "conflicts with an existing label" in reason
    assert "rename it in labels:" in reason

    assert rig.poll(labels=["INBOX", "Old ISP"]) == 0  # the conflict gone: created, and both arrive
    assert sorted(rig.subjects()) == ["a", "b"] and rig.on_source() == 0
    assert {tuple(rig.gmail.label_names(message)) for message in rig.gmail.imported} == {("INBOX", "Old ISP")}


def test_two_accounts_that_create_the_same_new_label_at_once_make_one_label_and_both_messages_carry_it(
        rig: Rig) -> None:
    """alice's and bob's old mailboxes into one Gmail mailbox, polled together: both list the labels before either
    creates "Old ISP" (the stand-in holds the lists until both arrived), one create wins, the other gets Gmail's 409
    and uses the winner's label."""
    rig.send(make_message("for alice"))
    rig.dovecot.deliver("bob", make_message("for bob"))
    config = rig.configure(labels=["INBOX", "Old ISP"])
    document = yaml.safe_load(config.read_text())
    alice = document["accounts"][0]
    bob = {**alice, "name": "bob-old", "username": "bob", "password": rig.dovecot.password("bob")}
    document["accounts"].append(bob)
    config.write_text(yaml.safe_dump(document))
    rig.gmail.hold("labels.list", 2)

    assert main(["-c", str(config), "poll"]) == 0

    assert rig.gmail.held_together("labels.list")  # the race happened: both listed before either created
    assert rig.gmail.requests("labels.create") == 2  # one made it, the other was told 409
    (label_id,) = [key for key, label in rig.gmail.labels.items() if label["name"] == "Old ISP"]
    assert sorted(rig.subjects()) == ["for alice", "for bob"]
    assert [message.label_ids for message in rig.gmail.imported] == [["INBOX", label_id]] * 2
    assert rig.on_source() == 0 and uidls(rig.dovecot, "bob") == []


def test_without_create_labels_a_missing_label_defers_the_poll_with_the_fix(rig: Rig) -> None:
    rig.send(make_message("a"), make_message("b"))

    assert rig.poll(labels=["INBOX", "Old ISP"], create_labels=False) == 1

    assert rig.on_source() == 2 and rig.gmail.imported == [] and rig.gmail.requests("labels.create") == 0
    reasons = {record.reason for record in rig.records().values()}
    assert len(reasons) == 1 and "create it in Gmail, or set create_labels: true" in reasons.pop()


def test_no_inbox_label_archives_and_the_date_spam_and_calendar_options_reach_the_api(rig: Rig) -> None:
    rig.send(make_message("a"))

    assert rig.poll(labels=[], internal_date_source="received_time", never_mark_spam=True,
                    process_for_calendar=True) == 0

    (imported,) = rig.gmail.imported
    assert imported.label_ids == []
    assert imported.params == {"internalDateSource": "receivedTime", "neverMarkSpam": "true",
                               "processForCalendar": "true"}


def test_a_40_mb_message_goes_by_resumable_upload_and_arrives_unchanged(rig: Rig) -> None:
    line = b"x" * 998 + b"\n"
    big = make_message("big", line * (40 * 1024 * 1024 // len(line)))
    small = make_message("small")
    rig.send(big, small)

    assert rig.poll() == 0

    by_subject = dict(zip(rig.subjects(), rig.gmail.imported, strict=True))
    assert by_subject["big"].upload_type == "resumable" and by_subject["small"].upload_type == "multipart"
    assert by_subject["big"].path.stat().st_size > 40 * 1024 * 1024 > MULTIPART_LIMIT
    assert strip_trace_header(by_subject["big"].data()) == to_crlf(big)
    assert by_subject["big"].label_ids == ["INBOX", "UNREAD"]


def test_a_503_in_the_middle_of_an_upload_is_resumed_where_it_stopped(rig: Rig) -> None:
    big = make_message("big", b"y" * 79 + b"\n" * 1 + (b"z" * 79 + b"\n") * 100_000)
    rig.send(big)
    rig.gmail.faults.append(Fault("upload", status=503, after_bytes=3 * 1024 * 1024))

    assert rig.poll() == 0

    (imported,) = rig.gmail.imported
    assert strip_trace_header(imported.data()) == to_crlf(big)
    assert rig.gmail.requests("upload") == 3  # the PUT cut at 3 MB, "how much arrived?", the rest
    assert rig.on_source() == 0


def test_a_429_storm_defers_the_poll_at_the_first_429_and_gmail_is_not_asked_again_before_retry_after(
        rig: Rig) -> None:
    rig.send(*(make_message(f"m{n}") for n in range(4)))
    rig.gmail.faults.append(Fault("import", status=429, reason="rateLimitExceeded", retry_after="3600",
                                  message="Too many concurrent requests for user", times=10))

    assert rig.poll() == 1
    assert rig.gmail.requests("import") == 1  # one 429, then the rest deferred without asking
    reasons = {record.reason for record in rig.records().values()}
    assert all("429" in reason and "3600 s" in reason for reason in reasons), reasons
    assert {record.status for record in rig.records().values()} == {DEFERRED}

    assert rig.poll() == 1  # the same process, within Retry-After: no request at all
    assert rig.gmail.requests("import") == 1 and rig.on_source() == 4


def test_after_a_429_storm_with_short_retry_after_every_message_arrives_once(rig: Rig) -> None:
    rig.send(*(make_message(f"m{n}") for n in range(4)))
    rig.gmail.faults.append(Fault("import", status=429, reason="rateLimitExceeded", retry_after="0", times=3))

    statuses = [rig.poll() for _ in range(4)]

    assert statuses == [1, 1, 1, 0] and rig.gmail.requests("import") == 7
    assert sorted(rig.subjects()) == ["m0", "m1", "m2", "m3"] and rig.on_source() == 0


def test_a_403_rate_limit_is_temporary_and_a_missing_scope_is_an_account_error_with_the_fix(rig: Rig) -> None:
    rig.send(make_message("a"), make_message("b"))
    rig.gmail.faults.append(Fault("import", status=403, reason="userRateLimitExceeded", retry_after="0",
                                  message="User-rate limit exceeded"))
    assert rig.poll() == 1
    assert {record.status for record in rig.records().values()} == {DEFERRED}

    rig.gmail.granted_scopes = frozenset({"https://www.googleapis.com/auth/gmail.readonly"})
    assert rig.poll(labels=["INBOX"]) == 1
    reasons = {record.reason for record in rig.records().values()}
    assert len(reasons) == 1
    reason = reasons.pop()
    assert "insufficientPermissions" in reason and "gmail.insert and gmail.labels" in reason
    assert "run: postbote auth old --destination gmail" in reason
    assert rig.on_source() == 2


def test_a_message_gmail_refuses_is_rejected_with_the_apis_text_and_stays_on_the_source(rig: Rig) -> None:
    rig.send(make_message("refused"), make_message("fine"))
    rig.gmail.faults.append(Fault("import", status=400, reason="invalidArgument",
                                  message="Invalid RFC 5322 message: header too long"))

    assert rig.poll() == 1

    assert rig.subjects() == ["fine"] and rig.on_source() == 1
    (rejected,) = [record for record in rig.records().values() if record.status == REJECTED]
    assert "HTTP 400 (invalidArgument: Invalid RFC 5322 message: header too long)" in rejected.reason


def test_an_expired_access_token_is_refreshed_once_and_the_import_goes_through(rig: Rig) -> None:
    rig.send(make_message("a"))
    assert rig.poll() == 0
    refreshes = rig.provider.state.refresh_count
    rig.provider.revoke_access_tokens()  # the cached token expires early: Gmail answers 401
    rig.send(make_message("b"))

    assert rig.poll() == 0

    assert rig.provider.state.refresh_count == refreshes + 1 and rig.subjects() == ["a", "b"]


def test_a_revoked_refresh_token_defers_the_poll_and_says_to_run_postbote_auth_for_the_destination(
        rig: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    rig.send(make_message("a"), make_message("b"))
    rig.provider.revoke_refresh_tokens()

    assert rig.poll() == 1

    assert rig.on_source() == 2 and rig.gmail.imported == []
    reasons = {record.reason for record in rig.records().values()}
    assert len(reasons) == 1
    reason = reasons.pop()
    assert "refresh token was refused" in reason and "run: postbote auth old --destination gmail" in reason
    assert "old.gmail-me" not in reason
    assert rig.refresh_file.read_text().strip() not in capsys.readouterr().err


def test_a_401_after_a_fresh_token_defers_with_the_auth_hint(rig: Rig) -> None:
    rig.send(make_message("a"))
    rig.gmail.token_user = lambda token: None  # Gmail refuses every token (the grant was withdrawn)

    assert rig.poll() == 1

    (record,) = rig.records().values()
    assert "HTTP 401" in record.reason and "run: postbote auth old --destination gmail" in record.reason


def test_the_rate_limit_defers_the_rest_of_the_poll_instead_of_waiting(rig: Rig) -> None:
    rig.send(*(make_message(f"m{n}") for n in range(3)))

    assert rig.poll(rate_limit=0.01) == 1  # one import, then the next token is 100 s away

    assert rig.subjects() == ["m0"] and rig.on_source() == 2
    deferred = [record for record in rig.records().values() if record.status == DEFERRED]
    assert len(deferred) == 2 and all("rate_limit" in record.reason for record in deferred)


# ---- the limits outlive the process: a systemd timer starts a new `postbote poll` every few minutes


class MovableClock:
    """The plugin's wall clock, which a test moves forward instead of waiting (the next timer run, hours later)."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def __call__(self) -> float:
        return time.time() + self.ahead


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> MovableClock:
    moved = MovableClock()
    monkeypatch.setattr(gmail_plugin, "wall_clock", moved)
    return moved


def new_process() -> None:
    """What the next `postbote poll` process starts with: nothing in memory about the mailbox's limits."""
    with gmail_plugin._LIMITS_LOCK:
        gmail_plugin._LIMITS.clear()


def quiet_files(rig: Rig) -> list[Path]:
    directory = rig.state_dir / "gmail"
    return sorted(directory.iterdir()) if directory.exists() else []


def test_a_retry_after_is_kept_so_the_next_timer_started_poll_asks_gmail_nothing_until_it_has_passed(
        rig: Rig, clock: MovableClock) -> None:
    rig.send(make_message("a"), make_message("b"))
    rig.gmail.faults.append(Fault("import", status=429, reason="rateLimitExceeded", retry_after="600",
                                  message="Too many concurrent requests for user"))
    config = rig.configure()

    first = run_postbote(config, "poll")  # a process of its own, as the timer starts it
    assert first.status == 1, first.output
    assert rig.gmail.requests("import") == 1
    requests = len(rig.gmail.log)

    second = run_postbote(config, "poll")  # started at once, another process: Gmail gets no request
    assert second.status == 1, second.output
    assert len(rig.gmail.log) == requests and rig.on_source() == 2
    reasons = {record.reason for record in rig.records().values()}
    assert all("429" in reason and "Gmail is left alone for another" in reason for reason in reasons), reasons
    (kept,) = quiet_files(rig)  # one file for the mailbox, no temporary one left behind
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert 590 < json.loads(kept.read_text())["quiet_until"] - time.time() <= 600

    clock.ahead = 601.0  # ten minutes later: the next run imports
    new_process()
    assert rig.poll() == 0
    assert sorted(rig.subjects()) == ["a", "b"] and rig.on_source() == 0


@pytest.mark.parametrize("kept", ["{not json", '{"quiet_until": "tomorrow"}', "\xff\xfe", "past"])
def test_a_kept_quiet_time_that_cannot_be_read_or_has_passed_is_ignored(rig: Rig, kept: str) -> None:
    rig.send(make_message("a"))
    rig.gmail.faults.append(Fault("import", status=429, reason="rateLimitExceeded", retry_after="3600"))
    assert rig.poll() == 1
    (path,) = quiet_files(rig)
    path.write_text(json.dumps({"quiet_until": time.time() - 5, "reason": "old"}) if kept == "past" else kept,
                    encoding="latin-1")

    new_process()
    assert rig.poll() == 0

    assert rig.subjects() == ["a"] and rig.gmail.requests("import") == 2


@pytest.mark.parametrize(("now", "reset"), [
    ("2026-12-07T12:00:00+00:00", "2026-12-08T08:05:00+00:00"),  # winter (PST): midnight is 08:00 UTC
    ("2026-07-01T06:30:00+00:00", "2026-07-01T07:05:00+00:00"),  # summer (PDT), 23:30 in California
    ("2026-03-08T09:00:00+00:00", "2026-03-09T07:05:00+00:00"),  # the day summer time starts: a 23-hour day
])
def test_the_daily_quota_is_taken_to_reset_just_after_midnight_us_pacific_time(now: str, reset: str) -> None:
    assert gmail_plugin.next_quota_reset(datetime.fromisoformat(now).timestamp()) == \
        datetime.fromisoformat(reset).timestamp()


def test_without_the_time_zone_database_the_daily_quota_is_tried_again_after_an_hour(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gmail_plugin, "QUOTA_TIMEZONE", "Nowhere/Atlantis")
    assert gmail_plugin.next_quota_reset(1_000_000.0) == 1_000_000.0 + 3600


def test_the_daily_limit_leaves_the_mailbox_alone_until_the_quota_resets_even_across_processes(
        rig: Rig, clock: MovableClock) -> None:
    rig.send(make_message("a"), make_message("b"))
    rig.gmail.faults.append(Fault("import", status=403, reason="dailyLimitExceeded", message="Daily Limit Exceeded"))

    assert rig.poll() == 1

    (kept,) = quiet_files(rig)
    reset = json.loads(kept.read_text())["quiet_until"]
    pacific = datetime.fromtimestamp(reset - gmail_plugin.QUOTA_RESET_MARGIN, ZoneInfo("America/Los_Angeles"))
    assert pacific.time() == time_of_day(0) and 0 < reset - time.time() <= 25 * 3600 + 300
    reasons = {record.reason for record in rig.records().values()}
    assert all("daily quota" in reason and "midnight US Pacific time" in reason for reason in reasons), reasons

    clock.ahead = reset - time.time() - 60  # a minute before the reset, a new process: still no request
    new_process()
    assert rig.poll() == 1 and rig.gmail.requests("import") == 1

    clock.ahead = reset - time.time() + 1
    new_process()
    assert rig.poll() == 0
    assert sorted(rig.subjects()) == ["a", "b"] and rig.on_source() == 0


def test_an_answer_lost_after_gmail_stored_the_message_leaves_it_in_doubt_and_it_comes_once_more(
        rig: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    rig.send(make_message("a"), make_message("b"))
    rig.gmail.faults.append(Fault("import", store=True, drop=True))

    assert rig.poll() == 1
    assert rig.subjects() == ["a", "b"] and rig.on_source() == 1
    assert "it may have arrived" in capsys.readouterr().err

    assert rig.poll() == 0
    assert "message.delivering_again" in capsys.readouterr().err

    assert sorted(rig.subjects()) == ["a", "a", "b"]  # the one duplicate an answer lost costs
    assert rig.on_source() == 0


def test_without_pipelining_every_import_is_answered_before_the_next_message_is_fetched(rig: Rig) -> None:
    rig.send(*(make_message(f"m{n}") for n in range(3)))

    assert rig.poll(pipeline=False) == 0

    assert sorted(rig.subjects()) == ["m0", "m1", "m2"] and rig.on_source() == 0


# ================================================================== postbote auth


def signs_in_for_gmail(provider: FakeOAuthProvider) -> Any:
    """Plays the user's browser: the authorization asks for the import scopes only, and 'signs in'."""
    import urllib.parse
    import urllib.request

    def open_url(url: str) -> None:
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
        assert query["scope"] == ("https://www.googleapis.com/auth/gmail.insert "
                                  "https://www.googleapis.com/auth/gmail.labels")
        assert query["access_type"] == "offline" and query["client_id"] == CLIENT_ID
        code = provider.issue_code("alice", CLIENT_ID, query["redirect_uri"], query["code_challenge"])
        params = urllib.parse.urlencode({"code": code, "state": query["state"]})
        urllib.request.urlopen(f"{query['redirect_uri']}?{params}", timeout=5).read()

    return open_url


def test_postbote_auth_destination_gmail_asks_for_the_import_scopes_and_caches_the_token_apart(
        rig: Rig, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from postbote.plugins.signin import oauth2, oauth2_settings

    # The Google preset, with its endpoints on the fake provider: what a user's config says
    preset = oauth2_settings.PRESETS["google"]
    monkeypatch.setitem(oauth2_settings.PRESETS, "google", oauth2_settings.Preset(
        token_url=rig.provider.token_url, scope=preset.scope, device_url=None,
        authorize_url="https://127.0.0.1:1/authorize", authorize_params=preset.authorize_params,
        needs_client_secret=True))
    monkeypatch.setattr(oauth2, "_open_browser", signs_in_for_gmail(rig.provider))
    rig.refresh_file.unlink()
    config = rig.configure(oauth2={"provider": "google", "client_id": CLIENT_ID,
                                   "client_secret_file": str(rig.tmp_path / "client-secret"),
                                   "refresh_token_file": str(rig.refresh_file), "ca_file": str(rig.gmail_ca)})
    rig.send(make_message("a"))

    assert main(["-c", str(config), "auth", "old", "--destination", "gmail", "--flow", "loopback"]) == 0
    assert "Authorized. The refresh token is stored in" in capsys.readouterr().out
    assert rig.refresh_file.stat().st_mode & 0o777 == 0o600
    assert [path.name for path in (rig.state_dir / "oauth2").iterdir()] == ["old.gmail-me.json"]

    assert main(["-c", str(config), "poll"]) == 0
    assert rig.subjects() == ["a"]


def test_postbote_auth_runs_the_gmail_destinations_only_when_asked_or_when_the_source_needs_none(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from postbote.plugins.signin import authorize as signin_authorize

    oauth = {"provider": "google", "client_id": "c", "client_secret_file": "cs", "refresh_token_file": "rt"}
    config = tmp_path / "postbote.yaml"
    config.write_text(yaml.safe_dump({"accounts": [
        {"name": "both", "host": "pop.gmail.com", "username": "me", "auth": "xoauth2", "oauth2": oauth,
         "deliver": {"gmail": {"oauth2": oauth}}},
        {"name": "destination-only", "host": "pop.example.org", "username": "me", "password": "pw",
         "deliver": {"gmail": {"oauth2": oauth}}}]}))
    config.chmod(0o600)
    both, destination_only = load_config(config, make_plugin_manager(entry_points=False)).accounts
    flows: list[tuple[str, str]] = []
    monkeypatch.setattr(signin_authorize, "run_auth",
                        lambda oauth, out, *, account, **_: flows.append((account, oauth.scope)) or 0)

    def answer(account: Any, destination: str | None = None) -> Any:
        return gmail_plugin.authorize(account=account, state_dir=tmp_path, out=io.StringIO(), flow="loopback",
                                      open_browser=False, destination=destination)

    assert answer(both) is None  # the source's own authorization comes first
    assert answer(destination_only) == 0 and answer(both, "gmail") == 0 and answer(both, "imap") is None
    assert [name for name, _ in flows] == ["destination-only.gmail-me", "both.gmail-me"]
    assert all("gmail.insert" in scope and "mail.google.com" not in scope for _, scope in flows)


def test_two_gmail_destinations_of_one_account_each_get_every_message(
        rig: Rig, pki: TestPKI, tmp_path: Path) -> None:
    """Each has its own session and token, even with token files of the same name (the model test's finding: two
    destinations that differed only in their endpoint shared one session, and one mailbox got both copies)."""
    (tmp_path / "second").mkdir()
    second_token = secret_file(tmp_path / "second" / rig.refresh_file.name,
                               rig.provider.issue_refresh_token("alice", CLIENT_ID))
    rig.send(make_message("a"), make_message("b"))
    with GmailAPIServer(pki.server_context(), tmp_path / "gmail2",
                        lambda token: valid_user(rig.provider, token)) as other:
        config = rig.configure()
        document = yaml.safe_load(config.read_text())
        first = document["accounts"][0]["deliver"]["gmail"]
        second = {**first, "api_url": other.base_url,
                  "oauth2": {**first["oauth2"], "refresh_token_file": str(second_token)}}
        document["accounts"][0]["deliver"] = [{"gmail": first}, {"gmail": second}]
        config.write_text(yaml.safe_dump(document))

        assert main(["-c", str(config), "poll"]) == 0

        assert sorted(rig.subjects()) == ["a", "b"] and len(other.imported) == 2
        assert other.refused == []
    assert rig.on_source() == 0


def test_a_workspace_service_account_imports_into_the_users_mailbox_by_address_with_a_token_command(
        rig: Rig, tmp_path: Path) -> None:
    """docs/gmail.md's Google Workspace path: ``user: ADDRESS`` and a ``token_command`` that trades a service
    account's key for a token of that user (domain-wide delegation). Every request names the address, the program
    runs without a shell (an argument with a space arrives whole), and a withdrawn delegation says what to check."""
    address = "alice@example.com"
    key = tmp_path / "service account.json"
    key.write_text("sa-key-1\n")
    calls = tmp_path / "token-calls"
    program = tmp_path / "workspace-token"
    program.write_text(f"#!{sys.executable}\n" + textwrap.dedent(f"""\
        import pathlib, sys
        args = sys.argv[1:]
        key = pathlib.Path(args[args.index("--key") + 1]).read_text().strip()
        with open({str(calls)!r}, "a") as log:
            log.write(repr(args) + "\\n")
        print(f"ya29.{{key}}.{{args[args.index('--sub') + 1]}}")
    """))
    program.chmod(0o755)
    delegated = {f"ya29.sa-key-1.{address}"}
    rig.gmail.address = address
    rig.gmail.token_user = lambda token: address if token in delegated else None
    config = rig.configure(user=address, labels=["INBOX", "UNREAD", "Old ISP"],
                           token_command=[str(program), "--key", str(key), "--sub", address])
    document = yaml.safe_load(config.read_text())
    del document["accounts"][0]["deliver"]["gmail"]["oauth2"]
    config.write_text(yaml.safe_dump(document))
    rig.send(make_message("a"), make_message("b"))

    assert main(["-c", str(config), "poll"]) == 0

    assert sorted(rig.subjects()) == ["a", "b"] and rig.on_source() == 0
    assert {entry.user_id for entry in rig.gmail.log} == {address}  # never "me"
    assert {tuple(rig.gmail.label_names(message)) for message in rig.gmail.imported} == {("INBOX", "UNREAD", "Old ISP")}
    runs = calls.read_text().splitlines()
    assert runs and set(runs) == {repr(["--key", str(key), "--sub", address])}
    assert not (rig.state_dir / "oauth2").exists() or not any((rig.state_dir / "oauth2").iterdir())

    delegated.clear()  # the admin withdrew the delegation: Gmail refuses the tokens
    rig.send(make_message("c"))
    assert main(["-c", str(config), "poll"]) == 1
    (record,) = [record for record in rig.records().values() if record.status == DEFERRED]
    assert "HTTP 401" in record.reason and f"check token_command ({program})" in record.reason
    assert "domain-wide delegation" in record.reason and "postbote auth" not in record.reason
    assert rig.on_source() == 1


def test_a_connection_broken_before_the_message_went_out_never_counts_as_a_possible_copy(
        rig: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    """Two polls whose label lookup (or upload session) broke would hold the message for the admin if they counted
    as deliveries in doubt; they are plain deferrals, and the third poll delivers."""
    line = b"w" * 79 + b"\n"
    rig.send(make_message("a"), make_message("big", line * (6 * 1024 * 1024 // len(line))))
    rig.gmail.faults += [Fault("labels.list", drop=True), Fault("labels.list", drop=True), Fault("open", drop=True)]

    assert rig.poll(labels=["INBOX", "Old ISP"]) == 1  # the label lookup broke, for each message
    assert rig.poll(labels=["INBOX", "Old ISP"]) == 1  # "a" arrives; the big one's upload session broke
    assert len(rig.gmail.fired) == 3
    assert rig.poll(labels=["INBOX", "Old ISP"]) == 0  # not held for the admin: the big one arrives

    assert sorted(rig.subjects()) == ["a", "big"] and rig.on_source() == 0
    err = capsys.readouterr().err
    assert "may have arrived" not in err
    assert not any(token in err for token in rig.provider.state.issued)  # no token in any log line


def test_an_api_whose_certificate_cannot_be_verified_gets_no_request_and_the_poll_defers_with_the_reason(
        rig: Rig) -> None:
    rig.send(make_message("a"), make_message("b"))

    assert rig.poll(tls_ca_file=None) == 1  # the system's CAs do not know the test CA

    assert rig.gmail.log == [] and rig.on_source() == 2
    reasons = {record.reason for record in rig.records().values()}
    assert len(reasons) == 1 and "certificate verify failed" in reasons.pop()


def test_an_imap_account_goes_into_gmail_with_a_label_of_its_own_and_its_folder_is_emptied(rig: Rig) -> None:
    originals = [make_message(f"imap {n}") for n in range(2)]
    rig.send(*originals)
    config = rig.configure(labels=["INBOX", "UNREAD", "University"])
    document = yaml.safe_load(config.read_text())
    document["accounts"][0].update({"protocol": "imap", "port": rig.dovecot.imap_port, "folders": ["INBOX"]})
    config.write_text(yaml.safe_dump(document))

    assert main(["-c", str(config), "poll"]) == 0

    assert sorted(strip_trace_header(message.data()) for message in rig.gmail.imported) == \
        sorted(to_crlf(data) for data in originals)
    assert {tuple(rig.gmail.label_names(message)) for message in rig.gmail.imported} == \
        {("INBOX", "UNREAD", "University")}
    assert rig.dovecot.count("alice") == 0
