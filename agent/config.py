"""postbote's YAML configuration: read, validated and turned into typed objects before anything connects.

Every mistake is reported as ``FILE:LINE: key.path: what was expected``, all of them in one go; unknown keys are
errors with a "did you mean". postbote reads an account's general keys (name, protocol, deliver, keep, …); the
plugin of its mail source reads the source's own keys (the ``parse_source`` hook: POP3's server, TLS and login),
and delivery targets are validated by the plugins that deliver to them (the ``parse_destination`` hook), so a new
source or target brings its own options and their errors look the same.
"""

from __future__ import annotations

import functools
import gc
import os
import re
import stat
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from postbote import yaml_reader as s
from postbote.credentials import MASK, redact, register_secret
from postbote.errors import PSYCOPG_MISSING, ConfigError
from postbote.yaml_reader import Node, Problems, Section

if TYPE_CHECKING:
    import pluggy
    from postbote.pluginmanager import PluginManager

CONFIG_ENV = "POSTBOTE_CONFIG"
DEFAULT_STATE_DIR = "~/.local/state/postbote"
DEFAULT_PROTOCOL = "pop3"  # the mail source of an account that does not say (the built-in pop3 plugin)
DEFAULT_MAX_SIZE = 256 * 1024 * 1024  # larger messages stay on the server, reported as rejected (max_size: to change)
DEFAULT_STALE_AFTER = 3600.0  # mail waiting longer than this shows as stale in `postbote status`
_ACCOUNT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,99}")


def config_search_path() -> list[Path]:
    """Where the config is looked for when ``-c`` is not given, in order."""
    paths = [Path("postbote.yaml"), Path("~/.config/postbote/postbote.yaml").expanduser(),
             Path("/etc/postbote/postbote.yaml")]
    if env := os.environ.get(CONFIG_ENV):
        paths.insert(0, Path(env))
    return paths


def default_state_dir() -> Path:
    """systemd's ``$STATE_DIRECTORY`` (from ``StateDirectory=``) when set, so unit and config cannot disagree."""
    if systemd_dirs := os.environ.get("STATE_DIRECTORY"):
        return Path(systemd_dirs.split(":")[0])
    return Path(DEFAULT_STATE_DIR).expanduser()


def find_config(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    if env := os.environ.get(CONFIG_ENV):
        return Path(env)
    for candidate in config_search_path():
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(p) for p in config_search_path())
    raise ConfigError(f"no config file found (tried {tried}); give one with -c FILE")


@dataclass(frozen=True)
class LogSettings:
    level: str = "info"
    format: str = "auto"
    file: Path | None = None  # append here instead of stderr; opened again on SIGHUP (after logrotate moved it)


@dataclass(frozen=True)
class Destination:
    """One ``deliver:`` entry: ``kind`` names the plugin, ``settings`` is what that plugin parsed."""

    kind: str
    settings: Any
    label: str
    line: int
    # Set only when handing a message on: the recipients still to reach after an earlier attempt reached some
    # (an LMTP server that took the message for some recipients); None means all of them.
    recipients: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Account:
    name: str
    poll_interval: float
    timeout: float
    keep: bool
    fetch_all: bool
    max_size: int | None
    max_messages: int | None
    destinations: tuple[Destination, ...]
    poll_timeout: float | None = None  # the whole session's deadline; None: derived from timeout and the mail
    stale_after: float = DEFAULT_STALE_AFTER
    delete_after: float | None = None  # with keep: delete a delivered message this long after its delivery
    delete_oversized: bool = False  # delete a message over max_size once it was reported, instead of leaving it
    plugins: Mapping[str, Any] = field(default_factory=dict)
    disabled_plugins: frozenset[str] = frozenset()
    protocol: str = DEFAULT_PROTOCOL  # the source plugin that opens the mailbox (the ``open_mailbox`` hook)
    # What that plugin read from the account (the ``parse_source`` hook): for POP3 the server, TLS and login. It has
    # a ``server`` (``user@host:port``, shown by ``check`` and ``status``); it may have ``files`` (key -> (path, line,
    # key path): what ``check`` must be able to read), ``describe()`` (``check``'s text for the connection and the
    # login), ``holds_inline_password`` (then the config file must not be readable by others), and ``host`` and
    # ``received_protocol`` (the ``Received:`` trace field's ``from`` and ``with``).
    source: Any = None

    @functools.cached_property
    def server_host(self) -> str:
        """The server host the account's polls connect to (``max_parallel_per_host`` counts by it); its own name when
        its source names none."""
        return str(getattr(self.source, "host", None) or self.name)

    def uses(self, plugin: str) -> bool:
        """Whether ``plugin`` is enabled for this account (plugins registered after the config was read are)."""
        return plugin not in self.disabled_plugins

    def options_for(self, plugin: str) -> Any:
        """The options ``plugin`` parsed from the config for this account (None when it takes none)."""
        return self.plugins.get(plugin)


