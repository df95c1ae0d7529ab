"""postbote's testing kit: what tests, the demo and plugin authors use to run postbote against scripted servers.

``postbote.testing.pop3server`` is a small scriptable POP3 server (faults on demand: drops, stalls, stray lines,
floods). It lives here, not in the core, so that the core's public names hold no fault machinery.

``postbote.testing.poll_once`` polls one account of a config once, set up the way ``postbote poll`` sets it up (a
fresh plugin manager without installed plugins, the plugins under test added, the state store opened and closed).
It is imported on first use, so that the demo's use of the server loads no poller.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from postbote.testing.harness import poll_once

__all__ = ["poll_once"]


def __getattr__(name: str) -> Any:
    if name == "poll_once":
        from postbote.testing.harness import poll_once

        return poll_once
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
