"""The IMAP client against a real Dovecot (issue 13, "The IMAP client").

Each test talks to a fresh Dovecot (fixture ``dovecot``) with `IMAPClient` directly: greeting and capabilities,
STARTTLS and implicit TLS with the test CA, LOGIN and AUTHENTICATE, folders, the listing, pipelined fetches whose
bytes are exactly what was delivered, flags, UID EXPUNGE of only the given UIDs, MOVE, pipelined APPEND with
APPENDUID, and IDLE seeing another client's APPEND.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Iterator
from datetime import UTC

import pytest
from postbote import Secret
from postbote.plugins.imap.client import (
    AppendResult,
    FolderInfo,
    IMAPAuthError,
    IMAPClient,
    IMAPConnectionError,
    IMAPError,
    IMAPProtocolError,
    LiteralTooLarge,
)
from postbote.plugins.signin.sasl import Plain
from postbote.testing.imapserver import Action, Faults, IMAPServer
from postbote.tls import TLSPolicy

from tests.servers.certs import TestPKI
from tests.servers.dovecot import DovecotServer

pytestmark = pytest.mark.usefixtures("time_limit")

TIME_LIMIT = 60.0
CRLF = b"\r\n"


def message(number: int, body: bytes = b"body\r\n") -> bytes:
    return (b"From: a@example.org\r\nTo: alice@example.org\r\nSubject: test %d\r\n"
            b"Message-ID: <imap-%d@postbote.test>\r\n\r\n" % (number, number) + body)


def policy(pki: TestPKI) -> TLSPolicy:
    return TLSPolicy(ca_file=str(pki.ca_file))


def connect(server: DovecotServer, pki: TestPKI, *, tls: str = "starttls", timeout: float = 10.0) -> IMAPClient:
    if tls == "implicit":
        assert server.imaps_port is not None
        return IMAPClient.connect(server.host, server.imaps_port, implicit_tls=True, tls=policy(pki),
                                  timeout=timeout)
    client = IMAPClient.connect(server.host, server.imap_port, implicit_tls=False, tls=policy(pki), timeout=timeout)
    if tls == "starttls":
        client.starttls(policy(pki))
    return client


def logged_in(server: DovecotServer, pki: TestPKI, user: str = "alice", **kwargs: object) -> IMAPClient:
    client = connect(server, pki, **kwargs)  # type: ignore[arg-type]
    client.login(user, Secret(server.password(user)))
    return client


def fetch_all(client: IMAPClient, uids: list[int], limit: int = 10**9) -> dict[int, bytes | None]:
    """Pipelined: every UID FETCH goes out before the first answer is read."""
    for uid in uids:
        client.send_fetch(uid, limit=limit)
    assert client.in_flight == len(uids)
    fetched: dict[int, bytes | None] = {}
    for uid in uids:
        chunks: list[bytes] = []
        size = client.read_fetched(chunks.append)
        fetched[uid] = None if size is None else b"".join(chunks)
        assert size is None or size == len(fetched[uid] or b"")
    assert client.in_flight == 0
    return fetched


# --- connecting and logging in ----------------------------------------------------------------------------------

def test_greeting_and_capabilities(dovecot: DovecotServer, pki: TestPKI) -> None:
    client = connect(dovecot, pki, tls="none")
    assert client.has("IMAP4rev1") and client.has("STARTTLS") and not client.encrypted
    assert "PLAIN" in client.sasl_mechanisms()
    assert client.capability() == client.capabilities
    client.logout()


def test_starttls_then_login(dovecot: DovecotServer, pki: TestPKI) -> None:
    client = connect(dovecot, pki, tls="starttls")
    assert client.encrypted and not client.has("STARTTLS")
    client.login("alice", Secret("alice-secret"))
    assert client.has("UIDPLUS") and client.has("MOVE") and client.has("IDLE")
    client.logout()


def test_implicit_tls(dovecot: DovecotServer, pki: TestPKI) -> None:
    client = logged_in(dovecot, pki, tls="implicit")
    assert client.encrypted
    client.noop()
    assert client.identify({"name": "postbote", "version": "0.1.0"}).get("name") == "Dovecot"
    client.logout()


def test_implicit_tls_with_an_untrusted_certificate_fails(dovecot: DovecotServer) -> None:
    from postbote import TLSError

    assert dovecot.imaps_port is not None
    with pytest.raises(TLSError, match="not trusted"):
        IMAPClient.connect(dovecot.host, dovecot.imaps_port, implicit_tls=True, tls=TLSPolicy(), timeout=10)


def test_starttls_refused_when_not_offered(dovecot_factory, pki: TestPKI) -> None:  # type: ignore[no-untyped-def]
    server = dovecot_factory(tls=False)
    client = IMAPClient.connect(server.host, server.imap_port, implicit_tls=False, tls=policy(pki), timeout=10)
    with pytest.raises(IMAPError, match="does not offer STARTTLS"):
        client.starttls(policy(pki))
    client.close()


def test_wrong_password_is_an_auth_error_that_does_not_show_the_password(dovecot: DovecotServer,
                                                                          pki: TestPKI) -> None:
    client = connect(dovecot, pki)
    with pytest.raises(IMAPAuthError) as refused:
        client.login("alice", Secret("wrong pass\"word"))
    assert "wrong" not in str(refused.value) and refused.value.status == "NO"
    client.login("alice", Secret("alice-secret"))  # the session is still in step
    client.logout()


def test_login_with_a_password_that_needs_a_literal(dovecot_factory, pki: TestPKI) -> None:  # type: ignore[no-untyped-def]
    password = "pä\"ss\\wörd"
    server = dovecot_factory(users={"alice": "alice-secret"})
    server.add_user("carol", password)
    client = connect(server, pki)
    client.login("carol", Secret(password))
    client.select("INBOX")
    client.logout()


def test_authenticate_plain(dovecot: DovecotServer, pki: TestPKI) -> None:
    client = connect(dovecot, pki)
    client.authenticate(Plain("alice", Secret("alice-secret")))
    client.select("INBOX")
    client.logout()


def test_authenticate_plain_refused(dovecot: DovecotServer, pki: TestPKI) -> None:
    client = connect(dovecot, pki)
    with pytest.raises(IMAPAuthError) as refused:
        client.authenticate(Plain("alice", Secret("not-it")))
    assert "not-it" not in str(refused.value)
    assert base64.b64encode(b"\0alice\0not-it").decode() not in str(refused.value)
    client.close()


def test_authenticate_without_sasl_ir(dovecot_factory, pki: TestPKI) -> None:  # type: ignore[no-untyped-def]
    server = dovecot_factory()
    client = connect(server, pki)
    client.capabilities = client.capabilities - {"SASL-IR"}  # as a server without SASL-IR: wait for "+"
    client.authenticate(Plain("alice", Secret("alice-secret")))
    client.noop()
    client.logout()


# --- folders ------------------------------------------------------------------------------------------------------

def test_list_select_create(dovecot: DovecotServer, pki: TestPKI) -> None:
    client = logged_in(dovecot, pki)
    client.create("Archive")
    client.create("Archive")  # exists already: counts as created
    client.create("Ünïcode & Co")
    names = {folder.name: folder for folder in client.list_folders()}
    assert {"INBOX", "Archive", "Ünïcode & Co"} <= set(names)
    assert names["Archive"].delimiter in (".", "/")
    selected = client.select("Ünïcode & Co")
    assert selected.exists == 0 and selected.uidvalidity > 0 and not selected.read_only
    assert client.listing() == []
    examined = client.select("INBOX", read_only=True)
    assert examined.read_only
    with pytest.raises(IMAPError) as missing:
        client.select("No such folder")
    assert missing.value.status == "NO"
    client.noop()
    client.logout()


# --- listing and fetching -----------------------------------------------------------------------------------------

HARD_BODIES = [
    b"plain\r\n",
    b".\r\n..\r\n.dot line\r\n",
    b"8-bit: \xe4\xf6\xfc \xff\xfe\r\n",
    b"a NUL \x00 in the middle\r\n",  # Dovecot serves it as 0x80 (RFC 3501 allows no NUL in a literal)
    b"x" * 100_000 + b"\r\n",  # a long line
    b"{5}\r\n) A0001 OK fake\r\n* 1 FETCH (UID 99 BODY[] {3}\r\n",  # protocol look-alikes in the data
]


def test_pipelined_fetch_gives_the_delivered_bytes(dovecot: DovecotServer, pki: TestPKI) -> None:
    delivered = [message(n, body) for n, body in enumerate(HARD_BODIES, 1)]
    for data in delivered:
        dovecot.deliver("alice", data)
    client = logged_in(dovecot, pki)
    selected = client.select("INBOX")
    assert selected.exists == len(delivered)
    listed = client.listing()
    assert [entry.size for entry in listed] == [len(data) for data in delivered]
    assert all("\\Seen" not in entry.flags for entry in listed)
    fetched = fetch_all(client, [entry.uid for entry in listed])
    assert [fetched[entry.uid] for entry in listed] == [data.replace(b"\0", b"\x80") for data in delivered]
    # BODY.PEEK: nothing became \Seen
    assert all("\\Seen" not in entry.flags for entry in client.listing())
    assert client.listing(unseen_only=True) == client.listing()
    client.logout()


def test_many_messages_pipelined(dovecot: DovecotServer, pki: TestPKI) -> None:
    delivered = [message(n, b"line %d\r\n" % n * (n % 7 + 1)) for n in range(1, 201)]
    for data in delivered:
        dovecot.deliver("alice", data)
    client = logged_in(dovecot, pki)
    client.select("INBOX")
    listed = client.listing()
    assert len(listed) == 200
    fetched = fetch_all(client, [entry.uid for entry in listed])
    assert [fetched[entry.uid] for entry in listed] == delivered
    client.logout()


def test_fetching_a_gone_message_gives_none(dovecot: DovecotServer, pki: TestPKI) -> None:
    dovecot.deliver("alice", message(1))
    client = logged_in(dovecot, pki)
    client.select("INBOX")
    (entry,) = client.listing()
    fetched = fetch_all(client, [entry.uid + 1000, entry.uid])
    assert fetched == {entry.uid + 1000: None, entry.uid: message(1)}
    assert client.header_block(entry.uid + 1000) is None
    client.logout()


def test_a_message_over_the_limit_ends_the_session(dovecot: DovecotServer, pki: TestPKI) -> None:
    dovecot.deliver("alice", message(1, b"x" * 5000 + b"\r\n"))
    client = logged_in(dovecot, pki)
    client.select("INBOX")
    (entry,) = client.listing()
    client.send_fetch(entry.uid, limit=1000)
    with pytest.raises(LiteralTooLarge):
        client.read_fetched(lambda data: None)
    client.close()


def test_header_block(dovecot: DovecotServer, pki: TestPKI) -> None:
    dovecot.deliver("alice", message(1, b"the body\r\n"))
    client = logged_in(dovecot, pki)
    client.select("INBOX")
    (entry,) = client.listing()
    header = client.header_block(entry.uid)
    assert header == message(1, b"")
    with pytest.raises(LiteralTooLarge):
        client.header_block(entry.uid, limit=10)
    client.close()


def test_store_flags_and_unseen_listing(dovecot: DovecotServer, pki: TestPKI) -> None:
    for n in range(1, 4):
        dovecot.deliver("alice", message(n))
    client = logged_in(dovecot, pki)
    client.select("INBOX")
    first, second, third = client.listing()
    client.store_flags([first.uid, third.uid], ["\\Seen", "$Forwarded"])
    flags = {entry.uid: entry.flags for entry in client.listing()}
    assert "\\Seen" in flags[first.uid] and "$Forwarded" in flags[third.uid] and "\\Seen" not in flags[second.uid]
    assert [entry.uid for entry in client.listing(unseen_only=True)] == [second.uid]
    client.store_flags([first.uid], ["\\Seen"], add=False)
    assert [entry.uid for entry in client.listing(unseen_only=True)] == [first.uid, second.uid]
    client.logout()


def test_uid_expunge_removes_only_the_given_uids(dovecot: DovecotServer, pki: TestPKI) -> None:
    """Another client's \\Deleted message stays: never a bare EXPUNGE."""
    for n in range(1, 4):
        dovecot.deliver("alice", message(n))
    client = logged_in(dovecot, pki)
    client.select("INBOX")
    first, second, third = client.listing()
    client.store_flags([first.uid, second.uid], ["\\Deleted"])  # second: "another client's" deletion
    client.uid_expunge([first.uid, third.uid])  # third is not \Deleted: stays too
    assert [entry.uid for entry in client.listing()] == [second.uid, third.uid]
    assert client.exists == 2
    client.logout()


