"""Conformance and fault-injection tests for the scriptable POP3 test server.

Conformance is checked with the stdlib ``poplib`` client where it can see the
behaviour, and with raw sockets where the exact bytes on the wire matter.
"""

from __future__ import annotations

import hashlib
import poplib
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from postbote.testing.pop3server import Action, Faults, POP3Server, crlf_normalised

HELLO = b"From: a@example.org\r\nSubject: hello\r\n\r\nHello there.\r\n"
BARE_LF = b"From: b@example.org\nSubject: bare\n\nline one\nline two\n"
DOTS = b"Subject: dots\r\n\r\n.\r\n.foo\r\n..bar\r\nend\r\n"
CLIENT_TIMEOUT = 2.0


# --------------------------------------------------------------------------- helpers


_open_clients: list[poplib.POP3 | RawClient] = []


@pytest.fixture(autouse=True)
def close_clients() -> Iterator[None]:
    yield
    while _open_clients:
        _open_clients.pop().close()


def connect(server: POP3Server, timeout: float = CLIENT_TIMEOUT) -> poplib.POP3:
    client = poplib.POP3(server.host, server.port, timeout=timeout)
    _open_clients.append(client)
    return client


def login(server: POP3Server, timeout: float = CLIENT_TIMEOUT) -> poplib.POP3:
    client = connect(server, timeout)
    client.user("demo")
    client.pass_("demo")
    return client


class RawClient:
    """Line-level client for checking exact bytes on the wire."""

    def __init__(self, server: POP3Server, timeout: float = CLIENT_TIMEOUT) -> None:
        self.sock = socket.create_connection((server.host, server.port), timeout=timeout)
        self.file = self.sock.makefile("rb")
        _open_clients.append(self)
        self.greeting = self.readline()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def readline(self) -> bytes:
        return self.file.readline(1_000_000)

    def read_multiline(self) -> list[bytes]:
        """Raw lines (with endings, still dot-stuffed) up to and including the terminator."""
        lines = []
        while (line := self.readline()) not in (b".\r\n", b""):
            lines.append(line)
        lines.append(line)
        return lines

    def read_all(self) -> bytes:
        return self.file.read()

    def login(self) -> None:
        self.send(b"USER demo\r\nPASS demo\r\n")
        assert self.readline().startswith(b"+OK")
        assert self.readline().startswith(b"+OK")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def server() -> Iterator[POP3Server]:
    with POP3Server([HELLO, BARE_LF, DOTS]) as running:
        yield running
    assert running.errors == []


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-days", "2",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


@pytest.fixture
def server_tls(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    return context


@pytest.fixture
def client_tls(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certificate[0]))


# --------------------------------------------------------------------------- authorization


def test_greeting_carries_an_apop_timestamp(server: POP3Server) -> None:
    assert connect(server).getwelcome().startswith(b"+OK POP3 ready <")


def test_greeting_without_timestamp_refuses_apop() -> None:
    with POP3Server([HELLO], timestamp_banner=False) as server:
        raw = RawClient(server)
        assert raw.greeting == b"+OK POP3 ready\r\n"
        raw.send(b"APOP demo " + b"0" * 32 + b"\r\n")
        assert raw.readline().startswith(b"-ERR [AUTH]")


def test_user_pass_login(server: POP3Server) -> None:
    client = connect(server)
    assert client.user("demo").startswith(b"+OK")
    assert client.pass_("demo").startswith(b"+OK")
    assert client.stat()[0] == 3


def test_wrong_password_is_refused_with_auth_response_code(server: POP3Server) -> None:
    client = connect(server)
    client.user("demo")
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        client.pass_("wrong")


def test_pass_without_user_is_refused(server: POP3Server) -> None:
    with pytest.raises(poplib.error_proto, match="USER first"):
        connect(server).pass_("demo")


def test_transaction_commands_are_refused_before_login(server: POP3Server) -> None:
    with pytest.raises(poplib.error_proto, match="not valid in this state"):
        connect(server).stat()


def test_apop_login() -> None:
    with POP3Server([HELLO], users={"alice": "s3cret"}) as server:
        client = connect(server)
        assert client.apop("alice", "s3cret").startswith(b"+OK")
        assert client.stat()[0] == 1


