"""A mail source in thirty lines: take the files another program drops into a directory as the mailbox.

    accounts:
      - {name: scanner, protocol: spooldir, directory: /var/spool/scans, deliver: {maildir: ~/Maildir}}

Each file is a message (its name is the UID); a delivered file is removed when the poll finishes.
"""

import os
from pathlib import Path

from postbote import MailboxEntry, Message, hookimpl, path_relative_to


class SpoolSettings:
    def __init__(self, directory: Path) -> None:
        self.directory, self.server, self.files = directory, str(directory), {}


class SpoolDirectory:
    deadline = None

    def __init__(self, directory: Path) -> None:
        self.directory, self.asked = directory, []

    def listing(self):
        return [MailboxEntry(p.name, p.stat().st_size, p) for p in sorted(self.directory.iterdir()) if p.is_file()]

    def headers(self, entry):
        return entry.ref.read_bytes().split(b"\n\n", 1)[0]

    def fetch(self, entries, *, stop):
        for entry in entries:
            if stop():
                return
            yield entry, Message.from_bytes(entry.ref.read_bytes(), uid=entry.uid)

    def delete(self, entry):
        self.asked.append(entry)

    def finish(self):
        for entry in self.asked:
            os.unlink(entry.ref)
        return self.asked

    def abort(self):
        self.asked = []


SOURCE_PROTOCOLS = ("spooldir",)


@hookimpl
def parse_source(protocol, section, base_dir):
    if protocol == "spooldir":
        return SpoolSettings(section.get("directory", path_relative_to(base_dir), required=True))


@hookimpl
def open_mailbox(account, poll):
    if account.protocol == "spooldir":
        return SpoolDirectory(account.source.directory)