def test_move(dovecot: DovecotServer, pki: TestPKI) -> None:
    for n in range(1, 4):
        dovecot.deliver("alice", message(n))
    client = logged_in(dovecot, pki)
    client.create("Done")
    client.select("INBOX")
    first, second, third = client.listing()
    copied = client.move([first.uid, third.uid], "Done")
    assert [entry.uid for entry in client.listing()] == [second.uid]
    client.select("Done")
    moved = client.listing()
    assert len(moved) == 2 and copied == {first.uid: moved[0].uid, third.uid: moved[1].uid}  # [COPYUID]
    assert list(fetch_all(client, [entry.uid for entry in moved]).values()) == [message(1), message(3)]
    client.logout()


def test_move_without_the_move_extension(dovecot: DovecotServer, pki: TestPKI) -> None:
    """UID COPY, then \\Deleted and UID EXPUNGE of exactly those UIDs."""
    for n in range(1, 4):
        dovecot.deliver("alice", message(n))
    client = logged_in(dovecot, pki)
    client.capabilities = client.capabilities - {"MOVE"}
    client.create("Done")
    client.select("INBOX")
    first, second, third = client.listing()
    client.store_flags([second.uid], ["\\Deleted"])
    client.move([first.uid], "Done")
    assert [entry.uid for entry in client.listing()] == [second.uid, third.uid]
    with pytest.raises(IMAPError, match="TRYCREATE|exist"):
        client.move([third.uid], "Nowhere")
    assert [entry.uid for entry in client.listing()] == [second.uid, third.uid]  # nothing lost
    client.logout()