@dataclass(frozen=True)
class SharedState:
    """``state: postgresql://...`` (or a libpq conninfo, ``host=... dbname=...``): the records of every account
    live in a PostgreSQL database that several ``postbote run`` workers share (docs/scaling.md).

    ``conninfo`` holds the text as written, password included: it is only ever handed to the driver. ``shown`` is
    the same text with the password masked, for logs, errors and ``postbote status``; the password itself is
    registered with `redact` as every other secret is. Better still, leave the password out and let libpq read
    it from ``~/.pgpass`` (or ``PGPASSFILE``, or ``passfile=`` in the conninfo)."""

    conninfo: str = field(repr=False)
    shown: str

    def __str__(self) -> str:
        return self.shown


_URI_PASSWORD = re.compile(r"^(postgres(?:ql)?://[^:@/?#]*:)([^@/?#]*)(@)")
_CONNINFO_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)")
_QUERY_PASSWORD = re.compile(r"([?&]password=)([^&#]*)")


def shared_state(value: object) -> SharedState | None:
    """Parse ``state``: ``sqlite`` (the default, in ``state_dir``) or a PostgreSQL connection string."""
    import importlib.util

    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected sqlite, a postgresql:// URI or a libpq conninfo (host=... dbname=...)")
    text = value.strip()
    if text == "sqlite":
        return None
    if not (text.startswith(("postgresql://", "postgres://")) or "=" in text):
        raise ValueError("expected sqlite, a postgresql:// URI or a libpq conninfo (host=... dbname=...)")
    shown = text
    for pattern in (_URI_PASSWORD, _CONNINFO_PASSWORD, _QUERY_PASSWORD):
        for match in pattern.finditer(text):
            register_secret(match.group(2).strip("'"))
        shown = pattern.sub(lambda match: match.group(1) + MASK + (match.group(3) if match.re.groups > 2 else ""),
                            shown)
    if importlib.util.find_spec("psycopg") is None:
        raise ValueError(PSYCOPG_MISSING)
    return SharedState(text, shown)


@dataclass(frozen=True)
class Config:
    path: Path
    state_dir: Path
    log: LogSettings
    accounts: tuple[Account, ...]
    max_parallel: int = 4
    max_parallel_per_host: int = 8  # polls at once against one server host (providers limit connections per IP)
    backoff_max: float = 3600.0
    state_busy_timeout: float = 2.0
    state: SharedState | None = None  # None: SQLite in state_dir, the default
    worker_lease: float = 60.0  # with a shared state: how long a worker's claim on an account lasts unrenewed

    def account(self, name: str) -> Account:
        for account in self.accounts:
            if account.name == name:
                return account
        known = ", ".join(a.name for a in self.accounts)
        raise ConfigError(f"{self.path}: no account named {name!r} (accounts: {known})")

    def select(self, names: list[str] | tuple[str, ...]) -> tuple[Account, ...]:
        return tuple(self.account(name) for name in names) if names else self.accounts


