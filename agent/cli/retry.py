"""``postbote retry ACCOUNT [UID...]``: let rejected messages be tried again on the next poll."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from postbote.cli.startup import set_up
from postbote.jobs import ExitStatus

if TYPE_CHECKING:
    from postbote.config import Config
    from postbote.state import StateStore


def run(args: argparse.Namespace) -> int:
    from postbote.state import open_store

    _pm, config = set_up(args)
    store = open_store(config)
    try:
        return retry(config, store, args.account, args.uids)
    finally:
        store.close()


def retry(config: Config, store: StateStore, account_name: str, uids: Sequence[str]) -> int:
    account = config.account(account_name)
    cleared = store.clear_rejected(account.name, uids)
    missing = sorted(set(uids) - set(cleared))
    print(f"{account.name}: {len(cleared)} rejected message(s) will be tried again on the next poll")
    if missing:
        print(f"{account.name}: not rejected (nothing to retry): {' '.join(missing)}", file=sys.stderr)
    return ExitStatus.OK
