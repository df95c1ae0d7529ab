"""postbote's YAML configuration: read, validated and turned into typed objects before anything connects.

Every mistake is reported as ``FILE:LINE: key.path: what was expected``, all of them in one go; unknown keys are
errors with a "did you mean". Delivery targets are validated by the plugins that deliver to them
(the ``parse_destination`` hook), so a new target brings its own options and their errors look the same.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from postbote import settings as s
from postbote.credentials import PasswordSource, Secret
from postbote.errors import ConfigError
from postbote.settings import Node, Problems, Section

if TYPE_CHECKING:
    import pluggy
    from postbote.oauth2_settings import OAuth2Settings
    from postbote.pluginmanager import PluginManager

CONFIG_ENV = "POSTBOTE_CONFIG"
DEFAULT_STATE_DIR = "~/.local/state/postbote"
PASSWORD_KEYS = ("password", "password_file", "password_command", "password_env")
TOKEN_KEYS = ("token_command", "oauth2")
SECRET_KEYS = (*PASSWORD_KEYS, *TOKEN_KEYS)
DEFAULT_MAX_SIZE = 256 * 1024 * 1024  # larger messages stay on the server, reported as rejected (max_size: to change)
DEFAULT_STALE_AFTER = 3600.0  # mail waiting longer than this shows as stale in `postbote status`
_ACCOUNT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,99}")


class AuthChoice(StrEnum):
    """What ``auth:`` may say: ``auto`` or one login mechanism. The config owns the names the user writes; the SASL
    code (postbote.sasl) implements them, so reading a config never loads the code that talks to a server."""

    AUTO = "auto"
    USER = "user"
    APOP = "apop"
    PLAIN = "plain"
    LOGIN = "login"
    CRAM_MD5 = "cram-md5"
    SCRAM_SHA_1 = "scram-sha-1"
    SCRAM_SHA_256 = "scram-sha-256"
    XOAUTH2 = "xoauth2"
    OAUTHBEARER = "oauthbearer"


class TLSMode(StrEnum):
    """What ``tls:`` may say for a POP3 account."""

    IMPLICIT = "implicit"  # TLS from the first byte (port 995)
    STARTTLS = "starttls"  # STLS on the plain port (110)
    NONE = "none"


AUTH_CHOICES: tuple[str, ...] = tuple(choice.value for choice in AuthChoice)
# The mechanisms that log in with an OAuth2 access token rather than a password.
TOKEN_MECHANISMS: frozenset[str] = frozenset({AuthChoice.XOAUTH2.value, AuthChoice.OAUTHBEARER.value})


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
    host: str
    port: int
    tls: str
    tls_verify: bool
    tls_ca_file: Path | None
    tls_fingerprint: str | None
    username: str
    password: PasswordSource | None = field(repr=False)
    auth: str
    poll_interval: float
    timeout: float
    keep: bool
    fetch_all: bool
    max_size: int | None
    max_messages: int | None
    destinations: tuple[Destination, ...]
    poll_timeout: float | None = None  # the whole session's deadline; None: derived from timeout and the mail
    stale_after: float = DEFAULT_STALE_AFTER
    plugins: Mapping[str, Any] = field(default_factory=dict)
    disabled_plugins: frozenset[str] = frozenset()
    token_command: tuple[str, ...] = ()
    oauth2: OAuth2Settings | None = None
    files: Mapping[str, tuple[Path, int, str]] = field(default_factory=dict)  # key -> (path, line, key path)
    protocol: str = "pop3"  # the source plugin that opens the mailbox (the ``open_mailbox`` hook)

    def describe_credentials(self) -> str:
        """Where the secret comes from, for ``postbote check``; never the secret itself."""
        if self.password is not None:
            return self.password.describe()
        if self.token_command:
            return f"token_command {self.token_command[0]} (+{len(self.token_command) - 1} args)"
        return f"oauth2 ({self.oauth2.provider or 'custom'}, client {self.oauth2.client_id})" if self.oauth2 else "none"

    def uses(self, plugin: str) -> bool:
        """Whether ``plugin`` is enabled for this account (plugins registered after the config was read are)."""
        return plugin not in self.disabled_plugins

    def options_for(self, plugin: str) -> Any:
        """The options ``plugin`` parsed from the config for this account (None when it takes none)."""
        return self.plugins.get(plugin)


@dataclass(frozen=True)
class Config:
    path: Path
    state_dir: Path
    log: LogSettings
    accounts: tuple[Account, ...]
    max_parallel: int = 4
    backoff_max: float = 3600.0
    state_busy_timeout: float = 2.0

    def account(self, name: str) -> Account:
        for account in self.accounts:
            if account.name == name:
                return account
        known = ", ".join(a.name for a in self.accounts)
        raise ConfigError(f"{self.path}: no account named {name!r} (accounts: {known})")

    def select(self, names: list[str] | tuple[str, ...]) -> tuple[Account, ...]:
        return tuple(self.account(name) for name in names) if names else self.accounts


ACCOUNT_KEYS = {"name", "host", "port", "tls", "tls_verify", "tls_ca_file", "tls_fingerprint", "username",
                *SECRET_KEYS, "auth", "poll_interval", "timeout", "poll_timeout", "stale_after", "keep", "fetch_all",
                "max_size", "max_messages",
                "deliver", "plugins"}
TOP_KEYS = {"state_dir", "log", "defaults", "accounts", "plugins", "plugin_paths", "max_parallel", "backoff_max",
            "state_busy_timeout"}


def load_config(path: Path, pm: PluginManager) -> Config:
    """Load and validate ``path``, registering its ``plugin_paths`` in ``pm``; `ConfigError` lists every problem."""
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
    global_plugins = _plugin_entries(top.section("plugins"), pm, problems)
    state_dir = top.get("state_dir", s.path_relative_to(base_dir), default_state_dir())
    log = _log_settings(top.section("log"))
    defaults = top.section("defaults")
    if defaults is not None:
        defaults.finish(ACCOUNT_KEYS - {"name"})
    accounts = _accounts(top, defaults, problems, pm, base_dir, global_plugins)
    top.finish(TOP_KEYS)
    problems.raise_if_any()
    config = Config(path=path, state_dir=state_dir, log=log, accounts=tuple(accounts),
                    max_parallel=top.get("max_parallel", s.integer(1, 256), 4),
                    backoff_max=top.get("backoff_max", s.duration, 3600.0),
                    state_busy_timeout=top.get("state_busy_timeout", s.duration, 2.0))
    problems.raise_if_any()
    _refuse_exposed_inline_password(config)
    return config


def _log_settings(section: Section | None) -> LogSettings:
    if section is None:
        return LogSettings()
    settings = LogSettings(level=section.get("level", s.choice("debug", "info", "warning", "error"), "info"),
                           format=section.get("format", s.choice("auto", "console", "json"), "auto"))
    section.finish()
    return settings


def _accounts(top: Section, defaults: Section | None, problems: Problems, pm: PluginManager,
              base_dir: Path, global_plugins: dict[str, Node | bool]) -> list[Account]:
    node = top.raw("accounts")
    if node is None or node.value is None:
        problems.add(top.line, "accounts", "required key is missing: list the mailboxes to poll")
        return []
    if not isinstance(node.value, list) or not node.value:
        problems.add(node.line, "accounts", f"expected a non-empty list of accounts, got {s.describe(node.value)}")
        return []
    accounts: list[Account] = []
    seen: dict[str, int] = {}
    for item in node.value:
        merged = _with_defaults(item, defaults)
        account = _account(Section(merged, problems, what="an account mapping"), problems, pm, base_dir,
                           global_plugins)
        if account is None:
            continue
        if account.name in seen:
            problems.add(item.line, f"{item.path}.name",
                         f"duplicate account name {account.name!r} (first used on line {seen[account.name]})")
            continue
        seen[account.name] = item.line
        accounts.append(account)
    return accounts


def _with_defaults(item: Node, defaults: Section | None) -> Node:
    """The account's mapping with the ``defaults:`` keys it does not set itself (they keep their own line numbers)."""
    if defaults is None or not isinstance(item.value, dict):
        return item
    merged = {key: node for key, node in defaults.items() if key != "name"}
    merged.update(item.value)
    return Node(merged, item.line, item.path)


