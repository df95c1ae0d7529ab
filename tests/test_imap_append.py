"""IMAP as a destination (issue 13): ``deliver: {imap: {...}}`` APPENDs each message into a folder of an IMAP
mailbox, and a message counts as delivered only with the server's tagged OK; otherwise it stays on the source.

The first part checks the keys (errors name file, line and key) and the pieces that need no server; the rest runs a
poll from a `FakeMailbox` into a real Dovecot (IMAP for user ``bob``) and reads what arrived back with the standard
library's ``imaplib`` -- an implementation independent of postbote's client -- or from bob's Maildir on disk.
"""

from __future__ import annotations

import contextlib
import imaplib
import re
import socket
import textwrap
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from postbote import Message, crlf_lines, hookimpl
from postbote.config import load_config
from postbote.errors import ConfigError
from postbote.pluginmanager import make_plugin_manager
from postbote.plugins.imap_append import MAX_REOPENS, checked_length, measure, not_now, sent_at
from postbote.state import DEFERRED, DELIVERED, REJECTED
from structlog.testing import capture_logs

from tests.harness import RigFactory, corpus, corpus_message, corpus_number, run_postbote, strip_trace_header
from tests.model.imap_proxy import AppendProxy, Cut, Refuse
from tests.servers.dovecot import DovecotServer, dovecot_binary

pytestmark = pytest.mark.usefixtures("time_limit")

TIME_LIMIT = 90.0
USERS = 40  # fresh mailboxes of the module's Dovecot, one per test
QUOTA = """
mail_plugins = $mail_plugins quota
protocol imap {
  mail_plugins = $mail_plugins imap_quota
}
plugin {
  quota = maildir:User quota
  quota_rule = *:storage=%s
  quota_max_mail_size = %s
}
"""

# ================================================================== the keys


def write(tmp_path: Path, deliver: str) -> Path:
    path = tmp_path / "postbote.yaml"
    path.write_text("accounts:\n  - name: a\n    host: pop.example.org\n    username: u\n    password: p\n"
                    "    deliver:\n" + textwrap.indent(textwrap.dedent(deliver), " " * 6))
    path.chmod(0o600)
    return path


def problems(tmp_path: Path, deliver: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, deliver), make_plugin_manager(entry_points=False))
    return str(caught.value)


def test_an_imap_destination_reads_the_connection_keys_of_an_imap_source_and_defaults_to_inbox_unread(
        tmp_path: Path) -> None:
    config = load_config(write(tmp_path, """\
        imap: {host: imap.example.org, username: me@example.org, password_file: pw}
    """), make_plugin_manager(entry_points=False))
    (destination,) = config.accounts[0].destinations
    settings = destination.settings
    assert destination.kind == "imap"
    assert (settings.connection.host, settings.connection.port, str(settings.connection.tls)) == \
        ("imap.example.org", 993, "implicit")
    assert (settings.folder, settings.create_folder, settings.flags, settings.internaldate) == \
        ("INBOX", True, (), "date")
    assert destination.label == "imap:me@example.org on imap.example.org:993/INBOX"


def test_flags_folder_and_internaldate_are_read_and_system_flags_take_their_proper_case(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, """\
        imap:
          host: imap.example.org
          port: 143
          tls: starttls
          username: me
          password: secret
          folder: Archive/From the old account
          create_folder: false
          flags: ["\\\\seen", $Forwarded, "\\\\Flagged"]
          internaldate: fetch
    """), make_plugin_manager(entry_points=False))
    settings = config.accounts[0].destinations[0].settings
    assert settings.flags == ("\\Seen", "$Forwarded", "\\Flagged")
    assert (settings.folder, settings.create_folder, settings.internaldate) == \
        ("Archive/From the old account", False, "fetch")


def test_the_destination_says_which_files_it_needs_whether_it_holds_a_password_and_how_it_logs_in(
        tmp_path: Path) -> None:
    """What postbote asks of a source (``check`` reads the files; an inline password needs a private config file)."""
    config = load_config(write(tmp_path, """\
        - imap: {host: h, username: me, password_file: pw, tls_ca_file: ca.pem, flags: ["\\\\Seen"]}
        - imap: {host: h, username: me, password: inline, create_folder: false}
    """), make_plugin_manager(entry_points=False))
    by_file, inline = (d.settings for d in config.accounts[0].destinations)
    assert {key: path.name for key, (path, _, _) in by_file.files.items()} == {"password_file": "pw",
                                                                              "tls_ca_file": "ca.pem"}
    assert not by_file.holds_inline_password and inline.holds_inline_password
    assert by_file.describe().endswith("; into INBOX, flags \\Seen, INTERNALDATE from date")
    assert "(not created)" in inline.describe()


