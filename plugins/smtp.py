"""Delivery over SMTP to an MTA, or over LMTP to a mail store: ``deliver: {smtp: {...}}`` / ``{lmtp: {...}}``.

One session per destination and poll, reused for every message (``poll.resource``). A message counts as
delivered only when the server accepted every recipient and answered 250 to its data (LMTP: for every recipient).

The envelope sender is ``envelope_sender`` (``return-path``, the default: the message's Return-Path; ``<>``; or an
address). When it is not ASCII and the server does not offer SMTPUTF8, which would refuse the message for good,
``fallback_sender`` (``<>`` by default, or an ASCII address) goes in its place and ``smtp.sender_replaced`` is
logged. The same happens, once per message, when the server refuses the sender itself with a 5xx at MAIL FROM (a
submission relay that takes only its user's own addresses): the message goes with ``fallback_sender`` rather than
being rejected for good.

A submission relay (a provider's port 587 or 465): ``tls: implicit`` (TLS from the first byte, port 465 by default)
or ``tls: starttls`` (port 587 by default; a server that does not offer STARTTLS, or whose certificate is not
trusted, gets nothing, not even the login: every message waits), checked with ``tls_verify``, ``tls_ca_file`` or
``tls_fingerprint`` as for a source; and a login, ``username`` with one secret (``password_file``,
``password_command``, ``password_env``, ``password``, ``token_command``, ``oauth2``) and ``auth`` (``auto``:
the strongest mechanism the relay offers that is safe on this connection; ``plain``, ``login``, ``xoauth2`` …),
read and run by the sign-in code the sources use (`postbote.plugins.signin`). With a login and no ``tls:`` the
connection is ``starttls``: a password never crosses the network in the clear unless ``tls: none`` says so. A refused
login defers every message of the poll with one reason that names the user and the relay, and is not tried again
until the next poll. Without TLS and a login the session is what it always was: nothing is added per message.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from postbote import (
    AccountError,
    AuthRefused,
    CredentialError,
    Delivered,
    DeliveryError,
    Destination,
    Message,
    Node,
    Pending,
    Problems,
    Section,
    SenderRefused,
    SessionRefused,
    SMTPClient,
    TLSPolicy,
    boolean,
    choice,
    duration,
    get_logger,
    hookimpl,
    nonempty_text,
    path_relative_to,
    port_number,
    text_list,
)
from postbote.plugins.received import local_hostname
from postbote.plugins.signin.server import TLS_LABELS, TLSMode, normalise_fingerprint
from postbote.plugins.signin.settings import SECRET_KEYS, AuthChoice, Credentials, credentials_from_section

if TYPE_CHECKING:
    from postbote import Account, Delivery, Poll

DESTINATION_KINDS = ("smtp", "lmtp")
_ADDRESS = re.compile(r"[^\s<>]+")
NULL_SENDER = ""
# The default port for each ``tls:`` when it is given: submissions (RFC 8314), submission (RFC 6409), SMTP.
DEFAULT_PORTS = {TLSMode.IMPLICIT: 465, TLSMode.STARTTLS: 587, TLSMode.NONE: 25}
# What ``auth:`` may say for a relay: the SASL mechanisms (POP3's USER and APOP have no SMTP form).
AUTH_CHOICES = tuple(c.value for c in AuthChoice if c not in (AuthChoice.USER, AuthChoice.APOP))
LOGIN_KEYS = ("username", "auth", *SECRET_KEYS)

log = get_logger("postbote.smtp")


@dataclass(frozen=True)
class RelayLogin:
    """The SMTP AUTH login of a relay: the user, the ``auth:`` choice and where the secret comes from."""

    username: str
    auth: AuthChoice
    credentials: Credentials


@dataclass(frozen=True)
class SMTPSettings:
    lmtp: bool
    host: str | None
    port: int
    unix_socket: str | None
    recipients: tuple[str, ...]
    helo: str
    starttls: bool  # the older spelling of tls: starttls (what the notify plugin's relays still give)
    tls_verify: bool
    tls_ca_file: Path | None
    envelope_sender: str | None  # None: take it from the message's Return-Path
    timeout: float
    fallback_sender: str = NULL_SENDER  # when the MTA cannot take the sender (no SMTPUTF8, or a 5xx); "" is <>
    tls: TLSMode = TLSMode.NONE
    tls_fingerprint: str | None = None
    login: RelayLogin | None = None
    files: Mapping[str, tuple[Path, int, str]] = field(default_factory=dict)  # checked by ``postbote check``

    @property
    def label(self) -> str:
        return self.unix_socket or f"{self.host}:{self.port}"

    def __post_init__(self) -> None:
        if self.starttls and self.tls is TLSMode.NONE:
            object.__setattr__(self, "tls", TLSMode.STARTTLS)

    @property
    def holds_inline_password(self) -> bool:
        """An inline ``password:`` makes the config file one that only its owner may read, as for a source."""
        return self.login is not None and self.login.credentials.inline

    def describe(self) -> str:
        """How ``postbote check`` shows the relay's connection and login; never the secret."""
        tls = TLS_LABELS[self.tls]
        if self.tls is not TLSMode.NONE and not self.tls_verify:
            tls += ", certificate NOT verified"
        if self.login is None:
            return tls
        return f"{tls}, auth {self.login.auth} as {self.login.username}, {self.login.credentials.describe()}"

    def tls_policy(self) -> TLSPolicy:
        return TLSPolicy(verify=self.tls_verify, fingerprint=self.tls_fingerprint,
                         ca_file=str(self.tls_ca_file) if self.tls_ca_file else None)


