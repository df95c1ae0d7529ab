"""`postbote.plugins.imap.login.open_session` against a real Dovecot over IMAP: every SASL mechanism it offers, the
LOGIN command, OAuth2 bearer tokens through Dovecot's oauth2 passdb, right and wrong credentials (issue 13).

The same Dovecot set-up as tests/test_login_dovecot.py (tests/servers/dovecot_sasl.py), spoken to over IMAP:
open_session is what both the IMAP source and the IMAP destination log in with.
"""

from __future__ import annotations

import base64
import io
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from postbote.credentials import Secret
from postbote.errors import CredentialError
from postbote.plugins.imap.client import IMAPAuthError, IMAPClient
from postbote.plugins.imap.login import open_session
from postbote.plugins.imap.settings import ConnectionSettings, TLSMode
from postbote.plugins.signin.oauth2 import oauth2_settings
from postbote.plugins.signin.passwords import PasswordKind, PasswordSource
from postbote.plugins.signin.sasl import MechanismChoiceError
from postbote.plugins.signin.settings import AuthChoice, Credentials

from tests.conftest import _require_dovecot
from tests.harness import RecordingLog, capture_logging
from tests.servers.certs import TestPKI
from tests.servers.dovecot_sasl import FakeOAuthProvider, SaslDovecotServer, scram_credentials

pytestmark = pytest.mark.dovecot

PASSWORDS = {"alice": "alice-secret", "carol": "carol-scram256-pw"}
WRONG_PASSWORD = "not-the-password"
CLIENT_ID = "postbote-imap-test"
CLIENT_SECRET = "cs-imap-client-secret"
SASL_PASSWORD_MECHANISMS = ["plain", "login", "cram-md5", "scram-sha-1", "scram-sha-256"]


@pytest.fixture(scope="module")
def provider(pki: TestPKI) -> Iterator[FakeOAuthProvider]:
    with FakeOAuthProvider(pki) as server:
        server.add_client(CLIENT_ID, CLIENT_SECRET)
        yield server


@pytest.fixture(scope="module")
def server(pki: TestPKI, provider: FakeOAuthProvider) -> Iterator[SaslDovecotServer]:
    _require_dovecot()
    dovecot = SaslDovecotServer(pki=pki, introspection_url=provider.introspection_url, ca_file=pki.ca_file,
                                users=PASSWORDS, stored={"carol": scram_credentials("SCRAM-SHA-256",
                                                                                    PASSWORDS["carol"])})
    dovecot.start()
    yield dovecot
    dovecot.stop()


def connection(server: SaslDovecotServer, pki: TestPKI, *, user: str = "alice", tls: str = "implicit",
               auth: str = "auto", password: str | None = None, **credentials: Any) -> ConnectionSettings:
    mode = TLSMode(tls)
    port = server.imaps_port if mode is TLSMode.IMPLICIT else server.imap_port
    assert port is not None
    if not credentials:
        secret = Secret(password if password is not None else PASSWORDS[user])
        credentials = {"password": PasswordSource(PasswordKind.INLINE, inline=secret)}
    return ConnectionSettings(host=server.host, port=port, tls=mode, username=user, auth=AuthChoice(auth),
                              credentials=Credentials(**credentials), tls_ca_file=pki.ca_file)


def session(conn: ConnectionSettings, log: Any = None, state_dir: Path | None = None) -> IMAPClient:
    return open_session(conn, account="work", state_dir=state_dir, timeout=10, deadline=None,
                        log=log or RecordingLog())


def logged_in(client: IMAPClient) -> bool:
    """The session is authenticated: INBOX can be selected."""
    client.select("INBOX")
    client.logout()
    return True


def mechanism_used(log: RecordingLog) -> str:
    (fields,) = [fields for _, event, fields in log.events if event == "login.mechanism"]
    return str(fields["mechanism"])


# --- passwords ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("auth", [*SASL_PASSWORD_MECHANISMS, "auto"])
def test_password_mechanisms_log_in(server: SaslDovecotServer, pki: TestPKI, auth: str) -> None:
    log = RecordingLog()
    client = session(connection(server, pki, auth=auth), log)

    assert mechanism_used(log) == ("scram-sha-256" if auth == "auto" else auth)
    assert logged_in(client)