def _account(section: Section, problems: Problems, pm: PluginManager, base_dir: Path,
             global_plugins: dict[str, Node | bool]) -> Account | None:
    before = len(problems.lines)
    name = section.get("name", s.nonempty_text, required=True)
    if name is not None and not _ACCOUNT_NAME.fullmatch(name):
        section.problem("expected letters, digits and . _ @ + - (up to 100 characters)", section.raw("name"))
    tls = section.get("tls", s.choice(*TLSMode), TLSMode.IMPLICIT.value)
    port = section.get("port", s.port_number, 995 if tls == TLSMode.IMPLICIT else 110)
    account_args = dict(
        name=name,
        host=section.get("host", s.nonempty_text, required=True),
        port=port,
        tls=tls,
        tls_verify=section.get("tls_verify", s.boolean, True),
        tls_ca_file=section.get("tls_ca_file", s.path_relative_to(base_dir), None),
        tls_fingerprint=section.get("tls_fingerprint", _fingerprint, None),
        username=section.get("username", s.nonempty_text, required=True),
        auth=section.get("auth", s.choice(*AUTH_CHOICES), "auto"),
        poll_interval=section.get("poll_interval", s.duration, 300.0),
        timeout=section.get("timeout", s.duration, 60.0),
        poll_timeout=section.get("poll_timeout", s.duration, None),
        stale_after=section.get("stale_after", s.duration, DEFAULT_STALE_AFTER),
        keep=section.get("keep", s.boolean, False),
        fetch_all=section.get("fetch_all", s.boolean, False),
        max_size=section.get("max_size", s.size, DEFAULT_MAX_SIZE),
        max_messages=section.get("max_messages", s.integer(1), None),
        destinations=_destinations(section, problems, pm, base_dir),
        plugins=_account_plugins(section, pm, problems, base_dir, global_plugins),
    )
    account_args["disabled_plugins"] = frozenset(pm.sources) - set(account_args["plugins"] or {})
    account_args.update(_credentials(section, base_dir, account_args["auth"]))
    named = {"tls_ca_file": account_args["tls_ca_file"], "password_file": _password_file(account_args)}
    account_args["files"] = {key: (path, node.line, node.path) for key, path in named.items()
                             if path is not None and (node := section.raw(key)) is not None}
    section.finish(ACCOUNT_KEYS)
    if len(problems.lines) > before:
        return None
    return Account(**account_args)


