"""postbote end to end: a real Dovecot in front, a real SMTP server behind.

Each test is one clause of the acceptance list.  postbote is driven the way a
user drives it -- a YAML config file and the ``poll`` / ``retry`` / ``check``
commands -- in process through ``postbote.cli.main`` or, where its output
matters, as ``python -m postbote``.

Delivery contract: postbote prepends exactly one ``Received:`` trace field and
passes the message through otherwise byte for byte, with CRLF line endings on
the SMTP wire.  Exit codes: 0 all accounts fine, 1 some account failed,
2 usage or configuration error.
"""

from __future__ import annotations

import base64
import random
import re
import subprocess
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import DovecotFactory
from tests.harness import Postbote, make_message, strip_trace_header, to_crlf, uidls
from tests.servers import free_port
from tests.servers.certs import TestPKI
from tests.servers.dovecot import DovecotServer
from tests.servers.smtp_sink import SMTPSink

# -- messages ------------------------------------------------------------------


def delivered_bodies(sink: SMTPSink) -> list[bytes]:
    """The accepted messages without postbote's trace field."""
    return [strip_trace_header(message.data) for message in sink.messages]


def lone_dot_line() -> bytes:
    return make_message("lone dot", b"before\n.\nafter\n")


def leading_dots() -> bytes:
    return make_message("leading dots", b".one dot\n..two dots\n...three\n. space\n.\n..\nend\n")


def eight_bit() -> bytes:
    return make_message(
        "8bit",
        "Grüße in UTF-8: ÄÖÜ äöü ß €\n".encode() + "Latin-1: ÄÖÜ äöü ß\n".encode("latin-1"),
        headers=b"X-Latin-1: Gr\xfc\xdfe\n" + "X-UTF-8: Grüße €\n".encode(),
    )


def very_long_line() -> bytes:
    """One 100 KB line that must arrive unfolded."""
    return make_message("long line", b"<p>" + b"a" * 100_000 + b"</p>\n", headers=b"Content-Type: text/html\n")


def big_attachment() -> bytes:
    """A multipart message carrying about 5 MB of base64."""
    payload = base64.encodebytes(random.Random(5).randbytes(3_800_000))
    return make_message(
        "attachment",
        b"--sep\n"
        b"Content-Type: text/plain\n\nSee attachment.\n"
        b"--sep\n"
        b"Content-Type: application/octet-stream\n"
        b"Content-Transfer-Encoding: base64\n"
        b'Content-Disposition: attachment; filename="blob.bin"\n\n' + payload + b"--sep--\n",
        headers=b'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="sep"\n',
    )


def stored_with_crlf() -> bytes:
    return to_crlf(make_message("crlf in the maildir", b"line 1\nline 2\n"))


# -- driving postbote --------------------------------------------------------


