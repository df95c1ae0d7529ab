"""``postbote -v`` / ``--trace``: every POP3, IMAP, SMTP and LMTP command and reply line on stderr, as an admin
reads along with ``fetchmail -v`` -- never a password, a token, an AUTH payload or a message's bytes.

The end-to-end tests run ``python -m postbote -v poll`` as a user does, against a real Dovecot in front and a real
SMTP relay (aiosmtpd with AUTH over TLS) behind; the redaction itself is a property: whatever secret, wherever it
sits in a login line or the SASL exchange after it, the trace does not show it.
"""

from __future__ import annotations

import base64
import io
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from postbote import SMTPClient, trace
from postbote.trace import REDACTED, ProtocolTrace, redact_line

from tests.harness import Postbote, make_message
from tests.servers.certs import TestPKI
from tests.servers.dovecot import DovecotServer
from tests.servers.faulty_smtp import FaultySMTP
from tests.servers.smtp_relay import SMTPRelay
from tests.servers.smtp_sink import SMTPSink

pytestmark = [pytest.mark.usefixtures("time_limit"),
              pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")]

RELAY_USER = "relay@example.org"
RELAY_PASSWORD = "Relay-Secret-Pw-42"
BODY_MARK = b"this line of the body must never show in a trace"


def trace_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("postbote: ")]


@pytest.fixture
def relay(pki: TestPKI) -> Iterator[SMTPRelay]:
    with SMTPRelay(users={RELAY_USER: RELAY_PASSWORD}, implicit_tls=pki.server_context()) as server:
        yield server


def relay_destination(relay: SMTPRelay, pki: TestPKI, password_file: Path) -> dict[str, Any]:
    return {"smtp": {"host": relay.host, "port": relay.port, "tls": "implicit", "tls_ca_file": str(pki.ca_file),
                     "username": RELAY_USER, "password_file": str(password_file), "auth": "plain",
                     "recipients": ["alice@example.org"]}}


@pytest.fixture
def relay_password(tmp_path: Path) -> Path:
    path = tmp_path / "relay.password"
    path.write_text(RELAY_PASSWORD)
    path.chmod(0o600)
    return path


@pytest.mark.dovecot
@pytest.mark.parametrize("auth", ["user", "plain"])
def test_a_traced_pop3_poll_shows_every_command_but_no_password_and_no_body(
        dovecot: DovecotServer, relay: SMTPRelay, pki: TestPKI, relay_password: Path, postbote: Postbote,
        auth: str) -> None:
    dovecot.deliver("alice", make_message("traced", BODY_MARK + b"\n"))
    password = dovecot.password("alice")
    postbote.configure([{"name": "alice", "host": dovecot.host, "port": dovecot.pop3_port, "tls": "none",
                         "username": "alice", "password": password, "auth": auth,
                         "deliver": relay_destination(relay, pki, relay_password)}])

    result = postbote.run_process("poll", "-v")

    assert result.returncode == 0, result.stderr
    assert len(relay.messages) == 1 and BODY_MARK in relay.messages[0].data
    lines = trace_lines(result)
    shown = "\n".join(lines)
    assert lines[0].startswith("postbote: alice POP3< +OK"), "the greeting comes first"
    login = "postbote: alice POP3> PASS [redacted]" if auth == "user" else "postbote: alice POP3> AUTH PLAIN [redacted]"
    for expected in (login, "postbote: alice POP3> UIDL", "postbote: alice POP3> RETR 1",
                     "postbote: alice POP3> DELE 1", "postbote: alice POP3> QUIT",
                     "postbote: alice SMTP> AUTH PLAIN [redacted]", "postbote: alice SMTP< 235 2.7.0 Authentication "
                     "successful", "postbote: alice SMTP> MAIL FROM:<>", "postbote: alice SMTP> RCPT "
                     "TO:<alice@example.org>"):
        assert expected in lines, f"{expected!r} not in the trace:\n{shown}"
    assert any(line.startswith("postbote: alice POP3< [... ") and line.endswith(" bytes ...]") for line in lines)
    assert any(line.startswith("postbote: alice SMTP> [... ") for line in lines), "the data is one line"
    for secret in (password, RELAY_PASSWORD, base64.b64encode(f"\0alice\0{password}".encode()).decode(),
                   base64.b64encode(f"\0{RELAY_USER}\0{RELAY_PASSWORD}".encode()).decode()):
        assert secret not in result.stderr + result.stdout
    assert BODY_MARK.decode() not in result.stderr and "Subject: traced" not in result.stderr


