"""A threading HTTP server for the test stand-ins of HTTPS services (the Gmail API, an OAuth provider, a webhook).

Each connection's TLS handshake happens in that connection's own thread, bounded by `HANDSHAKE_TIMEOUT`. Wrapping
the listening socket instead (the obvious way) makes the accepting thread do every handshake: one client that
connects and says nothing (a killed poll, a probe) then holds up every later connection, and ``shutdown()`` with
them. And the listening socket does not block: a connection that vanished between the serving thread's select and
its accept left it blocked in accept, and ``shutdown()`` waiting for ever -- the model test's hang in CI (the Gmail
stand-in's ``stop``, caught by py-spy).
"""

from __future__ import annotations

import socket
import ssl
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HANDSHAKE_TIMEOUT = 10.0


class StandInHTTPServer(ThreadingHTTPServer):
    """HTTP, or HTTPS with ``context``, on ``address`` (port 0: a free one); a connection the client breaks (a fault
    a test plays, a killed process) is the client's business and prints no traceback."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 context: ssl.SSLContext | None = None) -> None:
        super().__init__(address, handler)
        self.context = context
        self.host = address[0]
        # A connection that is gone between the select and the accept (a killed poll's, say) must not leave the
        # serving thread blocked in accept, and shutdown() waiting for it for ever: accept fails at once instead.
        self.socket.setblocking(False)

    @property
    def scheme(self) -> str:
        return "https" if self.context is not None else "http"

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.server_address[1]}"

    def finish_request(self, request: Any, client_address: Any) -> None:
        raw: socket.socket = request
        if self.context is None:
            raw.settimeout(None)
            super().finish_request(raw, client_address)
            return
        raw.settimeout(HANDSHAKE_TIMEOUT)
        wrapped = self.context.wrap_socket(raw, server_side=True)  # takes over the descriptor
        try:
            wrapped.settimeout(None)
            super().finish_request(wrapped, client_address)
        finally:
            wrapped.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)