def test_apop_with_wrong_secret_is_refused(server: POP3Server) -> None:
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        connect(server).apop("demo", "wrong")


def test_default_capabilities() -> None:
    with POP3Server() as server:
        capabilities = connect(server).capa()
    assert set(capabilities) == {"TOP", "USER", "UIDL", "PIPELINING", "RESP-CODES",
                                 "AUTH-RESP-CODE", "IMPLEMENTATION"}
    assert capabilities["IMPLEMENTATION"] == ["postbote-test"]


def test_capabilities_can_be_overridden() -> None:
    with POP3Server(capabilities=["TOP", "UIDL"]) as server:
        assert set(connect(server).capa()) == {"TOP", "UIDL"}


def test_second_transaction_session_gets_in_use() -> None:
    with POP3Server([HELLO], lock_timeout=0) as server:
        first = login(server)
        second = connect(server)
        second.user("demo")
        with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
            second.pass_("demo")
        first.quit()
        second.user("demo")
        assert second.pass_("demo").startswith(b"+OK")


# --------------------------------------------------------------------------- transaction


def test_stat_and_list_report_crlf_sizes(server: POP3Server) -> None:
    client = login(server)
    sizes = [len(HELLO), len(crlf_normalised(BARE_LF)), len(DOTS)]
    assert client.stat() == (3, sum(sizes))
    assert client.list()[1] == [f"{n} {size}".encode() for n, size in enumerate(sizes, 1)]
    assert client.list(2) == f"+OK 2 {sizes[1]}".encode()


def test_uidl_reports_generated_and_given_uids() -> None:
    with POP3Server([HELLO, ("given-uid", BARE_LF)]) as server:
        client = login(server)
        generated = server.uids()[0]
        assert client.uidl()[1] == [f"1 {generated}".encode(), b"2 given-uid"]
        assert client.uidl(2) == b"+OK 2 given-uid"


def test_generated_uids_are_unique_and_stable() -> None:
    same_messages = [HELLO, HELLO, BARE_LF]
    first, second = POP3Server(same_messages), POP3Server(same_messages)
    assert len(set(first.uids())) == 3
    assert first.uids() == second.uids()


def test_retr_normalises_bare_lf_to_crlf(server: POP3Server) -> None:
    raw = RawClient(server)
    raw.login()
    raw.send(b"RETR 2\r\n")
    status, *lines = raw.read_multiline()
    assert status == f"+OK {len(crlf_normalised(BARE_LF))} octets\r\n".encode()
    assert b"".join(lines) == crlf_normalised(BARE_LF) + b".\r\n"


def test_retr_via_poplib(server: POP3Server) -> None:
    _, lines, _ = login(server).retr(1)
    assert b"\r\n".join(lines) + b"\r\n" == HELLO


def test_message_without_final_newline_gets_crlf_appended_but_not_counted() -> None:
    message = b"Subject: x\r\n\r\nno newline"
    with POP3Server([message]) as server:
        raw = RawClient(server)
        raw.login()
        raw.send(b"LIST 1\r\nRETR 1\r\n")
        assert raw.readline() == f"+OK 1 {len(message)}\r\n".encode()
        assert raw.read_multiline()[1:] == [b"Subject: x\r\n", b"\r\n", b"no newline\r\n", b".\r\n"]


def test_dot_stuffing_on_the_wire(server: POP3Server) -> None:
    raw = RawClient(server)
    raw.login()
    raw.send(b"RETR 3\r\n")
    assert raw.read_multiline()[3:] == [b"..\r\n", b"..foo\r\n", b"...bar\r\n", b"end\r\n", b".\r\n"]


def test_dot_stuffed_lines_round_trip_through_poplib(server: POP3Server) -> None:
    _, lines, _ = login(server).retr(3)
    assert lines[2:] == [b".", b".foo", b"..bar", b"end"]


