"""Security: TLS verified by default (with a CA file or a SHA-256 pin for self-signed servers, TLS 1.2 at least),
no downgrade from ``starttls``, secrets that never show, ``password_command`` without a shell, and hostile servers
that cannot exhaust memory.

TLS is proven against a real Dovecot presenting a real self-signed certificate; the scriptable POP3 server plays the
servers Dovecot cannot be made to be (TLS 1.1 only, STLS refused or faked, floods).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from postbote.errors import CredentialError
from postbote.plugins.signin import passwords
from postbote.plugins.signin.passwords import PasswordSource
from postbote.testing.pop3server import Action, Faults
from postbote.tls import TLSPolicy

from tests.conftest import DovecotFactory, SinkFactory
from tests.harness import (
    MaildirTarget,
    Rig,
    RigFactory,
    Run,
    SinkTarget,
    corpus,
    run_postbote,
)
from tests.servers.certs import TestPKI, openssl_binary
from tests.servers.dovecot import DovecotServer
from tests.servers.smtp_sink import SMTPSink

pytestmark = pytest.mark.usefixtures("time_limit")

SECRET = "pw-Zebra-7731-do-not-print"
MEMORY_BOUND = 256 << 20  # bytes: a poll idles at about 35 MB; 2,000,000 listed messages take about 140 MB


# --- a real Dovecot with a self-signed certificate ---------------------------------------------------


class SelfSigned:
    """A self-signed certificate for localhost/127.0.0.1 (or other names) and its key, made with openssl."""

    def __init__(self, directory: Path, subject: str = "/CN=localhost",
                 names: str = "DNS:localhost,IP:127.0.0.1") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.cert = directory / "self-signed.pem"
        self.key = directory / "self-signed.key"
        subprocess.run([openssl_binary(), "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-nodes", "-keyout", str(self.key), "-out", str(self.cert), "-subj", subject,
                        "-addext", f"subjectAltName={names}", "-days", "2"],
                       check=True, capture_output=True, timeout=60)
        self.key.chmod(0o600)

    @property
    def sha256(self) -> str:
        der = ssl.PEM_cert_to_DER_cert(self.cert.read_text())
        digest = hashlib.sha256(der).hexdigest().upper()
        return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


@pytest.fixture
def self_signed(tmp_path: Path) -> SelfSigned:
    return SelfSigned(tmp_path / "pki")


@pytest.fixture
def dovecot_self_signed(dovecot_factory: DovecotFactory, self_signed: SelfSigned) -> DovecotServer:
    """Dovecot presenting the self-signed certificate (the later ssl_cert/ssl_key settings win)."""
    server = dovecot_factory(extra_config=f"ssl_cert = <{self_signed.cert}\nssl_key = <{self_signed.key}\n")
    for number in (1, 2):
        server.deliver("alice", corpus(2)[number - 1].replace(b"\r\n", b"\n"))
    return server


class DovecotAccount:
    """Polls alice's Dovecot mailbox into a Maildir, the way a user would configure it."""

    def __init__(self, directory: Path, dovecot: DovecotServer) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.dovecot = dovecot
        self.maildir = MaildirTarget(directory / "Maildir")

    def poll(self, **account: object) -> tuple[int, str]:
        import yaml

        entry = {"name": "alice", "host": "127.0.0.1", "port": self.dovecot.pop3s_port, "tls": "implicit",
                 "username": "alice", "password": self.dovecot.password("alice"), "timeout": "10s",
                 "deliver": self.maildir.deliver(), **account}
        config = self.directory / "postbote.yaml"
        config.write_text(yaml.safe_dump({"state_dir": str(self.directory / "state"),
                                          "log": {"level": "debug", "format": "json"}, "accounts": [entry]}))
        config.chmod(0o600)
        run = run_postbote(config, "poll", timeout=60)
        return run.status, run.output


