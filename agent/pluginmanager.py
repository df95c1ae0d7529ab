"""Building the plugin manager: built-ins first, then third-party plugins from the ``postbote`` entry-point group.

There is no module-level manager: each command builds its own, so tests and reloads never share plugin state.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable

import pluggy

from agent import hookspecs
from agent.errors import ConfigError

ENTRY_POINT_GROUP = "postbote"

BUILTIN_PLUGINS = (
    "plugins.received",
    "plugins.smtp",
    "plugins.maildir",
)


def make_plugin_manager(*, builtins: Iterable[str] = BUILTIN_PLUGINS, entry_points: bool = True,
                        extra: Iterable[object] = ()) -> pluggy.PluginManager:
    """A manager with the hook specifications, the built-in plugins, installed plugins and ``extra`` ones."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for dotted in builtins:
        pm.register(importlib.import_module(dotted), name=dotted)
    if entry_points:
        _load_entry_points(pm)
    for plugin in extra:
        pm.register(plugin)
    _check_hook_names(pm)
    return pm


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    """Load each installed plugin on its own, so a broken one is named instead of aborting the others' loading."""
    from importlib.metadata import entry_points

    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        if pm.get_plugin(entry_point.name) is not None or pm.is_blocked(entry_point.name):
            continue
        try:
            plugin = entry_point.load()
        except Exception as exc:  # noqa: BLE001 - any import error of a third-party plugin is a start-up error
            raise ConfigError(f"plugin {entry_point.name!r} ({entry_point.value}) failed to load: "
                              f"{type(exc).__name__}: {exc}") from None
        pm.register(plugin, name=entry_point.name)


def _check_hook_names(pm: pluggy.PluginManager) -> None:
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise ConfigError(f"plugin {exc.plugin!r}: {exc} (see agent/hookspecs.py for the hook names)") from None
