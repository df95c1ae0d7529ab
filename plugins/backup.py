"""A copy of every message, written before it is delivered: ``plugins: {backup: {maildir: ~/mail-backup}}``
(or ``{backup: {mbox: ~/mail-backup.mbox}}``; exactly one of the two). An account's own ``plugins: {backup: …}``
is merged key by key over the global one, so an account switching from a global ``mbox`` to a ``maildir`` writes
``{maildir: PATH, mbox: null}``.

Optional: it runs only for the accounts where the config's ``plugins:`` enables it (globally or per account). The
copy is the message as the destinations get it, after the filters, trace header included; it is written with the
Maildir and mbox writers of the delivery plugins, so it is as durable (fsynced) and as exact as a delivery. When
the copy cannot be made the hook raises: the message is then not delivered and stays on the server for the next
poll, so nothing is ever delivered without its backup.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from postbote import Account, Message, Node, Problems, Section, hookimpl, path_relative_to
from postbote.plugins.maildir import write_maildir
from postbote.plugins.mbox import append_to_mbox

NAME = "backup"
FORMATS = ("maildir", "mbox")


@dataclass(frozen=True)
class BackupSettings:
    format: str
    path: Path


@hookimpl
def parse_plugin_options(name: str, options: Node, problems: Problems, base_dir: Path) -> BackupSettings | None:
    if name != NAME:
        return None
    section = Section(options, problems)
    present = [fmt for fmt in FORMATS if (node := section.raw(fmt)) is not None and node.value is not None]
    section.finish(set(FORMATS))
    if len(present) != 1:
        found = ", ".join(present) or "none"
        hint = "; to change the kind for one account, set the other one to null there" if len(present) > 1 else ""
        section.problem(f"give exactly one of {', '.join(FORMATS)}: where the backup goes (found {found}{hint})")
        return None
    path = section.get(present[0], path_relative_to(base_dir), required=True)
    return BackupSettings(present[0], path) if path else None


@hookimpl
def backup_message(message: Message, account: Account) -> None:
    settings: BackupSettings | None = account.options_for(NAME)
    if settings is None:
        raise RuntimeError(f"account {account.name!r} enables the backup plugin without a place for the backup")
    if settings.format == "maildir":
        write_maildir(settings.path, message)
    else:
        append_to_mbox(settings.path, message)