def test_check_shows_the_imap_destination(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from postbote.cli import main

    path = write(tmp_path, "imap: {host: imap.example.org, username: me, password: secret, folder: Old}\n")
    assert main(["-c", str(path), "check"]) == 0
    out = capsys.readouterr().out
    assert "-> imap:me@imap.example.org:993/Old" in out and "secret" not in out


@pytest.mark.parametrize(("options", "expected"), [
    ("{host: h, username: u, password: p, flags: ['\\\\Recent']}", "deliver.imap.flags: expected one of the system"),
    ("{host: h, username: u, password: p, flags: ['two words']}", "deliver.imap.flags: expected a keyword"),
    ("{host: h, username: u, password: p, flags: ['a)']}", "deliver.imap.flags: expected a keyword"),
    ("{host: h, username: u, password: p, internaldate: received}", "deliver.imap.internaldate: expected one of"),
    ("{host: h, username: u, password: p, folder: ''}", "deliver.imap.folder:"),
    ('{host: h, username: u, password: p, folder: "a\\nb"}', "deliver.imap.folder: expected a single line"),
    ("{host: h, username: u, password: p, foldr: x}", "deliver.imap.foldr: unknown key (did you mean 'folder'?)"),
    ("{username: u, password: p}", "deliver.imap.host: required key is missing"),
    ("{host: h, password: p}", "deliver.imap.username: required key is missing"),
    ("{host: h, username: u, password: p, tls: maybe}", "deliver.imap.tls: expected one of"),
])
def test_each_mistake_names_the_line_and_the_key(tmp_path: Path, options: str, expected: str) -> None:
    message = problems(tmp_path, f"imap: {options}\n")
    assert f":7: accounts[0].{expected}" in message


# ================================================================== the pieces


def test_the_literal_length_is_counted_over_the_crlf_form_without_holding_the_message() -> None:
    for data in (b"a\nb\rc\r\nd", b"", b"x" * 200_000 + b"\n", b"no end", b"nul\x00\r\n", b"cr at end\r"):
        message = Message.from_bytes(data)
        length, has_nul = measure(message)
        assert length == len(b"".join(crlf_lines(message.chunks()))), data[:20]
        assert has_nul == (b"\0" in data)


def test_a_literal_that_comes_out_longer_or_shorter_than_announced_is_stopped() -> None:
    assert b"".join(checked_length([b"ab", b"c"], 3)) == b"abc"
    with pytest.raises(Exception, match="grew past the 2 octets"):
        b"".join(checked_length([b"ab", b"c"], 2))
    with pytest.raises(Exception, match="had 3 octets, not the 4"):
        b"".join(checked_length([b"ab", b"c"], 4))


@pytest.mark.parametrize(("code", "text", "deferred"), [
    ("OVERQUOTA", "Quota exceeded (mailbox for user is full)", True),  # Dovecot
    ("UNAVAILABLE", "backend down", True),
    (None, "Mailbox is full", True),
    ("ALERT", "Account exceeded command or bandwidth limits", True),  # Gmail's throttling
    (None, "Server busy, try again later", True),
    ("LIMIT", "Mail size is larger than the maximum size allowed by server configuration", False),  # Dovecot
    ("TOOBIG", "try a smaller one later", False),  # a permanent code wins over the words
    (None, "Can't save a zero byte message", False),
    (None, "Message refused", False),
    ("PARSE", "bad header", False),
])
def test_a_no_defers_when_its_code_or_else_its_text_says_not_now(code: str | None, text: str,
                                                                 deferred: bool) -> None:
    assert not_now(code, text) is deferred


NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(("field", "expected"), [
    ("Mon, 7 Dec 2026 01:02:03 +0100", datetime(2026, 12, 7, 0, 2, 3, tzinfo=UTC)),
    ("7 Dec 2026 01:02:03 -0000", datetime(2026, 12, 7, 1, 2, 3, tzinfo=UTC)),  # no zone known: taken as UTC
    ("Sun, 06 Dec 2026 23:59:59 GMT", datetime(2026, 12, 6, 23, 59, 59, tzinfo=UTC)),
    (None, None),
    ("", None),
    ("yesterday", None),
    ("Mon, 7 Dec 2099 01:02:03 +0000", None),  # spam from the future would sort on top for ever
    ("Thu, 1 Jan 1960 00:00:00 +0000", None),
])
def test_internaldate_is_the_date_field_unless_it_cannot_be_believed(field: str | None,
                                                                     expected: datetime | None) -> None:
    assert sent_at(field, now=NOW) == expected


# ================================================================== against Dovecot


@pytest.fixture(scope="module")
def imap_dovecot(pki: Any) -> Iterator[DovecotServer]:
    """One Dovecot for the module's tests; each test takes a fresh user (`fresh_user`). The users exist from the
    start: one added while Dovecot runs may not be known to it at once (it re-reads the passwd-file lazily)."""
    if dovecot_binary() is None:
        pytest.skip("the dovecot binary is not installed (apt-get install dovecot-imapd)")
    server = DovecotServer(pki=pki, tls=True, users={f"u{n}": f"u{n}-secret" for n in range(1, USERS + 1)})
    server.start()
    yield server
    server.stop()


_users = iter(range(1, USERS + 1))


def fresh_user(dovecot: DovecotServer) -> str:
    return f"u{next(_users)}"


class IMAPTarget:
    """A Dovecot user's mailbox as a rig's destination; what arrived is read back with imaplib."""

    def __init__(self, dovecot: DovecotServer, user: str, folder: str = "INBOX", **options: Any) -> None:
        self.dovecot = dovecot
        self.user = user
        self.folder = folder
        self.options = options

    def deliver(self) -> dict[str, Any]:
        return {"imap": {"host": self.dovecot.host, "port": self.dovecot.imap_port, "tls": "none",
                         "username": self.user, "password": self.dovecot.password(self.user),
                         "folder": self.folder, "timeout": "10s", **self.options}}

    def delivered(self) -> list[bytes]:
        return [message["body"] for message in self.fetch()]

    def fetch(self, folder: str | None = None) -> list[dict[str, Any]]:
        """Every message of the folder: its bytes (BODY[]), FLAGS and INTERNALDATE, in UID order."""
        with imaplib.IMAP4(self.dovecot.host, self.dovecot.imap_port, timeout=10) as client:
            client.login(self.user, self.dovecot.password(self.user))
            status, _ = client.select(_quoted(folder or self.folder), readonly=True)
            if status != "OK":
                return []
            status, data = client.uid("FETCH", "1:*", "(FLAGS INTERNALDATE BODY.PEEK[])")
            assert status == "OK", data
            messages = []
            for item in data:
                if not isinstance(item, tuple):
                    continue
                head = item[0].decode()
                flags = re.search(r"FLAGS \(([^)]*)\)", head)
                internaldate = re.search(r'INTERNALDATE "([^"]+)"', head)
                assert flags and internaldate, head
                messages.append({"body": item[1], "flags": set(flags.group(1).split()),
                                 "internaldate": datetime.strptime(internaldate.group(1), "%d-%b-%Y %H:%M:%S %z")})
            return messages

    def folders(self) -> list[str]:
        with imaplib.IMAP4(self.dovecot.host, self.dovecot.imap_port, timeout=10) as client:
            client.login(self.user, self.dovecot.password(self.user))
            _, data = client.list()
            return [re.sub(r'^\([^)]*\) "[^"]*" ', "", item.decode()).strip('"') for item in data
                    if isinstance(item, bytes)]


def _quoted(folder: str) -> str:
    return '"' + folder.replace("\\", "\\\\").replace('"', '\\"') + '"'


def logins(dovecot: DovecotServer, user: str) -> int:
    return len(re.findall(rf"imap-login: Info: Login: user=<{user}>", dovecot.new_log()))


HAZARDS = [
    b"Subject: 8-bit\r\n\r\nGr\xc3\xbc\xc3\x9fe, d\xc3\xa9j\xc3\xa0 vu \xff\xfe raw\r\n",
    b"Subject: long line\r\n\r\n" + b"L" * 20_000 + b"\r\nshort\r\n",
    b"Subject: bare LF and CR\r\n\r\none\ntwo\r\ncarriage\rreturn\r\n",
    b"Subject: dots\r\n\r\n.\r\n..\r\n.hidden\r\n",
    b"Subject: no final line end\r\n\r\nlast",
    b"Subject: imap syntax in the body\r\n\r\n)\r\n* OK [ALERT] hi\r\na1 LOGOUT\r\n{5}\r\n",
]


def numbered(n: int, data: bytes) -> bytes:
    return f"Message-ID: <corpus-{n}@postbote.test>\r\n".encode() + data


@pytest.mark.dovecot
def test_pop3_to_imap_every_byte_arrives_as_sent_apart_from_line_ends_and_the_message_shows_as_unread(
        make_rig: RigFactory, imap_dovecot: DovecotServer) -> None:
    messages = [numbered(n, data) for n, data in enumerate(HAZARDS, start=1)]
    target = IMAPTarget(imap_dovecot, fresh_user(imap_dovecot))
    rig = make_rig(messages, target=target, source="fake")

    stats = rig.poll()

    assert stats.ok and stats.delivered == len(messages), stats
    assert rig.audit().everything_delivered_once_and_deleted
    arrived = target.fetch()
    for sent, got in zip(messages, arrived, strict=True):
        assert strip_trace_header(got["body"]) == b"".join(crlf_lines([sent])), sent[:60]
        assert "\\Seen" not in got["flags"]
    assert all(record.status == DELIVERED and re.fullmatch(r"imap: appended to INBOX as UID \d+ \(UIDVALIDITY \d+\)",
                                                           record.reason)
               for record in rig.records().values()), rig.records()


@pytest.mark.dovecot
def test_a_nul_byte_arrives_as_a_nul_byte(make_rig: RigFactory, imap_dovecot: DovecotServer) -> None:
    """Dovecot offers BINARY: the message goes as a literal8, and the file in the Maildir holds the NUL."""
    user = fresh_user(imap_dovecot)
    rig = make_rig([numbered(1, b"Subject: nul\r\n\r\nnul\x00byte\r\n")], target=IMAPTarget(imap_dovecot, user),
                   source="fake")

    assert rig.poll().delivered == 1
    (stored,) = imap_dovecot.messages(user)
    assert stored.endswith(b"\n\nnul\x00byte\n")  # Dovecot stores LF line ends


@pytest.mark.dovecot
def test_configured_flags_are_set_and_a_missing_folder_is_created(make_rig: RigFactory,
                                                                   imap_dovecot: DovecotServer) -> None:
    target = IMAPTarget(imap_dovecot, fresh_user(imap_dovecot), folder="Old account.Inbox",
                        flags=["\\Seen", "$Forwarded"])
    rig = make_rig(corpus(3), target=target, source="fake")

    with capture_logs() as logs:
        stats = rig.poll()

    assert stats.ok and stats.delivered == 3, stats
    assert "Old account.Inbox" in target.folders()  # Dovecot's Maildir++ separates levels with "."
    assert [corpus_number(m["body"]) for m in target.fetch()] == [1, 2, 3]
    assert all({"\\Seen", "$Forwarded"} <= m["flags"] for m in target.fetch())
    assert [e for e in logs if e["event"] == "imap_append.folder_created"], "the CREATE is logged"


@pytest.mark.dovecot
def test_internaldate_is_when_the_message_was_sent_or_else_when_it_was_fetched(
        make_rig: RigFactory, imap_dovecot: DovecotServer) -> None:
    dated = numbered(1, b"Date: Mon, 7 Dec 2026 01:02:03 +0100\r\nSubject: dated\r\n\r\nx\r\n")
    undated = numbered(2, b"Subject: undated\r\n\r\nx\r\n")
    from_the_future = numbered(3, b"Date: Fri, 1 Jan 2100 00:00:00 +0000\r\nSubject: future\r\n\r\nx\r\n")
    target = IMAPTarget(imap_dovecot, fresh_user(imap_dovecot))
    rig = make_rig([dated, undated, from_the_future], target=target, source="fake")

    before = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=1)
    assert rig.poll().delivered == 3
    after = datetime.now(UTC) + timedelta(seconds=1)

    first, second, third = (m["internaldate"] for m in target.fetch())
    assert first == datetime(2026, 12, 7, 0, 2, 3, tzinfo=UTC)
    assert before <= second <= after
    assert before <= third <= after


