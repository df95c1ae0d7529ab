"""``postbote auth ACCOUNT``: the one-time OAuth2 authorization that writes the account's refresh token file.

The device code flow runs where the provider supports it for mail (Microsoft); otherwise (Google, or a provider
configured with only an ``authorize_url``) the loopback redirect flow with PKCE. The refresh token is written
atomically with mode 0600 to ``oauth2.refresh_token_file``, and the access token that came with it is cached so
the next poll need not refresh. Nothing secret is printed: only the URL to open and the short user code.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from postbote import ConfigError, CredentialError
from postbote.plugins.signin.oauth2 import (
    LOOPBACK_TIMEOUT,
    OAuth2Refresher,
    OAuth2Settings,
    TokenResponse,
    device_flow,
    loopback_flow,
)

EXIT_OK = 0
FLOWS = ("auto", "device", "loopback")


def run_auth(oauth: OAuth2Settings | None, out: TextIO, *, account: str, cache_dir: Path | None,
             flow: str = "auto", open_browser: bool = True, paste_input: TextIO | None = None,
             wait: float = LOOPBACK_TIMEOUT, sleep: Callable[[float], None] = time.sleep) -> int:
    """Authorize ``account`` with its ``oauth2:`` settings and store its refresh token; returns the exit status.

    The access token that comes with it is cached in ``cache_dir`` (STATE_DIR/oauth2), where the polls look first.
    In the loopback flow the user may paste the address the browser ended on into ``paste_input`` (default: the
    terminal, when standard input is one), for a browser on another machine.
    """
    if paste_input is None and sys.stdin is not None and sys.stdin.isatty():
        paste_input = sys.stdin
    if oauth is None:
        raise ConfigError(f"account {account} has no oauth2: section (postbote auth is for accounts that let postbote "
                          "refresh their OAuth2 tokens)")
    response = _authorize(oauth, out, account, flow=flow, open_browser=open_browser, paste_input=paste_input,
                          wait=wait, sleep=sleep)
    if response.refresh_token is None:
        raise CredentialError("the provider issued no refresh token; check that the scope asks for offline "
                              "access (Microsoft: offline_access) and run postbote auth again")
    OAuth2Refresher(oauth, account=account, cache_dir=cache_dir).store(response)
    print(f"Authorized. The refresh token is stored in {oauth.refresh_token_file} (mode 0600); postbote can now "
          f"poll {account}.", file=out)
    return EXIT_OK


def _authorize(oauth: OAuth2Settings, out: TextIO, name: str, *, flow: str, open_browser: bool,
               paste_input: TextIO | None, wait: float, sleep: Callable[[float], None]) -> TokenResponse:
    if flow not in FLOWS:
        raise CredentialError(f"unknown flow {flow!r}; expected one of {', '.join(FLOWS)}")
    use_device = flow == "device" or (flow == "auto" and oauth.device_url is not None)
    if use_device:
        return device_flow(oauth, out, account=name, sleep=sleep)
    return loopback_flow(oauth, out, account=name, open_browser=open_browser, paste_input=paste_input, wait=wait)
