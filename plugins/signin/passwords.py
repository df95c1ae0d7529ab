"""Where an account's password comes from: inline, a file, a command or the environment.

A `PasswordSource` is read from the config (``postbote.plugins.signin.settings``) and resolved only at connect time,
so a password file that is not there yet, or a command that needs a running agent, does not stop the config from
loading. Every password is a `postbote.Secret` (masked in every log) and every ``password_env`` variable is kept
from the programs postbote starts (`postbote.child_environment`).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from postbote import CredentialError, Secret, child_environment, redact, register_secret, register_secret_variable

PASSWORD_COMMAND_TIMEOUT = 30.0


class PasswordKind(StrEnum):
    """The configuration key that gives the password (equal to the key's name as a string)."""

    INLINE = "password"
    FILE = "password_file"
    COMMAND = "password_command"
    ENV = "password_env"


@dataclass(frozen=True)
class PasswordSource:
    """Exactly one of the four ways to give a password; `resolve` runs at connect time, not at config load."""

    kind: PasswordKind  # given as the key's name, it is made a PasswordKind
    inline: Secret | None = None
    file: Path | None = None
    command: tuple[str, ...] = ()
    env: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", PasswordKind(self.kind))
        if self.kind == PasswordKind.ENV and self.env:
            register_secret_variable(self.env)

    def describe(self) -> str:
        """What ``postbote check`` shows: the source, never the secret."""
        if self.kind == PasswordKind.INLINE:
            return "inline password (********)"
        if self.kind == PasswordKind.FILE:
            return f"password_file {self.file}"
        if self.kind == PasswordKind.COMMAND:
            return f"password_command {self.command[0]} (+{len(self.command) - 1} args)"
        return f"password_env ${self.env}"

    def resolve(self) -> Secret:
        """The password; a `CredentialError` naming the source when it cannot be had or is not UTF-8 text."""
        if self.kind == PasswordKind.INLINE and self.inline is not None:
            _require_utf8(self.inline.reveal(), "password")
            return self.inline
        if self.kind == PasswordKind.FILE and self.file is not None:
            return Secret(_read_password_file(self.file))
        if self.kind == PasswordKind.COMMAND:
            return Secret(_run_password_command(self.command))
        if self.kind == PasswordKind.ENV and self.env is not None:
            value = os.environ.get(self.env)
            if not value:
                raise CredentialError(f"password_env: environment variable {self.env} is not set or empty")
            return Secret(_require_utf8(value, f"password_env {self.env}"))
        raise CredentialError(f"no password configured ({self.kind})")


def _require_utf8(value: str, source: str) -> str:
    """``value`` when it can be sent as UTF-8; the environment gives undecodable bytes as lone surrogates, which
    would otherwise fail deep inside the login with the password in the exception."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        register_secret(value)
        raise CredentialError(f"{source}: the value is not valid UTF-8") from None
    return value


def _decode_utf8(value: bytes, source: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        register_secret(value)
        raise CredentialError(f"{source}: the value is not valid UTF-8") from None


def _read_password_file(path: Path) -> str:
    """The first line of ``path``; ``${CREDENTIALS_DIRECTORY}/name`` reads systemd credentials (LoadCredential=)."""
    expanded = os.path.expandvars(str(path))
    if "$" in expanded:
        raise CredentialError(f"password_file {path}: the environment variable in it is not set "
                              "(CREDENTIALS_DIRECTORY is set by systemd for units with LoadCredential=)")
    path = Path(expanded)
    try:
        if os.stat(path).st_mode & stat.S_IROTH:
            raise CredentialError(f"password_file {path} is readable by other users; run: chmod o-r {path}")
        with open(path, "rb") as handle:
            first_line = handle.readline(65536)
    except OSError as exc:
        raise CredentialError(f"password_file {path}: {exc.strerror or exc}") from None
    password = _decode_utf8(first_line.rstrip(b"\r\n"), f"password_file {path}")
    if not password:
        raise CredentialError(f"password_file {path} is empty")
    return password


def _run_password_command(argv: tuple[str, ...]) -> str:
    """Run ``argv`` without a shell, and without the secret variables in its environment, and take the first line
    of its output as the password."""
    first_line = first_output_line("password_command", argv, timeout=PASSWORD_COMMAND_TIMEOUT)
    password = _decode_utf8(first_line, f"password_command {argv[0]}")
    if not password:
        raise CredentialError(f"password_command: {argv[0]} printed nothing")
    return password


def first_output_line(key: str, argv: tuple[str, ...], *, timeout: float) -> bytes:
    """The first line a secret-printing program (``password_command``, ``token_command``: named by ``key`` in
    errors) writes, run without a shell and without the secret variables in its environment. A failure is a
    `CredentialError` that shows the first line of the program's diagnostics, never what it printed."""
    import subprocess  # only the commands need it

    program = argv[0]
    try:
        done = subprocess.run(list(argv), capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL,
                              check=False, env=child_environment())
    except FileNotFoundError:
        raise CredentialError(f"{key}: {program}: no such program") from None
    except PermissionError:
        raise CredentialError(f"{key}: {program}: permission denied") from None
    except subprocess.TimeoutExpired:
        raise CredentialError(f"{key}: {program} did not finish within {timeout:g} s") from None
    first_line = done.stdout.split(b"\n", 1)[0].rstrip(b"\r")
    if done.returncode != 0:
        # stderr is the program's own diagnostics, not its secret output: its first line helps the admin.
        detail = done.stderr.decode("utf-8", "replace").strip().splitlines()
        shown = redact(detail[0]) if detail else ""
        if printed := first_line.decode("utf-8", "replace").strip():  # a secret it printed before failing
            shown = shown.replace(printed, "********")
        reason = f": {shown[:200]}" if shown else ""
        raise CredentialError(f"{key}: {program} exited with status {done.returncode}{reason}")
    return first_line