def test_top_sends_headers_blank_line_and_n_body_lines() -> None:
    message = b"Subject: t\r\nX: y\r\n\r\none\r\ntwo\r\nthree\r\n"
    with POP3Server([message]) as server:
        client = login(server)
        assert client.top(1, 0)[1] == [b"Subject: t", b"X: y", b""]
        assert client.top(1, 2)[1] == [b"Subject: t", b"X: y", b"", b"one", b"two"]
        assert client.top(1, 99)[1] == [b"Subject: t", b"X: y", b"", b"one", b"two", b"three"]


def test_deletion_is_applied_on_quit() -> None:
    with POP3Server([HELLO, BARE_LF]) as server:
        first_uid = server.uids()[0]
        client = login(server)
        client.dele(1)
        assert server.uids()[0] == first_uid
        client.quit()
        assert server.messages() == [(server.uids()[0], BARE_LF)]


def test_deletion_is_not_applied_when_connection_drops(server: POP3Server) -> None:
    client = login(server)
    client.dele(1)
    client.close()
    assert login(server).stat()[0] == 3


def test_rset_unmarks_deletions(server: POP3Server) -> None:
    client = login(server)
    client.dele(1)
    client.rset()
    client.quit()
    assert len(server.messages()) == 3


def test_deleted_message_cannot_be_retrieved_listed_or_deleted_again(server: POP3Server) -> None:
    client = login(server)
    client.dele(1)
    for command in (lambda: client.retr(1), lambda: client.list(1), lambda: client.dele(1),
                    lambda: client.uidl(1)):
        with pytest.raises(poplib.error_proto, match="deleted"):
            command()
    assert client.stat()[0] == 2
    assert [line.split()[0] for line in client.list()[1]] == [b"2", b"3"]


def test_invalid_message_numbers_are_refused(server: POP3Server) -> None:
    client = login(server)
    for argument in ("0", "4", "x", "-1"):
        with pytest.raises(poplib.error_proto):
            client.retr(argument)


def test_message_numbers_are_a_per_session_snapshot(server: POP3Server) -> None:
    client = login(server)
    late_uid = server.add_message(b"Subject: late\r\n\r\n")
    assert client.stat()[0] == 3
    client.dele(1)
    client.quit()
    assert server.uids()[-1] == late_uid
    assert login(server).stat()[0] == 3


def test_command_log_masks_passwords(server: POP3Server) -> None:
    login(server).quit()
    assert server.commands == ["USER demo", "PASS ****", "QUIT"]
    assert server.sessions == 1


def test_pipelined_commands_are_answered_in_order(server: POP3Server) -> None:
    raw = RawClient(server)
    raw.send(b"USER demo\r\nPASS demo\r\nSTAT\r\nUIDL 3\r\nRETR 1\r\nNOOP\r\nQUIT\r\n")
    reply = raw.read_all()
    expected_stat = f"+OK 3 {len(HELLO) + len(crlf_normalised(BARE_LF)) + len(DOTS)}"
    lines = reply.split(b"\r\n")
    assert lines[0] == b"+OK"
    assert lines[1].startswith(b"+OK Logged in")
    assert lines[2] == expected_stat.encode()
    assert lines[3] == f"+OK 3 {server.uids()[2]}".encode()
    assert reply.endswith(b"\r\n" + HELLO + b".\r\n+OK\r\n+OK Bye, 0 messages deleted\r\n")


def test_overlong_command_line_is_refused_and_session_continues(server: POP3Server) -> None:
    raw = RawClient(server)
    raw.send(b"NOOP " + b"x" * 2000 + b"\r\nCAPA\r\n")
    assert raw.readline().startswith(b"-ERR")
    assert raw.readline().startswith(b"+OK Capability")


def test_garbage_does_not_hurt_the_server(server: POP3Server) -> None:
    raw = RawClient(server)
    raw.send(b"\x00\xff\xfe junk\r\n\r\nRETR\r\n")
    assert [raw.readline()[:4] for _ in range(3)] == [b"-ERR"] * 3
    raw.close()
    assert login(server).stat()[0] == 3


def test_idle_session_is_closed() -> None:
    with POP3Server(idle_timeout=0.2) as server:
        raw = RawClient(server)
        assert raw.readline() == b""


# --------------------------------------------------------------------------- TLS


