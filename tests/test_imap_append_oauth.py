"""The usual move of issue 13 with OAuth2: an old POP3 account (a password) into a mailbox that takes only OAuth2
(Gmail, Outlook) by IMAP APPEND. ``postbote auth ACCOUNT`` runs the destination's authorization (its source needs
none), and the polls then log in to the destination with XOAUTH2 -- here Dovecot's oauth2 passdb, which asks the
fake provider whether the token is valid. The destination's access token is cached under a name of its own, so it
never meets a source token of the same account.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from postbote.cli import main
from postbote.plugins.signin import oauth2
from postbote.testing.pop3server import POP3Server

from tests.conftest import _require_dovecot
from tests.harness import OAUTH_CLIENT_ID as CLIENT_ID
from tests.harness import OAUTH_CLIENT_SECRET as CLIENT_SECRET
from tests.harness import MaildirTarget, corpus, corpus_number
from tests.harness import oauth_browser as _browser
from tests.servers.certs import TestPKI
from tests.servers.dovecot_sasl import FakeOAuthProvider, SaslDovecotServer

pytestmark = [pytest.mark.dovecot, pytest.mark.usefixtures("time_limit")]


@pytest.fixture
def dovecot(pki: TestPKI, provider: FakeOAuthProvider) -> Iterator[SaslDovecotServer]:
    _require_dovecot()
    server = SaslDovecotServer(pki=pki, introspection_url=provider.introspection_url, ca_file=pki.ca_file,
                               users={"alice": "alice-secret"})
    server.start()
    yield server
    server.stop()


def test_postbote_auth_authorizes_the_imap_destination_and_the_polls_log_in_to_it_with_xoauth2(
        tmp_path: Path, pki: TestPKI, provider: FakeOAuthProvider, dovecot: SaslDovecotServer,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(oauth2, "_open_browser", _browser(provider))
    secret = tmp_path / "client-secret"
    secret.write_text(CLIENT_SECRET + "\n")
    secret.chmod(0o600)
    refresh = tmp_path / "refresh-token"
    with POP3Server(corpus(3)) as pop3:
        config = tmp_path / "postbote.yaml"
        config.write_text(yaml.safe_dump({
            "state_dir": str(tmp_path / "state"), "log": {"level": "debug", "format": "json"},
            "accounts": [{
                "name": "old", "host": "127.0.0.1", "port": pop3.port, "tls": "none", "username": "demo",
                "password": "demo", "timeout": "5s",
                "deliver": {"imap": {
                    "host": dovecot.host, "port": dovecot.imaps_port, "tls_ca_file": str(pki.ca_file),
                    "username": "alice", "auth": "xoauth2", "folder": "From the old account", "timeout": "10s",
                    "oauth2": {"client_id": CLIENT_ID, "client_secret_file": str(secret),
                               "token_url": provider.token_url, "authorize_url": "https://127.0.0.1:1/authorize",
                               "scope": "pop offline_access", "refresh_token_file": str(refresh),
                               "ca_file": str(pki.ca_file)}}}}]}))
        config.chmod(0o600)

        assert main(["-c", str(config), "auth", "old", "--flow", "loopback"]) == 0
        assert "Authorized. The refresh token is stored in" in capsys.readouterr().out
        assert refresh.read_text().strip() in provider.state.refresh_tokens
        cached = sorted(path.name for path in (tmp_path / "state" / "oauth2").iterdir())
        assert cached == [f"old.imap-alice@127.0.0.1_{dovecot.imaps_port}.json"], cached

        assert main(["-c", str(config), "poll"]) == 0
        assert pop3.uids() == []
    folder = MaildirTarget(dovecot.maildir("alice") / ".From the old account")  # Dovecot's Maildir++ layout
    assert sorted(corpus_number(data) or 0 for data in folder.delivered()) == [1, 2, 3]


def test_when_the_source_needs_an_authorization_too_postbote_auth_runs_the_sources(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One ``postbote auth ACCOUNT`` authorizes one thing: the source comes first, the destination with
    ``--destination imap`` (its kind or its label); an account whose source needs none gets the destination's,
    under the destination's own token cache name."""
    import io

    from postbote.config import load_config
    from postbote.pluginmanager import make_plugin_manager
    from postbote.plugins import imap_append
    from postbote.plugins.signin import authorize as signin_authorize

    oauth = {"client_id": CLIENT_ID, "token_url": "https://127.0.0.1:1/token", "refresh_token_file": "rt",
             "scope": "imap"}
    imap = {"host": "imap.example.org", "username": "me", "auth": "xoauth2", "oauth2": oauth}
    config = tmp_path / "postbote.yaml"
    config.write_text(yaml.safe_dump({"accounts": [
        {"name": "both", "host": "pop.example.org", "username": "me", "auth": "xoauth2", "oauth2": oauth,
         "deliver": {"imap": imap}},
        {"name": "destination-only", "host": "pop.example.org", "username": "me", "password": "pw",
         "deliver": {"imap": imap}},
        {"name": "neither", "host": "pop.example.org", "username": "me", "password": "pw",
         "deliver": {"imap": {"host": "imap.example.org", "username": "me", "password": "pw"}}}]}))
    config.chmod(0o600)
    both, destination_only, neither = load_config(config, make_plugin_manager(entry_points=False)).accounts
    flows: list[str] = []

    def run_auth(oauth: Any, out: Any, *, account: str, **_: Any) -> int:
        flows.append(account)
        return 0

    monkeypatch.setattr(signin_authorize, "run_auth", run_auth)

    def answer(account: Any, destination: str | None = None) -> Any:
        return imap_append.authorize(account=account, state_dir=tmp_path, out=io.StringIO(), flow="device",
                                     open_browser=False, destination=destination)

    assert answer(both) is None and answer(neither) is None  # left to the source's plugin
    assert answer(destination_only) == 0
    assert answer(both, "imap") == 0  # postbote auth both --destination imap
    assert answer(neither, "imap") is None and answer(both, "smtp") is None
    assert flows == ["destination-only.imap-me@imap.example.org_993", "both.imap-me@imap.example.org_993"]


def test_auth_for_a_destination_that_does_not_log_in_with_oauth2_is_a_clear_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "postbote.yaml"
    config.write_text(yaml.safe_dump({"accounts": [
        {"name": "old", "host": "pop.example.org", "username": "me", "password": "pw",
         "deliver": {"imap": {"host": "imap.example.org", "username": "me", "password": "pw"}}}]}))
    config.chmod(0o600)

    assert main(["-c", str(config), "auth", "old", "--destination", "imap"]) == 2
    assert "has no destination 'imap' that logs in with OAuth2 (its destinations: imap:" in capsys.readouterr().err
