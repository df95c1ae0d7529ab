"""An account's ``oauth2:`` settings: provider presets, validation, and reading them from the config.

Apart from `postbote.plugins.signin.oauth2` (token endpoints, refresh, the authorization flows) so that reading a
config loads no HTTP, TLS or browser code.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from postbote import Section, choice, nonempty_text, path_relative_to, text_list

_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,99}")


# --- settings and presets -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Preset:
    token_url: str
    scope: str
    device_url: str | None
    authorize_url: str | None
    authorize_params: Mapping[str, str]
    needs_client_secret: bool


_MS_BASE = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0"
PRESETS: Mapping[str, Preset] = {
    # Google's device flow does not allow the Gmail scopes, so `postbote auth` uses the loopback redirect flow.
    # access_type=offline + prompt=consent make Google return a refresh token every time.
    "google": Preset(token_url="https://oauth2.googleapis.com/token", scope="https://mail.google.com/",
                     device_url=None, authorize_url="https://accounts.google.com/o/oauth2/v2/auth",
                     authorize_params={"access_type": "offline", "prompt": "consent"}, needs_client_secret=True),
    "microsoft": Preset(token_url=f"{_MS_BASE}/token",
                        # one token for both protocols: an account may fetch by POP3 and deliver by IMAP APPEND
                        scope="https://outlook.office.com/POP.AccessAsUser.All "
                              "https://outlook.office.com/IMAP.AccessAsUser.All offline_access",
                        device_url=f"{_MS_BASE}/devicecode", authorize_url=f"{_MS_BASE}/authorize",
                        authorize_params={}, needs_client_secret=False),
}


@dataclass(frozen=True)
class OAuth2Settings:
    """An account's ``oauth2:`` section, presets applied; validated by `oauth2_settings`."""

    token_url: str
    client_id: str
    refresh_token_file: Path
    scope: str
    client_secret_file: Path | None = None
    device_url: str | None = None
    authorize_url: str | None = None
    authorize_params: Mapping[str, str] | None = None
    provider: str | None = None
    ca_file: Path | None = None  # a private CA for the token endpoint (tests, self-hosted identity providers)


def oauth2_settings(*, client_id: str, refresh_token_file: Path, provider: str | None = None,
                    tenant: str | None = None, token_url: str | None = None, scope: str | None = None,
                    client_secret_file: Path | None = None, device_url: str | None = None,
                    authorize_url: str | None = None, ca_file: Path | None = None) -> OAuth2Settings:
    """Apply the provider preset and validate; raises ValueError with a message meant for ``file:line: key:``."""
    preset = _preset(provider, tenant)
    token_url = token_url or (preset.token_url if preset else None)
    scope = scope or (preset.scope if preset else None)
    if not token_url:
        raise ValueError("token_url is required without provider: google or provider: microsoft")
    if not scope:
        raise ValueError("scope is required without provider: google or provider: microsoft")
    if not client_id.strip():
        raise ValueError("client_id must not be empty")
    if preset and preset.needs_client_secret and client_secret_file is None:
        raise ValueError(f"provider {provider} needs client_secret_file (the secret of the OAuth client)")
    device_url = device_url or (preset.device_url if preset else None)
    authorize_url = authorize_url or (preset.authorize_url if preset else None)
    for key, url in (("token_url", token_url), ("device_url", device_url), ("authorize_url", authorize_url)):
        if url is not None:
            require_https(url, key)
    return OAuth2Settings(token_url=token_url, client_id=client_id, refresh_token_file=refresh_token_file,
                          scope=scope, client_secret_file=client_secret_file, device_url=device_url,
                          authorize_url=authorize_url, authorize_params=dict(preset.authorize_params) if preset else {},
                          provider=provider, ca_file=ca_file)


OAUTH2_KEYS = frozenset({"provider", "tenant", "token_url", "client_id", "client_secret_file", "refresh_token_file",
                         "scope", "device_url", "authorize_url", "ca_file"})


def oauth2_from_section(section: Section, base_dir: Path) -> OAuth2Settings | None:
    """An account's ``oauth2:`` mapping read with `postbote.Section` (problems recorded as ``file:line: key:``)."""
    before = section.problems.reported
    provider = section.get("provider", choice(*PRESETS), None)
    fields = dict(
        tenant=section.get("tenant", nonempty_text, None),
        token_url=section.get("token_url", nonempty_text, None),
        client_id=section.get("client_id", nonempty_text, required=True),
        client_secret_file=section.get("client_secret_file", path_relative_to(base_dir), None),
        refresh_token_file=section.get("refresh_token_file", path_relative_to(base_dir), required=True),
        scope=section.get("scope", _scope, None),
        device_url=section.get("device_url", nonempty_text, None),
        authorize_url=section.get("authorize_url", nonempty_text, None),
        ca_file=section.get("ca_file", path_relative_to(base_dir), None),
    )
    section.finish(set(OAUTH2_KEYS))
    if section.problems.reported > before:
        return None
    try:
        return oauth2_settings(provider=provider, **fields)
    except ValueError as exc:
        section.problem(str(exc))
        return None


def _scope(value: Any) -> str:
    """A scope as one space-separated string or a list of scopes."""
    if isinstance(value, list):
        return " ".join(text_list(value))
    return nonempty_text(value)


def _preset(provider: str | None, tenant: str | None) -> Preset | None:
    if provider is None:
        if tenant is not None:
            raise ValueError("tenant is only used with provider: microsoft")
        return None
    if provider not in PRESETS:
        raise ValueError(f"provider must be one of {', '.join(PRESETS)}")
    if tenant is not None and provider != "microsoft":
        raise ValueError("tenant is only used with provider: microsoft")
    tenant = tenant or "common"
    if not _TENANT.fullmatch(tenant):
        raise ValueError("tenant must be a tenant id or domain (or common, organizations, consumers)")
    preset = PRESETS[provider]
    return Preset(token_url=preset.token_url.format(tenant=tenant), scope=preset.scope,
                  device_url=preset.device_url.format(tenant=tenant) if preset.device_url else None,
                  authorize_url=preset.authorize_url.format(tenant=tenant) if preset.authorize_url else None,
                  authorize_params=preset.authorize_params, needs_client_secret=preset.needs_client_secret)


def require_https(url: str, key: str) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(f"{key} must be an https:// URL (tokens never travel unencrypted)")
    if parts.username or parts.password:
        raise ValueError(f"{key} must not contain credentials; use client_secret_file")