TOP_KEYS = {"state_dir", "log", "defaults", "accounts", "accounts_dir", "plugins", "plugin_paths", "max_parallel",
            "max_parallel_per_host", "backoff_max", "state_busy_timeout", "state", "worker_lease"}
ACCOUNT_FILE_PATTERNS = ("*.yaml", "*.yml")


def load_config(path: Path, pm: PluginManager) -> Config:
    """Load and validate ``path``, registering its ``plugin_paths`` in ``pm``; `ConfigError` lists every problem."""
    with _no_cycle_collection():
        return _load_config(path, pm)


@contextmanager
def _no_cycle_collection() -> Iterator[None]:
    """Reading a config makes many objects that all stay alive, and no garbage in cycles: the cyclic collector's
    passes over the growing heap made reading 100,000 accounts quadratic (40,000: 20.6 s with it, 8.8 s without).
    Reference counting still frees whatever is dropped meanwhile.

    What was read is then frozen (`gc.freeze`): it lives as long as the config, and a full collection over its
    millions of objects cost a second right after reading, and again now and then while the daemon ran. An earlier
    config's objects are unfrozen first, so that what a reload drops can be collected."""
    enabled = gc.isenabled()
    gc.disable()
    gc.unfreeze()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def _load_config(path: Path, pm: PluginManager) -> Config:
    root = s.load_yaml(path)
    problems = Problems(str(path))
    top = Section(root, problems, what="a mapping with accounts")
    base_dir = path.resolve().parent
    plugin_paths = top.get("plugin_paths", lambda v: [s.path_relative_to(base_dir)(p) for p in s.text_list(v)], [])
    problems.raise_if_any()
    try:
        pm.load_paths(plugin_paths)
    except ConfigError as exc:
        node = top.raw("plugin_paths")
        raise ConfigError(f"{path}:{node.line if node else 0}: {exc}") from None
    global_plugins = GlobalPlugins(_plugin_entries(top.section("plugins"), pm, problems))
    state_dir = top.get("state_dir", s.path_relative_to(base_dir), default_state_dir())
    log = _log_settings(top.section("log"), base_dir)
    accounts_dir = top.get("accounts_dir", s.path_relative_to(base_dir), None)
    defaults = top.section("defaults")
    elsewhere = accounts_dir is not None or _plugins_supply_accounts(pm, global_plugins)
    accounts = _accounts(top, defaults, problems, pm, base_dir, global_plugins, required=not elsewhere)
    top.finish(TOP_KEYS)
    problems.raise_if_any()
    seen: dict[str, Path | str] = {a.name: path for a in accounts}
    if accounts_dir is not None:
        accounts += _accounts_from_dir(accounts_dir, defaults, pm, global_plugins, seen)
    accounts += _accounts_from_plugins(pm, defaults, base_dir, global_plugins, seen)
    config = Config(path=path, state_dir=state_dir, log=log, accounts=tuple(accounts),
                    max_parallel=top.get("max_parallel", s.integer(1, 1024), 4),
                    max_parallel_per_host=top.get("max_parallel_per_host", s.integer(1, 1024), 8),
                    backoff_max=top.get("backoff_max", s.duration, 3600.0),
                    state_busy_timeout=top.get("state_busy_timeout", s.duration, 2.0),
                    state=_shared_state(top), worker_lease=top.get("worker_lease", s.duration, 60.0))
    problems.raise_if_any()
    _refuse_exposed_inline_password(config)
    return config


def _shared_state(top: Section) -> SharedState | None:
    """``state``, with a mistake reported without the value (a connection string may hold a password)."""
    node = top.raw("state")
    if node is None or node.value is None:
        return None
    try:
        return shared_state(node.value)
    except ValueError as exc:
        top.problem(str(exc), node)
        return None


