"""TLS policy: certificates and host names verified by default, TLS 1.2 at least, optional SHA-256 pinning.

One place decides how postbote trusts a server, for POP3 (implicit TLS and STLS) and for STARTTLS to the MTA.
A pinned ``tls_fingerprint`` replaces CA verification for self-signed servers, as fetchmail's ``sslfingerprint``
does, but with SHA-256 and compared in constant time.

``ssl`` is imported when a connection is wrapped, not when the config is read. Building a context loads the CA
store (16-20 ms of CPU); it is built once per policy and shared by every connection that uses that policy, until
`forget_contexts` (a config reload) -- so a CA file replaced on disk is read again at the next reload.

TLS sessions are resumed where the server allows it (Dovecot does when its login processes serve many connections,
``service_count = 0``): the session of the last connection to a server that passed the checks is kept per policy,
host and port, and offered by the next connection there, for any account. Resuming skips the key exchange and the
certificate chain, not the checks: only the server that holds the session's secret can resume it (any other one
gets a full handshake, verified as usual), and the pin is compared on every connection, resumed or not, against the
certificate the session carries.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from postbote.errors import AccountError
from postbote.logconfig import get_logger

if TYPE_CHECKING:
    import socket
    import ssl

log = get_logger("postbote.tls")


class TLSError(AccountError):
    """The TLS handshake failed or the server's certificate is not trusted."""


@dataclass(frozen=True)
class TLSPolicy:
    verify: bool = True
    ca_file: str | None = None
    fingerprint: str | None = None  # normalised SHA-256 of the server certificate (DER)

    def context(self) -> ssl.SSLContext:
        """The policy's context, built on first use and then shared (an `ssl.SSLContext` is safe to share between
        threads for wrapping sockets)."""
        with _CONTEXTS_LOCK:
            context = _CONTEXTS.get(self)
            if context is None:
                context = _CONTEXTS[self] = self._new_context()
        return context

    def _new_context(self) -> ssl.SSLContext:
        import ssl

        if self.verify and not self.fingerprint:
            context = ssl.create_default_context(cafile=self.ca_file)
        else:
            # No CA store where nothing is verified against one (the pin is the check): OpenSSL walks the chain
            # even when told not to verify, and for a self-signed certificate it looked for the issuer in the
            # system's certificate directory on every handshake, listing its hundreds of entries (about a tenth of
            # the CPU of an empty poll).
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.sslsocket_class = _session_keeping_socket()
        return context

    def wrap(self, sock: socket.socket, host: str, where: str, *, implicit: bool = False,
             starttls: StartTLS | None = None) -> ssl.SSLSocket:
        """Handshake on ``sock`` (closed on failure) and check the pin; errors name the server, the reason and
        what to do. A refused certificate is read on a second, unverified connection and shown, ready to pin: for
        ``implicit`` TLS (from the first byte) that connection sends nothing; after STARTTLS it says what
        ``starttls`` says (the protocol's greeting, its STARTTLS command and answer) and nothing else."""
        import ssl

        peer = _peer(sock)  # now: the wrapped socket takes the connection over, a failed one closes it
        context = self.context()
        key = None if peer is None else (self, host, peer[1])
        session = _session_for(key, context)
        try:
            wrapped = context.wrap_socket(sock, server_hostname=host, session=session)
        except ssl.SSLCertVerificationError as exc:
            _forget_session(key)
            sock.close()
            fresh = None if peer is None or not (implicit or starttls) else _Probe(peer, starttls)
            raise TLSError(self._untrusted(exc, where, fresh, sock.gettimeout())) from None
        except TimeoutError:
            sock.close()
            raise TLSError(f"TLS handshake with {where} timed out") from None
        except (ssl.SSLError, OSError) as exc:
            _forget_session(key)
            sock.close()
            reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
            hint = PLAIN_PORT_HINT if reason in PLAIN_PORT_REASONS else ""
            raise TLSError(f"TLS handshake with {where} failed: {reason}{hint}") from None
        if self.fingerprint:
            try:
                self._check_pin(wrapped, where)
            except TLSError:
                _forget_session(key)
                raise
        if key is not None and isinstance(wrapped, _session_keeping_socket()):
            wrapped.session_key = key  # type: ignore[attr-defined]  # checked: its session may be offered again
            wrapped.offered = session is not None  # type: ignore[attr-defined]
        if _debugging():
            log.debug("tls.connected", where=where, version=wrapped.version(), resumed=wrapped.session_reused)
        return wrapped

    def _untrusted(self, exc: ssl.SSLCertVerificationError, where: str, fresh: _Probe | None,
                   timeout: float | None) -> str:
        """What went wrong and what to do: the certificate's subject, names and SHA-256 fingerprint (read on a
        second, unverified connection, `_Probe`) and the line that pins it. Whatever the probe finds or fails to
        find, the reason of the refusal is always shown."""
        reason = exc.verify_message or exc.reason
        message = f"TLS certificate of {where} not trusted: {reason}"
        der = _presented_certificate(fresh, timeout) if fresh else None
        subject, names = _subject_and_names(der) if der else ("", ())
        if "hostname mismatch" in str(reason).lower() or "ip address mismatch" in str(reason).lower():
            held = (f"the certificate is for {', '.join(names)}" if names
                    else f"the certificate is for {subject}" if subject else "the certificate is for another name")
            return message + f" ({held}: connect to a name it holds, or pin it with tls_fingerprint)"
        advice = "" if self.ca_file else "set tls_ca_file for a private CA, or "
        if der is None:
            return (f"{message} ({advice}tls_fingerprint for a self-signed server; its SHA-256 fingerprint: "
                    "openssl s_client -connect HOST:PORT [-starttls pop3|imap|smtp] </dev/null | "
                    "openssl x509 -noout -fingerprint -sha256)")
        import hashlib

        fingerprint = _colons(hashlib.sha256(der).hexdigest())
        described = f" for {subject}" if subject else ""
        if names:
            described += f" (names: {', '.join(names)})"
        return (f"{message}. The server presented a certificate{described} with SHA-256 fingerprint {fingerprint}: "
                f"{advice}to trust this one certificate, add\n    tls_fingerprint: {fingerprint}\n"
                "only after checking it out of band (with the server's admin, or on the server itself): pinning a "
                "certificate you have not verified trusts whoever answered this time")

    def _check_pin(self, wrapped: ssl.SSLSocket, where: str) -> None:
        import hashlib
        import hmac

        certificate = wrapped.getpeercert(binary_form=True) or b""
        actual = hashlib.sha256(certificate).hexdigest()
        if not hmac.compare_digest(actual, self.fingerprint or ""):
            wrapped.close()
            raise TLSError(f"TLS certificate of {where} does not match tls_fingerprint "
                           f"(server presented SHA-256 {_colons(actual)})")


