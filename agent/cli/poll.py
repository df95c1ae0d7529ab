"""``postbote poll [ACCOUNT...]``: poll the accounts once and exit, with an exit status that says whether every
listed message was taken care of (`postbote.jobs.exit_status`). When a daemon holds the state directory, ask it to
poll now (SIGUSR1) instead of failing."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, TextIO

from postbote.cli.startup import set_up
from postbote.errors import StateLockedError
from postbote.jobs import ExitStatus

if TYPE_CHECKING:
    import threading

    from postbote.config import Account, Config
    from postbote.dry_run import AccountPreview
    from postbote.pluginmanager import PluginManager
    from postbote.poll import PollStats
    from postbote.state import Record, StateStore
    from postbote.state_postgres import LeaseKeeper

PROGRESS_PLUGIN_NAME = "postbote.progress"


def run(args: argparse.Namespace) -> int:
    pm, config = set_up(args)
    if getattr(args, "dry_run", False):
        return dry_run(pm, this_time(config, args), args.accounts)
    from postbote.logconfig import hold_back_routine_events

    held = hold_back_routine_events()  # under cron: nothing printed unless something happened
    results: list[PollStats | None] = []
    status: int = ExitStatus.FAILED
    try:
        status = poll_command(pm, this_time(config, args), args.accounts, results)
    finally:
        if held is not None:
            held.finish(something_happened=status != ExitStatus.OK or any(map(happened, results)))
    return status


def happened(stats: PollStats | None) -> bool:
    """Whether a poll did anything a person may want to hear of: mail handled, deleted or waiting, a failure."""
    return stats is None or not stats.ok or any(
        (stats.delivered, stats.dropped, stats.deferred, stats.rejected, stats.deleted))


def dry_run(pm: PluginManager, config: Config, names: Sequence[str], out: TextIO | None = None) -> int:
    """``poll --dry-run``: per account and message, where a poll would deliver it, or that a filter would drop it
    (and which), from the headers alone; nothing changes on the server or in the state (`postbote.dry_run`). Needs
    no state lock, so it runs beside a daemon. 1 when an account could not be reached or logged in to."""
    from postbote.credentials import redact
    from postbote.dry_run import preview_account
    from postbote.jobs import plugins_started

    out = out or sys.stdout
    status = ExitStatus.OK
    accounts = config.select(tuple(names))
    with plugins_started(pm, config):
        for account in accounts:
            try:
                preview = preview_account(pm, account, config.state_dir, read_records(config, account.name))
            except Exception as exc:  # noqa: BLE001 - every failure is this account's answer, shown as one line
                status = ExitStatus.FAILED
                print(f"{account.name}: FAILED: {redact(str(exc))}", file=out)
                continue
            for line in preview_lines(preview):
                print(line, file=out)
    return status


def read_records(config: Config, account: str) -> dict[str, Record]:
    """The account's records, read-only (none before the first poll)."""
    from postbote.state import open_store, store_exists

    if not store_exists(config):
        return {}
    store = open_store(config, readonly=True)
    try:
        return store.records(account)
    finally:
        store.close()


def preview_lines(preview: AccountPreview) -> list[str]:
    from postbote.dry_run import Fate

    filters = (f"; filters, on the headers only (a filter reading the body may decide otherwise): "
               f"{', '.join(preview.filters)}" if preview.filters else "")
    lines = [f"{preview.account}: {len(preview.messages)} message(s) on the server (dry run: headers read, "
             f"nothing delivered, deleted, flagged or recorded){filters}"]
    for message in preview.messages:
        subject = f" {message.subject!r}" if message.subject is not None else ""
        what = {Fate.DELIVER: f"-> {message.detail}", Fate.DROP: message.detail,
                Fate.DELETE: f"delete: {message.detail}", Fate.LEAVE: f"leave: {message.detail}",
                Fate.DEFER: f"defer: {message.detail}"}[message.fate]
        lines.append(f"  {message.uid} ({message.size} octets){subject}: {what}")
    return lines


def this_time(config: Config, args: argparse.Namespace) -> Config:
    """The config with what the command line says for this poll only (fetchmail's -k, -a, -l): keep, fetch_all,
    max_messages, max_size."""
    import dataclasses

    from postbote.errors import ConfigError
    from postbote.yaml_reader import size

    changes: dict[str, object] = {}
    if getattr(args, "keep", False):
        changes["keep"] = True
        changes["delete_after"] = None  # "leave every message": not even one whose delete_after is up
    if getattr(args, "fetch_all", False):
        changes["fetch_all"] = True
    if getattr(args, "limit", None) is not None:
        if args.limit < 1:
            raise ConfigError("--limit: expected a number of messages, at least 1")
        changes["max_messages"] = args.limit
    if getattr(args, "max_size", None) is not None:
        try:
            changes["max_size"] = size(args.max_size)
        except ValueError as exc:
            raise ConfigError(f"--max-size: {exc}") from None
    if not changes:
        return config
    return dataclasses.replace(config, accounts=tuple(dataclasses.replace(account, **changes)  # type: ignore[arg-type]
                                                      for account in config.accounts))


