"""postbote's testing kit: what tests, the demo and plugin authors use to run postbote without real mail servers.

``postbote.testing.pop3server`` is a small scriptable POP3 server (faults on demand: drops, stalls, stray lines,
floods). It lives here, not in the core, so that the core's public names hold no fault machinery.

``postbote.testing.FakeSource`` serves accounts with ``protocol: fake`` from a `FakeMailbox` in memory, behind the
same Mailbox seam as POP3: pipeline tests run without sockets or threads, with faults set on the mailbox.

``postbote.testing.poll_once`` polls one account of a config once, set up the way ``postbote poll`` sets it up (a
fresh plugin manager without installed plugins, the plugins under test added, the state store opened and closed).
Names are imported on first use, so that the demo's use of the server loads no poller.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from postbote.testing.harness import poll_once
    from postbote.testing.mailbox import FakeMailbox, FakeSource

__all__ = ["FakeMailbox", "FakeSource", "poll_once"]

_LAZY = {"poll_once": "postbote.testing.harness", "FakeMailbox": "postbote.testing.mailbox",
         "FakeSource": "postbote.testing.mailbox"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