def _log_settings(section: Section | None, base_dir: Path) -> LogSettings:
    if section is None:
        return LogSettings()
    settings = LogSettings(level=section.get("level", s.choice("debug", "info", "warning", "error"), "info"),
                           format=section.get("format", s.choice("auto", "console", "json"), "auto"),
                           file=section.get("file", s.path_relative_to(base_dir), None))
    section.finish()
    return settings


def _accounts_from_dir(directory: Path, defaults: Section | None, pm: PluginManager,
                       global_plugins: GlobalPlugins, seen: dict[str, Path | str]) -> list[Account]:
    """The accounts of every ``*.yaml`` file in ``accounts_dir`` (a conf.d: one or many accounts a file, in name
    order), each file's mistakes reported with its own name and lines; ``defaults:`` and ``plugins:`` of the main
    file apply. A name used in two files is a mistake in the second."""
    if not directory.is_dir():
        raise ConfigError(f"accounts_dir: {directory} is not a directory")
    files = sorted({file for pattern in ACCOUNT_FILE_PATTERNS for file in directory.glob(pattern)})
    accounts: list[Account] = []
    lines: list[str] = []
    for file in files:
        problems = Problems(str(file))
        top = Section(s.load_yaml(file), problems, what="a mapping with accounts")
        found = _accounts(top, defaults, problems, pm, file.resolve().parent, global_plugins)
        top.finish({"accounts"})
        if any(getattr(settings, "holds_inline_password", False) for account in found
               for settings in _plugin_settings(account)) and exposes_a_secret(file.stat()):
            problems.add(0, "", "holds an inline password but is accessible by group or others; run: chmod 600 "
                                f"{file} (or use password_file)")
        accounts += _new_names(found, file, seen, problems)
        lines += _sorted_problems(problems)
    if lines:
        raise ConfigError(lines)
    return accounts


def _sorted_problems(problems: Problems) -> list[str]:
    try:
        problems.raise_if_any()
    except ConfigError as exc:
        return list(exc.problems)
    return []


def _new_names(found: list[Account], where: Path | str, seen: dict[str, Path | str],
               problems: Problems) -> list[Account]:
    """The accounts of ``found`` whose names no earlier file or plugin used; a name used again is a mistake here."""
    kept: list[Account] = []
    for account in found:
        if account.name in seen:
            problems.add(0, "", f"duplicate account name {account.name!r} (also in {seen[account.name]})")
        else:
            seen[account.name] = where
            kept.append(account)
    return kept


def _plugins_supply_accounts(pm: PluginManager, global_plugins: GlobalPlugins) -> bool:
    """Whether a plugin the top-level ``plugins:`` enables may supply accounts (then ``accounts:`` may be left out)."""
    return any(entry is not False for entry in global_plugins.entries.values()) and \
        bool(pm.hook.load_accounts.get_hookimpls())


def _accounts_from_plugins(pm: PluginManager, defaults: Section | None, base_dir: Path,
                           global_plugins: GlobalPlugins, seen: dict[str, Path | str]) -> list[Account]:
    """The accounts plugins supply (``load_accounts``: from SQL, LDAP, ...), each plugin enabled in the top-level
    ``plugins:`` asked once; checked as the config's own accounts are, mistakes named by the plugin's place and row."""
    accounts: list[Account] = []
    lines: list[str] = []
    for name, entry in global_plugins.entries.items():
        if entry is False:
            continue
        options = entry if isinstance(entry, Node) else Node({}, 0, f"plugins.{name}")
        try:
            supplied = pm.hook.load_accounts(name=name, options=options, base_dir=base_dir)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - a plugin's failure is a config error that names it
            raise ConfigError(redact(f"plugins.{name}: loading accounts failed: {type(exc).__name__}: {exc}")) from None
        for rows in supplied:
            problems = Problems(rows.where)
            root = Node({"accounts": Node([s.node_of(row, number, f"accounts[{index}]")
                                           for index, (number, row) in enumerate(rows.rows)], 0, "accounts")},
                        0, "")
            found = _accounts(Section(root, problems), defaults, problems, pm, base_dir, global_plugins,
                              required=False)
            accounts += _new_names(found, rows.where, seen, problems)
            lines += _sorted_problems(problems)
    if lines:
        raise ConfigError(lines)
    return accounts


