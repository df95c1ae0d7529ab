"""Self-tests of the test servers, using only the standard library's clients.

If these fail, the end-to-end tests' verdicts about postbote mean nothing.
"""

from __future__ import annotations

import poplib
import smtplib
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import tests.conftest as conftest
from tests.servers.certs import TestPKI
from tests.servers.dovecot import DovecotError, DovecotServer, _still_running
from tests.servers.smtp_sink import SMTPSink

TIMEOUT = 10.0

SIMPLE_MESSAGE = b"From: a@example.org\nTo: b@example.org\nSubject: hello\n\nbody\n"


# -- helpers -----------------------------------------------------------------


@contextmanager
def pop3_login(server: DovecotServer, user: str, *, password: str | None = None) -> Iterator[poplib.POP3]:
    """A POP3 session over the plain port, logged in with USER/PASS."""
    client = poplib.POP3(server.host, server.pop3_port, timeout=TIMEOUT)
    try:
        client.user(user)
        client.pass_(password if password is not None else server.password(user))
        yield client
    finally:
        client.quit()


def raw_retr(server: DovecotServer, user: str, number: int) -> bytes:
    """RETR *number* and return the message exactly as it came over the wire
    (minus the final ``.CRLF``, with dot-stuffing undone) -- poplib strips line
    endings, which is the very thing we want to see."""
    with socket.create_connection((server.host, server.pop3_port), timeout=TIMEOUT) as sock:
        stream = sock.makefile("rwb")
        assert stream.readline().startswith(b"+OK")
        for command in (f"USER {user}", f"PASS {server.password(user)}"):
            stream.write(command.encode() + b"\r\n")
            stream.flush()
            assert stream.readline().startswith(b"+OK")
        stream.write(f"RETR {number}\r\n".encode())
        stream.flush()
        assert stream.readline().startswith(b"+OK")
        lines = []
        while (line := stream.readline()) != b".\r\n":
            assert line, "connection closed in the middle of RETR"
            lines.append(line[1:] if line.startswith(b".") else line)
        return b"".join(lines)


def retr_all(client: poplib.POP3) -> list[bytes]:
    count, _ = client.stat()
    return [b"\r\n".join(client.retr(n)[1]) + b"\r\n" for n in range(1, count + 1)]


# -- PKI -----------------------------------------------------------------------


@pytest.mark.dovecot
def test_test_ca_certificate_is_not_trusted_by_the_system_store(dovecot: DovecotServer) -> None:
    assert dovecot.pop3s_port is not None
    with pytest.raises(ssl.SSLCertVerificationError):
        poplib.POP3_SSL(dovecot.host, dovecot.pop3s_port, context=ssl.create_default_context(), timeout=TIMEOUT)


@pytest.mark.dovecot
def test_server_certificate_is_valid_for_localhost_and_127_0_0_1(dovecot: DovecotServer, pki: TestPKI) -> None:
    assert dovecot.pop3s_port is not None
    for hostname in ("localhost", "127.0.0.1"):
        with (socket.create_connection((dovecot.host, dovecot.pop3s_port), timeout=TIMEOUT) as sock,
              pki.client_context().wrap_socket(sock, server_hostname=hostname) as tls):
            assert tls.recv(3) == b"+OK"


# -- Dovecot -----------------------------------------------------------------


@pytest.mark.dovecot
def test_dovecot_offers_stls_and_user_on_the_plain_port(dovecot: DovecotServer) -> None:
    client = poplib.POP3(dovecot.host, dovecot.pop3_port, timeout=TIMEOUT)
    try:
        capabilities = client.capa()
    finally:
        client.quit()
    assert "STLS" in capabilities
    assert "USER" in capabilities


@pytest.mark.dovecot
def test_dovecot_allows_user_pass_without_tls(dovecot: DovecotServer) -> None:
    with pop3_login(dovecot, "alice") as client:
        assert client.stat() == (0, 0)


@pytest.mark.dovecot
def test_dovecot_rejects_a_wrong_password(dovecot: DovecotServer) -> None:
    client = poplib.POP3(dovecot.host, dovecot.pop3_port, timeout=TIMEOUT)
    try:
        client.user("alice")
        with pytest.raises(poplib.error_proto, match="Authentication failed"):
            client.pass_("not-the-password")
    finally:
        client.close()


@pytest.mark.dovecot
def test_dovecot_stls_with_the_test_ca(dovecot: DovecotServer, pki: TestPKI) -> None:
    client = poplib.POP3(dovecot.host, dovecot.pop3_port, timeout=TIMEOUT)
    try:
        client.stls(context=pki.client_context())
        client.user("alice")
        client.pass_(dovecot.password("alice"))
        assert client.stat() == (0, 0)
    finally:
        client.quit()
    dovecot.wait_for_log(r"Login: user=<alice>.*TLS")


