"""A POP3 account's own keys -- the server, TLS and the login -- read into a frozen `POP3Settings`.

The plugin's ``parse_source`` hook reads them from the account mapping (postbote reads the general keys: name,
deliver, keep, …), with the core's ``FILE:LINE: key.path:`` errors; the settings become ``account.source``.
Nothing here talks to a server: reading a config loads no TLS, SASL or OAuth2 code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from postbote import Section, boolean, choice, nonempty_text, path_relative_to, port_number
from postbote.plugins.signin.settings import (
    AUTH_CHOICES,
    AuthChoice,
    Credentials,
    credentials_from_section,
    server_label,
)


class TLSMode(StrEnum):
    """What ``tls:`` may say for a POP3 account."""

    IMPLICIT = "implicit"  # TLS from the first byte (port 995)
    STARTTLS = "starttls"  # STLS on the plain port (110)
    NONE = "none"


TLS_LABELS = {TLSMode.IMPLICIT: "TLS", TLSMode.STARTTLS: "STARTTLS", TLSMode.NONE: "no TLS"}
DEFAULT_PORTS = {TLSMode.IMPLICIT: 995, TLSMode.STARTTLS: 110, TLSMode.NONE: 110}


@dataclass(frozen=True)
class POP3Settings:
    """``account.source`` of a POP3 account."""

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
        """``user@host:port`` (``user on host:port`` for an address), as ``check`` and ``status`` show the account."""
        return server_label(self.username, self.host, self.port)

    @property
    def received_protocol(self) -> str:
        """What the ``Received:`` trace field says the message came ``with``."""
        return "POP3" if self.tls is TLSMode.NONE else "POP3S"

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


def pop3_settings(section: Section, base_dir: Path) -> POP3Settings | None:
    """The POP3 keys of one account (``defaults:`` merged in); None when some are wrong (recorded as problems)."""
    before = len(section.problems.lines)
    tls = TLSMode(section.get("tls", choice(*TLSMode), TLSMode.IMPLICIT.value))
    port = section.get("port", port_number, DEFAULT_PORTS[tls])
    host = section.get("host", nonempty_text, required=True)
    tls_verify = section.get("tls_verify", boolean, True)
    tls_ca_file = section.get("tls_ca_file", path_relative_to(base_dir), None)
    tls_fingerprint = section.get("tls_fingerprint", _fingerprint, None)
    username = section.get("username", nonempty_text, required=True)
    auth = AuthChoice(section.get("auth", choice(*AUTH_CHOICES), AuthChoice.AUTO.value))
    credentials = credentials_from_section(section, base_dir, auth)
    named = {"tls_ca_file": tls_ca_file, "password_file": credentials.password_file}
    files = {key: (path, node.line, node.path) for key, path in named.items()
             if path is not None and (node := section.raw(key)) is not None}
    if len(section.problems.lines) > before:
        return None
    return POP3Settings(host=host, port=port, tls=tls, username=username, auth=auth, credentials=credentials,
                        tls_verify=tls_verify, tls_ca_file=tls_ca_file, tls_fingerprint=tls_fingerprint, files=files)


def _fingerprint(value: Any) -> str:
    return normalise_fingerprint(nonempty_text(value))


def normalise_fingerprint(value: str) -> str:
    """``AB:CD:…`` or ``abcd…`` (64 hex digits) to lower-case hex without colons; ValueError otherwise."""
    digits = value.replace(":", "").strip().lower()
    if len(digits) != 64 or any(c not in "0123456789abcdef" for c in digits):
        raise ValueError("expected a SHA-256 fingerprint: 64 hex digits, optionally separated by colons")
    return digits