# --- appending ----------------------------------------------------------------------------------------------------

def test_pipelined_append_with_appenduid(dovecot: DovecotServer, pki: TestPKI) -> None:
    from datetime import datetime

    client = logged_in(dovecot, pki)
    client.create("Imported")
    messages = [message(n, body) for n, body in enumerate(HARD_BODIES, 1)]
    when = datetime(2020, 2, 29, 12, 34, 56, tzinfo=UTC)
    for data in messages:
        client.send_append("Imported", [data[:10], data[10:]], len(data), flags=["\\Seen"], internaldate=when)
    assert client.in_flight == len(messages)
    results = [client.read_append() for _ in messages]
    selected = client.select("Imported")
    assert all(result.uidvalidity == selected.uidvalidity for result in results)
    uids = [result.uid for result in results]
    assert len(set(uids)) == len(uids) and None not in uids
    listed = client.listing()
    assert [entry.uid for entry in listed] == uids
    assert all("\\Seen" in entry.flags for entry in listed)
    assert list(fetch_all(client, [entry.uid for entry in listed]).values()) == [
        data.replace(b"\0", b"\x80") for data in messages]
    client.logout()


@pytest.mark.parametrize("capability", ["LITERAL+", "LITERAL-", None])
def test_append_with_each_kind_of_literal(dovecot: DovecotServer, pki: TestPKI, capability: str | None) -> None:
    client = logged_in(dovecot, pki)
    client.capabilities = client.capabilities - {"LITERAL+", "LITERAL-"} | ({capability} if capability else set())
    small, large = message(1), message(2, b"y" * 10_000 + b"\r\n")
    for data in (small, large, small):
        client.send_append("INBOX", [data], len(data))
    results = [client.read_append() for _ in range(3)]
    assert all(isinstance(result, AppendResult) and result.uid for result in results)
    client.select("INBOX")
    assert list(fetch_all(client, [entry.uid for entry in client.listing()]).values()) == [small, large, small]
    client.logout()


def test_append_to_a_missing_folder_says_trycreate(dovecot: DovecotServer, pki: TestPKI) -> None:
    client = logged_in(dovecot, pki)
    data = message(1)
    client.send_append("Missing", [data], len(data))
    client.send_append("INBOX", [data], len(data))
    with pytest.raises(IMAPError) as refused:
        client.read_append()
    assert refused.value.code == "TRYCREATE"
    assert client.read_append().uid is not None  # the next one in line is unaffected
    client.logout()


# --- IDLE ---------------------------------------------------------------------------------------------------------

