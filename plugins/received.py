"""Adds the ``Received:`` trace field (RFC 5322 section 3.6.7) to every message, before any other filter sees it."""

from __future__ import annotations

import re
import socket
import time
from functools import cache, lru_cache

from postbote import Account, Message, hookimpl

_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.@-]+")


@cache
def local_hostname() -> str:
    """This host's name for ``Received: ... by`` and the SMTP greeting: the fully qualified name, or the plain
    host name where resolving it gives only ``localhost`` (a machine without a DNS name for itself)."""
    for name in (socket.getfqdn(), socket.gethostname()):
        if name and not _is_loopback_name(name):
            return name
    return "localhost"


def _is_loopback_name(name: str) -> bool:
    lowered = name.lower()
    return lowered == "localhost" or lowered.startswith("localhost.") or lowered.startswith("ip6-localhost")


@hookimpl(tryfirst=True)
def filter_message(message: Message, account: Account) -> None:
    uid = f"\n\tid {message.uid}" if _ATOM.fullmatch(message.uid) else ""
    source = account.source  # where the message came from, as its source says (POP3: the server; POP3 or POP3S)
    host = getattr(source, "host", None) or "localhost"
    protocol = getattr(source, "received_protocol", None) or account.protocol.upper()
    message.prepend_header(
        "Received",
        f"from {host} by {local_hostname()} with {protocol} (postbote, account {account.name}){uid};\n\t"
        f"{rfc5322_date()}",
    )


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def rfc5322_date(now: float | None = None) -> str:
    """``Sun, 29 Nov 2026 18:53:55 +0100`` in local time, independent of the locale."""
    return _date_of_second(int(time.time() if now is None else now))


@lru_cache(maxsize=4)
def _date_of_second(now: int) -> str:
    """Formatted once per second: a poll stamps hundreds of messages with the same date."""
    local = time.localtime(now)
    offset = local.tm_gmtoff // 60
    zone = f"{'+' if offset >= 0 else '-'}{abs(offset) // 60:02d}{abs(offset) % 60:02d}"
    return (f"{_DAYS[local.tm_wday]}, {local.tm_mday:02d} {_MONTHS[local.tm_mon - 1]} {local.tm_year} "
            f"{local.tm_hour:02d}:{local.tm_min:02d}:{local.tm_sec:02d} {zone}")
