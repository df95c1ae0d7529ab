"""One SSL context per TLS policy and resumed TLS sessions, without weakening a check (issue 16).

Building a context loads the CA store, which cost an empty poll more than half its CPU; now a policy's context is
built once and shared. Sessions are resumed where the server allows it. Dovecot, as found here: with its default
login processes (one process per connection, ``service_count = 1``) no session is ever resumed, since each process
has its own ticket keys and session cache; with ``service_count = 0`` (one process serving many connections, the
configuration Dovecot recommends for many logins) sessions are resumed, over TLS 1.2 and 1.3.

The checks stay on every connection: a server that swapped its certificate (and so its ticket keys) is checked
anew, and fails the pin or the CA.
"""

from __future__ import annotations

import io
import json
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from postbote.config import load_config
from postbote.jobs import plugins_started
from postbote.pluginmanager import make_plugin_manager
from postbote.poller import Poller
from postbote.state import StateStore
from postbote.tls import TLSError, TLSPolicy, certificate_facts, forget_contexts

from tests.harness import capture_logging, write_config
from tests.servers.certs import TestPKI, make_test_pki
from tests.servers.dovecot import DovecotServer

pytestmark = pytest.mark.usefixtures("time_limit")

MANY_LOGINS_PER_PROCESS = "service pop3-login {\n  service_count = 0\n}\n"


@pytest.fixture(autouse=True)
def _fresh_contexts() -> Iterator[None]:
    forget_contexts()
    yield
    forget_contexts()