@pytest.fixture
def alice(tmp_path: Path, dovecot_self_signed: DovecotServer) -> DovecotAccount:
    return DovecotAccount(tmp_path / "alice", dovecot_self_signed)


def test_a_self_signed_server_is_refused_by_default_and_nothing_is_sent(alice: DovecotAccount) -> None:
    mark = alice.dovecot.log_mark()

    status, output = alice.poll()

    assert status == 1 and "certificate" in output and "not trusted" in output
    assert alice.maildir.delivered() == [] and alice.dovecot.count("alice") == 2
    assert "Login: user=<alice>" not in alice.dovecot.new_log(mark)


def test_a_refused_certificate_is_shown_with_the_line_that_would_pin_it(alice: DovecotAccount,
                                                                         self_signed: SelfSigned) -> None:
    """Implicit TLS: the error names the presented certificate's SHA-256, ready to paste, with the warning that
    pinning an unverified certificate trusts whoever answered."""
    status, output = alice.poll()

    assert status == 1 and f"tls_fingerprint: {self_signed.sha256}" in output
    assert "out of band" in output and "set tls_ca_file" in output


def test_with_tls_ca_file_set_a_refused_certificate_does_not_suggest_setting_it(alice: DovecotAccount,
                                                                               tmp_path: Path) -> None:
    other = SelfSigned(tmp_path / "other")

    status, output = alice.poll(tls_ca_file=str(other.cert))

    assert status == 1 and "not trusted" in output and "set tls_ca_file" not in output
    assert "tls_fingerprint:" in output


def test_a_refused_certificate_is_shown_with_its_subject_and_names(alice: DovecotAccount) -> None:
    """The user can tell whose certificate it is before pinning it: subject and names next to the fingerprint."""
    status, output = alice.poll()

    assert status == 1
    assert "presented a certificate for CN=localhost (names: localhost, 127.0.0.1) with SHA-256 fingerprint" in output


def test_a_hostname_mismatch_names_what_the_certificate_holds_and_gives_no_ca_file_advice(
        dovecot_factory: DovecotFactory, tmp_path: Path) -> None:
    """The certificate is trusted (its own tls_ca_file) but for other names: the error lists them; a CA file would
    not help, so none is suggested."""
    other = SelfSigned(tmp_path / "mail-pki", subject="/O=Example/CN=mail.example.org",
                       names="DNS:mail.example.org,DNS:pop.example.org")
    server = dovecot_factory(extra_config=f"ssl_cert = <{other.cert}\nssl_key = <{other.key}\n")
    account = DovecotAccount(tmp_path / "alice", server)

    status, output = account.poll(tls_ca_file=str(other.cert))

    assert status == 1 and "not trusted" in output and "mismatch" in output
    assert "the certificate is for mail.example.org, pop.example.org: connect to a name it holds" in output
    assert "set tls_ca_file" not in output


