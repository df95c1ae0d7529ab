"""Logging in to a POP3 server: the one call `open_mailbox` makes after CAPA (and STLS).

`login` picks the mechanism with `postbote.plugins.signin.sasl.choose_mechanism` (``auth: auto`` or the configured
one), then runs USER/PASS, APOP or AUTH. An OAuth2 access token that came from the cache and is refused is dropped
and refreshed once before the login counts as failed. Refusals become `POP3AuthError`s that say which user and
mechanism were refused and what to check; no message or log event carries a password or a token.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from postbote import CredentialError, Secret, register_secret
from postbote.plugins.pop3.client import POP3AuthError, POP3Client
from postbote.plugins.signin.passwords import PasswordSource
from postbote.plugins.signin.sasl import (
    SASL_NAMES,
    TOKEN_MECHANISMS,
    Mechanism,
    OAuthBearer,
    Plain,
    XOAuth2,
    choose_mechanism,
    make_mechanism,
    sends_secret_in_clear,
)

if TYPE_CHECKING:
    from postbote import Account
    from postbote.plugins.pop3.settings import POP3Settings
    from postbote.plugins.signin.oauth2 import OAuth2Settings, TokenSource

default_log = structlog.get_logger("postbote.login")


@dataclass(frozen=True)
class AuthSettings:
    """What `login` needs from an account (see `AuthSettings.from_account`)."""

    account: str
    username: str
    tls: str = "implicit"  # implicit | starttls | none: the connection is encrypted unless "none"
    auth: str = "auto"  # one of postbote.plugins.signin.settings.AUTH_CHOICES
    password: PasswordSource | None = field(default=None, repr=False)
    token_command: tuple[str, ...] = ()
    oauth2: OAuth2Settings | None = None
    state_dir: Path | None = None  # the access-token cache goes to STATE_DIR/oauth2/ACCOUNT.json

    @classmethod
    def from_account(cls, account: Account, state_dir: Path | None) -> AuthSettings:
        """From a POP3 account (its ``source`` is a `POP3Settings`)."""
        source: POP3Settings = account.source
        credentials = source.credentials
        return cls(account=account.name, username=source.username, tls=source.tls, auth=source.auth,
                   password=credentials.password, token_command=credentials.token_command,
                   oauth2=credentials.oauth2, state_dir=state_dir)

    @property
    def cache_dir(self) -> Path | None:
        return self.state_dir / "oauth2" if self.state_dir is not None else None

    def token_source(self) -> TokenSource | None:
        # The OAuth2 code (HTTP, token files) is imported only for accounts that log in with a token.
        if self.token_command:
            from postbote.plugins.signin.oauth2 import TokenCommand

            return TokenCommand(self.token_command)
        if self.oauth2 is not None:
            from postbote.plugins.signin.oauth2 import OAuth2Refresher

            return OAuth2Refresher(self.oauth2, account=self.account, cache_dir=self.cache_dir)
        return None


def login(client: POP3Client, settings: AuthSettings, log: Any = default_log, *,
          token_source: TokenSource | None = None) -> str:
    """Authenticate on ``client`` (after CAPA and any STLS); returns the ``auth:`` choice that was used."""
    tokens = token_source or settings.token_source()
    encrypted = connection_encrypted(client)
    offered = client.sasl_mechanisms()
    choice = choose_mechanism(settings.auth, offered, encrypted, settings.password is not None, tokens is not None,
                              explicit_cleartext_ok=settings.tls == "none",
                              offers_user=not client.capabilities or "USER" in client.capabilities)
    log.debug("login.mechanism", mechanism=choice, offered=offered)
    if not encrypted and sends_secret_in_clear(choice):
        what = "access token" if choice in TOKEN_MECHANISMS else "password"
        log.warning("login.cleartext", mechanism=choice,
                    reason=f"tls: none: the {what} crosses the network unencrypted")
    if choice in TOKEN_MECHANISMS:
        assert tokens is not None
        _login_with_token(client, settings, choice, tokens, log)
    else:
        assert settings.password is not None
        _login_with_password(client, settings, choice, settings.password.resolve())
    return choice


def connection_encrypted(client: POP3Client) -> bool:
    """Whether the session runs over TLS now (implicit, or after STLS): asked of the socket, not of the config."""
    encrypted = getattr(client, "encrypted", None)
    if isinstance(encrypted, bool):
        return encrypted
    import ssl  # only for a client that does not say (POP3Client does)

    return isinstance(getattr(client, "_sock", None), ssl.SSLSocket)


def _label(choice: str) -> str:
    return SASL_NAMES.get(choice, choice.upper())


def _login_with_password(client: POP3Client, settings: AuthSettings, choice: str, password: Secret) -> None:
    try:
        if choice == "user":
            if any(ch in password.reveal() for ch in "\r\n\0"):
                raise CredentialError("the password contains a line break or NUL, which USER/PASS cannot send")
            client.login_user(settings.username, password)
        elif choice == "apop":
            client.login_apop(settings.username, password)
        else:
            mechanism = make_mechanism(choice, settings.username, password, host=client.host)
            _register_wire_form(mechanism)
            client.authenticate(mechanism)
            mechanism.complete()
    except POP3AuthError as exc:
        raise POP3AuthError(f"{exc} (user {settings.username}, {_label(choice)}); check the username and the "
                            "password", exc.reply) from None


def _login_with_token(client: POP3Client, settings: AuthSettings, choice: str, tokens: TokenSource,
                      log: Any) -> None:
    for attempt in (1, 2):
        mechanism = make_mechanism(choice, settings.username, tokens.token(), host=client.host)
        _register_wire_form(mechanism)
        try:
            client.authenticate(mechanism)
            mechanism.complete()
            return
        except POP3AuthError as exc:
            if attempt == 1 and tokens.invalidate():
                log.info("login.token_refused", action="refreshing the cached access token and trying again")
                continue
            raise POP3AuthError(f"{exc}{_token_status(mechanism)} (user {settings.username}, {_label(choice)}); "
                                f"{_token_hint(settings)}", exc.reply) from None


def _register_wire_form(mechanism: Mechanism) -> None:
    """The base64 of a one-shot initial response holds the password or token whole, and a server may echo it in
    its error reply: have it masked in logs too. Only these mechanisms' initial responses can be built twice."""
    if isinstance(mechanism, (Plain, XOAuth2, OAuthBearer)):
        register_secret(base64.b64encode(mechanism.initial_response()).decode("ascii"))


def _token_status(mechanism: Any) -> str:
    error = getattr(mechanism, "error", None) or {}
    status = str(error.get("status", ""))[:40]
    return f" [token status: {status}]" if status else ""


def _token_hint(settings: AuthSettings) -> str:
    common = ("check that username is the mailbox address and that POP access is enabled for the mailbox")
    if settings.token_command:
        return f"the access token from token_command was refused: {common}, and what token_command prints"
    return f"the OAuth2 access token was refused: {common}; if it persists run: postbote auth {settings.account}"