@pytest.mark.dovecot
def test_dovecot_implicit_tls_with_the_test_ca(dovecot: DovecotServer) -> None:
    assert dovecot.pop3s_port is not None and dovecot.ca_file is not None
    context = ssl.create_default_context(cafile=str(dovecot.ca_file))
    client = poplib.POP3_SSL(dovecot.host, dovecot.pop3s_port, context=context, timeout=TIMEOUT)
    try:
        client.user("bob")
        client.pass_(dovecot.password("bob"))
        assert client.stat() == (0, 0)
    finally:
        client.quit()


@pytest.mark.dovecot
def test_dovecot_without_tls_does_not_offer_stls(dovecot_factory: conftest.DovecotFactory) -> None:
    server = dovecot_factory(tls=False)
    assert server.pop3s_port is None
    assert server.ca_file is None
    client = poplib.POP3(server.host, server.pop3_port, timeout=TIMEOUT)
    try:
        assert "STLS" not in client.capa()
        with pytest.raises(poplib.error_proto):
            client._shortcmd("STLS")
    finally:
        client.quit()


@pytest.mark.dovecot
def test_delivered_messages_are_served_in_order_with_crlf(dovecot: DovecotServer) -> None:
    for n in range(3):
        dovecot.deliver("alice", b"Subject: message %d\n\nline one\n.dot line\n..two dots\n" % n)
    assert dovecot.count("alice") == 3
    with pop3_login(dovecot, "alice") as client:
        assert [m.split(b"\r\n")[0] for m in retr_all(client)] == [
            b"Subject: message 0",
            b"Subject: message 1",
            b"Subject: message 2",
        ]
    assert raw_retr(dovecot, "alice", 2) == b"Subject: message 1\r\n\r\nline one\r\n.dot line\r\n..two dots\r\n"


@pytest.mark.dovecot
def test_crlf_stored_messages_are_served_unchanged(dovecot: DovecotServer) -> None:
    message = b"Subject: crlf\r\n\r\n\xe4\xf6\xfc latin-1 and \xc3\xa4 utf-8\r\n.\r\nend\r\n"
    dovecot.deliver("bob", message)
    assert raw_retr(dovecot, "bob", 1) == message


@pytest.mark.dovecot
def test_messages_lists_the_mailbox_contents(dovecot: DovecotServer) -> None:
    dovecot.deliver("alice", b"Subject: one\n\n1\n")
    dovecot.deliver("alice", b"Subject: two\n\n2\n")
    assert dovecot.messages("alice") == [b"Subject: one\n\n1\n", b"Subject: two\n\n2\n"]
    assert dovecot.messages("bob") == []


@pytest.mark.dovecot
def test_messages_deleted_over_pop3_leave_the_mailbox(dovecot: DovecotServer) -> None:
    dovecot.deliver("alice", b"Subject: one\n\n1\n")
    dovecot.deliver("alice", b"Subject: two\n\n2\n")
    with pop3_login(dovecot, "alice") as client:
        client.dele(1)
    assert dovecot.messages("alice") == [b"Subject: two\n\n2\n"]


@pytest.mark.dovecot
def test_messages_stay_when_the_session_ends_without_quit(dovecot: DovecotServer) -> None:
    dovecot.deliver("alice", SIMPLE_MESSAGE)
    client = poplib.POP3(dovecot.host, dovecot.pop3_port, timeout=TIMEOUT)
    client.user("alice")
    client.pass_(dovecot.password("alice"))
    client.dele(1)
    client.close()  # no QUIT: no UPDATE state, nothing is expunged
    dovecot.wait_for_log(r"pop3\(alice\).*Disconnected")
    assert dovecot.count("alice") == 1


@pytest.mark.dovecot
def test_uidls_are_stable_across_sessions(dovecot: DovecotServer) -> None:
    dovecot.deliver("alice", SIMPLE_MESSAGE)
    dovecot.deliver("alice", SIMPLE_MESSAGE)
    with pop3_login(dovecot, "alice") as client:
        first = client.uidl()[1]
    with pop3_login(dovecot, "alice") as client:
        assert client.uidl()[1] == first


@pytest.mark.dovecot
def test_users_can_be_added_while_running(dovecot: DovecotServer) -> None:
    dovecot.add_user("carol", "carol-secret")
    dovecot.deliver("carol", SIMPLE_MESSAGE)
    with pop3_login(dovecot, "carol") as client:
        assert client.stat()[0] == 1


