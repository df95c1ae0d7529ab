"""The ``postbote`` command: the parser, and the dispatch to one module per command.

Exit status (`postbote.jobs.ExitStatus`): ``poll`` exits 0 only when every listed message was delivered, dropped by a
filter or left on purpose; 1 when some message was deferred or rejected in this poll, some account failed, or the
state directory is busy; 2 for a usage or configuration error (a plugin that cannot start included). ``postbote
poll`` while a daemon holds the state directory asks the daemon to poll (SIGUSR1) and exits 0; ``postbote status``
exits 1 when some account's last poll failed or some message waits on a server.

Start-up time matters (a timer may run ``postbote poll`` every minute): this module imports only what parsing the
command line needs, and the module of a command (`COMMAND_MODULES`) is imported only when that command runs, so
``--help`` loads no command, no plugin, no YAML and no logging. Errors meant for the admin are caught in one place,
`postbote.cli.boundary`, and printed as one line.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Sequence

from postbote import __version__
from postbote.cli.boundary import guarded

# The module under postbote.cli that runs each command; each has ``run(args: argparse.Namespace) -> int``.
COMMAND_MODULES = {
    "poll": "poll",
    "run": "run",
    "status": "status",
    "check": "check",
    "plugins": "plugins",
    "retry": "retry",
    "auth": "auth",
    "demo": "demo",
    "import": "import_config",
    "import-state": "import_state",
    "mark-seen": "mark_seen",
}


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
    imported = commands.add_parser(
        "import", help="print a postbote.yaml for the accounts of a .fetchmailrc or getmail rc files",
        description="Read a .fetchmailrc (default ~/.fetchmailrc) or getmail rc files and print a postbote.yaml for "
                    "their accounts; passwords go into 0600 files, never into the YAML. What cannot be taken over "
                    "is listed (YAML comments and stderr) with the reason. See docs/migration.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit status: 0 when the accounts were written, 2 when a file cannot be read or parsed (FILE:LINE)\n"
               "example: postbote import ~/.fetchmailrc -o ~/.config/postbote/postbote.yaml")
    imported.add_argument("files", nargs="*", metavar="FILE", help="the rc file(s) (default: ~/.fetchmailrc)")
    imported.add_argument("--from", dest="tool", choices=["fetchmail", "getmail"],
                          help="the tool that wrote the files (default: recognised by their content)")
    imported.add_argument("-o", "--output", metavar="FILE", help="write the YAML here (created, never overwritten) "
                                                                 "instead of on stdout")
    imported.add_argument("--secrets-dir", metavar="DIR", help="where the password files go (default: the output "
                                                               "file's directory, or the current one)")
    imported.add_argument("--include-skipped", action="store_true", help="import fetchmail's skip entries too")
    imported.add_argument("--netrc", metavar="FILE", help="where to look up passwords a .fetchmailrc lacks, as "
                                                          "fetchmail does (default: ~/.netrc, if there is one)")
    imported.add_argument("--local-user", metavar="NAME", help="fetchmail's local user for entries that name none "
                                                                "(default: the user running this)")
    state = commands.add_parser(
        "import-state", help="record the UIDs fetchmail, getmail or mpop delivered, so they are not delivered again",
        description="Read fetchmail's .fetchids, getmail's oldmail-* or mpop's UIDL file and record the UIDs of "
                    "ACCOUNT's login as delivered (before the first poll of an account with keep: true).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit status: 0 when the UIDs were recorded, 2 when a file cannot be read or holds no list for the "
               "account\nexample: postbote import-state work ~/.fetchids")
    state.add_argument("account", metavar="ACCOUNT")
    state.add_argument("files", nargs="+", metavar="FILE")
    state.add_argument("--from", dest="tool", choices=["fetchmail", "getmail", "mpop"],
                       help="the tool that wrote the files (default: recognised by name and content)")
    state.add_argument("--user", metavar="USER@HOST", help="the UID list to take from a file holding several "
                                                          "(default: the account's username and host)")
    state.add_argument("--folder", metavar="FOLDER", help="the IMAP folder of a getmail oldmail file (default: from "
                                                          "its name)")
    seen = commands.add_parser(
        "mark-seen", help="record every message on the server now as delivered (nothing fetched or deleted)",
        description="Log in to each ACCOUNT, list its mailbox and record every message as delivered, without "
                    "fetching or deleting anything: switching from another tool then delivers no old mail. Exit "
                    "status 1 when an account cannot be reached.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit status: 0 when every account was listed and recorded, 1 when one could not be reached or "
               "logged in to, 2 for a usage or configuration error\nexample: postbote mark-seen work")
    seen.add_argument("accounts", nargs="+", metavar="ACCOUNT")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return guarded(lambda: command_runner(args.command)(args))


def command_runner(command: str) -> Callable[[argparse.Namespace], int]:
    """The ``run`` function of ``command``'s module, imported now: only the command that runs is ever loaded."""
    module = importlib.import_module(f"{__name__}.{COMMAND_MODULES[command]}")
    runner: Callable[[argparse.Namespace], int] = module.run
    return runner

