"""The protocol trace of ``postbote -v`` / ``--trace``: every command and reply line of POP3, IMAP, SMTP and LMTP.

Written for an admin reading along, as ``fetchmail -v`` does: one plain line on stderr per protocol line, naming the
account (when a poll has one bound), the protocol and the direction (``>`` sent, ``<`` received)::

    postbote: alice POP3< +OK Dovecot ready.
    postbote: alice POP3> USER alice
    postbote: alice POP3> PASS [redacted]
    postbote: alice POP3> RETR 1
    postbote: alice POP3< +OK 2310 octets
    postbote: alice POP3< [... 2310 bytes ...]
    postbote: alice SMTP> AUTH PLAIN [redacted]

A plain stream rather than log events: the trace is read live at a terminal, line by line, and stays out of the
JSON logs and the journal, which are for events.

Secrets never show: `redact_line` keeps only the verb of PASS, LOGIN and APOP and the verb and a known mechanism
name of AUTH/AUTHENTICATE; every line the client sends after an AUTH line, until the server's final answer, is a SASL
response and shows as ``[redacted]``; and every secret the process knows (`postbote.redact`) is masked in every line
as well. Message bodies are never shown: the clients report a literal, RETR data, DATA or BDAT payload as one line
``[... N bytes ...]`` (`ProtocolTrace.elided`).

Off (the default), `protocol_trace` returns None and a client's hooks cost one ``if`` per line: nothing is
formatted, no lock taken.
"""

from __future__ import annotations

import re
import sys
import threading
from enum import StrEnum
from typing import TextIO

import structlog
from postbote.credentials import redact

REDACTED = "[redacted]"
_VERBS_WITH_SECRETS = frozenset({"PASS", "LOGIN", "APOP"})
_AUTH_VERBS = frozenset({"AUTH", "AUTHENTICATE"})
# The mechanism names a trace may show after AUTH; anything else in that place could be a secret.
_MECHANISMS = frozenset({"PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256", "XOAUTH2", "OAUTHBEARER",
                         "DIGEST-MD5", "GSSAPI", "EXTERNAL", "ANONYMOUS", "NTLM"})
_IMAP_TAG = re.compile(r"[A-Za-z0-9.]{1,32}")
# Controls (C0, DEL, C1) and what lies beyond the BMP: written escaped. Said as the ranges to match -- the negated
# class of what prints cost 6 ms to compile at every start.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\U00010000-\U0010ffff]")


class Direction(StrEnum):
    SENT = ">"
    RECEIVED = "<"


class _Switch:
    """Whether the trace is on, and where it goes (None: the current ``sys.stderr``, looked up per line, so that
    whoever replaces stderr -- pytest, a daemon's log redirection -- gets the trace too)."""

    def __init__(self) -> None:
        self.on = False
        self.stream: TextIO | None = None
        self.lock = threading.Lock()


_SWITCH = _Switch()


def enable(stream: TextIO | None = None) -> None:
    """Trace every protocol session opened from now on, to ``stream`` (default: stderr)."""
    _SWITCH.stream = stream
    _SWITCH.on = True


def disable() -> None:
    _SWITCH.on = False
    _SWITCH.stream = None


def enabled() -> bool:
    return _SWITCH.on


def protocol_trace(protocol: str) -> ProtocolTrace | None:
    """A trace for one session of ``protocol`` (``POP3``, ``IMAP``, ``SMTP``, ``LMTP``), or None when tracing is off:
    a client keeps it and guards each hook with ``if self._trace:``."""
    return ProtocolTrace(protocol) if _SWITCH.on else None


class ProtocolTrace:
    """One session's trace. It follows SASL exchanges itself: after an AUTH/AUTHENTICATE line, the lines sent are
    the mechanism's responses (passwords, tokens, proofs) until the server answers with anything but a continuation
    (``+ ...`` in POP3 and IMAP, ``334`` in SMTP)."""

    def __init__(self, protocol: str) -> None:
        self.protocol = protocol
        self._in_sasl = False

    def sent(self, line: str | bytes) -> None:
        """One or more command lines (CRLF-separated) as the client writes them. What follows a line that carries
        a secret in the same write (a literal, a line break inside a password) is hidden too."""
        hide = False
        for text in _lines(line):
            if self._in_sasl or hide:
                self._write(Direction.SENT, REDACTED)
                continue
            shown = redact_line(text)
            self._in_sasl = starts_sasl(text)
            hide = shown != redact(text)
            self._write(Direction.SENT, shown)

    def received(self, line: str | bytes) -> None:
        """One reply line as the server sent it."""
        for text in _lines(line):
            if self._in_sasl and not _continuation(text):
                self._in_sasl = False
            self._write(Direction.RECEIVED, redact(text))

    def elided(self, size: int, *, sent: bool) -> None:
        """A message's data (or any literal), sent or received, in place of its bytes."""
        self._write(Direction.SENT if sent else Direction.RECEIVED, f"[... {size} bytes ...]")

    def _write(self, direction: Direction, text: str) -> None:
        account = structlog.contextvars.get_contextvars().get("account")
        who = f"{account} " if account else ""
        shown = _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
        with _SWITCH.lock:
            stream = _SWITCH.stream or sys.stderr
            stream.write(f"postbote: {who}{self.protocol}{direction} {shown}\n")
            stream.flush()


def redact_line(line: str) -> str:
    """A command line as the trace shows it: PASS, LOGIN and APOP without their arguments, AUTH and AUTHENTICATE
    with only a known mechanism name, and every secret the process knows masked. An IMAP tag before the verb is
    kept."""
    words = line.split()
    if not words:
        return line
    verb_at = 1 if len(words) > 1 and _IMAP_TAG.fullmatch(words[0]) and words[0].upper() not in (
        *_VERBS_WITH_SECRETS, *_AUTH_VERBS) else 0
    verb = words[verb_at].upper()
    kept = words[:verb_at + 1]
    if verb in _AUTH_VERBS:
        rest = words[verb_at + 1:]
        if rest and rest[0].upper() in _MECHANISMS:
            kept.append(rest[0].upper())
            rest = rest[1:]
        return " ".join(kept + ([REDACTED] if rest else []))
    if verb in _VERBS_WITH_SECRETS:
        return " ".join(kept + ([REDACTED] if len(words) > verb_at + 1 else []))
    return redact(line)


def starts_sasl(line: str) -> bool:
    """Whether ``line`` opens a SASL exchange (POP3/SMTP ``AUTH``, IMAP ``tag AUTHENTICATE``)."""
    words = line.split(None, 2)
    return bool(words) and words[0].upper() in _AUTH_VERBS or (len(words) > 1 and words[1].upper() in _AUTH_VERBS)


def _continuation(line: str) -> bool:
    """A server line that asks for more of a SASL exchange: ``+`` / ``+ challenge`` (POP3, IMAP), ``334`` (SMTP);
    an IMAP untagged ``*`` line does not end the exchange either."""
    return line == "+" or line.startswith(("+ ", "334", "* "))


def _lines(line: str | bytes) -> list[str]:
    text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
    return text.rstrip("\r\n").split("\r\n")
