"""`poll_once`: one poll of one account, set up the way ``postbote poll`` sets it up, for tests.

Tests (ours and a plugin author's) need the same few steps around a poll: a fresh plugin manager that loads no
installed plugins (so that what is installed on the machine cannot change a test), the plugins under test
registered beside the built-ins, the config read with that manager, the state store opened with the config's busy
timeout and closed afterwards. This is that, once.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from postbote.errors import ConfigError

if TYPE_CHECKING:
    from postbote.config import Account, Config
    from postbote.poll import PollStats
    from postbote.state import StateStore


def poll_once(config: Path | Config, *, account: str | None = None, plugins: Iterable[object] = (),
              store: StateStore | None = None, stop: threading.Event | None = None,
              start_plugins: bool = False) -> PollStats:
    """Poll one account of the config at ``config`` (a path, or a `Config` whose file is read again) once.

    ``account`` names the account (the first one by default); ``plugins`` are extra plugin objects registered
    before the config is read; ``store`` is a state store to use and leave open (by default one is opened on the
    config's state directory and closed after the poll); ``stop`` is the poller's stop event; ``start_plugins``
    runs the plugins' ``configure`` before the poll and ``unconfigure`` after it, as a job does.
    """
    from postbote.config import Config, load_config
    from postbote.jobs import plugins_started
    from postbote.pluginmanager import make_plugin_manager
    from postbote.poller import Poller
    from postbote.state import StateStore

    pm = make_plugin_manager(entry_points=False, extra=plugins)
    loaded = load_config(config.path if isinstance(config, Config) else config, pm)
    chosen = _account(loaded, account)
    with ExitStack() as cleanup:
        if store is None:
            store = StateStore(loaded.state_dir, busy_timeout=loaded.state_busy_timeout)
            cleanup.callback(store.close)
        if start_plugins:
            cleanup.enter_context(plugins_started(pm, loaded))
        return Poller(pm, store, stop).poll(chosen)


def _account(config: Config, name: str | None) -> Account:
    if name is None:
        return config.accounts[0]
    for account in config.accounts:
        if account.name == name:
            return account
    raise ConfigError(f"{config.path}: no account named {name!r}")
