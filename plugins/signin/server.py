"""How to reach and log in to a mail server: the keys a POP3 account, an IMAP account and an IMAP destination share.

``host``, ``port``, ``tls`` (`TLSMode`), ``tls_verify``, ``tls_ca_file``, ``tls_fingerprint`` (SHA-256), ``username``,
``auth`` and one secret source, read by `read_server` into a `ServerSettings` subclass that names its protocol
(`postbote.plugins.pop3.settings.POP3Settings`, `postbote.plugins.imap.settings.ConnectionSettings`). Each protocol
gives its own default ports and the ``auth:`` choices it can honour. Nothing here talks to a server.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from postbote import Section, boolean, choice, nonempty_text, path_relative_to, port_number
from postbote.plugins.signin.settings import AuthChoice, Credentials, credentials_from_section, server_label


class TLSMode(StrEnum):
    """What ``tls:`` may say."""

    IMPLICIT = "implicit"  # TLS from the first byte (POP3S 995, IMAPS 993)
    STARTTLS = "starttls"  # STLS / STARTTLS on the plain port, never skipped
    NONE = "none"


TLS_LABELS = {TLSMode.IMPLICIT: "TLS", TLSMode.STARTTLS: "STARTTLS", TLSMode.NONE: "no TLS"}


@dataclass(frozen=True)
class ServerSettings:
    """A server and the login on it; subclasses set `PROTOCOL` (what the ``Received:`` field says)."""

    PROTOCOL: ClassVar[str] = ""

    host: str
    port: int
    tls: TLSMode
    username: str
    auth: AuthChoice
    credentials: Credentials
    tls_verify: bool = True
    tls_ca_file: Path | None = None
    tls_fingerprint: str | None = None
    files: Mapping[str, tuple[Path, int, str]] = field(default_factory=dict)  # key -> (path, line, key path)

    @property
    def server(self) -> str:
        """``user@host:port`` (``user on host:port`` for an address), as ``check`` and ``status`` show it."""
        return server_label(self.username, self.host, self.port)

    @property
    def received_protocol(self) -> str:
        """What the ``Received:`` trace field says the message came ``with``: ``POP3`` or ``POP3S``, ``IMAP`` or
        ``IMAPS``."""
        return self.PROTOCOL if self.tls is TLSMode.NONE else f"{self.PROTOCOL}S"

    @property
    def holds_inline_password(self) -> bool:
        """Whether the password is written in the config file, which must then be readable by its owner only."""
        return self.credentials.inline

    def describe(self) -> str:
        """How ``postbote check`` shows the connection and the login: TLS, auth and where the secret comes from."""
        tls = TLS_LABELS[self.tls]
        if self.tls is not TLSMode.NONE and not self.tls_verify:
            tls += ", certificate NOT verified"
        return f"{tls}, auth {self.auth}, {self.credentials.describe()}"


Settings = TypeVar("Settings", bound=ServerSettings)
_TLS_MODE = choice(*TLSMode)


def read_server(section: Section, base_dir: Path, settings_type: type[Settings], *,
                default_ports: Mapping[TLSMode, int], auth_choices: tuple[str, ...],
                default_tls: TLSMode = TLSMode.IMPLICIT) -> Settings | None:
    """The server keys of ``section`` as a ``settings_type``; None when some are wrong (recorded as problems)."""
    before = section.problems.reported
    tls = TLSMode(section.get("tls", _TLS_MODE, default_tls.value))
    port = section.get("port", port_number, default_ports[tls])
    host = section.get("host", nonempty_text, required=True)
    tls_verify = section.get("tls_verify", boolean, True)
    tls_ca_file = section.get("tls_ca_file", path_relative_to(base_dir), None)
    tls_fingerprint = section.get("tls_fingerprint", _fingerprint, None)
    username = section.get("username", nonempty_text, required=True)
    auth = AuthChoice(section.get("auth", choice(*auth_choices), AuthChoice.AUTO.value))
    credentials = credentials_from_section(section, base_dir, auth)
    named = {"tls_ca_file": tls_ca_file, "password_file": credentials.password_file}
    files = {key: (path, node.line, node.path) for key, path in named.items()
             if path is not None and (node := section.raw(key)) is not None}
    if section.problems.reported > before:
        return None
    return settings_type(host=host, port=port, tls=tls, username=username, auth=auth, credentials=credentials,
                         tls_verify=tls_verify, tls_ca_file=tls_ca_file, tls_fingerprint=tls_fingerprint, files=files)


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _fingerprint(value: Any) -> str:
    return normalise_fingerprint(nonempty_text(value))


def normalise_fingerprint(value: str) -> str:
    """``AB:CD:…`` or ``abcd…`` (64 hex digits) to lower-case hex without colons; ValueError otherwise."""
    digits = value.replace(":", "").strip().lower()
    if not _SHA256_HEX.fullmatch(digits):
        raise ValueError("expected a SHA-256 fingerprint: 64 hex digits, optionally separated by colons")
    return digits