def address(value: Any) -> str:
    text = nonempty_text(value)
    if not _ADDRESS.fullmatch(text):
        raise ValueError("expected a mail address without spaces or angle brackets")
    return text


def addresses(value: Any) -> list[str]:
    return [address(item) for item in text_list(value)]


def ascii_envelope_sender(value: Any) -> str:
    """``<>`` or an ASCII address: a sender that every MTA can take, SMTPUTF8 or not."""
    text = nonempty_text(value)
    if text == "<>":
        return NULL_SENDER
    if not text.isascii():
        raise ValueError("expected <> or an ASCII mail address (it is used when the MTA cannot take UTF-8)")
    return address(text)


def fingerprint(value: Any) -> str:
    return normalise_fingerprint(nonempty_text(value))


def envelope_sender(value: Any) -> str | None:
    text = nonempty_text(value)
    if text.lower() == "return-path":
        return None
    if text == "<>":
        return ""
    return address(text)


@hookimpl
def parse_destination(kind: str, options: Node, problems: Problems, base_dir: Path) -> SMTPSettings | None:
    if kind not in DESTINATION_KINDS:
        return None
    section = Section(options, problems)
    recipients = tuple(section.get("recipients", addresses, [], required=True))
    sender = section.get("envelope_sender", envelope_sender, None)
    timeout = section.get("timeout", duration, 60.0)
    fallback = section.get("fallback_sender", ascii_envelope_sender, NULL_SENDER)
    if kind == "lmtp":
        settings = _lmtp_settings(section, base_dir, recipients=recipients, envelope_sender=sender, timeout=timeout)
    else:
        settings = relay_settings(section, base_dir, recipients=recipients, envelope_sender=sender, timeout=timeout)
    section.finish()
    return dataclasses.replace(settings, fallback_sender=fallback)


def _lmtp_settings(section: Section, base_dir: Path, *, recipients: tuple[str, ...], envelope_sender: str | None,
                   timeout: float) -> SMTPSettings:
    """An LMTP server: a unix socket or host and port (24), ``lhlo``, STARTTLS if asked; no login."""
    unix_socket = section.get("socket", path_relative_to(base_dir), None)
    tls, default_port = _tls_mode(section, True, False)
    tls_ca_file = section.get("tls_ca_file", path_relative_to(base_dir), None)
    return SMTPSettings(
        lmtp=True, recipients=recipients, envelope_sender=envelope_sender, timeout=timeout,
        host=section.get("host", nonempty_text, None if unix_socket else "localhost"),
        port=section.get("port", port_number, default_port),
        unix_socket=str(unix_socket) if unix_socket else None,
        helo=section.get("lhlo", nonempty_text, None) or local_hostname(),
        starttls=tls is TLSMode.STARTTLS,
        tls=tls,
        tls_verify=section.get("tls_verify", boolean, True),
        tls_ca_file=tls_ca_file,
        tls_fingerprint=section.get("tls_fingerprint", fingerprint, None),
        files=_named_files(section, tls_ca_file, None),
    )