def test_a_certificate_that_cannot_be_parsed_still_shows_why_it_was_refused_and_its_fingerprint(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Describing the certificate is for the message only: a parse failure leaves the reason and the pin line."""
    from postbote import tls

    garbage = b"\x30\x82\xff\xffnot a certificate"
    monkeypatch.setattr(tls, "_presented_certificate", lambda probe, timeout: garbage)
    refused = ssl.SSLCertVerificationError(1, "certificate verify failed")
    refused.verify_message = "self-signed certificate"

    message = TLSPolicy()._untrusted(refused, "alice@127.0.0.1:995", tls._Probe(("127.0.0.1", 995)), 5.0)

    pin = ":".join(f"{byte:02X}" for byte in hashlib.sha256(garbage).digest())
    assert message.startswith("TLS certificate of alice@127.0.0.1:995 not trusted: self-signed certificate")
    assert f"tls_fingerprint: {pin}" in message and "presented a certificate with SHA-256" in message


def test_starttls_to_an_untrusted_server_shows_the_certificate_and_the_line_that_pins_it(
        alice: DovecotAccount, self_signed: SelfSigned) -> None:
    """After STLS the certificate is read again on a second connection that says only the greeting's answer and
    STLS; no login goes out on either."""
    mark = alice.dovecot.log_mark()

    status, output = alice.poll(tls="starttls", port=alice.dovecot.pop3_port)

    assert status == 1 and "not trusted" in output and f"tls_fingerprint: {self_signed.sha256}" in output
    assert "presented a certificate for CN=localhost" in output and "out of band" in output
    assert "Login: user=<alice>" not in alice.dovecot.new_log(mark)
    assert alice.poll(tls="starttls", port=alice.dovecot.pop3_port, tls_fingerprint=self_signed.sha256)[0] == 0


def test_when_the_second_connection_cannot_read_the_certificate_the_openssl_command_is_given(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from postbote import tls

    monkeypatch.setattr(tls, "_presented_certificate", lambda probe, timeout: None)
    refused = ssl.SSLCertVerificationError(1, "certificate verify failed")
    refused.verify_message = "self-signed certificate"

    message = TLSPolicy()._untrusted(refused, "alice@127.0.0.1:110", None, 5.0)

    assert "not trusted: self-signed certificate" in message and "-starttls pop3|imap|smtp" in message


def test_implicit_tls_against_a_plain_text_port_says_so(alice: DovecotAccount) -> None:
    status, output = alice.poll(tls="implicit", port=alice.dovecot.pop3_port)

    assert status == 1 and "this port speaks plain text" in output and "tls: starttls" in output


def test_starttls_against_a_tls_port_says_so(alice: DovecotAccount) -> None:
    """The server waits for a TLS handshake while postbote waits for a greeting: the timeout says why."""
    status, output = alice.poll(tls="starttls", port=alice.dovecot.pop3s_port, timeout="1s")

    assert status == 1 and "timed out" in output and "tls: implicit" in output


def test_a_self_signed_server_is_accepted_with_its_certificate_as_tls_ca_file(alice: DovecotAccount,
                                                                                self_signed: SelfSigned) -> None:
    status, output = alice.poll(tls_ca_file=str(self_signed.cert))

    assert status == 0, output
    assert len(alice.maildir.delivered()) == 2 and alice.dovecot.count("alice") == 0


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
def test_a_self_signed_server_is_accepted_with_its_pinned_sha256_fingerprint(
        alice: DovecotAccount, self_signed: SelfSigned, tls: str) -> None:
    port = alice.dovecot.pop3s_port if tls == "implicit" else alice.dovecot.pop3_port

    status, output = alice.poll(tls=tls, port=port, tls_fingerprint=self_signed.sha256)

    assert status == 0, output
    assert len(alice.maildir.delivered()) == 2 and alice.dovecot.count("alice") == 0


def test_a_wrong_pin_is_refused_even_with_a_trusting_ca_file(alice: DovecotAccount, self_signed: SelfSigned) -> None:
    wrong = ":".join(["AB"] * 32)

    status, output = alice.poll(tls_fingerprint=wrong, tls_ca_file=str(self_signed.cert))

    assert status == 1 and "does not match tls_fingerprint" in output
    assert self_signed.sha256 in output, "the error should show the fingerprint the server presented"
    assert alice.dovecot.count("alice") == 2 and alice.maildir.delivered() == []


def test_a_server_offering_only_tls_1_1_is_refused(make_rig: RigFactory, self_signed: SelfSigned) -> None:
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    old.load_cert_chain(self_signed.cert, self_signed.key)
    with pytest.warns(DeprecationWarning):  # as it should be
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    rig = make_rig(corpus(1), ssl_context=old)

    stats = rig.poll(tls="implicit", tls_ca_file=str(self_signed.cert))

    assert not stats.ok and "TLS handshake" in (stats.error or "")
    assert rig.server.commands == [] and rig.audit().on_server == (1,)
    assert TLSPolicy().context().minimum_version == ssl.TLSVersion.TLSv1_2


# --- no downgrade -----------------------------------------------------------------------------------


def smtp_with_starttls(sink: SMTPSink, **options: object) -> dict[str, object]:
    return {"smtp": {"host": sink.host, "port": sink.port, "recipients": ["me@example.org"], "starttls": True,
                     "timeout": "5s", **options}}


def test_starttls_to_the_mta_fails_closed_when_it_is_not_offered(make_rig: RigFactory, smtp_sink: SMTPSink) -> None:
    rig = make_rig(corpus(1), target=SinkTarget(smtp_sink))

    stats = rig.poll(deliver=smtp_with_starttls(smtp_sink))

    assert stats.deferred == 1 and smtp_sink.attempts == [], "the message went to the MTA in clear"
    assert rig.audit().on_server == (1,)


def test_starttls_to_the_mta_verifies_its_certificate(make_rig: RigFactory, smtp_sink_factory: SinkFactory,
                                                      pki: TestPKI) -> None:
    sink = smtp_sink_factory(starttls=True)
    rig = make_rig(corpus(2), target=SinkTarget(sink))

    untrusted = rig.poll(deliver=smtp_with_starttls(sink), max_messages=1)

    assert untrusted.deferred == 1 and sink.attempts == []
    trusted = rig.poll(deliver=smtp_with_starttls(sink, tls_ca_file=str(pki.ca_file)))
    assert trusted.delivered == 2 and all(attempt.tls for attempt in sink.attempts)
    assert rig.audit().everything_delivered_once_and_deleted



def no_credentials_sent(rig: Rig) -> bool:
    return not any(command.split(" ", 1)[0].upper() in ("USER", "PASS", "APOP", "AUTH")
                   for command in rig.server.commands)


def test_starttls_fails_closed_when_the_server_does_not_offer_stls(make_rig: RigFactory) -> None:
    rig = make_rig(corpus(1))  # no starttls_context: CAPA lists no STLS

    stats = rig.poll(tls="starttls")

    assert not stats.ok and "STLS" in (stats.error or "")
    assert no_credentials_sent(rig) and rig.audit().on_server == (1,)


@pytest.mark.parametrize("reply", ["-ERR TLS not available right now", "+OK Begin TLS negotiation"],
                         ids=["STLS refused", "STLS answered but TLS never starts"])
def test_starttls_fails_closed_when_stls_fails(make_rig: RigFactory, self_signed: SelfSigned, reply: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(self_signed.cert, self_signed.key)
    rig = make_rig(corpus(1), Faults().on("STLS", action=Action.reply(reply)), starttls_context=context)

    stats = rig.poll(tls="starttls", tls_ca_file=str(self_signed.cert), timeout="1s")

    assert not stats.ok
    assert no_credentials_sent(rig) and rig.audit().on_server == (1,)


def test_starttls_works_when_the_server_does_it_right(make_rig: RigFactory, self_signed: SelfSigned) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(self_signed.cert, self_signed.key)
    rig = make_rig(corpus(1), starttls_context=context)

    assert rig.poll(tls="starttls", tls_ca_file=str(self_signed.cert)).delivered == 1


# --- secrets ----------------------------------------------------------------------------------------------


@pytest.fixture
def secret_rig(make_rig: RigFactory) -> Rig:
    return make_rig(corpus(3), users={"demo": SECRET})


def test_the_password_never_appears_in_logs_errors_check_output_or_the_process_title(secret_rig: Rig) -> None:
    seen: list[str] = []

    def process_title(pid: int) -> None:
        for name in ("cmdline", "comm"):
            with contextlib.suppress(OSError):  # it may have exited already
                seen.append(Path(f"/proc/{pid}/{name}").read_bytes().decode(errors="replace"))

    config = secret_rig.configure(password=SECRET)
    outputs = [run_postbote(config, "check").output]
    for log_format in ("json", "console"):
        outputs.append(run_postbote(config, "--log-level", "debug", "--log-format", log_format, "poll",
                                    while_running=process_title).output)
    secret_rig.server.add_message(corpus(4)[3])
    secret_rig.server.faults = Faults().on("PASS", action=Action.drop())
    outputs.append(run_postbote(config, "--log-level", "debug", "poll").output)  # error while sending PASS
    secret_rig.server.faults = Faults().on("PASS", action=Action.reply("-ERR [AUTH] Authentication failed"))
    outputs.append(run_postbote(config, "--log-level", "debug", "poll").output)  # login refused
    outputs.append(run_postbote(secret_rig.configure(password=SECRET, port=1), "--log-level", "debug",
                                "poll").output)  # cannot connect

    assert len(secret_rig.target.delivered()) == 3, "the poll that should succeed did not"
    assert seen, "the process title was never read"
    everything = "\n".join(outputs + seen)
    assert "PASS ********" in everything and "login refused" in everything
    assert SECRET not in everything
    assert SECRET.encode() not in (secret_rig.state_dir / "postbote.sqlite3").read_bytes()


@pytest.mark.parametrize("mode", [0o604, 0o660, 0o644])  # 0640 for postbote's own group is allowed: test_config
def test_an_inline_password_in_a_file_group_or_others_can_read_is_refused(secret_rig: Rig, mode: int) -> None:
    config = secret_rig.configure(password=SECRET)
    config.chmod(mode)

    run = run_postbote(config, "poll")

    assert run.status == 2 and f"(mode {mode:04o})" in run.output and SECRET not in run.output
    assert secret_rig.server.commands == []


def test_a_password_file_others_can_read_is_refused(secret_rig: Rig, tmp_path: Path) -> None:
    password_file = tmp_path / "password"
    password_file.write_text(SECRET + "\n")
    password_file.chmod(0o644)
    config = secret_rig.configure(password=None, password_file=str(password_file))

    run = run_postbote(config, "poll")

    assert run.status == 1 and "is readable by other users" in run.output and SECRET not in run.output
    assert no_credentials_sent(secret_rig)


def test_password_command_runs_without_a_shell(secret_rig: Rig, tmp_path: Path) -> None:
    """Every shell metacharacter reaches the program as it is: nothing is expanded, substituted or globbed."""
    literal = "a;b|c && $(echo x) `id` * ~ $HOME"
    secret_rig.server.users["demo"] = literal
    echo = [sys.executable, "-c", "import sys; print(sys.argv[1])", literal]

    stats = secret_rig.poll(password=None, password_command=echo)

    assert stats.ok and stats.delivered == 3


@pytest.mark.parametrize(("argv", "error"), [
    ([sys.executable, "-c", "import sys; sys.stderr.write('vault is locked\\n'); sys.exit(3)"],
     "exited with status 3: vault is locked"),
    (["/nonexistent/pass"], "/nonexistent/pass: no such program"),
    ([sys.executable, "-c", "pass"], "printed nothing"),
], ids=["fails", "missing", "prints nothing"])
def test_a_failing_password_command_is_a_clear_error_and_no_login_is_tried(
        secret_rig: Rig, argv: list[str], error: str) -> None:
    stats = secret_rig.poll(password=None, password_command=argv)

    assert not stats.ok and "password_command: " in (stats.error or "") and error in (stats.error or "")
    assert no_credentials_sent(secret_rig)


def test_a_password_command_that_hangs_is_killed_after_the_timeout(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    """The 30 s limit, shortened here to one second; the program is killed, not left behind."""
    monkeypatch.setattr(passwords, "PASSWORD_COMMAND_TIMEOUT", 1.0)
    pid_file = tmp_path / "pid"
    hang = [sys.executable, "-c", f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
                                  "time.sleep(60)"]

    with pytest.raises(CredentialError, match="did not finish within 1 s"):
        PasswordSource("password_command", command=tuple(hang)).resolve()

    assert not Path(f"/proc/{pid_file.read_text()}").exists(), "the hanging password command was left running"


# --- hostile servers cannot exhaust memory ---------------------------------------------------------------

FLOODS = {
    "millions of UIDL lines": ("UIDL", Action.flood(b"1 abc"), "more than 2000000 lines"),
    "millions of LIST lines": ("LIST", Action.flood(b"1 12345"), "more than 2000000 lines"),
    "endless CAPA": ("CAPA", Action.flood(b"X-CAPABILITY"), "more than 1000 lines"),
    # USER is answered, then the flood comes: cut off as too long a line, or as data before PASS goes out.
    "a reply line without end": ("USER", Action.flood(b"+OK " + b"x" * (1 << 20)),
                                 "reply line longer than|sent data nobody asked for"),
    "endless RETR data": ("RETR", Action.flood(b"z" * 998), "message data exceeds"),
}


def poll_against_a_flood(rig: Rig) -> Run:
    return run_postbote(rig.configure(timeout="20s"), "poll", timeout=60, address_space=2 << 30)


@pytest.mark.parametrize("flood", FLOODS.values(), ids=FLOODS.keys())
def test_a_flooding_server_is_cut_off_within_bounded_memory(make_rig: RigFactory,
                                                            flood: tuple[str, Action, str]) -> None:
    command, action, error = flood
    rig = make_rig(corpus(2), Faults().on(command, action=action))

    run = poll_against_a_flood(rig)

    assert run.status == 1 and re.search(error, run.output) and "Traceback" not in run.output
    assert run.peak_rss < MEMORY_BOUND, f"peak RSS {run.peak_rss_mb:.0f} MB"
    assert rig.audit().on_server == (1, 2)


def test_long_listing_lines_are_cut_off_within_bounded_memory(make_rig: RigFactory) -> None:
    rig = make_rig(corpus(2), Faults().on("UIDL", action=Action.flood(b"1 " + b"u" * 8000, count=40_000)))

    run = poll_against_a_flood(rig)

    assert run.status == 1 and "Traceback" not in run.output
    assert run.peak_rss < MEMORY_BOUND, f"peak RSS {run.peak_rss_mb:.0f} MB for 320 MB of listing"



def test_a_tls_policy_builds_its_context_once_until_the_contexts_are_forgotten() -> None:
    """Loading the CA store costs 16-20 ms of CPU per context: one per policy, shared by every connection, and built
    again after a reload (`forget_contexts`), so that a CA file replaced on disk is read then."""
    from postbote.tls import TLSPolicy, forget_contexts

    verified, pinned = TLSPolicy(), TLSPolicy(fingerprint="ab" * 32)
    assert verified.context() is TLSPolicy().context()
    assert pinned.context() is not verified.context()
    assert pinned.context().verify_mode.name == "CERT_NONE" and verified.context().verify_mode.name == "CERT_REQUIRED"
    before = verified.context()
    forget_contexts()
    assert verified.context() is not before


def test_reading_a_refused_certificate_again_after_starttls_is_bounded_in_time() -> None:
    """A server that trickles its greeting a byte at a time cannot hold the error path: the second connection's
    STARTTLS exchange takes its timeout in all, not a timeout per byte."""
    import socket
    import threading
    import time

    from postbote import StartTLS
    from postbote.tls import _presented_certificate, _Probe

    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle() -> None:
        connection, _ = listener.accept()
        with connection:
            while not stop.is_set():
                with contextlib.suppress(OSError):
                    connection.sendall(b"+")
                time.sleep(0.05)

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        started = time.monotonic()
        probe = _Probe(listener.getsockname()[:2], StartTLS(b"+OK", b"STLS", b"+OK"))
        assert _presented_certificate(probe, 1.0) is None
        assert time.monotonic() - started < 10  # a timeout per byte would take 1,024 x 1 s
    finally:
        stop.set()
        listener.close()
        thread.join(5)