def certificate_facts(wrapped: ssl.SSLSocket) -> dict[str, str]:
    """What ``postbote check --connect`` shows of the server's certificate: subject, issuer and expiry (when it was
    verified against a CA; a pinned certificate is not parsed), the TLS version, and its SHA-256 fingerprint in the
    form ``tls_fingerprint:`` takes."""
    import hashlib

    facts: dict[str, str] = {"version": wrapped.version() or "?"}
    parsed: dict[str, Any] = dict(wrapped.getpeercert() or {})

    def names(field: str) -> str:
        pairs = [pair for rdn in parsed.get(field, ()) for pair in rdn]
        return ", ".join(f"{pair[0]}={pair[1]}" for pair in pairs)

    if parsed:
        facts["subject"] = names("subject")
        facts["issuer"] = names("issuer")
        facts["expires"] = str(parsed.get("notAfter", "?"))
        alternatives = [entry[1] for entry in parsed.get("subjectAltName", ())]
        if alternatives:
            facts["names"] = ", ".join(str(value) for value in alternatives)
    der = wrapped.getpeercert(binary_form=True)
    if der:
        facts["sha256"] = _colons(hashlib.sha256(der).hexdigest())
    return facts


_CONTEXTS: dict[TLSPolicy, ssl.SSLContext] = {}
_CONTEXTS_LOCK = threading.Lock()


def forget_contexts() -> None:
    """Build every context anew on next use: the CA files and the system's CA store are read again. The TLS
    sessions go too (each belongs to the context that made it)."""
    with _CONTEXTS_LOCK:
        _CONTEXTS.clear()
        _SESSIONS.clear()


# --- TLS session resumption

