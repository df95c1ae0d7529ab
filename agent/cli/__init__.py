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
from typing import Any

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
    "manual": "manpage",
}


CONFIG_HELP = ("config file (default: $POSTBOTE_CONFIG, ./postbote.yaml, ~/.config/postbote/postbote.yaml, "
               "/etc/postbote/postbote.yaml)")


def _common_options(parser: argparse.ArgumentParser, default: object) -> None:
    """The options every command takes, before or after its name (``postbote -c f poll`` and ``postbote poll -c
    f``); after it they default to SUPPRESS, so they never undo what was given before it."""
    parser.add_argument("-c", "--config", metavar="FILE", default=default, help=CONFIG_HELP)
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=default,
                        help="override log.level")
    parser.add_argument("--log-format", choices=["auto", "console", "json"], default=default,
                        help="override log.format")
    parser.add_argument("-q", "--quiet", action="store_true", default=default if default is not None else False,
                        help="log warnings and errors only (as --log-level warning)")
    parser.add_argument("-v", "--trace", action="store_true", default=default if default is not None else False,
                        help="print every POP3, IMAP, SMTP and LMTP command and reply line to stderr (passwords, "
                             "tokens and AUTH data redacted, message data shown as its size)")


def _command(commands: Any, name: str, summary: str, *, exits: str, example: str,
             description: str = "") -> argparse.ArgumentParser:
    """A command's parser: its summary, what it does, its exit statuses and an example in ``--help``."""
    common = argparse.ArgumentParser(add_help=False)
    _common_options(common, argparse.SUPPRESS)
    parser: argparse.ArgumentParser = commands.add_parser(
        name, help=summary, description=description or summary[:1].upper() + summary[1:] + ".", parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=f"exit status: {exits}\nexample: {example}")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="postbote", description="Fetch mail from POP3 mailboxes and IMAP folders "
                                                                  "and redeliver it, without ever losing a message.")
    _common_options(parser, None)
    parser.add_argument("--version", action="version", version=f"postbote {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    poll = _command(commands, "poll", "poll the accounts once and exit",
                    exits="0 when every listed message was delivered, dropped by a filter or left on purpose; 1 when "
                          "a message was deferred or rejected or an account failed; 2 for a config error",
                    example="postbote -c ~/.config/postbote/postbote.yaml poll work --keep --limit 10",
                    description="Poll the accounts once (all, or those named) and exit. With a daemon running on the "
                                "same state directory, ask it to poll now instead.")
    poll.add_argument("accounts", nargs="*", metavar="ACCOUNT", help="only these accounts (default: all)")
    poll.add_argument("-k", "--keep", action="store_true", help="this time, leave every message on the server")
    poll.add_argument("-a", "--all", dest="fetch_all", action="store_true",
                      help="this time, fetch messages delivered before too (as fetch_all: true)")
    poll.add_argument("-l", "--limit", type=int, metavar="N", help="this time, fetch at most N messages per account")
    poll.add_argument("--max-size", metavar="SIZE", help="this time, leave messages larger than SIZE (e.g. 10MB)")
    poll.add_argument("-n", "--dry-run", action="store_true",
                      help="fetch the headers only, run the filters and print where each message would go (or which "
                           "filter drops it); nothing is delivered, deleted, flagged or recorded")
    _command(commands, "run", "run as a daemon, polling each account at its poll_interval",
             exits="0 after SIGTERM or SIGINT; 1 when the state directory is held by another postbote; 2 for a "
                   "config error", example="postbote -c /etc/postbote/postbote.yaml run")
    status = _command(commands, "status", "show each account's last poll, next poll and last error",
                      exits="0 when all is well; 1 when an account's last poll failed or mail waits on a server",
                      example="postbote status --json | jq '.accounts[] | select(.ok == false)'")
    status.add_argument("--json", action="store_true", help="print JSON instead of text")
    check = _command(commands, "check", "validate the config and show the accounts it would poll",
                     exits="0 when the config and the files it names are fine (and, with --connect, every account "
                           "logged in); 1 when an account could not be reached or logged in to; 2 for a config error "
                           "(FILE:LINE: key: what is wrong)",
                     example="postbote -c postbote.yaml check --connect work")
    check.add_argument("--connect", nargs="*", metavar="ACCOUNT",
                       help="also log in to these accounts (all when none is named) and show the capabilities, the "
                            "login, the certificate and what a poll would fetch; nothing is fetched or deleted")
    _command(commands, "plugins", "list the plugins found, where they come from, where they are enabled",
             exits="0; 2 for a config error", example="postbote plugins")
    retry = _command(commands, "retry", "let rejected messages be tried again on the next poll",
                     exits="0; 2 for an unknown account", example="postbote retry work 'INBOX;UIDVALIDITY=1;UID=42'")
    retry.add_argument("account", metavar="ACCOUNT")
    retry.add_argument("uids", nargs="*", metavar="UID", help="only these messages (default: all rejected)")
    auth = _command(commands, "auth", "authorize an OAuth2 account once and store its refresh token",
                    exits="0 when the refresh token is stored; 1 when the provider refused; 2 for an account "
                          "without oauth2", example="postbote auth gmail --flow loopback")
    auth.add_argument("account", metavar="ACCOUNT")
    auth.add_argument("--flow", choices=["auto", "device", "loopback"], default="auto",
                      help="device code flow, loopback redirect flow, or whichever the provider supports")
    auth.add_argument("--no-browser", action="store_true", help="print the address instead of opening a browser")
    auth.add_argument("--destination", metavar="KIND|LABEL",
                      help="authorize this destination of the account (e.g. imap) instead of its source")
    demo = _command(commands, "demo", "fetch sample mail from a built-in POP3 server into a Maildir",
                    exits="0 when the sample mail was delivered", example="postbote demo --maildir /tmp/demo")
    demo.add_argument("--maildir", metavar="DIR", help="where to deliver (default: a new temporary directory)")
    demo.add_argument("--messages", type=int, default=None, metavar="N", help="how many extra generated messages")
    imported = _command(
        commands, "import", "print a postbote.yaml for the accounts of a .fetchmailrc, getmail rc files or an .mpoprc",
        exits="0 when the accounts were written (notes or not); 2 when a file cannot be read or parsed (FILE:LINE: "
              "what)",
        example="postbote import ~/.fetchmailrc -o ~/.config/postbote/postbote.yaml",
        description="Read a .fetchmailrc (default ~/.fetchmailrc), getmail rc files or an .mpoprc and print a "
                    "postbote.yaml for "
                    "their accounts; passwords go into 0600 files, never into the YAML. What cannot be taken over "
                    "is listed (YAML comments and stderr) with the reason. See docs/migration.md.")
    imported.add_argument("files", nargs="*", metavar="FILE", help="the rc file(s) (default: ~/.fetchmailrc)")
    imported.add_argument("--from", dest="tool", choices=["fetchmail", "getmail", "mpop"],
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
    state = _command(
        commands, "import-state", "record the UIDs fetchmail, getmail or mpop delivered, so they are not delivered "
                                  "again",
        exits="0 when the UIDs were recorded; 2 when a file cannot be read or holds no list for the account",
        example="postbote import-state work ~/.fetchids",
        description="Read fetchmail's .fetchids, getmail's oldmail-* or mpop's UIDL file and record the UIDs of "
                    "ACCOUNT's login as delivered (before the first poll of an account with keep: true).")
    state.add_argument("account", metavar="ACCOUNT")
    state.add_argument("files", nargs="+", metavar="FILE")
    state.add_argument("--from", dest="tool", choices=["fetchmail", "getmail", "mpop"],
                       help="the tool that wrote the files (default: recognised by name and content)")
    state.add_argument("--user", metavar="USER@HOST", help="the UID list to take from a file holding several "
                                                          "(default: the account's username and host)")
    state.add_argument("--folder", metavar="FOLDER", help="the IMAP folder of a getmail oldmail file (default: from "
                                                          "its name)")
    seen = _command(
        commands, "mark-seen", "record every message on the server now as delivered (nothing fetched or deleted)",
        exits="0 when every account was listed and recorded; 1 when one could not be reached or logged in to; 2 "
              "for a config error",
        example="postbote mark-seen work",
        description="Log in to each ACCOUNT, list its mailbox and record every message as delivered, without "
                    "fetching or deleting anything: switching from another tool then delivers no old mail.")
    seen.add_argument("accounts", nargs="+", metavar="ACCOUNT")
    manual = _command(
        commands, "manual", "write the man pages postbote(1), postbote.yaml(5) and the bash, zsh and fish completions",
        exits="0 when they were written; 2 when the example config is missing",
        example="postbote manual -o ~/.local/share",
        description="Write man/man1/postbote.1, man/man5/postbote.yaml.5, bash-completion/completions/postbote, "
                    "zsh/site-functions/_postbote and fish/vendor_completions.d/postbote.fish under DIR (the layout "
                    "of /usr/share or ~/.local/share), from this parser and the annotated example config.")
    manual.add_argument("-o", "--output", metavar="DIR", required=True, help="where to write them")
    manual.add_argument("--example", metavar="FILE",
                        help="the annotated example config (default: the one postbote ships, examples/postbote.yaml "
                             "in a checkout)")
    manual.set_defaults(build_parser=build_parser)  # the command module may not import this one
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    if args.trace:
        from postbote.trace import enable

        enable()
    return guarded(lambda: command_runner(args.command)(args))


def run_command() -> int:
    """The ``postbote`` command (the console script, ``python -m postbote``): `main` in a process of its own, in
    which the imports postbote never uses are deferred (`postbote.cli.deferred`)."""
    from postbote.cli.deferred import defer_unused_imports

    defer_unused_imports()
    return main()


def command_runner(command: str) -> Callable[[argparse.Namespace], int]:
    """The ``run`` function of ``command``'s module, imported now: only the command that runs is ever loaded."""
    module = importlib.import_module(f"{__name__}.{COMMAND_MODULES[command]}")
    runner: Callable[[argparse.Namespace], int] = module.run
    return runner

