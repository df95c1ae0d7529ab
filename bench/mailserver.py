"""The POP3 server every tool fetches from: the test suite's private Dovecot, reused as it is.

``tests/servers/dovecot.py`` already starts a throw-away Dovecot 2.3 on loopback with its own users and
Maildirs (``mail_fsync = never``). This module adds what a benchmark needs around it: seeding a corpus,
emptying a mailbox, and letting Dovecot index new mail *before* the clock starts (otherwise the first
tool's login pays for scanning ``new/`` and it would not be the same for every tool).
"""

from __future__ import annotations

import os
import poplib
from collections.abc import Iterable

from bench.corpus import Corpus
from tests.servers.dovecot import DovecotServer

PASSWORD = "bench-secret"
# Raise the per-service limits above what the many-accounts mode opens at once.
EXTRA_CONFIG = """
default_process_limit = 300
default_client_limit = 2000
mail_max_userip_connections = 50
"""


class BenchMailServer:
    """A Dovecot with the single-account user ``u1`` and, on request, ``a001`` ... ``aNNN``."""

    def __init__(self, extra_users: int = 0) -> None:
        self.users = ["u1", *(account_user(i) for i in range(1, extra_users + 1))]
        self.dovecot = DovecotServer(tls=False, users={name: PASSWORD for name in self.users},
                                     extra_config=EXTRA_CONFIG)

    @property
    def host(self) -> str:
        return self.dovecot.host

    @property
    def port(self) -> int:
        return self.dovecot.pop3_port

    def start(self) -> None:
        self.dovecot.start()

    def stop(self) -> None:
        self.dovecot.stop()

    def clear(self, users: Iterable[str]) -> None:
        """Remove every message from these mailboxes (after a failed run, say)."""
        for user in users:
            for path in self.dovecot.message_files(user):
                path.unlink(missing_ok=True)

    def seed(self, user: str, corpus: Corpus) -> None:
        for message in corpus.messages:
            self.dovecot.deliver(user, message.data)

    def left(self, users: Iterable[str]) -> int:
        """Messages still on the server."""
        return sum(self.dovecot.count(user) for user in users)

    def warm(self, user: str, expected: int) -> None:
        """Log in once so that Dovecot indexes the new mail; check that it lists what was seeded."""
        client = poplib.POP3(self.host, self.port, timeout=120)
        try:
            client.user(user)
            client.pass_(PASSWORD)
            count, _ = client.stat()
            client.uidl()
            client.list()  # the sizes Dovecot computes (and caches) on first request
        finally:
            client.quit()
        if count != expected:
            raise RuntimeError(f"Dovecot lists {count} messages for {user}, {expected} were seeded")
        # The corpus just written (and the previous run's files just removed) would otherwise still be dirty in the
        # page cache when the clock starts, and whichever tool's sync came first would pay for writing them back.
        os.sync()


def account_user(index: int) -> str:
    return f"a{index:03d}"
