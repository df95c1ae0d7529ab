"""The built-in ``notify`` plugin (issue 15, "Notifications"): an account failing N polls in a row, mail waiting
too long, a message rejected for good, and the recovery -- sent once per condition by email (a real SMTP sink),
webhook, ntfy or Gotify (a local HTTP server), after the poll, bounded by a timeout, without secrets or bodies.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Iterator
from email import message_from_bytes
from email.policy import default as default_policy
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
import structlog
from postbote import ConfigError, LoginRefused
from postbote.cli import main
from postbote.config import load_config
from postbote.pluginmanager import make_plugin_manager
from postbote.testing import FakeMailbox, FakeSource, poll_once
from postbote.testing.https import StandInHTTPServer
from postbote.testing.pop3server import Action, Faults, POP3Server

from tests.harness import DaemonRun, account, fake_account, fake_mailbox, make_message, write_config
from tests.servers import free_port
from tests.servers.certs import TestPKI
from tests.servers.smtp_relay import SMTPRelay
from tests.servers.smtp_sink import SMTPSink

pytestmark = pytest.mark.usefixtures("time_limit")


class Hook:
    """A local HTTP server recording every POST: ``mode`` ``ok`` answers 200, ``fail`` 500, ``hang`` nothing until
    the test ends."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.posts: list[tuple[str, dict[str, str], bytes]] = []
        self.mode = "ok"
        self.release = threading.Event()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hook.posts.append((self.path, dict(self.headers.items()), body))
                if hook.mode == "hang":
                    hook.release.wait(30)
                    return
                if hook.mode == "redirect":
                    self.send_response(307)
                    self.send_header("Location", "/elsewhere")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                code = 500 if hook.mode == "fail" else 200
                self.send_response(code)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server's signature
                pass

        self.server = StandInHTTPServer(("127.0.0.1", 0), Handler, tls)
        self.url = self.server.base_url
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(body) for path, _, body in self.posts if path == "/hook"]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook() -> Iterator[Hook]:
    server = Hook()
    yield server
    server.close()


def setup(tmp_path: Path, options: dict[str, Any], **account_keys: Any) -> tuple[Path, FakeSource, FakeMailbox]:
    """A config with the account ``alice`` served by a `FakeSource` and ``notify`` enabled with ``options``."""
    source, mailbox = fake_mailbox([], account="alice")
    path = write_config(tmp_path / "postbote.yaml", [fake_account("alice", tmp_path / "Maildir", **account_keys)],
                        plugins={"notify": options})
    return path, source, mailbox


def poll(path: Path, source: FakeSource) -> Any:
    """One poll as ``postbote poll`` runs it: the plugins configured before and unconfigured after (a restart)."""
    return poll_once(path, plugins=[source], start_plugins=True)


def letter(subject: str, body: bytes = b"Hello.\n", *, sender: str = "Sender <sender@example.net>",
           message_id: str = "<m1@example.net>") -> bytes:
    return (f"From: {sender}\nTo: alice@example.org\nSubject: {subject}\nMessage-ID: {message_id}\n\n".encode()
            + body)


def notifications(sink: SMTPSink) -> list[Any]:
    return [message_from_bytes(delivery.data, policy=default_policy) for delivery in sink.messages]


def test_notify_is_an_optional_built_in_listed_by_postbote_plugins(tmp_path: Path, capsys: Any) -> None:
    path = write_config(tmp_path / "postbote.yaml", [account("alice", None, tmp_path / "Maildir")])
    assert main(["-c", str(path), "plugins"]) == 0
    out = capsys.readouterr().out
    assert "notify  [built-in: postbote.plugins.notify]\n    enabled: off" in out