def output_of(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


def account(
    dovecot: DovecotServer, sink: SMTPSink, user: str = "alice", **overrides: Any
) -> dict[str, Any]:
    """An account fetching *user*'s mail over plain POP3 into *sink*.

    ``tls: none`` keeps the tests not about TLS simple; the TLS tests override it.
    """
    config: dict[str, Any] = {
        "name": user,
        "host": dovecot.host,
        "port": dovecot.pop3_port,
        "tls": "none",
        "username": user,
        "password": dovecot.password(user),
        "deliver": {
            "smtp": {
                "host": sink.host,
                "port": sink.port,
                "recipients": [f"{user}@example.org"],
                "starttls": False,
            }
        },
    }
    config.update(overrides)
    return config


# -- fetching, delivering, deleting ----------------------------------------------


@pytest.mark.dovecot
def test_poll_delivers_every_message_to_the_recipients_and_empties_the_mailbox(
    dovecot: DovecotServer, smtp_sink: SMTPSink, postbote: Postbote
) -> None:
    messages = [make_message(f"message {n}") for n in range(3)]
    for message in messages:
        dovecot.deliver("alice", message)
    postbote.configure([account(dovecot, smtp_sink)])

    assert postbote.poll() == 0

    assert [m.rcpt_tos for m in smtp_sink.messages] == [["alice@example.org"]] * 3
    assert sorted(delivered_bodies(smtp_sink)) == sorted(map(to_crlf, messages))
    assert dovecot.count("alice") == 0


@pytest.mark.dovecot
def test_keep_leaves_messages_on_the_server_and_delivers_each_only_once(
    dovecot: DovecotServer, smtp_sink: SMTPSink, postbote: Postbote
) -> None:
    first, second, later = make_message("first"), make_message("second"), make_message("later")
    dovecot.deliver("alice", first)
    dovecot.deliver("alice", second)
    postbote.configure([account(dovecot, smtp_sink, keep=True)])

    assert postbote.poll() == 0
    assert sorted(delivered_bodies(smtp_sink)) == sorted([to_crlf(first), to_crlf(second)])
    assert dovecot.count("alice") == 2

    assert postbote.poll() == 0
    assert len(smtp_sink.messages) == 2, "a kept message was delivered again"

    dovecot.deliver("alice", later)
    assert postbote.poll() == 0
    assert delivered_bodies(smtp_sink)[2:] == [to_crlf(later)]
    assert dovecot.count("alice") == 3


@pytest.mark.dovecot
def test_message_delivered_but_not_deleted_is_deleted_later_without_redelivery(
    dovecot: DovecotServer, smtp_sink: SMTPSink, postbote: Postbote
) -> None:
    """Models a crash or lost connection between delivery and DELE/QUIT: the
    next poll that may delete must delete the message, not deliver it again."""
    dovecot.deliver("alice", make_message("delivered once"))
    postbote.configure([account(dovecot, smtp_sink, keep=True)])
    assert postbote.poll() == 0
    assert dovecot.count("alice") == 1

    postbote.configure([account(dovecot, smtp_sink, keep=False)])
    assert postbote.poll() == 0

    assert dovecot.count("alice") == 0
    assert len(smtp_sink.messages) == 1


# -- SMTP answers ----------------------------------------------------------------


@pytest.mark.dovecot
def test_temporary_smtp_refusal_leaves_messages_on_the_server_for_the_next_poll(
    dovecot: DovecotServer, smtp_sink: SMTPSink, postbote: Postbote
) -> None:
    messages = [make_message(f"deferred {n}") for n in range(3)]
    for message in messages:
        dovecot.deliver("alice", message)
    postbote.configure([account(dovecot, smtp_sink)])
    smtp_sink.respond_with("451 4.3.0 try later")

    # A temporary refusal is not an account failure, but mail that waits makes the poll exit 1 (issue 11, item 17).
    assert postbote.poll() == 1
    assert smtp_sink.attempts, "postbote did not even try to deliver"
    assert smtp_sink.messages == []
    assert dovecot.count("alice") == 3

    smtp_sink.reset()
    assert postbote.poll() == 0
    assert sorted(delivered_bodies(smtp_sink)) == sorted(map(to_crlf, messages))
    assert dovecot.count("alice") == 0


@pytest.mark.dovecot
def test_permanently_rejected_message_stays_on_the_server_and_is_not_retried_until_released(
    dovecot: DovecotServer, smtp_sink: SMTPSink, postbote: Postbote
) -> None:
    message = make_message("rejected")
    dovecot.deliver("alice", message)
    postbote.configure([account(dovecot, smtp_sink)])
    smtp_sink.respond_with("550 5.7.1 message refused")

    postbote.poll()  # whether a rejection fails the account is not part of the contract
    assert len(smtp_sink.attempts) == 1
    assert dovecot.count("alice") == 1

    postbote.poll()
    assert len(smtp_sink.attempts) == 1, "a rejected message was sent again without `retry`"
    assert dovecot.count("alice") == 1

    smtp_sink.reset()
    assert postbote.retry("alice") == 0
    assert postbote.poll() == 0
    assert delivered_bodies(smtp_sink) == [to_crlf(message)]
    assert dovecot.count("alice") == 0


@pytest.mark.dovecot
def test_retry_with_uids_releases_only_those_rejected_messages(
    dovecot: DovecotServer, smtp_sink: SMTPSink, postbote: Postbote
) -> None:
    held, released = make_message("stays rejected"), make_message("released")
    dovecot.deliver("alice", held)
    dovecot.deliver("alice", released)
    postbote.configure([account(dovecot, smtp_sink)])
    smtp_sink.respond_with("550 5.7.1 message refused")
    postbote.poll()
    assert len(smtp_sink.attempts) == 2

    smtp_sink.reset()
    assert postbote.retry("alice", uidls(dovecot, "alice")[1]) == 0
    assert postbote.poll() == 0

    assert delivered_bodies(smtp_sink) == [to_crlf(released)]
    assert dovecot.messages("alice") == [held]


# -- several accounts --------------------------------------------------------------


@pytest.mark.dovecot
def test_all_accounts_of_a_config_are_delivered(
    dovecot: DovecotServer, smtp_sink: SMTPSink, postbote: Postbote
) -> None:
    dovecot.deliver("alice", make_message("for alice"))
    dovecot.deliver("bob", make_message("for bob"))
    shared = {"host": dovecot.host, "port": dovecot.pop3_port, "tls": "none"}
    accounts = []
    for user in ("alice", "bob"):
        entry = account(dovecot, smtp_sink, user)
        for key in shared:  # these come from `defaults:`
            del entry[key]
        accounts.append(entry)
    postbote.configure(accounts, defaults=shared)

    assert postbote.poll() == 0

    received = {(m.rcpt_tos[0], strip_trace_header(m.data)) for m in smtp_sink.messages}
    assert received == {
        ("alice@example.org", to_crlf(make_message("for alice"))),
        ("bob@example.org", to_crlf(make_message("for bob"))),
    }
    assert dovecot.count("alice") == dovecot.count("bob") == 0


@pytest.mark.dovecot
def test_wrong_password_fails_that_account_but_not_the_others(
    dovecot: DovecotServer, smtp_sink: SMTPSink, postbote: Postbote
) -> None:
    dovecot.deliver("alice", make_message("for alice"))
    dovecot.deliver("bob", make_message("for bob"))
    postbote.configure(
        [
            account(dovecot, smtp_sink, "bob", password="not-bobs-password"),
            account(dovecot, smtp_sink, "alice"),
        ]
    )

    assert postbote.poll() == 1

    assert [m.rcpt_tos for m in smtp_sink.messages] == [["alice@example.org"]]
    assert dovecot.count("alice") == 0
    assert dovecot.count("bob") == 1


# -- TLS -------------------------------------------------------------------------


@pytest.mark.dovecot
def test_starttls_fails_closed_when_the_server_does_not_offer_stls(
    dovecot_factory: DovecotFactory, smtp_sink: SMTPSink, postbote: Postbote, pki: TestPKI
) -> None:
    plain_only = dovecot_factory(tls=False)
    plain_only.deliver("alice", make_message("must not leak"))
    postbote.configure([account(plain_only, smtp_sink, tls="starttls", tls_ca_file=str(pki.ca_file))])
    mark = plain_only.log_mark()

    result = postbote.run_process("poll")

    assert result.returncode == 1, output_of(result)
    assert re.search(r"STLS|STARTTLS", output_of(result), re.IGNORECASE), output_of(result)
    assert smtp_sink.attempts == []
    assert plain_only.count("alice") == 1
    # Neither USER/PASS nor AUTH reached the server: Dovecot counts no attempt.
    plain_only.wait_for_log(r"pop3-login: .*Disconnected.*\(no auth attempts", since=mark)
    assert "Login: user=<alice>" not in plain_only.new_log(mark)


@pytest.mark.dovecot
def test_starttls_with_the_configured_ca_delivers(
    dovecot: DovecotServer, smtp_sink: SMTPSink, postbote: Postbote
) -> None:
    message = make_message("via stls")
    dovecot.deliver("alice", message)
    postbote.configure([account(dovecot, smtp_sink, tls="starttls", tls_ca_file=str(dovecot.ca_file))])
    mark = dovecot.log_mark()

    assert postbote.poll() == 0

    assert delivered_bodies(smtp_sink) == [to_crlf(message)]
    assert dovecot.count("alice") == 0
    dovecot.wait_for_log(r"Login: user=<alice>.*\bTLS\b", since=mark)


@pytest.mark.dovecot
def test_implicit_tls_with_the_configured_ca_delivers(
    dovecot: DovecotServer, smtp_sink: SMTPSink, postbote: Postbote
) -> None:
    message = make_message("via pop3s")
    dovecot.deliver("alice", message)
    postbote.configure(
        [account(dovecot, smtp_sink, tls="implicit", port=dovecot.pop3s_port, tls_ca_file=str(dovecot.ca_file))]
    )

    assert postbote.poll() == 0

    assert delivered_bodies(smtp_sink) == [to_crlf(message)]
    assert dovecot.count("alice") == 0


@pytest.mark.dovecot
def test_implicit_tls_rejects_a_certificate_the_system_does_not_trust(
    dovecot: DovecotServer, smtp_sink: SMTPSink, postbote: Postbote
) -> None:
    dovecot.deliver("alice", make_message("must not leak"))
    postbote.configure([account(dovecot, smtp_sink, tls="implicit", port=dovecot.pop3s_port)])
    mark = dovecot.log_mark()

    result = postbote.run_process("poll")

    assert result.returncode == 1, output_of(result)
    assert re.search(r"certificate", output_of(result), re.IGNORECASE), output_of(result)
    assert smtp_sink.attempts == []
    assert dovecot.count("alice") == 1
    assert "Login: user=<alice>" not in dovecot.new_log(mark)


# -- byte-exact delivery ---------------------------------------------------------


@pytest.mark.dovecot
@pytest.mark.parametrize(
    "make",
    [lone_dot_line, leading_dots, eight_bit, very_long_line, big_attachment, stored_with_crlf],
    ids=["lone-dot-line", "leading-dots", "8bit-latin1-and-utf8", "100KB-line", "5MB-base64-attachment", "crlf-stored"],
)
def test_message_arrives_byte_for_byte_apart_from_the_trace_field(
    make: Callable[[], bytes], dovecot: DovecotServer, smtp_sink: SMTPSink, postbote: Postbote
) -> None:
    message = make()
    dovecot.deliver("alice", message)
    postbote.configure([account(dovecot, smtp_sink)])

    assert postbote.poll() == 0

    [delivered] = smtp_sink.messages
    assert strip_trace_header(delivered.data) == to_crlf(message)
    assert dovecot.count("alice") == 0


@pytest.mark.dovecot
def test_received_field_is_well_formed(dovecot: DovecotServer, smtp_sink: SMTPSink, postbote: Postbote) -> None:
    dovecot.deliver("alice", make_message("trace"))
    postbote.configure([account(dovecot, smtp_sink)])

    assert postbote.poll() == 0

    data = smtp_sink.messages[0].data
    trace = data[: len(data) - len(strip_trace_header(data))]
    unfolded = re.sub(rb"\r\n[ \t]", b" ", trace).rstrip(b"\r\n")
    assert b"\r\n" not in unfolded
    assert all(len(line) <= 998 for line in trace.split(b"\r\n"))
    assert b";" in unfolded, "a Received: field ends with '; date-time' (RFC 5322 3.6.7)"


# -- limits ----------------------------------------------------------------------


@pytest.mark.dovecot
def test_message_larger_than_max_size_stays_on_the_server_and_the_others_are_delivered(
    dovecot: DovecotServer, smtp_sink: SMTPSink, postbote: Postbote
) -> None:
    small_1, small_2 = make_message("small 1"), make_message("small 2")
    too_big = make_message("too big", (b"y" * 76 + b"\n") * 28_000)  # ~2.2 MB
    for message in (small_1, too_big, small_2):
        dovecot.deliver("alice", message)
    postbote.configure([account(dovecot, smtp_sink, max_size="1MB")])

    postbote.poll()  # skipping an oversized message is policy; its exit code is not specified here

    assert sorted(delivered_bodies(smtp_sink)) == sorted([to_crlf(small_1), to_crlf(small_2)])
    assert dovecot.messages("alice") == [too_big]


# -- configuration ---------------------------------------------------------------


@pytest.mark.dovecot
def test_check_lists_accounts_without_revealing_secrets(
    dovecot: DovecotServer, smtp_sink: SMTPSink, postbote: Postbote
) -> None:
    postbote.configure([account(dovecot, smtp_sink, password="s3cr3t-Pa55word")])

    result = postbote.run_process("check")

    assert result.returncode == 0, output_of(result)
    assert "alice" in output_of(result)
    assert "s3cr3t-Pa55word" not in output_of(result)


@pytest.mark.dovecot
def test_check_connect_logs_in_and_shows_what_a_poll_would_find_without_touching_anything(
    dovecot: DovecotServer, smtp_sink: SMTPSink, postbote: Postbote, pki: TestPKI
) -> None:
    """``check --connect``: the login used, the capabilities, the certificate with its SHA-256 ready to pin, and
    the messages a poll would fetch; nothing is fetched, deleted or recorded."""
    for subject in ("one", "two"):
        dovecot.deliver("alice", make_message(subject))
    postbote.configure([account(dovecot, smtp_sink, tls="implicit", port=dovecot.pop3s_port,
                                tls_ca_file=str(pki.ca_file)),
                        account(dovecot, smtp_sink, user="bob", password="wrong-password")])

    result = postbote.run_process("check", "--connect")

    output = output_of(result)
    assert result.returncode == 1, output  # bob's password is wrong
    assert "alice: connecting to alice@127.0.0.1:" in output and "logged in (" in output
    assert "capabilities: " in output and "UIDL" in output
    assert "certificate: subject " in output and "tls_fingerprint: " in output
    assert "2 message(s)" in output and "2 not delivered yet (a poll would fetch them)" in output
    assert "bob: connecting" in output and "FAILED: " in output
    assert dovecot.password("alice") not in output and "wrong-password" not in output
    assert dovecot.count("alice") == 2 and smtp_sink.messages == []
    assert postbote.run_process("check", "--connect", "alice").returncode == 0


@pytest.mark.dovecot
def test_check_connect_does_not_count_a_message_over_max_size_as_one_a_poll_would_fetch(
    dovecot: DovecotServer, smtp_sink: SMTPSink, postbote: Postbote
) -> None:
    """The count ``check --connect`` gives is the one a poll acts on: a message over max_size stays on the server."""
    too_big = make_message("too big", (b"y" * 76 + b"\n") * 28_000)  # ~2.2 MB
    for message in (make_message("small 1"), too_big, make_message("small 2")):
        dovecot.deliver("alice", message)
    postbote.configure([account(dovecot, smtp_sink, max_size="1MB")])

    result = postbote.run_process("check", "--connect")

    output = output_of(result)
    assert result.returncode == 0, output
    assert "3 not delivered yet (a poll would fetch 2: 1 larger than max_size, left on the server)" in output
    postbote.poll()
    assert len(smtp_sink.messages) == 2 and dovecot.messages("alice") == [too_big]


@pytest.mark.dovecot
def test_check_connect_counts_messages_delivered_before_that_fetch_all_fetches_again(
    dovecot: DovecotServer, smtp_sink: SMTPSink, postbote: Postbote
) -> None:
    for subject in ("one", "two"):
        dovecot.deliver("alice", make_message(subject))
    postbote.configure([account(dovecot, smtp_sink, keep=True)])
    assert postbote.poll() == 0

    kept = output_of(postbote.run_process("check", "--connect"))
    postbote.configure([account(dovecot, smtp_sink, keep=True, fetch_all=True)])
    result = postbote.run_process("check", "--connect")

    assert "2 message(s)" in kept and "0 not delivered yet" in kept and "a poll would fetch" not in kept
    output = output_of(result)
    assert result.returncode == 0, output
    assert "0 not delivered yet (a poll would fetch 2: 2 delivered before, fetched again: fetch_all)" in output
    assert len(smtp_sink.messages) == 2 and dovecot.count("alice") == 2


def test_config_with_an_inline_password_readable_by_others_is_refused(
    smtp_sink: SMTPSink, postbote: Postbote
) -> None:
    postbote.configure(
        [
            {
                "name": "alice",
                "host": "127.0.0.1",
                "port": free_port(),
                "tls": "none",
                "username": "alice",
                "password": "inline-secret",
                "deliver": {"smtp": {"host": smtp_sink.host, "port": smtp_sink.port, "recipients": ["a@example.org"]}},
            }
        ],
        mode=0o644,
    )

    assert postbote.poll() == 2
    assert smtp_sink.attempts == []
