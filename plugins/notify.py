"""Notifications when something needs a person: ``plugins: {notify: {after_failures: 3, webhook: {url: …}}}``.

Four events, per account: ``account.failing`` (the account's polls failed ``after_failures`` times in a row: login
refused, server unreachable, TLS or protocol trouble), ``mail.stale`` (mail has waited on the server longer than
``stale_after``, the plugin's or else the account's), ``message.rejected`` (a message was rejected for good and
stays on the server until ``postbote retry``) and ``account.recovered`` (the first good poll after a notified
failure, or the stale mail gone). They go to one or more channels: an email (through a relay or the account's own
SMTP/LMTP destination, with `postbote.SMTPClient`), a webhook POSTing a JSON body, ntfy or Gotify.

One notification per condition and account until the condition clears: what was notified is remembered in the
plugin's own `postbote.KeyedTable` (``state_dir/notify.sqlite3``), so neither the next poll nor a restart repeats
it. A condition whose notification reached no channel is tried again after the next poll.

Notifications are sent after the poll (``poll_finished``), never while messages are handled, every channel at once
in its own thread, and the poll waits for them at most ``timeout``: a channel that hangs or fails is logged as
``notify.failed`` and costs the mail nothing. Every text is passed through `postbote.redact`, and of a message
only its Message-ID, From and Subject are named (``details`` chooses fewer), never its body.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from postbote import (
    Account,
    Config,
    ConfigError,
    KeyedTable,
    LoginRefused,
    Message,
    Node,
    PollStats,
    PostboteError,
    Problems,
    Section,
    WaitingMessage,
    WaitingSummary,
    boolean,
    duration,
    get_logger,
    hookimpl,
    integer,
    nonempty_text,
    path_relative_to,
    read_account_state,
    redact,
    register_secret,
    stale_after,
    text_list,
)
from postbote.plugins.received import local_hostname
from postbote.plugins.smtp import SMTPSettings, address, addresses, connect, relay_settings, token_cache_name

NAME = "notify"
FAILING, STALE, REJECTED, RECOVERED = "account.failing", "mail.stale", "message.rejected", "account.recovered"
EVENTS = (FAILING, STALE, REJECTED, RECOVERED)
DETAILS = ("message_id", "from", "subject")
CHANNELS = ("email", "webhook", "ntfy", "gotify")
DEFAULT_TIMEOUT = 10.0
MAX_LISTED = 10  # messages named in one notification; the count says how many there were
MAX_FIELD = 200  # characters of a header or a reason shown
MAX_RESPONSE = 64 * 1024
NTFY_PRIORITY = {FAILING: "4", REJECTED: "4", STALE: "3", RECOVERED: "2"}
GOTIFY_PRIORITY = {FAILING: 8, REJECTED: 8, STALE: 5, RECOVERED: 2}
_SECRET_HEADER = re.compile(r"authorization|cookie|token|key|secret|password", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")

log = get_logger("postbote.notify")


# --- options


@dataclass(frozen=True)
class EmailChannel:
    to: tuple[str, ...]  # empty with via_destination: the destination's recipients
    sender: str | None  # None: postbote@ this host
    smtp: SMTPSettings | None  # None: via_destination
    kind: str = "email"

    @property
    def label(self) -> str:
        return f"email via {self.smtp.label}" if self.smtp else "email via the account's destination"


@dataclass(frozen=True)
class HTTPChannel:
    kind: str  # webhook, ntfy, gotify
    url: str
    headers: tuple[tuple[str, str], ...] = ()
    token_file: Path | None = None
    tls_ca_file: Path | None = None

    @property
    def label(self) -> str:
        return f"{self.kind} {shown_url(self.url)}"


Channel = EmailChannel | HTTPChannel
Change = tuple["Event | None", Callable[[], object]]
"""A condition's new state: the event to send (or None) and how to remember it once sent."""


@dataclass(frozen=True)
class NotifySettings:
    channels: tuple[Channel, ...]
    after_failures: int = 3
    stale_after: float | None = None  # None: the account's stale_after
    events: frozenset[str] = frozenset(EVENTS)
    details: tuple[str, ...] = DETAILS
    timeout: float = DEFAULT_TIMEOUT