def test_idle_sees_an_append_from_another_client(dovecot: DovecotServer, pki: TestPKI) -> None:
    import selectors

    watcher = logged_in(dovecot, pki)
    watcher.select("INBOX")
    watcher.idle_start()
    appender = logged_in(dovecot, pki)
    data = message(1)
    started = time.monotonic()
    appended = appender.append("INBOX", [data], len(data))  # the watcher's socket buffers what Dovecot says
    seen = False
    reads = []
    with selectors.DefaultSelector() as selector:
        selector.register(watcher.fileno(), selectors.EVENT_READ)
        while not seen and time.monotonic() - started < 10:
            if selector.select(timeout=1):
                seen = watcher.idle_read()
                reads.append((round(time.monotonic() - started, 3), seen))
    latency = time.monotonic() - started
    assert seen and latency < 5, (latency, appended, reads, watcher.exists)
    assert watcher.exists == 1
    watcher.idle_done()
    (entry,) = watcher.listing()
    assert fetch_all(watcher, [entry.uid]) == {entry.uid: data}
    watcher.logout()
    appender.logout()


def test_a_closed_session_raises_connection_errors(dovecot: DovecotServer, pki: TestPKI) -> None:
    client = logged_in(dovecot, pki)
    client.close()
    with pytest.raises(IMAPConnectionError):
        client.noop()


# --- against the scriptable fault server (postbote.testing.imapserver) ---------------------------------------------

def fault_server(faults: Faults | None = None, **options: object) -> IMAPServer:
    server = IMAPServer(["Archive"], faults=faults, **options)  # type: ignore[arg-type]
    for n in range(1, 4):
        server.add_message("INBOX", message(n))
    return server.start()


def on(server: IMAPServer, *, timeout: float = 5.0, deadline: float | None = None, login: bool = True,
       select: bool = True) -> IMAPClient:
    client = IMAPClient.connect(server.host, server.port, implicit_tls=False, tls=TLSPolicy(), timeout=timeout,
                                deadline=deadline)
    if login:
        client.login("demo", Secret("demo"))
    if login and select:
        client.select("INBOX")
    return client


def fetch_one(client: IMAPClient, uid: int, limit: int = 10**6) -> bytes | None:
    return fetch_all(client, [uid], limit)[uid]


def test_the_fault_server_serves_the_whole_client() -> None:
    with fault_server() as server:
        client = on(server)
        listed = client.listing()
        assert [entry.uid for entry in listed] == [1, 2, 3]
        assert fetch_all(client, [1, 2, 3, 9]) == {1: message(1), 2: message(2), 3: message(3), 9: None}
        client.store_flags([1], ["\\Seen"])
        assert [entry.uid for entry in client.listing(unseen_only=True)] == [2, 3]
        client.move([1], "Archive")
        assert client.append("Archive", [b"x\r\n"], 3) == AppendResult(server.uidvalidity("Archive"), 2)
        client.logout()
        assert server.errors == []


def test_starttls_discards_what_came_before_the_handshake(pki: TestPKI) -> None:
    """An attacker's injected response after the STARTTLS OK must not be read as coming through TLS."""
    faults = Faults().on("STARTTLS", action=Action.after(b"* CAPABILITY IMAP4rev1 INJECTED\r\n"))
    with fault_server(faults, starttls_context=pki.server_context()) as server:
        client = IMAPClient.connect(server.host, server.port, implicit_tls=False, tls=policy(pki), timeout=5)
        assert client.has("STARTTLS")
        client.starttls(policy(pki))
        assert client.encrypted and not client.has("INJECTED") and not client.has("STARTTLS")
        client.login("demo", Secret("demo"))
        client.logout()


def test_starttls_not_offered_by_the_fault_server(pki: TestPKI) -> None:
    with fault_server() as server:
        client = on(server, login=False)
        with pytest.raises(IMAPError, match="does not offer STARTTLS"):
            client.starttls(policy(pki))
        assert "STARTTLS" not in server.commands
        client.close()


def test_implicit_tls_against_the_fault_server(pki: TestPKI) -> None:
    with fault_server(ssl_context=pki.server_context()) as server:
        client = IMAPClient.connect(server.host, server.port, implicit_tls=True, tls=policy(pki), timeout=5)
        assert client.encrypted
        client.login("demo", Secret("demo"))
        client.logout()


def test_a_server_echoing_the_password_does_not_put_it_in_the_error() -> None:
    faults = Faults().on("LOGIN", action=Action.reply("{tag} NO [AUTHENTICATIONFAILED] wrong password s3cr3t!"))
    with fault_server(faults, users={"demo": "s3cr3t!"}) as server:
        client = on(server, login=False)
        with pytest.raises(IMAPAuthError) as refused:
            client.login("demo", Secret("s3cr3t!"))
        assert "s3cr3t!" not in str(refused.value) and "s3cr3t!" not in refused.value.text
        assert refused.value.code == "AUTHENTICATIONFAILED"
        client.login("demo", Secret("s3cr3t!"))
        client.logout()


@pytest.mark.parametrize("capabilities", [("IMAP4rev1", "LITERAL-"), ("IMAP4rev1",)])
def test_append_and_login_without_literal_plus_wait_for_the_continuation(capabilities: tuple[str, ...]) -> None:
    """The fault server refuses a non-synchronizing literal it did not offer: the client must not send one."""
    with fault_server(capabilities=(*capabilities, "AUTH=PLAIN")) as server:
        server.users["ünï"] = "pä\"ss"
        client = on(server, login=False)
        client.login("ünï", Secret("pä\"ss"))  # both need literals
        big = message(9, b"z" * 5000 + b"\r\n")
        for data in (message(8), big):
            client.send_append("INBOX", [data], len(data))
        assert [client.read_append() for _ in range(2)] == [AppendResult(None, None)] * 2
        assert [m.data for m in server.messages()][-2:] == [message(8), big]
        client.logout()