@pytest.mark.dovecot
def test_connections_without_authentication_are_logged(dovecot: DovecotServer) -> None:
    """The STARTTLS tests rely on this line to show that no credentials were sent."""
    mark = dovecot.log_mark()
    client = poplib.POP3(dovecot.host, dovecot.pop3_port, timeout=TIMEOUT)
    client.quit()
    dovecot.wait_for_log(r"pop3-login: .*Disconnected.*\(no auth attempts.*user=<>", since=mark)
    mark = dovecot.log_mark()
    client = poplib.POP3(dovecot.host, dovecot.pop3_port, timeout=TIMEOUT)
    client.user("alice")
    with pytest.raises(poplib.error_proto):
        client.pass_("wrong")
    client.quit()
    dovecot.wait_for_log(r"pop3-login: .*Disconnected.*\(auth failed, 1 attempts.*user=<alice>", since=mark)


@pytest.mark.dovecot
@pytest.mark.parametrize("transport", ["unix socket", "tcp"])
def test_lmtp_delivers_into_the_mailbox(dovecot: DovecotServer, transport: str) -> None:
    if transport == "tcp":
        client = smtplib.LMTP(dovecot.host, dovecot.lmtp_port, timeout=TIMEOUT)
    else:
        client = smtplib.LMTP(str(dovecot.lmtp_socket), timeout=TIMEOUT)
    with client:
        client.sendmail("sender@example.org", ["bob"], SIMPLE_MESSAGE.replace(b"\n", b"\r\n"))
    assert dovecot.count("bob") == 1
    assert dovecot.messages("bob")[0].endswith(b"Subject: hello\n\nbody\n")


@pytest.mark.dovecot
def test_two_servers_run_side_by_side(dovecot_factory: conftest.DovecotFactory) -> None:
    first, second = dovecot_factory(), dovecot_factory(tls=False)
    assert {first.pop3_port, first.lmtp_port}.isdisjoint({second.pop3_port, second.lmtp_port})
    first.deliver("alice", SIMPLE_MESSAGE)
    with pop3_login(second, "alice") as client:
        assert client.stat()[0] == 0


@pytest.mark.dovecot
def test_stopping_leaves_no_dovecot_process_behind(pki: TestPKI) -> None:
    conftest._require_dovecot()
    server = DovecotServer(pki=pki)
    server.start()
    try:
        with pop3_login(server, "alice"):
            processes = {pid: started for pid in server.process_ids() if (started := _start_time(pid)) is not None}
    finally:
        server.stop()
    assert len(processes) > 1
    assert [pid for pid, started in processes.items() if _still_running(pid, started)] == []
    assert not server.root.exists()


@pytest.mark.dovecot
def test_a_server_that_cannot_start_raises_with_its_log(pki: TestPKI) -> None:
    conftest._require_dovecot()
    server = DovecotServer(pki=pki, extra_config="no_such_setting = 1")
    with pytest.raises(DovecotError, match="no_such_setting"):
        server.start()
    assert not server.running