def _password_file(args: dict[str, Any]) -> Path | None:
    source = args.get("password")
    return source.file if source is not None and source.kind == "password_file" else None


def check_files(config: Config) -> None:
    """What ``postbote check`` adds to loading: the files the accounts name must be there and readable now.

    Not part of loading itself, since a daemon may start before, say, a credentials directory is mounted;
    paths naming an unset variable (``${CREDENTIALS_DIRECTORY}`` outside the service) are left alone.
    """
    problems = Problems(str(config.path))
    for account in config.accounts:
        for path, line, key_path in account.files.values():
            expanded = os.path.expandvars(str(path))
            if "$" in expanded:
                continue
            try:
                with open(expanded, "rb"):
                    pass
            except OSError as exc:
                problems.add(line, key_path, f"cannot read {expanded}: {exc.strerror or exc}")
    problems.raise_if_any()


def _credentials(section: Section, base_dir: Path, auth: str | None) -> dict[str, Any]:
    """Exactly one secret: a password source, a ``token_command`` or ``oauth2``; it must suit ``auth``."""
    given = [key for key in SECRET_KEYS if key in section]
    if len(given) != 1:
        what = "none" if not given else ", ".join(given)
        section.problem(f"give exactly one of {', '.join(SECRET_KEYS)} (found {what})")
        return {"password": None}
    kind = given[0]
    node = section.raw(kind)
    if auth in TOKEN_MECHANISMS and kind in PASSWORD_KEYS:
        section.problem(f"auth: {auth} logs in with an OAuth2 access token: give token_command or oauth2", node)
    elif auth not in (AuthChoice.AUTO, *TOKEN_MECHANISMS) and kind in TOKEN_KEYS:
        section.problem(f"auth: {auth} logs in with a password: give one of {', '.join(PASSWORD_KEYS)}", node)
    if kind == "token_command":
        return {"password": None, "token_command": tuple(section.get(kind, _argv) or ())}
    if kind == "oauth2":
        from postbote.oauth2_settings import oauth2_from_section

        oauth = section.section(kind)
        return {"password": None, "oauth2": oauth2_from_section(oauth, base_dir) if oauth else None}
    return {"password": _password_source(section, base_dir, kind)}


def _password_source(section: Section, base_dir: Path, kind: str) -> PasswordSource | None:
    if kind == "password":
        value = section.get(kind, s.text)
        return PasswordSource(kind, inline=Secret(value)) if value is not None else None
    if kind == "password_file":
        file = section.get(kind, _password_file_path(base_dir))
        return PasswordSource(kind, file=file) if file is not None else None
    if kind == "password_command":
        argv = section.get(kind, _argv)
        return PasswordSource(kind, command=tuple(argv)) if argv else None
    env = section.get(kind, _env_name)
    return PasswordSource(kind, env=env) if env else None


