"""``postbote plugins``: every plugin found (built-in, installed, or named in the config), where it comes from,
where it is enabled, and the hooks it implements."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, TextIO

from postbote.cli.startup import set_up
from postbote.jobs import ExitStatus

if TYPE_CHECKING:
    from postbote.config import Config
    from postbote.pluginmanager import PluginManager


def run(args: argparse.Namespace) -> int:
    pm, config = set_up(args)
    return list_plugins(pm, config)


def list_plugins(pm: PluginManager, config: Config, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    pm.load_all_builtins()  # the optional ones no account enables are listed too, with their hooks
    for name, source in sorted(pm.sources.items(), key=lambda item: (item[1].origin != "built-in", item[0])):
        print(f"{name}  [{source.origin}: {source.where}]", file=out)
        print(f"    enabled: {_where_enabled(name, source.essential, config)}", file=out)
        print(f"    hooks: {', '.join(pm.hooks_of(name)) or '-'}", file=out)
        if provides := _provides(pm.get_plugin(name)):
            print(f"    provides: {provides}", file=out)
    return ExitStatus.OK


def _provides(plugin: object) -> str:
    """The mail sources (``protocol:``) and destination kinds (``deliver:``) a plugin declares."""
    parts = []
    if protocols := getattr(plugin, "SOURCE_PROTOCOLS", ()):
        parts.append(f"protocol: {', '.join(protocols)}")
    if kinds := getattr(plugin, "DESTINATION_KINDS", ()):
        parts.append(f"deliver: {', '.join(kinds)}")
    return "; ".join(parts)


def _where_enabled(name: str, essential: bool, config: Config) -> str:
    """``always``, ``all accounts``, the accounts that enable it, or ``off``."""
    if essential:
        return "always"
    users = [account.name for account in config.accounts if account.uses(name)]
    if users and len(users) == len(config.accounts):
        return "all accounts"
    return ", ".join(users) if users else "off"