@pytest.mark.dovecot
def test_internaldate_fetch_ignores_the_date_field(make_rig: RigFactory, imap_dovecot: DovecotServer) -> None:
    target = IMAPTarget(imap_dovecot, fresh_user(imap_dovecot), internaldate="fetch")
    rig = make_rig([numbered(1, b"Date: Mon, 1 Dec 2025 01:02:03 +0100\r\n\r\nx\r\n")], target=target,
                   source="fake")
    before = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=1)
    assert rig.poll().delivered == 1
    assert target.fetch()[0]["internaldate"] >= before


@pytest.mark.dovecot
def test_a_missing_folder_without_create_folder_defers_with_a_reason_that_says_what_to_do(
        make_rig: RigFactory, imap_dovecot: DovecotServer) -> None:
    target = IMAPTarget(imap_dovecot, fresh_user(imap_dovecot), folder="Nowhere", create_folder=False)
    rig = make_rig(corpus(2), target=target, source="fake")

    stats = rig.poll()

    assert stats.ok and stats.deferred == 2 and stats.delivered == 0, stats
    assert rig.audit().on_server == (1, 2)
    reasons = [record.reason for record in rig.records().values() if record.status == DEFERRED]
    assert len(reasons) == 2
    for reason in reasons:
        assert "[TRYCREATE]" in reason and "create_folder" in reason and "'Nowhere'" in reason, reason
    assert "Nowhere" not in target.folders()


