"""The POP3 source: ``protocol: pop3`` (the default). Connects with the account's TLS policy, reads CAPA, upgrades
with STLS when ``tls: starttls`` (never skipped), logs in, and serves the mailbox through `POP3Mailbox`."""

from __future__ import annotations

import structlog
from postbote import Account, Poll, TLSPolicy, hookimpl
from postbote.login import AuthSettings, login
from postbote.plugins.pop3.mailbox import POP3Mailbox
from postbote.pop3 import POP3Client

SOURCE_PROTOCOLS = ("pop3",)
log = structlog.get_logger("postbote.poll")


@hookimpl
def open_mailbox(account: Account, poll: Poll) -> POP3Mailbox | None:
    if account.protocol not in SOURCE_PROTOCOLS:
        return None
    tls = TLSPolicy(verify=account.tls_verify, fingerprint=account.tls_fingerprint,
                    ca_file=str(account.tls_ca_file) if account.tls_ca_file else None)
    client = POP3Client.connect(account.host, account.port, implicit_tls=account.tls == "implicit", tls=tls,
                                timeout=account.timeout, deadline=poll.deadline)
    try:
        client.capa()
        if account.tls == "starttls":
            client.starttls(tls)
        login(client, AuthSettings.from_account(account, poll.state_dir), log)
    except BaseException:
        client.close()
        raise
    return POP3Mailbox(client, max_size=account.max_size)