def test_without_uidplus_no_expunge_at_all() -> None:
    with fault_server(capabilities=("IMAP4rev1", "LITERAL+")) as server:
        client = on(server)
        client.store_flags([1], ["\\Deleted"])
        with pytest.raises(IMAPError, match="UIDPLUS"):
            client.uid_expunge([1])
        with pytest.raises(IMAPError, match="neither MOVE nor UIDPLUS"):
            client.move([1], "Archive")
        client.logout()
        assert not any("EXPUNGE" in command or "COPY" in command for command in server.commands)


def test_move_without_move_uses_copy_and_uid_expunge_only() -> None:
    with fault_server(capabilities=("IMAP4rev1", "LITERAL+", "UIDPLUS")) as server:
        server.messages()  # INBOX: 1 2 3
        client = on(server)
        client.store_flags([2], ["\\Deleted"])  # another client's deletion
        client.move([1, 3], "Archive")
        assert [m.uid for m in server.messages("INBOX")] == [2]
        assert [m.data for m in server.messages("Archive")] == [message(1), message(3)]
        assert "EXPUNGE" not in server.commands
        assert client.exists == 1
        client.logout()


def test_move_by_copy_says_what_was_copied_even_when_the_store_fails() -> None:
    faults = Faults().on("UID STORE", action=Action.no(text="read-only now"))
    with fault_server(faults, capabilities=("IMAP4rev1", "LITERAL+", "UIDPLUS")) as server:
        client = on(server)
        with pytest.raises(IMAPError, match="read-only now"):
            client.move([1, 3], "Archive")
        assert client.copied == {1: 1, 3: 2}  # the copies exist: a caller must not copy again
        assert [m.uid for m in server.messages("INBOX")] == [1, 2, 3]
        client.logout()
    with fault_server() as server:  # UID MOVE: [COPYUID] comes untagged, before the EXPUNGEs
        client = on(server)
        assert client.move([2, 3], "Archive") == {2: 1, 3: 2}
        client.logout()


def test_a_failed_copy_touches_nothing() -> None:
    faults = Faults().on("UID COPY", action=Action.no("OVERQUOTA", "over quota"))
    with fault_server(faults, capabilities=("IMAP4rev1", "LITERAL+", "UIDPLUS")) as server:
        client = on(server)
        with pytest.raises(IMAPError) as refused:
            client.move([1], "Archive")
        assert refused.value.code == "OVERQUOTA"
        assert [m.uid for m in server.messages("INBOX")] == [1, 2, 3]
        assert all("\\Deleted" not in m.flags for m in server.messages("INBOX"))
        client.logout()


def test_append_refusals_carry_their_code() -> None:
    faults = Faults().on("APPEND", action=Action.no("OVERQUOTA", "Quota exceeded"))
    with fault_server(faults) as server:
        client = on(server, select=False)
        data = message(7)
        client.send_append("INBOX", [data], len(data))
        client.send_append("INBOX", [data], len(data))
        with pytest.raises(IMAPError) as refused:
            client.read_append()
        assert (refused.value.code, refused.value.status, refused.value.text) == ("OVERQUOTA", "NO", "Quota exceeded")
        assert client.read_append().uid == 4
        client.logout()


def test_append_chunks_that_do_not_add_up_end_the_session() -> None:
    with fault_server() as server:
        client = on(server, select=False)
        with pytest.raises(IMAPProtocolError, match="not the 10"):
            client.send_append("INBOX", [b"12345"], 10)
        with pytest.raises(IMAPConnectionError):
            client.noop()


@pytest.mark.parametrize("action, error", [
    (Action.drop(), IMAPConnectionError),
    (Action.drop_midway(60), IMAPConnectionError),
    (Action.bye("going away"), IMAPConnectionError),
    (Action.before(b"garbage\r\n"), IMAPProtocolError),
    (Action.before(b"A9999 OK stray tagged answer\r\n"), IMAPProtocolError),
    (Action.after(b"A0001 OK an answer to nothing\r\n"), IMAPProtocolError),
    (Action.literal_delta(-5), IMAPProtocolError),
    (Action.literal_delta(+5), IMAPConnectionError),  # the literal eats the next lines: the rest never comes
    (Action.mutate(lambda data: data.replace(b"UID 2", b"UID 3")), IMAPProtocolError),
    (Action.mutate(lambda data: data.replace(b"BODY[]", b"BODY[] BODY[]")), IMAPProtocolError),
    (Action.mutate(lambda data: data.replace(b" OK ", b" MAYBE ")), IMAPProtocolError),
    (Action.reply("+ more please"), IMAPProtocolError),
    (Action.stall(3), IMAPConnectionError),
])
def test_a_misbehaving_fetch_ends_the_session(action: Action, error: type[Exception]) -> None:
    faults = Faults().on("UID FETCH", nth=2, action=action)  # nth=1: the listing
    with fault_server(faults) as server:
        client = on(server, timeout=1.0)
        client.listing()
        client.send_fetch(2, limit=10**6)
        received: list[bytes] = []
        with pytest.raises(error):
            client.read_fetched(received.append)
            client.noop()


def test_a_message_literal_over_the_limit_is_refused_before_it_is_read() -> None:
    with fault_server() as server:
        client = on(server)
        received: list[bytes] = []
        client.send_fetch(1, limit=10)
        with pytest.raises(LiteralTooLarge):
            client.read_fetched(received.append)
        assert received == []


