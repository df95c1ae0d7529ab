"""An SMTP server on loopback that records what it is sent and answers as scripted.

Built on aiosmtpd's threaded :class:`~aiosmtpd.controller.Controller`.  What
aiosmtpd hands the handler, with ``decode_data=False`` (checked against
aiosmtpd 1.4.6, ``SMTP.smtp_DATA``):

* ``envelope.original_content`` and ``envelope.content`` are the *same* bytes
  object: the DATA payload with the terminating ``.<CRLF>`` removed and the
  leading transparency dot of each line removed (RFC 5321 4.5.2).  Nothing
  else is touched: line endings stay CRLF exactly as sent, the CRLF before the
  final dot belongs to the payload, 8-bit bytes pass unchanged.
* Lines are limited to ``SMTP.line_length_limit`` (1001 octets, RFC 5321
  4.5.3.1.6); a longer line makes aiosmtpd answer ``500 Line too long`` after
  the data.  The sink raises that limit (``line_length_limit``, default 1 MiB)
  so it can take the tests' long-line messages -- as real MTAs like Postfix do.

asyncio enables ``TCP_NODELAY`` on every TCP transport, so replies are not
held back by Nagle's algorithm; the sink sets it once more explicitly.

aiosmtpd logs every DATA line at DEBUG level to the ``mail.log`` logger.  When
code under test sets the root logger to DEBUG in the test process, that alone
makes a 5 MB message take seconds, so the sink caps ``mail.log`` at WARNING
(its INFO lines -- connections opened and lost -- are noise in tests, too).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections import deque
from types import TracebackType
from typing import Any, NamedTuple

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.servers import LOOPBACK, free_port

ACCEPT_REPLY = "250 2.0.0 OK queued"
DEFAULT_LINE_LENGTH_LIMIT = 1 << 20
DEFAULT_DATA_SIZE_LIMIT = 64 << 20
AIOSMTPD_LOGGER = "mail.log"


class Delivery(NamedTuple):
    """A transaction the sink accepted (answered 250 at the end of DATA)."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes


class Attempt(NamedTuple):
    """Any transaction that reached the end of DATA, with the sink's answer."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    reply: str
    mail_options: list[str]
    tls: bool

    @property
    def accepted(self) -> bool:
        return self.reply.startswith("2")


class _SinkSMTP(SMTP):
    """aiosmtpd's SMTP protocol with a configurable line length limit."""

    def __init__(self, *args: Any, line_length_limit: int, **kwargs: Any) -> None:
        # The StreamReader's buffer limit is taken from this in SMTP.__init__.
        self.line_length_limit = line_length_limit
        super().__init__(*args, **kwargs)

    def connection_made(self, transport: Any) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)


class _SinkController(Controller):
    def __init__(self, handler: _Handler, *, line_length_limit: int, **kwargs: Any) -> None:
        self._line_length_limit = line_length_limit
        super().__init__(handler, **kwargs)

    def factory(self) -> SMTP:
        return _SinkSMTP(self.handler, line_length_limit=self._line_length_limit, **self.SMTP_kwargs)


class _Handler:
    """aiosmtpd handler hooks; all state lives in the :class:`SMTPSink`."""

    def __init__(self, sink: SMTPSink) -> None:
        self._sink = sink

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        refusal = self._sink._rcpt_refusal(address)
        if refusal is not None:
            return refusal
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content
        assert isinstance(data, bytes)
        return self._sink._end_of_data(
            mail_from=envelope.mail_from or "",
            rcpt_tos=list(envelope.rcpt_tos),
            data=data,
            mail_options=list(envelope.mail_options),
            tls=session.ssl is not None,
        )