def relay_settings(section: Section, base_dir: Path, *, recipients: tuple[str, ...],
                   envelope_sender: str | None = None, timeout: float = 60.0) -> SMTPSettings:
    """An SMTP relay named by another plugin (the notify plugin's ``email: {smtp: ...}``), its keys read as the
    smtp destination reads them -- host, port, helo, tls, tls_verify, tls_ca_file, tls_fingerprint and the login --
    so that `connect` opens it the same way. The caller finishes ``section``."""
    login = _relay_login(section, base_dir)
    tls, default_port = _tls_mode(section, False, login is not None)
    tls_ca_file = section.get("tls_ca_file", path_relative_to(base_dir), None)
    return SMTPSettings(
        lmtp=False, unix_socket=None, recipients=recipients, envelope_sender=envelope_sender, timeout=timeout,
        host=section.get("host", nonempty_text, "localhost"),
        port=section.get("port", port_number, default_port),
        helo=section.get("helo", nonempty_text, None) or local_hostname(),
        starttls=tls is TLSMode.STARTTLS,
        tls=tls,
        tls_verify=section.get("tls_verify", boolean, True),
        tls_ca_file=tls_ca_file,
        tls_fingerprint=section.get("tls_fingerprint", fingerprint, None),
        login=login,
        files=_named_files(section, tls_ca_file, login),
    )


def _relay_login(section: Section, base_dir: Path) -> RelayLogin | None:
    """``username``, ``auth`` and one secret, when any of them is given (then all are needed)."""
    if not any(key in section for key in LOGIN_KEYS):
        return None
    username = section.get("username", nonempty_text, required=True)
    auth = AuthChoice(section.get("auth", choice(*AUTH_CHOICES), AuthChoice.AUTO.value))
    credentials = credentials_from_section(section, base_dir, auth)
    return RelayLogin(username or "", auth, credentials)


def _tls_mode(section: Section, lmtp: bool, login: bool) -> tuple[TLSMode, int]:
    """``tls:`` (or the older ``starttls: true``) and the port it implies. Without either, a relay with a login
    speaks STARTTLS on 587, so that its password is never sent in the clear by default; an MTA without one plain
    SMTP on 25 (LMTP: 24), as before."""
    given = section.get("tls", choice(*TLSMode), None)
    legacy = section.get("starttls", boolean, False)
    if legacy and given not in (None, TLSMode.STARTTLS.value):
        section.problem(f"starttls: true and tls: {given} contradict each other; give tls: alone", section.raw("tls"))
    if given is not None:
        tls = TLSMode(given)
        return tls, 24 if lmtp else DEFAULT_PORTS[tls]
    if legacy:
        return TLSMode.STARTTLS, 24 if lmtp else 25
    if login:
        return TLSMode.STARTTLS, DEFAULT_PORTS[TLSMode.STARTTLS]
    return TLSMode.NONE, 24 if lmtp else 25


def _named_files(section: Section, tls_ca_file: Path | None,
                 login: RelayLogin | None) -> dict[str, tuple[Path, int, str]]:
    named = {"tls_ca_file": tls_ca_file, "password_file": login.credentials.password_file if login else None}
    return {key: (path, node.line, node.path) for key, path in named.items()
            if path is not None and (node := section.raw(key)) is not None}