def test_stls_upgrades_the_session(server_tls: ssl.SSLContext, client_tls: ssl.SSLContext) -> None:
    with POP3Server([HELLO], starttls_context=server_tls) as server:
        client = connect(server)
        assert "STLS" in client.capa()
        client.stls(client_tls)
        assert "STLS" not in client.capa()
        client.user("demo")
        client.pass_("demo")
        assert b"\r\n".join(client.retr(1)[1]) + b"\r\n" == HELLO


def test_stls_is_refused_when_not_configured(server: POP3Server) -> None:
    raw = RawClient(server)
    raw.send(b"STLS\r\n")
    assert raw.readline().startswith(b"-ERR")


def test_stls_discards_commands_pipelined_before_the_handshake(
    server_tls: ssl.SSLContext, client_tls: ssl.SSLContext
) -> None:
    with POP3Server([HELLO], starttls_context=server_tls) as server:
        raw = RawClient(server)
        raw.send(b"STLS\r\nCAPA\r\n")
        assert raw.readline().startswith(b"+OK")
        with client_tls.wrap_socket(raw.sock, server_hostname="localhost") as tls:
            tls.sendall(b"QUIT\r\n")
            with tls.makefile("rb") as reply:
                assert reply.readline() == b"+OK Bye\r\n"


def test_implicit_tls(server_tls: ssl.SSLContext, client_tls: ssl.SSLContext) -> None:
    with POP3Server([HELLO], ssl_context=server_tls) as server:
        client = poplib.POP3_SSL(server.host, server.port, context=client_tls, timeout=CLIENT_TIMEOUT)
        _open_clients.append(client)
        client.user("demo")
        client.pass_("demo")
        assert client.stat()[0] == 1
        assert "STLS" not in client.capa()


# --------------------------------------------------------------------------- faults


def test_drop_on_retr_closes_without_reply(server: POP3Server) -> None:
    server.faults = Faults().on("RETR", action=Action.drop())
    client = login(server)
    client.dele(2)
    with pytest.raises(poplib.error_proto, match="EOF"):
        client.retr(1)
    assert login(server).stat()[0] == 3


def test_nth_and_specific_arguments_select_the_occurrence(server: POP3Server) -> None:
    server.faults = Faults().on("RETR 1", nth=2, action=Action.reply("-ERR second time"))
    client = login(server)
    client.retr(1)
    client.retr(2)
    with pytest.raises(poplib.error_proto, match="second time"):
        client.retr(1)
    client.retr(1)
    assert server.faults.fired == ["RETR 1"]


def test_occurrences_are_counted_across_sessions(server: POP3Server) -> None:
    server.faults = Faults().on("UIDL", nth=2, action=Action.reply("-ERR later"))
    first = login(server)
    first.uidl()
    first.quit()
    with pytest.raises(poplib.error_proto, match="later"):
        login(server).uidl()


def test_times_none_applies_to_every_later_occurrence(server: POP3Server) -> None:
    server.faults = Faults().on("PASS", times=None, action=Action.reply("-ERR [AUTH] refused"))
    for _ in range(3):
        client = connect(server)
        client.user("demo")
        with pytest.raises(poplib.error_proto, match="refused"):
            client.pass_("demo")


def test_reply_replaces_the_answer_and_skips_the_command(server: POP3Server) -> None:
    server.faults = Faults().on("DELE", action=Action.reply("-ERR nope"))
    client = login(server)
    with pytest.raises(poplib.error_proto, match="nope"):
        client.dele(1)
    client.quit()
    assert len(server.messages()) == 3


def test_reply_with_a_huge_line_trips_poplib_line_limit(server: POP3Server) -> None:
    server.faults = Faults().on("STAT", action=Action.reply("+OK " + "x" * 10_000))
    with pytest.raises(poplib.error_proto, match="line too long"):
        login(server).stat()


def test_drop_midway_sends_part_of_the_message(server: POP3Server) -> None:
    server.faults = Faults().on("RETR", action=Action.drop_midway(after_bytes=20))
    raw = RawClient(server)
    raw.login()
    raw.send(b"RETR 1\r\n")
    assert raw.read_all() == f"+OK {len(HELLO)} octets\r\n".encode() + HELLO[:20]


