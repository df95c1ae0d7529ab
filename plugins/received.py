"""Adds the ``Received:`` trace field (RFC 5322 section 3.6.7) to every message, before any other filter sees it."""

from __future__ import annotations

import email.utils
import re
import socket
from functools import cache

from agent import Message, hookimpl
from agent.config import Account

_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.@-]+")


@cache
def local_hostname() -> str:
    return socket.getfqdn() or "localhost"


@hookimpl(tryfirst=True)
def filter_message(message: Message, account: Account) -> None:
    uid = f"\n\tid {message.uid}" if _ATOM.fullmatch(message.uid) else ""
    message.prepend_header(
        "Received",
        f"from {account.host} by {local_hostname()} with POP3{'S' if account.tls != 'none' else ''}"
        f" (postbote, account {account.name}){uid};\n\t{email.utils.formatdate(localtime=True)}",
    )