def _accounts(top: Section, defaults: Section | None, problems: Problems, pm: PluginManager,
              base_dir: Path, global_plugins: GlobalPlugins, *, required: bool = True) -> list[Account]:
    node = top.raw("accounts")
    if (node is None or node.value is None) and not required:
        return []
    if node is None or node.value is None:
        problems.add(top.line, "accounts", "required key is missing: list the mailboxes to poll (or accounts_dir)")
        return []
    if not isinstance(node.value, list) or not node.value:
        problems.add(node.line, "accounts", f"expected a non-empty list of accounts, got {s.describe(node.value)}")
        return []
    accounts: list[Account] = []
    seen: dict[str, int] = {}
    known: set[str] = set()  # every key some account's readers asked for
    for item in node.value:
        merged, inherited = _with_defaults(item, defaults)
        # A name used twice is reported whatever else is wrong with either account.
        name_node = item.value.get("name") if isinstance(item.value, dict) else None
        name = name_node.value if name_node is not None and isinstance(name_node.value, str) else None
        duplicate = name is not None and name in seen
        if duplicate:
            problems.add(item.line, f"{item.path}.name",
                         f"duplicate account name {name!r} (first used on line {seen[name or '']})")
        elif name is not None:
            seen[name] = item.line
        account = _account(Section(merged, problems, what="an account mapping"), problems, pm, base_dir,
                           global_plugins, inherited, known)
        if account is not None and not duplicate:
            accounts.append(account)
    if defaults is not None and known:
        # Merged into every account, so a key there is known when an account's readers know it (the general keys
        # and, say, POP3's); checked here once rather than for every account (which skip the keys they inherit).
        defaults.finish(known - {"name"})
    return accounts


def _with_defaults(item: Node, defaults: Section | None) -> tuple[Node, set[str]]:
    """The account's mapping with the ``defaults:`` keys it does not set itself (they keep their own line numbers),
    and the names of those keys."""
    if defaults is None or not isinstance(item.value, dict):
        return item, set()
    inherited = {key: node for key, node in defaults.items() if key != "name" and key not in item.value}
    return Node({**inherited, **item.value}, item.line, item.path), set(inherited)


def _account(section: Section, problems: Problems, pm: PluginManager, base_dir: Path,
             global_plugins: GlobalPlugins, inherited: set[str], known: set[str]) -> Account | None:
    before = problems.reported
    name = section.get("name", s.nonempty_text, required=True)
    if name is not None and not _ACCOUNT_NAME.fullmatch(name):
        section.problem("expected letters, digits and . _ @ + - (up to 100 characters)", section.raw("name"))
    protocol = section.get("protocol", s.nonempty_text, DEFAULT_PROTOCOL)
    protocols = _known_source_protocols(pm)
    source = _source(section, protocol, protocols, problems, pm, base_dir)
    account_args = dict(
        name=name,
        protocol=protocol,
        source=source,
        poll_interval=section.get("poll_interval", s.duration, 300.0),
        timeout=section.get("timeout", s.duration, 60.0),
        poll_timeout=section.get("poll_timeout", s.duration, None),
        stale_after=section.get("stale_after", s.duration, DEFAULT_STALE_AFTER),
        keep=section.get("keep", s.boolean, False),
        delete_after=section.get("delete_after", s.duration, None),
        fetch_all=section.get("fetch_all", s.boolean, False),
        max_size=section.get("max_size", s.size, DEFAULT_MAX_SIZE),
        delete_oversized=section.get("delete_oversized", s.boolean, False),
        max_messages=section.get("max_messages", s.integer(1), None),
        destinations=_destinations(section, problems, pm, base_dir),
        plugins=_account_plugins(section, pm, problems, base_dir, global_plugins),
    )
    if account_args["delete_after"] is not None and not account_args["keep"]:
        section.problem("delete_after is for keep: true (without keep, a message is deleted once it is delivered)",
                        section.raw("delete_after"))
    account_args["disabled_plugins"] = frozenset(pm.sources) - set(account_args["plugins"] or {})
    if protocol in protocols:
        # Every key the source reads is now known: the rest are mistakes. Keys from ``defaults:`` are checked there.
        _finish_own_keys(section, inherited)
        known.update(section.used)
    if problems.reported > before:
        return None
    return Account(**account_args)


