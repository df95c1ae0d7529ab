"""Coming from fetchmail, getmail or mpop: their configs read into postbote accounts, their UID files read into the
state store (``postbote import``, ``postbote import-state``; docs/migration.md).

`postbote.migrate.fetchmailrc` tokenizes and parses a ``.fetchmailrc``, `postbote.migrate.getmailrc` reads getmail's
INI files; both produce `Imported` accounts: plain mappings of postbote keys, each with the notes (``unmapped``) on
what could not be carried over and why. `postbote.migrate.emit` writes them as a postbote.yaml, the passwords into
0600 files. `postbote.migrate.uidfiles` reads fetchmail's ``.fetchids``, getmail's ``oldmail-*`` and mpop's UIDL
file. Nothing here touches the network or SQLite.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from postbote.errors import ConfigError


class MigrationError(ConfigError):
    """A file of the old tool that cannot be read: ``FILE:LINE: what``. Exit status 2, like a config error."""


@dataclass
class Unmapped:
    """Something of the old config postbote does not take over: what it was, and why (and what to do instead)."""

    what: str
    reason: str

    def __str__(self) -> str:
        return f"{self.what}: {self.reason}"


@dataclass
class Imported:
    """One account read from an old tool's config: postbote's keys, in the order written, and the notes.

    ``password`` is the secret found in the old config (written to a 0600 file, never into the YAML); ``comments``
    are lines written above the account (e.g. how to re-pin a certificate); ``origin`` is ``FILE:LINE``."""

    name: str
    origin: str
    keys: dict[str, Any] = field(default_factory=dict)
    password: str | None = None
    comments: list[str] = field(default_factory=list)
    unmapped: list[Unmapped] = field(default_factory=list)

    def skip(self, what: str, reason: str) -> None:
        self.unmapped.append(Unmapped(what, reason))


@dataclass
class ImportResult:
    """Everything one import found: the accounts, global keys (``defaults:``) and notes that concern no account."""

    accounts: list[Imported] = field(default_factory=list)
    defaults: dict[str, Any] = field(default_factory=dict)
    unmapped: list[Unmapped] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)


_NAME_CHARS = re.compile(r"[^A-Za-z0-9._@+-]+")


def account_name(*parts: str, taken: set[str]) -> str:
    """A valid, unused postbote account name made of ``parts`` (``user@host``), ``-2``, ``-3``… when taken. A user
    name that is an address already names the account alone (``me@gmx.net``, not ``me@gmx.net@pop.gmx.net``)."""
    if parts and "@" in parts[0].strip("@"):
        parts = parts[:1]
    base = _NAME_CHARS.sub("-", "@".join(part for part in parts if part)).strip("-._@+") or "account"
    if not base[0].isalnum():
        base = "a" + base
    base = base[:90]
    name, number = base, 1
    while name in taken:
        number += 1
        name = f"{base}-{number}"
    taken.add(name)
    return name


SHA256_RE = re.compile(r"^(?:[0-9a-fA-F]{2}:){31}[0-9a-fA-F]{2}$|^[0-9a-fA-F]{64}$")


def fingerprint_kind(value: str) -> str:
    """``md5``, ``sha1``, ``sha256`` or ``unknown``, by the number of hex digits of a fingerprint."""
    digits = value.replace(":", "").strip()
    if not re.fullmatch(r"[0-9a-fA-F]+", digits):
        return "unknown"
    return {32: "md5", 40: "sha1", 64: "sha256"}.get(len(digits), "unknown")


def repin_comments(old: str, kind: str, host: str, port: int | None, starttls: str | None) -> list[str]:
    """The comment lines telling how to pin the server's certificate again, by its SHA-256 fingerprint."""
    connect = f"{host}:{port}" if port else f"{host}:PORT"
    starttls_flag = f" -starttls {starttls}" if starttls else ""
    return [
        f"The old tool pinned this server's certificate by its {kind.upper()} fingerprint {old}.",
        "postbote pins by the SHA-256 fingerprint of the certificate (tls_fingerprint). Re-pin it: run",
        f"  openssl s_client -connect {connect}{starttls_flag} -servername {host} </dev/null 2>/dev/null \\",
        "    | openssl x509 -noout -fingerprint -sha256",
        "check that the same command with -md5 / -sha1 prints the old fingerprint (the certificate you trusted),",
        "then put the SHA-256 value in tls_fingerprint below and remove the #.",
    ]


_SENDER_OPTION = re.compile(r"""\s*-[fr]\s*(['"]?)%F\1""")
_SENDER = re.compile(r"""\s*(['"]?)%F\1""")


def without_sender(command: str) -> str:
    """An MDA command without the old tool's sender placeholder ``%F`` -- and without the ``-f``/``-r`` option that
    introduced it, which would otherwise take the next argument as its value."""
    return _SENDER.sub("", _SENDER_OPTION.sub("", command)).strip()


__all__ = ["ImportResult", "Imported", "MigrationError", "Unmapped", "account_name", "fingerprint_kind",
           "repin_comments", "without_sender"]