@hookimpl
def parse_plugin_options(name: str, options: Node, problems: Problems, base_dir: Path) -> NotifySettings | None:
    if name != NAME:
        return None
    section = Section(options, problems)
    channels: list[Channel] = []
    if (email := section.section("email")) is not None:
        channels.extend(_email_channel(email, base_dir))
    for kind in ("webhook", "ntfy", "gotify"):
        if (http := section.section(kind)) is not None:
            channels.extend(_http_channel(kind, http, base_dir))
    settings = NotifySettings(
        channels=tuple(channels),
        after_failures=section.get("after_failures", integer(1, 10_000), 3),
        stale_after=section.get("stale_after", duration, None),
        events=frozenset(section.get("events", one_of_each(EVENTS), list(EVENTS))),
        details=tuple(section.get("details", one_of_each(DETAILS, empty=True), list(DETAILS))),
        timeout=section.get("timeout", duration, DEFAULT_TIMEOUT),
    )
    section.finish({*CHANNELS, "after_failures", "stale_after", "events", "details", "timeout"})
    if not any((node := section.raw(kind)) is not None and node.value is not None for kind in CHANNELS):
        section.problem("give at least one channel: email: {to: [...], smtp: {host: ...}}, webhook: {url: ...}, "
                        "ntfy: {url: ...} or gotify: {url: ..., token_file: ...}")
    return settings


def one_of_each(known: tuple[str, ...], *, empty: bool = False) -> Callable[[Any], list[str]]:
    """A list of some of ``known`` (a single one may stand alone; ``[]`` only when ``empty``)."""

    def parse(value: Any) -> list[str]:
        if empty and value == []:
            return []
        chosen = text_list(value)
        for item in chosen:
            if item not in known:
                raise ValueError(f"expected a list of {', '.join(known)} (not {item!r})")
        return chosen

    return parse


def _email_channel(section: Section, base_dir: Path) -> list[Channel]:
    to = section.get("to", addresses, [])
    sender = section.get("from", address, None)
    via = section.get("via_destination", boolean, False)
    smtp_section = section.section("smtp")
    section.finish({"to", "from", "via_destination", "smtp"})
    smtp = _relay(smtp_section, tuple(to), sender, base_dir) if smtp_section is not None else None
    if via and smtp_section is not None:
        section.problem("give smtp: (a relay) or via_destination: true (the account's own SMTP or LMTP "
                        "destination), not both")
        return []
    if not via and smtp_section is None:
        section.problem("give smtp: {host: ..., port: ...} (a relay that takes mail from this host) or "
                        "via_destination: true (the account's own SMTP or LMTP destination)")
        return []
    if not via and section.raw("to") is None:
        _missing(section, "to", "the addresses the notifications go to")
        return []
    return [EmailChannel(to=tuple(to), sender=sender, smtp=smtp)]


def _missing(section: Section, key: str, what: str) -> None:
    section.problems.add(section.line, f"{section.path}.{key}", f"required key is missing: {what}")


def _relay(section: Section, to: tuple[str, ...], sender: str | None, base_dir: Path) -> SMTPSettings:
    """``email: {smtp: ...}``: a relay with the smtp destination's keys (implicit TLS or STARTTLS, a login)."""
    settings = relay_settings(section, base_dir, recipients=to, envelope_sender=sender, timeout=DEFAULT_TIMEOUT)
    section.finish()
    return settings