def _source(section: Section, protocol: str, protocols: frozenset[str], problems: Problems, pm: PluginManager,
            base_dir: Path) -> Any:
    """The account's source settings, read by the plugin of its ``protocol`` (None when there are problems)."""
    if protocol not in protocols:
        section.problem(f"unknown protocol {protocol!r} (known: {', '.join(sorted(protocols))})",
                        section.raw("protocol"))
        return None
    before = problems.reported
    parsed = pm.hook.parse_source(protocol=protocol, section=section, problems=problems, base_dir=base_dir)
    if parsed is None and problems.reported == before:
        section.problem(f"no plugin read the settings of protocol {protocol!r}", section.raw("protocol"))
    return parsed


def _finish_own_keys(section: Section, inherited: set[str]) -> None:
    """Unknown keys of the account's own mapping are errors, with a "did you mean" among the keys that were read."""
    own = {key: node for key, node in section.items() if key not in inherited}
    Section(Node(own, section.line, section.path), section.problems).finish(section.used)


def check_files(config: Config) -> None:
    """What ``postbote check`` adds to loading: the files the accounts name must be there and readable now.

    Not part of loading itself, since a daemon may start before, say, a credentials directory is mounted;
    paths naming an unset variable (``${CREDENTIALS_DIRECTORY}`` outside the service) are left alone.
    """
    problems = Problems(str(config.path))
    for account in config.accounts:
        for path, line, key_path in _named_files(account):
            expanded = os.path.expandvars(str(path))
            if "$" in expanded:
                continue
            try:
                with open(expanded, "rb") as handle:
                    readable_by_others = os.fstat(handle.fileno()).st_mode & stat.S_IROTH
            except OSError as exc:
                problems.add(line, key_path, f"cannot read {expanded}: {exc.strerror or exc}")
                continue
            if key_path.endswith("password_file") and readable_by_others:  # as a poll would refuse it
                problems.add(line, key_path, f"{expanded} is readable by other users; run: chmod o-r {expanded}")
    problems.raise_if_any()


#: The destination the error messages suggest; valid as written (tests/test_config.py loads it). An smtp example
#: would need recipients too.
DESTINATION_EXAMPLE = "{maildir: ~/Maildir}"


def _destinations(section: Section, problems: Problems, pm: PluginManager,
                  base_dir: Path) -> tuple[Destination, ...]:
    node = section.raw("deliver")
    if node is None or node.value is None:
        problems.add(section.line, f"{section.path}.deliver",
                     f"required key is missing: say where messages go, e.g. deliver: {DESTINATION_EXAMPLE}")
        return ()
    entries = node.value if isinstance(node.value, list) else [node]
    if not entries:
        problems.add(node.line, node.path, "expected at least one destination")
    destinations = [d for entry in entries if (d := parse_destination_entry(entry, problems, pm, base_dir))]
    return tuple(destinations)