class SMTPSink:
    """A recording SMTP server on 127.0.0.1.

    By default every transaction is accepted.  Scripted answers:

    * :meth:`respond_with` -- the reply at the end of DATA, for all following
      messages or only the next *count*;
    * :meth:`reject_rcpt` -- refuse one recipient address;
    * :meth:`reset` -- back to accepting everything (records are kept);
      :meth:`clear` -- forget the records.

    Records: :attr:`messages` (accepted :class:`Delivery` tuples) and
    :attr:`attempts` (every :class:`Attempt` that reached the end of DATA,
    whatever the answer) and :attr:`refused_rcpts`.  All access is
    thread-safe; the server runs in its own thread.
    """

    host = LOOPBACK

    def __init__(
        self,
        *,
        tls_context: ssl.SSLContext | None = None,
        require_starttls: bool = False,
        line_length_limit: int = DEFAULT_LINE_LENGTH_LIMIT,
        data_size_limit: int = DEFAULT_DATA_SIZE_LIMIT,
        hostname: str = "sink.test",
        smtputf8: bool = True,
    ) -> None:
        """*tls_context* (a server context) makes the sink offer STARTTLS;
        *require_starttls* makes it refuse mail before STARTTLS; ``smtputf8=False`` makes it an MTA without
        SMTPUTF8 (it then takes only ASCII commands)."""
        self.port = free_port()
        self.starttls = tls_context is not None
        self._lock = threading.Condition()
        self._attempts: list[Attempt] = []
        self._refused_rcpts: list[tuple[str, str]] = []
        self._default_reply: str | None = None
        self._queued_replies: deque[str] = deque()
        self._rcpt_refusals: dict[str, str] = {}
        self._controller = _SinkController(
            _Handler(self),
            line_length_limit=line_length_limit,
            hostname=self.host,
            port=self.port,
            # Without this aiosmtpd calls socket.getfqdn(), which can hang on DNS.
            server_hostname=hostname,
            decode_data=False,
            enable_SMTPUTF8=smtputf8,
            data_size_limit=data_size_limit,
            tls_context=tls_context,
            require_starttls=require_starttls,
            ready_timeout=10.0,
        )

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        logger = logging.getLogger(AIOSMTPD_LOGGER)
        if logger.level == logging.NOTSET:  # else someone chose a level on purpose
            logger.setLevel(logging.WARNING)
        self._controller.start()

    def stop(self) -> None:
        self._controller.stop(no_assert=True)

    def __enter__(self) -> SMTPSink:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- scripting ---------------------------------------------------------

    def respond_with(self, reply: str, count: int | None = None) -> None:
        """Answer the end of DATA with *reply* (e.g. ``"451 4.3.0 try later"``).

        With *count*, only the next *count* messages get it (queued before any
        earlier ``count`` replies are used up); without, every message does
        until :meth:`reset`.
        """
        _check_reply(reply)
        with self._lock:
            if count is None:
                self._default_reply = reply
            else:
                self._queued_replies.extend([reply] * count)

    def reject_rcpt(self, address: str, reply: str = "550 5.1.1 no such user") -> None:
        """Refuse the recipient *address* (compared case-insensitively)."""
        _check_reply(reply)
        with self._lock:
            self._rcpt_refusals[address.lower()] = reply

    def reset(self) -> None:
        """Accept everything again.  Recorded transactions are kept."""
        with self._lock:
            self._default_reply = None
            self._queued_replies.clear()
            self._rcpt_refusals.clear()

    def clear(self) -> None:
        """Forget all recorded transactions."""
        with self._lock:
            self._attempts.clear()
            self._refused_rcpts.clear()

    # -- records -----------------------------------------------------------

    @property
    def messages(self) -> list[Delivery]:
        """Accepted transactions, oldest first (a copy)."""
        with self._lock:
            return [Delivery(a.mail_from, list(a.rcpt_tos), a.data) for a in self._attempts if a.accepted]

    @property
    def attempts(self) -> list[Attempt]:
        """Every transaction that reached the end of DATA, oldest first (a copy)."""
        with self._lock:
            return list(self._attempts)

    @property
    def refused_rcpts(self) -> list[tuple[str, str]]:
        """``(address, reply)`` for every RCPT TO the sink refused."""
        with self._lock:
            return list(self._refused_rcpts)

    def wait_for_messages(self, count: int, timeout: float = 10.0) -> list[Delivery]:
        """Wait until at least *count* messages were accepted; return them all."""
        with self._lock:
            if not self._lock.wait_for(lambda: self._accepted_count() >= count, timeout):
                raise AssertionError(f"expected {count} messages within {timeout}s, got {self._accepted_count()}")
        return self.messages

    def _accepted_count(self) -> int:
        return sum(1 for a in self._attempts if a.accepted)

    # -- called from the server thread -------------------------------------

    def _rcpt_refusal(self, address: str) -> str | None:
        with self._lock:
            reply = self._rcpt_refusals.get(address.lower())
            if reply is not None:
                self._refused_rcpts.append((address, reply))
            return reply

    def _end_of_data(
        self, *, mail_from: str, rcpt_tos: list[str], data: bytes, mail_options: list[str], tls: bool
    ) -> str:
        with self._lock:
            reply = self._queued_replies.popleft() if self._queued_replies else self._default_reply or ACCEPT_REPLY
            self._attempts.append(Attempt(mail_from, rcpt_tos, data, reply, mail_options, tls))
            self._lock.notify_all()
            return reply


def _check_reply(reply: str) -> None:
    """Catch typos in scripted replies early: ``NNN text`` with NNN in 2xx-5xx."""
    code = reply[:3]
    if not (len(reply) >= 3 and code.isdigit() and code[0] in "2345" and reply[3:4] in ("", " ")):
        raise ValueError(f"not an SMTP reply: {reply!r}")

