"""Deferring the import of a module nobody in the command's process may use: asyncio.

structlog's standard-library module imports asyncio at its top, for its ``a…`` log methods (``ainfo``), which
postbote never calls; importing asyncio is about 20 ms, a sixth of the start-up of a ``postbote poll`` that a timer
runs every few minutes. The command puts a stand-in into ``sys.modules`` before anything imports structlog:
``import asyncio`` binds the stand-in, and the first attribute taken from it imports the real asyncio, which takes
the stand-in's place. (importlib's ``LazyLoader`` does not help here: on Python 3.11 the ``import`` statement itself
looks into the module and loads it.)

Only the command's own process does this (`postbote.cli.run_command`, ``python -m postbote``): a program that
imports postbote as a library keeps its imports as they are.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types
from typing import Any

DEFERRED_MODULES = ("asyncio",)


class _StandIn(types.ModuleType):
    """Takes a module's place in ``sys.modules`` until something takes an attribute from it."""

    def __getattr__(self, attribute: str) -> Any:
        return getattr(_imported(self), attribute)


def _imported(stand_in: _StandIn) -> types.ModuleType:
    """The real module, imported now (once: later imports find it in ``sys.modules``)."""
    name = stand_in.__name__
    if sys.modules.get(name) is stand_in:
        del sys.modules[name]
    return importlib.import_module(name)


def defer_unused_imports() -> None:
    """Put a stand-in in place of each module of `DEFERRED_MODULES` that is not imported yet."""
    for name in DEFERRED_MODULES:
        if name not in sys.modules:
            stand_in = _StandIn(name)
            stand_in.__spec__ = importlib.machinery.ModuleSpec(name, None)  # what ``import`` looks at, not loaded
            sys.modules[name] = stand_in


def is_deferred(name: str) -> bool:
    """Whether ``name`` is still a stand-in (nothing has used it)."""
    return isinstance(sys.modules.get(name), _StandIn)
