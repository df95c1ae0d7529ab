"""``postbote run``: the daemon (`postbote.daemon.Daemon`), polling each account at its ``poll_interval``, with
the config read again on SIGHUP."""

from __future__ import annotations

import argparse
import os
import sys

from postbote.cli.startup import apply_logging, load_setup, set_up


def run(args: argparse.Namespace) -> int:
    from postbote.daemon import Daemon
    from postbote.sdnotify import Notifier
    from postbote.state import StateLock, StateStore

    pm, config = set_up(args)
    notifier = Notifier.from_environment()
    with StateLock(config.state_dir, role="daemon"):
        store = StateStore(config.state_dir, busy_timeout=config.state_busy_timeout)
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