def test_failing_polls_notify_once_and_the_recovery_once(tmp_path: Path, hook: Hook, smtp_sink: SMTPSink) -> None:
    path, source, mailbox = setup(tmp_path, {
        "after_failures": 3, "webhook": {"url": f"{hook.url}/hook"},
        "email": {"to": ["ops@example.org"], "from": "postbote@example.org",
                  "smtp": {"host": "127.0.0.1", "port": smtp_sink.port}}})
    mailbox.open_error = LoginRefused("-ERR [AUTH] authentication failed")
    for _ in range(2):
        assert not poll(path, source).ok
    assert hook.events() == [] and smtp_sink.messages == []  # not yet: two failures are not three

    for _ in range(3):  # the third failure notifies; the fourth and fifth do not repeat it
        assert not poll(path, source).ok
    (failing,) = hook.events()
    assert failing["event"] == "account.failing" and failing["account"] == "alice"
    assert failing["count"] == 3 and failing["error_type"] == "LoginRefused"
    assert "authentication failed" in failing["reason"] and failing["since"].endswith("Z")
    (mail,) = notifications(smtp_sink)
    assert mail["Subject"] == "[postbote] alice: 3 polls in a row failed (login refused)"
    assert mail["Auto-Submitted"] == "auto-generated" and mail["To"] == "ops@example.org"
    assert smtp_sink.messages[0].rcpt_tos == ["ops@example.org"]
    memory = tmp_path / "state" / "notify.sqlite3"  # each poll() is a fresh start: the memory is on disk
    assert memory.stat().st_mode & 0o777 == 0o600

    mailbox.open_error = None
    mailbox.add(make_message("after the outage"))
    for _ in range(2):  # the first good poll tells of the recovery, the next says nothing
        assert poll(path, source).ok
    assert [event["event"] for event in hook.events()] == ["account.failing", "account.recovered"]
    recovered = hook.events()[1]
    assert (recovered["cleared"], recovered["count"], recovered["since"]) == ("account.failing", 5, failing["since"])
    assert len(smtp_sink.messages) == 2

    mailbox.open_error = LoginRefused("-ERR [AUTH] authentication failed")
    for _ in range(3):  # a new streak counts from one again
        poll(path, source)
    assert [event["event"] for event in hook.events()][-1] == "account.failing"
    assert hook.events()[-1]["count"] == 3


def test_a_permanent_rejection_notifies_with_the_reason_and_no_body(tmp_path: Path, hook: Hook,
                                                                    smtp_sink_factory: Any) -> None:
    destination, relay = smtp_sink_factory(), smtp_sink_factory()
    destination.respond_with("554 5.7.1 policy says no")
    path, source, mailbox = setup(
        tmp_path, {"webhook": {"url": f"{hook.url}/hook"},
                   "email": {"to": ["ops@example.org"], "smtp": {"host": "127.0.0.1", "port": relay.port}}},
        deliver={"smtp": {"host": "127.0.0.1", "port": destination.port, "recipients": ["me@example.org"]}})
    mailbox.add(letter("Quarterly =?utf-8?q?n=C3=BCmbers?=", b"the body must never leak\n",
                       sender="Boss <boss@example.org>", message_id="<q4@example.org>"))

    stats = poll(path, source)
    assert (stats.ok, stats.rejected) == (True, 1)
    (event,) = hook.events()
    assert event["event"] == "message.rejected" and event["count"] == 1
    assert "554 5.7.1 policy says no" in event["reason"]
    (shown,) = event["messages"]
    assert shown["subject"] == "Quarterly nümbers" and shown["message_id"] == "<q4@example.org>"
    assert shown["from"] == "Boss <boss@example.org>"
    (mail,) = notifications(relay)
    text = mail.get_content()
    assert mail["Subject"] == "[postbote] alice: 1 message rejected"
    assert "554 5.7.1 policy says no" in text and "until `postbote retry alice`" in text
    assert "subject: Quarterly nümbers" in text and '"message_id": "<q4@example.org>"' in text
    assert b"never leak" not in hook.posts[0][2] and "never leak" not in text

    poll(path, source)  # the message stays rejected on the server: told once
    assert len(hook.events()) == 1 and len(relay.messages) == 1