def _start_time(pid: int) -> str | None:
    """When process ``pid`` started (in clock ticks since boot), or None when it has ended already (a login
    process may come and go between listing the processes and reading this)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[19]


def test_missing_dovecot_fails_instead_of_skipping_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conftest, "dovecot_binary", lambda: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI"):
        conftest._require_dovecot()
    monkeypatch.delenv("CI")
    monkeypatch.setenv("POSTBOTE_REQUIRE_DOVECOT", "1")
    with pytest.raises(pytest.fail.Exception):
        conftest._require_dovecot()
    monkeypatch.delenv("POSTBOTE_REQUIRE_DOVECOT")
    with pytest.raises(pytest.skip.Exception):
        conftest._require_dovecot()


# -- SMTP sink -----------------------------------------------------------------


def send(sink: SMTPSink, message: bytes, rcpts: list[str] | None = None, **kwargs: object) -> None:
    with smtplib.SMTP(sink.host, sink.port, timeout=TIMEOUT) as client:
        client.sendmail("sender@example.org", rcpts or ["rcpt@example.org"], message, **kwargs)  # type: ignore[arg-type]


def test_sink_records_envelope_and_exact_data(smtp_sink: SMTPSink) -> None:
    message = b"Subject: x\r\n\r\n.\r\n.leading dot\r\n..two\r\n\xe4 latin-1 \xc3\xa4 utf-8\r\nend\r\n"
    send(smtp_sink, message, ["one@example.org", "two@example.org"])
    assert smtp_sink.messages == [("sender@example.org", ["one@example.org", "two@example.org"], message)]


def test_sink_advertises_8bitmime_and_smtputf8(smtp_sink: SMTPSink) -> None:
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=TIMEOUT) as client:
        client.ehlo()
        assert client.has_extn("8bitmime")
        assert client.has_extn("smtputf8")
        assert not client.has_extn("starttls")
        client.sendmail("sender@example.org", ["rcpt@example.org"], b"Subject: \xc3\xa4\r\n\r\n",
                        ["BODY=8BITMIME", "SMTPUTF8"])
    assert {"BODY=8BITMIME", "SMTPUTF8"} <= set(smtp_sink.attempts[0].mail_options)


def test_sink_accepts_very_long_lines(smtp_sink: SMTPSink) -> None:
    message = b"Subject: long\r\n\r\n" + b"x" * 100_000 + b"\r\n"
    send(smtp_sink, message)
    assert smtp_sink.messages[0].data == message


def test_sink_temporary_refusal_until_reset(smtp_sink: SMTPSink) -> None:
    smtp_sink.respond_with("451 4.3.0 try later")
    for _ in range(2):
        with pytest.raises(smtplib.SMTPDataError) as refused:
            send(smtp_sink, SIMPLE_MESSAGE)
        assert refused.value.smtp_code == 451
    assert smtp_sink.messages == []
    assert [a.reply for a in smtp_sink.attempts] == ["451 4.3.0 try later"] * 2
    smtp_sink.reset()
    send(smtp_sink, SIMPLE_MESSAGE)
    assert len(smtp_sink.messages) == 1


def test_sink_refuses_only_the_next_n_messages(smtp_sink: SMTPSink) -> None:
    smtp_sink.respond_with("550 5.7.1 go away", count=1)
    with pytest.raises(smtplib.SMTPDataError):
        send(smtp_sink, b"Subject: first\r\n\r\n")
    send(smtp_sink, b"Subject: second\r\n\r\n")
    assert [m.data for m in smtp_sink.messages] == [b"Subject: second\r\n\r\n"]
    assert [a.accepted for a in smtp_sink.attempts] == [False, True]


def test_sink_rejects_a_recipient(smtp_sink: SMTPSink) -> None:
    smtp_sink.reject_rcpt("Nobody@example.org", "550 5.1.1 no such user")
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=TIMEOUT) as client:
        refused = client.sendmail("sender@example.org", ["nobody@example.org", "ok@example.org"], SIMPLE_MESSAGE)
    assert refused == {"nobody@example.org": (550, b"5.1.1 no such user")}
    assert smtp_sink.messages[0].rcpt_tos == ["ok@example.org"]
    assert smtp_sink.refused_rcpts == [("nobody@example.org", "550 5.1.1 no such user")]


def test_sink_clear_forgets_records(smtp_sink: SMTPSink) -> None:
    send(smtp_sink, SIMPLE_MESSAGE)
    smtp_sink.clear()
    assert smtp_sink.messages == [] and smtp_sink.attempts == []


def test_sink_rejects_malformed_scripted_replies(smtp_sink: SMTPSink) -> None:
    with pytest.raises(ValueError):
        smtp_sink.respond_with("try later")


def test_sink_with_starttls(smtp_sink_factory: conftest.SinkFactory, pki: TestPKI) -> None:
    sink = smtp_sink_factory(starttls=True, require_starttls=True)
    with smtplib.SMTP(sink.host, sink.port, timeout=TIMEOUT) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail("sender@example.org", ["rcpt@example.org"], SIMPLE_MESSAGE)
        assert refused.value.smtp_code == 530
    with smtplib.SMTP(sink.host, sink.port, timeout=TIMEOUT) as client:
        client.starttls(context=pki.client_context())
        client.sendmail("sender@example.org", ["rcpt@example.org"], SIMPLE_MESSAGE)
    assert [a.tls for a in sink.attempts] == [True]


def test_sink_answers_many_messages_quickly(smtp_sink: SMTPSink) -> None:
    """No Nagle/delayed-ACK stall (40 ms per reply) on the sink's side."""
    import time

    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=TIMEOUT) as client:
        started = time.monotonic()
        for _ in range(50):
            client.sendmail("sender@example.org", ["rcpt@example.org"], SIMPLE_MESSAGE)
        elapsed = time.monotonic() - started
    assert len(smtp_sink.wait_for_messages(50)) == 50
    assert elapsed < 1.5, f"50 messages took {elapsed:.2f}s"