@pytest.mark.dovecot
def test_a_traced_imap_poll_shows_the_commands_but_not_the_login_or_the_message(
        dovecot: DovecotServer, smtp_sink: SMTPSink, postbote: Postbote, tmp_path: Path) -> None:
    dovecot.deliver("alice", make_message("traced", BODY_MARK + b"\n"))
    password = dovecot.password("alice")
    postbote.configure([{"name": "alice", "protocol": "imap", "host": dovecot.host, "port": dovecot.imap_port,
                         "tls": "none", "username": "alice", "password": password,
                         "deliver": {"maildir": str(tmp_path / "Maildir")}}])

    result = postbote.run_process("--trace", "poll")

    assert result.returncode == 0, result.stderr
    lines = trace_lines(result)
    shown = "\n".join(lines)
    assert any("IMAP> A0" in line and line.endswith((" LOGIN [redacted]", " AUTHENTICATE PLAIN [redacted]"))
               for line in lines), shown
    assert any("IMAP> " in line and "UID FETCH" in line for line in lines), shown
    assert any(line.startswith("postbote: alice IMAP< [... ") for line in lines), shown
    assert password not in result.stderr and BODY_MARK.decode() not in result.stderr


def test_without_the_option_nothing_is_traced(smtp_sink: SMTPSink, postbote: Postbote, tmp_path: Path) -> None:
    """The default: not one trace line (and the clients hold no trace at all: `protocol_trace` is None)."""
    postbote.configure([{"name": "none", "protocol": "imap", "host": "127.0.0.1", "port": 1, "tls": "none",
                         "username": "u", "password": "p", "deliver": {"maildir": str(tmp_path / "M")}}])
    assert trace_lines(postbote.run_process("poll")) == []
    assert trace.protocol_trace("POP3") is None


@pytest.mark.parametrize(("lmtp", "chunking"), [(False, False), (False, True), (True, False)])
def test_an_smtp_or_lmtp_delivery_shows_the_envelope_and_the_size_of_the_data(lmtp: bool, chunking: bool) -> None:
    data = b"Subject: t\r\n\r\n" + BODY_MARK + b"\r\n"
    out = io.StringIO()
    trace.enable(out)
    try:
        with FaultySMTP(lmtp=lmtp, chunking=chunking) as server:
            client = SMTPClient.connect(host=server.host, port=server.port, timeout=5, lmtp=lmtp, helo="client.test")
            client.send("a@example.org", ["b@example.org"], [data])
            client.quit()
    finally:
        trace.disable()

    name = "LMTP" if lmtp else "SMTP"
    lines = out.getvalue().splitlines()
    assert f"postbote: {name}> MAIL FROM:<a@example.org>" in lines and f"postbote: {name}> QUIT" in lines
    if chunking:
        assert lines[lines.index(f"postbote: {name}> BDAT {len(data)} LAST") + 1] == \
            f"postbote: {name}> [... {len(data)} bytes ...]"
    else:
        data_at = lines.index(f"postbote: {name}> [... {len(data)} bytes ...]")
        assert lines[data_at - 1].startswith(f"postbote: {name}< 354 ") and lines[data_at + 1] == f"postbote: {name}> ."
    assert BODY_MARK.decode() not in out.getvalue()


# --- the redaction, as a property -------------------------------------------------------------------------------

# What the trace writes around a redacted line: a secret that is a piece of this is no leak.
SKELETON = ("postbote: SMTP> POP3> IMAP> AUTH AUTHENTICATE PASS LOGIN APOP A0001 PLAIN XOAUTH2 OAUTHBEARER "
            "CRAM-MD5 SCRAM-SHA-256 " + REDACTED)
# Printable text, and the controls a line may carry (the trace shows a tab as \x09: checked in that form too).
SECRETS = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x2FF, blacklist_categories=("Cc", "Cs"))
                  | st.sampled_from("\r\n\t"), min_size=4, max_size=40)
MECHANISMS = st.sampled_from(["PLAIN", "LOGIN", "XOAUTH2", "OAUTHBEARER", "CRAM-MD5", "SCRAM-SHA-256", "plain", ""])
WORDS = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=12)