def _http_channel(kind: str, section: Section, base_dir: Path) -> list[Channel]:
    allow_http = section.get("allow_http", boolean, False)
    url = section.get("url", http_url, None, required=True)
    token_file = section.get("token_file", path_relative_to(base_dir), None)
    headers: list[tuple[str, str]] = []
    if kind == "webhook" and (header_section := section.section("headers")) is not None:
        for header, node in header_section.items():
            try:
                headers.append((header_name(header), header_value(node.value)))
            except ValueError as exc:
                header_section.problem(str(exc), node)
    section.finish({"url", "allow_http", "tls_ca_file", "token_file", *(("headers",) if kind == "webhook" else ())})
    tls_ca_file = section.get("tls_ca_file", path_relative_to(base_dir), None)
    if url is None:
        return []
    if kind == "gotify" and token_file is None:
        _missing(section, "token_file", "the file holding the Gotify application token")
    if urllib.parse.urlsplit(url).scheme == "http" and not allow_http and not _loopback(url):
        section.problem("use https:// -- over plain http:// anyone on the way reads the notifications and the "
                        "token; http:// is taken for a loopback address, or with allow_http: true",
                        section.raw("url"))
    return [HTTPChannel(kind, url, tuple(headers), token_file, tls_ca_file)]


def http_url(value: Any) -> str:
    text = nonempty_text(value)
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an https:// URL")
    if parts.password:
        register_secret(parts.password)
    return text


def header_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", value):
        raise ValueError(f"{value!r} is not an HTTP header name")
    return value


def header_value(value: Any) -> str:
    text = nonempty_text(value)
    if not text.isascii():
        raise ValueError("expected an ASCII header value")
    return text


def _loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def shown_url(url: str) -> str:
    """The URL as logs show it: scheme, host and port only. The path of a Slack-style webhook or an ntfy topic is
    as good as a password, and the user, password and query may hold one."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}/…"


# --- what happened


@dataclass(frozen=True)
class Event:
    """One notification: its ``event`` name and account, a one-line ``title``, a ``text`` for people and the
    JSON body's other ``fields``."""

    event: str
    account: str
    title: str
    text: str
    fields: Mapping[str, Any]
    made: float = dataclasses.field(default_factory=time.time)

    def body(self) -> dict[str, Any]:
        return {"event": self.event, "account": self.account, "time": iso(self.made), **self.fields,
                "text": self.text}

    def json(self) -> bytes:
        return redact(json.dumps(self.body(), ensure_ascii=False, sort_keys=False)).encode("utf-8")


def iso(when: float | None) -> str | None:
    if when is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def clean(value: str | None, limit: int = MAX_FIELD) -> str | None:
    """A header or a reason as a notification shows it: one line, RFC 2047 decoded, redacted, shortened."""
    if value is None:
        return None
    try:
        from email.header import decode_header, make_header

        value = str(make_header(decode_header(value)))
    except (ValueError, LookupError, UnicodeError):
        pass
    value = redact(_CONTROL.sub(" ", value).strip())
    return value if len(value) <= limit else value[:limit - 1] + "…"


def human_duration(seconds: float) -> str:
    """``45s``, ``5m``, ``1h30m``, ``2d3h``."""
    rest = int(round(seconds))
    if rest < 60:
        return f"{rest}s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        amount, rest = divmod(rest, size)
        if amount:
            parts.append(f"{amount}{unit}")
    return "".join(parts[:2])


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


# --- the notifier