def test_unsolicited_responses_are_absorbed_and_exists_tracked() -> None:
    faults = Faults().on("UID FETCH", nth=2, action=Action.before(
        b"* 3 EXPUNGE\r\n* 7 EXISTS\r\n* 1 RECENT\r\n* OK [ALERT] hello\r\n* 1 FETCH (FLAGS (\\Seen))\r\n"
        b"* 2 FETCH (UID 2 FLAGS ())\r\n"))
    with fault_server(faults) as server:
        client = on(server)
        client.listing()
        assert fetch_one(client, 1) == message(1)
        assert client.exists == 7
        client.logout()


def test_data_for_another_uid_is_never_returned() -> None:
    """A hostile server answers UID FETCH 1 with message 2's data (a UID no fetch in line asked for)."""
    faults = Faults().on("UID FETCH", arguments=r"^1 ", action=Action.mutate(
        lambda data: data.replace(b"UID 1 ", b"UID 2 ")))
    with fault_server(faults) as server:
        client = on(server)
        client.listing()
        with pytest.raises(IMAPProtocolError):
            fetch_one(client, 1)


def test_a_stray_line_after_a_fetch_is_caught_by_the_next_read() -> None:
    faults = Faults().on("UID FETCH", nth=2, action=Action.after(b"* 1 FETCH (UID 9 BODY[] {3}\r\nabc)\r\n"))
    with fault_server(faults) as server:
        client = on(server)
        client.listing()
        assert fetch_one(client, 1) == message(1)
        with pytest.raises(IMAPProtocolError):
            client.noop()


def test_malformed_listings_end_the_session() -> None:
    for mutation in (b"RFC822.SIZE x", b"RFC822.SIZE -1", b"FLAGS (\"x\")", b"UID 0 "):
        faults = Faults().on("UID FETCH", action=Action.mutate(
            lambda data, m=mutation: re.sub(rb"RFC822\.SIZE [0-9]+" if m.startswith(b"RFC") else
                                            rb"FLAGS \([^)]*\)" if m.startswith(b"FLAGS") else rb"UID [0-9]+ ",
                                            m, data, count=1)))
        with fault_server(faults) as server:
            client = on(server)
            with pytest.raises(IMAPProtocolError):
                client.listing()


def test_bounds_on_lines_and_response_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    from postbote.plugins.imap import client as client_module

    faults = Faults().on("NOOP", action=Action.before(b"* OK " + b"x" * (client_module.MAX_LINE + 10) + b"\r\n"))
    with fault_server(faults) as server:
        client = on(server)
        with pytest.raises(IMAPProtocolError, match="longer than"):
            client.noop()
    monkeypatch.setattr(client_module, "MAX_RESPONSES", 50)
    faults = Faults().on("NOOP", action=Action.before(b"* OK hello\r\n" * 60))
    with fault_server(faults) as server:
        client = on(server)
        with pytest.raises(IMAPProtocolError, match="more than 50 responses"):
            client.noop()


def test_timeouts_name_the_limit_that_expired() -> None:
    faults = Faults().on("NOOP", times=None, action=Action.trickle(0.2))
    with fault_server(faults) as server:
        client = on(server, timeout=1.0)
        started = time.monotonic()
        with pytest.raises(IMAPConnectionError, match="must arrive whole"):
            client.noop()
        assert time.monotonic() - started < 10
        client = on(server, timeout=30.0, deadline=time.monotonic() + 2.0)
        with pytest.raises(IMAPConnectionError, match="deadline"):
            client.noop()
        assert time.monotonic() - started < 15


def test_a_greeting_bye_is_a_connection_error() -> None:
    from postbote.testing.imapserver import GREETING

    faults = Faults().on(GREETING, action=Action.reply("* BYE too many connections"))
    with fault_server(faults) as server, pytest.raises(IMAPConnectionError, match="too many connections"):
        on(server, login=False)


def test_idle_against_the_fault_server() -> None:
    import selectors

    with fault_server() as server:
        client = on(server)
        client.idle_start()
        server.add_message("INBOX", message(4))
        with selectors.DefaultSelector() as selector:
            selector.register(client.fileno(), selectors.EVENT_READ)
            assert selector.select(timeout=5)
            assert client.idle_read()
        assert client.exists == 4
        client.idle_done()
        assert fetch_one(client, 4) == message(4)
        client.idle_start()
        server.disconnect_all(bye="maintenance")
        with selectors.DefaultSelector() as selector:
            selector.register(client.fileno(), selectors.EVENT_READ)
            assert selector.select(timeout=5)
            with pytest.raises(IMAPConnectionError):
                while True:
                    client.idle_read()


def test_idle_ended_by_the_server_is_reported_as_news() -> None:
    faults = Faults().on("IDLE", action=Action.reply("+ idling\r\n{tag} OK IDLE terminated (timeout)"))
    with fault_server(faults) as server:
        client = on(server)
        assert client.idle_start() and not client.idling  # the OK came with the "+"
        client.idle_done()  # a no-op now
        client.noop()
        assert not client.idle_start()  # the second IDLE is a real one
        assert client.idling
        client.idle_done()
        client.logout()


def test_exists_while_idle_starts_is_not_lost() -> None:
    faults = Faults().on("IDLE", action=Action.before(b"* 4 EXISTS\r\n"))
    with fault_server(faults) as server:
        client = on(server)
        assert client.idle_start() and client.exists == 4 and client.idling
        client.idle_done()
        client.logout()


def test_idle_refused_or_cut() -> None:
    faults = Faults().on("IDLE", action=Action.no(text="no IDLE here")).on("IDLE", nth=2, action=Action.drop())
    with fault_server(faults) as server:
        client = on(server)
        with pytest.raises(IMAPError, match="no IDLE here"):
            client.idle_start()
        client.noop()
        with pytest.raises(IMAPConnectionError):
            client.idle_start()