def poll_command(pm: PluginManager, config: Config, names: Sequence[str],
                 results: list[PollStats | None] | None = None) -> int:
    """Poll once; when a daemon holds the state directory, ask it to poll now instead of failing. Each account's
    `PollStats` is added to ``results``."""
    from postbote.jobs import keep_out_of_the_collector, plugins_started
    from postbote.state import StateLock, StateStore, read_lock_holder

    config.select(tuple(names))
    if config.state is not None:
        return poll_shared(pm, config, names, results)
    lock = StateLock(config.state_dir, role="poll")
    try:
        lock.acquire()
    except StateLockedError:
        holder = read_lock_holder(config.state_dir)
        if holder is None or holder.role != "daemon" or not holder.alive():
            raise
        return ask_daemon_to_poll(holder.pid, config, names)
    try:
        store = StateStore(config.state_dir, busy_timeout=config.state_busy_timeout)
        try:
            with plugins_started(pm, config), progress_shown(pm):
                keep_out_of_the_collector()
                return poll(pm, config, store, names, results)
        finally:
            store.close()
    finally:
        lock.release()


def poll_shared(pm: PluginManager, config: Config, names: Sequence[str],
                results: list[PollStats | None] | None = None) -> int:
    """`poll_command` with a shared state store (PostgreSQL): no lock on the state directory -- workers may run --
    but each account is polled under its lease, so never beside a worker polling it (`postbote.jobs.poll_leased`)."""
    from postbote.jobs import keep_out_of_the_collector, plugins_started
    from postbote.state import open_store
    from postbote.state_postgres import one_shot_worker

    store = open_store(config)
    try:
        with one_shot_worker(store.database, config.worker_lease) as leases, plugins_started(pm, config), \
                progress_shown(pm):
            keep_out_of_the_collector()
            return poll(pm, config, store, names, results, leases=leases)
    finally:
        store.close()


def ask_daemon_to_poll(pid: int, config: Config, names: Sequence[str], out: TextIO | None = None) -> int:
    try:
        os.kill(pid, signal.SIGUSR1)
    except ProcessLookupError:
        raise StateLockedError(f"the postbote daemon (pid {pid}) holding {config.state_dir} has just exited; "
                               f"try again") from None
    except PermissionError:
        raise StateLockedError(f"a postbote daemon (pid {pid}) is using {config.state_dir}, and this user may not "
                               f"signal it; run this as the daemon's user (or: systemctl kill -s USR1 postbote)"
                               ) from None
    note = f" (it polls every account, not only {', '.join(names)})" if names else ""
    stream = out or sys.stdout
    if out is not None or stream.isatty():
        print(f"postbote: the daemon (pid {pid}) is running: asked it to poll now{note}; "
              f"see `postbote status` or its log for the outcome", file=stream)
    else:  # an event, not a line on stdout: under cron, whose every line of output is mailed, it is held back
        import structlog

        structlog.get_logger("postbote").info("poll.asked_daemon", pid=pid, only=list(names) or None)
    return ExitStatus.OK


@contextmanager
def progress_shown(pm: PluginManager) -> Iterator[str | None]:
    """Per-account progress (messages and bytes) on stderr when it is a terminal; yields the observer's name."""
    if not sys.stderr.isatty():
        yield None
        return
    from postbote.cli.progress import ProgressDisplay

    display = ProgressDisplay(sys.stderr)
    pm.register(display, name=PROGRESS_PLUGIN_NAME)
    try:
        yield PROGRESS_PLUGIN_NAME
    finally:
        display.close()
        pm.unregister(display)


def poll(pm: PluginManager, config: Config, store: StateStore, names: Sequence[str],
         results: list[PollStats | None] | None = None, leases: LeaseKeeper | None = None) -> int:
    """Poll ``names`` (all accounts when empty) once, up to ``max_parallel`` accounts at a time; the exit status
    says whether every listed message was taken care of (`postbote.jobs.exit_status`)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from postbote.jobs import exit_status, poll_guarded, poll_leased
    from postbote.poller import Poller

    accounts = config.select(tuple(names))
    stop = threading.Event()
    hosts = {host: threading.BoundedSemaphore(config.max_parallel_per_host)
             for host in {account.server_host for account in accounts}}

    def poll_one(account: Account) -> PollStats | None:
        with hosts[account.server_host]:  # at most max_parallel_per_host polls against one server at a time
            if stop.is_set():
                return None
            return poll_guarded(poller, account) if leases is None else poll_leased(poller, account, leases)

    with stop_on_signals(stop):
        poller = Poller(pm, store, stop)
        with ThreadPoolExecutor(max_workers=max(1, min(config.max_parallel, len(accounts))),
                                thread_name_prefix="poll") as pool:
            polled = list(pool.map(poll_one, interleaved_by_host(accounts)))
    if results is not None:
        results.extend(polled)
    return exit_status(polled)


def interleaved_by_host(accounts: Sequence[Account]) -> list[Account]:
    """The accounts with their hosts taken in turn, so that the pool's workers do not all wait on one busy host."""
    import itertools

    by_host: dict[str, list[Account]] = {}
    for account in accounts:
        by_host.setdefault(account.server_host, []).append(account)
    turns = itertools.zip_longest(*by_host.values())
    return [account for turn in turns for account in turn if account is not None]


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM and SIGINT only set ``stop``: the message in hand is finished, then the session ends with QUIT."""
    import threading

    import structlog

    def request_stop(signum: int, _frame: object) -> None:
        structlog.get_logger("postbote").info("stop.requested", signal=signal.Signals(signum).name)
        stop.set()

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
