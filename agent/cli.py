"""The ``postbote`` command. Errors meant for the admin are caught here, once, and printed as one line.

Exit status (`postbote.jobs.ExitStatus`): ``poll`` exits 0 only when every listed message was delivered, dropped by a
filter or left on purpose; 1 when some message was deferred or rejected in this poll, some account failed, or the
state directory is busy; 2 for a usage or configuration error (a plugin that cannot start included). ``postbote
poll`` while a daemon holds the state directory asks the daemon to poll (SIGUSR1) and exits 0; ``postbote status``
exits 1 when some account's last poll failed or some message waits on a server.

Start-up time matters (a timer may run ``postbote poll`` every minute): this module imports only what parsing the
command line needs, and each command imports what it uses, so ``--help`` loads no plugin, no YAML and no logging.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, TextIO

from postbote import __version__
from postbote.errors import ConfigError, PostboteError, StateLockedError
from postbote.jobs import ExitStatus

if TYPE_CHECKING:
    import threading

    import pluggy
    from postbote.config import Config
    from postbote.pluginmanager import PluginManager
    from postbote.state import StateStore

EXIT_OK, EXIT_FAILED, EXIT_USAGE = ExitStatus.OK, ExitStatus.FAILED, ExitStatus.USAGE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="postbote", description="Fetch mail from POP3 mailboxes and redeliver it.")
    parser.add_argument("-c", "--config", metavar="FILE",
                        help="config file (default: $POSTBOTE_CONFIG, ./postbote.yaml, "
                             "~/.config/postbote/postbote.yaml, /etc/postbote/postbote.yaml)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="override log.level")
    parser.add_argument("--log-format", choices=["auto", "console", "json"], help="override log.format")
    parser.add_argument("--version", action="version", version=f"postbote {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    poll = commands.add_parser("poll", help="poll the accounts once and exit")
    poll.add_argument("accounts", nargs="*", metavar="ACCOUNT", help="only these accounts (default: all)")
    commands.add_parser("run", help="run as a daemon, polling each account at its poll_interval")
    status = commands.add_parser("status", help="show each account's last poll, next poll and last error")
    status.add_argument("--json", action="store_true", help="print JSON instead of text")
    commands.add_parser("check", help="validate the config and show the accounts it would poll")
    commands.add_parser("plugins", help="list the plugins found, where they come from, where they are enabled")
    retry = commands.add_parser("retry", help="let rejected messages be tried again on the next poll")
    retry.add_argument("account", metavar="ACCOUNT")
    retry.add_argument("uids", nargs="*", metavar="UID", help="only these messages (default: all rejected)")
    auth = commands.add_parser("auth", help="authorize an OAuth2 account once and store its refresh token")
    auth.add_argument("account", metavar="ACCOUNT")
    auth.add_argument("--flow", choices=["auto", "device", "loopback"], default="auto",
                      help="device code flow, loopback redirect flow, or whichever the provider supports")
    auth.add_argument("--no-browser", action="store_true", help="print the address instead of opening a browser")
    demo = commands.add_parser("demo", help="fetch sample mail from a built-in POP3 server into a Maildir")
    demo.add_argument("--maildir", metavar="DIR", help="where to deliver (default: a new temporary directory)")
    demo.add_argument("--messages", type=int, default=None, metavar="N", help="how many extra generated messages")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        if args.command == "demo":
            from postbote.demo import run_demo

            return run_demo(maildir=args.maildir, extra_messages=args.messages, log_format=args.log_format or "auto",
                            log_level=args.log_level or "info")
        status = _dispatch(args)
        sys.stdout.flush()  # a closed pipe is noticed here, inside the handlers below, not at interpreter exit
        return status
    except ConfigError as exc:
        _print_error(exc)
        return EXIT_USAGE
    except PostboteError as exc:
        _print_error(exc)
        return EXIT_FAILED
    except BrokenPipeError:
        _discard_stdout()
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def _discard_stdout() -> None:
    """The reader of our output went away (``postbote plugins | head -1``): say nothing more, and point stdout at
    /dev/null so that Python's own flush at exit does not report the broken pipe with a traceback either."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is no real file (a test's capture): nothing is flushed at exit anyway
        pass


def _print_error(exc: PostboteError, out: TextIO | None = None) -> None:
    for line in _redacted(str(exc)).splitlines():
        print(f"postbote: error: {line}", file=out or sys.stderr)


def _redacted(text: str) -> str:
    """``text`` without any secret postbote knows of: an error message may quote what a server or a command said."""
    from postbote.credentials import redact  # imported on the error path only: start-up stays lean

    return redact(text)


def load_setup(args: argparse.Namespace) -> tuple[PluginManager, Config]:
    """A fresh plugin manager and the config loaded with it: at start-up, and again on every SIGHUP reload."""
    from postbote.config import find_config, load_config
    from postbote.pluginmanager import make_plugin_manager

    pm = make_plugin_manager()
    return pm, load_config(find_config(args.config), pm)


def apply_logging(args: argparse.Namespace, config: Config) -> None:
    from postbote.logconfig import configure_logging

    configure_logging(args.log_level or config.log.level, args.log_format or config.log.format)


