"""Opening a logged-in IMAP session: connect, STARTTLS, log in. Used by the IMAP source and the IMAP destination.

`open_session` connects with implicit TLS or in plain, upgrades with STARTTLS when ``tls: starttls`` (the client
fails closed when the server does not offer it), then `login` picks the mechanism with
`postbote.plugins.signin.login.choose`: ``auth: auto`` takes the strongest SASL mechanism among the server's
``AUTH=`` capabilities that is safe on this connection, else the LOGIN command (unless the server says
LOGINDISABLED); a password or token crosses an unencrypted connection only when ``tls: none`` was chosen. OAuth2
tokens (XOAUTH2, OAUTHBEARER) come from ``token_command`` or ``oauth2`` and a refused cached token is refreshed once.
Refusals are `IMAPAuthError`s naming the user and the mechanism; no message or log event carries a secret.

After login, a server that offers ID (RFC 2971) is told postbote's name and version (`introduce`): some servers
(NetEase's 163.com, for one) refuse SELECT to a client that has not said who it is. Nothing about the user or the
machine is sent, and a server that answers NO or BAD is not an error: the session goes on without.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from postbote import CredentialError, TLSPolicy, __version__
from postbote.plugins.imap.client import IMAPAuthError, IMAPClient, IMAPError
from postbote.plugins.imap.settings import TLSMode
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
    from postbote.plugins.imap.settings import ConnectionSettings
    from postbote.plugins.signin.oauth2 import TokenSource

LOGIN_COMMAND = "user"  # the auth choice that stands for IMAP's own LOGIN command (POP3's USER/PASS)
CLIENT_ID: dict[str, str] = {"name": "postbote", "version": __version__}  # all that ID says: nothing of the user


def open_session(conn: ConnectionSettings, *, account: str, state_dir: Path | None, timeout: float,
                 deadline: float | None, log: Any = default_log) -> IMAPClient:
    """A logged-in session with the server ``conn`` names (``account`` names the token cache and the messages);
    closed again if anything after the connect fails."""
    tls = TLSPolicy(verify=conn.tls_verify, fingerprint=conn.tls_fingerprint,
                    ca_file=str(conn.tls_ca_file) if conn.tls_ca_file else None)
    client = IMAPClient.connect(conn.host, conn.port, implicit_tls=conn.tls is TLSMode.IMPLICIT, tls=tls,
                                timeout=timeout, deadline=deadline)
    try:
        if not client.capabilities:  # the greeting had no [CAPABILITY ...]
            client.capability()
        if conn.tls is TLSMode.STARTTLS:
            client.starttls(tls)
        client.login_choice = login(client, AuthSettings.from_source(account, conn, state_dir), log)
        introduce(client, log)
    except BaseException:
        client.close()
        raise
    return client


def introduce(client: IMAPClient, log: Any = default_log) -> None:
    """ID (RFC 2971) with `CLIENT_ID`, when the server offers it; a NO or BAD answer is ignored (a dropped
    connection is not: the session is over)."""
    if not client.has("ID"):
        return
    try:
        client.identify(CLIENT_ID)
    except IMAPError as exc:
        log.debug("imap.id_refused", server=client.host, error=str(exc))


def login(client: IMAPClient, settings: AuthSettings, log: Any = default_log, *,
          token_source: TokenSource | None = None) -> str:
    """Authenticate on ``client`` (after any STARTTLS); returns the ``auth:`` choice that was used (``user``
    for the LOGIN command)."""
    tokens = token_source or settings.token_source()
    offers_login = "LOGINDISABLED" not in client.capabilities
    choice = choose(settings, client.sasl_mechanisms(), connection_encrypted(client), tokens, log,
                    offers_user=offers_login)
    if choice in TOKEN_MECHANISMS:
        assert tokens is not None
        token_login(client, settings, choice, tokens, log, refused=IMAPAuthError, rephrase=refusal, service="IMAP")
        return choice
    assert settings.password is not None
    password = settings.password.resolve()
    try:
        if choice == LOGIN_COMMAND:
            if any(ch in password.reveal() for ch in "\r\n\0"):
                raise CredentialError("the password contains a line break or NUL, which IMAP LOGIN cannot send")
            client.login(settings.username, password)
        else:
            sasl_login(client, settings, choice, password)
    except IMAPAuthError as exc:
        what = "LOGIN" if choice == LOGIN_COMMAND else label(choice)
        raise refusal(exc, f"{exc} (user {settings.username}, {what}); check the username and the password") from None
    return choice


def refusal(error: Exception, message: str) -> IMAPAuthError:
    """The client's refusal again, with ``message`` (which says what to check) as its text."""
    status = getattr(error, "status", "NO")
    code = getattr(error, "code", None)
    return IMAPAuthError(message, status=status, code=code, text=getattr(error, "text", ""))


__all__ = ["CLIENT_ID", "AuthSettings", "introduce", "login", "open_session", "refusal"]