class Notifier:
    """The accounts that enable the plugin, their channels, and the memory of what was notified."""

    def __init__(self, config: Config, *, clock: Callable[[], float] = time.time) -> None:
        self.state_dir = config.state_dir
        self.clock = clock
        self.settings: dict[str, NotifySettings] = {}
        self.channels: dict[str, list[Channel]] = {}
        self.tokens: dict[Path, str] = {}
        for account in config.accounts:
            settings: NotifySettings | None = account.options_for(NAME) if account.uses(NAME) else None
            if settings is None:
                continue
            self.settings[account.name] = settings
            self.channels[account.name] = [self._resolve(account, channel, settings) for channel in settings.channels]
        self._lock = threading.Lock()
        self._rejected: dict[str, list[dict[str, Any]]] = {}
        self._errors: dict[str, PostboteError] = {}
        self.table = KeyedTable.open(config.state_dir, NAME, busy_timeout=config.state_busy_timeout)

    def _resolve(self, account: Account, channel: Channel, settings: NotifySettings) -> Channel:
        """The relay a ``via_destination`` email goes through; the tokens read (once, at start-up)."""
        if isinstance(channel, HTTPChannel):
            if channel.token_file is not None and channel.token_file not in self.tokens:
                self.tokens[channel.token_file] = read_token(channel.token_file)
            for header, value in channel.headers:
                if _SECRET_HEADER.search(header):
                    register_secret(value)
            return channel
        relay = channel.smtp
        if relay is None:
            relay = next((d.settings for d in account.destinations if isinstance(d.settings, SMTPSettings)), None)
            if relay is None:
                raise ConfigError(f"account {account.name!r}: plugins.notify.email.via_destination: the account has "
                                  f"no smtp or lmtp destination to send through; give smtp: {{host: ...}} instead")
            relay = dataclasses.replace(relay, recipients=channel.to or relay.recipients,
                                        envelope_sender=channel.sender)
        return dataclasses.replace(channel, smtp=dataclasses.replace(relay, timeout=settings.timeout))

    def close(self) -> None:
        self.table.close()

    # --- during the poll: noted, sent afterwards

    def message_failed(self, account: Account, message: Message, error: PostboteError) -> None:
        settings = self.settings.get(account.name)
        if settings is None:
            return
        shown: dict[str, Any] = {"uid": message.uid}
        headers = {"message_id": message.message_id, "from": message.get_header("From"),
                   "subject": message.get_header("Subject")}
        shown.update({key: clean(headers[key]) for key in settings.details})
        shown["reason"] = clean(str(error), 500)
        with self._lock:
            self._rejected.setdefault(account.name, []).append(shown)

    def account_error(self, account: Account, error: PostboteError) -> None:
        with self._lock:
            self._errors[account.name] = error

    # --- after the poll

    def poll_finished(self, account: Account, stats: PollStats) -> None:
        settings = self.settings.get(account.name)
        with self._lock:
            rejected = self._rejected.pop(account.name, [])
            error = self._errors.pop(account.name, None)
        if settings is None:
            return
        now = self.clock()
        changes: list[Change] = []
        try:
            changes += self._failures(account, settings, stats, error, now)
            waiting = self._waiting(account.name)
            changes += self._rejections(account, settings, rejected, waiting)
            if waiting is not None:
                changes += self._staleness(account, settings, waiting, now)
        except PostboteError as exc:  # the plugin's table cannot be read: nothing is sent rather than repeated
            log.error("notify.state_failed", account=account.name, error=str(exc))
            return
        events = [event for event, _ in changes if event is not None]
        delivered = self.send(account.name, events, settings.timeout) if events else set()
        for event, remember in changes:
            if event is None or id(event) in delivered:
                try:
                    remember()
                except PostboteError as exc:
                    log.error("notify.state_failed", account=account.name, error=str(exc))

    def _waiting(self, account: str) -> list[WaitingMessage] | None:
        try:
            state = read_account_state(self.state_dir, account)
        except PostboteError as exc:
            log.warning("notify.state_unreadable", account=account, error=str(exc))
            return None
        return [] if state is None else state.waiting

    def _get(self, account: str, key: str) -> Any:
        entry = self.table.get(account, key)
        return None if entry is None else entry.value

    def _failures(self, account: Account, settings: NotifySettings, stats: PollStats, error: PostboteError | None,
                  now: float) -> list[Change]:
        name = account.name
        streak = self._get(name, "failures") or {}
        failing = self._get(name, "failing")
        if stats.ok:
            changes: list[Change] = []
            if streak:
                changes.append((None, lambda: self.table.delete(name, "failures")))
            if failing is not None:
                count, since = streak.get("count", failing.get("count", 0)), failing.get("since")
                event = None if RECOVERED not in settings.events else Event(
                    RECOVERED, name, f"{name}: polls succeed again",
                    f"{name}: the poll succeeded again after {plural(count, 'failed poll')} in a row "
                    f"(failing since {iso(since)}).",
                    {"cleared": FAILING, "count": count, "since": iso(since)})
                changes.append((event, lambda: self.table.delete(name, "failing")))
            return changes
        count = int(streak.get("count", 0)) + 1
        since = streak.get("since") or now
        reason = clean(stats.error or (str(error) if error else "the poll failed"), 500) or ""
        kind = "login refused" if isinstance(error, LoginRefused) else "failed"
        record: Any = {"count": count, "since": since, "reason": reason}
        changes = [(None, lambda: self.table.put(name, "failures", record))]
        if failing is None and count >= settings.after_failures and FAILING in settings.events:
            polls = "the poll failed" if count == 1 else f"{count} polls in a row failed"
            event = Event(FAILING, name, f"{name}: {polls} ({kind})",
                          f"{name}: {polls}{f' since {iso(since)}' if count > 1 else ''}: {reason}\n"
                          f"Mail stays on the server meanwhile; nothing is lost.",
                          {"count": count, "since": iso(since), "reason": reason,
                           "error_type": type(error).__name__ if error is not None else None})
            changes.append((event, lambda: self.table.put(name, "failing", record)))
        return changes

    def _rejections(self, account: Account, settings: NotifySettings, rejected: list[dict[str, Any]],
                    waiting: list[WaitingMessage] | None) -> list[Change]:
        """The messages rejected in this poll, and those the state store holds as rejected that no notification
        has named yet (one whose notification reached no channel, or rejected by another process's poll)."""
        name = account.name
        before: list[str] = list(self._get(name, "rejected") or [])
        notified = before
        pending = {shown["uid"]: shown for shown in rejected}
        if waiting is not None:  # forget the messages no longer rejected (retried, delivered, gone)
            held = [message for message in waiting if message.status == "rejected"]
            notified = [uid for uid in before if uid in {message.uid for message in held}]
            for message in held:
                pending.setdefault(message.uid, {
                    "uid": message.uid, **({"message_id": clean(message.message_id)}
                                           if "message_id" in settings.details else {}),
                    "reason": clean(message.reason, 500)})
        new = [shown for uid, shown in pending.items() if uid not in notified]
        if not new or REJECTED not in settings.events:
            kept: Any = notified
            return [(None, lambda: self.table.put(name, "rejected", kept))] if notified != before else []
        lines = [", ".join(f"{key.replace('_', '-')}: {shown[key]}" for key in ("message_id", "from", "subject")
                           if shown.get(key)) or f"uid {shown['uid']}" for shown in new[:MAX_LISTED]]
        text = (f"{name}: {plural(len(new), 'message')} rejected for good; "
                f"{'it stays' if len(new) == 1 else 'they stay'} on the server until `postbote retry {name}`.\n"
                + "\n".join(f"- {line}\n  {shown['reason']}" for line, shown in zip(lines, new, strict=False)))
        event = Event(REJECTED, name, f"{name}: {plural(len(new), 'message')} rejected",
                      text, {"count": len(new), "reason": new[0]["reason"], "messages": new[:MAX_LISTED]})
        remembered: Any = notified + [shown["uid"] for shown in new]
        return [(event, lambda: self.table.put(name, "rejected", remembered))]

    def _staleness(self, account: Account, settings: NotifySettings, waiting: list[WaitingMessage],
                   now: float) -> list[Change]:
        name = account.name
        threshold = settings.stale_after or stale_after(account)
        summary = WaitingSummary.of(waiting, now=now, stale_after=threshold)
        notified = self._get(name, "stale")
        if summary.stale and notified is None and STALE in settings.events:
            stale = sorted((m for m in waiting if now - m.since > threshold), key=lambda m: m.since)
            named = "message_id" in settings.details
            listed: list[dict[str, Any]] = [{"uid": m.uid, "message_id": clean(m.message_id) if named else None,
                       "status": str(m.status), "since": iso(m.since),
                       "attempts": m.attempts, "reason": clean(m.reason, 500)} for m in stale[:MAX_LISTED]]
            record: Any = {"since": summary.oldest, "count": summary.stale}
            text = (f"{name}: {plural(summary.stale, 'message')} waiting on the server longer than "
                    f"{human_duration(threshold)} (the oldest since {iso(summary.oldest)}); "
                    f"{summary.describe()} in all.\n"
                    + "\n".join(f"- {m['message_id'] or 'uid ' + m['uid']}: {m['status']} since {m['since']}, "
                                f"{plural(m['attempts'], 'attempt')}: {m['reason']}" for m in listed))
            event = Event(STALE, name, f"{name}: mail waiting longer than {human_duration(threshold)}", text,
                          {"count": summary.stale, "waiting": summary.total, "since": iso(summary.oldest),
                           "stale_after": threshold, "reason": listed[0]["reason"] if listed else None,
                           "messages": listed})
            return [(event, lambda: self.table.put(name, "stale", record))]
        if not summary.stale and notified is not None:
            cleared = None if RECOVERED not in settings.events else Event(
                RECOVERED, name, f"{name}: no mail waits any more",
                f"{name}: no message has waited longer than {human_duration(threshold)} any more "
                f"({summary.describe()}).",
                {"cleared": STALE, "count": notified.get("count", 0), "since": iso(notified.get("since"))})
            return [(cleared, lambda: self.table.delete(name, "stale"))]
        return []

    # --- sending

    def send(self, account: str, events: list[Event], timeout: float) -> set[int]:
        """Send every event to every channel of ``account`` at once and wait at most ``timeout``; the ids of the
        events that reached at least one channel. A channel still busy then is logged as failed and left to its
        socket timeouts, its outcome no longer logged."""
        channels = self.channels.get(account, [])
        results: dict[tuple[int, int], bool] = {}
        abandoned: set[tuple[int, int]] = set()
        lock = threading.Lock()
        threads: list[tuple[threading.Thread, Event, Channel]] = []
        for event in events:
            for channel in channels:
                def run(event: Event = event, channel: Channel = channel) -> None:
                    error = self._send_one(event, channel)
                    with lock:
                        key = (id(event), id(channel))
                        results[key] = error is None
                        if key in abandoned:
                            return
                    if error is None:
                        log.info("notify.sent", account=account, notification=event.event, channel=channel.label)
                    else:
                        log.warning("notify.failed", account=account, notification=event.event,
                                    channel=channel.label, error=error)
                thread = threading.Thread(target=run, name=f"notify-{channel.kind}", daemon=True)
                thread.start()
                threads.append((thread, event, channel))
        deadline = time.monotonic() + timeout
        for thread, event, channel in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            with lock:
                late = (id(event), id(channel)) not in results
                if late:
                    abandoned.add((id(event), id(channel)))
            if late:
                log.warning("notify.failed", account=account, notification=event.event, channel=channel.label,
                            error=f"no answer within {human_duration(timeout)}")
        with lock:
            return {id(event) for event in events
                    if any(results.get((id(event), id(channel))) for channel in channels)}

    def _send_one(self, event: Event, channel: Channel) -> str | None:
        """Send ``event`` through ``channel``; None when it went, else why not (redacted)."""
        try:
            if isinstance(channel, EmailChannel):
                send_email(event, channel, self.state_dir)
            else:
                post(event, channel, self.tokens.get(channel.token_file) if channel.token_file else None,
                     self.settings[event.account].timeout)
        except Exception as exc:  # noqa: BLE001 - a channel's failure is logged and never reaches the mail
            return redact(str(exc) if isinstance(exc, PostboteError) else f"{type(exc).__name__}: {exc}")
        return None