def test_rejections_of_one_poll_go_out_together_after_the_poll(tmp_path: Path, hook: Hook) -> None:
    mda = tmp_path / "mda"
    mda.write_text("#!/bin/sh\ncat >/dev/null\nexit 1\n")
    mda.chmod(0o755)
    path, source, mailbox = setup(tmp_path, {"webhook": {"url": f"{hook.url}/hook"}}, deliver={"mda": [str(mda)]})
    for n in range(12):
        mailbox.add(letter(f"number {n}", message_id=f"<{n}@example.net>"))
    with structlog.testing.capture_logs() as logs:
        stats = poll(path, source)
    assert stats.rejected == 12
    (event,) = hook.events()
    assert event["count"] == 12 and len(event["messages"]) == 10  # the first ten named, all counted
    assert [m["message_id"] for m in event["messages"]] == [f"<{n}@example.net>" for n in range(10)]
    order = [entry["event"] for entry in logs if entry["event"] in ("message.rejected", "poll.finished",
                                                                   "notify.sent")]
    assert order == ["message.rejected"] * 12 + ["poll.finished", "notify.sent"]


def test_details_name_only_what_the_config_allows(tmp_path: Path, hook: Hook, smtp_sink: SMTPSink) -> None:
    smtp_sink.respond_with("550 5.1.1 no such user")
    path, source, mailbox = setup(
        tmp_path, {"details": ["message_id"], "webhook": {"url": f"{hook.url}/hook"}},
        deliver={"smtp": {"host": "127.0.0.1", "port": smtp_sink.port, "recipients": ["me@example.org"]}})
    mailbox.add(letter("private subject", sender="someone@example.org", message_id="<x@y>"))
    poll(path, source)
    (shown,) = hook.events()[0]["messages"]
    assert set(shown) == {"uid", "message_id", "reason"}
    assert b"private subject" not in hook.posts[0][2] and b"someone@" not in hook.posts[0][2]


def test_stale_mail_notifies_once_and_its_clearing_once(tmp_path: Path, hook: Hook) -> None:
    mda = tmp_path / "mda"
    mda.write_text("#!/bin/sh\ncat >/dev/null\nexit 75\n")  # temporary failure: the message waits
    mda.chmod(0o755)
    path, source, mailbox = setup(tmp_path, {"stale_after": "0.3s", "webhook": {"url": f"{hook.url}/hook"}},
                                  deliver={"mda": [str(mda)]})
    mailbox.add(letter("held up", message_id="<held@example.org>"))

    assert poll(path, source).deferred == 1
    assert hook.events() == []  # waiting, but not for long yet
    time.sleep(0.4)
    poll(path, source)
    poll(path, source)
    (stale,) = hook.events()
    assert stale["event"] == "mail.stale" and stale["count"] == 1 and stale["waiting"] == 1
    assert stale["stale_after"] == 0.3 and stale["messages"][0]["message_id"] == "<held@example.org>"
    assert "exit" in stale["reason"] or "75" in stale["reason"]

    mda.write_text("#!/bin/sh\ncat >/dev/null\nexit 0\n")
    poll(path, source)
    poll(path, source)
    assert [event["event"] for event in hook.events()] == ["mail.stale", "account.recovered"]
    assert hook.events()[1]["cleared"] == "mail.stale"


@pytest.mark.parametrize("mode", ["hang", "fail"])
def test_a_broken_webhook_costs_the_poll_at_most_its_timeout(tmp_path: Path, hook: Hook, mode: str,
                                                             smtp_sink: SMTPSink) -> None:
    hook.mode = mode
    path, source, mailbox = setup(tmp_path, {
        "after_failures": 1, "timeout": "1s", "webhook": {"url": f"{hook.url}/hook"},
        "email": {"to": ["ops@example.org"], "smtp": {"host": "127.0.0.1", "port": smtp_sink.port}}})
    mailbox.open_error = LoginRefused("-ERR nope")
    with structlog.testing.capture_logs() as logs:
        started = time.monotonic()
        stats = poll(path, source)
        took = time.monotonic() - started
    assert not stats.ok and took < 2.5
    failed = [entry for entry in logs if entry["event"] == "notify.failed"]
    assert len(failed) == 1 and failed[0]["channel"] == f"webhook {hook.url}/…"  # no path: it may be the secret
    assert len(smtp_sink.messages) == 1  # the other channel still got it


