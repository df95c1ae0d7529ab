"""``postbote mark-seen ACCOUNT...``: log in, list, and record every message on the server now as delivered --
without fetching or deleting anything -- so that switching from another tool does not deliver old mail again.

For people who have no UID file to import (``postbote import-state``). Exit status 0 when every account was listed and
recorded, 1 when one could not be reached or logged in to, 2 for a usage or configuration error.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING, TextIO

from postbote.cli.startup import set_up
from postbote.jobs import ExitStatus

if TYPE_CHECKING:
    from postbote.config import Account, Config
    from postbote.pluginmanager import PluginManager
    from postbote.state import StateStore

REASON = "marked seen by postbote mark-seen (on the server before postbote took over)"


def run(args: argparse.Namespace) -> int:
    from postbote.jobs import plugins_started
    from postbote.state import StateLock, open_store

    pm, config = set_up(args)
    accounts = config.select(tuple(args.accounts))
    with StateLock(config.state_dir, role="poll"):
        store = open_store(config)
        try:
            with plugins_started(pm, config):
                return mark_seen(pm, config, store, accounts)
        finally:
            store.close()


def mark_seen(pm: PluginManager, config: Config, store: StateStore, accounts: tuple[Account, ...],
              out: TextIO | None = None, err: TextIO | None = None) -> int:
    from postbote.errors import PostboteError

    out, err = out or sys.stdout, err or sys.stderr
    status = ExitStatus.OK
    for account in accounts:
        try:
            listed, added, skipped = mark_account(pm, config, store, account)
        except PostboteError as exc:
            from postbote.credentials import redact

            print(f"{account.name}: failed: {redact(str(exc))}", file=err)
            status = ExitStatus.FAILED
            continue
        print(f"{account.name}: {listed} message(s) on the server, {added} newly recorded as delivered"
              + (f", {listed - added - skipped} known already" if listed - added - skipped else ""), file=out)
        if skipped:
            print(f"{account.name}: {skipped} message(s) with a UID the server lists twice left unrecorded", file=err)
        if added and not account.keep:
            print(f"{account.name}: note: keep is false, so the next poll deletes these {added} message(s) from the "
                  "server without fetching them (they count as delivered)", file=err)
    return status


def mark_account(pm: PluginManager, config: Config, store: StateStore, account: Account) -> tuple[int, int, int]:
    """Open the account's mailbox through its source plugin (``open_mailbox``), list it, record every UID as
    delivered, and end the session without deleting anything. Returns (listed, added, skipped as duplicated)."""
    from postbote.errors import AccountError, PostboteError
    from postbote.mailbox import Mailbox
    from postbote.poll import Poll

    hooks = pm.hooks_for(account)
    poll = Poll(account, state_dir=config.state_dir, deadline=time.monotonic() + 4 * account.timeout)
    try:
        mailbox: Mailbox | None = hooks.call("open_mailbox", passing=(PostboteError,), account=account, poll=poll)
        if mailbox is None:
            raise AccountError(f"no plugin reads mail over {account.protocol!r} (is its plugin installed?)")
        try:
            entries = list(mailbox.listing())
            counts = Counter(entry.uid for entry in entries)
            unique = [entry for entry in entries if counts[entry.uid] == 1]
            added = store.record_imported(account.name, [entry.uid for entry in unique], reason=REASON,
                                          sizes={entry.uid: entry.size for entry in unique})
            store.make_durable()
            mailbox.finish()  # nothing was asked to be deleted: a clean logout
        except BaseException:
            mailbox.abort()
            raise
    finally:
        poll.close()
    return len(entries), added, len(entries) - len(unique)
