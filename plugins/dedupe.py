"""Drops a message whose Message-ID was already delivered to the same recipients recently.

Config shape (top level and/or per account; ``plugins: {dedupe: true}`` takes the defaults)::

    plugins:
      dedupe:
        window: 7d      # how long a delivery counts (default 7d): 90m, 12h, 2d, 1d12h, or seconds

Only real deliveries count: a message is remembered in ``message_delivered``, never when a filter looks at it, so a
copy that failed or was dropped never causes another to be dropped. Messages without a Message-ID always pass.

The poller commits a poll's outcomes in batches and reports ``message_delivered`` when a batch is committed, so a
second copy in the same batch (a list copy and a direct Cc, fetched together) is compared with the copies this poll
has handed on but not yet committed as well. Both outcomes are then committed in the same transaction: the copy is
dropped only if the first is recorded as delivered. A copy that fails (``message_failed``) is forgotten at once.

The recipients compared are ``message.recipients`` when a filter rerouted the message, else, for each destination
(the rerouted ``message.destinations`` or the account's ``deliver:``), its configured ``recipients`` (SMTP, LMTP) or,
for destinations without recipients (Maildir), the account name. A message is dropped only when every one of those
recipients got it within the window: a copy that reaches someone new is delivered to all of them.

The filter runs last (``trylast``) so that it sees the final recipients; an earlier filter's ``accept`` skips it.
The history is the state store's keyed table ``dedupe`` (``state_dir/dedupe.sqlite3``: namespace the Message-ID, key
the recipient, written when it was delivered), shared by all accounts and pruned of deliveries older than the longest
window. A history written by an earlier version (table ``delivered``) is moved into it when first opened. If that
database fails at run time the message is delivered (a duplicate is better than holding mail back), and the failure
is logged.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from postbote import (
    Account,
    Config,
    ConfigError,
    KeyedTable,
    LegacyTable,
    Message,
    Node,
    Problems,
    Section,
    StateError,
    Verdict,
    duration,
    get_logger,
    hookimpl,
)

PLUGIN_NAME = "dedupe"
TABLE_NAME = "dedupe"
DATABASE_NAME = "dedupe.sqlite3"  # where `KeyedTable.open` keeps the table TABLE_NAME
DEFAULT_WINDOW = 7 * 86400.0
PRUNE_INTERVAL = 3600.0

OLDER_HISTORY = LegacyTable(table="delivered", namespace="message_id", key="recipient", written="delivered_at")
"""The history as versions before the keyed table kept it in the same file: moved into the table on first open."""

log = get_logger("postbote.dedupe")

clock: Callable[[], float] = time.time
"""Seconds since the epoch for the stores opened by ``configure``; tests replace it to cross the window at once."""


@dataclass(frozen=True)
class _Unsettled:
    """A copy handed on in the current poll whose delivery is not yet committed."""

    message_id: str
    recipients: frozenset[str]
    handed_on_at: float


class DedupeStore:
    """The delivery history: one SQLite connection shared by every account, one lock around it for polling threads,
    plus each account's copies handed on but not yet committed (see the module docstring)."""

    def __init__(self, table: KeyedTable, *, retention: float, clock: Callable[[], float] = time.time) -> None:
        self.table = table
        self.retention = retention
        self.clock = clock
        self._lock = threading.Lock()
        self._unsettled: dict[str, dict[str, _Unsettled]] = {}
        for path, mode in table.tightened:
            log.info("dedupe.permissions_tightened", path=str(path), mode=oct(mode))
        self._next_prune = 0.0
        self.prune()

    @classmethod
    def open(cls, state_dir: Path, *, retention: float, clock: Callable[[], float] = time.time,
             busy_timeout: float | None = None) -> DedupeStore:
        """The history of ``state_dir`` (created if missing, an earlier version's moved into the table); it waits
        ``busy_timeout`` for another process's lock (default: the state store's)."""
        waiting = {} if busy_timeout is None else {"busy_timeout": busy_timeout}
        table = KeyedTable.open(state_dir, TABLE_NAME, legacy=OLDER_HISTORY, **waiting)
        try:
            return cls(table, retention=retention, clock=clock)
        except BaseException:
            table.close()
            raise

    def close(self) -> None:
        self.table.close()

    def deliveries(self, message_id: str, recipients: Iterable[str], window: float) -> dict[str, float]:
        """The recipients among ``recipients`` that got this message within ``window``, with the time."""
        entries = self.table.get_many(message_id, recipients, since=self.clock() - window)
        return {recipient: entry.written for recipient, entry in entries.items()}

    def last_delivery(self, account: str, uid: str, message_id: str, recipients: Iterable[str],
                      window: float) -> float | None:
        """When this message last reached these recipients, if every one of them got it: within ``window``, or
        from a copy this account handed on earlier in the current poll."""
        wanted = set(recipients)
        times = self.deliveries(message_id, wanted, window)
        with self._lock:
            copies = [copy for other, copy in self._unsettled.get(account, {}).items()
                      if other != uid and copy.message_id == message_id]
        for copy in copies:
            for recipient in copy.recipients & wanted:
                times[recipient] = max(times.get(recipient, 0.0), copy.handed_on_at)
        if not wanted or not wanted <= times.keys():
            return None
        return max(times.values())

    def hold(self, account: str, uid: str, message_id: str, recipients: Iterable[str]) -> None:
        """Note a copy that passed the filter; `settle` or `release` it once its outcome is known."""
        copy = _Unsettled(message_id, frozenset(recipients), self.clock())
        with self._lock:
            self._unsettled.setdefault(account, {})[uid] = copy

    def release(self, account: str, uid: str | None = None) -> None:
        """Forget one unsettled copy of ``account`` (or all of them, at the start and end of a poll)."""
        with self._lock:
            if uid is None:
                self._unsettled.pop(account, None)
            else:
                self._unsettled.get(account, {}).pop(uid, None)

    def remember(self, message_id: str, recipients: Iterable[str]) -> None:
        now = self.clock()
        self.table.put_many(message_id, sorted(set(recipients)), written=now)
        if now >= self._next_prune:
            self.prune()

    def prune(self) -> int:
        """Forget deliveries older than the longest window; returns how many."""
        now = self.clock()
        removed = self.table.expire_older_than(now - self.retention)
        self._next_prune = now + PRUNE_INTERVAL
        return removed


