"""Logging in to a POP3 server: the one call `open_mailbox` makes after CAPA (and STLS).

`login` picks the mechanism with `postbote.plugins.signin.login.choose` (``auth: auto`` or the configured one),
then runs USER/PASS, APOP or AUTH; what any protocol's login shares (the settings, SASL, tokens refreshed once when
refused) is in `postbote.plugins.signin.login`. Refusals become `POP3AuthError`s that say which user and mechanism
were refused and what to check; no message or log event carries a password or a token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from postbote import CredentialError, Secret
from postbote.plugins.pop3.client import POP3AuthError, POP3Client
from postbote.plugins.signin.login import (
    AuthSettings,
    choose,
    connection_encrypted,
    default_log,
    label,
    sasl_login,
    token_login,
)
from postbote.plugins.signin.sasl import TOKEN_MECHANISMS

if TYPE_CHECKING:
    from postbote.plugins.signin.oauth2 import TokenSource

__all__ = ["AuthSettings", "connection_encrypted", "login"]


def login(client: POP3Client, settings: AuthSettings, log: Any = default_log, *,
          token_source: TokenSource | None = None) -> str:
    """Authenticate on ``client`` (after CAPA and any STLS); returns the ``auth:`` choice that was used."""
    tokens = token_source or settings.token_source()
    choice = choose(settings, client.sasl_mechanisms(), connection_encrypted(client), tokens, log,
                    offers_user=not client.capabilities or "USER" in client.capabilities)
    if choice in TOKEN_MECHANISMS:
        assert tokens is not None
        token_login(client, settings, choice, tokens, log, refused=POP3AuthError, service="POP",
                    rephrase=lambda exc, text: POP3AuthError(text, getattr(exc, "reply", "")))
    else:
        assert settings.password is not None
        _login_with_password(client, settings, choice, settings.password.resolve())
    return choice


def _login_with_password(client: POP3Client, settings: AuthSettings, choice: str, password: Secret) -> None:
    try:
        if choice == "user":
            if any(ch in password.reveal() for ch in "\r\n\0"):
                raise CredentialError("the password contains a line break or NUL, which USER/PASS cannot send")
            client.login_user(settings.username, password)
        elif choice == "apop":
            client.login_apop(settings.username, password)
        else:
            sasl_login(client, settings, choice, password)
    except POP3AuthError as exc:
        raise POP3AuthError(f"{exc} (user {settings.username}, {label(choice)}); check the username and the "
                            "password", exc.reply) from None
