"""Bad input: hostile or broken messages arrive byte for byte, and broken configs are one-line errors.

Messages -- NUL bytes, bare CR and LF, no header/body separator, 8-bit and invalid UTF-8 headers, a 1 MB line,
lines that are only ".", an empty message, broken MIME, a 100 MB message -- are each fetched through the real poll
path and delivered, in the same poll, into a Maildir (LF line endings) and over SMTP to the aiosmtpd sink (CRLF):
what arrives is what the POP3 server sent, apart from the ``Received:`` trace field postbote prepends and the
destination's line endings. A hypothesis test does the same for generated messages.

Configs: ``python -m postbote -c FILE check`` exits 2 and prints one ``postbote: error:`` line per problem, naming
file, line and key, and never a traceback.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import textwrap
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from postbote.testing.pop3server import Faults, POP3Server, crlf_normalised

from tests.harness import (
    MaildirTarget,
    Rig,
    RigFactory,
    SinkTarget,
    child_env,
    postbote_argv,
    run_postbote,
)
from tests.servers.smtp_sink import SMTPSink

pytestmark = pytest.mark.usefixtures("time_limit")

TIME_LIMIT = 90.0


# --- what the destinations must receive ---------------------------------------------------------------


def as_received(stored: bytes, *, raw_line_endings: bool = False) -> bytes:
    """The message as the POP3 server sends it (after undoing dot-stuffing): its line ends as CRLF unless the
    server sends raw bytes, and a line end added when the message does not end with one (RFC 1939)."""
    data = stored if raw_line_endings else crlf_normalised(stored)
    return data + b"\r\n" if data and not data.endswith(b"\n") else data


def on_disk(received: bytes) -> bytes:
    """Maildir: CRLF becomes LF; a bare CR or LF is data and stays."""
    return received.replace(b"\r\n", b"\n")


def on_the_wire(received: bytes) -> bytes:
    """SMTP: every line ends in CRLF, a bare CR or LF included (RFC 5321 2.3.8)."""
    return re.sub(rb"\r\n|\r|\n", b"\r\n", received)


def without_trace_field(delivered: bytes) -> bytes:
    """The delivered message less the ``Received:`` field postbote put first: up to the line with its date, which
    follows the line ending in ``;`` (not "up to the next unindented line": a message may itself start with a
    folded line)."""
    assert delivered.startswith(b"Received: from 127.0.0.1 by "), delivered[:80]
    end = 0
    while not delivered[:end].rstrip(b"\r\n").endswith(b";"):
        end = delivered.index(b"\n", end) + 1
    return delivered[delivered.index(b"\n", end) + 1:]


# --- the messages -------------------------------------------------------------------------------------

BROKEN_MIME = (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"outer\r\nSubject: broken mime\r\n\r\n"
               b"--outer\r\nContent-Type: text/plain; charset=utf-99\r\nContent-Transfer-Encoding: base64\r\n\r\n"
               b"this is === not base64 !!\r\n--wrong-boundary\r\nContent-Type: multipart/alternative; boundary=\r\n"
               b"\r\n--\r\n--outer\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: quoted-"
               b"printable\r\n\r\n=ZZ=\r\n=\r\n" + base64.b64encode(bytes(range(256)))[:77] + b"\r\n")

MESSAGES: dict[str, bytes] = {
    "NUL bytes": b"Subject: nul\r\nX-Nul: a\x00b\r\n\r\nbefore\x00after\r\n\x00\x00\x00\r\n\x00",
    "bare CR": b"Subject: bare cr\r\n\r\nline one\rstill line one\r\n\r\r\nend\r",
    "no header/body separator": b"Subject: no body\r\nX-Other: yes\r\n",
    "no header at all": b"\r\njust a body, the first line is empty\r\n",
    "no header, no separator": b"this is not a header line\r\njust text\r\n",
    "a header block of 20,000 fields": b"".join(b"X-Field-%d: value\r\n" % i for i in range(20_000))
                                       + b"\r\nbody\r\n",
    "8-bit headers": "Subject: Grüße\r\nFrom: Ä <a@example.org>\r\n\r\nKörper\r\n".encode()
                     + b"Latin-1: Gr\xfc\xdfe\r\n",
    "invalid UTF-8 headers": b"Subject: \xff\xfe\xfd\r\nFrom: \xc3\x28 <x@example.org>\r\nMessage-ID: <\xed\xa0\x80@x>"
                             b"\r\nReturn-Path: <\xff@example.org>\r\n\r\nbody \xc0\xaf\r\n",
    "a 1 MB line in the body": b"Subject: long line\r\n\r\n<p>" + b"a" * 1_000_000 + b"</p>\r\n",
    "a 1 MB header field": b"X-Long: " + b"h" * 1_000_000 + b"\r\nSubject: long header\r\n\r\nbody\r\n",
    "2 MB of header lines and no empty line": b"".join(b"X-Header-%07d: %s\r\n" % (i, b"v" * 60)
                                                        for i in range(25_000)),
    "lines that are only dots": b"Subject: dots\r\n\r\n.\r\n..\r\n.\r\n...\r\n. \r\n.\r\n",
    "a dot as the last line without a line end": b"Subject: dot at the end\r\n\r\nend\r\n.",
    "CRLF.CRLF inside the body": b"Subject: terminator inside\r\n\r\nbefore\r\n.\r\nafter\r\n",
    "empty message": b"",
    "header only, no line end": b"Subject: no newline at the end",
    "first line folded": b" folded first line\r\nSubject: x\r\n\r\nbody\r\n",
    "broken MIME": BROKEN_MIME,
}


@pytest.fixture
def both_destinations(tmp_path: Path, smtp_sink: SMTPSink) -> dict[str, object]:
    """Deliver every message twice in one poll: into a Maildir and over SMTP."""
    return {"maildir": MaildirTarget(tmp_path / "Maildir"), "smtp": SinkTarget(smtp_sink)}


def deliver_config(targets: dict[str, object]) -> list[dict[str, object]]:
    return [target.deliver() for target in targets.values()]  # type: ignore[attr-defined]


@pytest.mark.parametrize("message", MESSAGES.values(), ids=MESSAGES.keys())
def test_a_hostile_message_arrives_byte_for_byte_and_never_crashes_the_poll(
        make_rig: RigFactory, both_destinations: dict[str, object], message: bytes) -> None:
    rig = make_rig([message])

    stats = rig.poll(deliver=deliver_config(both_destinations))

    assert (stats.ok, stats.delivered, stats.deleted) == (True, 1, 1), stats
    received = as_received(message)
    (on_maildir,) = both_destinations["maildir"].delivered()  # type: ignore[attr-defined]
    (over_smtp,) = both_destinations["smtp"].delivered()  # type: ignore[attr-defined]
    assert without_trace_field(on_maildir) == on_disk(received)
    assert without_trace_field(over_smtp) == on_the_wire(received)


RAW_MESSAGES: dict[str, bytes] = {
    "bare LF line endings": b"Subject: lf only\n\nline one\nline two\n",
    "mixed line endings": b"Subject: mixed\r\nX-Lf: yes\n\r\nbody\rmore\n\r\nend",
    "dots after bare LF": b"Subject: lf dots\n\n.\n..\n.x\n",
}


@pytest.mark.parametrize("message", RAW_MESSAGES.values(), ids=RAW_MESSAGES.keys())
def test_a_server_sending_bare_line_feeds_is_passed_through_as_sent(
        make_rig: RigFactory, both_destinations: dict[str, object], message: bytes) -> None:
    """Some servers send stored bytes without turning LF into CRLF (RFC 1939 wants CRLF): what they send is kept."""
    rig = make_rig([message], Faults(raw_line_endings=True))

    assert rig.poll(deliver=deliver_config(both_destinations)).delivered == 1

    received = as_received(message, raw_line_endings=True)
    (on_maildir,) = both_destinations["maildir"].delivered()  # type: ignore[attr-defined]
    (over_smtp,) = both_destinations["smtp"].delivered()  # type: ignore[attr-defined]
    assert without_trace_field(on_maildir) == on_disk(received)
    assert without_trace_field(over_smtp) == on_the_wire(received)


def test_a_100_mb_message_is_streamed_to_disk_not_held_in_memory(tmp_path: Path) -> None:
    line = b"0123456789" * 99 + b"abcdef\r\n"  # 998 octets and CRLF: the longest line RFC 5322 allows
    message = b"Subject: a 100 MB message\r\n\r\n" + line * (100_000_000 // len(line))
    with POP3Server([message]) as server:
        target = MaildirTarget(tmp_path / "Maildir")
        rig = Rig(tmp_path / "rig", server, target)

        run = run_postbote(rig.configure(timeout="60s"), "poll", timeout=80, address_space=2 << 30)

        assert run.status == 0, run.output[-2000:]
        assert server.uids() == []
    (delivered,) = target.files("new")
    with open(delivered, "rb") as handle:
        handle.readline()
        while handle.read(1)[:1] in (b" ", b"\t"):
            handle.readline()
        handle.seek(-1, os.SEEK_CUR)
        rest = handle.read()
    assert rest == message.replace(b"\r\n", b"\n")
    assert run.peak_rss_mb < 100, f"peak RSS {run.peak_rss_mb:.0f} MB for a 100 MB message"


# --- generated messages through the real poll path --------------------------------------------------------

tricky_message = st.lists(st.sampled_from([b".", b"..", b"\r", b"\n", b"\r\n", b"\r\n.\r\n", b"\x00", b"\xff",
                                           b"Subject: x", b": ", b"a", b" ", b"\t", b"\r\n\r\n"]),
                          max_size=40).map(b"".join) | st.binary(max_size=200)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(message=tricky_message, raw=st.booleans())
def test_any_message_round_trips_through_pop3_in_and_smtp_and_maildir_out(
        tmp_path: Path, smtp_sink: SMTPSink, message: bytes, raw: bool) -> None:
    smtp_sink.clear()
    directory = tmp_path / uuid.uuid4().hex
    with POP3Server([message], faults=Faults(raw_line_endings=raw)) as server:
        maildir, sink = MaildirTarget(directory / "Maildir"), SinkTarget(smtp_sink)
        rig = Rig(directory, server, maildir)

        stats = rig.poll(deliver=deliver_config({"maildir": maildir, "smtp": sink}))

        assert (stats.ok, stats.delivered) == (True, 1), stats
    received = as_received(message, raw_line_endings=raw)
    (on_maildir,) = maildir.delivered()
    (over_smtp,) = sink.delivered()
    assert without_trace_field(on_maildir) == on_disk(received)
    assert without_trace_field(over_smtp) == on_the_wire(received)


# --- broken configs at the command line ------------------------------------------------------------------

ACCOUNT = """\
accounts:
  - name: alice
    host: pop.example.org
    username: alice
    password_file: {password_file}
    deliver: {{maildir: Mail}}