_SessionKey = tuple[TLSPolicy, str, int]  # the policy, the host name checked, the server's port
RESUMPTION_PAUSE = 1000
"""Connections to a server that has never resumed a session (two offered in a row, both declined) before a session
is taken from it again: taking one costs about 0.4 ms of CPU (Python copies it, certificate included), a third of an
empty poll, and Dovecot's default login processes never resume."""


@dataclass
class _Kept:
    """What is known of resuming TLS sessions with one server, for one policy."""

    context: ssl.SSLContext
    session: ssl.SSLSession | None = None  # offered to the next connections while the server resumes it
    resumed: int = 0  # connections the server resumed
    declined: int = 0  # sessions offered in a row that the server did not resume
    pause: int = 0  # connections left before a session is taken again


_SESSIONS: dict[_SessionKey, _Kept] = {}  # one per server and policy: bounded by the config


def _session_for(key: _SessionKey | None, context: ssl.SSLContext) -> ssl.SSLSession | None:
    """The session to offer: the one kept for this server, if the same context made it."""
    if key is None:
        return None
    with _CONTEXTS_LOCK:
        kept = _SESSIONS.get(key)
    return kept.session if kept is not None and kept.context is context else None


def _forget_session(key: _SessionKey | None) -> None:
    if key is not None:
        with _CONTEXTS_LOCK:
            _SESSIONS.pop(key, None)


@functools.cache
def _session_keeping_socket() -> type[ssl.SSLSocket]:
    """The socket class of postbote's contexts: one that passed the checks may keep its session when it is closed.

    Taken at close, not after the handshake: with TLS 1.3 the server sends the session ticket after the handshake,
    and the client reads it with the first data (the greeting)."""
    import ssl

    class SessionKeepingSocket(ssl.SSLSocket):
        session_key: _SessionKey | None = None  # set by `TLSPolicy.wrap` once the certificate or pin is checked
        offered = False  # whether a kept session was offered in the handshake

        def close(self) -> None:
            key, self.session_key = self.session_key, None
            if key is not None:
                with contextlib.suppress(ValueError, OSError):
                    _connection_closed(key, self)
            super().close()

    return SessionKeepingSocket


def _connection_closed(key: _SessionKey, sock: ssl.SSLSocket) -> None:
    """Keep what this connection teaches about resuming with its server, and its session when worth taking: not
    after a resumed handshake (the kept session goes on working), nor while the server is known not to resume."""
    offered = bool(getattr(sock, "offered", False))
    resumed = bool(sock.session_reused)
    with _CONTEXTS_LOCK:
        if _CONTEXTS.get(key[0]) is not sock.context:
            return  # a context a reload has dropped since
        kept = _SESSIONS.get(key)
        if kept is None or kept.context is not sock.context:
            kept = _SESSIONS[key] = _Kept(sock.context)
        if resumed:
            kept.resumed += 1
            kept.declined = 0
            return
        if offered:
            kept.session = None
            kept.declined += 1
        if kept.pause:
            kept.pause -= 1
            return
        if kept.declined >= 2 and not kept.resumed:
            kept.declined, kept.pause = 0, RESUMPTION_PAUSE
            return
    session = sock.session  # the costly part, outside the lock
    with _CONTEXTS_LOCK:
        if _SESSIONS.get(key) is kept and session is not None:
            kept.session = session


_STDLIB_LOGGER = logging.getLogger("postbote.tls")


def _debugging() -> bool:
    """Whether ``tls.connected`` would be logged: asked first, because most polls log at info and this is on every
    connection's path."""
    return _STDLIB_LOGGER.isEnabledFor(logging.DEBUG)


# OpenSSL's reasons when the other end answered a TLS ClientHello in plain text.
PLAIN_PORT_REASONS = frozenset({"WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "RECORD_LAYER_FAILURE",
                                "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST"})
PLAIN_PORT_HINT = (": this port speaks plain text, not TLS from the first byte; use tls: starttls on it, or the "
                   "implicit-TLS port (POP3 995, IMAP 993, SMTP submission 465)")


def _peer(sock: socket.socket) -> tuple[str, int] | None:
    try:
        peer = sock.getpeername()
    except OSError:
        return None
    return (peer[0], peer[1])


@dataclass(frozen=True)
class StartTLS:
    """How a protocol asks for TLS on its plain-text port, for reading a refused certificate again: the start of
    the server's greeting line, the command that asks for TLS, and the start of the answer line that grants it
    (POP3: ``+OK``, ``STLS``, ``+OK``; IMAP: ``* OK``, ``P STARTTLS``, ``P OK``)."""

    greeting: bytes
    command: bytes
    granted: bytes


