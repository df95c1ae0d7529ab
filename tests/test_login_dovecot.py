"""`postbote.login.login` against a real Dovecot: every mechanism it offers, right and wrong credentials.

One Dovecot for the module (see tests/servers/dovecot_sasl.py): PLAIN, LOGIN, CRAM-MD5, SCRAM-SHA-1/256, APOP and
USER for a user stored as {PLAIN}; SCRAM for users stored as SCRAM credentials made by ``doveadm pw``; XOAUTH2 and
OAUTHBEARER through Dovecot's oauth2 passdb, which introspects the tokens at a fake provider on loopback (HTTPS).
Skipped when Dovecot is not installed, except in CI where that is a failure (tests.conftest._require_dovecot).
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
from postbote.plugins.pop3.client import POP3AuthError, POP3Client
from postbote.plugins.pop3.login import AuthSettings, login
from postbote.plugins.signin.oauth2 import OAuth2Refresher, TokenCommand, oauth2_settings
from postbote.plugins.signin.passwords import PasswordSource
from postbote.plugins.signin.sasl import MechanismChoiceError
from postbote.tls import TLSPolicy

from tests.conftest import _require_dovecot
from tests.harness import RecordingLog, capture_logging
from tests.servers.certs import TestPKI
from tests.servers.dovecot_sasl import FakeOAuthProvider, SaslDovecotServer, scram_credentials

pytestmark = pytest.mark.dovecot

PASSWORDS = {"alice": "alice-secret", "carol": "carol-scram256-pw", "dave": "dave-scram1-pw"}
WRONG_PASSWORD = "not-the-password"
CLIENT_ID = "postbote-dovecot-test"
CLIENT_SECRET = "cs-dovecot-client-secret"
PASSWORD_MECHANISMS = ["plain", "login", "cram-md5", "scram-sha-1", "scram-sha-256", "user", "apop"]


@pytest.fixture(scope="module")
def provider(pki: TestPKI) -> Iterator[FakeOAuthProvider]:
    with FakeOAuthProvider(pki) as server:
        server.add_client(CLIENT_ID, CLIENT_SECRET)
        yield server


@pytest.fixture(scope="module")
def server(pki: TestPKI, provider: FakeOAuthProvider) -> Iterator[SaslDovecotServer]:
    _require_dovecot()
    stored = {"carol": scram_credentials("SCRAM-SHA-256", PASSWORDS["carol"]),
              "dave": scram_credentials("SCRAM-SHA-1", PASSWORDS["dave"])}
    dovecot = SaslDovecotServer(pki=pki, introspection_url=provider.introspection_url, ca_file=pki.ca_file,
                                users=PASSWORDS, stored=stored)
    dovecot.start()
    yield dovecot
    dovecot.stop()


def connect(server: SaslDovecotServer, pki: TestPKI, tls: str = "implicit") -> POP3Client:
    """Connected, CAPA read and (for starttls) upgraded: where the poller hands over to `login`."""
    policy = TLSPolicy(ca_file=str(pki.ca_file))
    port = server.pop3s_port if tls == "implicit" else server.pop3_port
    assert port is not None
    client = POP3Client.connect(server.host, port, implicit_tls=tls == "implicit", tls=policy, timeout=10)
    client.capa()
    if tls == "starttls":
        client.starttls(policy)
    return client


def password_settings(user: str, auth: str, password: str | None = None, tls: str = "implicit") -> AuthSettings:
    secret = Secret(password if password is not None else PASSWORDS[user])
    return AuthSettings(account="work", username=user, tls=tls, auth=auth,
                        password=PasswordSource("password", inline=secret))


def logged_in(client: POP3Client) -> bool:
    """The session is in TRANSACTION state: UIDL/LIST work."""
    client.listing()
    client.quit()
    return True


# --- passwords ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("auth", [*PASSWORD_MECHANISMS, "auto"])
def test_password_mechanisms(server: SaslDovecotServer, pki: TestPKI, auth: str) -> None:
    client = connect(server, pki)
    used = login(client, password_settings("alice", auth), RecordingLog())
    assert used == ("scram-sha-256" if auth == "auto" else auth)
    assert logged_in(client)


@pytest.mark.parametrize("user, auth", [("carol", "scram-sha-256"), ("carol", "auto"), ("dave", "scram-sha-1")])
def test_scram_stored_passwords(server: SaslDovecotServer, pki: TestPKI, user: str, auth: str) -> None:
    client = connect(server, pki)
    login(client, password_settings(user, auth), RecordingLog())
    assert logged_in(client)


@pytest.mark.parametrize("auth", [*PASSWORD_MECHANISMS, "auto"])
def test_wrong_password_is_refused_clearly(server: SaslDovecotServer, pki: TestPKI, auth: str) -> None:
    client = connect(server, pki)
    try:
        with pytest.raises(POP3AuthError) as raised:
            login(client, password_settings("alice", auth, WRONG_PASSWORD), RecordingLog())
    finally:
        client.close()
    message = str(raised.value)
    assert "login refused" in message and "user alice" in message and "check the username and the password" in message
    assert WRONG_PASSWORD not in message


def test_starttls_then_auto(server: SaslDovecotServer, pki: TestPKI) -> None:
    client = connect(server, pki, tls="starttls")
    log = RecordingLog()
    assert login(client, password_settings("alice", "auto", tls="starttls"), log) == "scram-sha-256"
    assert log.names("warning") == []
    assert logged_in(client)


def test_unencrypted_auto_picks_a_mechanism_that_keeps_the_password_off_the_wire(
        server: SaslDovecotServer, pki: TestPKI) -> None:
    client = connect(server, pki, tls="none")
    log = RecordingLog()
    assert "PLAIN" in client.sasl_mechanisms()
    assert login(client, password_settings("alice", "auto", tls="none"), log) == "scram-sha-256"
    assert log.names("warning") == []
    assert logged_in(client)


def test_explicit_cleartext_with_tls_none_warns(server: SaslDovecotServer, pki: TestPKI) -> None:
    client = connect(server, pki, tls="none")
    log = RecordingLog()
    login(client, password_settings("alice", "plain", tls="none"), log)
    assert log.names("warning") == ["login.cleartext"]
    assert logged_in(client)


def test_plaintext_only_server_without_tls_is_refused(server: SaslDovecotServer, pki: TestPKI) -> None:
    """auto on an unencrypted connection that was not explicitly accepted (tls other than none)."""
    client = connect(server, pki, tls="none")
    client.capabilities["SASL"] = ["PLAIN", "LOGIN"]  # as a server with only plaintext mechanisms would say
    try:
        with pytest.raises(MechanismChoiceError, match="in the clear"):
            login(client, AuthSettings(account="work", username="alice", tls="opportunistic",
                                       password=PasswordSource("password", inline=Secret("x"))), RecordingLog())
    finally:
        client.close()


# --- OAuth2 bearer tokens -------------------------------------------------------------------------------------------

def _token_command(tmp_path: Path, token: str) -> TokenCommand:
    path = tmp_path / "token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return TokenCommand([sys.executable, "-c", "import sys; print(open(sys.argv[1]).read().strip())", str(path)])


def token_settings(auth: str, **kwargs: Any) -> AuthSettings:
    return AuthSettings(account="work", username="alice", auth=auth, **kwargs)


@pytest.mark.parametrize("auth, expected", [("xoauth2", "xoauth2"), ("oauthbearer", "oauthbearer"),
                                            ("auto", "oauthbearer")])
def test_bearer_token_from_command(server: SaslDovecotServer, pki: TestPKI, provider: FakeOAuthProvider,
                                   tmp_path: Path, auth: str, expected: str) -> None:
    client = connect(server, pki)
    tokens = _token_command(tmp_path, provider.issue_access_token("alice"))
    assert login(client, token_settings(auth), RecordingLog(), token_source=tokens) == expected
    assert logged_in(client)


def test_long_token_uses_the_two_step_auth(server: SaslDovecotServer, pki: TestPKI, provider: FakeOAuthProvider,
                                           tmp_path: Path) -> None:
    """Tokens too long for the 255-octet AUTH line go after the server's '+ ' (how Microsoft's POP3 wants it)."""
    token = provider.issue_access_token("alice", size=900)
    assert len(token) > 1000
    client = connect(server, pki)
    sent: list[str] = []
    send = client._send

    def recording_send(command: str, *, shown: str | None = None, defer: bool = False) -> None:
        sent.append(command if command.startswith("AUTH") else f"<{len(command)} characters>")
        send(command, shown=shown, defer=defer)

    client._send = recording_send  # type: ignore[method-assign]
    login(client, token_settings("xoauth2"), RecordingLog(), token_source=_token_command(tmp_path, token))
    assert sent[0] == "AUTH XOAUTH2"  # no initial response on the AUTH line
    assert logged_in(client)


@pytest.mark.parametrize("auth", ["xoauth2", "oauthbearer"])
def test_refused_token_is_a_clear_error(server: SaslDovecotServer, pki: TestPKI, tmp_path: Path,
                                        auth: str) -> None:
    bad_token = "at-this-token-was-never-issued"
    client = connect(server, pki)
    try:
        with pytest.raises(POP3AuthError) as raised:
            login(client, token_settings(auth, token_command=("unused",)), RecordingLog(),
                  token_source=_token_command(tmp_path, bad_token))
    finally:
        client.close()
    message = str(raised.value)
    assert "login refused" in message and "[token status:" in message and "token_command was refused" in message
    assert bad_token not in message


def _refresher(provider: FakeOAuthProvider, pki: TestPKI, tmp_path: Path) -> tuple[AuthSettings, Path]:
    refresh_file = tmp_path / "refresh-token"
    refresh_file.write_text(provider.issue_refresh_token("alice", CLIENT_ID) + "\n")
    refresh_file.chmod(0o600)
    secret_file = tmp_path / "client-secret"
    secret_file.write_text(CLIENT_SECRET + "\n")
    secret_file.chmod(0o600)
    oauth = oauth2_settings(client_id=CLIENT_ID, refresh_token_file=refresh_file, token_url=provider.token_url,
                            scope="pop", client_secret_file=secret_file, ca_file=pki.ca_file)
    return token_settings("auto", oauth2=oauth, state_dir=tmp_path / "state"), refresh_file


def test_refreshed_token_logs_in(server: SaslDovecotServer, pki: TestPKI, provider: FakeOAuthProvider,
                                 tmp_path: Path) -> None:
    settings, _ = _refresher(provider, pki, tmp_path)
    before = provider.state.refresh_count
    for _ in range(2):
        client = connect(server, pki)
        login(client, settings, RecordingLog())
        assert logged_in(client)
    assert provider.state.refresh_count == before + 1  # the second login used the cached access token


def test_refused_cached_token_is_refreshed_once(server: SaslDovecotServer, pki: TestPKI,
                                                provider: FakeOAuthProvider, tmp_path: Path) -> None:
    settings, _ = _refresher(provider, pki, tmp_path)
    source = settings.token_source()
    assert isinstance(source, OAuth2Refresher)
    source.token()  # cached now
    provider.revoke_access_tokens()  # e.g. the user changed their password: the provider drops access tokens
    before = provider.state.refresh_count
    log = RecordingLog()
    client = connect(server, pki)
    login(client, settings, log)
    assert logged_in(client)
    assert provider.state.refresh_count == before + 1
    assert log.names("info") == ["login.token_refused"]


def test_revoked_refresh_token_tells_to_run_postbote_auth(server: SaslDovecotServer, pki: TestPKI,
                                                          provider: FakeOAuthProvider, tmp_path: Path) -> None:
    settings, refresh_file = _refresher(provider, pki, tmp_path)
    provider.revoke_refresh_tokens()
    client = connect(server, pki)
    try:
        with pytest.raises(CredentialError, match="run: postbote auth work"):
            login(client, settings, RecordingLog())
    finally:
        client.close()


# --- the promise: no secret in any log, output or error -------------------------------------------------------------

def test_no_secret_appears_anywhere(server: SaslDovecotServer, pki: TestPKI, provider: FakeOAuthProvider,
                                    tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    log_stream = io.StringIO()
    restore_logging = capture_logging(log_stream)
    errors: list[str] = []

    def attempt(settings: AuthSettings, tls: str = "implicit", **kwargs: Any) -> None:
        client = connect(server, pki, tls=tls)
        try:
            login(client, settings, **kwargs)
            client.quit()
        except Exception as exc:  # noqa: BLE001 - every error's text is checked below
            errors.append(f"{type(exc).__name__}: {exc} {getattr(exc, 'reply', '')}")
        finally:
            client.close()

    try:
        for auth in [*PASSWORD_MECHANISMS, "auto"]:
            attempt(password_settings("alice", auth))
            attempt(password_settings("alice", auth, WRONG_PASSWORD))
        attempt(password_settings("alice", "plain", tls="none"), tls="none")
        settings, refresh_file = _refresher(provider, pki, tmp_path)
        provider.state.rotate = True
        attempt(settings)
        provider.revoke_access_tokens()
        attempt(settings)
        attempt(token_settings("oauthbearer"), token_source=_token_command(tmp_path, "at-bogus-token-value"))
        provider.revoke_refresh_tokens()
        provider.revoke_access_tokens()
        attempt(settings)
        refresh_file.chmod(0o640)
        attempt(settings)
    finally:
        restore_logging()
    captured = capfd.readouterr()
    everything = "\n".join([*errors, log_stream.getvalue(), captured.out, captured.err])
    assert "login.mechanism" in everything and "run: postbote auth work" in everything
    assert "chmod 600" in everything and "check the username and the password" in everything
    secrets = [*PASSWORDS.values(), WRONG_PASSWORD, CLIENT_SECRET, "at-bogus-token-value", *provider.state.issued]
    secrets += [base64.b64encode(f"\0alice\0{p}".encode()).decode() for p in (PASSWORDS["alice"], WRONG_PASSWORD)]
    assert [secret for secret in secrets if secret in everything] == []
