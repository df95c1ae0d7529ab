"""IMAP IDLE (RFC 2177) for ``postbote run``: one connection per watched folder, waiting for the server's EXISTS.

`open_watches` is what the ``watch_mailbox`` hook returns: for an account with ``idle: true`` (the default) on a
server that offers IDLE, a logged-in session per folder (patterns resolved with LIST), each SELECTed (EXAMINE: a
watch never changes anything) and in IDLE. The daemon's one watcher thread waits on all of them; when a watch reads
an EXISTS it reports new mail and the account is polled at once. Each IDLE is renewed (DONE, IDLE) after
`RENEW_AFTER`, well before the 30 minutes after which RFC 2177 lets a server drop an idle client.

Mail that arrives between a poll's listing and the watch's IDLE would wait for the next poll: so each poll notes
the folder's UIDNEXT (`postbote.plugins.imap.mailbox.note_uidnext`), and a watch that finds a larger one when it
opens reports new mail at once.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

from postbote import AccountError, get_logger

if TYPE_CHECKING:
    from pathlib import Path

    from postbote import Account
    from postbote.plugins.imap.client import IMAPClient
    from postbote.plugins.imap.settings import IMAPSettings

log = get_logger("postbote.imap")
RENEW_AFTER = 25 * 60.0  # seconds: RFC 2177 servers may log an idle client out after 30 minutes
CLOSE_WITHIN = 2.0  # seconds a closing watch gets for DONE and LOGOUT before the socket is just closed

class IMAPWatch:
    """One folder in IDLE on its own connection (a `postbote.Watch`)."""

    def __init__(self, client: IMAPClient, folder: str, *, news: bool = False,
                 renew_after: float = RENEW_AFTER) -> None:
        self.name = folder
        self.client = client
        self._news = news  # mail arrived before IDLE began: reported at the first look
        self._renew_after = renew_after
        self._renew_at = time.monotonic() + renew_after
        self.client.deadline = None  # a watch lives for hours; every single wait is still bounded by `timeout`
        self.client.idle_start()

    def fileno(self) -> int:
        return self.client.fileno()

    def readable(self) -> bool:
        return self.client.idle_read()

    def refresh_at(self) -> float:
        return time.monotonic() if self._news else self._renew_at

    def refresh(self) -> bool:
        news, self._news = self._news, False
        self.client.idle_done()
        self.client.idle_start()
        self._renew_at = time.monotonic() + self._renew_after
        return news

    def close(self) -> None:
        self.client.deadline = time.monotonic() + CLOSE_WITHIN
        try:
            with contextlib.suppress(Exception):
                self.client.idle_done()
                self.client.logout()
        finally:
            self.client.close()


def open_watches(account: Account, state_dir: Path | None) -> list[IMAPWatch]:
    """A watch per folder of ``account`` (see the module docstring); [] when the server offers no IDLE."""
    from postbote.plugins.imap.login import open_session
    from postbote.plugins.imap.mailbox import resolve_folders

    source: IMAPSettings = account.source
    first = open_session(source, account=account.name, state_dir=state_dir, timeout=account.timeout, deadline=None)
    watches: list[IMAPWatch] = []
    try:
        if not first.has("IDLE"):
            log.info("imap.idle_unavailable", account=account.name, server=source.host,
                     effect="polled at its poll_interval")
            first.logout()
            return []
        folders = [folder for folder, _ in resolve_folders(first, source)]
        for number, folder in enumerate(folders):
            client = first if number == 0 else open_session(source, account=account.name, state_dir=state_dir,
                                                            timeout=account.timeout, deadline=None)
            watches.append(_watch(client, account.name, folder))
    except BaseException:
        first.close()
        for watch in watches:
            watch.close()
        raise
    if not watches:
        first.logout()
    return watches


def _watch(client: IMAPClient, account: str, folder: str) -> IMAPWatch:
    from postbote.plugins.imap.client import IMAPError
    from postbote.plugins.imap.mailbox import uidnext_seen

    try:
        selected = client.select(folder, read_only=True)
    except IMAPError as exc:
        client.close()
        raise AccountError(f"cannot watch folder {folder!r}: {exc}") from None
    seen = uidnext_seen(account, folder)
    news = seen is not None and selected.uidnext is not None and selected.uidnext > seen
    return IMAPWatch(client, folder, news=news)