@dataclass(frozen=True)
class _Probe:
    """A second connection to the server that presented a refused certificate, up to its TLS handshake."""

    address: tuple[str, int]
    starttls: StartTLS | None = None

    def open(self, timeout: float) -> socket.socket:
        """The connection, ready for the handshake; the STARTTLS exchange takes ``timeout`` in all, however slowly
        the server sends."""
        import socket
        import time

        deadline = time.monotonic() + timeout
        raw = socket.create_connection(self.address, timeout=timeout)
        try:
            if self.starttls is not None:
                self._expect(raw, self.starttls.greeting, deadline)
                raw.sendall(self.starttls.command + b"\r\n")
                self._expect(raw, self.starttls.granted, deadline)
        except BaseException:
            raw.close()
            raise
        raw.settimeout(max(0.1, deadline - time.monotonic()))  # the handshake gets what is left
        return raw

    @staticmethod
    def _expect(raw: socket.socket, start: bytes, deadline: float) -> None:
        """Read one line, byte by byte (nothing of the handshake after it may be taken), up to `MAX_PROBE_LINE`,
        before ``deadline``; OSError unless it starts with ``start``."""
        import time

        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or len(line) >= MAX_PROBE_LINE:
                raise OSError("the server did not answer as before")
            raw.settimeout(left)
            byte = raw.recv(1)
            if not byte:
                raise OSError("the server closed the connection")
            line += byte
        if not line.startswith(start):
            raise OSError(f"the server answered {line[:40]!r}")


MAX_PROBE_LINE = 1024


def _presented_certificate(probe: _Probe, timeout: float | None) -> bytes | None:
    """The certificate (DER) the server presents on the probe's connection, from a handshake that verifies nothing
    and is closed at once (no data is sent on it); None when that fails."""
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with probe.open(timeout or 10) as raw, context.wrap_socket(raw) as wrapped:
            der = wrapped.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError):
        return None
    return der or None


MAX_DESCRIBED_CERTIFICATE = 64 << 10  # bytes of DER: a server certificate is 1-3 KiB; a larger one is not parsed
MAX_SHOWN_NAMES = 10


def _subject_and_names(der: bytes) -> tuple[str, tuple[str, ...]]:
    """The subject (``CN=mail.example.org, O=...``) and the DNS names and IP addresses of a certificate that was
    not verified, parsed by the ssl module's own decoder (the one behind ``getpeercert()``, which shows nothing of
    an unverified certificate) from a private temporary file. Only for error messages: ("", ()) when the
    certificate is too large or cannot be parsed, and at most ``MAX_SHOWN_NAMES`` names (then "...")."""
    import os
    import ssl
    import tempfile

    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None or len(der) > MAX_DESCRIBED_CERTIFICATE:
        return "", ()
    try:
        with tempfile.TemporaryDirectory(prefix="postbote-cert-") as directory:
            path = os.path.join(directory, "presented.pem")
            with open(path, "w", encoding="ascii") as handle:
                handle.write(ssl.DER_cert_to_PEM_cert(der))
            parsed: dict[str, Any] = dict(decode(path))
        pairs = [pair for rdn in parsed.get("subject", ()) for pair in rdn]
        subject = ", ".join(f"{_SHORT_NAMES.get(pair[0], pair[0])}={pair[1]}" for pair in pairs)
        names = [str(entry[1]) for entry in parsed.get("subjectAltName", ()) if entry[0] in ("DNS", "IP Address")]
    except Exception:  # noqa: BLE001 -- a certificate that cannot be described must not hide why it was refused
        return "", ()
    shown = tuple(names[:MAX_SHOWN_NAMES]) + (("...",) if len(names) > MAX_SHOWN_NAMES else ())
    return _printable(subject), tuple(_printable(name) for name in shown)


_SHORT_NAMES = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C",
                "localityName": "L", "stateOrProvinceName": "ST"}


def _printable(text: str) -> str:
    """A certificate's text as one line of printable characters, at most 200 of them (it is the server's word)."""
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in text)
    return cleaned if len(cleaned) <= 200 else cleaned[:197] + "..."


def _colons(digits: str) -> str:
    return ":".join(digits[i:i + 2] for i in range(0, len(digits), 2)).upper()
