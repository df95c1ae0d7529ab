"""The spamassassin plugin against a real spamd, and against a fake one for the faults a real spamd won't produce.

The real spamd (``tests.servers.spamd``) is started once per session; when it is not installed these tests are
skipped, except in CI (``CI`` set) or with ``POSTBOTE_REQUIRE_SPAMD=1``, where they fail.
"""

from __future__ import annotations

import email.utils
import os
import re
import socket
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from postbote import hookimpl
from postbote.config import Account, load_config
from postbote.errors import ConfigError
from postbote.message import Message
from postbote.pluginmanager import make_plugin_manager
from postbote.plugins.spamassassin import (
    DEFAULT_MAX_SIZE,
    SpamdError,
    SpamdSettings,
    SpamdVerdict,
    apply_verdict,
    scan,
    spam_fields,
)
from postbote.poll import PollStats
from postbote.testing import FakeMailbox, FakeSource, poll_once

from tests.servers import LOOPBACK, free_port
from tests.servers.spamd import GTUBE, SpamdServer, SpamdStartError, spamd_binary, spamd_required

HAM_HEADER = (b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: lunch\r\n"
              b"Date: %s\r\nMessage-ID: <lunch.4711@example.org>\r\nMIME-Version: 1.0\r\n"
              b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
              % email.utils.formatdate(localtime=True).encode())
HAM_BODY = b"Hi Bob,\r\n\r\nlunch tomorrow at noon?\r\n.\r\n\xc3\xa4 8-bit stays as it is\r\n\r\nAlice\r\n"
HAM = HAM_HEADER + b"\r\n" + HAM_BODY


def spam(subject: str = "offer", extra_header: bytes = b"") -> bytes:
    return (f"From: spammer@example.com\r\nTo: bob@example.net\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@example.com>\r\n").encode() + extra_header + f"\r\n{GTUBE}\r\n".encode()


def lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


# --- the real spamd ---


@pytest.fixture(scope="session")
def spamd() -> Iterator[SpamdServer]:
    if spamd_binary() is None:
        message = "spamd is not installed (apt-get install spamd)"
        if spamd_required():
            pytest.fail(f"{message}; CI / POSTBOTE_REQUIRE_SPAMD=1 requires it", pytrace=False)
        pytest.skip(message)
    try:
        server = SpamdServer().start()
    except SpamdStartError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.stop()


class Drops:
    """Records what was dropped and why, as an observer plugin."""

    name = "drops"

    def __init__(self) -> None:
        self.reasons: list[str] = []

    @hookimpl
    def message_dropped(self, reason: str) -> None:
        self.reasons.append(reason)


class Setup:
    """A mailbox with some messages (a FakeMailbox: ``server``), a config enabling spamassassin, and the Maildir it
    delivers to."""

    def __init__(self, tmp_path: Path, messages: list[bytes]) -> None:
        self.tmp_path = tmp_path
        self.source = FakeSource()
        self.server: FakeMailbox = self.source.mailbox("test")
        for data in messages:
            self.server.add(data)
        self.maildir = tmp_path / "Maildir"
        self.drops = Drops()

    def write_config(self, options: str) -> Path:
        path = self.tmp_path / "postbote.yaml"
        path.write_text(textwrap.dedent("""\
            state_dir: {state}
            plugins:
              spamassassin: {options}
            accounts:
              - name: test
                protocol: fake
                timeout: 5s
                deliver: {{maildir: {maildir}}}
            """).format(state=self.tmp_path / "state", options=options, maildir=self.maildir))
        os.chmod(path, 0o600)
        return path

    def poll(self, options: str) -> PollStats:
        return poll_once(self.write_config(options), plugins=[self.source, self.drops])

    def delivered(self) -> list[bytes]:
        folder = self.maildir / "new"
        files = sorted(folder.iterdir(), key=lambda p: p.stat().st_mtime_ns) if folder.is_dir() else []
        return [p.read_bytes() for p in files]


@pytest.fixture
def make_setup(tmp_path: Path) -> Callable[[list[bytes]], Setup]:
    return lambda messages: Setup(tmp_path, messages)


def tcp(spamd: SpamdServer, extra: str = "") -> str:
    return f"{{host: {spamd.host}, port: {spamd.port}, timeout: 20s{extra}}}"


def header_block(data: bytes) -> bytes:
    return data.split(b"\n\n", 1)[0] + b"\n"


