"""``postbote auth`` for an IMAP source account (issue 13): the IMAP plugin runs the OAuth2 authorization of the
account's ``oauth2:`` section, as the POP3 plugin does (tests/test_oauth2.py's provider and browser)."""

from __future__ import annotations

from pathlib import Path

import pytest
from postbote.cli import main
from postbote.plugins.signin import oauth2
from postbote.plugins.signin.oauth2 import OAuth2Settings, oauth2_settings

from tests.harness import OAUTH_CLIENT_ID as CLIENT_ID
from tests.harness import OAUTH_CLIENT_SECRET as CLIENT_SECRET
from tests.harness import logging_restored
from tests.harness import oauth_browser as _browser
from tests.harness import secret_file as _secret_file
from tests.servers.certs import TestPKI
from tests.servers.dovecot_sasl import FakeOAuthProvider


@pytest.fixture
def settings(tmp_path: Path, provider: FakeOAuthProvider, pki: TestPKI) -> OAuth2Settings:
    """An oauth2: section's settings (the refresh token file not written yet: `postbote auth` writes it)."""
    return oauth2_settings(client_id=CLIENT_ID, refresh_token_file=tmp_path / "refresh-token",
                           token_url=provider.token_url, authorize_url="https://127.0.0.1:1/authorize",
                           scope="pop offline_access", ca_file=pki.ca_file,
                           client_secret_file=_secret_file(tmp_path / "client-secret", CLIENT_SECRET))


def imap_config(tmp_path: Path, secret: str) -> Path:
    path = tmp_path / "postbote.yaml"
    path.write_text(f"state_dir: {tmp_path / 'state'}\naccounts:\n  - name: work\n    protocol: imap\n"
                    f"    host: imap.example.org\n    username: alice@example.org\n{secret}"
                    f"    deliver: {{maildir: {tmp_path / 'Maildir'}}}\n")
    path.chmod(0o600)
    return path


def test_postbote_auth_authorizes_an_imap_account_with_oauth2(settings: OAuth2Settings, provider: FakeOAuthProvider,
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(oauth2, "_open_browser", _browser(provider))
    secret = (f"    oauth2:\n      client_id: {CLIENT_ID}\n      token_url: {settings.token_url}\n"
              f"      authorize_url: {settings.authorize_url}\n      scope: {settings.scope}\n"
              f"      client_secret_file: {settings.client_secret_file}\n"
              f"      refresh_token_file: {settings.refresh_token_file}\n      ca_file: {settings.ca_file}\n")

    with logging_restored():
        status = main(["-c", str(imap_config(tmp_path, secret)), "auth", "work", "--flow", "loopback"])

    assert status == 0
    assert settings.refresh_token_file.read_text().strip() in provider.state.refresh_tokens
    assert (tmp_path / "state" / "oauth2" / "work.json").exists()
    assert "Authorized. The refresh token is stored in" in capsys.readouterr().out


def test_postbote_auth_of_an_imap_account_with_a_password_says_there_is_nothing_to_authorize(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with logging_restored():
        status = main(["-c", str(imap_config(tmp_path, "    password_env: MAIL_PASSWORD\n")), "auth", "work"])

    assert status == 2
    assert "account work has no oauth2: section" in capsys.readouterr().err