"""


def config_case(text: str, *expected: str, mode: int = 0o600, xfail: str | None = None) -> object:
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    return pytest.param(text, expected, mode, marks=marks)


CONFIG_CASES = {
    "malformed YAML": config_case("accounts:\n  - name: a\n  host: [\n", ":3: malformed YAML"),
    "wrong types": config_case(
        "accounts:\n  - name: a\n    host: h\n    port: http\n    keep: yes please\n    timeout: soon\n"
        "    username: u\n    password_env: PW\n    deliver: {maildir: m}\n",
        ":4: accounts[0].port: expected an integer", ":5: accounts[0].keep: expected true or false",
        ":6: accounts[0].timeout: expected a duration"),
    "unknown keys": config_case(
        "acounts: []\naccounts:\n  - name: a\n    host: h\n    prot: 110\n    username: u\n    password_env: PW\n"
        "    deliver: {maildir: m}\n",
        ":5: accounts[0].prot: unknown key (did you mean 'port'?)", ":1: acounts: unknown key"),
    "a key given twice": config_case(
        "accounts:\n  - name: a\n    host: h\n    host: g\n    username: u\n    password_env: PW\n"
        "    deliver: {maildir: m}\n", ":4: accounts[0].host: key given twice"),
    "duplicate account names": config_case(
        "accounts:\n  - {name: a, host: h, username: u, password_env: PW, deliver: {maildir: m}}\n"
        "  - {name: a, host: g, username: v, password_env: PW, deliver: {maildir: n}}\n",
        ":3: accounts[1].name: duplicate account name 'a' (first used on line 2)"),
    "missing password source": config_case(
        "accounts:\n  - name: a\n    host: h\n    username: u\n    deliver: {maildir: m}\n",
        ":2: accounts[0]: give exactly one of password, password_file, "),
    "two password sources": config_case(
        "accounts:\n  - name: a\n    host: h\n    username: u\n    password: p\n    password_env: PW\n"
        "    deliver: {maildir: m}\n", ":2: accounts[0]: give exactly one of"),
    "password_command as a shell line": config_case(
        "accounts:\n  - name: a\n    host: h\n    username: u\n    password_command: pass show mail\n"
        "    deliver: {maildir: m}\n", ":5: accounts[0].password_command: expected a command as a list"),
    "inline password readable by others": config_case(
        "accounts:\n  - {name: a, host: h, username: u, password: secret, deliver: {maildir: m}}\n",
        ": holds an inline password but is accessible by group or others (mode 0644)", mode=0o644),
    "bad backup plugin options": config_case(
        "plugins:\n  backup: {maildir: b, mbox: c}\naccounts:\n"
        "  - {name: a, host: h, username: u, password_env: PW, deliver: {maildir: m}}\n",
        "plugins.backup: give exactly one of maildir, mbox"),
    "invalid UTF-8 in the file": config_case(
        "accounts:\n  - name: \xff\n", ":2: malformed YAML"),
    "a password_file that does not exist": config_case(
        ACCOUNT.format(password_file="/nonexistent/alice.password"),
        ":5: accounts[0].password_file: cannot read /nonexistent/alice.password: No such file or directory"),
    "a tls_ca_file that does not exist": config_case(
        "accounts:\n  - name: a\n    host: h\n    username: u\n    password_env: PW\n"
        "    tls_ca_file: /nonexistent/ca.pem\n    deliver: {maildir: m}\n",
        ":6: accounts[0].tls_ca_file: cannot read /nonexistent/ca.pem: No such file or directory"),
}


@pytest.mark.parametrize(("text", "expected", "mode"), CONFIG_CASES.values(), ids=CONFIG_CASES.keys())
def test_a_broken_config_is_one_line_per_problem_naming_file_line_and_key_with_exit_status_2(
        tmp_path: Path, text: str, expected: tuple[str, ...], mode: int) -> None:
    config = tmp_path / "postbote.yaml"
    config.write_bytes(text.encode("latin-1") if "\xff" in text else text.encode())
    config.chmod(mode)

    done = subprocess.run(postbote_argv(config, "check"), env=child_env(), capture_output=True, text=True,
                          timeout=30, check=False, cwd=tmp_path)

    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.splitlines()
    assert all(line.startswith(f"postbote: error: {config}") for line in lines), lines
    assert len(lines) == len(expected), lines
    for piece in expected:
        assert any(piece in line for line in lines), (piece, lines)


@pytest.mark.parametrize("where", ["missing", "directory"])
def test_an_unreadable_config_file_is_a_one_line_error_with_exit_status_2(tmp_path: Path, where: str) -> None:
    config = tmp_path / "postbote.yaml"
    if where == "directory":
        config.mkdir()

    done = subprocess.run(postbote_argv(config, "check"), env=child_env(), capture_output=True, text=True,
                          timeout=30, check=False, cwd=tmp_path)

    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"postbote: error: {config}: cannot read config file: ")


def test_check_of_a_valid_config_says_ok(tmp_path: Path) -> None:
    (tmp_path / "alice.password").write_text("secret\n")
    (tmp_path / "alice.password").chmod(0o600)
    config = tmp_path / "postbote.yaml"
    config.write_text(textwrap.dedent(ACCOUNT.format(password_file="alice.password")))

    done = subprocess.run(postbote_argv(config, "check"), env=child_env(), capture_output=True, text=True,
                          timeout=30, check=False, cwd=tmp_path)

    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert "OK, 1 account(s)" in done.stdout
