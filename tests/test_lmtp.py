"""Delivery over LMTP into a real Dovecot (issue #3): every recipient must answer 250, or nothing counts."""

from __future__ import annotations

import pytest
from postbote.smtp import SMTPClient

from tests.harness import Postbote, make_message, strip_trace_header, to_crlf
from tests.servers.dovecot import DovecotServer

pytestmark = pytest.mark.dovecot


def lmtp_account(dovecot: DovecotServer, target: dict[str, object]) -> dict[str, object]:
    return {"name": "alice", "host": dovecot.host, "port": dovecot.pop3_port, "tls": "none", "username": "alice",
            "password": dovecot.password("alice"), "deliver": {"lmtp": target}}


def after_our_trace(stored: bytes) -> bytes:
    """What Dovecot stored, less the fields its own LMTP delivery put on top and our trace field."""
    lines = stored.split(b"\n")
    ours = next(i for i, line in enumerate(lines) if line.startswith(b"Received: from 127.0.0.1 by "))
    return strip_trace_header(b"\r\n".join(lines[ours:]))


@pytest.mark.parametrize("via", ["socket", "tcp"])
def test_messages_reach_every_lmtp_recipient_byte_exact_and_leave_the_server(
        dovecot: DovecotServer, postbote: Postbote, via: str) -> None:
    originals = [make_message("first"), make_message("second", b".\n..dots\n\xc3\xa4 8-bit\n")]
    for data in originals:
        dovecot.deliver("alice", data)
    where: dict[str, object] = ({"socket": str(dovecot.lmtp_socket)} if via == "socket"
                                else {"host": dovecot.host, "port": dovecot.lmtp_port})
    postbote.configure([lmtp_account(dovecot, {**where, "recipients": ["bob", "alice"]})])
    assert postbote.poll() == 0
    assert dovecot.count("bob") == 2
    assert sorted(after_our_trace(m) for m in dovecot.messages("bob")) == sorted(to_crlf(o) for o in originals)
    assert dovecot.count("alice") == 2  # the copies LMTP delivered back to alice; the fetched ones are gone
    assert all(b"Received: from 127.0.0.1 by " in m for m in dovecot.messages("alice"))


def test_an_unknown_lmtp_recipient_rejects_the_whole_message_and_it_stays_on_the_server(
        dovecot: DovecotServer, postbote: Postbote) -> None:
    dovecot.deliver("alice", make_message("for two"))
    postbote.configure([lmtp_account(dovecot, {"socket": str(dovecot.lmtp_socket),
                                               "recipients": ["bob", "nobody-here"]})])
    postbote.poll()
    assert dovecot.count("bob") == 0, "no recipient gets the message unless all of them accept it"
    assert dovecot.count("alice") == 1
    result = postbote.run_process("poll")
    assert dovecot.count("bob") == 0 and dovecot.count("alice") == 1
    assert '"listed": 1' in result.stderr and '"rejected": 0' in result.stderr, "rejected once, not every poll"


def test_dovecot_offers_chunking_and_takes_messages_sent_as_bdat_byte_exact(
        dovecot: DovecotServer, postbote: Postbote) -> None:
    """With one recipient and a server offering CHUNKING (Dovecot's LMTP does), each message goes out as MAIL, RCPT
    and BDAT in one write, its answer read while the next is fetched; a message over 1 MiB is sent in chunks."""
    client = SMTPClient.connect(host=dovecot.host, port=dovecot.lmtp_port, timeout=10, lmtp=True, helo="test")
    try:
        assert {"CHUNKING", "PIPELINING"} <= set(client.extensions)
    finally:
        client.quit()
    big_body = b"".join(b"line %d of a long message, and some padding to make it longer\n" % i for i in range(30_000))
    originals = [make_message("small"), make_message("dots", b".\n..\n.x\n\xc3\xa4\n"), make_message("big", big_body),
                 make_message("after the big one")]
    for data in originals:
        dovecot.deliver("alice", data)
    postbote.configure([lmtp_account(dovecot, {"host": dovecot.host, "port": dovecot.lmtp_port,
                                               "recipients": ["bob"]})])

    assert postbote.poll() == 0

    assert sorted(after_our_trace(m) for m in dovecot.messages("bob")) == sorted(to_crlf(o) for o in originals)
    assert dovecot.count("alice") == 0