def test_a_notification_no_channel_took_is_tried_again_after_the_next_poll(tmp_path: Path, hook: Hook) -> None:
    hook.mode = "fail"
    path, source, mailbox = setup(tmp_path, {"after_failures": 1, "webhook": {"url": f"{hook.url}/hook"}})
    mailbox.open_error = LoginRefused("-ERR nope")
    poll(path, source)
    hook.mode = "ok"
    poll(path, source)
    poll(path, source)
    assert [event["count"] for event in hook.events()] == [1, 2]  # the failed attempt, then the one that arrived


def test_a_rejection_no_channel_took_is_told_after_the_next_poll(tmp_path: Path, hook: Hook) -> None:
    """The rejected message is not fetched again, so the notification comes from the state store's record."""
    hook.mode = "fail"
    mda = tmp_path / "mda"
    mda.write_text("#!/bin/sh\ncat >/dev/null\necho 'mailbox full for good' >&2\nexit 1\n")
    mda.chmod(0o755)
    path, source, mailbox = setup(tmp_path, {"webhook": {"url": f"{hook.url}/hook"}}, deliver={"mda": [str(mda)]})
    mailbox.add(letter("one", message_id="<one@example.net>"))
    poll(path, source)
    hook.mode = "ok"
    poll(path, source)
    poll(path, source)
    assert len(hook.posts) == 2  # the refused POST, then the one that arrived; then nothing more
    (shown,) = hook.events()[1]["messages"]
    assert shown["message_id"] == "<one@example.net>" and shown["uid"] == "uid-1"
    assert mailbox.fetched == ["uid-1"]


def test_only_the_chosen_events_are_sent_and_an_account_can_turn_the_plugin_off(tmp_path: Path, hook: Hook) -> None:
    source = FakeSource()
    for name in ("alice", "bob", "carol"):
        source.mailbox(name).open_error = LoginRefused("-ERR nope")
    path = write_config(tmp_path / "postbote.yaml", [
        fake_account("alice", tmp_path / "a"),
        fake_account("bob", tmp_path / "b", plugins={"notify": False}),
        fake_account("carol", tmp_path / "c", plugins={"notify": {"events": ["message.rejected"]}})],
        plugins={"notify": {"after_failures": 1, "webhook": {"url": f"{hook.url}/hook"}}})
    for name in ("alice", "bob", "carol"):
        poll_once(path, account=name, plugins=[source], start_plugins=True)
    assert [(event["event"], event["account"]) for event in hook.events()] == [("account.failing", "alice")]


def test_the_accounts_own_stale_after_applies_by_default(tmp_path: Path, hook: Hook) -> None:
    mda = tmp_path / "mda"
    mda.write_text("#!/bin/sh\ncat >/dev/null\nexit 75\n")
    mda.chmod(0o755)
    path, source, mailbox = setup(tmp_path, {"webhook": {"url": f"{hook.url}/hook"}}, deliver={"mda": [str(mda)]},
                                  stale_after="0.3s")
    mailbox.add(letter("held up"))
    poll(path, source)
    time.sleep(0.4)
    poll(path, source)
    assert [(event["event"], event["stale_after"]) for event in hook.events()] == [("mail.stale", 0.3)]


def test_mail_is_delivered_whatever_the_channels_do(tmp_path: Path, hook: Hook) -> None:
    hook.mode = "fail"
    mda = tmp_path / "mda"
    mda.write_text("#!/bin/sh\ncat >/dev/null\nexit 1\n")  # rejected for good: a notification is due
    mda.chmod(0o755)
    path, source, mailbox = setup(tmp_path, {"webhook": {"url": f"{hook.url}/hook"}}, deliver={"mda": [str(mda)]})
    mailbox.add(make_message("one"))
    stats = poll(path, source)
    assert (stats.ok, stats.rejected, stats.left) == (True, 1, 1)
    assert mailbox.uids() == ["uid-1"]  # stays on the server, as without the plugin


