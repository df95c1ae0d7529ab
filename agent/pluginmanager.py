"""Building the plugin manager: built-ins first, then installed plugins (entry-point group ``postbote``), then the
config's ``plugin_paths``.

There is no module-level manager: each command builds its own, so tests and reloads never share plugin state.
Built-ins come in two tiers, as in pytest: *essential* ones (the trace header, the delivery targets) are always on;
*optional* ones (backup, rules, spamassassin, dedupe, metrics, notify) are on only where the config's ``plugins:`` names
them. An optional built-in is known by name from the start but imported only once the config enables it (or
``postbote plugins`` lists it), so a poll does not pay for plugins it does not use; it is then registered where it
would have been had it been loaded at once, so the order in which plugins are called does not depend on it. The
built-in delivery targets are loaded the same way, each once the config names one of its kinds
(`BUILTIN_DESTINATION_KINDS`): a poll into SMTP does not import the IMAP, Gmail, Maildir, mbox and MDA code.
Third-party and local plugins are on unless the config turns them off.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy
from postbote import hookspecs
from postbote.errors import ConfigError, DeliveryError, PluginError
from postbote.logconfig import get_logger

log = get_logger("postbote.plugins")

ENTRY_POINT_GROUP = "postbote"

# Registration order is call order reversed: among filters, later entries run first. spamassassin comes after
# rules so that its X-Spam-* fields exist when the rules run; dedupe is trylast, so it sees final recipients.
ESSENTIAL_PLUGINS = ("pop3", "imap", "received", "smtp", "imap_append", "gmail", "maildir", "mbox", "mda")
OPTIONAL_PLUGINS: tuple[str, ...] = ("backup", "rules", "dedupe", "spamassassin", "metrics", "notify")
BUILTIN_PLUGINS = (*ESSENTIAL_PLUGINS, *OPTIONAL_PLUGINS)
# The built-in delivery targets and the destination kinds each declares (its ``DESTINATION_KINDS``, which a test
# keeps equal to this): known before they are imported, so that only the ones a config uses are.
BUILTIN_DESTINATION_KINDS: dict[str, tuple[str, ...]] = {
    "smtp": ("smtp", "lmtp"), "imap_append": ("imap",), "gmail": ("gmail",), "maildir": ("maildir",),
    "mbox": ("mbox",), "mda": ("mda",)}


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
    """pluggy's manager plus where each plugin came from, for ``postbote plugins`` and per-account enabling.

    The poll calls hooks through `hooks_for` (pluggy calls the implementations, so its tracing and ``wrapper=True``
    implementations work on every hook).
    """

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.sources: dict[str, PluginSource] = {}
        self._not_loaded: set[str] = set()  # optional built-ins and delivery targets known by name, not imported yet
        self._subsets: dict[frozenset[str], AccountHooks] = {}
        self._declared: dict[str, frozenset[str]] = {}

    def register(self, plugin: object, name: str | None = None) -> str | None:
        self._forget_derived()  # what was cached was made for the plugins registered before
        return super().register(plugin, name)

    def unregister(self, plugin: object | None = None, name: str | None = None) -> Any:
        self._forget_derived()
        return super().unregister(plugin, name)

    def _forget_derived(self) -> None:
        self._subsets.clear()
        self._declared.clear()

    def declared(self, attribute: str) -> frozenset[str]:
        """What the registered plugins declare in ``attribute`` (``DESTINATION_KINDS``, ``SOURCE_PROTOCOLS``) together;
        asked for every account of a config, so kept until a plugin is registered or unregistered."""
        known = self._declared.get(attribute)
        if known is None:
            declared = {name for plugin in self.get_plugins() for name in getattr(plugin, attribute, ())}
            if attribute == "DESTINATION_KINDS":
                declared.update(kind for name in self._not_loaded for kind in BUILTIN_DESTINATION_KINDS.get(name, ()))
            known = self._declared[attribute] = frozenset(declared)
        return known

    def hooks_for(self, account: Any) -> AccountHooks:
        """The hooks as ``account`` sees them: without the plugins it turns off."""
        disabled = frozenset(getattr(account, "disabled_plugins", ()))
        hooks = self._subsets.get(disabled)
        if hooks is None:
            hooks = self._subsets[disabled] = AccountHooks(self, disabled)
        return hooks

    def add(self, plugin: object, source: PluginSource) -> None:
        if self.get_plugin(source.name) is not None or source.name in self.sources:
            known = self.sources.get(source.name)
            raise ConfigError(f"two plugins are called {source.name!r} ({known.where if known else 'registered'} and "
                              f"{source.where}); rename one")
        try:
            self.register(plugin, name=source.name)
        except pluggy.PluginValidationError as exc:
            raise ConfigError(f"plugin {source.name!r} ({source.where}): {exc}") from None
        self.sources[source.name] = source

    def add_builtin_later(self, name: str) -> None:
        """Know the built-in ``name`` without importing it; `load_builtin` does that when it is needed."""
        self.sources[name] = _builtin_source(name)
        self._not_loaded.add(name)

    def load_builtin(self, name: str) -> None:
        """Import and register a built-in not loaded yet (an optional one, or a delivery target), at the place it
        would have had if registered at once: pluggy calls plugins in the reverse order of registration, so those
        registered after that place are registered again after it. Meant for loading the config, before the
        ``configure`` hook is called."""
        if name not in self._not_loaded:
            return
        module = importlib.import_module(f"postbote.plugins.{name}")
        earlier = set(BUILTIN_PLUGINS[:BUILTIN_PLUGINS.index(name)])
        later = [(other, plugin) for other, plugin in self.list_name_plugin()
                 if plugin is not None and other not in earlier]
        for other, plugin in later:
            self.unregister(plugin, name=other)
        self.register(module, name=name)
        self._not_loaded.discard(name)
        for other, plugin in later:
            self.register(plugin, name=other)

    def load_enabled(self, name: str) -> None:
        """Some account enables plugin ``name``: a built-in not loaded yet is imported now -- unless it is a delivery
        target, imported once a destination of its kind is read (`load_destination_kind`)."""
        if name not in BUILTIN_DESTINATION_KINDS:
            self.load_builtin(name)

    def load_destination_kind(self, kind: str) -> None:
        """A destination of ``kind`` is about to be read: import the built-in delivery targets that declare it."""
        for name, kinds in BUILTIN_DESTINATION_KINDS.items():
            if kind in kinds:
                self.load_builtin(name)

    def load_all_builtins(self) -> None:
        for name in BUILTIN_PLUGINS:
            self.load_builtin(name)

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
                import difflib  # only for the error message

                known = sorted(n for n in dir(self.hook) if not n.startswith("_") and getattr(self.hook, n).has_spec())
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"hooks: {', '.join(known)}"
                raise ConfigError(f"plugin {impl.plugin_name!r} implements {name!r}, which is not a postbote hook "
                                  f"({hint})")

    def hooks_of(self, name: str) -> list[str]:
        """The hooks plugin ``name`` implements (an optional built-in not loaded yet is imported to find out)."""
        self.load_builtin(name)
        plugin = self.get_plugin(name)
        return sorted(caller.name for caller in self.get_hookcallers(plugin) or ()) if plugin is not None else []


class AccountHooks:
    """The hooks as one account sees them (pluggy's ``subset_hook_caller``, less the plugins the account turns off),
    with the two ways postbote calls them.

    `call` is for the hooks whose failure stays with one message or one account: an exception other than postbote's
    own errors becomes a `PluginError` naming the plugin that raised. `notify` is for the observer hooks: a failing
    observer is logged with its name and the observers after it are still called, so none can lose or block mail.
    """

    def __init__(self, pm: PluginManager, disabled: frozenset[str]) -> None:
        self._pm = pm
        self._disabled = disabled
        self._callers: dict[str, pluggy.HookCaller] = {}
        self._implemented: dict[str, pluggy.HookCaller | None] = {}  # None: no plugin of the account implements it

    def caller(self, name: str, skip: Iterable[object] = ()) -> pluggy.HookCaller:
        """Hook ``name`` for this account, less the plugins in ``skip`` too."""
        if skip := list(skip):
            return self._pm.subset_hook_caller(name, remove_plugins=[*self._disabled_plugins(), *skip])
        caller = self._callers.get(name)
        if caller is None:
            removed = self._disabled_plugins()  # optional built-ins never loaded have nothing to remove
            caller = self._pm.subset_hook_caller(name, remove_plugins=removed) if removed else getattr(self._pm.hook,
                                                                                                        name)
            self._callers[name] = caller
        return caller

    def implemented(self, name: str) -> bool:
        """Whether some plugin of this account implements hook ``name``; remembered until a plugin registers or
        unregisters (`PluginManager.hooks_for` then makes new `AccountHooks`)."""
        return self._implementing(name) is not None

    def _implementing(self, name: str) -> pluggy.HookCaller | None:
        """`caller` of hook ``name``, or None when no plugin of this account implements it: one lookup per call."""
        try:
            return self._implemented[name]
        except KeyError:
            caller = self.caller(name)
            found = self._implemented[name] = caller if caller.get_hookimpls() else None
            return found

    def _disabled_plugins(self) -> list[object]:
        return [plugin for name in self._disabled if (plugin := self._pm.get_plugin(name)) is not None]

    def call(self, name: str, *, passing: tuple[type[BaseException], ...] = (DeliveryError, PluginError),
             **kwargs: Any) -> Any:
        """Call hook ``name``; exceptions other than ``passing`` become a `PluginError` naming the plugin. None,
        without a call, when no plugin of this account implements it (most accounts have no backups, no observers)."""
        caller = self._implementing(name)
        if caller is None:
            return None
        try:
            return caller(**kwargs)
        except passing:
            raise
        except Exception as exc:
            raise PluginError(culprit(caller, exc), name, exc) from exc

    def notify(self, name: str, **kwargs: Any) -> None:
        """Call observer hook ``name``; each failing observer is logged and those after it are still called."""
        if self._implementing(name) is None:
            return
        done: list[object] = []
        while True:
            caller = self.caller(name, skip=done)
            try:
                caller(**kwargs)
                return
            except Exception as exc:  # noqa: BLE001 - an observer's failure is reported, never propagated
                plugin = culprit(caller, exc)
                log.error("plugin.failed", plugin=plugin, hook=name, error=str(exc))
                order = [impl for impl in reversed(caller.get_hookimpls()) if not (impl.wrapper or impl.hookwrapper)]
                names = [impl.plugin_name for impl in order]
                if plugin not in names:
                    return  # raised by a wrapper: nothing more can be called safely
                done += [impl.plugin for impl in order[:names.index(plugin) + 1]]


def culprit(caller: pluggy.HookCaller, error: BaseException) -> str:
    """The plugin whose implementation raised ``error``: the outermost frame of its traceback that runs one of
    ``caller``'s implementations (pluggy calls them directly, so that frame is the one pluggy called)."""
    owners: dict[Any, str] = {}
    for impl in caller.get_hookimpls():
        function = getattr(impl.function, "__func__", impl.function)
        code = getattr(function, "__code__", None)
        if code is not None:
            owners[code] = impl.plugin_name
    traceback = error.__traceback__
    while traceback is not None:
        if traceback.tb_frame.f_code in owners:
            return owners[traceback.tb_frame.f_code]
        traceback = traceback.tb_next
    return "unknown"


def make_plugin_manager(*, builtins: bool = True, entry_points: bool = True,
                        extra: Iterable[object] = ()) -> PluginManager:
    """A manager with the hook specifications, the built-ins, installed plugins and the ``extra`` ones given."""
    pm = PluginManager()
    pm.add_hookspecs(hookspecs)
    if builtins:
        for name in ESSENTIAL_PLUGINS:
            if name in BUILTIN_DESTINATION_KINDS:
                pm.add_builtin_later(name)
            else:
                pm.add(importlib.import_module(f"postbote.plugins.{name}"), _builtin_source(name))
        for name in OPTIONAL_PLUGINS:
            pm.add_builtin_later(name)
    if entry_points and may_have_entry_points():
        _load_entry_points(pm)
    for plugin in extra:
        name = getattr(plugin, "name", None) or getattr(plugin, "__name__", None) or type(plugin).__name__
        pm.add(plugin, PluginSource(str(name), "registered", repr(plugin)))
    pm.check_hook_names()
    return pm


def _builtin_source(name: str) -> PluginSource:
    return PluginSource(name, "built-in", f"postbote.plugins.{name}", essential=name in ESSENTIAL_PLUGINS,
                        optional=name in OPTIONAL_PLUGINS)


def may_have_entry_points(paths: Iterable[str] | None = None) -> bool:
    """Whether some installed distribution may declare a ``postbote`` entry point.

    A look into the metadata directories on ``sys.path`` for an ``entry_points.txt`` naming the group, so that
    importlib.metadata (25-30 ms at start-up) is imported only when there is a plugin to load. Whatever this
    cannot look into (a zip file on the path, a finder of distributions other than the standard one) is a maybe.
    """
    from importlib.machinery import PathFinder

    if any(hasattr(finder, "find_distributions") and finder is not PathFinder for finder in sys.meta_path):
        return True
    for entry in sys.path if paths is None else paths:
        if not isinstance(entry, str):
            return True
        try:
            with os.scandir(entry or ".") as children:
                names = [child.name for child in children]
        except NotADirectoryError:
            return True
        except OSError:
            continue
        if any(_declares_group(entry, name) for name in names):
            return True
    return False


def _declares_group(entry: str, child: str) -> bool:
    """Whether ``child`` of the ``sys.path`` entry ``entry`` is a distribution's metadata naming the group, as
    importlib.metadata finds them: ``*.dist-info``, ``*.egg-info``, or the ``EGG-INFO`` of an ``*.egg``."""
    low = child.lower()
    if not (low.endswith((".dist-info", ".egg-info")) or (low == "egg-info" and entry.lower().endswith(".egg"))):
        return False
    try:
        with open(os.path.join(entry, child, "entry_points.txt"), "rb") as handle:
            return f"[{ENTRY_POINT_GROUP}]".encode() in handle.read()
    except OSError:
        return False


def _load_entry_points(pm: PluginManager) -> None:
    """Load each installed plugin on its own, so a broken one is named instead of aborting the others' loading."""
    from importlib.metadata import entry_points

    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.name in pm.sources or pm.get_plugin(entry_point.name) is not None \
                or pm.is_blocked(entry_point.name):
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
    import importlib.util  # only for plugin_paths

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
