"""What a destination answers when it is handed a message: the three kinds of ``deliver_message`` result.

- `Delivered`: the destination has the message for good now (an MTA's 250 to the data, an MDA's exit 0, an mbox
  appended and synced). ``answer`` says where it went.
- `Staged`: a file is written but not yet synced or visible (a Maildir's ``tmp/`` file). The poll makes it durable
  with the rest of its batch (one ``syncfs`` per filesystem), records the message and the rename in one transaction,
  then renames ``source`` to ``target``: after a crash the file is either in place and recorded, or not visible and
  not recorded. When the message has other destinations too, the poll syncs and renames it at once instead, since
  each destination's success is recorded on its own. If the message fails later, ``source`` is removed.
- `Pending`: the answer arrives later (a pipelined SMTP transaction): ``wait()`` returns the answer or raises
  `DeliveryError`. The poll calls it after fetching the next message, before handing that one on, and counts the
  message as delivered only if it returns. A destination that can tell afterwards whether a message it never
  answered arrived (the ``find_delivered`` hook: an IMAP folder searched by Message-ID) says ``confirmable=True``:
  then the poll hands on the next messages without waiting, up to `PENDING_WINDOW` answers at once, since a
  crash with several answers outstanding costs no copies -- the next poll finds those messages instead of
  delivering them again.

A plugin may also return a plain string (taken as `Delivered`) or an object with a ``result()`` method (taken as
`Pending`), as earlier versions allowed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from postbote.errors import DeliveryError, PluginError


@dataclass(frozen=True)
class Delivered:
    answer: str


@dataclass(frozen=True)
class Staged:
    answer: str
    source: str  # written, not yet synced
    target: str  # where it becomes visible


@dataclass(frozen=True)
class Pending:
    wait: Callable[[], str]
    confirmable: bool = False  # the destination's ``find_delivered`` can tell later whether this message arrived


DeliveryResult = Delivered | Staged | Pending


def as_result(answer: Any, plugin: str) -> DeliveryResult:
    """A plugin's return value as a `DeliveryResult` (see the module docstring for the shorthands)."""
    if isinstance(answer, Delivered | Staged | Pending):
        return answer
    if isinstance(answer, str):
        return Delivered(answer)
    if callable(getattr(answer, "result", None)):
        return Pending(lambda: str(answer.result()))
    raise PluginError(plugin, "deliver_message", TypeError(f"returned {answer!r}, expected Delivered, Staged, "
                                                           "Pending or a string"))


def wait_for(pending: Pending, plugin: str) -> Delivered:
    """The pending answer, once it arrives; an exception other than `DeliveryError` names the plugin."""
    try:
        return Delivered(str(pending.wait()))
    except DeliveryError:
        raise
    except Exception as exc:
        raise PluginError(plugin, "deliver_message", exc) from exc
