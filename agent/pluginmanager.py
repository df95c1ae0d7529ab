"""Building the plugin manager: built-ins first, then installed plugins (entry-point group ``postbote``), then the
config's ``plugin_paths``.

There is no module-level manager: each command builds its own, so tests and reloads never share plugin state.
Built-ins come in two tiers, as in pytest: *essential* ones (the trace header, the delivery targets) are always on;
*optional* ones (backup, rules, spamassassin, dedupe) are on only where the config's ``plugins:`` names them.
Third-party and local plugins are on unless the config turns them off.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pluggy

from agent import hookspecs
from agent.errors import ConfigError

ENTRY_POINT_GROUP = "postbote"

# Registration order is call order reversed: among filters, later entries run first. spamassassin comes after
# rules so that its X-Spam-* fields exist when the rules run; dedupe is trylast, so it sees final recipients.
ESSENTIAL_PLUGINS = ("received", "smtp", "maildir", "mbox", "mda")
OPTIONAL_PLUGINS: tuple[str, ...] = ("backup", "rules", "dedupe", "spamassassin", "metrics")


@dataclass(frozen=True)
class PluginSource:
    name: str
    origin: str  # "built-in", "entry point", "plugin_paths", "registered"
    where: str
    essential: bool = False
    optional: bool = False

    @property
    def on_by_default(self) -> bool:
        return not self.optional


class PluginManager(pluggy.PluginManager):
    """pluggy's manager plus where each plugin came from, for ``postbote plugins`` and per-account enabling."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.sources: dict[str, PluginSource] = {}

    def add(self, plugin: object, source: PluginSource) -> None:
        if self.get_plugin(source.name) is not None:
            raise ConfigError(f"two plugins are called {source.name!r} ({self.sources[source.name].where} and "
                              f"{source.where}); rename one")
        try:
            self.register(plugin, name=source.name)
        except pluggy.PluginValidationError as exc:
            raise ConfigError(f"plugin {source.name!r} ({source.where}): {exc}") from None
        self.sources[source.name] = source

    def load_paths(self, paths: Iterable[Path]) -> None:
        """Import and register every ``.py`` file given, or found directly inside a directory given."""
        for path in paths:
            files = sorted(path.glob("*.py")) if path.is_dir() else [path]
            if not path.exists():
                raise ConfigError(f"plugin_paths: {path} does not exist")
            for file in files:
                self.add(_import_file(file), PluginSource(file.stem, "plugin_paths", str(file)))
        self.check_hook_names()

    def check_hook_names(self) -> None:
        """A function marked ``@hookimpl`` with a name that is not a hook is an error, not a silent no-op."""
        for name in dir(self.hook):
            caller = getattr(self.hook, name)
            if name.startswith("_") or caller.has_spec():
                continue
            for impl in caller.get_hookimpls():
                if impl.optionalhook:
                    continue
                known = sorted(n for n in dir(self.hook) if not n.startswith("_") and getattr(self.hook, n).has_spec())
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"hooks: {', '.join(known)}"
                raise ConfigError(f"plugin {impl.plugin_name!r} implements {name!r}, which is not a postbote hook "
                                  f"({hint})")

    def hooks_of(self, name: str) -> list[str]:
        plugin = self.get_plugin(name)
        return sorted(caller.name for caller in self.get_hookcallers(plugin) or ()) if plugin is not None else []


def make_plugin_manager(*, builtins: bool = True, entry_points: bool = True,
                        extra: Iterable[object] = ()) -> PluginManager:
    """A manager with the hook specifications, the built-ins, installed plugins and the ``extra`` ones given."""
    pm = PluginManager()
    pm.add_hookspecs(hookspecs)
    if builtins:
        for name in (*ESSENTIAL_PLUGINS, *OPTIONAL_PLUGINS):
            module = importlib.import_module(f"plugins.{name}")
            pm.add(module, PluginSource(name, "built-in", f"plugins.{name}", essential=name in ESSENTIAL_PLUGINS,
                                        optional=name in OPTIONAL_PLUGINS))
    if entry_points:
        _load_entry_points(pm)
    for plugin in extra:
        name = getattr(plugin, "name", None) or getattr(plugin, "__name__", None) or type(plugin).__name__
        pm.add(plugin, PluginSource(str(name), "registered", repr(plugin)))
    pm.check_hook_names()
    return pm


def _load_entry_points(pm: PluginManager) -> None:
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
        dist = getattr(entry_point, "dist", None)
        where = f"{dist.name} {dist.version}" if dist is not None else entry_point.value
        pm.add(plugin, PluginSource(entry_point.name, "entry point", where))


def _import_file(file: Path) -> ModuleType:
    module_name = f"postbote_local_plugins.{file.stem}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise ConfigError(f"plugin_paths: {file} is not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - a broken local plugin is a start-up error naming the file
        del sys.modules[module_name]
        raise ConfigError(f"plugin_paths: {file} failed to load: {type(exc).__name__}: {exc}") from None
    return module