def fields_named(data: bytes, name: bytes) -> list[bytes]:
    """Each field ``name`` of the header block, unfolded continuation lines included."""
    fields, current = [], None
    for line in header_block(data).splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and current is not None:
            fields[current] += line
        elif line.lower().startswith(name.lower() + b":"):
            fields.append(line)
            current = len(fields) - 1
        else:
            current = None
    return fields


def without_trace_and_spam_fields(data: bytes) -> bytes:
    """The message less its first (trace) field and every X-Spam-* field."""
    lines = data.splitlines(keepends=True)
    assert lines[0].startswith(b"Received: ")
    kept, skipping, in_header = [], True, True
    for index, line in enumerate(lines):
        if in_header and line == b"\n":
            in_header = False
        if in_header and line[:1] not in (b" ", b"\t"):
            skipping = index == 0 or line.lower().startswith(b"x-spam-")
        if not (in_header and skipping):
            kept.append(line)
    return b"".join(kept)


def test_gtube_is_flagged_and_delivered_with_its_body_untouched(make_setup, spamd: SpamdServer) -> None:
    message = spam()
    setup = make_setup([message])
    stats = setup.poll(tcp(spamd))
    assert (stats.delivered, stats.deferred) == (1, 0)
    (data,) = setup.delivered()
    assert fields_named(data, b"X-Spam-Flag") == [b"X-Spam-Flag: YES\n"]
    (status,) = fields_named(data, b"X-Spam-Status")
    assert status.startswith(b"X-Spam-Status: Yes, score=") and b"GTUBE" in status
    assert not fields_named(data, b"Content-Type"), "report_safe's wrapper headers must not be copied"
    assert data.endswith(lf(message.split(b"\r\n\r\n", 1)[1]))
    assert without_trace_and_spam_fields(data) == lf(message)


def test_gtube_is_dropped_at_drop_score_and_deleted_while_ham_is_delivered(make_setup, spamd: SpamdServer) -> None:
    setup = make_setup([spam(), HAM])
    stats = setup.poll(tcp(spamd, ", drop_score: 10"))
    assert (stats.dropped, stats.delivered, stats.deferred) == (1, 1, 0)
    (reason,) = setup.drops.reasons
    assert re.fullmatch(r"spam score 10\d\d\.\d ≥ 10\.0", reason)
    assert setup.server.uids() == []
    (data,) = setup.delivered()
    assert b"Subject: lunch" in data


def test_ham_gets_status_no_and_arrives_byte_exact_apart_from_added_fields(make_setup, spamd: SpamdServer) -> None:
    setup = make_setup([HAM])
    assert setup.poll(tcp(spamd, ", drop_score: 10")).delivered == 1
    (data,) = setup.delivered()
    (status,) = fields_named(data, b"X-Spam-Status")
    assert status.startswith(b"X-Spam-Status: No, score=")
    assert fields_named(data, b"X-Spam-Flag") == []
    assert without_trace_and_spam_fields(data) == lf(HAM)
    added = header_block(data).split(lf(HAM_HEADER), 1)[1]
    assert added and all(line.startswith((b"X-Spam-", b" ", b"\t")) for line in added.splitlines())


def test_spamd_over_a_unix_socket(make_setup, spamd: SpamdServer) -> None:
    assert spamd.socket_path is not None
    setup = make_setup([HAM])
    assert setup.poll(f"{{socket: {spamd.socket_path}}}").delivered == 1
    (data,) = setup.delivered()
    assert fields_named(data, b"X-Spam-Status")[0].startswith(b"X-Spam-Status: No, score=")


def test_forged_verdict_fields_are_replaced_by_spamds(make_setup, spamd: SpamdServer) -> None:
    forged = b"X-Spam-Flag: NO\r\nX-Spam-Status: No, score=-100.0\r\n\tforged=yes\r\nX-Spam-Prev-Subject: kept\r\n"
    setup = make_setup([spam(extra_header=forged)])
    setup.poll(tcp(spamd))
    (data,) = setup.delivered()
    assert fields_named(data, b"X-Spam-Flag") == [b"X-Spam-Flag: YES\n"]
    (status,) = fields_named(data, b"X-Spam-Status")
    assert status.startswith(b"X-Spam-Status: Yes, score=") and b"forged" not in status
    assert fields_named(data, b"X-Spam-Prev-Subject") == [b"X-Spam-Prev-Subject: kept\n"]