def test_no_secret_reaches_a_notification(tmp_path: Path, hook: Hook, smtp_sink: SMTPSink) -> None:
    """The server quotes the password in its refusal; the notifications carry it masked."""
    secret = "correct-horse-battery-staple"
    faults = Faults().on("PASS", times=None, action=Action.reply(f"-ERR [AUTH] wrong password {secret}"))
    with POP3Server([make_message("hello")], faults=faults, users={"demo": secret}) as server:
        path = write_config(tmp_path / "postbote.yaml",
                            [account("alice", server, tmp_path / "Maildir", password=secret)],
                            plugins={"notify": {
                                "after_failures": 1,
                                "webhook": {"url": f"{hook.url}/hook",
                                            "headers": {"Authorization": "Bearer hook-token-0123456789"}},
                                "email": {"to": ["ops@example.org"],
                                          "smtp": {"host": "127.0.0.1", "port": smtp_sink.port}}}})
        assert not poll_once(path, start_plugins=True).ok
    (event,) = hook.events()
    assert "********" in event["reason"] and secret not in event["reason"]
    assert hook.posts[0][1]["Authorization"] == "Bearer hook-token-0123456789"
    (mail,) = smtp_sink.messages
    text = message_from_bytes(mail.data, policy=default_policy).get_content()
    assert "login refused: [AUTH]" in text and "********" in text
    for sent in (hook.posts[0][2].decode(), mail.data.decode(), text):
        assert secret not in sent and "hook-token-0123456789" not in sent


def test_tls_to_the_relay_and_the_webhook_checked_against_the_configured_ca(tmp_path: Path, pki: TestPKI,
                                                                            smtp_sink_factory: Any) -> None:
    relay = smtp_sink_factory(starttls=True, require_starttls=True)
    secure = Hook(tls=pki.server_context())
    try:
        path, source, mailbox = setup(tmp_path, {
            "after_failures": 1,
            "webhook": {"url": f"{secure.url}/hook", "tls_ca_file": str(pki.ca_file)},
            "email": {"to": ["ops@example.org"], "smtp": {"host": "127.0.0.1", "port": relay.port, "starttls": True,
                                                         "tls_ca_file": str(pki.ca_file)}}})
        mailbox.open_error = LoginRefused("-ERR nope")
        poll(path, source)
        assert [event["event"] for event in secure.events()] == ["account.failing"]
        (attempt,) = relay.attempts
        assert attempt.tls and attempt.accepted
    finally:
        secure.close()


def test_a_webhook_not_trusting_the_certificate_is_a_failed_channel(tmp_path: Path, pki: TestPKI) -> None:
    secure = Hook(tls=pki.server_context())
    try:
        path, source, mailbox = setup(tmp_path, {"after_failures": 1, "webhook": {"url": f"{secure.url}/hook"}})
        mailbox.open_error = LoginRefused("-ERR nope")
        with structlog.testing.capture_logs() as logs:
            poll(path, source)
        (failed,) = [entry for entry in logs if entry["event"] == "notify.failed"]
        assert "CERTIFICATE_VERIFY_FAILED" in failed["error"] and secure.posts == []
    finally:
        secure.close()


def test_a_redirect_is_not_followed(tmp_path: Path, hook: Hook) -> None:
    hook.mode = "redirect"
    path, source, mailbox = setup(tmp_path, {"after_failures": 1, "webhook": {"url": f"{hook.url}/hook",
                                                                             "token_file": "token"}})
    (tmp_path / "token").write_text("redirect-token-0123\n")
    mailbox.open_error = LoginRefused("-ERR nope")
    with structlog.testing.capture_logs() as logs:
        poll(path, source)
    assert [path for path, _, _ in hook.posts] == ["/hook"]  # not /elsewhere, with or without the token
    (failed,) = [entry for entry in logs if entry["event"] == "notify.failed"]
    assert "307" in failed["error"]


def test_email_via_the_accounts_own_smtp_destination(tmp_path: Path, smtp_sink: SMTPSink) -> None:
    path, source, mailbox = setup(
        tmp_path, {"after_failures": 1, "email": {"via_destination": True}},
        deliver={"smtp": {"host": "127.0.0.1", "port": smtp_sink.port, "recipients": ["me@example.org"]}})
    mailbox.open_error = LoginRefused("-ERR nope")
    poll(path, source)
    (delivery,) = smtp_sink.messages
    assert delivery.rcpt_tos == ["me@example.org"]
    assert b"X-Postbote-Event: account.failing" in delivery.data


