"""Import into a Gmail mailbox with the Gmail API: ``deliver: {gmail: {...}}`` (issue 14).

What Gmail's "Check mail from other accounts" did, done from here: each message goes into the mailbox by
``users.messages.import``, which runs Gmail's usual delivery scanning and classification (spam filter, categories)
as if the message had come by SMTP, without forwarding it (forwarded mail fails SPF/DMARC alignment). The bytes go
as fetched, our ``Received:`` trace field on top; nothing is converted.

Options (`postbote.plugins.gmail.settings`), with what they mean to the API:

- ``oauth2:`` (as for a source: ``provider: google``, ``client_id``, ``client_secret_file``, ``refresh_token_file``;
  the scope defaults to ``gmail.insert gmail.labels``: import and labels, never reading or deleting mail) or
  ``token_command``; ``postbote auth ACCOUNT --destination gmail`` stores the refresh token, and the access token is
  cached as ``STATE_DIR/oauth2/ACCOUNT.gmail-USER.json``, apart from the source's;
- ``user`` (``me``): the API's ``userId``; an address for a Workspace service account acting for a user;
- ``labels`` (``[INBOX, UNREAD]``): the message's ``labelIds``: system labels by their id (INBOX, UNREAD, STARRED,
  IMPORTANT, CATEGORY_*), user labels by name, looked up once per poll (``users.labels.list``) and created on first
  use (``users.labels.create``) unless ``create_labels: false``; without INBOX the message is archived;
- ``internal_date_source`` (``date_header``): the API's ``internalDateSource`` (``dateHeader``: the Date: field, so
  mail sorts by when it was sent; ``received_time``: when Gmail took it);
- ``never_mark_spam`` (false): ``neverMarkSpam``: with true, Gmail's spam filter never sends it to Spam;
- ``process_for_calendar`` (false): ``processForCalendar``: invitations go into Google Calendar;
- ``rate_limit`` (4): imports a second, a token bucket per Gmail mailbox (an import costs 25 of Gmail's quota units;
  docs/gmail.md has Google's figures): a poll waits at most `MAX_PACE` for the next token, else defers the rest;
- ``timeout`` (60s): for each wait on the API; ``pipeline`` (true): see below;
- ``api_url``, ``tls_ca_file``: another endpoint and its CA (tests, a proxy).

What counts: a 200 with the new message's id is delivered, and the answer recorded with the message names the id.
A 429, a 5xx, or a 403 for a rate or quota limit is "not now": the message is deferred, and the mailbox is left
alone for as long as Gmail's Retry-After says (`DEFAULT_BACKOFF` without one): the rest of the poll is deferred at
once, and later polls make no request before that time -- of this process, and of the next ones: the time is kept in
``STATE_DIR/gmail/quiet-USER-KEY.json`` (written whole or not at all, mode 0600; read when the mailbox's limits are
first needed, ignored when unreadable or past), so a ``postbote poll`` a systemd timer starts every few minutes does
not ask again before it. The daily quota used up (a 403 ``dailyLimitExceeded``) leaves the mailbox alone until the
quota resets, at midnight US Pacific time (`next_quota_reset`). A 400 (or 413, 422) about the message is a
rejection like an SMTP 5xx, with Gmail's text; one about a label is deferred (the label may come back). A 401 gets
one fresh token and one more try, then the poll's remaining messages are deferred with "run: postbote auth ACCOUNT
--destination gmail", as for a refresh token that was revoked. A 403 for a missing scope, or any other 403 or 404,
defers the remaining messages with the fix in the reason. A connection that breaks after the whole message was
sent leaves the message "in doubt" (Gmail may have it: a retry may make a second copy, and a second such ending
holds the message for the admin); a resumable upload asks its session first, and is in doubt only when that fails.

The wire (`postbote.plugins.gmail.api`): one kept-alive HTTPS connection per poll and mailbox (``poll.resource``).
With ``pipeline: true`` the import runs on a worker thread and its answer is read later (`postbote.Pending`): Gmail
takes one message while the source sends the next. Never more than one: the poller keeps several answers
outstanding only for a destination whose ``find_delivered`` can later tell whether a cut-short delivery arrived, and
Gmail could tell only by searching the mailbox (``q=rfc822msgid:``), which needs the ``gmail.readonly`` scope
(reading all mail) that the narrow scopes keep out. So a crash costs at most one duplicate.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, TextIO, TypeVar

from postbote import (
    AccountError,
    CredentialError,
    Delivered,
    DeliveryError,
    Destination,
    Message,
    Node,
    Pending,
    Problems,
    TLSPolicy,
    get_logger,
    hookimpl,
)

if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor

    from postbote import Account, Poll
    from postbote.plugins.gmail.api import APIError, GmailAPI, Response
    from postbote.plugins.gmail.settings import GmailSettings

DESTINATION_KINDS = ("gmail",)
MAX_PACE = 2.0  # the longest wait for the rate limit's next token; longer, and the rest of the poll is deferred
DEFAULT_BACKOFF = 60.0  # how long a mailbox is left alone after a 429, 5xx or rate 403 that names no Retry-After
RATE_REASONS = frozenset({"rateLimitExceeded", "userRateLimitExceeded", "dailyLimitExceeded", "quotaExceeded",
                          "RESOURCE_EXHAUSTED", "backendError"})
DAILY_REASONS = frozenset({"dailyLimitExceeded"})  # the day's quota is used up: no use asking before it resets
QUOTA_TIMEZONE = "America/Los_Angeles"  # Google's daily API quotas reset at midnight US Pacific time
QUOTA_RESET_MARGIN = 300.0  # asked a little after midnight: a clock a bit ahead would otherwise lose a whole day
FALLBACK_DAILY_BACKOFF = 3600.0  # without the time zone database: try again in an hour
MAX_QUIET = 26 * 3600.0  # a kept "quiet until" further away than this is not believed (a clock that jumped back)
QUIET_DIR = "gmail"  # STATE_DIR/gmail/: the plugin's own files
SCOPE_REASONS = frozenset({"insufficientPermissions", "ACCESS_TOKEN_SCOPE_INSUFFICIENT"})
REJECTING_STATUSES = frozenset({400, 413, 422})

log = get_logger("postbote.gmail")
T = TypeVar("T")
wall_clock: Callable[[], float] = time.time  # the "quiet until" times are kept across processes: wall-clock time


@hookimpl
def parse_destination(kind: str, options: Node, problems: Problems, base_dir: Path) -> GmailSettings | None:
    if kind not in DESTINATION_KINDS:
        return None
    # Read only when an account names a Gmail destination: every poll of every other account imports this module.
    from postbote.plugins.gmail.settings import parse_settings

    return parse_settings(options, problems, base_dir)


@hookimpl
def deliver_message(message: Message, destination: Destination, account: Account,
                    poll: Poll) -> Delivered | Pending | None:
    if destination.kind not in DESTINATION_KINDS:
        return None
    settings: GmailSettings = destination.settings
    session: ImportSession = poll.resource(("gmail", destination.label),
                                           lambda: ImportSession(settings, account, poll), close=ImportSession.close)
    return session.deliver(message)


@hookimpl(tryfirst=True)
def authorize(account: Account, state_dir: Path, out: TextIO, flow: str, open_browser: bool,
              destination: str | None) -> int | None:
    """``postbote auth ACCOUNT`` for an account whose Gmail destination has ``oauth2:`` while its source needs no
    authorization (an old POP3 account with a password into Gmail); ``postbote auth ACCOUNT --destination gmail``
    (or the destination's label) when the source needs one too."""
    targets = [d.settings for d in account.destinations
               if d.kind in DESTINATION_KINDS and d.settings.oauth2 is not None
               and destination in (None, d.kind, d.label)]
    source_needs_one = getattr(getattr(account.source, "credentials", None), "oauth2", None) is not None
    if not targets or (destination is None and source_needs_one):
        return None
    from postbote.plugins.signin.authorize import run_auth  # HTTP and a browser: only for `postbote auth`

    settings: GmailSettings = targets[0]
    return run_auth(settings.oauth2, out, account=token_cache_name(account, settings), cache_dir=state_dir / "oauth2",
                    flow=flow, open_browser=open_browser)


def token_cache_name(account: Account, settings: GmailSettings) -> str:
    """The name the destination's cached access token goes by (STATE_DIR/oauth2/NAME.json): never the source's."""
    return f"{account.name}.gmail-" + re.sub(r"[^\w.@+-]", "_", settings.user)


# ------------------------------------------------------------------ limits shared by the polls of a process


@dataclass
class TokenBucket:
    """``rate`` imports a second, at most ``rate`` (and at least one) saved up."""

    rate: float
    clock: Callable[[], float] = time.monotonic
    tokens: float = field(init=False)
    last: float = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = max(1.0, self.rate)
        self.last = self.clock()

    def reserve(self, longest: float) -> float:
        """Take a token and return how long to wait before using it (0: now); when that would be longer than
        ``longest``, take nothing and return the wait. Shared by the polls of a process, hence the lock."""
        with _LIMITS_LOCK:
            now = self.clock()
            self.tokens = min(max(1.0, self.rate), self.tokens + (now - self.last) * self.rate)
            self.last = now
            wait = 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate
            if wait <= longest:
                self.tokens -= 1  # may go below zero: the next one waits its turn after this one
            return wait


@dataclass
class MailboxLimits:
    """What a Gmail mailbox allows now: its rate limit, and after a "not now" the time (`wall_clock`) until which it
    is left alone, kept in ``quiet_file`` for the next process."""

    bucket: TokenBucket
    quiet_file: Path
    quiet_until: float = 0.0
    quiet_reason: str = ""

    def leave_alone(self, until: float, reason: str, label: str) -> float:
        """Leave the mailbox alone until ``until`` (or longer, if it already is); returns the time it now is, which
        is kept for the next process. Call with `_LIMITS_LOCK` held: the file then always holds the latest."""
        if until > self.quiet_until:
            self.quiet_until, self.quiet_reason = until, reason
            try:
                write_quiet(self.quiet_file, until, reason, label)
            except OSError as exc:  # this process still waits; only a later one may ask too early
                log.warning("gmail.quiet_not_kept", destination=label, file=str(self.quiet_file), error=str(exc))
        return self.quiet_until


_LIMITS: dict[tuple[str, str, str, str], MailboxLimits] = {}
_LIMITS_LOCK = threading.Lock()


def limits_for(settings: GmailSettings, state_dir: Path) -> MailboxLimits:
    """The limits of the destination's mailbox, shared by the polls of the process; on first use its "quiet until"
    is read from the state directory, where the previous process may have left it."""
    key = (str(state_dir), settings.api_url, settings.user, settings.label)
    with _LIMITS_LOCK:
        found = _LIMITS.get(key)
        if found is None:
            path = quiet_file(state_dir, settings)
            found = _LIMITS[key] = MailboxLimits(TokenBucket(settings.rate_limit), path)
            found.quiet_until, found.quiet_reason = read_quiet(path, wall_clock())
        elif found.bucket.rate != settings.rate_limit:  # a reloaded config with another rate_limit
            found.bucket = TokenBucket(settings.rate_limit)
        return found


def quiet_file(state_dir: Path, settings: GmailSettings) -> Path:
    """STATE_DIR/gmail/quiet-USER-KEY.json: one per mailbox as the destination names it (endpoint, user, token)."""
    key = hashlib.sha256("\0".join((settings.api_url, settings.user, settings.label)).encode()).hexdigest()[:16]
    user = re.sub(r"[^\w.@+-]", "_", settings.user)[:64]
    return state_dir / QUIET_DIR / f"quiet-{user}-{key}.json"


def write_quiet(path: Path, until: float, reason: str, label: str) -> None:
    """Keep "quiet until ``until``" in ``path``, replaced whole (a 0600 temporary file renamed over it, as the
    token caches are), so a reader finds the old time or the new one, never half of one."""
    from postbote.plugins.signin.oauth2 import write_secret_file

    write_secret_file(path, json.dumps({"quiet_until": until, "reason": reason, "destination": label,
                                        "until_utc": utc_text(until)}))


def read_quiet(path: Path, now: float) -> tuple[float, str]:
    """The kept "quiet until" time and its reason; (0, "") when there is none, it is past, or it cannot be read (a
    damaged file must not keep the mailbox from ever being asked again)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return 0.0, ""
    except (OSError, ValueError) as exc:
        log.warning("gmail.quiet_unreadable", file=str(path), error=str(exc))
        return 0.0, ""
    until = data.get("quiet_until") if isinstance(data, dict) else None
    if isinstance(until, bool) or not isinstance(until, int | float) or not math.isfinite(until) or until <= now:
        return 0.0, ""
    reason = data.get("reason")
    return min(float(until), now + MAX_QUIET), reason if isinstance(reason, str) and reason else "Gmail said not now"


def next_quota_reset(now: float) -> float:
    """When Gmail's daily quota is next reset (midnight US Pacific time, `QUOTA_RESET_MARGIN` after it), as a
    `wall_clock` time; without the time zone database, `FALLBACK_DAILY_BACKOFF` from ``now``."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        zone = ZoneInfo(QUOTA_TIMEZONE)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return now + FALLBACK_DAILY_BACKOFF
    today = datetime.fromtimestamp(now, zone).date()
    midnight = datetime(today.year, today.month, today.day, tzinfo=zone) + timedelta(days=1)
    return midnight.timestamp() + QUOTA_RESET_MARGIN


def utc_text(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(when))


# ------------------------------------------------------------------ the session


@dataclass
class ImportSession:
    """The destination's connection to the API for one poll, its label ids, and why it gave up (if it did)."""

    settings: GmailSettings
    account: Account
    poll: Poll
    api: GmailAPI | None = None
    failure: DeliveryError | None = None  # why the remaining messages of this poll are deferred
    label_ids: list[str] | None = None
    worker: ThreadPoolExecutor | None = None

    @property
    def where(self) -> str:
        return f"gmail {self.settings.label}"

    @property
    def auth_hint(self) -> str:
        return f"run: postbote auth {self.account.name} --destination gmail"

    def deliver(self, message: Message) -> Delivered | Pending:
        if self.failure is not None:
            raise self.failure
        self.check_limits()
        if not self.settings.pipeline:
            return Delivered(self.import_message(message))
        if self.worker is None:
            from concurrent.futures import ThreadPoolExecutor  # only a poll that imports into Gmail needs it

            self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gmail-import")
        future: Future[str] = self.worker.submit(self.import_message, message)
        return Pending(future.result)

    def close(self) -> None:
        if self.worker is not None:
            self.worker.shutdown(wait=True, cancel_futures=True)
            self.worker = None
        if self.api is not None:
            self.api.close()
            self.api = None

    # ---- before a message goes: limits, the connection, the labels

    def check_limits(self) -> None:
        limits = limits_for(self.settings, self.poll.state_dir)
        now = wall_clock()
        if now < limits.quiet_until:
            self.give_up(f"{limits.quiet_reason}; Gmail is left alone for another {limits.quiet_until - now:.0f} s "
                         f"(until {utc_text(limits.quiet_until)}), the remaining messages are tried on a later poll")
        wait = limits.bucket.reserve(MAX_PACE)
        if wait > MAX_PACE:
            self.give_up(f"the rate limit of {self.settings.rate_limit:g} imports a second (rate_limit) is reached; "
                         "the remaining messages are tried on the next poll")
        if wait > 0:
            time.sleep(wait)  # at most MAX_PACE: pacing within the limit, not a back-off

    def give_up(self, reason: str) -> None:
        """Defer this message and every later one of the poll with ``reason``."""
        self.failure = DeliveryError(f"{self.where}: {reason}", temporary=True)
        log.warning("gmail.deferred", destination=self.settings.label, reason=reason)
        raise self.failure

    def connection(self) -> GmailAPI:
        if self.api is None:
            from postbote.plugins.gmail.api import GmailAPI

            cache_dir = self.poll.state_dir / "oauth2"
            tls = TLSPolicy(ca_file=str(self.settings.tls_ca_file) if self.settings.tls_ca_file else None)
            self.api = GmailAPI(self.settings.api_url, self.settings.user,
                                self.settings.token_source(token_cache_name(self.account, self.settings), cache_dir),
                                tls, self.settings.timeout)
        return self.api

    def labels(self, api: GmailAPI) -> list[str]:
        """The label ids to give: system labels as they are, user labels looked up by name (once per poll) and
        created when missing and allowed; another client creating one first (a 409) is fine."""
        if self.label_ids is not None:
            return self.label_ids
        from postbote.plugins.gmail.settings import SYSTEM_LABELS

        wanted = self.settings.user_labels
        known = self.known_labels(api) if wanted else {}
        ids: list[str] = []
        for name in self.settings.labels:
            if name in SYSTEM_LABELS:
                ids.append(name)
            elif name.casefold() in known:
                ids.append(known[name.casefold()])
            else:
                ids.append(self.create_label(api, name))
        self.label_ids = ids
        return ids

    def known_labels(self, api: GmailAPI) -> dict[str, str]:
        return {str(label.get("name", "")).casefold(): str(label["id"]) for label in api.list_labels()
                if "id" in label}

    def create_label(self, api: GmailAPI, name: str) -> str:
        from postbote.plugins.gmail.api import APIError

        if not self.settings.create_labels:
            self.give_up(f"the label {name!r} does not exist in the mailbox and create_labels is false: create it in "
                         "Gmail, or set create_labels: true")
        try:
            created = api.create_label(name)
        except APIError as exc:
            if exc.response.status != 409:
                raise
            log.info("gmail.label_exists", label=name, reason="created by another client meanwhile")
            found = self.known_labels(api).get(name.casefold())
            if found is None:
                self.give_up(f"creating the label {name!r}: Gmail says it conflicts with an existing label "
                             f"({exc.response.message}); rename it in labels:")
            assert found is not None
            return found
        log.info("gmail.label_created", destination=self.settings.label, label=name)
        return str(created.get("id", ""))

    # ---- the import

    def import_message(self, message: Message) -> str:
        """Import ``message``; returns the answer recorded with it, or raises `DeliveryError`."""
        from postbote.plugins.gmail.api import MAX_MESSAGE, Upload

        if message.size > MAX_MESSAGE:
            raise DeliveryError(f"{self.where}: the message has {message.size} octets; Gmail imports at most "
                                f"{MAX_MESSAGE // (1024 * 1024)} MB", temporary=False)
        api = self.connection()
        label_ids = self.guarded(lambda: self.labels(api), message_sent=False)
        upload = Upload(message.size, message.chunks, {"labelIds": label_ids}, self.params())
        return self.answer(self.guarded(lambda: api.import_message(upload), message_sent=True))

    def guarded(self, call: Callable[[], T], *, message_sent: bool) -> T:
        """``call()``, its failures said as what they mean for the message. A connection that broke after the whole
        request went out leaves the message in doubt only when the request carried it (``message_sent``)."""
        from postbote.plugins.gmail.api import APIError, CannotConnect, NotSent, Unanswered

        try:
            return call()
        except DeliveryError:
            raise
        except CannotConnect as exc:  # one try per poll, not one per message
            self.give_up(f"{exc}; the remaining messages are tried on the next poll")
            raise AssertionError("unreachable") from None
        except APIError as exc:
            raise self.refused(exc) from None
        except Unanswered as exc:
            if message_sent:
                raise DeliveryError(f"{self.where}: {exc} (the whole message was sent: it may have arrived)",
                                    temporary=True, in_doubt=True) from None
            raise DeliveryError(f"{self.where}: {exc}; the message is tried again", temporary=True) from None
        except NotSent as exc:
            raise DeliveryError(f"{self.where}: {exc}; the message is tried again", temporary=True) from None
        except (CredentialError, AccountError) as exc:
            self.give_up(self.token_problem(str(exc)))
            raise AssertionError("unreachable") from None

    def params(self) -> dict[str, str]:
        return {"internalDateSource": self.settings.internal_date_source.api_name,
                "neverMarkSpam": str(self.settings.never_mark_spam).lower(),
                "processForCalendar": str(self.settings.process_for_calendar).lower()}

    def answer(self, response: Response) -> str:
        message_id = response.json().get("id")
        if not isinstance(message_id, str) or not message_id:
            raise DeliveryError(f"{self.where}: Gmail answered HTTP {response.status} without a message id; the "
                                "message may have arrived", temporary=True, in_doubt=True)
        labels = ", ".join(self.settings.labels) or "none: archived"
        return f"gmail: imported as message {message_id[:64]} (labels {labels})"

    def token_problem(self, text: str) -> str:
        """A token that cannot be had, with the right command to fix it (the OAuth2 code names the token cache), or
        for ``token_command`` what to check: ``postbote auth`` cannot help there."""
        if self.settings.token_command:
            return (f"{text}; check token_command ({self.settings.token_command[0]}): it must print a current access "
                    f"token for {self.settings.user} with the gmail.insert and gmail.labels scopes (a Workspace "
                    "service account needs domain-wide delegation of both)")
        cache_name = token_cache_name(self.account, self.settings)
        text = text.replace(f"run: postbote auth {cache_name}", self.auth_hint)
        return text if self.auth_hint in text else f"{text}; {self.auth_hint}"

    def refused(self, exc: APIError) -> DeliveryError:
        """What an error answer means for this message (and, for most, for the rest of the poll)."""
        response = exc.response
        said = f"{self.where}: {exc}"
        status, reason = response.status, response.reason
        if status == 429 or status >= 500 or (status == 403 and reason in RATE_REASONS):
            return self.back_off(response, str(exc))
        if status == 401:
            self.give_up(self.token_problem(f"Gmail refused the access token ({response.describe()})"))
        if status == 403 and (reason in SCOPE_REASONS or "scope" in response.message.lower()):
            self.give_up(f"{exc}: the token lacks a scope the import needs; set oauth2.scope to "
                         f"(or leave it out for) gmail.insert and gmail.labels, then {self.auth_hint}")
        if status in (403, 404):
            self.give_up(f"{exc}; check user (the mailbox) and that the Gmail API is enabled in the Google Cloud "
                         "project of oauth2.client_id")
        if status in REJECTING_STATUSES and "label" in response.message.lower():
            self.label_ids = None  # looked up again on the next poll
            self.give_up(f"{exc}; the labels are looked up again on the next poll")
        if status in REJECTING_STATUSES:
            return DeliveryError(said, temporary=False)
        return DeliveryError(said, temporary=True)

    def back_off(self, response: Response, said: str) -> DeliveryError:
        """Leave the mailbox alone for Retry-After (or `DEFAULT_BACKOFF`), or until the daily quota resets: in this
        poll, the process's next ones, and those of the processes after it (the time is kept in the state dir)."""
        now = wall_clock()
        asked = response.retry_after
        if response.reason in DAILY_REASONS:
            until = max(now + (asked or 0.0), next_quota_reset(now))
            wait = until - now
            reason = (f"{said}; Gmail's daily quota for the mailbox is used up: the remaining messages are tried once "
                      f"it resets at midnight US Pacific time ({utc_text(until)}, in {wait:.0f} s)")
        else:
            wait = DEFAULT_BACKOFF if asked is None else asked
            until = now + wait
            reason = f"{said}; Gmail asked to wait {wait:g} s: the remaining messages are tried on a later poll"
        limits = limits_for(self.settings, self.poll.state_dir)
        with _LIMITS_LOCK:
            limits.leave_alone(until, f"Gmail said {said}", self.settings.label)
        self.failure = DeliveryError(f"{self.where}: {reason}", temporary=True)
        log.warning("gmail.backing_off", destination=self.settings.label, seconds=wait, answer=said)
        return self.failure