@pytest.fixture
def tls_log() -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """The ``tls.connected`` events logged meanwhile (postbote at debug level)."""
    stream = io.StringIO()
    restore = capture_logging(stream)

    def events() -> list[dict[str, Any]]:
        lines = (json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{"))
        return [event for event in lines if event.get("event") == "tls.connected"]

    yield events
    restore()


@pytest.fixture
def context_builds(monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    """The CA files each newly built context loaded (the real `ssl.create_default_context` does the work)."""
    built: list[str | None] = []
    real = ssl.create_default_context

    def counted(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        built.append(kwargs.get("cafile"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ssl, "create_default_context", counted)
    return built


def poll_everyone(tmp_path: Path, server: DovecotServer, ca_file: Path, rounds: int = 1) -> list[bool]:
    """``rounds`` polls of one account per Dovecot user over POP3S, in process as ``postbote poll`` does them."""
    accounts = [{"name": user, "host": server.host, "port": server.pop3s_port, "tls": "implicit",
                 "tls_ca_file": str(ca_file), "username": user, "password": password, "timeout": "10s",
                 "deliver": {"maildir": str(tmp_path / "Maildir")}} for user, password in server.users.items()]
    path = write_config(tmp_path / "postbote.yaml", accounts)
    pm = make_plugin_manager(entry_points=False)
    config = load_config(path, pm)
    store = StateStore(config.state_dir)
    try:
        with plugins_started(pm, config):
            poller = Poller(pm, store)
            return [poller.poll(account).ok for _ in range(rounds) for account in config.accounts]
    finally:
        store.close()


def test_polls_of_accounts_on_one_dovecot_share_one_context(tmp_path: Path, dovecot: DovecotServer, pki: TestPKI,
                                                            context_builds: list[str | None]) -> None:
    assert poll_everyone(tmp_path, dovecot, pki.ca_file, rounds=2) == [True] * 4
    assert context_builds == [str(pki.ca_file)], "the CA store is loaded once for every poll of the policy"


def test_dovecot_serving_many_logins_per_process_resumes_the_session(
        tmp_path: Path, dovecot_factory: Callable[..., DovecotServer], pki: TestPKI,
        tls_log: Callable[[], list[dict[str, Any]]]) -> None:
    server = dovecot_factory(extra_config=MANY_LOGINS_PER_PROCESS)
    assert poll_everyone(tmp_path, server, pki.ca_file) == [True, True]
    assert [event["resumed"] for event in tls_log()] == [False, True], "bob's poll resumes alice's session"


def test_dovecot_with_one_login_process_per_connection_gets_full_handshakes(
        tmp_path: Path, dovecot: DovecotServer, pki: TestPKI, tls_log: Callable[[], list[dict[str, Any]]]) -> None:
    assert poll_everyone(tmp_path, dovecot, pki.ca_file) == [True, True]
    assert [event["resumed"] for event in tls_log()] == [False, False]


def test_another_ca_file_makes_another_context(tmp_path: Path, pki: TestPKI) -> None:
    other = make_test_pki(tmp_path / "other")
    assert TLSPolicy(ca_file=str(pki.ca_file)).context() is TLSPolicy(ca_file=str(pki.ca_file)).context()
    assert TLSPolicy(ca_file=str(other.ca_file)).context() is not TLSPolicy(ca_file=str(pki.ca_file)).context()


# --- a server that can resume sessions and swap its certificate: are the checks still made?


class SwappableTLSServer:
    """A TLS server on loopback that answers each connection with a greeting; `present` changes the certificate
    (and with it the context, whose ticket keys a session offered later was made with). ``resumes=False``: no
    session ticket, no session cache -- every handshake is a full one."""

    def __init__(self, pki: TestPKI, *, resumes: bool = True) -> None:
        self.context = pki.server_context()
        if not resumes:
            self.context.options |= ssl.OP_NO_TICKET
            self.context.num_tickets = 0  # TLS 1.3 resumes by tickets only
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def present(self, pki: TestPKI) -> None:
        self.context = pki.server_context()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            try:
                with self.context.wrap_socket(raw, server_side=True) as tls:
                    tls.sendall(b"+OK hello\r\n")
                    tls.recv(100)  # until the client closes
            except (OSError, ssl.SSLError):
                raw.close()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def swappable(pki: TestPKI) -> Iterator[SwappableTLSServer]:
    server = SwappableTLSServer(pki)
    yield server
    server.close()


def connect(policy: TLSPolicy, port: int) -> dict[str, str]:
    """A connection through ``policy`` that reads the greeting (which carries a TLS 1.3 session ticket), then closes
    (which keeps the session); the certificate's facts."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    wrapped = policy.wrap(sock, "localhost", f"localhost:{port}", implicit=True)
    try:
        assert wrapped.recv(100).startswith(b"+OK")
        return certificate_facts(wrapped)
    finally:
        wrapped.close()


def pin_of(pki: TestPKI) -> str:
    import hashlib

    der = ssl.PEM_cert_to_DER_cert(pki.cert_file.read_text())
    return hashlib.sha256(der).hexdigest()


def test_a_pinned_server_that_swapped_its_certificate_fails_the_pin_though_a_session_was_kept(
        tmp_path: Path, pki: TestPKI, swappable: SwappableTLSServer,
        tls_log: Callable[[], list[dict[str, Any]]]) -> None:
    pinned = TLSPolicy(fingerprint=pin_of(pki))
    connect(pinned, swappable.port)
    connect(pinned, swappable.port)
    assert [event["resumed"] for event in tls_log()] == [False, True], "this server resumes sessions"
    swappable.present(make_test_pki(tmp_path / "impostor"))
    with pytest.raises(TLSError, match="does not match tls_fingerprint"):
        connect(pinned, swappable.port)
    with pytest.raises(TLSError, match="does not match tls_fingerprint"):
        connect(pinned, swappable.port)


def test_a_verified_server_that_swapped_its_certificate_fails_verification_though_a_session_was_kept(
        tmp_path: Path, pki: TestPKI, swappable: SwappableTLSServer,
        tls_log: Callable[[], list[dict[str, Any]]]) -> None:
    verified = TLSPolicy(ca_file=str(pki.ca_file))
    connect(verified, swappable.port)
    assert connect(verified, swappable.port)["sha256"].replace(":", "").lower() == pin_of(pki)
    assert [event["resumed"] for event in tls_log()] == [False, True]
    swappable.present(make_test_pki(tmp_path / "impostor"))
    with pytest.raises(TLSError, match="not trusted"):
        connect(verified, swappable.port)


def test_a_session_is_offered_only_to_the_policy_and_server_it_was_made_with(
        tmp_path: Path, pki: TestPKI, swappable: SwappableTLSServer,
        tls_log: Callable[[], list[dict[str, Any]]]) -> None:
    verified, pinned = TLSPolicy(ca_file=str(pki.ca_file)), TLSPolicy(fingerprint=pin_of(pki))
    connect(verified, swappable.port)
    connect(pinned, swappable.port)
    other = SwappableTLSServer(pki)  # the same certificate on another port
    try:
        connect(verified, other.port)
    finally:
        other.close()
    forget_contexts()  # a reload
    connect(verified, swappable.port)
    assert [event["resumed"] for event in tls_log()] == [False, False, False, False]


@pytest.fixture
def sessions_taken(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the sessions taken from closed connections (Python copies each: a third of an empty poll's CPU)."""
    from postbote.tls import _session_keeping_socket

    taken: list[int] = []
    socket_class = _session_keeping_socket()
    real: property = ssl.SSLSocket.__dict__["session"]

    def counted(self: ssl.SSLSocket) -> ssl.SSLSession | None:
        taken.append(1)
        return real.fget(self)  # type: ignore[misc]

    monkeypatch.setattr(socket_class, "session", property(counted, real.fset), raising=False)
    return taken


def test_a_session_the_server_resumes_is_taken_once_and_offered_again(
        pki: TestPKI, swappable: SwappableTLSServer, sessions_taken: list[int],
        tls_log: Callable[[], list[dict[str, Any]]]) -> None:
    pinned = TLSPolicy(fingerprint=pin_of(pki))
    for _ in range(4):
        connect(pinned, swappable.port)
    assert [event["resumed"] for event in tls_log()] == [False, True, True, True]
    assert len(sessions_taken) == 1


def test_a_server_that_never_resumes_is_not_offered_sessions_for_a_while(
        pki: TestPKI, sessions_taken: list[int], tls_log: Callable[[], list[dict[str, Any]]]) -> None:
    server = SwappableTLSServer(pki, resumes=False)
    try:
        pinned = TLSPolicy(fingerprint=pin_of(pki))
        for _ in range(10):
            connect(pinned, server.port)
    finally:
        server.close()
    assert [event["resumed"] for event in tls_log()] == [False] * 10
    assert len(sessions_taken) <= 3, "two offered and declined: no more sessions taken from that server for now"