def test_stall_delays_the_reply(server: POP3Server) -> None:
    server.faults = Faults().on("NOOP", action=Action.stall(0.2))
    client = login(server)
    started = time.monotonic()
    client.noop()
    assert time.monotonic() - started >= 0.2


def test_stall_then_another_action(server: POP3Server) -> None:
    server.faults = Faults().on("RETR", action=Action.stall(0.01, then=Action.drop()))
    with pytest.raises(poplib.error_proto, match="EOF"):
        login(server).retr(1)


def test_stop_interrupts_a_long_stall() -> None:
    server = POP3Server([HELLO], faults=Faults().on("STAT", action=Action.stall(30))).start()
    raw = RawClient(server)
    raw.login()
    raw.send(b"STAT\r\n")
    time.sleep(0.05)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 1
    assert raw.readline() == b""


def test_truncate_sends_less_than_list_said(server: POP3Server) -> None:
    server.faults = Faults().on("RETR", action=Action.truncate(10))
    client = login(server)
    response, lines, _ = client.retr(1)
    assert response == f"+OK {len(HELLO)} octets".encode()
    assert lines == [HELLO[:10]]


def test_extend_sends_more_than_list_said(server: POP3Server) -> None:
    server.faults = Faults().on("RETR", action=Action.extend(b".sneaky\r\n"))
    raw = RawClient(server)
    raw.login()
    raw.send(b"RETR 1\r\n")
    assert raw.read_multiline()[-2:] == [b"..sneaky\r\n", b".\r\n"]


def test_no_terminator_leaves_the_client_waiting(server: POP3Server) -> None:
    server.faults = Faults().on("RETR", action=Action.no_terminator())
    client = login(server, timeout=0.3)
    with pytest.raises(TimeoutError):
        client.retr(1)
    client.close()
    assert login(server).stat()[0] == 3


def test_drop_after_reply_on_quit_still_applies_deletions() -> None:
    with POP3Server([HELLO, BARE_LF], faults=Faults().on("QUIT", action=Action.drop_after_reply())) as server:
        client = login(server)
        client.dele(1)
        client.quit()
        assert [data for _, data in server.messages()] == [BARE_LF]


def test_drop_on_quit_applies_no_deletions() -> None:
    with POP3Server([HELLO, BARE_LF], faults=Faults().on("QUIT", action=Action.drop())) as server:
        client = login(server)
        client.dele(1)
        with pytest.raises(poplib.error_proto, match="EOF"):
            client.quit()
        assert login(server).stat()[0] == 2


def test_drop_midway_through_quit_reply_applies_deletions() -> None:
    with POP3Server([HELLO], faults=Faults().on("QUIT", action=Action.drop_midway(0))) as server:
        client = login(server)
        client.dele(1)
        with pytest.raises(poplib.error_proto, match="EOF"):
            client.quit()
        assert login(server).stat()[0] == 0


def test_drop_after_reply_on_dele_keeps_the_message(server: POP3Server) -> None:
    server.faults = Faults().on("DELE", action=Action.drop_after_reply())
    client = login(server)
    assert client.dele(1).startswith(b"+OK")
    with pytest.raises(poplib.error_proto, match="EOF"):
        client.noop()
    assert login(server).stat()[0] == 3


def test_finite_flood_of_uidl_lines(server: POP3Server) -> None:
    server.faults = Faults().on("UIDL", action=Action.flood(b"1 same-uid", count=200_000))
    _, lines, _ = login(server, timeout=5).uidl()
    assert len(lines) == 200_000
    assert set(lines) == {b"1 same-uid"}


def test_endless_flood_ends_when_the_client_hangs_up(server: POP3Server) -> None:
    server.faults = Faults().on("RETR", action=Action.flood(b"X" * 70))
    raw = RawClient(server)
    raw.login()
    raw.send(b"RETR 1\r\n")
    assert raw.readline() == b"+OK flood follows\r\n"
    received = sum(len(raw.readline()) for _ in range(50_000))
    assert received == 50_000 * 72
    raw.close()
    assert login(server).stat()[0] == 3


