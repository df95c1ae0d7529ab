"""Logging in, whatever the protocol: the parts of a login that POP3 and IMAP (source and destination) share.

A protocol's own login module (`postbote.plugins.pop3.login`, `postbote.plugins.imap.login`) asks `choose` for the
mechanism (``auth: auto`` or the configured one, never a secret in the clear unless ``tls: none`` was chosen), runs
its own password commands (POP3's USER/PASS and APOP, IMAP's LOGIN) and hands SASL to `sasl_login` and tokens to
`token_login`. An OAuth2 access token that came from the cache and is refused is dropped and refreshed once before
the login counts as failed. No message or log event carries a password or a token.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from postbote import Secret, get_logger, register_secret
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
    from postbote.plugins.signin.oauth2 import OAuth2Settings, TokenSource
    from postbote.plugins.signin.passwords import PasswordSource

default_log = get_logger("postbote.login")


class SASLClient(Protocol):
    """What the shared login needs of a protocol client (POP3Client and IMAPClient both are one)."""

    host: str

    def authenticate(self, mechanism: Any) -> None: ...


@dataclass(frozen=True)
class AuthSettings:
    """What a login needs from an account or a destination (see `AuthSettings.from_source`)."""

    account: str
    username: str
    tls: str = "implicit"  # implicit | starttls | none: the connection is encrypted unless "none"
    auth: str = "auto"  # one of postbote.plugins.signin.settings.AUTH_CHOICES
    password: PasswordSource | None = field(default=None, repr=False)
    token_command: tuple[str, ...] = ()
    oauth2: OAuth2Settings | None = None
    state_dir: Path | None = None  # the access-token cache goes to STATE_DIR/oauth2/ACCOUNT.json

    @classmethod
    def from_source(cls, name: str, source: Any, state_dir: Path | None) -> AuthSettings:
        """From settings with ``username``, ``tls``, ``auth`` and ``credentials`` (a POP3 or IMAP account's
        ``source``, an IMAP destination's connection); ``name`` names the token cache and the messages."""
        credentials = source.credentials
        return cls(account=name, username=source.username, tls=str(source.tls), auth=str(source.auth),
                   password=credentials.password, token_command=credentials.token_command,
                   oauth2=credentials.oauth2, state_dir=state_dir)

    @classmethod
    def from_account(cls, account: Account, state_dir: Path | None) -> AuthSettings:
        """From an account whose ``source`` has the sign-in keys (POP3, IMAP)."""
        return cls.from_source(account.name, account.source, state_dir)

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


def choose(settings: AuthSettings, offered: list[str], encrypted: bool, tokens: TokenSource | None, log: Any, *,
           offers_user: bool) -> str:
    """The ``auth:`` choice for this server and connection (`choose_mechanism`), warning when a secret will cross
    an unencrypted connection because ``tls: none`` was chosen. ``offers_user``: the protocol's own password
    command (POP3 USER/PASS, IMAP LOGIN) is available; it is the choice ``user``."""
    choice = choose_mechanism(settings.auth, offered, encrypted, settings.password is not None, tokens is not None,
                              explicit_cleartext_ok=settings.tls == "none", offers_user=offers_user)
    log.debug("login.mechanism", mechanism=choice, offered=offered)
    if not encrypted and sends_secret_in_clear(choice):
        what = "access token" if choice in TOKEN_MECHANISMS else "password"
        log.warning("login.cleartext", mechanism=choice,
                    reason=f"tls: none: the {what} crosses the network unencrypted")
    return choice


def connection_encrypted(client: object) -> bool:
    """Whether the session runs over TLS now (implicit, or after STARTTLS): asked of the socket, not the config."""
    encrypted = getattr(client, "encrypted", None)
    if isinstance(encrypted, bool):
        return encrypted
    import ssl  # only for a client that does not say (POP3Client and IMAPClient do)

    return isinstance(getattr(client, "_sock", None), ssl.SSLSocket)


def label(choice: str) -> str:
    """How a message names the mechanism: PLAIN, SCRAM-SHA-256, USER …"""
    return SASL_NAMES.get(choice, choice.upper())


def sasl_login(client: SASLClient, settings: AuthSettings, choice: str, password: Secret) -> None:
    """A SASL password mechanism (``choice``) on ``client``; the client's refusal propagates."""
    mechanism = make_mechanism(choice, settings.username, password, host=client.host)
    register_wire_form(mechanism, lasting=password.lasting)
    client.authenticate(mechanism)
    mechanism.complete()


def token_login(client: SASLClient, settings: AuthSettings, choice: str, tokens: TokenSource, log: Any, *,
                refused: type[Exception], rephrase: Callable[[Exception, str], Exception], service: str) -> None:
    """Log in with an access token; a refused token that came from a cache is dropped and a fresh one tried once.
    A final refusal (``refused``, the client's error) is raised again as ``rephrase(error, message)``, the message
    saying which user and mechanism and what to check (``service``: "POP", "IMAP")."""
    for attempt in (1, 2):
        mechanism = make_mechanism(choice, settings.username, tokens.token(), host=client.host)
        register_wire_form(mechanism)
        try:
            client.authenticate(mechanism)
            mechanism.complete()
            return
        except refused as exc:
            if attempt == 1 and tokens.invalidate():
                log.info("login.token_refused", action="refreshing the cached access token and trying again")
                continue
            raise rephrase(exc, f"{exc}{_token_status(mechanism)} (user {settings.username}, {label(choice)}); "
                                f"{_token_hint(settings, service)}") from None


def register_wire_form(mechanism: Mechanism, *, lasting: bool = False) -> None:
    """The base64 of a one-shot initial response holds the password or token whole, and a server may echo it in
    its error reply: have it masked in logs too. Only these mechanisms' initial responses can be built twice.
    ``lasting``: the password is the configuration's, so is this form (registered once, then known at each poll)."""
    if isinstance(mechanism, (Plain, XOAuth2, OAuthBearer)):
        register_secret(base64.b64encode(mechanism.initial_response()).decode("ascii"), lasting=lasting)


def _token_status(mechanism: Any) -> str:
    error = getattr(mechanism, "error", None) or {}
    status = str(error.get("status", ""))[:40]
    return f" [token status: {status}]" if status else ""


def _token_hint(settings: AuthSettings, service: str) -> str:
    common = f"check that username is the mailbox address and that {service} access is enabled for the mailbox"
    if settings.token_command:
        return f"the access token from token_command was refused: {common}, and what token_command prints"
    return f"the OAuth2 access token was refused: {common}; if it persists run: postbote auth {settings.account}"
