"""``postbote check``: validate the config (and the files it names) and show the accounts it would poll; with
``--connect``, also log in to each account and show what a poll would find, without fetching or deleting anything."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, TextIO

from postbote.cli.startup import set_up
from postbote.jobs import ExitStatus

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from postbote.config import Account, Config
    from postbote.mailbox import MailboxEntry
    from postbote.pluginmanager import PluginManager
    from postbote.state import Record


def run(args: argparse.Namespace) -> int:
    pm, config = set_up(args)
    status = check(config)
    if getattr(args, "connect", None) is not None:
        status = max(status, connect(pm, config, args.connect))
    return status


def check(config: Config, out: TextIO | None = None) -> int:
    from postbote.config import check_files
    from postbote.status import human_duration

    out = out or sys.stdout
    check_files(config)
    where = f"{config.state} (shared; this machine's plugin tables in {config.state_dir})" if config.state \
        else str(config.state_dir)
    lines = [f"config {config.path}: OK, {len(config.accounts)} account(s); state in {where}"]
    durations: dict[float, str] = {}  # a provider's 100,000 accounts share a few intervals
    for account in config.accounts:
        describe = getattr(account.source, "describe", None)  # POP3: TLS, auth and where the secret comes from
        lines.append(f"  {account.name}: {account.source.server}{f' ({describe()})' if describe else ''}")
        after = getattr(account.source, "after_delivery", None) or ("keep" if account.keep else "delete")
        every = durations.get(account.poll_interval) or durations.setdefault(account.poll_interval,
                                                                              human_duration(account.poll_interval))
        lines.append(f"    every {every}; {after} after delivery; "
                     f"{'all messages' if account.fetch_all else 'new messages only'}")
        lines.extend(f"    -> {destination.label}" for destination in account.destinations)
    out.write("\n".join(lines) + "\n")  # one write: 300,000 prints took a second at 100,000 accounts
    return ExitStatus.OK


def connect(pm: PluginManager, config: Config, names: list[str], out: TextIO | None = None) -> int:
    """Log in to each account (all, or ``names``), list its mailbox and say what a poll would fetch; the session
    ends without deleting anything (and nothing is recorded). 1 when an account cannot be reached or logged in."""
    out = out or sys.stdout
    failed = False
    for account in config.select(tuple(names)):
        print(f"{account.name}: connecting to {account.source.server}", file=out)
        try:
            lines = _connected(pm, config, account)
        except Exception as exc:  # noqa: BLE001 - every failure is this account's answer, shown as one line
            from postbote.credentials import redact

            failed = True
            print(f"    FAILED: {redact(str(exc))}", file=out)
            continue
        for line in lines:
            print(f"    {line}", file=out)
    return ExitStatus.FAILED if failed else ExitStatus.OK


def _connected(pm: PluginManager, config: Config, account: Account) -> list[str]:
    import time

    from postbote.errors import AccountError, PostboteError
    from postbote.poll import Poll
    from postbote.state import open_store, store_exists

    poll = Poll(account, state_dir=config.state_dir, deadline=time.monotonic() + 4 * account.timeout)
    try:
        mailbox = pm.hooks_for(account).call("open_mailbox", passing=(PostboteError,), account=account, poll=poll)
        if mailbox is None:
            raise AccountError(f"no plugin reads mail over {account.protocol!r}")
        try:
            entries = mailbox.listing()
            facts = mailbox.facts() if hasattr(mailbox, "facts") else {}
        finally:
            mailbox.abort()  # no QUIT or EXPUNGE: nothing can be deleted
    finally:
        poll.close()
    records: dict[str, Record] = {}
    if store_exists(config):
        store = open_store(config, readonly=True)
        try:
            records = dict(store.records(account.name))
        finally:
            store.close()
    new = [entry for entry in entries if not ((record := records.get(entry.uid)) and record.handled)]
    lines = [f"logged in ({facts['login']})" if facts.get("login") else "logged in"]
    if facts.get("capabilities"):
        lines.append(f"capabilities: {facts['capabilities']}")
    tls = facts.get("tls") or {}
    if tls:
        lines.append(f"TLS {tls.get('version', '?')}; certificate: " + "; ".join(
            f"{key} {tls[key]}" for key in ("subject", "names", "issuer", "expires") if key in tls))
        if "sha256" in tls:
            lines.append(f"tls_fingerprint: {tls['sha256']}")
    size = sum(entry.size for entry in entries)
    lines.append(f"{len(entries)} message(s), {size} octets on the server; "
                 f"{len(new)} not delivered yet{_fetch_note(account, entries, records, new)}")
    return lines


def _fetch_note(account: Account, entries: Sequence[MailboxEntry], records: Mapping[str, Record],
                new: Sequence[MailboxEntry]) -> str:
    """How many of the listed messages a poll would fetch, decided as `postbote poll --dry-run` decides it (so
    max_size, fetch_all, earlier rejections and max_messages count), and why the others would not be."""
    import time

    from postbote.dry_run import LEFT_OVERSIZED, LEFT_REJECTED, Fate, planned_without_fetching

    now = time.time()
    to_fetch: list[MailboxEntry] = []
    oversized = rejected = 0
    for entry in entries:
        planned = planned_without_fetching(account, entry, records.get(entry.uid), now)
        if planned is None:
            to_fetch.append(entry)
        elif planned[0] is Fate.LEAVE:
            rejected += planned[1].startswith(LEFT_REJECTED)
            oversized += planned[1].startswith(LEFT_OVERSIZED)
    limit = account.max_messages if account.max_messages is not None else len(to_fetch)
    fetched = to_fetch[:limit]
    if [entry.uid for entry in fetched] == [entry.uid for entry in new]:
        return " (a poll would fetch them)" if new else ""
    new_uids = {entry.uid for entry in new}
    again = sum(1 for entry in fetched if entry.uid not in new_uids)
    reasons = [f"{oversized} larger than max_size, left on the server" if oversized else "",
               f"{rejected} rejected before, until `postbote retry`" if rejected else "",
               f"{len(to_fetch) - len(fetched)} left for a later poll by max_messages"
               if len(fetched) < len(to_fetch) else "",
               f"{again} delivered before, fetched again"
               + (": fetch_all" if account.fetch_all else " (another message under the same UID now)") if again else ""]
    why = "; ".join(reason for reason in reasons if reason)
    return f" (a poll would fetch {len(fetched)}{': ' + why if why else ''})"