def test_a_200_mb_message_streams_in_little_memory(dovecot: DovecotServer, pki: TestPKI) -> None:
    """Issue 13: the literal goes into the sink in pieces, never held whole (the poller's bound is < 64 MB RSS;
    Python's own allocations while the message streams are measured here)."""
    import hashlib
    import tracemalloc

    line = b"0123456789abcdefghijklmnopqrstuvwxyz" * 27 + b"\r\n"
    size_target = 200 * 1024 * 1024
    expected = hashlib.sha256()
    path = dovecot.deliver("alice", b"")  # a placeholder that owns its name; filled before Dovecot looks
    with path.open("wb") as out:
        head = b"Subject: big\r\n\r\n"
        out.write(head)
        expected.update(head)
        written = len(head)
        block = line * 256
        while written < size_target:
            out.write(block)
            expected.update(block)
            written += len(block)
    client = logged_in(dovecot, pki, tls="none")
    client.select("INBOX")
    (entry,) = client.listing()
    assert entry.size == written
    got = hashlib.sha256()
    tracemalloc.start()
    try:
        client.send_fetch(entry.uid, limit=entry.size)
        size = client.read_fetched(got.update)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert size == written and got.digest() == expected.digest()
    assert peak < 8 * 1024 * 1024, f"{peak / 1e6:.1f} MB allocated while streaming"
    client.logout()


def test_idle_ended_by_the_server_later() -> None:
    import selectors

    faults = Faults().on("IDLE", action=Action.before(b"+ idling\r\n", then=Action.stall(
        0.3, then=Action.reply("* 5 EXISTS\r\n{tag} OK IDLE terminated"))))
    with fault_server(faults) as server:
        client = on(server)
        assert not client.idle_start() and client.idling
        with selectors.DefaultSelector() as selector:
            selector.register(client.fileno(), selectors.EVENT_READ)
            assert selector.select(timeout=5)
            assert client.idle_read() and not client.idling and client.exists == 5
            assert not selector.select(timeout=0.2)  # everything that came was read
        client.idle_done()
        client.logout()


def test_message_numbers_and_uids_must_agree() -> None:
    """A FETCH that says message 1 has UID 2, when the listing said UID 1, is out of step; EXPUNGE shifts the
    numbers (message 3 becomes 2) and is followed."""
    faults = Faults().on("UID FETCH", nth=3, action=Action.before(b"* 1 FETCH (UID 2 FLAGS (\\Seen))\r\n"))
    with fault_server(faults) as server:
        client = on(server)
        client.listing()
        client.store_flags([2], ["\\Deleted"])
        client.uid_expunge([2])  # * 2 EXPUNGE: UID 3 is message 2 now
        assert fetch_one(client, 3) == message(3)
        with pytest.raises(IMAPProtocolError, match="message 1 has UID 2, but it has UID 1"):
            fetch_one(client, 1)
    faults = Faults().on("NOOP", action=Action.before(b"* 9 EXPUNGE\r\n"))
    with fault_server(faults) as server:
        client = on(server)
        with pytest.raises(IMAPProtocolError, match="EXPUNGE of message 9, but 3 exist"):
            client.noop()


def test_a_failing_sink_or_chunk_source_ends_the_session() -> None:
    def full_disk(data: bytes) -> None:
        raise OSError(28, "No space left on device")

    def failing_chunks() -> Iterator[bytes]:
        yield b"Subject: x\r\n"
        raise OSError(5, "I/O error")

    with fault_server() as server:
        client = on(server)
        client.send_fetch(1, limit=10**6)
        with pytest.raises(OSError, match="No space"):
            client.read_fetched(full_disk)
        with pytest.raises(IMAPConnectionError):
            client.noop()
        client = on(server)
        with pytest.raises(OSError, match="I/O error"):
            client.send_append("INBOX", failing_chunks(), 100)
        with pytest.raises(IMAPConnectionError):
            client.noop()


# --- the fault server's own semantics (what the source and destination fault tests rely on) -----------------------

def test_fault_server_uidvalidity_change_and_gmail_ids() -> None:
    with fault_server(gmail=True) as server:
        client = on(server, select=False)
        before = client.select("INBOX").uidvalidity
        listed = client.listing(gmail=True)
        assert all(entry.gm_msgid for entry in listed) and len({entry.gm_msgid for entry in listed}) == 3
        after = server.renumber("INBOX")
        assert after != before and client.select("INBOX").uidvalidity == after
        client.logout()


def test_fault_server_list_patterns_examine_and_bare_expunge() -> None:
    with fault_server() as server:
        server.add_folder("Lists/python")
        server.add_folder("Lists/rust")
        client = on(server, select=False)
        assert {f.name for f in client.list_folders("Lists/%")} == {"Lists/python", "Lists/rust"}
        assert {f.name for f in client.list_folders("*")} == {"INBOX", "Archive", "Lists/python", "Lists/rust"}
        client.select("INBOX", read_only=True)
        with pytest.raises(IMAPError, match="read-only"):
            client.store_flags([1], ["\\Seen"])
        client.logout()
        assert server.messages()[0].flags == set()


def test_fault_server_counts_faults_per_matching_command() -> None:
    faults = Faults().on("UID FETCH", arguments="PEEK\\[\\]", nth=2, action=Action.no("UNAVAILABLE", "try later"))
    with fault_server(faults) as server:
        client = on(server)
        client.listing()  # not counted: no BODY.PEEK[]
        assert fetch_all(client, [1, 2, 3]) == {1: message(1), 2: None, 3: message(3)}
        assert faults.fired == ["UID FETCH 2 (UID BODY.PEEK[])"]
        client.logout()
        assert server.errors == []