@hookimpl
def deliver_message(message: Message, destination: Destination, account: Account,
                    poll: Poll) -> Delivered | Pending | None:
    """With one recipient the answer is left to be read later (`Pending`, see the hook's contract), so that the
    MTA stores this message while postbote fetches the next; with several it is read at once, because an LMTP
    server may take the message for some recipients and not others, and those must be noted right away."""
    if destination.kind not in DESTINATION_KINDS:
        return None
    settings: SMTPSettings = destination.settings
    key = ("smtp", destination.label)
    client = _session(poll, key, settings, account)
    recipients = list(destination.recipients or message.recipients or settings.recipients)
    sender = sender_the_mta_can_take(_sender(message, settings), client, settings, message)

    def again(refused: SenderRefused) -> Delivery:  # with the fallback sender, on a session that may be a new one
        replacement = fallback_for(refused, sender, settings, message)
        session = _session(poll, key, settings, account)
        return session.start(replacement, recipients, message.chunks(), eight_bit=message.eight_bit)

    try:
        delivery = client.start(sender, recipients, message.chunks(), eight_bit=message.eight_bit)
    except SenderRefused as refused:  # answered at once (no PIPELINING)
        delivery = again(refused)

    def answer() -> str:
        try:
            return delivery.result()
        except SenderRefused as refused:  # answered with the data (PIPELINING)
            return again(refused).result()

    return Pending(answer) if len(recipients) == 1 else Delivered(answer())


@dataclass
class Unusable:
    """The relay of a destination that refused TLS or the login in this poll: every later message is deferred with
    the same reason at once, without another attempt (a login tried once per message can lock the account)."""

    error: DeliveryError
    usable: bool = True

    def quit(self) -> None:
        """Nothing to end."""


def _session(poll: Poll, key: tuple[str, str], settings: SMTPSettings, account: Account) -> SMTPClient:
    held: SMTPClient | Unusable = poll.resource(key, lambda: _connect(settings, account, poll), usable=_usable,
                                                close=_quit)
    if isinstance(held, Unusable):
        raise held.error
    return held


def _usable(held: SMTPClient | Unusable) -> bool:
    return held.usable


def _quit(held: SMTPClient | Unusable) -> None:
    held.quit()


def _connect(settings: SMTPSettings, account: Account, poll: Poll) -> SMTPClient | Unusable:
    """A greeted session (over TLS, logged in, when the settings say so). Connection trouble raises, so that the
    next message tries again; a refused TLS or login comes back as `Unusable` for the rest of the poll."""
    try:
        return connect(settings, token_cache=token_cache_name(account, settings), state_dir=poll.state_dir)
    except SessionRefused as exc:
        error = DeliveryError(f"smtp relay {settings.label}: {exc.reason}", temporary=True)
        log.warning("smtp.session_refused", destination=settings.label, error=error.reason,
                    action="the messages of this poll stay on the source server and are tried on the next poll")
        return Unusable(error)


def connect(settings: SMTPSettings, *, token_cache: str, state_dir: Path | None) -> SMTPClient:
    """A session with the server ``settings`` name, over TLS and logged in when they say so (``token_cache``:
    the name of the cached OAuth2 token). Raises `SessionRefused` when TLS cannot be had or the login is refused
    (with a reason naming the user and what to check), `DeliveryError` for connection trouble."""
    client = SMTPClient.connect(host=settings.host, port=settings.port, unix_socket=settings.unix_socket,
                                timeout=settings.timeout, lmtp=settings.lmtp, helo=settings.helo,
                                starttls=settings.tls is TLSMode.STARTTLS,
                                implicit_tls=settings.tls is TLSMode.IMPLICIT, tls=settings.tls_policy())
    if settings.login is None:
        return client
    try:
        _log_in(client, settings, settings.login, token_cache, state_dir)
    except (AccountError, CredentialError, DeliveryError) as exc:
        client.quit()
        raise SessionRefused(f"login as {settings.login.username} failed: {exc}; check the username and the secret "
                             f"({settings.login.credentials.describe()})") from None
    return client


def _log_in(client: SMTPClient, settings: SMTPSettings, login: RelayLogin, token_cache: str,
            state_dir: Path | None) -> None:
    """SMTP AUTH with the sign-in code the sources use: the mechanism chosen as for them (never a secret in the
    clear unless ``tls: none``), passwords resolved now, a refused cached OAuth2 token refreshed once."""
    from postbote.plugins.signin.login import AuthSettings, choose, sasl_login, token_login
    from postbote.plugins.signin.sasl import TOKEN_MECHANISMS

    auth = AuthSettings(account=token_cache, username=login.username, tls=settings.tls.value,
                        auth=login.auth.value, password=login.credentials.password,
                        token_command=login.credentials.token_command, oauth2=login.credentials.oauth2,
                        state_dir=state_dir)
    tokens = auth.token_source()
    chosen = choose(auth, client.sasl_mechanisms(), client.encrypted, tokens, log, offers_user=False)
    if chosen in TOKEN_MECHANISMS:
        assert tokens is not None
        token_login(client, auth, chosen, tokens, log, refused=AuthRefused, service="SMTP",
                    rephrase=lambda _exc, text: AuthRefused(text))
        return
    assert auth.password is not None
    sasl_login(client, auth, chosen, auth.password.resolve())
    log.debug("smtp.logged_in", destination=settings.label, mechanism=chosen)


