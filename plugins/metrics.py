"""Prometheus metrics per account: messages, bytes, polls, failures and poll durations.

Optional; enable it with ``plugins: {metrics: {textfile: /var/lib/prometheus/node-exporter/postbote.prom}}`` for
node-exporter's textfile collector (rewritten atomically after polls: within a second in the daemon, and when
``postbote poll`` ends, so it suits a timer as well as the daemon) and/or ``listen: 127.0.0.1:9465`` for an HTTP
endpoint serving ``/metrics``. The endpoint only binds to loopback addresses unless ``allow_remote: true`` says
otherwise: the metrics name the accounts and their errors' frequency, which is nobody else's business.

The numbers come from the state store (the same running totals and waiting messages ``postbote status`` shows),
read through a read-only store when a scrape or a textfile write follows polls (the accounts polled meanwhile all
at once), so the counters survive restarts and do not depend on which process polled. ``postbote_messages_waiting`` and
``postbote_messages_stale`` are what to alert on: mail that stays on the server instead of arriving.

With a shared state (``state: postgresql://...``, several workers) the per-account figures are those of all workers
together, and ``postbote_worker_*`` give each worker's own, labelled ``worker`` (its id, as ``postbote status``
shows it): polls and failures since it started, the accounts it holds leases on, and its last heartbeat -- a
heartbeat that stops moving is a worker that died or lost the database.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from socket import AF_INET, AF_INET6
from typing import TYPE_CHECKING

from postbote import (
    Account,
    Config,
    ConfigError,
    Node,
    PollRecord,
    PostboteError,
    Problems,
    Section,
    WaitingMessage,
    WaitingSummary,
    WorkerFigures,
    boolean,
    get_logger,
    hookimpl,
    nonempty_text,
    path_relative_to,
    read_accounts_state,
    read_workers,
    stale_after,
)

if TYPE_CHECKING:
    from http.server import ThreadingHTTPServer

NAME = "metrics"
DEFAULT_PORT = 9465
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
HTTP_TIMEOUT = 10.0
MESSAGE_OUTCOMES = ("delivered", "dropped", "rejected", "deferred")
# The textfiles are written after polls finish, at most once every WRITE_INTERVAL seconds and for at most WRITE_SHARE
# of the time (`MetricsExporter`): node-exporter reads them every 15 s or so, and a daemon finishes hundreds of polls
# a second.
WRITE_INTERVAL = 1.0
WRITE_SHARE = 0.1

log = get_logger("postbote.metrics")


@dataclass(frozen=True)
class MetricsSettings:
    textfile: Path | None = None
    listen: tuple[str, int] | None = None
    allow_remote: bool = False


@hookimpl
def parse_plugin_options(name: str, options: Node, problems: Problems, base_dir: Path) -> MetricsSettings | None:
    if name != NAME:
        return None
    before = problems.reported
    section = Section(options, problems)
    settings = MetricsSettings(textfile=section.get("textfile", path_relative_to(base_dir), None),
                               listen=section.get("listen", listen_address, None),
                               allow_remote=section.get("allow_remote", boolean, False))
    section.finish({"textfile", "listen", "allow_remote"})
    if settings.textfile is None and settings.listen is None:
        if problems.reported == before:  # else what is wrong with them is said already
            section.problem("give textfile: PATH (for node-exporter's textfile collector) and/or "
                            f"listen: 127.0.0.1:{DEFAULT_PORT} (an HTTP endpoint)")
        return None
    if settings.textfile is not None and settings.textfile.suffix != ".prom":
        section.problem("textfile: node-exporter reads only files ending in .prom", section.raw("textfile"))
    if settings.listen is not None and not settings.allow_remote and not _is_loopback(settings.listen[0]):
        section.problem(f"listen: {settings.listen[0]} is not a loopback address, so anyone on the network could "
                        f"read the metrics; use 127.0.0.1 or ::1, or set allow_remote: true", section.raw("listen"))
    return settings


def listen_address(value: object) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9465`` for IPv6) with HOST an IP address or ``localhost``."""
    expected = f"expected HOST:PORT such as 127.0.0.1:{DEFAULT_PORT} or [::1]:{DEFAULT_PORT}"
    text = nonempty_text(value)
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(expected)
    host = "127.0.0.1" if host == "localhost" else host.removeprefix("[").removesuffix("]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(expected + " (an IP address, not a host name)") from None
    return host, int(port)


def _is_loopback(host: str) -> bool:
    return ipaddress.ip_address(host).is_loopback


# --- rendering


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


Samples = Callable[[PollRecord, WaitingSummary], list[tuple[str, float]]]
# name, type, help, and each account's samples: (a suffix such as "_sum" or extra labels such as ',outcome="x"', value)
FAMILIES: list[tuple[str, str, str, Samples]] = [
    ("postbote_messages_total", "counter", "Messages handled, by outcome (deferred counts every attempt).",
     lambda r, w: [(f',outcome="{o}"', r.totals.get(o, 0)) for o in MESSAGE_OUTCOMES]),
    ("postbote_bytes_total", "counter", "Bytes of messages fetched.", lambda r, w: [("", r.totals.get("bytes", 0))]),
    ("postbote_polls_total", "counter", "Polls finished, successful or not.", lambda r, w: [("", r.polls)]),
    ("postbote_poll_failures_total", "counter", "Polls that failed (connection, TLS, login, protocol).",
     lambda r, w: [("", r.failures)]),
    ("postbote_poll_duration_seconds", "summary", "Time spent polling.",
     lambda r, w: [("_sum", r.duration_total), ("_count", r.polls)]),
    ("postbote_last_poll_duration_seconds", "gauge", "Duration of the last poll.", lambda r, w: [("", r.duration)]),
    ("postbote_last_poll_timestamp_seconds", "gauge", "When the last poll finished (Unix time).",
     lambda r, w: [("", r.finished)]),
    ("postbote_last_poll_success", "gauge", "1 if the last poll succeeded, else 0.", lambda r, w: [("", int(r.ok))]),
    ("postbote_last_success_timestamp_seconds", "gauge", "When the last successful poll finished (Unix time).",
     lambda r, w: [("", r.last_success)] if r.last_success is not None else []),
    ("postbote_consecutive_poll_failures", "gauge", "Failed polls since the last success.",
     lambda r, w: [("", r.failure_streak)]),
    ("postbote_messages_left", "gauge", "Messages left on the server by the last poll.",
     lambda r, w: [("", r.counts.get("left", 0))]),
    ("postbote_messages_waiting", "gauge",
     "Messages waiting on the server: deferred (retried every poll) or rejected (until postbote retry).",
     lambda r, w: [(',state="deferred"', w.deferred), (',state="rejected"', w.rejected)]),
    ("postbote_messages_stale", "gauge", "Messages that have waited longer than the account's stale_after.",
     lambda r, w: [("", w.stale)]),
]
NOTHING_WAITING = WaitingSummary()


def render(records: Iterable[PollRecord], waiting: Mapping[str, WaitingSummary] | None = None) -> str:
    """The Prometheus text exposition format (version 0.0.4) for the given accounts' poll records and the messages
    waiting on their servers (``waiting``, by account name; none where missing)."""
    waiting = waiting or {}
    return render_samples(account_samples(record, waiting.get(record.account, NOTHING_WAITING))
                          for record in sorted(records, key=lambda r: r.account))


def account_samples(record: PollRecord, waits: WaitingSummary) -> tuple[str, ...]:
    """One account's lines of each family in `FAMILIES` (several joined, or empty): what `render_samples` puts
    together, and what the exporter keeps while the account's figures stay the same."""
    account = f'account="{_label(record.account)}"'
    blocks = []
    for name, _kind, _help, samples in FAMILIES:
        lines = []
        for extra, value in samples(record, waits):
            suffix, labels = (extra, "") if extra.startswith("_") else ("", extra)
            lines.append(f"{name}{suffix}{{{account}{labels}}} {_number(value)}")
        blocks.append("\n".join(lines))
    return tuple(blocks)


def render_samples(accounts: Iterable[tuple[str, ...]]) -> str:
    """The exposition of the accounts' `account_samples`, family by family, in the order given."""
    return "".join(exposition(accounts))


def exposition(accounts: Iterable[tuple[str, ...]]) -> Iterator[str]:
    """`render_samples` in pieces, a family at a time: a textfile of 100,000 accounts (130 MB) is written without
    being held whole."""
    accounts = list(accounts)
    for index, (name, kind, help_text, _samples) in enumerate(FAMILIES):
        blocks = [blocks[index] for blocks in accounts if blocks[index]]
        yield "\n".join([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *blocks]) + "\n"


def render_workers(workers: Iterable[WorkerFigures]) -> str:
    """The ``postbote_worker_*`` families of a shared state's workers (nothing when there are none)."""
    workers = sorted(workers, key=lambda w: w.id)
    if not workers:
        return ""
    families: list[tuple[str, str, str, Callable[[WorkerFigures], float]]] = [
        ("postbote_worker_polls_total", "counter", "Polls a worker finished since it started.", lambda w: w.polls),
        ("postbote_worker_poll_failures_total", "counter", "Polls of a worker that failed.", lambda w: w.failures),
        ("postbote_worker_leases", "gauge", "Accounts a worker holds leases on now (polling or about to).",
         lambda w: w.holding),
        ("postbote_worker_heartbeat_timestamp_seconds", "gauge", "A worker's last heartbeat (Unix time).",
         lambda w: w.heartbeat),
    ]
    lines: list[str] = []
    for name, kind, help_text, value in families:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        lines += [f'{name}{{worker="{_label(w.id)}",host="{_label(w.host)}"}} {_number(value(w))}'
                  for w in workers]
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def write_textfile(path: Path, pieces: Iterable[str]) -> None:
    """Replace ``path`` with the text in ``pieces`` atomically (temporary file and rename), readable by
    node-exporter's user."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), 0o644)
            handle.writelines(pieces)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


# --- serving


class MetricsServer:
    """The HTTP endpoint of one ``listen:`` address, serving ``/metrics`` from its own thread."""

    def __init__(self, address: tuple[str, int], render_metrics: Callable[[], str]) -> None:
        self._httpd = _http_server(address, render_metrics)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name=f"metrics-{address[1]}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(HTTP_TIMEOUT)


def _http_server(address: tuple[str, int], render_metrics: Callable[[], str]) -> ThreadingHTTPServer:
    # Imported here: only listen: needs http.server, and it costs some 10 ms at every start-up.
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        timeout = HTTP_TIMEOUT

        def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
            if self.path.split("?", 1)[0] != "/metrics":
                self._reply(404, "not found; metrics are at /metrics\n")
                return
            self._reply(200, render_metrics())

        def _reply(self, code: int, text: str) -> None:
            body = text.encode("utf-8")
            self.send_response(code)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server's signature
            """Scrapes are not worth a log line each."""

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        address_family = AF_INET6 if ":" in address[0] else AF_INET

    return Server(address, Handler)


class MetricsExporter:
    """The metrics of the accounts that enable the plugin, written to their textfiles and served on their ports.

    A finished poll only marks its account's figures as out of date (`poll_finished`): they are read from the state
    store, together with those of every other account polled meanwhile, when a scrape asks or when the textfiles are
    written next -- by a writer thread, at most once every `WRITE_INTERVAL` seconds, and never more than
    `WRITE_SHARE` of the time (a file of 100,000 accounts takes a while to render). A daemon polling hundreds of
    accounts a second then reads the state and renders each file once a second, not once a poll. What is still out
    of date when the plugin stops (a `postbote poll` ending, a reload) is written then."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._clock = clock
        self.textfiles: dict[Path, list[str]] = {}
        self.listeners: dict[tuple[str, int], list[str]] = {}
        for account in config.accounts:
            settings: MetricsSettings | None = account.options_for(NAME) if account.uses(NAME) else None
            if settings is None:
                continue
            if settings.textfile is not None:
                self.textfiles.setdefault(settings.textfile, []).append(account.name)
            if settings.listen is not None:
                self.listeners.setdefault(settings.listen, []).append(account.name)
        for names in (*self.textfiles.values(), *self.listeners.values()):
            names.sort()  # the order they are shown in, sorted once
        self._accounts = {account.name: account for account in config.accounts}
        self._records: dict[str, PollRecord] = {}
        self._waiting: dict[str, list[WaitingMessage]] = {}
        # each account's lines, kept while its record and waiting messages stay the same (`account_samples`)
        self._samples: dict[str, tuple[PollRecord, WaitingSummary, tuple[str, ...]]] = {}
        self._lock = threading.Lock()
        self._out_of_date: set[str] = set()  # accounts polled since their figures were read
        self._unwritten: set[str] = set()  # accounts polled since their textfiles were written (a scrape reads them
        # too, which must not keep their files from being written)
        self._out_of_date_lock = threading.Lock()
        self._servers: list[MetricsServer] = []
        self._polled = threading.Event()  # wakes the writer
        self._closing = threading.Event()
        self._writer: threading.Thread | None = None

    def start(self) -> None:
        for path in self.textfiles:
            if not path.parent.is_dir():
                raise ConfigError(f"plugins.metrics.textfile: {path.parent} is not a directory")
        self.refresh(*{name for names in (*self.textfiles.values(), *self.listeners.values()) for name in names})
        for address, names in self.listeners.items():
            try:
                self._servers.append(MetricsServer(address, functools.partial(self.render, names)))
            except OSError as exc:
                self.close()
                raise ConfigError(f"plugins.metrics.listen: cannot listen on {_show(address)}: "
                                  f"{exc.strerror or exc}") from None
            log.info("metrics.listening", address=_show(address), accounts=len(names))
        self.write_textfiles()
        if self.textfiles:
            self._writer = threading.Thread(target=self._write_when_polled, name="metrics-textfiles", daemon=True)
            self._writer.start()

    def poll_finished(self, account: str) -> None:
        """``account``'s figures changed: read again at the next scrape or textfile write."""
        with self._out_of_date_lock:
            self._out_of_date.add(account)
            if self._writer is not None:
                self._unwritten.add(account)
                self._polled.set()

    def refresh(self, *accounts: str) -> None:
        """Read the accounts' latest poll records and waiting messages from the state store (read-only, at once)."""
        try:
            states = read_accounts_state(self.config, accounts)
        except PostboteError as exc:
            log.warning("metrics.state_unreadable", error=str(exc))
            with self._out_of_date_lock:  # read again next time
                self._out_of_date.update(accounts)
            return
        with self._lock:
            for name, state in states.items():
                self._records[name] = state.last_poll
                self._waiting[name] = state.waiting

    def _refresh_out_of_date(self) -> None:
        """Read the accounts polled since they were last read."""
        with self._out_of_date_lock:
            accounts, self._out_of_date = self._out_of_date, set()
        if accounts:
            self.refresh(*accounts)

    def _take_unwritten(self) -> set[str]:
        """The accounts polled since the textfiles were written (a poll finishing from now on is written next time)."""
        with self._out_of_date_lock:
            accounts, self._unwritten = self._unwritten, set()
        return accounts

    def render(self, accounts: list[str]) -> str:
        """The metrics of ``accounts``, every finished poll included; staleness is judged now, so a scrape sees mail
        turn stale between polls."""
        return "".join(self._exposition(accounts))

    def _exposition(self, accounts: list[str]) -> Iterator[str]:
        """`render` in pieces (see `exposition`)."""
        self._refresh_out_of_date()
        now = self._clock()
        with self._lock:
            samples = [self._account_samples(name, record, now) for name in accounts
                       if (record := self._records.get(name)) is not None]
        yield from exposition(samples)
        yield self._workers()

    def _account_samples(self, name: str, record: PollRecord, now: float) -> tuple[str, ...]:
        messages = self._waiting.get(name)
        waits = WaitingSummary.of(messages, now=now, stale_after=stale_after(self._accounts[name])) if messages \
            else NOTHING_WAITING
        kept = self._samples.get(name)
        if kept is None or kept[0] is not record or kept[1] != waits:
            kept = self._samples[name] = (record, waits, account_samples(record, waits))
        return kept[2]

    def _workers(self) -> str:
        """The workers of a shared state, read at each render (a scrape, a textfile write)."""
        if self.config.state is None:
            return ""
        try:
            return render_workers(read_workers(self.config))
        except PostboteError as exc:
            log.warning("metrics.workers_unreadable", error=str(exc))
            return ""

    def write_textfiles(self, only: set[str] | None = None) -> None:
        """Write every textfile, or with ``only`` those showing one of these accounts."""
        for path, names in self.textfiles.items():
            if only is not None and only.isdisjoint(names):
                continue
            try:
                write_textfile(path, self._exposition(names))
            except OSError as exc:
                log.warning("metrics.textfile_failed", path=str(path), error=exc.strerror or str(exc))

    def _write_when_polled(self) -> None:
        """The writer thread: after polls finish, the textfiles that show them, then a pause (see the class)."""
        while not self._closing.is_set():
            self._polled.wait()
            if self._closing.is_set():
                return
            self._polled.clear()
            started = time.monotonic()
            try:
                self.write_textfiles(self._take_unwritten())
            except Exception as exc:  # noqa: BLE001 - a bug here must not end the writing for good, unseen
                log.error("metrics.write_failed", error=f"{type(exc).__name__}: {exc}")
            if self._closing.wait(max(WRITE_INTERVAL, (time.monotonic() - started) / WRITE_SHARE)):
                return

    def close(self) -> None:
        if self._writer is not None:
            self._closing.set()
            self._polled.set()
            self._writer.join()
            self._writer = None
            self.write_textfiles(self._take_unwritten())  # the polls since the last write
        for server in self._servers:
            server.close()
        self._servers = []


def _show(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_exporter: MetricsExporter | None = None


@hookimpl
def configure(config: Config) -> None:
    global _exporter
    unconfigure()
    if not any(account.uses(NAME) for account in config.accounts):
        return
    exporter = MetricsExporter(config)
    exporter.start()
    _exporter = exporter


@hookimpl
def poll_finished(account: Account) -> None:
    exporter = _exporter
    if exporter is not None and account.uses(NAME):
        exporter.poll_finished(account.name)


@hookimpl
def unconfigure() -> None:
    global _exporter
    if _exporter is not None:
        _exporter.close()
        _exporter = None
