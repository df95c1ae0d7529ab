"""The IMAP source: ``protocol: imap``. Reads the account's IMAP keys (`settings`), connects with the account's TLS
policy, upgrades with STARTTLS when ``tls: starttls`` (never skipped), logs in (`login`), and serves the configured
folders through `IMAPMailbox`; ``postbote auth`` runs the account's one-time OAuth2 authorization.

The IMAP client (`client`) and the login are shared with the IMAP destination (``deliver: {imap: ...}``,
postbote.plugins.imap_append).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from postbote import Account, Poll, Section, hookimpl

if TYPE_CHECKING:
    from postbote.plugins.imap.idle import IMAPWatch
    from postbote.plugins.imap.mailbox import IMAPMailbox
    from postbote.plugins.imap.settings import IMAPSettings

SOURCE_PROTOCOLS: tuple[str, ...] = ("imap",)


@hookimpl
def parse_source(protocol: str, section: Section, base_dir: Path) -> IMAPSettings | None:
    if protocol not in SOURCE_PROTOCOLS:
        return None
    # Read only when an account is an IMAP one: every poll of a POP3 account imports this module too.
    from postbote.plugins.imap.settings import imap_settings

    return imap_settings(section, base_dir)


@hookimpl
def open_mailbox(account: Account, poll: Poll) -> IMAPMailbox | None:
    if account.protocol not in SOURCE_PROTOCOLS:
        return None
    # The client, TLS and login code are loaded by a poll only: `check`, `status` and `plugins` need none of it.
    from postbote.plugins.imap.login import open_session
    from postbote.plugins.imap.mailbox import IMAPMailbox

    source: IMAPSettings = account.source
    client = open_session(source, account=account.name, state_dir=poll.state_dir, timeout=account.timeout,
                          deadline=poll.deadline)
    try:
        return IMAPMailbox(client, source, max_size=account.max_size, state_dir=poll.state_dir,
                           account=account.name)
    except BaseException:
        client.close()
        raise


@hookimpl
def watch_mailbox(account: Account, state_dir: Path) -> list[IMAPWatch] | None:
    """IDLE for ``postbote run`` (`idle.open_watches`), unless the account says ``idle: false``."""
    if account.protocol not in SOURCE_PROTOCOLS:
        return None
    source: IMAPSettings = account.source
    if not source.idle:
        return []
    from postbote.plugins.imap.idle import open_watches

    return open_watches(account, state_dir)


@hookimpl
def authorize(account: Account, state_dir: Path, out: TextIO, flow: str, open_browser: bool,
              destination: str | None) -> int | None:
    if account.protocol not in SOURCE_PROTOCOLS or destination is not None:
        return None
    from postbote.plugins.signin.authorize import run_auth  # HTTP and a browser: only for `postbote auth`
    from postbote.plugins.signin.login import AuthSettings

    settings = AuthSettings.from_account(account, state_dir)
    return run_auth(settings.oauth2, out, account=account.name, cache_dir=settings.cache_dir, flow=flow,
                    open_browser=open_browser)
