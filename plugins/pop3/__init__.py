"""The POP3 source: ``protocol: pop3`` (the default). Reads the account's POP3 keys (`settings`), connects with the
account's TLS policy, reads CAPA, upgrades with STLS when ``tls: starttls`` (never skipped), logs in (`login`), and
serves the mailbox through `POP3Mailbox`; ``postbote auth`` runs the account's one-time OAuth2 authorization."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from postbote import Account, Poll, Section, get_logger, hookimpl
from postbote.plugins.pop3.settings import POP3Settings, TLSMode, pop3_settings

if TYPE_CHECKING:
    from postbote import TLSPolicy
    from postbote.plugins.pop3.client import POP3Client
    from postbote.plugins.pop3.login import AuthSettings
    from postbote.plugins.pop3.mailbox import POP3Mailbox

SOURCE_PROTOCOLS = ("pop3",)
log = get_logger("postbote.poll")


@hookimpl
def parse_source(protocol: str, section: Section, base_dir: Path) -> POP3Settings | None:
    if protocol not in SOURCE_PROTOCOLS:
        return None
    return pop3_settings(section, base_dir)


@hookimpl
def open_mailbox(account: Account, poll: Poll) -> POP3Mailbox | None:
    if account.protocol not in SOURCE_PROTOCOLS:
        return None
    TLSPolicy, POP3Client, AuthSettings, login, POP3Mailbox = _session_code()  # noqa: N806 - classes, as imported
    source: POP3Settings = account.source
    tls = TLSPolicy(verify=source.tls_verify, fingerprint=source.tls_fingerprint,
                    ca_file=str(source.tls_ca_file) if source.tls_ca_file else None)
    client = POP3Client.connect(source.host, source.port, implicit_tls=source.tls is TLSMode.IMPLICIT, tls=tls,
                                timeout=account.timeout, deadline=poll.deadline)
    try:
        client.capa()
        if source.tls is TLSMode.STARTTLS:
            client.starttls(tls)
        mechanism = login(client, AuthSettings.from_account(account, poll.state_dir), log)
    except BaseException:
        client.close()
        raise
    return POP3Mailbox(client, max_size=account.max_size, mechanism=mechanism, keep=account.keep)


@functools.cache
def _session_code() -> tuple[type[TLSPolicy], type[POP3Client], type[AuthSettings], Callable[..., str],
                             type[POP3Mailbox]]:
    """The client, TLS and login code, loaded by the first poll (and then at hand): `check`, `status` and `plugins`
    need none of it."""
    from postbote import TLSPolicy
    from postbote.plugins.pop3.client import POP3Client
    from postbote.plugins.pop3.login import AuthSettings, login
    from postbote.plugins.pop3.mailbox import POP3Mailbox

    return TLSPolicy, POP3Client, AuthSettings, login, POP3Mailbox


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
