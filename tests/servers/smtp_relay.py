"""A submission relay on loopback: aiosmtpd with SMTP AUTH required, over implicit TLS, STARTTLS or neither.

What a provider's port 465 or 587 does, as far as postbote's ``smtp`` destination can tell: AUTH PLAIN and LOGIN
(aiosmtpd's own, checked by an authenticator against ``users``) and XOAUTH2 (written here after Google's
description: ``user=U^Aauth=Bearer T^A^A``; a refused token gets the JSON error challenge, answered with an empty
line, then 535), mail refused before a login (530), and optionally a sender policy (``senders``: the only
envelope senders taken, anything else refused with 553 at MAIL FROM, as relays that take only their user's own
addresses do).

Records: `messages` (accepted, with the login and whether the session was encrypted) and `logins` (every AUTH
attempt: mechanism, user, accepted).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import ssl
import threading
from types import TracebackType
from typing import Any, NamedTuple

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from tests.servers import LOOPBACK, free_port

REFUSED_SENDER = "553 5.7.1 Sender address not owned by the authenticated user"
XOAUTH2_ERROR = {"status": "401", "schemes": "Bearer", "scope": "https://mail.google.com/"}


class Relayed(NamedTuple):
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    login: str
    tls: bool


class Login(NamedTuple):
    mechanism: str
    user: str
    accepted: bool


class _Handler:
    def __init__(self, relay: SMTPRelay) -> None:
        self._relay = relay

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        senders = self._relay.senders
        if senders is not None and address not in senders:
            return REFUSED_SENDER
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content
        assert isinstance(data, bytes)
        login = session.auth_data.login.decode() if isinstance(session.auth_data, LoginPassword) else ""
        encrypted = session.ssl is not None or self._relay.implicit_tls  # aiosmtpd sets ssl for STARTTLS only
        self._relay._record(Relayed(envelope.mail_from or "", list(envelope.rcpt_tos), data, login, encrypted))
        return "250 2.0.0 OK queued"

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:
        if len(args) < 2:
            await server.push("501 5.5.2 XOAUTH2 needs an initial response")
            return AuthResult(success=False, handled=True)
        try:
            fields = base64.b64decode(args[1], validate=True).decode().split("\x01")
        except (binascii.Error, UnicodeDecodeError):
            await server.push("501 5.5.2 Can't decode base64")
            return AuthResult(success=False, handled=True)
        values = dict(field.split("=", 1) for field in fields if "=" in field)
        user, token = values.get("user", ""), values.get("auth", "").removeprefix("Bearer ")
        accepted = bool(token) and self._relay.tokens.get(user) == token
        self._relay._login(Login("XOAUTH2", user, accepted))
        if accepted:
            return AuthResult(success=True, auth_data=LoginPassword(user.encode(), b""))
        await server.challenge_auth(json.dumps(XOAUTH2_ERROR))  # the client answers with an empty line
        return AuthResult(success=False, handled=False, message="535 5.7.8 Username and Password not accepted")


class SMTPRelay:
    """A submission relay; ``implicit_tls`` or ``starttls`` is a server context (neither: plain, no STARTTLS)."""

    host = LOOPBACK

    def __init__(self, *, users: dict[str, str] | None = None, tokens: dict[str, str] | None = None,
                 implicit_tls: ssl.SSLContext | None = None, starttls: ssl.SSLContext | None = None,
                 senders: set[str] | None = None, auth_require_tls: bool = True) -> None:
        self.port = free_port()
        self.users = users or {}
        self.tokens = tokens or {}
        self.senders = senders
        self.implicit_tls = implicit_tls is not None  # the listening socket speaks nothing but TLS
        self._lock = threading.Condition()
        self._messages: list[Relayed] = []
        self._logins: list[Login] = []
        self._controller = Controller(
            _Handler(self), hostname=self.host, port=self.port, server_hostname="relay.test", decode_data=False,
            ssl_context=implicit_tls, tls_context=starttls, require_starttls=starttls is not None,
            # aiosmtpd counts only STARTTLS as TLS for AUTH; a session over implicit TLS is encrypted all along
            authenticator=self._authenticate, auth_required=True,
            auth_require_tls=auth_require_tls and implicit_tls is None,
            ready_timeout=10.0)

    def _authenticate(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                      auth_data: Any) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        user, password = auth_data.login.decode(), auth_data.password.decode()
        accepted = self.users.get(user) == password
        self._login(Login(mechanism, user, accepted))
        return AuthResult(success=accepted, handled=False, auth_data=auth_data)  # handled=False: aiosmtpd answers 535

    def _record(self, message: Relayed) -> None:
        with self._lock:
            self._messages.append(message)
            self._lock.notify_all()

    def _login(self, login: Login) -> None:
        with self._lock:
            self._logins.append(login)

    @property
    def messages(self) -> list[Relayed]:
        with self._lock:
            return list(self._messages)

    @property
    def logins(self) -> list[Login]:
        with self._lock:
            return list(self._logins)

    def start(self) -> SMTPRelay:
        logger = logging.getLogger("mail.log")
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop(no_assert=True)

    def __enter__(self) -> SMTPRelay:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
