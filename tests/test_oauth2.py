"""OAuth2 token sources and ``postbote auth``, against a token endpoint on loopback over HTTPS (test PKI).

Covered: presets and validation, token_command, the access-token cache (0600, bound to the refresh token),
refresh shortly before expiry, rotated refresh tokens stored atomically with mode 0600, revocation turned into an
actionable error, token files readable by others refused, the device code and loopback flows, and that no token,
refresh token, code or client secret ever shows in output, logs or errors.
"""

from __future__ import annotations

import io
import json
import os
import stat
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, TextIO

import pytest
from postbote.cli import main
from postbote.errors import AccountError, ConfigError, CredentialError
from postbote.plugins.signin import oauth2
from postbote.plugins.signin.authorize import run_auth
from postbote.plugins.signin.oauth2 import (
    OAuth2Refresher,
    OAuth2Settings,
    TokenCommand,
    oauth2_from_section,
    oauth2_settings,
    read_secret_file,
    write_secret_file,
)
from postbote.yaml_reader import Problems, Section, load_yaml

from tests.harness import OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET, capture_logging, oauth_browser, secret_file
from tests.servers.certs import TestPKI
from tests.servers.dovecot_sasl import FakeOAuthProvider

CLIENT_ID, CLIENT_SECRET = OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET
_browser, _secret_file = oauth_browser, secret_file


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def settings(tmp_path: Path, provider: FakeOAuthProvider, pki: TestPKI) -> OAuth2Settings:
    refresh = _secret_file(tmp_path / "refresh-token", provider.issue_refresh_token("alice", CLIENT_ID))
    client_secret = _secret_file(tmp_path / "client-secret", CLIENT_SECRET)
    return oauth2_settings(client_id=CLIENT_ID, refresh_token_file=refresh, token_url=provider.token_url,
                           device_url=provider.device_url, authorize_url="https://127.0.0.1:1/authorize",
                           scope="pop offline_access", client_secret_file=client_secret, ca_file=pki.ca_file)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def refresher(settings: OAuth2Settings, tmp_path: Path, clock: Clock) -> OAuth2Refresher:
    return OAuth2Refresher(settings, account="work", cache_dir=tmp_path / "state" / "oauth2", clock=clock)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- presets and settings -------------------------------------------------------------------------------------------

def test_google_preset(tmp_path: Path) -> None:
    google = oauth2_settings(provider="google", client_id="id", refresh_token_file=tmp_path / "rt",
                             client_secret_file=tmp_path / "cs")
    assert google.token_url == "https://oauth2.googleapis.com/token"
    assert google.scope == "https://mail.google.com/"
    assert google.device_url is None  # Gmail scopes are not allowed in Google's device flow
    assert google.authorize_url == "https://accounts.google.com/o/oauth2/v2/auth"
    assert google.authorize_params == {"access_type": "offline", "prompt": "consent"}


def test_microsoft_preset_with_tenant(tmp_path: Path) -> None:
    microsoft = oauth2_settings(provider="microsoft", client_id="id", refresh_token_file=tmp_path / "rt",
                                tenant="contoso.onmicrosoft.com")
    base = "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0"
    assert (microsoft.token_url, microsoft.device_url) == (f"{base}/token", f"{base}/devicecode")
    assert microsoft.scope == ("https://outlook.office.com/POP.AccessAsUser.All "
                               "https://outlook.office.com/IMAP.AccessAsUser.All offline_access")
    common = oauth2_settings(provider="microsoft", client_id="id", refresh_token_file=tmp_path / "rt")
    assert "/common/" in common.token_url