@pytest.mark.dovecot
def test_a_full_mailbox_defers_the_message_and_the_source_keeps_it_until_there_is_room(
        make_rig: RigFactory, dovecot_factory: Any) -> None:
    dovecot = dovecot_factory(tls=False, extra_config=QUOTA % ("30K", "0"))
    small = [corpus_message(n) for n in (1, 2)]
    large = corpus_message(3, body_lines=1500)  # ~40 kB: over the quota
    target = IMAPTarget(dovecot, "bob")
    rig = make_rig([*small, large], target=target, source="fake")

    stats = rig.poll()

    assert stats.ok and stats.delivered == 2 and stats.deferred == 1, stats
    audit = rig.audit()
    assert audit.on_server == (3,) and audit.delivered_once == [1, 2]
    (record,) = [r for r in rig.records().values() if r.status == DEFERRED]
    assert "[OVERQUOTA]" in record.reason, record.reason


@pytest.mark.dovecot
def test_a_message_the_server_refuses_for_good_is_rejected_and_stays_on_the_source(
        make_rig: RigFactory, dovecot_factory: Any) -> None:
    """Dovecot's quota_max_mail_size: no mailbox will ever take a message this large."""
    dovecot = dovecot_factory(tls=False, extra_config=QUOTA % ("100M", "20K"))
    target = IMAPTarget(dovecot, "bob")
    rig = make_rig([corpus_message(1), corpus_message(2, body_lines=1500), corpus_message(3)], target=target,
                   source="fake")

    stats = rig.poll()

    assert stats.ok and stats.delivered == 2 and stats.rejected == 1, stats
    audit = rig.audit()
    assert audit.on_server == (2,) and 2 in audit.rejected
    assert "imap bob@" in audit.rejected[2] and " NO " in audit.rejected[2], audit.rejected


