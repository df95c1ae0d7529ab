"""A POP3 account's own keys -- the server, TLS and the login -- read into a frozen `POP3Settings`.

The plugin's ``parse_source`` hook reads them from the account mapping (postbote reads the general keys: name,
deliver, keep, …), with the core's ``FILE:LINE: key.path:`` errors; the settings become ``account.source``. The
keys are the ones every mail server has (`postbote.plugins.signin.server`), with POP3's ports and login choices.
Nothing here talks to a server: reading a config loads no TLS, SASL or OAuth2 code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from postbote import Section
from postbote.plugins.signin.server import TLS_LABELS, ServerSettings, TLSMode, normalise_fingerprint, read_server
from postbote.plugins.signin.settings import AUTH_CHOICES

__all__ = ["DEFAULT_PORTS", "TLS_LABELS", "POP3Settings", "TLSMode", "normalise_fingerprint", "pop3_settings"]

DEFAULT_PORTS = {TLSMode.IMPLICIT: 995, TLSMode.STARTTLS: 110, TLSMode.NONE: 110}


@dataclass(frozen=True)
class POP3Settings(ServerSettings):
    """``account.source`` of a POP3 account."""

    PROTOCOL = "POP3"


def pop3_settings(section: Section, base_dir: Path) -> POP3Settings | None:
    """The POP3 keys of one account (``defaults:`` merged in); None when some are wrong (recorded as problems)."""
    return read_server(section, base_dir, POP3Settings, default_ports=DEFAULT_PORTS, auth_choices=AUTH_CHOICES)