def test_stop_ends_an_endless_flood_to_a_client_that_does_not_read() -> None:
    server = POP3Server([HELLO], faults=Faults().on("UIDL", action=Action.flood(b"1 x"))).start()
    raw = RawClient(server)
    raw.login()
    raw.send(b"UIDL\r\n")
    time.sleep(0.05)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 1
    raw.close()


def test_greeting_can_be_faulted() -> None:
    with POP3Server(faults=Faults().on("GREETING", action=Action.reply("-ERR too busy"))) as server:
        assert RawClient(server).greeting == b"-ERR too busy\r\n"
        assert connect(server).getwelcome().startswith(b"+OK")


def test_uidl_override_can_report_duplicates(server: POP3Server) -> None:
    server.faults = Faults(uidl_override=lambda session, uids: ["dup"] * len(uids))
    assert login(server).uidl()[1] == [b"1 dup", b"2 dup", b"3 dup"]


def test_uidl_override_can_change_uids_per_session(server: POP3Server) -> None:
    server.faults = Faults(uidl_override=lambda session, uids: [f"{uid}-s{session}" for uid in uids])
    first = login(server)
    first_uids = first.uidl()[1]
    first.quit()
    second_uids = login(server).uidl()[1]
    assert first_uids[0].endswith(b"-s1") and second_uids[0].endswith(b"-s2")


def test_duplicate_uids_can_be_stored() -> None:
    with POP3Server([("same", HELLO), ("same", BARE_LF)]) as server:
        client = login(server)
        assert client.uidl()[1] == [b"1 same", b"2 same"]
        client.dele(2)
        client.quit()
        assert server.messages() == [("same", HELLO)]


def test_raw_line_endings_sends_bare_lf() -> None:
    with POP3Server([BARE_LF + b".dot\n"], faults=Faults(raw_line_endings=True)) as server:
        raw = RawClient(server)
        raw.login()
        raw.send(b"LIST 1\r\nRETR 1\r\n")
        assert raw.readline() == f"+OK 1 {len(BARE_LF) + 5}\r\n".encode()
        assert raw.readline().startswith(b"+OK")
        assert [raw.readline() for _ in range(7)][-2:] == [b"..dot\n", b".\r\n"]


def test_faults_reject_nonsense() -> None:
    with pytest.raises(ValueError):
        Faults().on("RETR", nth=0, action=Action.drop())
    with pytest.raises(TypeError):
        Faults().on("RETR", action="drop")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- lifecycle


def test_concurrent_sessions_are_all_served() -> None:
    with POP3Server([HELLO]) as server:
        results: list[bool] = []

        def ask_for_capabilities() -> None:
            results.append("UIDL" in connect(server).capa())

        threads = [threading.Thread(target=ask_for_capabilities) for _ in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(CLIENT_TIMEOUT)
        assert results == [True] * 10
        assert server.sessions == 10


def test_stop_closes_open_sessions_quickly() -> None:
    server = POP3Server([HELLO]).start()
    clients = [login(server) for _ in range(1)] + [connect(server) for _ in range(3)]
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 1
    for client in clients:
        with pytest.raises((poplib.error_proto, OSError)):
            client.noop()


def test_apop_digest_matches_rfc_example_construction() -> None:
    with POP3Server(users={"mrose": "tanstaaf"}) as server:
        raw = RawClient(server)
        timestamp = raw.greeting.split(b" ")[-1].strip()
        digest = hashlib.md5(timestamp + b"tanstaaf").hexdigest()
        raw.send(f"APOP mrose {digest}\r\n".encode())
        assert raw.readline().startswith(b"+OK")


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=600))
def test_any_message_round_trips_as_crlf_lines(message: bytes) -> None:
    with POP3Server([message]) as server:
        client = login(server)
        size = int(client.list(1).split()[2])
        _, lines, _ = client.retr(1)
        client.quit()
    expected = crlf_normalised(message)
    assert size == len(expected)
    received = b"".join(line + b"\r\n" for line in lines)
    assert received == (expected if not expected or expected.endswith(b"\n") else expected + b"\r\n")
