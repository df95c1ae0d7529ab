"""``postbote run``: the daemon (`postbote.daemon.Daemon`), polling each account at its ``poll_interval``, with
the config read again on SIGHUP."""

from __future__ import annotations

import argparse
import os
import sys

from postbote.cli.startup import apply_logging, load_setup, set_up


def run(args: argparse.Namespace) -> int:
    import contextlib

    from postbote.daemon import Daemon
    from postbote.sdnotify import Notifier
    from postbote.state import StateLock, open_store

    pm, config = set_up(args)
    notifier = Notifier.from_environment()
    # SQLite: one daemon per state directory. A shared state (PostgreSQL): as many workers as wanted, sharing the
    # accounts by leases; the state directory keeps only this machine's plugin tables and tokens.
    lock = StateLock(config.state_dir, role="daemon") if config.state is None else contextlib.nullcontext()
    with lock:
        store = open_store(config)
        try:
            daemon = Daemon(pm, config, store, load=lambda: load_setup(args),
                            on_reload=lambda new: apply_logging(args, new), notifier=notifier)
            status = daemon.run()
            if daemon.abandoned:
                _exit_leaving_threads(status)
            return status
        finally:
            store.close()


def _exit_leaving_threads(status: int) -> None:
    """Exit now, with polls still blocked in the network: no QUIT reaches their servers, so nothing is deleted
    there; a message whose hand-off was not finished is simply fetched again. Closing the state store under those
    threads instead could fail them halfway through a write."""
    import logging

    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