# aiosmtpd counts only STARTTLS as TLS for AUTH; over implicit TLS the session is encrypted all along
@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")
def test_email_through_a_submission_relay_over_implicit_tls_with_a_login(tmp_path: Path, pki: TestPKI) -> None:
    """The relay is opened as the smtp destination opens it: TLS from the first byte, SMTP AUTH with its own
    password file -- the notification never goes out unencrypted or unauthenticated."""
    relay = SMTPRelay(users={"ops@example.org": "relay-Pw-9"}, implicit_tls=pki.server_context()).start()
    try:
        secret = tmp_path / "relay.password"
        secret.write_text("relay-Pw-9\n")
        secret.chmod(0o600)
        path, source, mailbox = setup(tmp_path, {"after_failures": 1, "email": {"to": ["ops@example.org"], "smtp": {
            "host": relay.host, "port": relay.port, "tls": "implicit", "tls_ca_file": str(pki.ca_file),
            "username": "ops@example.org", "password_file": str(secret)}}})
        mailbox.open_error = LoginRefused("-ERR nope")
        poll(path, source)
        (mail,) = relay.messages
        assert (mail.login, mail.tls) == ("ops@example.org", True)
        assert b"X-Postbote-Event: account.failing" in mail.data and b"relay-Pw-9" not in mail.data
    finally:
        relay.stop()


def test_via_destination_without_an_smtp_destination_is_a_start_up_error(tmp_path: Path) -> None:
    path, source, _ = setup(tmp_path, {"email": {"via_destination": True}})
    with pytest.raises(ConfigError, match="no smtp or lmtp destination"):
        poll(path, source)


def test_ntfy_gotify_and_a_webhook_get_the_token_in_a_header(tmp_path: Path, hook: Hook) -> None:
    token = tmp_path / "token"
    token.write_text("tk-0123456789abcdef\n")
    path, source, mailbox = setup(tmp_path, {
        "after_failures": 1,
        "ntfy": {"url": f"{hook.url}/alerts", "token_file": str(token)},
        "gotify": {"url": f"{hook.url}/gotify", "token_file": str(token)},
        "webhook": {"url": f"{hook.url}/hook", "token_file": "token"}})  # relative to the config's directory
    mailbox.open_error = LoginRefused("-ERR nope")
    poll(path, source)
    posts = {path: (headers, body) for path, headers, body in hook.posts}
    headers, body = posts["/alerts"]
    assert headers["Authorization"] == "Bearer tk-0123456789abcdef" and headers["X-Priority"] == "4"
    assert headers["X-Title"] == "postbote: alice: the poll failed (login refused)"
    assert b"alice: the poll failed: -ERR nope" in body
    headers, body = posts["/gotify/message"]
    assert headers["X-Gotify-Key"] == "tk-0123456789abcdef"
    sent = json.loads(body)
    assert sent["priority"] == 8 and sent["extras"]["postbote"]["event"] == "account.failing"
    assert b"tk-0123456789abcdef" not in body
    headers, body = posts["/hook"]
    assert headers["Authorization"] == "Bearer tk-0123456789abcdef" and b"tk-0123456789abcdef" not in body


def test_an_unreadable_token_file_is_a_start_up_error(tmp_path: Path) -> None:
    path, source, _ = setup(tmp_path, {"ntfy": {"url": "https://ntfy.sh/topic", "token_file": "missing.token"}})
    with pytest.raises(ConfigError, match="cannot read the token file .*missing.token"):
        poll(path, source)


