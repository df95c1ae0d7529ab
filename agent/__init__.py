"""postbote: fetch mail from POP3 mailboxes and redeliver it without ever losing a message."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from postbote.errors import DeliveryError
    from postbote.hookspecs import hookimpl
    from postbote.message import Message, Verdict

__version__ = "0.1.0"
__all__ = ["DeliveryError", "Message", "Verdict", "__version__", "hookimpl"]

# The plugin API is imported on first use (PEP 562), so that ``python -m postbote --help`` loads neither pluggy nor
# the message spooling.
_LAZY = {"DeliveryError": "postbote.errors", "hookimpl": "postbote.hookspecs", "Message": "postbote.message",
         "Verdict": "postbote.message"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