def test_messages_over_max_size_pass_unscanned(make_setup, spamd: SpamdServer) -> None:
    big = spam("big") + b"x" * 3000 + b"\r\n"
    setup = make_setup([big, spam("small")])
    stats = setup.poll(tcp(spamd, ", max_size: 2kB, drop_score: 10"))
    assert (stats.delivered, stats.dropped) == (1, 1)
    (data,) = setup.delivered()
    assert b"Subject: big" in data and b"X-Spam-" not in data


def test_spamd_unreachable_with_on_error_keep_leaves_mail_on_the_server(make_setup, spamd: SpamdServer) -> None:
    setup = make_setup([HAM, spam()])
    stats = setup.poll(f"{{host: {LOOPBACK}, port: {free_port()}}}")
    assert (stats.ok, stats.delivered, stats.deferred, stats.left) == (True, 0, 2, 2)
    assert len(setup.server.uids()) == 2 and setup.delivered() == []
    retry = setup.poll(tcp(spamd, ", drop_score: 10"))
    assert (retry.delivered, retry.dropped) == (1, 1) and setup.server.uids() == []


def test_spamd_unreachable_with_on_error_pass_delivers_unscanned(make_setup) -> None:
    setup = make_setup([HAM])
    stats = setup.poll(f"{{host: {LOOPBACK}, port: {free_port()}, on_error: pass, drop_score: 1}}")
    assert (stats.delivered, stats.deferred) == (1, 0)
    (data,) = setup.delivered()
    (error,) = fields_named(data, b"X-Spam-Checker-Error")
    assert error.startswith(b"X-Spam-Checker-Error: not scanned: spamd at 127.0.0.1:") and b"refused" in error
    assert fields_named(data, b"X-Spam-Status") == []


# --- configuration ---


def load(tmp_path: Path, options: str) -> Account:
    path = tmp_path / "postbote.yaml"
    path.write_text(textwrap.dedent("""\
        plugins:
          spamassassin:
        {options}
        accounts:
          - {{name: a, host: h, username: u, password: p, deliver: {{maildir: m}}}}
        """).format(options=textwrap.indent(options, "    ")))
    os.chmod(path, 0o600)
    return load_config(path, make_plugin_manager(entry_points=False)).accounts[0]


def test_defaults_are_spamcs(tmp_path: Path) -> None:
    settings = load(tmp_path, "{}").options_for("spamassassin")
    assert settings == SpamdSettings(host="localhost", port=783, socket=None, timeout=30.0,
                                     max_size=DEFAULT_MAX_SIZE, user=None, drop_score=None, on_error="keep")
    assert DEFAULT_MAX_SIZE == 512000


def test_options_are_parsed(tmp_path: Path) -> None:
    settings = load(tmp_path, "socket: run/spamd.sock\ntimeout: 1m\nmax_size: 1MB\nuser: alice\n"
                              "drop_score: 7.5\non_error: pass\n").options_for("spamassassin")
    assert settings.socket == tmp_path / "run/spamd.sock"
    assert (settings.timeout, settings.max_size, settings.user, settings.drop_score, settings.on_error) == (
        60.0, 1_000_000, "alice", 7.5, "pass")


def test_config_errors_name_their_lines(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, "port: 78300\ntimeout: soon\nmax_size: big\nuser: alice smith\ndrop_score: high\n"
                       "on_error: retry\nsocket: /run/spamd.sock\nhots: x\n")
    where = f"{tmp_path / 'postbote.yaml'}"
    problems = "\n".join(caught.value.problems)
    for line, text in [(3, "plugins.spamassassin.port: expected an integer from 1 to 65535"),
                       (4, "plugins.spamassassin.timeout: expected a duration"),
                       (5, "plugins.spamassassin.max_size: expected a size"),
                       (6, "plugins.spamassassin.user: expected a user name"),
                       (7, "plugins.spamassassin.drop_score: expected a spam score"),
                       (8, "plugins.spamassassin.on_error: expected one of keep, pass"),
                       (9, "plugins.spamassassin.socket: give either socket or host and port, not both"),
                       (10, "plugins.spamassassin.hots: unknown key (did you mean 'host'?)")]:
        assert f"{where}:{line}: {text}" in problems


def test_overlong_socket_path_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"postbote.yaml:3: plugins.spamassassin.socket: expected a Unix socket "
                                          r"path of at most 107 bytes"):
        load(tmp_path, f"socket: /{'s' * 120}\n")


# --- protocol robustness, against a fake spamd ---


Script = Callable[[socket.socket], None]