def test_the_daemon_notifies_the_outage_once_and_the_recovery_once(tmp_path: Path, hook: Hook) -> None:
    """``postbote run`` with two accounts polled in parallel: alice's server is down for some polls, then comes
    up; bob's stays down."""
    port = free_port()
    server = POP3Server([make_message("waiting out the outage")], port=port)
    path = write_config(tmp_path / "postbote.yaml",
                        [account("alice", server, tmp_path / "Maildir"),
                         account("bob", None, tmp_path / "Maildir", port=free_port())],
                        plugins={"notify": {"after_failures": 2, "webhook": {"url": f"{hook.url}/hook"}}})
    daemon = DaemonRun(path)
    try:
        daemon.wait_for("notify.sent", notification="account.failing", account="alice", timeout=30)
        server.start()
        daemon.wait_for("notify.sent", notification="account.recovered", account="alice", timeout=30)
        daemon.wait_for("poll.finished", ok=True, account="alice", count=2, timeout=30)
        daemon.wait_for("notify.sent", notification="account.failing", account="bob", timeout=30)
    finally:
        assert daemon.stop() == 0
        server.stop()
    told = [(event["account"], event["event"], event["count"]) for event in hook.events()]
    assert [entry for entry in told if entry[0] == "alice"] == [("alice", "account.failing", 2),
                                                                ("alice", "account.recovered", 2)]
    assert [entry for entry in told if entry[0] == "bob"] == [("bob", "account.failing", 2)]
    assert len(daemon.events("poll.finished", ok=False, account="alice")) == 2


# --- options


def problems(tmp_path: Path, options: Any) -> list[str]:
    path = write_config(tmp_path / "postbote.yaml", [account("alice", None, tmp_path / "Maildir")],
                        plugins={"notify": options})
    with pytest.raises(ConfigError) as caught:
        load_config(path, make_plugin_manager(entry_points=False))
    return [line.replace(str(path), "FILE") for line in str(caught.value).splitlines()]


@pytest.mark.parametrize("options", [{"after_failures": 2}, {"webhook": None, "email": None}, True])
def test_options_need_a_channel(tmp_path: Path, options: Any) -> None:
    assert any(line.startswith("FILE:") and "give at least one channel" in line
               for line in problems(tmp_path, options))


@pytest.mark.parametrize(("options", "expected"), [
    ({"webhook": {"url": "http://hooks.example.org/x"}}, "plugins.notify.webhook.url: use https://"),
    ({"webhook": {"url": "ftp://x"}}, "plugins.notify.webhook.url: expected an https:// URL"),
    ({"webhook": {"url": "https://h/x", "headers": {"bad header": "x"}}}, "'bad header' is not an HTTP header"),
    ({"gotify": {"url": "https://gotify.example.org"}}, "plugins.notify.gotify.token_file: required key is missing"),
    ({"email": {"to": ["a@b"]}}, "plugins.notify.email: give smtp:"),
    ({"email": {"via_destination": True, "smtp": {"host": "h"}}}, "not both"),
    ({"email": {"smtp": {"host": "h"}}}, "plugins.notify.email.to: required key is missing"),
    ({"email": {"to": ["a b"], "smtp": {"hots": "h"}}}, "plugins.notify.email.smtp.hots: unknown key"),
    ({"webhook": {"url": "https://h"}, "events": ["account.failed"]}, "expected a list of account.failing"),
    ({"webhook": {"url": "https://h"}, "after_failures": 0}, "plugins.notify.after_failures: expected an integer"),
    ({"webhook": {"url": "https://h"}, "timeout": "soon"}, "plugins.notify.timeout: expected a duration"),
])
def test_config_errors_name_the_file_line_and_key(tmp_path: Path, options: Any, expected: str) -> None:
    found = problems(tmp_path, options)
    assert any(line.startswith("FILE:") and expected in line for line in found), found


def test_a_good_config_is_accepted(tmp_path: Path) -> None:
    path = write_config(tmp_path / "postbote.yaml", [account("alice", None, tmp_path / "Maildir")],
                        plugins={"notify": {"after_failures": 5, "stale_after": "2h", "details": [],
                                            "events": ["account.failing", "account.recovered"],
                                            "webhook": {"url": "https://hooks.example.org/postbote",
                                                        "headers": {"X-Token": "abc"}},
                                            "ntfy": {"url": "https://ntfy.sh/my-topic"},
                                            "gotify": {"url": "http://gotify.lan", "allow_http": True,
                                                       "token_file": "gotify.token"}}})
    config = load_config(path, make_plugin_manager(entry_points=False))
    settings = config.accounts[0].options_for("notify")
    assert settings.after_failures == 5 and settings.stale_after == 7200 and settings.details == ()
    assert [channel.kind for channel in settings.channels] == ["webhook", "ntfy", "gotify"]