@pytest.mark.dovecot
def test_one_session_carries_every_message_of_a_poll(make_rig: RigFactory, imap_dovecot: DovecotServer) -> None:
    user = fresh_user(imap_dovecot)
    target = IMAPTarget(imap_dovecot, user)
    rig = make_rig(corpus(40), target=target, source="fake")

    stats = rig.poll()

    assert stats.delivered == 40
    imap_dovecot.wait_for_log(rf"Login: user=<{user}>")
    assert logins(imap_dovecot, user) == 1
    assert [corpus_number(m) for m in target.delivered()] == list(range(1, 41))


@pytest.mark.dovecot
def test_a_login_the_destination_refuses_defers_every_message_after_one_attempt(
        make_rig: RigFactory, imap_dovecot: DovecotServer) -> None:
    user = fresh_user(imap_dovecot)
    target = IMAPTarget(imap_dovecot, user, password="wrong")
    rig = make_rig(corpus(5), target=target, source="fake")

    stats = rig.poll()

    assert stats.ok and stats.deferred == 5, stats
    assert rig.audit().on_server == (1, 2, 3, 4, 5)
    imap_dovecot.wait_for_log(rf"user=<{user}>.*auth failed|auth failed.*user=<{user}>|{user}.*Disconnected")
    assert len(re.findall(rf"user=<{user}>", imap_dovecot.new_log())) <= 2, "one login attempt, not one per message"
    assert "wrong" not in " ".join(r.reason for r in rig.records().values())


# ================================================================== the connection breaks