def token_cache_name(account: Account | str, settings: SMTPSettings) -> str:
    """The name of the relay's cached OAuth2 access token (STATE_DIR/oauth2/NAME.json), apart from the source's."""
    user = settings.login.username if settings.login else ""
    name = account if isinstance(account, str) else account.name
    return f"{name}.smtp-" + re.sub(r"[^\w.@+-]", "_", f"{user}@{settings.label}")


@hookimpl(tryfirst=True)
def authorize(account: Account, state_dir: Path, out: TextIO, flow: str, open_browser: bool,
              destination: str | None) -> int | None:
    """``postbote auth ACCOUNT --destination smtp``: the OAuth2 authorization of a relay that logs in with
    ``oauth2:`` (also without ``--destination`` when the source needs none)."""
    targets = [d.settings for d in account.destinations if d.kind == "smtp" and d.settings.login is not None
               and d.settings.login.credentials.oauth2 is not None and destination in (None, d.kind, d.label)]
    source_needs_one = getattr(getattr(account.source, "credentials", None), "oauth2", None) is not None
    if not targets or (destination is None and source_needs_one):
        return None
    from postbote.plugins.signin.authorize import run_auth  # HTTP and a browser: only for `postbote auth`

    settings: SMTPSettings = targets[0]
    name = token_cache_name(account, settings)
    oauth2 = settings.login.credentials.oauth2 if settings.login else None
    return run_auth(oauth2, out, account=name, cache_dir=state_dir / "oauth2", flow=flow, open_browser=open_browser)


def _sender(message: Message, settings: SMTPSettings) -> str:
    """The configured envelope sender, else the message's Return-Path when it is a plain address, else ``<>``."""
    if settings.envelope_sender is not None:
        return settings.envelope_sender
    return_path = message.return_path or ""
    return return_path if _ADDRESS.fullmatch(return_path) else ""


def fallback_for(refused: SenderRefused, sender: str, settings: SMTPSettings, message: Message) -> str:
    """The sender to try once more after the server refused ``sender`` for good (5xx at MAIL FROM, the recipients
    never tried): `fallback_sender` (``<>`` by default), as for a sender it cannot take; the sender only receives
    bounces, the message itself is unchanged. Logged as ``smtp.sender_replaced``. A temporary refusal, or a
    refused fallback, is raised again."""
    if refused.temporary or sender == settings.fallback_sender:
        raise refused
    log.warning("smtp.sender_replaced", uid=message.uid, server=settings.label, original=f"<{sender}>",
                replacement=f"<{settings.fallback_sender}>", reason=f"the server refused the sender: {refused}")
    return settings.fallback_sender


def sender_the_mta_can_take(sender: str, client: SMTPClient, settings: SMTPSettings, message: Message) -> str:
    """``sender``, unless it is not ASCII and the MTA does not offer SMTPUTF8 (RFC 6531): then `fallback_sender`.

    Such an MTA refuses the whole transaction for good although the recipients are ASCII, and the message could
    never be delivered. The sender only receives bounces, so replacing it loses nothing of the message itself
    (its Return-Path header is passed on unchanged); the replacement is logged.
    """
    if sender.isascii() or client.offers("SMTPUTF8"):
        return sender
    replacement = settings.fallback_sender
    log.warning("smtp.sender_replaced", uid=message.uid, server=client.server, original=f"<{sender}>",
                replacement=f"<{replacement}>", reason="the sender is not ASCII and the MTA does not offer SMTPUTF8")
    return replacement
