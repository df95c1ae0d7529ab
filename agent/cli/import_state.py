"""``postbote import-state ACCOUNT FILE...``: record the UIDs another tool delivered -- fetchmail's ``.fetchids``,
getmail's ``oldmail-*``, mpop's UIDL file -- as delivered for ACCOUNT, so that no poll delivers them again.

Only the UID list of ACCOUNT's login is taken from a file that holds several (matched by user and host; ``--user``
names another). Exit status 0 when the UIDs were recorded, 2 when a file cannot be read or matches nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from postbote.cli.startup import set_up
from postbote.jobs import ExitStatus

if TYPE_CHECKING:
    from postbote.config import Account, Config
    from postbote.migrate.uidfiles import UidList
    from postbote.state import StateStore


def run(args: argparse.Namespace) -> int:
    from postbote.state import open_store

    _pm, config = set_up(args)
    store = open_store(config)
    try:
        return import_state(config, store, args.account, args.files, tool=args.tool, folder=args.folder,
                            user=args.user)
    finally:
        store.close()


def import_state(config: Config, store: StateStore, account_name: str, files: list[str], *, tool: str | None = None,
                 folder: str | None = None, user: str | None = None, out: TextIO | None = None) -> int:
    from postbote.migrate.uidfiles import read_uid_file

    out = out or sys.stdout
    account = config.account(account_name)
    total = added = 0
    for name in files:
        path = Path(name).expanduser()
        lists = read_uid_file(path, tool, folder=folder or _getmail_folder(path, account))
        chosen = _choose(lists, account, path, user)
        _check_protocol(chosen, account, path)
        count = store.record_imported(account.name, chosen.uids,
                                      reason=f"imported from {chosen.tool} ({path.name}) by postbote import-state")
        total += len(chosen.uids)
        added += count
        print(f"{account.name}: {count} of {len(chosen.uids)} UID(s) from {chosen.tool}'s {path} "
              f"({chosen.label}) recorded as delivered"
              + (f"; {len(chosen.uids) - count} were known already" if count < len(chosen.uids) else ""), file=out)
    store.make_durable()
    if not account.keep:
        print(f"{account.name}: note: keep is false, so the next poll deletes from the server every listed message "
              "recorded here (they count as delivered)", file=sys.stderr)
    return ExitStatus.OK


def _getmail_folder(path: Path, account: Account) -> str | None:
    """The IMAP folder a getmail oldmail file is about, from its name (``oldmail-SERVER-PORT-USER-MAILBOX``, with
    ``/ : ; < > |`` in the mailbox turned into ``.``): the account's one folder that name fits, if any."""
    import re

    folders = [str(rule.name) for rule in getattr(account.source, "folders", ())]
    marker = "-" + re.sub(r"[/:;<>|]+", "-", _source(account, "username")) + "-"
    at = path.name.find(marker)
    if not path.name.startswith("oldmail-") or at < 0 or not folders:
        return None
    suffix = path.name[at + len(marker):]
    fitting = [folder for folder in folders if re.sub(r"[/:;<>|]+", ".", folder) == suffix]
    return fitting[0] if len(fitting) == 1 else None


def _source(account: Account, key: str) -> str:
    value: Any = getattr(account.source, key, "")
    return str(value or "")


def _choose(lists: list[UidList], account: Account, path: Path, user: str | None) -> UidList:
    from postbote.errors import ConfigError

    if user:
        wanted_user, _, wanted_host = user.rpartition("@")
        found = [item for item in lists if item.user.lower() == wanted_user.lower()
                 and (not wanted_host or item.host.lower() == wanted_host.lower())]
    else:
        username, host = _source(account, "username").lower(), _source(account, "host").lower()
        found = [item for item in lists if item.user.lower() == username and item.host.lower() == host]
        if not found:
            found = [item for item in lists if item.user.lower() == username]
        if not found and len(lists) == 1:
            found = lists
    if len(found) == 1:
        return found[0]
    held = ", ".join(item.label for item in lists) or "no UIDs at all"
    if not found:
        raise ConfigError(f"{path}: no UID list for account {account.name} ({_source(account, 'username')}@"
                          f"{_source(account, 'host')}); the file holds: {held}. Name one with --user USER@HOST")
    raise ConfigError(f"{path}: several UID lists match account {account.name}: {held}. Name one with --user "
                      "USER@HOST")


def _check_protocol(chosen: UidList, account: Account, path: Path) -> None:
    from postbote.errors import ConfigError

    imap_uids = any(";UIDVALIDITY=" in uid for uid in chosen.uids)
    if account.protocol == "imap" and chosen.uids and not imap_uids:
        raise ConfigError(f"{path}: these are POP3 UIDs, but account {account.name} reads IMAP: its messages have "
                          f"other UIDs. Use `postbote mark-seen {account.name}` instead")
    if account.protocol != "imap" and imap_uids:
        raise ConfigError(f"{path}: these are IMAP UIDs, but account {account.name} reads {account.protocol}")