@pytest.mark.parametrize("kwargs, message", [
    ({"token_url": "http://idp.example/token", "scope": "x"}, "https://"),
    ({"token_url": "https://user:pw@idp.example/token", "scope": "x"}, "credentials"),
    ({"scope": "x"}, "token_url is required"),
    ({"token_url": "https://idp.example/token"}, "scope is required"),
    ({"provider": "google"}, "client_secret_file"),
    ({"provider": "google", "tenant": "x", "client_secret_file": Path("cs")}, "tenant"),
    ({"provider": "yahoo"}, "provider must be one of"),
    ({"provider": "microsoft", "tenant": "bad tenant"}, "tenant"),
])
def test_settings_validation(kwargs: dict[str, object], message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        oauth2_settings(client_id="id", refresh_token_file=tmp_path / "rt", **kwargs)  # type: ignore[arg-type]


def _section(tmp_path: Path, text: str) -> tuple[Section, Problems]:
    path = tmp_path / "postbote.yaml"
    path.write_text(text)
    problems = Problems(str(path))
    return Section(load_yaml(path), problems), problems


def test_oauth2_section_parsing(tmp_path: Path) -> None:
    section, problems = _section(tmp_path, "provider: microsoft\nclient_id: abc\nrefresh_token_file: tokens/rt\n"
                                           "scope: [a, b]\n")
    parsed = oauth2_from_section(section, tmp_path)
    assert problems.lines == []
    assert parsed is not None and parsed.refresh_token_file == tmp_path / "tokens" / "rt"
    assert parsed.scope == "a b"


def test_oauth2_section_problems_name_file_and_line(tmp_path: Path) -> None:
    section, problems = _section(tmp_path, "provider: google\nclient_id: abc\nrefresh_tokn_file: rt\n")
    assert oauth2_from_section(section, tmp_path) is None
    text = "\n".join(problems.lines)
    assert "postbote.yaml:1: refresh_token_file: required key is missing" in text
    assert "postbote.yaml:3: refresh_tokn_file: unknown key (did you mean 'refresh_token_file'?)" in text
    with pytest.raises(ConfigError):
        problems.raise_if_any()
    section, problems = _section(tmp_path, "token_url: http://x/token\nclient_id: a\nrefresh_token_file: rt\n"
                                           "scope: s\n")
    assert oauth2_from_section(section, tmp_path) is None
    assert "https://" in problems.lines[0]


# --- token command --------------------------------------------------------------------------------------------------

def _python(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


def test_token_command_first_line_without_shell() -> None:
    command = TokenCommand(_python("import sys; print(sys.argv[1]); print('second')", "$HOME;tok en"))
    assert command.token().reveal() == "$HOME;tok en"
    assert "tok en" not in command.describe() and command.invalidate() is False


@pytest.mark.parametrize("argv, message", [
    (_python("import sys; print('leaked-token'); print('leaked-token failed', file=sys.stderr); sys.exit(3)"),
     "exited with status 3"),
    (_python("pass"), "printed nothing"),
    (["/nonexistent/token-helper"], "no such program"),
])
def test_token_command_errors(argv: list[str], message: str) -> None:
    with pytest.raises(CredentialError, match=message) as raised:
        TokenCommand(argv).token()
    assert "leaked-token" not in str(raised.value)


def test_token_command_timeout() -> None:
    with pytest.raises(CredentialError, match="did not finish within 0.3 s"):
        TokenCommand(_python("import time; time.sleep(5)"), timeout=0.3).token()


# --- secret files ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_secret_files_open_to_others_are_refused(tmp_path: Path, mode: int) -> None:
    path = _secret_file(tmp_path / "rt", "secret-value", mode)
    with pytest.raises(CredentialError, match=f"chmod 600 {path}") as raised:
        read_secret_file(path, "refresh_token_file")
    assert "secret-value" not in str(raised.value)


def test_write_secret_file_is_atomic_and_private(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "rt"
    write_secret_file(path, "one\n")
    path.chmod(0o644)  # a later write must not keep loose permissions
    write_secret_file(path, "two\n")
    assert path.read_text() == "two\n" and _mode(path) == 0o600
    assert _mode(path.parent) == 0o700
    assert sorted(p.name for p in path.parent.iterdir()) == ["rt"]


# --- refresher ------------------------------------------------------------------------------------------------------

def test_refresh_then_cache(refresher: OAuth2Refresher, provider: FakeOAuthProvider) -> None:
    first = refresher.token()
    assert first.reveal() in provider.state.access_tokens
    assert refresher.token() == first
    assert provider.state.refresh_count == 1
    assert refresher.cache_file is not None and _mode(refresher.cache_file) == 0o600
    assert _mode(refresher.cache_file.parent) == 0o700


def test_refresh_shortly_before_expiry(refresher: OAuth2Refresher, provider: FakeOAuthProvider,
                                       clock: Clock) -> None:
    first = refresher.token()
    clock.now += 3600 - 400  # still 400 s left: cached
    assert refresher.token() == first
    clock.now += 200  # 200 s left, inside the 300 s margin: refreshed
    second = refresher.token()
    assert second != first and provider.state.refresh_count == 2
    clock.now += 7200  # long expired
    assert refresher.token() not in (first, second)


def test_short_lived_tokens_refresh_at_three_quarters(refresher: OAuth2Refresher, provider: FakeOAuthProvider,
                                                      clock: Clock) -> None:
    provider.state.expires_in = 100
    first = refresher.token()
    clock.now += 70
    assert refresher.token() == first
    clock.now += 10
    assert refresher.token() != first


def test_rotated_refresh_token_is_stored_0600(refresher: OAuth2Refresher, provider: FakeOAuthProvider,
                                              settings: OAuth2Settings, clock: Clock) -> None:
    provider.state.rotate = True
    old = settings.refresh_token_file.read_text().strip()
    refresher.token()
    new = settings.refresh_token_file.read_text().strip()
    assert new != old and new in provider.state.refresh_tokens and old not in provider.state.refresh_tokens
    assert _mode(settings.refresh_token_file) == 0o600
    assert sorted(p.name for p in settings.refresh_token_file.parent.iterdir()) == [
        "client-secret", "refresh-token", "state"]
    clock.now += 7200
    refresher.token()  # the rotated token works for the next refresh
    assert provider.state.refresh_count == 2


def test_revoked_refresh_token_is_an_actionable_error(refresher: OAuth2Refresher, provider: FakeOAuthProvider,
                                                      settings: OAuth2Settings, clock: Clock) -> None:
    refresher.token()
    provider.revoke_refresh_tokens()
    clock.now += 7200
    with pytest.raises(CredentialError, match="run: postbote auth work") as raised:
        refresher.token()
    message = str(raised.value)
    assert "invalid_grant" in message and "revoked" in message
    # The provider echoed the refresh token in its error_description; it must be cut out.
    assert settings.refresh_token_file.read_text().strip() not in message and "********" in message


def test_missing_refresh_token_says_run_postbote_auth(refresher: OAuth2Refresher,
                                                      settings: OAuth2Settings) -> None:
    settings.refresh_token_file.unlink()
    with pytest.raises(CredentialError, match="does not exist.*run: postbote auth work"):
        refresher.token()


def test_refresh_token_file_readable_by_others_is_refused(refresher: OAuth2Refresher,
                                                          settings: OAuth2Settings) -> None:
    settings.refresh_token_file.chmod(0o644)
    with pytest.raises(CredentialError, match="chmod 600"):
        refresher.token()


def test_wrong_client_secret(refresher: OAuth2Refresher, settings: OAuth2Settings) -> None:
    assert settings.client_secret_file is not None
    _secret_file(settings.client_secret_file, "wrong-secret")
    with pytest.raises(CredentialError, match="client_id and oauth2.client_secret_file") as raised:
        refresher.token()
    assert "wrong-secret" not in str(raised.value)


def test_cache_belongs_to_the_refresh_token(refresher: OAuth2Refresher, provider: FakeOAuthProvider,
                                            settings: OAuth2Settings) -> None:
    first = refresher.token()
    _secret_file(settings.refresh_token_file, provider.issue_refresh_token("alice", CLIENT_ID))
    assert refresher.token() != first  # re-authorized: the old cached token is not used


def test_loose_cache_file_is_not_trusted(refresher: OAuth2Refresher, provider: FakeOAuthProvider) -> None:
    refresher.token()
    assert refresher.cache_file is not None
    refresher.cache_file.chmod(0o644)
    refresher.token()
    assert provider.state.refresh_count == 2 and _mode(refresher.cache_file) == 0o600


def test_invalidate_only_helps_for_cached_tokens(refresher: OAuth2Refresher, provider: FakeOAuthProvider) -> None:
    refresher.token()
    assert refresher.invalidate() is False  # freshly refreshed: refreshing again would not help
    refresher.token()
    refresher.token()
    assert provider.state.refresh_count == 2
    refresher.token()
    assert refresher.invalidate() is True
    refresher.token()
    assert provider.state.refresh_count == 3


def test_untrusted_certificate(settings: OAuth2Settings, tmp_path: Path) -> None:
    untrusted = OAuth2Settings(**{**settings.__dict__, "ca_file": None})
    with pytest.raises(AccountError, match="cannot reach the OAuth2 endpoint.*CERTIFICATE_VERIFY_FAILED"):
        OAuth2Refresher(untrusted, account="work", cache_dir=None).token()


def test_endpoint_down(settings: OAuth2Settings, provider: FakeOAuthProvider) -> None:
    provider.stop()
    with pytest.raises(AccountError, match="cannot reach the OAuth2 endpoint"):
        OAuth2Refresher(settings, account="work", cache_dir=None, timeout=5).token()


# --- postbote auth: device code flow --------------------------------------------------------------------------------

def authorize(settings: OAuth2Settings, tmp_path: Path, out: TextIO, **options: Any) -> int:
    """``postbote auth work`` as the POP3 plugin runs it: no refresh token yet; the access token that comes with the
    new one is cached in the state directory."""
    settings.refresh_token_file.unlink()
    return run_auth(settings, out, account="work", cache_dir=tmp_path / "state" / "oauth2", **options)


def test_device_flow(settings: OAuth2Settings, provider: FakeOAuthProvider, tmp_path: Path) -> None:
    provider.approve_device("alice", polls_before_approval=2)
    out = io.StringIO()
    slept: list[float] = []
    assert authorize(settings, tmp_path, out, sleep=slept.append) == 0
    text = out.getvalue()
    assert "WDJB-MJHT" in text and f"{provider.base_url}/device-login" in text
    assert slept == [1.0, 1.0, 1.0]
    stored = settings.refresh_token_file.read_text().strip()
    assert stored in provider.state.refresh_tokens and _mode(settings.refresh_token_file) == 0o600
    cache = json.loads((tmp_path / "state" / "oauth2" / "work.json").read_text())
    assert cache["access_token"] in provider.state.access_tokens
    assert not any(secret in text for secret in provider.state.issued)


def test_device_flow_denied(settings: OAuth2Settings, provider: FakeOAuthProvider, tmp_path: Path) -> None:
    provider.approve_device("alice", polls_before_approval=0, outcome="deny")
    out = io.StringIO()
    with pytest.raises(CredentialError, match="declined"):
        authorize(settings, tmp_path, out, sleep=lambda _: None)
    assert not settings.refresh_token_file.exists()


def test_auth_without_oauth2_section() -> None:
    out = io.StringIO()
    with pytest.raises(ConfigError, match="no oauth2: section"):
        run_auth(None, out, account="plain", cache_dir=None)


# --- postbote auth: loopback redirect flow --------------------------------------------------------------------------

def test_loopback_flow(settings: OAuth2Settings, provider: FakeOAuthProvider, tmp_path: Path,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(oauth2, "_open_browser", _browser(provider))
    out = io.StringIO()
    assert authorize(settings, tmp_path, out, flow="loopback", wait=10) == 0
    assert settings.refresh_token_file.read_text().strip() in provider.state.refresh_tokens
    assert _mode(settings.refresh_token_file) == 0o600
    assert "https://127.0.0.1:1/authorize?" in out.getvalue()
    assert not any(secret in out.getvalue() for secret in provider.state.issued)


def test_loopback_flow_ignores_a_wrong_state(settings: OAuth2Settings, provider: FakeOAuthProvider,
                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(oauth2, "_open_browser", _browser(provider, tamper={"state": "forged"}))
    out = io.StringIO()
    with pytest.raises(CredentialError, match="no authorization arrived"):
        authorize(settings, tmp_path, out, flow="loopback", wait=0.5)


def test_loopback_flow_denied(settings: OAuth2Settings, provider: FakeOAuthProvider, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(oauth2, "_open_browser", _browser(provider, tamper={"error": "access_denied", "code": ""}))
    out = io.StringIO()
    with pytest.raises(CredentialError, match=r"not granted \(access_denied\)"):
        authorize(settings, tmp_path, out, flow="loopback", wait=5)


class _PastingTerminal(io.StringIO):
    """Output that 'pastes' the redirect address into ``pipe`` once the authorization URL was printed."""

    def __init__(self, provider: FakeOAuthProvider, pipe: int) -> None:
        super().__init__()
        self.provider = provider
        self.pipe = pipe

    def write(self, text: str) -> int:
        for word in text.split():
            if word.startswith("https://127.0.0.1:1/authorize?"):
                query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(word).query))
                code = self.provider.issue_code("alice", CLIENT_ID, query["redirect_uri"], query["code_challenge"])
                pasted = f"{query['redirect_uri']}?state={query['state']}&code={code}\n"
                threading.Timer(0.1, os.write, (self.pipe, pasted.encode())).start()
        return super().write(text)


def test_loopback_flow_with_pasted_address(settings: OAuth2Settings, provider: FakeOAuthProvider,
                                           tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    try:
        with os.fdopen(read_end, "r") as pasted:
            out = _PastingTerminal(provider, write_end)
            assert authorize(settings, tmp_path, out, flow="loopback", open_browser=False,
                            paste_input=pasted, wait=10) == 0
    finally:
        os.close(write_end)
    assert "paste the address" in out.getvalue()
    assert settings.refresh_token_file.exists()


# --- postbote auth through the plugin of the account's source -------------------------------------------------------

def _config(tmp_path: Path, settings: OAuth2Settings, source: str) -> Path:
    path = tmp_path / "postbote.yaml"
    path.write_text(f"""\
state_dir: {tmp_path / 'state'}
plugin_paths: [{tmp_path / 'plugins'}]
accounts:
  - name: work
{source}
    deliver: {{maildir: {tmp_path / 'Maildir'}}}
""")
    (tmp_path / "plugins").mkdir(exist_ok=True)
    (tmp_path / "plugins" / "local_source.py").write_text(
        "from postbote import hookimpl\n\nSOURCE_PROTOCOLS = ('local',)\n\n\nclass Local:\n    server = 'here'\n\n\n"
        "@hookimpl\ndef parse_source(protocol):\n    return Local() if protocol == 'local' else None\n")
    return path


def test_hook_authorize(settings: OAuth2Settings, provider: FakeOAuthProvider, tmp_path: Path,
                        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``postbote auth`` asks the plugin of the account's source: POP3 runs the OAuth2 flow of its ``oauth2:``."""
    monkeypatch.setattr(oauth2, "_open_browser", _browser(provider))
    oauth = (f"    host: pop.example.org\n    username: alice@example.org\n    oauth2:\n"
             f"      client_id: {CLIENT_ID}\n      token_url: {settings.token_url}\n"
             f"      authorize_url: {settings.authorize_url}\n      scope: {settings.scope}\n"
             f"      client_secret_file: {settings.client_secret_file}\n"
             f"      refresh_token_file: {settings.refresh_token_file}\n      ca_file: {settings.ca_file}")
    settings.refresh_token_file.unlink()
    assert main(["-c", str(_config(tmp_path, settings, oauth)), "auth", "work", "--flow", "loopback"]) == 0
    assert settings.refresh_token_file.read_text().strip() in provider.state.refresh_tokens
    assert (tmp_path / "state" / "oauth2" / "work.json").exists()
    assert "Authorized. The refresh token is stored in" in capsys.readouterr().out

    password = "    host: pop.example.org\n    username: alice@example.org\n    password_env: MAIL_PASSWORD"
    assert main(["-c", str(_config(tmp_path, settings, password)), "auth", "work"]) == 2
    assert "account work has no oauth2: section" in capsys.readouterr().err
    assert main(["-c", str(_config(tmp_path, settings, "    protocol: local")), "auth", "work"]) == 2
    assert "account work has nothing to authorize" in capsys.readouterr().err


# --- nothing secret in logs, output or errors -----------------------------------------------------------------------

def test_no_secret_in_logs_output_or_errors(settings: OAuth2Settings, provider: FakeOAuthProvider, tmp_path: Path,
                                           clock: Clock, capfd: pytest.CaptureFixture[str]) -> None:
    log_stream = io.StringIO()
    restore_logging = capture_logging(log_stream)
    seen: list[str] = []
    try:
        provider.approve_device("alice", polls_before_approval=1)
        assert authorize(settings, tmp_path, _Collect(seen), sleep=lambda _: None) == 0
        provider.state.rotate = True
        refresher = OAuth2Refresher(settings, account="work", cache_dir=tmp_path / "state" / "oauth2", clock=clock)
        seen.append(repr(refresher.token()))
        clock.now += 7200
        seen.append(str(refresher.token()))
        provider.revoke_refresh_tokens()
        clock.now += 7200
        for broken in (lambda: refresher.token(), lambda: settings.refresh_token_file.chmod(0o644) or
                       refresher.token()):
            with pytest.raises(CredentialError) as raised:
                broken()
            seen.append(str(raised.value))
    finally:
        restore_logging()
    captured = capfd.readouterr()
    everything = "\n".join([*seen, log_stream.getvalue(), captured.out, captured.err])
    assert "oauth2.token_refreshed" in everything and "run: postbote auth work" in everything
    secrets = [*provider.state.issued, CLIENT_SECRET]
    leaked = [secret for secret in secrets if secret in everything]
    assert leaked == []


class _Collect(io.StringIO):
    def __init__(self, into: list[str]) -> None:
        super().__init__()
        self.into = into

    def write(self, text: str) -> int:
        self.into.append(text)
        return super().write(text)
