"""The IMAP client against a real Dovecot (issue 13, "The IMAP client").

Each test talks to a fresh Dovecot (fixture ``dovecot``) with `IMAPClient` directly: greeting and capabilities,
STARTTLS and implicit TLS with the test CA, LOGIN and AUTHENTICATE, folders, the listing, pipelined fetches whose
bytes are exactly what was delivered, flags, UID EXPUNGE of only the given UIDs, MOVE, pipelined APPEND with
APPENDUID, and IDLE seeing another client's APPEND.
"""

from __future__ import annotations

import base64
import threading
import time
from datetime import UTC

import pytest
from postbote import Secret
from postbote.plugins.imap.client import (
    AppendResult,
    IMAPAuthError,
    IMAPClient,
    IMAPConnectionError,
    IMAPError,
    LiteralTooLarge,
)
from postbote.plugins.signin.sasl import Plain
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
    client.move([first.uid, third.uid], "Done")
    assert [entry.uid for entry in client.listing()] == [second.uid]
    client.select("Done")
    moved = client.listing()
    assert len(moved) == 2
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
    threading.Thread(target=appender.append, args=("INBOX", [data], len(data))).start()
    seen = False
    with selectors.DefaultSelector() as selector:
        selector.register(watcher.fileno(), selectors.EVENT_READ)
        while not seen and time.monotonic() - started < 10:
            if selector.select(timeout=1):
                seen = watcher.idle_read()
    latency = time.monotonic() - started
    assert seen and latency < 5, latency
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