def read_token(path: Path) -> str:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeError) as exc:
        raise ConfigError(f"plugins.notify: cannot read the token file {path}: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
    if not token or any(ch in token for ch in "\r\n\0"):
        raise ConfigError(f"plugins.notify: the token file {path} should hold one line, the token")
    register_secret(token)
    return token


def send_email(event: Event, channel: EmailChannel, state_dir: Path) -> None:
    """Mail ``event`` through the channel's relay, opened as the smtp destination opens it (`connect`: implicit TLS
    or STARTTLS, SMTP AUTH with the relay's own secret or token), so that a submission relay works here too."""
    from email.message import EmailMessage
    from email.policy import SMTP
    from email.utils import formatdate, make_msgid

    relay = channel.smtp
    if relay is None:
        raise RuntimeError("no relay")  # resolved at start-up
    hostname = local_hostname()
    sender = relay.envelope_sender or f"postbote@{hostname}"
    message = EmailMessage(policy=SMTP)
    message["From"] = f"postbote <{sender}>"
    message["To"] = ", ".join(relay.recipients)
    message["Subject"] = redact(f"[postbote] {event.title}")
    message["Date"] = formatdate(localtime=True)
    message["Message-ID"] = make_msgid("postbote.notify", domain=hostname)
    message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies
    message["X-Postbote-Event"] = event.event
    details = json.dumps(event.body(), ensure_ascii=False, indent=2)
    message.set_content(redact(f"{event.text}\n\n-- \nThe same as JSON:\n{details}\n"))
    data = message.as_bytes()
    client = connect(relay, token_cache=token_cache_name(event.account, relay), state_dir=state_dir)
    try:
        client.send(sender, list(relay.recipients), [data], eight_bit=not data.isascii())
    finally:
        client.quit()


def post(event: Event, channel: HTTPChannel, token: str | None, timeout: float) -> None:
    import urllib.request

    url = channel.url
    headers = {"User-Agent": "postbote-notify"}
    if channel.kind == "webhook":
        body = event.json()
        headers["Content-Type"] = "application/json; charset=utf-8"
        if token:
            headers["Authorization"] = f"Bearer {token}"
        headers.update(dict(channel.headers))
    elif channel.kind == "ntfy":
        body = redact(event.text).encode("utf-8")
        headers.update({"Content-Type": "text/plain; charset=utf-8", "X-Priority": NTFY_PRIORITY[event.event],
                        "X-Title": _encoded_word(redact(f"postbote: {event.title}")),
                        "X-Tags": "white_check_mark" if event.event == RECOVERED else "warning"})
        if token:
            headers["Authorization"] = f"Bearer {token}"
    else:  # gotify
        if not urllib.parse.urlsplit(url).path.rstrip("/").endswith("/message"):
            url = url.rstrip("/") + "/message"
        body = redact(json.dumps({"title": f"postbote: {event.title}", "message": event.text,
                                  "priority": GOTIFY_PRIORITY[event.event], "extras": {"postbote": event.body()}},
                                 ensure_ascii=False)).encode("utf-8")
        headers["Content-Type"] = "application/json; charset=utf-8"
        if token:
            headers["X-Gotify-Key"] = token
    opener = _opener(channel.tls_ca_file)
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    with opener.open(request, timeout=timeout) as response:
        response.read(MAX_RESPONSE)


def _encoded_word(value: str) -> str:
    """A header value http.client can send (Latin-1): RFC 2047 when it is not ASCII (ntfy decodes it)."""
    if value.isascii():
        return value
    from email.header import Header

    return Header(value, "utf-8").encode()


def _opener(tls_ca_file: Path | None) -> Any:
    """urllib's opener with the system's CAs (or ``tls_ca_file``) and without redirects: a redirected POST would
    become a GET, and the token would go to the other host."""
    import ssl
    import urllib.request

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
            return None

    context = ssl.create_default_context(cafile=str(tls_ca_file) if tls_ca_file else None)
    return urllib.request.build_opener(NoRedirect, urllib.request.HTTPSHandler(context=context))


# --- hooks

_notifier: Notifier | None = None


@hookimpl
def configure(config: Config) -> None:
    global _notifier
    unconfigure()
    if not any(account.uses(NAME) and account.options_for(NAME) is not None for account in config.accounts):
        return
    _notifier = Notifier(config)


@hookimpl
def message_failed(message: Message, account: Account, error: PostboteError, temporary: bool) -> None:
    notifier = _notifier
    if notifier is not None and not temporary:
        notifier.message_failed(account, message, error)


@hookimpl
def account_error(account: Account, error: PostboteError) -> None:
    notifier = _notifier
    if notifier is not None:
        notifier.account_error(account, error)


@hookimpl
def poll_finished(account: Account, stats: PollStats) -> None:
    notifier = _notifier
    if notifier is not None:
        notifier.poll_finished(account, stats)


@hookimpl
def unconfigure() -> None:
    global _notifier
    if _notifier is not None:
        _notifier.close()
        _notifier = None

