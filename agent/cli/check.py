"""``postbote check``: validate the config (and the files it names) and show the accounts it would poll."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, TextIO

from postbote.cli.startup import set_up
from postbote.jobs import ExitStatus

if TYPE_CHECKING:
    from postbote.config import Config


def run(args: argparse.Namespace) -> int:
    _pm, config = set_up(args)
    return check(config)


def check(config: Config, out: TextIO | None = None) -> int:
    from postbote.config import check_files
    from postbote.status import human_duration

    out = out or sys.stdout
    check_files(config)
    print(f"config {config.path}: OK, {len(config.accounts)} account(s); state in {config.state_dir}", file=out)
    for account in config.accounts:
        describe = getattr(account.source, "describe", None)  # POP3: TLS, auth and where the secret comes from
        print(f"  {account.name}: {account.source.server}{f' ({describe()})' if describe else ''}", file=out)
        after = getattr(account.source, "after_delivery", None) or ("keep" if account.keep else "delete")
        print(f"    every {human_duration(account.poll_interval)}; {after} after delivery; "
              f"{'all messages' if account.fetch_all else 'new messages only'}", file=out)
        for destination in account.destinations:
            print(f"    -> {destination.label}", file=out)
    return ExitStatus.OK