def test_fault_server_tells_each_session_of_others_expunges_and_appends() -> None:
    """Two sessions on one folder: what one expunges or appends reaches the other as EXPUNGE / EXISTS before any
    answer that numbers messages, so the client's number checks hold as against a real server."""
    with fault_server() as server:
        first, second = on(server), on(server)
        second.store_flags([1], ["\\Deleted"])
        second.uid_expunge([1])
        server.add_message("INBOX", message(4))
        assert [entry.uid for entry in first.listing()] == [2, 3, 4] and first.exists == 3
        assert fetch_all(first, [2, 4]) == {2: message(2), 4: message(4)}
        first.logout()
        second.logout()
        assert server.errors == []


def test_idle_read_never_waits_for_what_has_not_come() -> None:
    """A readable socket may hold no whole response (half a line; with TLS 1.3 perhaps no data at all): idle_read
    takes what is there and returns at once instead of waiting up to the timeout in the watcher's thread."""
    faults = Faults().on("IDLE", action=Action.before(b"+ idling\r\n* 5 EXI", then=Action.stall(30)))
    with fault_server(faults) as server:
        client = on(server, timeout=30.0)
        client.idle_start()
        started = time.monotonic()
        assert not client.idle_read()  # half a line: nothing to report yet
        assert not client.idle_read()  # nothing more has come: no wait either
        assert time.monotonic() - started < 10
        assert client.idling
        client.close()


def test_a_large_append_streams_in_little_memory(dovecot: DovecotServer, pki: TestPKI) -> None:
    """APPEND writes the message as its chunks come (small ones gathered into 64 KiB writes), never whole."""
    import hashlib
    import tracemalloc

    line = b"appended line of a large message, " * 3 + b"\r\n"
    head = b"Subject: large append\r\n\r\n"
    count = 1_000_000
    length = len(head) + len(line) * count

    def chunks() -> Iterator[bytes]:
        yield head
        for _ in range(count // 1000):
            yield line * 1000

    client = logged_in(dovecot, pki, tls="none")
    tracemalloc.start()
    try:
        result = client.append("INBOX", chunks(), length)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.uid is not None and peak < 4 * 1024 * 1024, f"{peak / 1e6:.1f} MB"
    client.select("INBOX")
    expected = hashlib.sha256(head)
    for _ in range(count // 1000):
        expected.update(line * 1000)
    got = hashlib.sha256()
    client.send_fetch(result.uid, limit=length)
    assert client.read_fetched(got.update) == length and got.digest() == expected.digest()
    client.logout()


def test_list_answers_as_servers_vary_them() -> None:
    faults = Faults().on("LIST", action=Action.reply(
        '* LIST (\\HasChildren) "/" Inbox\r\n* LIST (\\Noselect) NIL {5}\r\nlit/x ("CHILDINFO" ("SUBSCRIBED"))\r\n'
        '* LIST () "." "Entw&APw-rfe"\r\n{tag} OK done'))
    with fault_server(faults) as server:
        client = on(server, select=False)
        assert client.list_folders() == [
            FolderInfo("INBOX", "/", frozenset({"\\HASCHILDREN"})),
            FolderInfo("lit/x", None, frozenset({"\\NOSELECT"})),
            FolderInfo("Entwürfe", ".", frozenset())]
        client.logout()


def test_append_answers_are_matched_by_their_tags_and_a_second_answer_to_one_tag_is_out_of_step() -> None:
    """An answer tagged for the second APPEND may come before the first's (a server may finish pipelined APPENDs in
    any order): it is the second's, never the first's. A server that then answers that tag again is out of step."""
    faults = Faults().on("APPEND", action=Action.before(b"A0003 OK [APPENDUID 1000 99] early\r\n"))
    with fault_server(faults) as server:
        client = on(server, select=False)
        data = message(5)
        client.send_append("INBOX", [data], len(data))
        client.send_append("INBOX", [data], len(data))
        assert client.read_append().uid != 99
        assert client.read_append() == AppendResult(1000, 99)
        with pytest.raises(IMAPProtocolError, match="tagged 'A0003'"):
            client.noop()
    faults = Faults().on("APPEND", action=Action.mutate(lambda answer: answer.replace(b"APPENDUID", b"APPENDUID x")))
    with fault_server(faults) as server:
        client = on(server, select=False)
        with pytest.raises(IMAPProtocolError, match="APPENDUID"):
            client.append("INBOX", [data], len(data))


def test_pipelined_appends_answered_out_of_order_each_get_their_own_answer() -> None:
    """A server may store pipelined APPENDs side by side and answer the one it finished first (RFC 3501 5.5):
    each answer goes to the APPEND its tag names, and the session stays in step."""
    import socket
    import threading

    ours, theirs = socket.socketpair()
    tags: list[str] = []

    def server() -> None:
        theirs.sendall(b"* OK [CAPABILITY IMAP4rev1 LITERAL+ UIDPLUS] ready\r\n")
        received = b""
        while len(tags) < 2:
            received += theirs.recv(65536)
            tags[:] = re.findall(rb"^(\S+) APPEND ", received, re.MULTILINE)
            tags[:] = [tag.decode() for tag in tags]
            if len(tags) == 2 and not received.endswith(b"\r\n"):
                tags.clear()
        theirs.sendall(f"{tags[1]} OK [APPENDUID 7 2] second\r\n{tags[0]} OK [APPENDUID 7 1] first\r\n".encode())

    thread = threading.Thread(target=server, daemon=True)
    thread.start()
    client = IMAPClient(ours, host="test", timeout=5)
    client.read_greeting()
    for number in (1, 2):
        data = message(number)
        client.send_append("INBOX", [data], len(data))
    assert [client.read_append() for _ in range(2)] == [AppendResult(7, 1), AppendResult(7, 2)]
    assert client.in_flight == 0
    thread.join(5)
    ours.close()
    theirs.close()
