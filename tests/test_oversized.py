"""Messages over ``max_size`` (issue 15), against a real Dovecot over POP3, with the ``notify`` plugin POSTing to a
local webhook: by default such a message stays on the server and is reported once (one ``message.rejected`` log
event, one notification), not at every poll; with ``delete_oversized: true`` it is deleted unread at the poll after
the one that reported and notified it -- with ``keep: true`` too."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest
from postbote.state import DROPPED, REJECTED
from postbote.testing.https import StandInHTTPServer

from tests.harness import MaildirTarget, Postbote, make_message
from tests.servers.dovecot import DovecotServer

pytestmark = [pytest.mark.dovecot, pytest.mark.usefixtures("time_limit")]

BIG = make_message("too big", b"x" * 4000 + b"\n")
SMALL = make_message("small")


class Webhook:
    """A local HTTP server keeping the JSON body of every POST."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        events = self.events

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
                events.append(json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0)))))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server's signature
                pass

        self.server = StandInHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    server = Webhook()
    yield server
    server.close()


class Run:
    """alice's POP3 account on Dovecot (max_size 2 KB) into a Maildir, with ``notify`` on; each poll's log kept."""

    def __init__(self, dovecot: DovecotServer, postbote: Postbote, webhook: Webhook,
                 capsys: pytest.CaptureFixture[str], **keys: Any) -> None:
        self.dovecot, self.postbote, self.capsys = dovecot, postbote, capsys
        entry = {"name": "alice", "host": dovecot.host, "port": dovecot.pop3_port, "tls": "none",
                 "username": "alice", "password": dovecot.password("alice"), "timeout": "10s", "max_size": "2KB",
                 "deliver": {"maildir": str(postbote.directory / "Maildir")}, **keys}
        postbote.configure([entry], top={"plugins": {"notify": {"webhook": {"url": webhook.url}}}})

    def poll(self) -> tuple[int, list[dict[str, Any]]]:
        self.capsys.readouterr()
        status = self.postbote.poll()
        captured = self.capsys.readouterr()
        events = []
        for line in (captured.out + captured.err).splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return status, events

    def on_server(self) -> list[bytes]:
        return self.dovecot.messages("alice")

    def delivered(self) -> int:
        return len(MaildirTarget(self.postbote.directory / "Maildir").delivered())

    def statuses(self) -> list[str]:
        from postbote.state import StateStore

        store = StateStore(self.postbote.state_dir, readonly=True)
        try:
            return [str(record.status) for record in store.records("alice").values()]
        finally:
            store.close()


def named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [event for event in events if event.get("event") == name]


@pytest.fixture
def deliver_both(dovecot: DovecotServer) -> None:
    dovecot.deliver("alice", BIG)
    dovecot.deliver("alice", SMALL)


@pytest.mark.usefixtures("deliver_both")
def test_by_default_an_oversized_message_stays_and_is_reported_and_notified_once_not_every_poll(
        dovecot: DovecotServer, postbote: Postbote, webhook: Webhook, capsys: pytest.CaptureFixture[str]) -> None:
    run = Run(dovecot, postbote, webhook, capsys)

    status, events = run.poll()
    assert status == 1 and len(named(events, "message.rejected")) == 1
    assert [event["event"] for event in webhook.events] == ["message.rejected"]
    assert "max_size" in webhook.events[0]["reason"]

    for _ in range(2):
        status, events = run.poll()
        assert status == 0 and named(events, "message.rejected") == [] and named(events, "message.deleted") == []
    assert len(webhook.events) == 1
    assert run.on_server() and len(run.on_server()) == 1 and b"too big" in run.on_server()[0]
    assert run.delivered() == 1 and str(REJECTED) in run.statuses()


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.usefixtures("deliver_both")
def test_delete_oversized_deletes_the_message_unread_at_the_poll_after_its_notification(
        keep: bool, dovecot: DovecotServer, postbote: Postbote, webhook: Webhook,
        capsys: pytest.CaptureFixture[str]) -> None:
    run = Run(dovecot, postbote, webhook, capsys, delete_oversized=True, keep=keep)

    status, _ = run.poll()
    assert status == 1 and [event["event"] for event in webhook.events] == ["message.rejected"]
    assert any(b"too big" in data for data in run.on_server())  # notified, not deleted yet
    capsys.readouterr()
    assert postbote.run("poll", "--dry-run") == 0
    assert "delete: larger than max_size, reported in an earlier poll" in capsys.readouterr().out
    assert any(b"too big" in data for data in run.on_server())  # a dry run deletes nothing

    status, events = run.poll()
    assert status == 0 and len(named(events, "message.oversized_deleted")) == 1
    assert not any(b"too big" in data for data in run.on_server())
    assert run.delivered() == 1 and len(webhook.events) == 1  # never fetched; no second notification
    assert str(DROPPED) in run.statuses() and str(REJECTED) not in run.statuses()

    status, events = run.poll()
    assert status == 0 and named(events, "message.oversized_deleted") == []
