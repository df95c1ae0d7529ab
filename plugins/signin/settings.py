"""The sign-in keys of an account: ``auth:`` and exactly one secret, read with the core's file:line errors.

What ``auth:`` may say is named here (`AuthChoice`); the SASL code (`postbote.plugins.signin.sasl`) implements the
mechanisms, and the token sources (`postbote.plugins.signin.oauth2`) fetch the tokens, so reading a config loads
no code that talks to a server.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from postbote import Parser, Secret, Section, nonempty_text, path_relative_to, text, text_list
from postbote.plugins.signin.passwords import PasswordKind, PasswordSource

if TYPE_CHECKING:
    from postbote.plugins.signin.oauth2_settings import OAuth2Settings


class AuthChoice(StrEnum):
    """What ``auth:`` may say: ``auto`` or one login mechanism."""

    AUTO = "auto"
    USER = "user"
    APOP = "apop"
    PLAIN = "plain"
    LOGIN = "login"
    CRAM_MD5 = "cram-md5"
    SCRAM_SHA_1 = "scram-sha-1"
    SCRAM_SHA_256 = "scram-sha-256"
    XOAUTH2 = "xoauth2"
    OAUTHBEARER = "oauthbearer"


AUTH_CHOICES: tuple[str, ...] = tuple(choice.value for choice in AuthChoice)
# The mechanisms that log in with an OAuth2 access token rather than a password.
TOKEN_MECHANISMS: frozenset[str] = frozenset({AuthChoice.XOAUTH2.value, AuthChoice.OAUTHBEARER.value})

PASSWORD_KEYS: tuple[str, ...] = tuple(kind.value for kind in PasswordKind)
TOKEN_KEYS = ("token_command", "oauth2")
SECRET_KEYS = (*PASSWORD_KEYS, *TOKEN_KEYS)


@dataclass(frozen=True)
class Credentials:
    """An account's secret: a password source, a ``token_command`` or an ``oauth2:`` section (exactly one, once
    the config is valid)."""

    password: PasswordSource | None = field(default=None, repr=False)
    token_command: tuple[str, ...] = ()
    oauth2: OAuth2Settings | None = None

    def describe(self) -> str:
        """Where the secret comes from, for ``postbote check``; never the secret itself."""
        if self.password is not None:
            return self.password.describe()
        if self.token_command:
            return f"token_command {self.token_command[0]} (+{len(self.token_command) - 1} args)"
        return f"oauth2 ({self.oauth2.provider or 'custom'}, client {self.oauth2.client_id})" if self.oauth2 else "none"

    @property
    def inline(self) -> bool:
        """Whether the password is written in the config file itself (which must then not be readable by others)."""
        return self.password is not None and self.password.kind is PasswordKind.INLINE

    @property
    def password_file(self) -> Path | None:
        return self.password.file if self.password is not None and self.password.kind is PasswordKind.FILE else None


def credentials_from_section(section: Section, base_dir: Path, auth: str | None) -> Credentials:
    """Exactly one secret: a password source, a ``token_command`` or ``oauth2``; it must suit ``auth``. Mistakes are
    recorded in ``section.problems``."""
    section.used.update(SECRET_KEYS)  # every secret key is read here, given or not: a misspelt one gets a hint
    given = [key for key in SECRET_KEYS if key in section]
    if len(given) != 1:
        what = "none" if not given else ", ".join(given)
        section.problem(f"give exactly one of {', '.join(SECRET_KEYS)} (found {what})")
        return Credentials()
    kind = given[0]
    node = section.raw(kind)
    if auth in TOKEN_MECHANISMS and kind in PASSWORD_KEYS:
        section.problem(f"auth: {auth} logs in with an OAuth2 access token: give token_command or oauth2", node)
    elif auth not in (AuthChoice.AUTO, *TOKEN_MECHANISMS) and kind in TOKEN_KEYS:
        section.problem(f"auth: {auth} logs in with a password: give one of {', '.join(PASSWORD_KEYS)}", node)
    if kind == "token_command":
        return Credentials(token_command=tuple(section.get(kind, _argv) or ()))
    if kind == "oauth2":
        from postbote.plugins.signin.oauth2_settings import oauth2_from_section

        oauth = section.section(kind)
        return Credentials(oauth2=oauth2_from_section(oauth, base_dir) if oauth else None)
    return Credentials(password=_password_source(section, base_dir, PasswordKind(kind)))


def _password_source(section: Section, base_dir: Path, kind: PasswordKind) -> PasswordSource | None:
    if kind is PasswordKind.INLINE:
        value = section.get(kind.value, text)
        # lasting: no login registers an inline password again, and with many accounts the registry's bound
        # would otherwise forget the first ones
        return PasswordSource(kind, inline=Secret(value, lasting=True)) if value is not None else None
    if kind is PasswordKind.FILE:
        file = section.get(kind.value, _password_file_path(base_dir))
        return PasswordSource(kind, file=file) if file is not None else None
    if kind is PasswordKind.COMMAND:
        argv = section.get(kind.value, _argv)
        return PasswordSource(kind, command=tuple(argv)) if argv else None
    env = section.get(kind.value, _env_name)
    return PasswordSource(kind, env=env) if env else None


def _password_file_path(base_dir: Path) -> Parser[Path]:
    """A path that may name environment variables (``${CREDENTIALS_DIRECTORY}/alice``), expanded when read."""
    relative = path_relative_to(base_dir)

    def parse(value: Any) -> Path:
        name = nonempty_text(value)
        return Path(name) if "$" in name else relative(name)

    return parse


def _argv(value: Any) -> list[str]:
    if not isinstance(value, list):
        raise ValueError("expected a command as a list of arguments (it is run without a shell), "
                         "e.g. [pass, show, mail]")
    return text_list(value)


def _env_name(value: Any) -> str:
    name = nonempty_text(value)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError("expected an environment variable name")
    return name


def server_label(username: str, host: str, port: int) -> str:
    """How ``check`` and ``status`` show an account's server: ``user@host:port``, or ``user on host:port`` when the
    user name is an address itself (``me@example.org@pop.example.org:995`` reads badly)."""
    return f"{username} on {host}:{port}" if "@" in username else f"{username}@{host}:{port}"
