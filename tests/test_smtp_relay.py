"""The ``smtp`` destination as a client of a submission relay (a provider's port 465 or 587): TLS from the first
byte or STARTTLS that is never skipped, SMTP AUTH (PLAIN, LOGIN, XOAUTH2) with the secrets the sources use, and a
sender the relay refuses replaced by ``<>``. Against aiosmtpd with an authenticator (`tests/servers/smtp_relay.py`),
the messages coming from a `FakeMailbox`: what is "on the server" is what it still holds.
"""

from __future__ import annotations

import hashlib
import ssl
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from postbote.cli import main
from postbote.errors import ConfigError
from postbote.plugins.signin import oauth2
from postbote.testing.pop3server import POP3Server
from structlog.testing import capture_logs

from tests.harness import (
    OAUTH_CLIENT_ID,
    OAUTH_CLIENT_SECRET,
    RigFactory,
    corpus,
    corpus_message,
    oauth_browser,
    secret_file,
)
from tests.servers.certs import TestPKI
from tests.servers.dovecot_sasl import FakeOAuthProvider
from tests.servers.smtp_relay import SMTPRelay

# aiosmtpd warns when a relay takes AUTH without TLS: the tests that fail closed want such a relay on purpose
pytestmark = [pytest.mark.usefixtures("time_limit"),
              pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")]

USER = "relay-user@example.org"
PASSWORD = "s3cret-Relay-Pw!"
TOKEN = "ya29.relay-access-token-0123456789"
RelayFactory = Callable[..., SMTPRelay]


@pytest.fixture
def relays(pki: TestPKI) -> Iterator[RelayFactory]:
    """``relays(tls="implicit"|"starttls"|"none", **SMTPRelay options)``: started relays, stopped after the test."""
    started: list[SMTPRelay] = []

    def make(tls: str = "implicit", **options: Any) -> SMTPRelay:
        context = pki.server_context()
        relay = SMTPRelay(users={USER: PASSWORD}, tokens={USER: TOKEN},
                          implicit_tls=context if tls == "implicit" else None,
                          starttls=context if tls == "starttls" else None,
                          auth_require_tls=tls != "none", **options)
        started.append(relay.start())
        return relay

    yield make
    for relay in started:
        relay.stop()


class RelayTarget:
    """The relay as a rig's destination: ``options`` are the ``smtp:`` keys beyond host, port and recipients."""

    def __init__(self, relay: SMTPRelay, **options: Any) -> None:
        self.relay = relay
        self.options = options

    def deliver(self) -> dict[str, Any]:
        return {"smtp": {"host": self.relay.host, "port": self.relay.port, "recipients": ["me@example.org"],
                         "timeout": "5s", **self.options}}

    def delivered(self) -> list[bytes]:
        return [message.data for message in self.relay.messages]


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "relay.password"
    path.write_text(PASSWORD + "\n")
    path.chmod(0o600)
    return path


def login_options(pki: TestPKI, password_file: Path, tls: str = "implicit", **more: Any) -> dict[str, Any]:
    return {"tls": tls, "tls_ca_file": str(pki.ca_file), "username": USER, "password_file": str(password_file),
            **more}


def everything_logged(logs: list[dict[str, Any]]) -> str:
    return "\n".join(repr(entry) for entry in logs)


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
@pytest.mark.parametrize("auth", ["auto", "plain", "login"])
def test_messages_go_through_an_authenticated_relay_over_tls(make_rig: RigFactory, relays: RelayFactory,
                                                             pki: TestPKI, password_file: Path, tls: str,
                                                             auth: str) -> None:
    relay = relays(tls)
    rig = make_rig(corpus(3), target=RelayTarget(relay, **login_options(pki, password_file, tls, auth=auth)),
                   source="fake")

    stats = rig.poll()

    assert (stats.delivered, stats.deferred, stats.rejected) == (3, 0, 0)
    assert rig.audit().delivered_once == [1, 2, 3] and rig.audit().on_server == ()
    assert [(m.login, m.tls) for m in relay.messages] == [(USER, True)] * 3
    expected = "LOGIN" if auth == "login" else "PLAIN"
    assert relay.logins == [(expected, USER, True)], "one login for the whole poll"


def test_a_relay_logs_in_with_xoauth2_and_a_token_command(make_rig: RigFactory, relays: RelayFactory,
                                                          pki: TestPKI) -> None:
    relay = relays("starttls")
    options = {"tls": "starttls", "tls_ca_file": str(pki.ca_file), "username": USER, "auth": "xoauth2",
               "token_command": [sys.executable, "-c", f"print({TOKEN!r})"]}
    rig = make_rig(corpus(2), target=RelayTarget(relay, **options), source="fake")

    with capture_logs() as logs:
        stats = rig.poll()

    assert stats.delivered == 2
    assert relay.logins == [("XOAUTH2", USER, True)]
    assert TOKEN not in everything_logged(logs)


def test_a_refused_token_defers_the_messages_and_says_what_to_check(make_rig: RigFactory, relays: RelayFactory,
                                                                    pki: TestPKI) -> None:
    relay = relays("implicit")
    options = {"tls": "implicit", "tls_ca_file": str(pki.ca_file), "username": USER, "auth": "xoauth2",
               "token_command": [sys.executable, "-c", "print('ya29.a-revoked-access-token')"]}
    rig = make_rig(corpus(2), target=RelayTarget(relay, **options), source="fake")

    with capture_logs() as logs:
        stats = rig.poll()

    assert (stats.delivered, stats.deferred) == (0, 2)
    assert relay.messages == [] and relay.logins == [("XOAUTH2", USER, False)]
    [refused] = [entry for entry in logs if entry["event"] == "smtp.session_refused"]
    assert USER in refused["error"] and "token_command" in refused["error"]
    assert "ya29.a-revoked-access-token" not in everything_logged(logs)


def test_a_refused_login_defers_every_message_once_with_an_error_naming_the_user_and_the_relay(
        make_rig: RigFactory, relays: RelayFactory, pki: TestPKI, tmp_path: Path) -> None:
    relay = relays("implicit")
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-the-Relay-password\n")
    wrong.chmod(0o600)
    rig = make_rig(corpus(3), target=RelayTarget(relay, **login_options(pki, wrong)), source="fake")

    with capture_logs() as logs:
        stats = rig.poll()

    assert (stats.delivered, stats.deferred, stats.rejected) == (0, 3, 0)
    assert rig.audit().on_server == (1, 2, 3), "every message stays on the server, to be tried on the next poll"
    assert relay.logins == [("PLAIN", USER, False)], "the login is tried once per poll, not once per message"
    [refused] = [entry for entry in logs if entry["event"] == "smtp.session_refused"]
    assert f"smtp relay {relay.host}:{relay.port}" in refused["error"]
    assert f"login as {USER} failed" in refused["error"] and "535" in refused["error"]
    assert "not-the-Relay-password" not in everything_logged(logs)


def test_starttls_that_the_relay_does_not_offer_fails_closed(make_rig: RigFactory, relays: RelayFactory,
                                                             pki: TestPKI, password_file: Path) -> None:
    """A relay (or someone in the way) that does not offer STARTTLS gets nothing: no login, no message."""
    relay = relays("none")  # would even take the login in the clear
    rig = make_rig(corpus(2), target=RelayTarget(relay, **login_options(pki, password_file, "starttls")),
                   source="fake")

    with capture_logs() as logs:
        stats = rig.poll()

    assert (stats.delivered, stats.deferred) == (0, 2)
    assert relay.logins == [] and relay.messages == []
    [refused] = [entry for entry in logs if entry["event"] == "smtp.session_refused"]
    assert "does not offer STARTTLS" in refused["error"] and "nothing was sent in the clear" in refused["error"]


def test_a_login_without_tls_settings_uses_starttls_and_never_sends_the_password_in_the_clear(
        make_rig: RigFactory, relays: RelayFactory, pki: TestPKI, password_file: Path) -> None:
    relay = relays("none")
    options = {"username": USER, "password_file": str(password_file), "tls_ca_file": str(pki.ca_file)}
    rig = make_rig(corpus(1), target=RelayTarget(relay, **options), source="fake")

    assert rig.poll().deferred == 1
    assert relay.logins == [], "no tls: key with a login means tls: starttls, which this relay cannot do"


def test_an_untrusted_certificate_gets_no_login_and_a_pinned_one_does(make_rig: RigFactory, relays: RelayFactory,
                                                                      pki: TestPKI, password_file: Path) -> None:
    relay = relays("implicit")
    options = login_options(pki, password_file)
    del options["tls_ca_file"]  # the test CA is not in the system store
    rig = make_rig(corpus(1), target=RelayTarget(relay, **options), source="fake")

    with capture_logs() as logs:
        assert rig.poll().deferred == 1
    assert relay.logins == []
    [refused] = [entry for entry in logs if entry["event"] == "smtp.session_refused"]
    assert "not trusted" in refused["error"]

    der = ssl.PEM_cert_to_DER_cert(pki.cert_file.read_text())
    pinned = make_rig(corpus(1), target=RelayTarget(relay, **options,
                                                    tls_fingerprint=hashlib.sha256(der).hexdigest()), source="fake")
    assert pinned.poll().delivered == 1


def with_return_path(data: bytes, sender: str) -> bytes:
    return f"Return-Path: <{sender}>\r\n".encode() + data


def test_a_sender_the_relay_refuses_is_replaced_by_the_null_sender(make_rig: RigFactory, relays: RelayFactory,
                                                                   pki: TestPKI, password_file: Path) -> None:
    """A relay that takes only its user's own addresses refuses a forwarded message's Return-Path with 553: the
    message goes again, once, with ``<>`` (the sender only receives bounces), instead of being rejected for good."""
    relay = relays("implicit", senders={"<>", USER})
    rig = make_rig([with_return_path(corpus_message(1), "someone@elsewhere.example"), corpus_message(2)],
                   target=RelayTarget(relay, **login_options(pki, password_file)), source="fake")

    with capture_logs() as logs:
        stats = rig.poll()

    assert (stats.delivered, stats.rejected, stats.deferred) == (2, 0, 0)
    assert [m.mail_from for m in relay.messages] == ["<>", "<>"]
    [replaced] = [entry for entry in logs if entry["event"] == "smtp.sender_replaced"]
    assert replaced["original"] == "<someone@elsewhere.example>" and replaced["replacement"] == "<>"
    assert "553" in replaced["reason"]


def test_a_configured_envelope_sender_goes_as_it_is(make_rig: RigFactory, relays: RelayFactory, pki: TestPKI,
                                                    password_file: Path) -> None:
    relay = relays("implicit", senders={USER})
    rig = make_rig([with_return_path(corpus_message(1), "someone@elsewhere.example")],
                   target=RelayTarget(relay, **login_options(pki, password_file, envelope_sender=USER)),
                   source="fake")

    assert rig.poll().delivered == 1
    assert [m.mail_from for m in relay.messages] == [USER]


def test_a_sender_refused_even_as_the_fallback_is_rejected_with_the_relays_answer(
        make_rig: RigFactory, relays: RelayFactory, pki: TestPKI, password_file: Path) -> None:
    relay = relays("implicit", senders={USER})
    rig = make_rig([with_return_path(corpus_message(1), "someone@elsewhere.example")],
                   target=RelayTarget(relay, **login_options(pki, password_file)), source="fake")

    stats = rig.poll()

    assert (stats.delivered, stats.rejected) == (0, 1)
    assert "553" in rig.audit().rejected[1] and relay.messages == []


# --- the keys ---------------------------------------------------------------------------------------------------


def destination_settings(make_rig: RigFactory, **options: Any) -> Any:
    class Fixed:
        def deliver(self) -> dict[str, Any]:
            return {"smtp": {"recipients": ["me@example.org"], **options}}

        def delivered(self) -> list[bytes]:
            return []

    rig = make_rig(corpus(1), target=Fixed(), source="fake")
    [account] = rig.load().accounts
    return account.destinations[0].settings


@pytest.mark.parametrize(("options", "tls", "port"), [
    ({}, "none", 25),
    ({"tls": "implicit"}, "implicit", 465),
    ({"tls": "starttls"}, "starttls", 587),
    ({"starttls": True}, "starttls", 25),
    ({"username": USER, "password_env": "RELAY_PW"}, "starttls", 587),
    ({"username": USER, "password_env": "RELAY_PW", "tls": "none"}, "none", 25),
    ({"tls": "implicit", "port": 2465}, "implicit", 2465),
])
def test_tls_and_the_port_it_implies(make_rig: RigFactory, options: dict[str, Any], tls: str, port: int) -> None:
    settings = destination_settings(make_rig, **options)
    assert (settings.tls.value, settings.port) == (tls, port)


@pytest.mark.parametrize(("options", "message"), [
    ({"tls": "implicit", "starttls": True}, "starttls: true and tls: implicit contradict each other"),
    ({"password_file": "/nonexistent"}, "username: required"),
    ({"username": USER}, "give exactly one of"),
    ({"username": USER, "password_env": "X", "auth": "apop"}, "auth: expected one of"),
    ({"tls_fingerprint": "abc"}, "expected a SHA-256 fingerprint"),
])
def test_mistakes_in_the_relay_keys_are_config_errors(make_rig: RigFactory, options: dict[str, Any],
                                                      message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        destination_settings(make_rig, **options)


def test_check_shows_the_relay_login_without_the_secret(make_rig: RigFactory, pki: TestPKI,
                                                        password_file: Path) -> None:
    settings = destination_settings(make_rig, host="smtp.example.org",
                                    **login_options(pki, password_file, "starttls"))
    shown = settings.describe()
    assert shown == f"STARTTLS, auth auto as {USER}, password_file {password_file}"
    assert PASSWORD not in shown and not settings.holds_inline_password


class ProviderTokens:
    """The relay's check of an XOAUTH2 token, as a provider's relay makes it: the access token the fake provider
    issued the user last, while it is valid."""

    def __init__(self, provider: FakeOAuthProvider) -> None:
        self.provider = provider

    def get(self, user: str, default: str | None = None) -> str | None:
        issued = [token for token, (owner, expires) in self.provider.state.access_tokens.items()
                  if owner == user and expires > time.time()]
        return issued[-1] if issued else default


def test_postbote_auth_authorizes_an_oauth2_relay_and_the_polls_log_in_to_it_with_xoauth2(
        tmp_path: Path, pki: TestPKI, provider: FakeOAuthProvider, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """An old POP3 account (a password) into a relay that takes only OAuth2: ``postbote auth ACCOUNT`` runs the
    relay's authorization, and the polls then log in to it with XOAUTH2, the token cached under a name of its own."""
    monkeypatch.setattr(oauth2, "_open_browser", oauth_browser(provider))
    relay = SMTPRelay(tokens=ProviderTokens(provider), implicit_tls=pki.server_context())  # type: ignore[arg-type]
    relay.start()
    try:
        with POP3Server(corpus(2)) as pop3:
            config = tmp_path / "postbote.yaml"
            config.write_text(yaml.safe_dump({
                "state_dir": str(tmp_path / "state"), "log": {"level": "debug", "format": "json"},
                "accounts": [{
                    "name": "old", "host": "127.0.0.1", "port": pop3.port, "tls": "none", "username": "demo",
                    "password": "demo", "timeout": "5s",
                    "deliver": {"smtp": {
                        "host": relay.host, "port": relay.port, "tls": "implicit", "tls_ca_file": str(pki.ca_file),
                        "recipients": ["me@example.org"], "username": "alice", "auth": "xoauth2", "timeout": "10s",
                        "oauth2": {"client_id": OAUTH_CLIENT_ID,
                                   "client_secret_file": str(secret_file(tmp_path / "cs", OAUTH_CLIENT_SECRET)),
                                   "token_url": provider.token_url, "authorize_url": "https://127.0.0.1:1/authorize",
                                   "scope": "pop offline_access", "refresh_token_file": str(tmp_path / "rt"),
                                   "ca_file": str(pki.ca_file)}}}}]}))
            config.chmod(0o600)

            assert main(["-c", str(config), "auth", "old", "--flow", "loopback"]) == 0
            assert "Authorized. The refresh token is stored in" in capsys.readouterr().out
            cached = sorted(path.name for path in (tmp_path / "state" / "oauth2").iterdir())
            assert cached == [f"old.smtp-alice@{relay.host}_{relay.port}.json"], cached

            assert main(["-c", str(config), "poll"]) == 0
            assert pop3.uids() == []
        assert [(message.login, message.tls) for message in relay.messages] == [("alice", True)] * 2
        assert relay.logins == [("XOAUTH2", "alice", True)], "one login for the whole poll"
    finally:
        relay.stop()