def test_scram_stored_password_logs_in(server: SaslDovecotServer, pki: TestPKI) -> None:
    assert logged_in(session(connection(server, pki, user="carol", auth="scram-sha-256")))


def test_auto_uses_the_login_command_when_the_server_offers_no_sasl(server: SaslDovecotServer, pki: TestPKI,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(IMAPClient, "sasl_mechanisms", lambda self: [])  # as a server without AUTH= would say
    log = RecordingLog()

    client = session(connection(server, pki), log)

    assert mechanism_used(log) == "user"  # the auth choice that stands for IMAP LOGIN
    assert logged_in(client)


@pytest.mark.parametrize("auth", [*SASL_PASSWORD_MECHANISMS, "auto"])
def test_a_wrong_password_is_refused_clearly(server: SaslDovecotServer, pki: TestPKI, auth: str) -> None:
    with pytest.raises(IMAPAuthError) as raised:
        session(connection(server, pki, auth=auth, password=WRONG_PASSWORD))

    message = str(raised.value)
    assert "user alice" in message and "check the username and the password" in message
    assert WRONG_PASSWORD not in message


def test_starttls_then_auto_logs_in_without_warnings(server: SaslDovecotServer, pki: TestPKI) -> None:
    log = RecordingLog()

    client = session(connection(server, pki, tls="starttls"), log)

    assert client.encrypted and log.names("warning") == []
    assert logged_in(client)


def test_explicit_cleartext_with_tls_none_warns(server: SaslDovecotServer, pki: TestPKI) -> None:
    log = RecordingLog()

    client = session(connection(server, pki, tls="none", auth="plain"), log)

    assert log.names("warning") == ["login.cleartext"]
    assert logged_in(client)


def test_a_cleartext_password_is_never_sent_on_a_plain_connection_not_chosen_with_tls_none(
        server: SaslDovecotServer, pki: TestPKI, monkeypatch: pytest.MonkeyPatch) -> None:
    """Were the connection left unencrypted with tls other than none (it cannot be: STARTTLS fails closed), the
    login would still refuse to send the password in the clear."""
    monkeypatch.setattr(IMAPClient, "starttls", lambda self, tls: None)  # a client that "forgot" STARTTLS
    monkeypatch.setattr(IMAPClient, "sasl_mechanisms", lambda self: ["PLAIN", "LOGIN"])

    with pytest.raises(MechanismChoiceError, match="in the clear"):
        session(connection(server, pki, tls="starttls"))


# --- OAuth2 bearer tokens -------------------------------------------------------------------------------------------

def _token_command(tmp_path: Path, token: str) -> tuple[str, ...]:
    path = tmp_path / "token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return (sys.executable, "-c", "import sys; print(open(sys.argv[1]).read().strip())", str(path))


@pytest.mark.parametrize("auth, expected", [("xoauth2", "xoauth2"), ("oauthbearer", "oauthbearer"),
                                            ("auto", "oauthbearer")])
def test_a_bearer_token_from_token_command_logs_in(server: SaslDovecotServer, pki: TestPKI,
                                                   provider: FakeOAuthProvider, tmp_path: Path, auth: str,
                                                   expected: str) -> None:
    log = RecordingLog()
    command = _token_command(tmp_path, provider.issue_access_token("alice"))

    client = session(connection(server, pki, auth=auth, token_command=command), log)

    assert mechanism_used(log) == expected
    assert logged_in(client)


@pytest.mark.parametrize("auth", ["xoauth2", "oauthbearer"])
def test_a_refused_token_is_a_clear_error(server: SaslDovecotServer, pki: TestPKI, tmp_path: Path,
                                          auth: str) -> None:
    bad_token = "at-this-token-was-never-issued"

    with pytest.raises(IMAPAuthError) as raised:
        session(connection(server, pki, auth=auth, token_command=_token_command(tmp_path, bad_token)))

    message = str(raised.value)
    assert "token_command was refused" in message and "IMAP access is enabled" in message
    assert bad_token not in message


def _oauth2(provider: FakeOAuthProvider, pki: TestPKI, tmp_path: Path) -> dict[str, Any]:
    refresh_file = tmp_path / "refresh-token"
    refresh_file.write_text(provider.issue_refresh_token("alice", CLIENT_ID) + "\n")
    refresh_file.chmod(0o600)
    secret_file = tmp_path / "client-secret"
    secret_file.write_text(CLIENT_SECRET + "\n")
    secret_file.chmod(0o600)
    return {"oauth2": oauth2_settings(client_id=CLIENT_ID, refresh_token_file=refresh_file,
                                      token_url=provider.token_url, scope="imap", client_secret_file=secret_file,
                                      ca_file=pki.ca_file)}


def test_a_refreshed_token_logs_in_and_is_cached(server: SaslDovecotServer, pki: TestPKI,
                                                 provider: FakeOAuthProvider, tmp_path: Path) -> None:
    conn = connection(server, pki, **_oauth2(provider, pki, tmp_path))
    before = provider.state.refresh_count

    for _ in range(2):
        assert logged_in(session(conn, state_dir=tmp_path / "state"))

    assert provider.state.refresh_count == before + 1  # the second login used the cached access token


def test_a_refused_cached_token_is_refreshed_once(server: SaslDovecotServer, pki: TestPKI,
                                                  provider: FakeOAuthProvider, tmp_path: Path) -> None:
    conn = connection(server, pki, **_oauth2(provider, pki, tmp_path))
    assert logged_in(session(conn, state_dir=tmp_path / "state"))  # the access token is cached now
    provider.revoke_access_tokens()  # e.g. the user changed their password: the provider drops access tokens
    before = provider.state.refresh_count
    log = RecordingLog()

    assert logged_in(session(conn, log, state_dir=tmp_path / "state"))

    assert provider.state.refresh_count == before + 1
    assert log.names("info") == ["login.token_refused"]


def test_a_revoked_refresh_token_tells_to_run_postbote_auth(server: SaslDovecotServer, pki: TestPKI,
                                                            provider: FakeOAuthProvider, tmp_path: Path) -> None:
    conn = connection(server, pki, **_oauth2(provider, pki, tmp_path))
    provider.revoke_refresh_tokens()

    with pytest.raises(CredentialError, match="run: postbote auth work"):
        session(conn, state_dir=tmp_path / "state")


# --- the promise: no secret in any log, output or error -------------------------------------------------------------

def test_no_secret_appears_anywhere(server: SaslDovecotServer, pki: TestPKI, provider: FakeOAuthProvider,
                                    tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    log_stream = io.StringIO()
    restore_logging = capture_logging(log_stream)
    errors: list[str] = []

    def attempt(conn: ConnectionSettings) -> None:
        try:
            open_session(conn, account="work", state_dir=tmp_path / "state", timeout=10, deadline=None).logout()
        except Exception as exc:  # noqa: BLE001 - every error's text is checked below
            errors.append(f"{type(exc).__name__}: {exc} {getattr(exc, 'text', '')}")

    try:
        for auth in [*SASL_PASSWORD_MECHANISMS, "auto"]:
            attempt(connection(server, pki, auth=auth))
            attempt(connection(server, pki, auth=auth, password=WRONG_PASSWORD))
        attempt(connection(server, pki, tls="none", auth="plain"))
        attempt(connection(server, pki, tls="none", auth="plain", password=WRONG_PASSWORD))
        oauth = _oauth2(provider, pki, tmp_path)
        attempt(connection(server, pki, **oauth))
        provider.revoke_access_tokens()
        attempt(connection(server, pki, **oauth))
        attempt(connection(server, pki, auth="oauthbearer",
                           token_command=_token_command(tmp_path, "at-bogus-token-value")))
    finally:
        restore_logging()
    captured = capfd.readouterr()
    everything = "\n".join([*errors, log_stream.getvalue(), captured.out, captured.err])
    assert "login.mechanism" in everything and "check the username and the password" in everything
    secrets = [*PASSWORDS.values(), WRONG_PASSWORD, CLIENT_SECRET, "at-bogus-token-value", *provider.state.issued]
    secrets += [base64.b64encode(f"\0alice\0{p}".encode()).decode() for p in (PASSWORDS["alice"], WRONG_PASSWORD)]
    assert [secret for secret in secrets if secret in everything] == []