class FakeSpamd:
    """Accepts connections on loopback, reads each request in full and answers it with ``script``."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[bytes] = []
        self.listener = socket.create_server((LOOPBACK, 0))
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(10)
                try:
                    self.requests.append(_read_request(conn))
                    self.script(conn)
                except OSError:
                    pass

    def settings(self, **overrides: object) -> SpamdSettings:
        return SpamdSettings(**{"host": LOOPBACK, "port": self.port, "timeout": 1.0, **overrides})

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.listener.close()


def _read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(4096)
    head = data.split(b"\r\n\r\n", 1)[0]
    length = int(next(line for line in head.split(b"\r\n") if line.startswith(b"Content-length: "))[16:])
    while len(data) < len(head) + 4 + length:
        data += conn.recv(4096)
    return data


@pytest.fixture
def fake_spamd() -> Iterator[Callable[[Script], FakeSpamd]]:
    fakes: list[FakeSpamd] = []

    def make(script: Script) -> FakeSpamd:
        fakes.append(FakeSpamd(script))
        return fakes[-1]

    yield make
    for fake in fakes:
        fake.close()


def reply(data: bytes) -> Script:
    return lambda conn: conn.sendall(data)


def headers_reply(block: bytes, spam_line: bytes = b"Spam: False ; 1.5 / 5.0") -> bytes:
    return b"SPAMD/1.1 0 EX_OK\r\nContent-length: %d\r\n%s\r\n\r\n%s" % (len(block), spam_line, block)


def test_request_is_what_spamc_sends(fake_spamd) -> None:
    fake = fake_spamd(reply(headers_reply(b"X-Spam-Status: No\r\n\r\n")))
    message = Message.from_bytes(HAM)
    verdict = scan(message, fake.settings(user="alice"))
    assert fake.requests == [b"HEADERS SPAMC/1.5\r\nContent-length: %d\r\nUser: alice\r\n\r\n%s" % (len(HAM), HAM)]
    assert (verdict.spam, verdict.score, verdict.threshold, verdict.fields) == (False, 1.5, 5.0,
                                                                                (("X-Spam-Status", "No"),))


def test_only_x_spam_fields_are_taken_with_folding_and_control_characters_masked() -> None:
    block = (b"Received: from localhost\r\nX-Spam-Status: Yes, score=9.9\r\n\ttests=A,B\r\n"
             b"Content-Type: text/plain\r\nX-Spam-Prev-Subject: no\r\nnot a header line\r\n"
             b"X-Spam-Evil: a\rInjected: b\x00\r\n\r\nX-Spam-After: x\r\n")
    assert spam_fields(block) == (("X-Spam-Status", "Yes, score=9.9\n\ttests=A,B"), ("X-Spam-Evil", "a?Injected: b?"))
    message = Message.from_bytes(HAM)
    apply_verdict(message, SpamdVerdict(True, 9.9, 5.0, spam_fields(block)))
    assert message.get_header("Injected") is None
    assert message.as_bytes() == HAM_HEADER + b"X-Spam-Status: Yes, score=9.9\r\n\ttests=A,B\r\n" \
                                              b"X-Spam-Evil: a?Injected: b?\r\n\r\n" + HAM_BODY


@pytest.mark.parametrize(("answer", "error"), [
    pytest.param(b"HTTP/1.1 200 OK\r\n\r\n", "bad reply: expected a SPAMD/1.x status line, got 'HTTP/1.1 200 OK'",
                 id="not spamd"),
    pytest.param(b"SPAMD/2.0 0 EX_OK\r\n\r\n", "unsupported protocol version", id="protocol 2.0"),
    pytest.param(b"SPAMD/1.0 76 Bad header line: (Content-Length mismatch)\r\n",
                 "spamd refused the message: '76 Bad header line: (Content-Length mismatch)'", id="error status"),
    pytest.param(b"SPAMD/1.1 0 EX_OK\r\n" + b"A" * 100_000, "bad reply: a line longer than 1024 bytes",
                 id="endless line"),
    pytest.param(b"SPAMD/1.1 0 EX_OK" + b" " * 2000 + b"\r\n", "bad reply: a line longer than 1024 bytes",
                 id="long status line"),
    pytest.param(b"SPAMD/1.1 0 EX_OK\r\n" + b"".join(b"X-Pad-%c: 1\r\n" % (65 + i) for i in range(17)),
                 "bad reply: more than 16 header lines", id="too many headers"),
    pytest.param(b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 1.0 / 5.0\r\n\r\n",
                 "expected a Content-length header, got nothing", id="no content-length"),
    pytest.param(b"SPAMD/1.1 0 EX_OK\r\nContent-length: -1\r\nSpam: True ; 1.0 / 5.0\r\n\r\n",
                 "expected a Content-length", id="negative content-length"),
    pytest.param(b"SPAMD/1.1 0 EX_OK\r\nContent-length: 999999999\r\nSpam: True ; 1.0 / 5.0\r\n\r\n",
                 "more than the", id="content-length over the bound"),
    pytest.param(b"SPAMD/1.1 0 EX_OK\r\nContent-length: 0\r\nSpam: maybe\r\n\r\n",
                 "expected a header like 'Spam: True", id="bad spam header"),
    pytest.param(b"SPAMD/1.1 0 EX_OK\r\nContent-length: 0\r\nContent-length: 0\r\n\r\n", "given twice",
                 id="header twice"),
    pytest.param(b"SPAMD/1.1 0 EX_OK\r\nno colon here\r\n\r\n", "expected a 'Name: value' header line",
                 id="not a header"),
    pytest.param(headers_reply(b"X-Spam-Status: Yes\r\n\r\n")[:-10],
                 "connection closed before the reply was complete", id="truncated"),
    pytest.param(b"", "connection closed before the reply was complete", id="empty"),
    pytest.param(b"\x00\xff garbage \xfe\r\n",
                 "bad reply: expected a SPAMD/1.x status line, got '\\x00\\ufffd garbage", id="binary garbage"),
])
def test_bad_replies_are_errors(fake_spamd, answer: bytes, error: str) -> None:
    fake = fake_spamd(reply(answer))
    with pytest.raises(SpamdError, match="^spamd at 127.0.0.1:") as caught:
        scan(Message.from_bytes(HAM), fake.settings())
    assert error in str(caught.value)


def test_too_many_x_spam_fields_are_refused(fake_spamd) -> None:
    fake = fake_spamd(reply(headers_reply(b"X-Spam-A: 1\r\n" * 65 + b"\r\n")))
    with pytest.raises(SpamdError, match="more than 64 X-Spam fields"):
        scan(Message.from_bytes(HAM), fake.settings())


def drip(data: bytes, pause: float) -> Script:
    def script(conn: socket.socket) -> None:
        for byte in data:
            conn.sendall(bytes([byte]))
            time.sleep(pause)

    return script


@pytest.mark.parametrize("script", [drip(headers_reply(b"X-Spam-Status: No\r\n\r\n"), 0.05),
                                    lambda conn: time.sleep(1.5)], ids=["dripping reply", "no reply"])
def test_slow_spamd_times_out_within_the_timeout_for_the_whole_exchange(fake_spamd, script: Script) -> None:
    fake = fake_spamd(script)
    started = time.monotonic()
    with pytest.raises(SpamdError, match=r"^spamd at 127.0.0.1:\d+: timed out after 1 s$"):
        scan(Message.from_bytes(HAM), fake.settings())
    assert time.monotonic() - started < 2


def test_garbage_from_spamd_with_on_error_keep_leaves_mail_on_the_server(make_setup, fake_spamd) -> None:
    fake = fake_spamd(reply(b"SPAMD/1.1 0 EX_OK\r\n" + b"\xff" * 5000))
    setup = make_setup([HAM, spam()])
    stats = setup.poll(f"{{host: {LOOPBACK}, port: {fake.port}, timeout: 2s}}")
    assert (stats.ok, stats.delivered, stats.deferred) == (True, 0, 2)
    assert len(setup.server.uids()) == 2 and setup.delivered() == []
    assert len(fake.requests) == 2


def test_bad_reply_with_on_error_pass_delivers_unscanned_with_a_safe_note(make_setup, fake_spamd) -> None:
    fake = fake_spamd(reply(b"\xff\x00 evil\r\nInjected: yes\r\n"))
    setup = make_setup([HAM])
    assert setup.poll(f"{{host: {LOOPBACK}, port: {fake.port}, timeout: 2s, on_error: pass}}").delivered == 1
    (data,) = setup.delivered()
    (error,) = fields_named(data, b"X-Spam-Checker-Error")
    assert error.isascii() and b"\x00" not in error and b"got '\\ufffd\\x00 evil'" in error
    assert fields_named(data, b"Injected") == []
    assert without_trace_and_spam_fields(data) == lf(HAM)