@dataclass(eq=False)
class DedupeOptions:
    """One account's options, plus the store ``configure`` attaches.

    The store hangs off the options rather than a module global so that two configs loaded in one process (a
    reload, tests) never share a database handle.
    """

    window: float = DEFAULT_WINDOW
    store: DedupeStore | None = field(default=None, repr=False)


@hookimpl
def parse_plugin_options(name: str, options: Node, problems: Problems) -> DedupeOptions | None:
    if name != PLUGIN_NAME:
        return None
    section = Section(options, problems, what="a mapping such as {window: 7d}")
    window = section.get("window", duration, DEFAULT_WINDOW)
    section.finish({"window"})
    return DedupeOptions(window)


@hookimpl
def configure(config: Config) -> None:
    options = _options_in_use(config)
    if not options:
        return
    try:
        store = DedupeStore.open(config.state_dir, retention=max(o.window for o in options), clock=clock,
                                 busy_timeout=config.state_busy_timeout)
    except StateError as exc:
        raise ConfigError(f"dedupe: {exc}") from None
    for option in options:
        option.store = store


@hookimpl
def unconfigure(config: Config) -> None:
    options = _options_in_use(config)
    stores = {id(o.store): o.store for o in options if o.store is not None}
    for option in options:
        option.store = None
    for store in stores.values():
        store.close()


def _options_in_use(config: Config) -> list[DedupeOptions]:
    return [account.options_for(PLUGIN_NAME) for account in config.accounts if account.uses(PLUGIN_NAME)]


@hookimpl(trylast=True)
def filter_message(message: Message, account: Account) -> Verdict | None:
    message_id = normalized_message_id(message)
    if message_id is None:
        return None
    store, window = _store_and_window(account)
    recipients = recipient_keys(message, account)
    try:
        delivered_at = store.last_delivery(account.name, message.uid, message_id, recipients, window)
    except StateError as exc:
        log.error("dedupe.check_failed", error=str(exc), action="delivering the message")
        return None
    if delivered_at is not None:
        return Verdict.drop(f"duplicate of a message delivered at {_timestamp(delivered_at)}")
    store.hold(account.name, message.uid, message_id, recipients)
    return None


@hookimpl
def message_delivered(message: Message, account: Account) -> None:
    store, _ = _store_and_window(account)
    store.release(account.name, message.uid)
    message_id = normalized_message_id(message)
    if message_id is not None:
        store.remember(message_id, recipient_keys(message, account))


@hookimpl
def message_failed(message: Message, account: Account) -> None:
    _store_and_window(account)[0].release(account.name, message.uid)


@hookimpl
def message_dropped(message: Message, account: Account) -> None:
    _store_and_window(account)[0].release(account.name, message.uid)


@hookimpl
def poll_started(account: Account) -> None:
    _store_and_window(account)[0].release(account.name)


@hookimpl
def poll_finished(account: Account) -> None:
    _store_and_window(account)[0].release(account.name)


def _store_and_window(account: Account) -> tuple[DedupeStore, float]:
    options: DedupeOptions = account.options_for(PLUGIN_NAME)
    store = options.store
    if store is None:
        raise RuntimeError("dedupe is not configured: the configure hook was not called with this config")
    return store, options.window


def normalized_message_id(message: Message) -> str | None:
    """The Message-ID without any whitespace (folding); None when absent or empty."""
    value = message.message_id
    if not value:
        return None
    return re.sub(r"\s+", "", value) or None


def recipient_keys(message: Message, account: Account) -> list[str]:
    """Who this message goes to, as compared between copies (see the module docstring)."""
    if message.recipients:
        return sorted({address.lower() for address in message.recipients})
    destinations = message.destinations if message.destinations is not None else account.destinations
    keys: set[str] = set()
    for destination in destinations:
        recipients = getattr(destination.settings, "recipients", None)
        if recipients:
            keys.update(address.lower() for address in recipients)
        else:
            keys.add(f"account:{account.name}")
    return sorted(keys) or [f"account:{account.name}"]


def _timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
