"""Where an account's password comes from: inline, a file, a command or the environment; and what keeps secrets out
of logs, tracebacks and child processes.

Passwords are wrapped in `Secret`, whose ``repr`` and ``str`` never show the value, so a secret that ends up in a
log event, an exception or ``postbote check`` output is masked by construction. That is not enough on its own: a
secret also travels as plain text (the bytes of ``PASS``, an exception's arguments, a server echoing it back). So
every `Secret` registers its value, in the forms it can take in text, with a process-wide registry, and `redact`
(called by the logging chain's last processor and by the CLI's one-line error printer) masks every one of them.

Variables that ``password_env`` names are registered too: `child_environment` is the environment every program
postbote starts (an MDA, a ``password_command``, a ``token_command``) gets, without them.
"""

from __future__ import annotations

import base64
import json
import os
import re
import stat
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from postbote.errors import CredentialError

PASSWORD_COMMAND_TIMEOUT = 30.0
MASK = "********"
# Shorter values are not masked: "p" or "abc" would mask half of every log line and hide nothing worth hiding.
MIN_SECRET_LENGTH = 4
# Access tokens from a token_command change every hour or so; the oldest forms are forgotten beyond this many.
MAX_REGISTERED_FORMS = 1024


# --- the registry of secrets and redaction ------------------------------------------------------------------------

class _SecretRegistry:
    """The secret texts this process has seen, newest last, bounded. `redact` uses one compiled pattern of them all
    (one pass over the text however many there are) and reads it without locking."""

    def __init__(self, limit: int = MAX_REGISTERED_FORMS) -> None:
        self._limit = limit
        self._lock = threading.Lock()
        self._forms: OrderedDict[str, None] = OrderedDict()
        self._pattern: re.Pattern[str] | None = None

    def add(self, forms: Iterable[str]) -> None:
        with self._lock:
            new = False
            for form in forms:
                new = new or form not in self._forms
                self._forms[form] = None
                self._forms.move_to_end(form)  # seen again: the newest, the last to be forgotten
            while len(self._forms) > self._limit:
                self._forms.popitem(last=False)
            if new:
                self._compile()

    def _compile(self) -> None:
        # Longest first: at any position the longest secret wins, so one that contains another is masked whole.
        ordered = sorted(self._forms, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def __bool__(self) -> bool:
        return self._pattern is not None

    def redact(self, text: str) -> str:
        pattern = self._pattern
        if pattern is None or not pattern.search(text):
            return text
        return pattern.sub(MASK, text)


_secrets = _SecretRegistry()


def secret_forms(value: str) -> set[str]:
    """The ways ``value`` can be written in a log or a traceback: as it is, escaped inside a ``repr`` of a str or
    of its UTF-8 bytes, escaped in JSON, and base64-encoded alone (AUTH LOGIN, HTTP basic auth)."""
    encoded = value.encode("utf-8", "surrogateescape")
    forms = {value, repr(value)[1:-1], repr(encoded)[2:-1], json.dumps(value)[1:-1],
             base64.b64encode(encoded).decode("ascii")}
    return {form for form in forms if len(form) >= MIN_SECRET_LENGTH}


def register_secret(value: str | bytes) -> None:
    """Have `redact` mask ``value`` from now on (values shorter than `MIN_SECRET_LENGTH` are not masked)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "surrogateescape")
    if len(value) >= MIN_SECRET_LENGTH:
        _secrets.add(secret_forms(value))


def redact(text: str) -> str:
    """``text`` with every secret postbote has seen in this process replaced by ``********``."""
    return _secrets.redact(text)


def knows_secrets() -> bool:
    """Whether any secret is registered (the log chain skips its work when none is)."""
    return bool(_secrets)


# --- the environment of child processes ---------------------------------------------------------------------------

class _SecretVariables:
    """Names of the environment variables that hold a secret (every ``password_env`` of the configuration)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._names: frozenset[str] = frozenset()

    def add(self, name: str) -> None:
        with self._lock:
            self._names = self._names | {name}

    @property
    def names(self) -> frozenset[str]:
        return self._names


_secret_variables = _SecretVariables()


def register_secret_variable(name: str) -> None:
    """Keep the environment variable ``name`` from every child postbote starts (see `child_environment`)."""
    _secret_variables.add(name)


def secret_variables() -> frozenset[str]:
    return _secret_variables.names


def child_environment(keep: Iterable[str] = ()) -> dict[str, str]:
    """``os.environ`` without the variables the configuration names as secret sources (but those in ``keep``):
    the environment for an MDA, a ``password_command`` or a ``token_command``."""
    dropped = secret_variables() - set(keep)
    return {name: value for name, value in os.environ.items() if name not in dropped}


# --- secrets and where passwords come from ------------------------------------------------------------------------

class Secret:
    """A string that does not print itself, and that `redact` masks wherever it appears in a log."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value
        register_secret(value)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


class PasswordKind(StrEnum):
    """The configuration key that gives the password (equal to the key's name as a string)."""

    INLINE = "password"
    FILE = "password_file"
    COMMAND = "password_command"
    ENV = "password_env"


@dataclass(frozen=True)
class PasswordSource:
    """Exactly one of the four ways to give a password; `resolve` runs at connect time, not at config load."""

    kind: str  # a PasswordKind
    inline: Secret | None = None
    file: Path | None = None
    command: tuple[str, ...] = ()
    env: str | None = None

    def __post_init__(self) -> None:
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
    import subprocess  # only password_command needs it

    program = argv[0]
    try:
        done = subprocess.run(list(argv), capture_output=True, timeout=PASSWORD_COMMAND_TIMEOUT,
                              stdin=subprocess.DEVNULL, check=False, env=child_environment())
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
        reason = f": {redact(detail[0])[:200]}" if detail else ""
        raise CredentialError(f"password_command: {program} exited with status {done.returncode}{reason}")
    first_line = done.stdout.split(b"\n", 1)[0].rstrip(b"\r")
    password = _decode_utf8(first_line, f"password_command {program}")
    if not password:
        raise CredentialError(f"password_command: {program} printed nothing")
    return password
