"""What every command that reads the config does first: a plugin manager, the config loaded with it, and logging
set up as the config and the command line say."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from postbote.config import Config
    from postbote.pluginmanager import PluginManager


def load_setup(args: argparse.Namespace) -> tuple[PluginManager, Config]:
    """A fresh plugin manager and the config loaded with it: at start-up, and again on every SIGHUP reload."""
    from postbote.config import find_config, load_config
    from postbote.pluginmanager import make_plugin_manager

    pm = make_plugin_manager()
    return pm, load_config(find_config(args.config), pm)


def apply_logging(args: argparse.Namespace, config: Config) -> None:
    from postbote.logconfig import configure_logging

    level = args.log_level or ("warning" if getattr(args, "quiet", False) else config.log.level)
    configure_logging(level, args.log_format or config.log.format, file=config.log.file)


def set_up(args: argparse.Namespace) -> tuple[PluginManager, Config]:
    """The plugin manager and the config, with logging already configured."""
    pm, config = load_setup(args)
    apply_logging(args, config)
    return pm, config
