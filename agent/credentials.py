"""What keeps secrets out of logs, tracebacks and child processes.

Passwords and tokens are wrapped in `Secret`, whose ``repr`` and ``str`` never show the value, so a secret that ends up
in a log event, an exception or ``postbote check`` output is masked by construction. That is not enough on its own: a
secret also travels as plain text (the bytes of ``PASS``, an exception's arguments, a server echoing it back). So
every `Secret` registers its value, in the forms it can take in text, with a process-wide registry, and `redact`
(called by the logging chain's last processor and by the CLI's one-line error printer) masks every one of them.

Variables that hold a secret (a ``password_env``) are registered too: `child_environment` is the environment every
program postbote starts (an MDA, a ``password_command``, a ``token_command``) gets, without them.

Where a password comes from (inline, a file, a command, the environment) is the sign-in code's business
(``postbote.plugins.signin.passwords``); the core keeps only what logging and child processes need.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable

MASK = "********"
# Shorter values are not masked: "p" or "abc" would mask half of every log line and hide nothing worth hiding.
MIN_SECRET_LENGTH = 4
# Access tokens from a token_command change every hour or so: beyond this many forms, the forms not seen for the
# longest time are forgotten (a configured password is seen again at every login, so it stays). ~5 forms a secret.
MAX_REGISTERED_FORMS = 50_000
# Up to this many forms, one compiled pattern finds them all (about a microsecond a log line); beyond it a regular
# expression's cost grows with every alternative (a millisecond a line at 10,000), so the forms are looked up by
# their first characters instead, at a cost that grows with the text only.
PATTERN_FORMS = 256
# Texts found to show no secret are remembered until a new form is registered: the same event names, account names
# and values come back in every poll's log line, and each would be searched again. Short texts only, and a bounded
# number of them (the memory is forgotten whole when full).
CLEAN_TEXTS = 4096
CLEAN_TEXT_LENGTH = 200


# --- the registry of secrets and redaction ------------------------------------------------------------------------


class _Bucket:
    """The forms that start with the same `MIN_SECRET_LENGTH` characters, by length. Thousands can share a start --
    the base64 of logins whose user names do (``AHVzZXI...`` for ``\\0user...``) -- so neither adding one nor finding
    one at a position of a text may walk them all: a set per length, and the lengths longest first."""

    def __init__(self) -> None:
        self.lengths: tuple[int, ...] = ()  # replaced whole, so that `longest_at` reads it without a lock
        self.forms: dict[int, set[str]] = {}

    def add(self, form: str) -> None:
        group = self.forms.get(len(form))
        if group is None:
            self.forms[len(form)] = {form}
            self.lengths = tuple(sorted(self.forms, reverse=True))
        else:
            group.add(form)

    def discard(self, form: str) -> bool:
        """Forget ``form``; True when the bucket is empty now."""
        group = self.forms.get(len(form))
        if group is not None:
            group.discard(form)
            if not group:
                del self.forms[len(form)]
                self.lengths = tuple(sorted(self.forms, reverse=True))
        return not self.forms

    def longest_at(self, text: str, start: int) -> str | None:
        """The longest form that ``text`` has at ``start`` (the longest wins: one secret may contain another)."""
        for length in self.lengths:
            candidate = text[start:start + length]
            if len(candidate) == length and candidate in self.forms.get(length, ()):
                return candidate
        return None


class _SecretRegistry:
    """The secret texts this process has seen, newest last, bounded. `redact` reads without locking: it uses one
    compiled pattern while the forms are few, and an index of them by their first `MIN_SECRET_LENGTH` characters
    once they are many (a provider's thousands of accounts), whose buckets change in place one form at a time."""

    def __init__(self, limit: int = MAX_REGISTERED_FORMS, pattern_forms: int = PATTERN_FORMS) -> None:
        self._limit = limit
        self._pattern_forms = pattern_forms
        self._lock = threading.Lock()
        self._forms: OrderedDict[str, None] = OrderedDict()  # bounded, least recently seen first
        self._lasting: set[str] = set()  # the configuration's: never forgotten
        self._pattern: re.Pattern[str] | None = None
        self._index: dict[str, _Bucket] | None = None  # first characters -> the forms starting so
        self._clean: dict[str, None] = {}  # texts that show none of the forms registered (`CLEAN_TEXTS`)

    def add(self, forms: Iterable[str], *, lasting: bool = False) -> None:
        """Mask ``forms`` from now on. ``lasting`` forms (the configuration's passwords) stay for the life of the
        process; the others are bounded (`MAX_REGISTERED_FORMS`), the forms not seen for longest going first."""
        with self._lock:
            if self._add(forms, lasting):
                # after the forms are searchable: a `redact` that took the new memory searches with them too
                self._clean = {}

    def _add(self, forms: Iterable[str], lasting: bool) -> bool:
        """Register ``forms``; True when any of them is new."""
        added: list[str] = []
        for form in forms:
            if lasting:
                if form not in self._lasting:
                    self._lasting.add(form)
                    if self._forms.pop(form, False) is False:  # not known yet (else known, now for good)
                        added.append(form)
            elif form not in self._lasting:
                if form not in self._forms:
                    added.append(form)
                self._forms[form] = None
                self._forms.move_to_end(form)  # seen again: the newest, the last to be forgotten
        forgotten = []
        while len(self._forms) > self._limit:
            forgotten.append(self._forms.popitem(last=False)[0])
        if not added and not forgotten:
            return False
        if len(self._forms) + len(self._lasting) <= self._pattern_forms:
            # Longest first: at any position the longest secret wins, so one containing another is masked whole.
            ordered = sorted([*self._lasting, *self._forms], key=len, reverse=True)
            self._pattern = re.compile("|".join(map(re.escape, ordered)))
            re.purge()  # the module's cache would keep every earlier version of this pattern alive
            self._index = None
            return bool(added)
        if self._index is None:  # many forms now: index them all, once
            self._index, added, forgotten = {}, [*self._lasting, *self._forms], []
        for form in forgotten:
            head = form[:MIN_SECRET_LENGTH]
            bucket = self._index.get(head)
            if bucket is not None and bucket.discard(form):
                del self._index[head]
        for form in added:
            head = form[:MIN_SECRET_LENGTH]
            bucket = self._index.get(head)
            if bucket is None:
                bucket = _Bucket()
                bucket.add(form)
                self._index[head] = bucket  # published only once it holds its form
            else:
                bucket.add(form)
        self._pattern = None
        return bool(added)

    def __bool__(self) -> bool:
        return self._pattern is not None or self._index is not None

    def lasts(self, value: str) -> bool:
        """Whether ``value`` is registered for good (`add` with ``lasting``); read without the lock."""
        return value in self._lasting

    def redact(self, text: str) -> str:
        clean = self._clean  # first: the pattern and index read next are at least as new as this memory
        if text in clean:
            return text
        pattern, index = self._pattern, self._index
        if pattern is not None:
            if pattern.search(text):
                return pattern.sub(MASK, text)
            return self._clean_text(clean, text)
        if index is None or len(text) < MIN_SECRET_LENGTH:
            return text
        pieces: list[str] = []
        position = start = 0
        end = len(text) - MIN_SECRET_LENGTH + 1
        while start < end:
            bucket = index.get(text[start:start + MIN_SECRET_LENGTH])
            found = bucket.longest_at(text, start) if bucket is not None else None
            if found is None:
                start += 1
                continue
            pieces += [text[position:start], MASK]
            position = start = start + len(found)
        if not pieces:
            return self._clean_text(clean, text)
        pieces.append(text[position:])
        return "".join(pieces)

    @staticmethod
    def _clean_text(clean: dict[str, None], text: str) -> str:
        if len(text) <= CLEAN_TEXT_LENGTH:
            if len(clean) >= CLEAN_TEXTS:
                clean.clear()
            clean[text] = None
        return text


_secrets = _SecretRegistry()


@functools.lru_cache(maxsize=MAX_REGISTERED_FORMS // 5)
def secret_forms(value: str) -> frozenset[str]:
    """The ways ``value`` can be written in a log or a traceback: as it is, escaped inside a ``repr`` of a str or
    of its UTF-8 bytes, escaped in JSON, and base64-encoded alone (AUTH LOGIN, HTTP basic auth). Remembered: every
    poll registers its account's password and login again, and the registry holds them anyway."""
    encoded = value.encode("utf-8", "surrogateescape")
    forms = {value, repr(value)[1:-1], repr(encoded)[2:-1], json.dumps(value)[1:-1],
             base64.b64encode(encoded).decode("ascii")}
    return frozenset(form for form in forms if len(form) >= MIN_SECRET_LENGTH)


def register_secret(value: str | bytes, *, lasting: bool = False) -> None:
    """Have `redact` mask ``value`` from now on (values shorter than `MIN_SECRET_LENGTH` are not masked).
    ``lasting``: for as long as the process runs (a password in the configuration, which no login registers again);
    else the registry may forget it once `MAX_REGISTERED_FORMS` newer forms have been seen."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "surrogateescape")
    if lasting and _secrets.lasts(value):
        return  # a login registers the same wire form at every poll: known for good already
    if len(value) >= MIN_SECRET_LENGTH:
        _secrets.add(secret_forms(value), lasting=lasting)


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


# --- secrets ---------------------------------------------------------------------------------------------------------

class Secret:
    """A string that does not print itself, and that `redact` masks wherever it appears in a log."""

    __slots__ = ("_value", "lasting")

    def __init__(self, value: str, *, lasting: bool = False) -> None:
        """``lasting``: a secret of the configuration, masked for the life of the process (`register_secret`)."""
        self._value = value
        self.lasting = lasting
        register_secret(value, lasting=lasting)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)
