"""TLS policy: certificates and host names verified by default, TLS 1.2 at least, optional SHA-256 pinning.

One place decides how postbote trusts a server, for POP3 (implicit TLS and STLS) and for STARTTLS to the MTA.
A pinned ``tls_fingerprint`` replaces CA verification for self-signed servers, as fetchmail's ``sslfingerprint``
does, but with SHA-256 and compared in constant time.

``ssl`` is imported when a connection is wrapped, not when the config is read. Building a context loads the CA
store (16-20 ms of CPU); it is built once per policy and shared by every connection that uses that policy, until
`forget_contexts` (a config reload) -- so a CA file replaced on disk is read again at the next reload.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from postbote.errors import AccountError

if TYPE_CHECKING:
    import socket
    import ssl


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

        context = ssl.create_default_context(cafile=self.ca_file)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if not self.verify or self.fingerprint:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def wrap(self, sock: socket.socket, host: str, where: str) -> ssl.SSLSocket:
        """Handshake on ``sock`` (closed on failure) and check the pin; errors name the server and the reason."""
        import ssl

        try:
            wrapped = self.context().wrap_socket(sock, server_hostname=host)
        except ssl.SSLCertVerificationError as exc:
            sock.close()
            raise TLSError(f"TLS certificate of {where} not trusted: {exc.verify_message or exc.reason}"
                           " (set tls_ca_file for a private CA, or tls_fingerprint for a self-signed server)") from None
        except TimeoutError:
            sock.close()
            raise TLSError(f"TLS handshake with {where} timed out") from None
        except (ssl.SSLError, OSError) as exc:
            sock.close()
            reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
            raise TLSError(f"TLS handshake with {where} failed: {reason}") from None
        if self.fingerprint:
            self._check_pin(wrapped, where)
        return wrapped

    def _check_pin(self, wrapped: ssl.SSLSocket, where: str) -> None:
        import hashlib
        import hmac

        certificate = wrapped.getpeercert(binary_form=True) or b""
        actual = hashlib.sha256(certificate).hexdigest()
        if not hmac.compare_digest(actual, self.fingerprint or ""):
            wrapped.close()
            raise TLSError(f"TLS certificate of {where} does not match tls_fingerprint "
                           f"(server presented SHA-256 {_colons(actual)})")


_CONTEXTS: dict[TLSPolicy, ssl.SSLContext] = {}
_CONTEXTS_LOCK = threading.Lock()


def forget_contexts() -> None:
    """Build every context anew on next use: the CA files and the system's CA store are read again."""
    with _CONTEXTS_LOCK:
        _CONTEXTS.clear()


def _colons(digits: str) -> str:
    return ":".join(digits[i:i + 2] for i in range(0, len(digits), 2)).upper()
