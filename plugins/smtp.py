"""Delivery over SMTP to an MTA, or over LMTP to a mail store: ``deliver: {smtp: {...}}`` / ``{lmtp: {...}}``.

One session per destination and poll, reused for every message (``poll.resource``). A message counts as
delivered only when the server accepted every recipient and answered 250 to its data (LMTP: for every recipient).

The envelope sender is ``envelope_sender`` (``return-path``, the default: the message's Return-Path; ``<>``; or an
address). When it is not ASCII and the server does not offer SMTPUTF8, which would refuse the message for good,
``fallback_sender`` (``<>`` by default, or an ASCII address) goes in its place and ``smtp.sender_replaced`` is
logged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from postbote import (
    Delivered,
    Destination,
    Message,
    Node,
    Pending,
    Problems,
    Section,
    SMTPClient,
    TLSPolicy,
    boolean,
    duration,
    hookimpl,
    nonempty_text,
    path_relative_to,
    port_number,
    text_list,
)
from postbote.plugins.received import local_hostname

if TYPE_CHECKING:
    from postbote import Poll

DESTINATION_KINDS = ("smtp", "lmtp")
_ADDRESS = re.compile(r"[^\s<>]+")
NULL_SENDER = ""

log = structlog.get_logger("postbote.smtp")


@dataclass(frozen=True)
class SMTPSettings:
    lmtp: bool
    host: str | None
    port: int
    unix_socket: str | None
    recipients: tuple[str, ...]
    helo: str
    starttls: bool
    tls_verify: bool
    tls_ca_file: Path | None
    envelope_sender: str | None  # None: take it from the message's Return-Path
    timeout: float
    fallback_sender: str = NULL_SENDER  # when the MTA cannot take a non-ASCII sender (no SMTPUTF8); "" is <>

    @property
    def label(self) -> str:
        return self.unix_socket or f"{self.host}:{self.port}"


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
    lmtp = kind == "lmtp"
    unix_socket = section.get("socket", path_relative_to(base_dir), None) if lmtp else None
    settings = SMTPSettings(
        lmtp=lmtp,
        host=section.get("host", nonempty_text, None if unix_socket else "localhost"),
        port=section.get("port", port_number, 24 if lmtp else 25),
        unix_socket=str(unix_socket) if unix_socket else None,
        recipients=tuple(section.get("recipients", addresses, [], required=True)),
        helo=section.get("lhlo" if lmtp else "helo", nonempty_text, None) or local_hostname(),
        starttls=section.get("starttls", boolean, False),
        tls_verify=section.get("tls_verify", boolean, True),
        tls_ca_file=section.get("tls_ca_file", path_relative_to(base_dir), None),
        envelope_sender=section.get("envelope_sender", envelope_sender, None),
        timeout=section.get("timeout", duration, 60.0),
        fallback_sender=section.get("fallback_sender", ascii_envelope_sender, NULL_SENDER),
    )
    section.finish()
    return settings


@hookimpl
def deliver_message(message: Message, destination: Destination, poll: Poll) -> Delivered | Pending | None:
    """With one recipient the answer is left to be read later (`Pending`, see the hook's contract), so that the
    MTA stores this message while postbote fetches the next; with several it is read at once, because an LMTP
    server may take the message for some recipients and not others, and those must be noted right away."""
    if destination.kind not in DESTINATION_KINDS:
        return None
    settings: SMTPSettings = destination.settings
    client: SMTPClient = poll.resource(("smtp", destination.label), lambda: _connect(settings),
                                       usable=lambda c: c.usable, close=SMTPClient.quit)
    recipients = list(destination.recipients or message.recipients or settings.recipients)
    sender = sender_the_mta_can_take(_sender(message, settings), client, settings, message)
    delivery = client.start(sender, recipients, message.chunks(), eight_bit=message.eight_bit)
    return Pending(delivery.result) if len(recipients) == 1 else Delivered(delivery.result())


def _connect(settings: SMTPSettings) -> SMTPClient:
    tls = TLSPolicy(verify=settings.tls_verify, ca_file=str(settings.tls_ca_file) if settings.tls_ca_file else None)
    return SMTPClient.connect(host=settings.host, port=settings.port, unix_socket=settings.unix_socket,
                              timeout=settings.timeout, lmtp=settings.lmtp, helo=settings.helo,
                              starttls=settings.starttls, tls=tls)


def _sender(message: Message, settings: SMTPSettings) -> str:
    """The configured envelope sender, else the message's Return-Path when it is a plain address, else ``<>``."""
    if settings.envelope_sender is not None:
        return settings.envelope_sender
    return_path = message.return_path or ""
    return return_path if _ADDRESS.fullmatch(return_path) else ""


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