def _password_file_path(base_dir: Path) -> s.Parser[Path]:
    """A path that may name environment variables (``${CREDENTIALS_DIRECTORY}/alice``), expanded when read."""
    relative = s.path_relative_to(base_dir)

    def parse(value: Any) -> Path:
        text = s.nonempty_text(value)
        return Path(text) if "$" in text else relative(text)

    return parse


def _fingerprint(value: Any) -> str:
    return normalise_fingerprint(s.nonempty_text(value))


def normalise_fingerprint(value: str) -> str:
    """``AB:CD:…`` or ``abcd…`` (64 hex digits) to lower-case hex without colons; ValueError otherwise."""
    digits = value.replace(":", "").strip().lower()
    if len(digits) != 64 or any(c not in "0123456789abcdef" for c in digits):
        raise ValueError("expected a SHA-256 fingerprint: 64 hex digits, optionally separated by colons")
    return digits


def _argv(value: Any) -> list[str]:
    if not isinstance(value, list):
        raise ValueError("expected a command as a list of arguments (it is run without a shell), "
                         "e.g. [pass, show, mail]")
    return s.text_list(value)


def _env_name(value: Any) -> str:
    name = s.nonempty_text(value)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError("expected an environment variable name")
    return name


def _destinations(section: Section, problems: Problems, pm: PluginManager,
                  base_dir: Path) -> tuple[Destination, ...]:
    node = section.raw("deliver")
    if node is None or node.value is None:
        problems.add(section.line, f"{section.path}.deliver",
                     "required key is missing: say where messages go, e.g. deliver: {maildir: ~/Maildir}")
        return ()
    entries = node.value if isinstance(node.value, list) else [node]
    if not entries:
        problems.add(node.line, node.path, "expected at least one destination")
    destinations = [d for entry in entries if (d := parse_destination_entry(entry, problems, pm, base_dir))]
    return tuple(destinations)


def parse_destination_entry(entry: Node, problems: Problems, pm: pluggy.PluginManager,
                            base_dir: Path) -> Destination | None:
    known = sorted(_known_destination_kinds(pm))
    if not isinstance(entry.value, dict) or len(entry.value) != 1:
        problems.add(entry.line, entry.path,
                     f"expected a mapping with exactly one of {', '.join(known)}, e.g. {{smtp: {{host: localhost}}}}")
        return None
    ((kind, options),) = entry.value.items()
    before = len(problems.lines)
    parsed = pm.hook.parse_destination(kind=kind, options=options, problems=problems, base_dir=base_dir,
                                       pluginmanager=pm)
    if parsed is None:
        if len(problems.lines) == before:
            problems.add(options.line, options.path, f"unknown delivery target {kind!r} (known: {', '.join(known)})")
        return None
    if len(problems.lines) > before:
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


def _account_plugins(section: Section, pm: PluginManager, problems: Problems, base_dir: Path,
                     global_plugins: dict[str, Node | bool]) -> dict[str, Any]:
    """The plugins enabled for one account, each with the options it parsed (global ones, shallowly overridden)."""
    own = _plugin_entries(section.section("plugins"), pm, problems)
    enabled: dict[str, Any] = {}
    for name, source in pm.sources.items():
        entry = own.get(name, global_plugins.get(name))
        if not source.essential and (entry is False or (entry is None and not source.on_by_default)):
            continue
        pm.load_builtin(name)  # an optional built-in is imported only once some account enables it
        options = _merged_options(global_plugins.get(name), own.get(name))
        enabled[name] = _parse_plugin_options(name, options or Node({}, section.line, f"{section.path}.plugins.{name}"),
                                              pm, problems, base_dir)
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
    before = len(problems.lines)
    parsed = pm.hook.parse_plugin_options(name=name, options=options, problems=problems, base_dir=base_dir,
                                          pluginmanager=pm)
    if parsed is None and options.value and len(problems.lines) == before:
        problems.add(options.line, options.path, f"plugin {name!r} takes no options")
    return parsed


def _known_destination_kinds(pm: pluggy.PluginManager) -> set[str]:
    kinds: set[str] = set()
    for plugin in pm.get_plugins():
        kinds.update(getattr(plugin, "DESTINATION_KINDS", ()))
    return kinds


def _refuse_exposed_inline_password(config: Config) -> None:
    """An inline password in a file others can read is refused, as fetchmail does."""
    if not any(account.password and account.password.kind == "password" for account in config.accounts):
        return
    try:
        mode = config.path.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{config.path}: holds an inline password but is accessible by group or others "
            f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {config.path} (or use password_file)")