def _dispatch(args: argparse.Namespace) -> int:
    pm, config = load_setup(args)
    apply_logging(args, config)
    if args.command == "check":
        return check(config)
    if args.command == "plugins":
        return list_plugins(pm, config)
    if args.command == "status":
        from postbote.status import show_status

        return show_status(config, as_json=args.json)
    if args.command == "retry":
        from postbote.state import StateStore

        store = StateStore(config.state_dir, busy_timeout=config.state_busy_timeout)
        try:
            return retry(config, store, args.account, args.uids)
        finally:
            store.close()
    if args.command == "auth":
        from postbote.authcli import run_auth
        from postbote.login import AuthSettings

        settings = AuthSettings.from_account(config.account(args.account), config.state_dir)
        return run_auth(settings, sys.stdout, flow=args.flow, open_browser=not args.no_browser)
    if args.command == "run":
        return run_daemon(args, pm, config)
    return poll_command(pm, config, args.accounts)


def run_daemon(args: argparse.Namespace, pm: PluginManager, config: Config) -> int:
    from postbote.scheduler import Daemon
    from postbote.sdnotify import Notifier
    from postbote.state import StateLock, StateStore

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


def poll_command(pm: PluginManager, config: Config, names: Sequence[str]) -> int:
    """Poll once; when a daemon holds the state directory, ask it to poll now instead of failing."""
    from postbote.state import StateLock, StateStore, read_lock_holder

    config.select(tuple(names))
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
            with configured(pm, config), progress_shown(pm):
                return poll(pm, config, store, names)
        finally:
            store.close()
    finally:
        lock.release()


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
    print(f"postbote: the daemon (pid {pid}) is running: asked it to poll now{note}; "
          f"see `postbote status` or its log for the outcome", file=out or sys.stdout)
    return EXIT_OK


@contextmanager
def progress_shown(pm: PluginManager) -> Iterator[str | None]:
    """Per-account progress (messages and bytes) on stderr when it is a terminal; yields the observer's name."""
    if not sys.stderr.isatty():
        yield None
        return
    from postbote.plugins.progress import ProgressDisplay

    display = ProgressDisplay(sys.stderr)
    pm.register(display, name="postbote.progress")
    try:
        yield "postbote.progress"
    finally:
        display.close()
        pm.unregister(display)


@contextmanager
def configured(pm: pluggy.PluginManager, config: Config) -> Iterator[None]:
    """Plugins started as ``poll`` and ``run`` both start them (`postbote.jobs.plugins_started`)."""
    from postbote.jobs import plugins_started

    with plugins_started(pm, config):
        yield


def poll(pm: pluggy.PluginManager, config: Config, store: StateStore, names: Sequence[str]) -> int:
    """Poll ``names`` (all accounts when empty) once, up to ``max_parallel`` accounts at a time; the exit status
    says whether every listed message was taken care of (`postbote.jobs.exit_status`)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from postbote.jobs import exit_status, poll_guarded
    from postbote.poller import Poller

    accounts = config.select(tuple(names))
    stop = threading.Event()
    with stop_on_signals(stop):
        poller = Poller(pm, store, stop)
        with ThreadPoolExecutor(max_workers=max(1, min(config.max_parallel, len(accounts))),
                                thread_name_prefix="poll") as pool:
            results = list(pool.map(lambda account: None if stop.is_set() else poll_guarded(poller, account),
                                    accounts))
    return exit_status(results)


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


def check(config: Config, out: TextIO | None = None) -> int:
    from postbote.config import check_files

    out = out or sys.stdout
    check_files(config)
    print(f"config {config.path}: OK, {len(config.accounts)} account(s); state in {config.state_dir}", file=out)
    for account in config.accounts:
        tls = {"implicit": "TLS", "starttls": "STARTTLS", "none": "no TLS"}[account.tls]
        if account.tls != "none" and not account.tls_verify:
            tls += ", certificate NOT verified"
        print(f"  {account.name}: {account.username}@{account.host}:{account.port} ({tls}, auth {account.auth}, "
              f"{account.describe_credentials()})", file=out)
        print(f"    every {account.poll_interval:g} s; {'keep' if account.keep else 'delete'} after delivery; "
              f"{'all messages' if account.fetch_all else 'new messages only'}", file=out)
        for destination in account.destinations:
            print(f"    -> {destination.label}", file=out)
    return EXIT_OK


def list_plugins(pm: PluginManager, config: Config, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    pm.load_all_builtins()  # the optional ones no account enables are listed too, with their hooks
    for name, source in sorted(pm.sources.items(), key=lambda item: (item[1].origin != "built-in", item[0])):
        users = [a.name for a in config.accounts if a.uses(name)]
        if source.essential:
            enabled = "always"
        elif len(users) == len(config.accounts) and users:
            enabled = "all accounts"
        else:
            enabled = ", ".join(users) if users else "off"
        print(f"{name}  [{source.origin}: {source.where}]", file=out)
        print(f"    enabled: {enabled}", file=out)
        print(f"    hooks: {', '.join(pm.hooks_of(name)) or '-'}", file=out)
    return EXIT_OK


def retry(config: Config, store: StateStore, account_name: str, uids: Sequence[str]) -> int:
    account = config.account(account_name)
    cleared = store.clear_rejected(account.name, uids)
    missing = sorted(set(uids) - set(cleared))
    print(f"{account.name}: {len(cleared)} rejected message(s) will be tried again on the next poll")
    if missing:
        print(f"{account.name}: not rejected (nothing to retry): {' '.join(missing)}", file=sys.stderr)
    return EXIT_OK