def parse_destination_entry(entry: Node, problems: Problems, pm: pluggy.PluginManager,
                            base_dir: Path) -> Destination | None:
    if not isinstance(entry.value, dict) or len(entry.value) != 1:
        known = sorted(_known_destination_kinds(pm))
        problems.add(entry.line, entry.path,
                     f"expected a mapping with exactly one of {', '.join(known)}, e.g. {DESTINATION_EXAMPLE}")
        return None
    ((kind, options),) = entry.value.items()
    load = getattr(pm, "load_destination_kind", None)  # postbote's manager: the built-in delivering there
    if load is not None:
        load(kind)
    before = problems.reported
    parsed = pm.hook.parse_destination(kind=kind, options=options, problems=problems, base_dir=base_dir,
                                       pluginmanager=pm)
    if parsed is None:
        if problems.reported == before:
            known = sorted(_known_destination_kinds(pm))
            problems.add(options.line, options.path, f"unknown delivery target {kind!r} (known: {', '.join(known)})")
        return None
    if problems.reported > before:
        return None
    label = getattr(parsed, "label", None) or kind
    return Destination(kind=kind, settings=parsed, label=f"{kind}:{label}" if label != kind else kind,
                       line=options.line)


def _plugin_entries(section: Section | None, pm: PluginManager, problems: Problems) -> dict[str, Node | bool]:
    """A ``plugins:`` mapping: name -> True, False or an options mapping. Names must be plugins that exist."""
    if section is None:
        return {}
    entries: dict[str, Node | bool] = {}
    for name, node in section.items():
        section.raw(name)
        if name not in pm.sources:
            import difflib  # only for the error message

            close = difflib.get_close_matches(name, sorted(pm.sources), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.add(node.line, node.path, f"unknown plugin ({hint}plugins found: {', '.join(sorted(pm.sources))})")
        elif isinstance(node.value, bool):
            if not node.value and pm.sources[name].essential:
                problems.add(node.line, node.path, f"the built-in plugin {name!r} cannot be disabled")
            entries[name] = node.value
        elif isinstance(node.value, dict) or node.value is None:
            entries[name] = node if node.value else True
        else:
            problems.add(node.line, node.path,
                         f"expected true, false or a mapping of options, got {s.describe(node.value)}")
    return entries


@dataclass
class GlobalPlugins:
    """The top-level ``plugins:`` entries, and what each plugin parsed from them (or from no options at all), by the
    directory relative paths are taken from. Most accounts have no plugin options of their own: parsing the same
    options again for each of 100,000 accounts was a third of reading the config. Directories are keys as text:
    comparing `Path`s was a tenth of it."""

    entries: dict[str, Node | bool]
    parsed: dict[tuple[str, str], Any] = field(default_factory=dict)
    without_own: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The plugins of an account without ``plugins:`` of its own, by directory: the same for all of them."""


def _account_plugins(section: Section, pm: PluginManager, problems: Problems, base_dir: Path,
                     global_plugins: GlobalPlugins) -> dict[str, Any]:
    """The plugins enabled for one account, each with the options it parsed (global ones, shallowly overridden)."""
    directory = str(base_dir)
    own_section = section.section("plugins")
    if own_section is None and directory in global_plugins.without_own:
        return dict(global_plugins.without_own[directory])
    before = problems.reported
    enabled = _enabled_plugins(_plugin_entries(own_section, pm, problems), section, pm, problems, base_dir,
                               global_plugins)
    if own_section is None and problems.reported == before:
        global_plugins.without_own[directory] = dict(enabled)
    return enabled


def _enabled_plugins(own: dict[str, Node | bool], section: Section, pm: PluginManager, problems: Problems,
                     base_dir: Path, global_plugins: GlobalPlugins) -> dict[str, Any]:
    enabled: dict[str, Any] = {}
    directory = str(base_dir)
    for name, source in pm.sources.items():
        entry = own.get(name, global_plugins.entries.get(name))
        if not source.essential and (entry is False or (entry is None and not source.on_by_default)):
            continue
        pm.load_enabled(name)  # an optional built-in is imported only once some account enables it
        shared = name not in own  # parsed from the top-level entry (or from nothing): the same for every account
        if shared and (name, directory) in global_plugins.parsed:
            enabled[name] = global_plugins.parsed[name, directory]
            continue
        options = _merged_options(global_plugins.entries.get(name), own.get(name))
        before = problems.reported
        enabled[name] = _parse_plugin_options(name, options or Node({}, section.line, f"{section.path}.plugins.{name}"),
                                              pm, problems, base_dir)
        if shared and problems.reported == before:
            global_plugins.parsed[name, directory] = enabled[name]
    return enabled


def _merged_options(global_entry: Node | bool | None, own_entry: Node | bool | None) -> Node | None:
    if isinstance(own_entry, Node) and isinstance(global_entry, Node):
        return Node({**global_entry.value, **own_entry.value}, own_entry.line, own_entry.path)
    if isinstance(own_entry, Node):
        return own_entry
    if isinstance(global_entry, Node) and own_entry is not False:
        return global_entry
    return None


def _parse_plugin_options(name: str, options: Node, pm: PluginManager, problems: Problems, base_dir: Path) -> Any:
    before = problems.reported
    parsed = pm.hook.parse_plugin_options(name=name, options=options, problems=problems, base_dir=base_dir,
                                          pluginmanager=pm)
    if parsed is None and options.value and problems.reported == before:
        problems.add(options.line, options.path, f"plugin {name!r} takes no options")
    return parsed


def _known_destination_kinds(pm: pluggy.PluginManager) -> frozenset[str]:
    return _declared(pm, "DESTINATION_KINDS")


def _known_source_protocols(pm: pluggy.PluginManager) -> frozenset[str]:
    return _declared(pm, "SOURCE_PROTOCOLS")


def _declared(pm: pluggy.PluginManager, attribute: str) -> frozenset[str]:
    """What the plugins declare in ``attribute``: postbote's manager keeps it (asked for every account); a plain
    pluggy manager handed in by a third-party plugin is asked each time."""
    declared = getattr(pm, "declared", None)
    if declared is not None:
        return frozenset(declared(attribute))
    return frozenset(name for plugin in pm.get_plugins() for name in getattr(plugin, attribute, ()))


def _plugin_settings(account: Account) -> list[Any]:
    """What the account's plugins read: its source's settings and each destination's."""
    return [account.source, *(destination.settings for destination in account.destinations)]


def _named_files(account: Account) -> list[tuple[Path, int, str]]:
    """The files the account's source and destinations name (``files``: key -> (path, line, key path))."""
    named: list[tuple[Path, int, str]] = []
    for settings in _plugin_settings(account):
        files: Mapping[str, tuple[Path, int, str]] = getattr(settings, "files", None) or {}
        named.extend(files.values())
    return named


def _refuse_exposed_inline_password(config: Config) -> None:
    """An inline password in a file others can read is refused, as fetchmail does (a source's, or a
    destination's: an IMAP destination logs in too)."""
    if not any(getattr(settings, "holds_inline_password", False)
               for account in config.accounts for settings in _plugin_settings(account)):
        return
    try:
        status = config.path.stat()
    except OSError:
        return
    if not exposes_a_secret(status):
        return
    raise ConfigError(
        f"{config.path}: holds an inline password but is accessible by group or others "
        f"(mode {stat.S_IMODE(status.st_mode):04o}); run: chmod 600 {config.path} (or chmod 640 with the group of "
        "the user postbote runs as, or use password_file)")


def exposes_a_secret(status: os.stat_result) -> bool:
    """Whether a file holding a secret can be read by others than its owner -- beyond the group postbote itself
    runs as, which may read it (the service recipe: ``install -m 640 -g postbote``), never write it."""
    mode = status.st_mode
    if mode & stat.S_IRWXO or mode & (stat.S_IWGRP | stat.S_IXGRP):
        return True
    return bool(mode & stat.S_IRGRP) and status.st_gid != os.getegid()
