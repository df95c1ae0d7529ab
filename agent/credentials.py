"""Where an account's password comes from: inline, a file, a command or the environment.

Passwords are wrapped in `Secret`, whose ``repr`` and ``str`` never show the value, so a secret that ends up in a
log event, an exception or ``postbote check`` output is masked by construction.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from agent.errors import CredentialError

PASSWORD_COMMAND_TIMEOUT = 30.0


class Secret:
    """A string that does not print itself."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class PasswordSource:
    """Exactly one of the four ways to give a password; `resolve` runs at connect time, not at config load."""

    kind: str  # "password" | "password_file" | "password_command" | "password_env"
    inline: Secret | None = None
    file: Path | None = None
    command: tuple[str, ...] = ()
    env: str | None = None

    def describe(self) -> str:
        """What ``postbote check`` shows: the source, never the secret."""
        if self.kind == "password":
            return "inline password (********)"
        if self.kind == "password_file":
            return f"password_file {self.file}"
        if self.kind == "password_command":
            return f"password_command {self.command[0]} (+{len(self.command) - 1} args)"
        return f"password_env ${self.env}"

    def resolve(self) -> Secret:
        if self.kind == "password" and self.inline is not None:
            return self.inline
        if self.kind == "password_file" and self.file is not None:
            return Secret(_read_password_file(self.file))
        if self.kind == "password_command":
            return Secret(_run_password_command(self.command))
        if self.kind == "password_env" and self.env is not None:
            value = os.environ.get(self.env)
            if not value:
                raise CredentialError(f"password_env: environment variable {self.env} is not set or empty")
            return Secret(value)
        raise CredentialError(f"no password configured ({self.kind})")


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
    password = first_line.rstrip(b"\r\n").decode("utf-8", errors="strict") if first_line else ""
    if not password:
        raise CredentialError(f"password_file {path} is empty")
    return password


def _run_password_command(argv: tuple[str, ...]) -> str:
    """Run ``argv`` without a shell and take the first line of its output as the password."""
    import subprocess  # only password_command needs it

    program = argv[0]
    try:
        done = subprocess.run(list(argv), capture_output=True, timeout=PASSWORD_COMMAND_TIMEOUT,
                              stdin=subprocess.DEVNULL, check=False)
    except FileNotFoundError:
        raise CredentialError(f"password_command: {program}: no such program") from None
    except PermissionError:
        raise CredentialError(f"password_command: {program}: permission denied") from None
    except subprocess.TimeoutExpired:
        raise CredentialError(
            f"password_command: {program} did not finish within {PASSWORD_COMMAND_TIMEOUT:.0f} s") from None
    if done.returncode != 0:
        # stderr is the program's own diagnostics, not its secret output: show its first line to help the admin.
        detail = done.stderr.decode("utf-8", "replace").strip().splitlines()
        reason = f": {detail[0][:200]}" if detail else ""
        raise CredentialError(f"password_command: {program} exited with status {done.returncode}{reason}")
    password = done.stdout.decode("utf-8", "replace").split("\n", 1)[0].rstrip("\r")
    if not password:
        raise CredentialError(f"password_command: {program} printed nothing")
    return password