class CuttingProxy:
    """Forwards a TCP connection to ``port``; cuts it when the client has sent ``cut_after`` bytes of its
    ``nth`` APPEND (counted from the command's first byte), so the server never sees the whole literal."""

    def __init__(self, port: int, *, nth: int, cut_after: int) -> None:
        self.port = port
        self.nth = nth
        self.cut_after = cut_after
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.cuts = 0
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        return self.listener.getsockname()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            server = socket.create_connection(("127.0.0.1", self.port))
            threading.Thread(target=self._pipe, args=(server, client, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(client, server, self.connections == 1), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, watch: bool | None) -> None:
        stream = bytearray()  # what the client sent so far (small: a test's few messages)
        try:
            while data := source.recv(65536):
                if watch:
                    offset = len(stream)
                    stream += data
                    starts = [m.start() for m in re.finditer(rb"(?:^|\r\n)\w+ APPEND ", stream)]
                    if len(starts) >= self.nth and len(stream) >= starts[self.nth - 1] + self.cut_after:
                        sink.sendall(data[:max(0, starts[self.nth - 1] + self.cut_after - offset)])
                        self.cuts += 1
                        return
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def close(self) -> None:
        self.listener.close()


@pytest.mark.dovecot
def test_a_connection_cut_mid_append_defers_that_message_and_nothing_is_lost_or_doubled(
        make_rig: RigFactory, imap_dovecot: DovecotServer) -> None:
    user = fresh_user(imap_dovecot)
    proxy = CuttingProxy(imap_dovecot.imap_port, nth=3, cut_after=300)
    target = IMAPTarget(imap_dovecot, user)
    rig = make_rig(corpus(6, body_lines=40), target=target, source="fake")
    config = target.deliver()["imap"] | {"port": proxy.address[1]}
    try:
        first = rig.poll(deliver={"imap": config})
        assert first.ok and proxy.cuts == 1, first
        assert first.deferred >= 1 and first.delivered + first.deferred == 6, first
        after_cut = rig.audit()
        assert after_cut.duplicates == 0
        rig.poll(deliver={"imap": config})
    finally:
        proxy.close()
    audit = rig.audit()
    assert audit.everything_delivered_once_and_deleted, audit
    assert not [r for r in rig.records().values() if r.status == REJECTED]


# ================================================================== size


@pytest.mark.dovecot
def test_a_200_mb_message_goes_from_imap_to_imap_under_64_mb_of_memory(tmp_path: Path,
                                                                        dovecot_factory: Any) -> None:
    """The literal's length is counted by a pass over the spooled message, then the message is streamed: never held
    whole, on the way in (the IMAP source) or out."""
    dovecot = dovecot_factory(tls=False)
    line = b"0123456789" * 99 + b"abcdef\n"
    big = b"Subject: a 200 MB message\n\n" + line * (200_000_000 // len(line))
    dovecot.deliver("alice", big)
    size = len(big)
    del big
    config = tmp_path / "postbote.yaml"
    config.write_text(yaml.safe_dump({
        "state_dir": str(tmp_path / "state"), "log": {"level": "debug", "format": "json"},
        "accounts": [{"name": "alice", "protocol": "imap", "host": dovecot.host, "port": dovecot.imap_port,
                      "tls": "none", "username": "alice", "password": dovecot.password("alice"), "timeout": "60s",
                      "max_size": "300MB", "deliver": IMAPTarget(dovecot, "bob", timeout="60s").deliver()}]}))
    config.chmod(0o600)

    run = run_postbote(config, "poll", timeout=240, address_space=2 << 30)

    assert run.status == 0, run.output[-2000:]
    assert run.peak_rss_mb < 64, f"peak RSS {run.peak_rss_mb:.0f} MB for a 200 MB message"
    (stored,) = dovecot.message_files("bob")
    assert stored.stat().st_size > size  # the message (LF line ends, as Dovecot stores it) and the trace field
    assert dovecot.count("alice") == 0
    print(f"\n200 MB IMAP -> IMAP: {run.duration:.1f} s, peak RSS {run.peak_rss_mb:.0f} MB")


# ================================================================== answers Dovecot does not give on demand


@pytest.fixture
def proxied(imap_dovecot: DovecotServer) -> Iterator[tuple[AppendProxy, IMAPTarget]]:
    """A fresh user's INBOX behind the APPEND proxy, which can answer chosen APPENDs itself."""
    proxy = AppendProxy((imap_dovecot.host, imap_dovecot.imap_port))
    target = IMAPTarget(imap_dovecot, fresh_user(imap_dovecot))
    yield proxy, target
    proxy.stop()


def through(proxy: AppendProxy, target: IMAPTarget) -> dict[str, Any]:
    return {"imap": target.deliver()["imap"] | {"port": proxy.port}}


@pytest.mark.dovecot
@pytest.mark.parametrize(("answer", "fate"), [
    ("NO [UNAVAILABLE] try later", DEFERRED),
    ("NO [SERVERBUG] oops", DEFERRED),
    ("NO [NOPERM] not your folder", DEFERRED),
    ("NO [OVERQUOTA] full", DEFERRED),
    ("NO [TOOBIG] too large", REJECTED),
    ("NO [LIMIT] too many keywords", REJECTED),
    ("NO message refused", REJECTED),
    ("NO [PARSE] broken header", REJECTED),
])
def test_a_no_is_temporary_when_its_code_says_not_now_and_a_rejection_otherwise(
        make_rig: RigFactory, proxied: tuple[AppendProxy, IMAPTarget], answer: str, fate: str) -> None:
    proxy, target = proxied
    proxy.reset({2: Refuse(answer)})
    rig = make_rig(corpus(3), target=target, source="fake")

    stats = rig.poll(deliver=through(proxy, target))

    assert stats.ok and stats.delivered == 2, stats
    audit = rig.audit()
    assert audit.on_server == (2,) and audit.delivered_once == [1, 3]
    (record,) = [r for r in rig.records().values() if r.status != DELIVERED]
    assert record.status == fate and answer in record.reason, record
    assert proxy.connections == 1, "a NO leaves the session in step"


@pytest.mark.dovecot
def test_a_bad_ends_the_session_and_the_appends_sent_after_it_are_found_or_sent_again_next_poll(
        make_rig: RigFactory, proxied: tuple[AppendProxy, IMAPTarget]) -> None:
    """The APPENDs after the refused one were already on the wire when the BAD came (they go out in a window):
    the session is ended, they stay on the source, and the next poll finds the ones Dovecot stored instead of
    appending them twice."""
    proxy, target = proxied
    proxy.reset({2: Refuse("BAD what was that")})
    rig = make_rig(corpus(4), target=target, source="fake")

    stats = rig.poll(deliver=through(proxy, target))

    assert stats.ok and stats.delivered == 1 and stats.deferred == 3, stats
    assert rig.audit().on_server == (2, 3, 4)
    second = rig.poll(deliver=through(proxy, target))
    assert second.delivered == 3 and rig.audit().everything_delivered_once_and_deleted
    assert proxy.connections == 2, "the session that got a BAD was ended, the next poll opened another"


@pytest.mark.dovecot
def test_a_server_that_keeps_breaking_the_session_is_given_up_for_the_rest_of_the_poll(
        make_rig: RigFactory, proxied: tuple[AppendProxy, IMAPTarget]) -> None:
    proxy, target = proxied
    proxy.reset({n: Cut() for n in range(1, 30)})
    rig = make_rig(corpus(12), target=target, source="fake")

    stats = rig.poll(deliver=through(proxy, target))

    assert stats.ok and stats.deferred == 12, stats
    assert proxy.connections <= MAX_REOPENS + 1
    assert rig.audit().on_server == tuple(range(1, 13))


@pytest.mark.dovecot
def test_the_server_stores_a_message_while_the_next_one_is_fetched(
        make_rig: RigFactory, proxied: tuple[AppendProxy, IMAPTarget]) -> None:
    """The point of `Pending`: the APPEND is complete on the wire when deliver_message returns, and the server's
    answer arrives before postbote turns to the next message (read only then)."""
    proxy, target = proxied
    answered = threading.Event()
    proxy.reset(at=lambda n, phase: answered.set() if (n, phase) == (1, "answer") else False)
    seen: list[bool] = []

    class Observer:
        @hookimpl
        def filter_message(self, message: Message) -> None:
            if message.uid == "uid-2":
                seen.append(answered.wait(3.0))

    rig = make_rig(corpus(2), target=target, source="fake")
    assert rig.poll(deliver=through(proxy, target), plugins=(Observer(),)).delivered == 2
    assert seen == [True]


@pytest.mark.dovecot
def test_a_folder_name_beyond_ascii_is_sent_in_modified_utf7(make_rig: RigFactory,
                                                             imap_dovecot: DovecotServer) -> None:
    target = IMAPTarget(imap_dovecot, fresh_user(imap_dovecot), folder="Alte Post.Grüße")
    rig = make_rig(corpus(1), target=target, source="fake")

    assert rig.poll().delivered == 1
    assert "Alte Post.Gr&APwA3w-e" in target.folders()  # RFC 3501 5.1.3
    assert [corpus_number(m["body"]) for m in target.fetch("Alte Post.Gr&APwA3w-e")] == [1]
    assert rig.records()["uid-1"].reason.startswith("imap: appended to Alte Post.Grüße as UID 1 ")


# ================================================================== several APPENDs in flight


@pytest.mark.dovecot
def test_several_appends_in_flight_are_answered_in_order_and_a_trycreate_for_all_of_them_creates_once(
        imap_dovecot: DovecotServer, tmp_path: Path) -> None:
    """The poller waits for each answer before the next hand-over today; the session does not rely on it: answers
    are read in the order the APPENDs went out, whoever waits first, so a wider pipeline needs no change here."""
    from types import SimpleNamespace

    from postbote.credentials import Secret
    from postbote.plugins.imap.settings import ConnectionSettings, TLSMode
    from postbote.plugins.imap_append import AppendSession, IMAPAppendSettings
    from postbote.plugins.signin.passwords import PasswordKind, PasswordSource
    from postbote.plugins.signin.settings import AuthChoice, Credentials

    user = fresh_user(imap_dovecot)
    password = PasswordSource(PasswordKind.INLINE, inline=Secret(imap_dovecot.password(user)))
    connection = ConnectionSettings(host=imap_dovecot.host, port=imap_dovecot.imap_port, tls=TLSMode.NONE,
                                    username=user, auth=AuthChoice.AUTO, credentials=Credentials(password=password))
    settings = IMAPAppendSettings(connection=connection, folder="Pipelined", timeout=10.0)
    session = AppendSession(settings, SimpleNamespace(name="test"),  # type: ignore[arg-type]
                            SimpleNamespace(state_dir=tmp_path, deadline=None))  # type: ignore[arg-type]
    try:
        waits = [session.append(Message.from_bytes(corpus_message(n), uid=f"uid-{n}")) for n in (1, 2, 3)]
        assert session.client is not None and session.client.in_flight == 3
        answers = [wait() for wait in waits]
    finally:
        session.close()

    assert [re.sub(r" \(UIDVALIDITY \d+\)", "", answer) for answer in answers] == [
        "imap: appended to Pipelined as UID 1", "imap: appended to Pipelined as UID 2",
        "imap: appended to Pipelined as UID 3"]
    target = IMAPTarget(imap_dovecot, user, folder="Pipelined")
    assert [corpus_number(m["body"]) for m in target.fetch()] == [1, 2, 3]


@pytest.mark.dovecot
@pytest.mark.parametrize("tls", ["starttls", "implicit"])
def test_the_destination_speaks_tls_as_the_source_does(make_rig: RigFactory, imap_dovecot: DovecotServer,
                                                       pki: Any, tls: str) -> None:
    user = fresh_user(imap_dovecot)
    port = imap_dovecot.imaps_port if tls == "implicit" else imap_dovecot.imap_port
    target = IMAPTarget(imap_dovecot, user, tls=tls, port=port, tls_ca_file=str(pki.ca_file))
    rig = make_rig(corpus(2), target=target, source="fake")

    with capture_logs() as logs:
        assert rig.poll().delivered == 2
    assert not [e for e in logs if e["event"] == "login.cleartext"]
    imap_dovecot.wait_for_log(rf"Login: user=<{user}>.*\bTLS\b")  # Dovecot says so for an encrypted session


@pytest.mark.dovecot
def test_the_destination_is_not_bound_by_the_deadline_the_poll_started_with(
        make_rig: RigFactory, imap_dovecot: DovecotServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """``poll.deadline`` is the budget for logging in and listing (a few timeouts); the source's session gets a
    longer one once the listing says how much mail there is, and a long poll runs past the first. The destination's
    waits are each bounded by its timeout (a whole answer line within it), not by that first budget."""
    import postbote.poller

    monkeypatch.setattr(postbote.poller, "DEADLINE_TIMEOUTS", 0)  # the first budget is spent before any delivery
    rig = make_rig(corpus(3), target=IMAPTarget(imap_dovecot, fresh_user(imap_dovecot)), source="fake")

    stats = rig.poll()

    assert stats.delivered == 3, stats