def leaks(secret: str, shown: str) -> bool:
    return secret in shown or secret.replace("\t", "\\x09") in shown


def traced(protocol: str, *steps: tuple[str, str]) -> str:
    out = io.StringIO()
    trace.enable(out)
    try:
        session = ProtocolTrace(protocol)
        for direction, line in steps:
            if direction == ">":
                session.sent(line)
            else:
                session.received(line)
    finally:
        trace.disable()
    return out.getvalue()


@settings(max_examples=400, deadline=None)
@given(secret=SECRETS, mechanism=MECHANISMS, before=WORDS, after=WORDS,
       template=st.sampled_from(["AUTH {m} {b}{s}{a}", "AUTH {s}", "AUTH {m} {s} {a}", "auth {m} {b}{s}",
                                 "A0001 AUTHENTICATE {m} {b}{s}{a}", "A7 LOGIN {b} {s}{a}", "PASS {b}{s}{a}",
                                 "APOP {b} {s}", "AUTH {m} {b}\r\n{s}{a}"]))
def test_no_secret_anywhere_in_a_login_line_reaches_the_trace(secret: str, mechanism: str, before: str,
                                                              after: str, template: str) -> None:
    assume(secret.strip() and secret.lower() not in SKELETON.lower())
    line = template.format(m=mechanism, s=secret, b=before, a=after)

    shown = traced("SMTP", (">", line))

    assert not leaks(secret, shown)
    assert shown.startswith("postbote: SMTP> ") and REDACTED in shown


@settings(max_examples=200, deadline=None)
@given(secret=SECRETS, mechanism=MECHANISMS,
       protocol=st.sampled_from([("SMTP", "334 ", "235 2.7.0 ok"), ("POP3", "+ ", "+OK logged in"),
                                 ("IMAP", "+ ", "A0001 OK done")]))
def test_no_response_of_a_sasl_exchange_reaches_the_trace(secret: str, mechanism: str,
                                                          protocol: tuple[str, str, str]) -> None:
    name, continuation, done = protocol
    assume(secret.strip() and secret.lower() not in SKELETON.lower())
    encoded = base64.b64encode(secret.encode()).decode()
    tag = "A0001 AUTHENTICATE" if name == "IMAP" else "AUTH"

    shown = traced(name, (">", f"{tag} {mechanism}"), ("<", continuation + "VXNlcm5hbWU6"), (">", secret),
                   ("<", continuation + "UGFzc3dvcmQ6"), (">", encoded), ("<", done), (">", "NOOP after it"))

    assert not leaks(secret, shown) and encoded not in shown
    assert shown.count(REDACTED) == 2
    assert shown.endswith(f"postbote: {name}> NOOP after it\n"), "after the final answer, lines show again"


@pytest.mark.parametrize(("line", "shown"), [
    ("USER alice", "USER alice"),
    ("PASS hunter2", "PASS [redacted]"),
    ("AUTH PLAIN AGFsaWNlAGh1bnRlcjI=", "AUTH PLAIN [redacted]"),
    ("AUTH LOGIN", "AUTH LOGIN"),
    ("A0002 LOGIN alice hunter2", "A0002 LOGIN [redacted]"),
    ("A0003 AUTHENTICATE XOAUTH2 dXNlcj1h", "A0003 AUTHENTICATE XOAUTH2 [redacted]"),
    ("APOP alice c4c9334bac560ecc979e58001b3e22fb", "APOP [redacted]"),
    ("MAIL FROM:<a@example.org> BODY=8BITMIME", "MAIL FROM:<a@example.org> BODY=8BITMIME"),
    ("A0004 UID FETCH 5 (UID BODY.PEEK[])", "A0004 UID FETCH 5 (UID BODY.PEEK[])"),
])
def test_what_a_command_line_shows(line: str, shown: str) -> None:
    assert redact_line(line) == shown


def test_a_message_body_is_one_line_with_its_size() -> None:
    session_output = traced("POP3", (">", "RETR 1"), ("<", "+OK 120 octets"))
    out = io.StringIO()
    trace.enable(out)
    try:
        ProtocolTrace("POP3").elided(120, sent=False)
    finally:
        trace.disable()
    assert session_output.splitlines() == ["postbote: POP3> RETR 1", "postbote: POP3< +OK 120 octets"]
    assert out.getvalue() == "postbote: POP3< [... 120 bytes ...]\n"
