"""structlog set-up: JSON lines for machines (journald, files), readable colourless-or-coloured lines on a terminal.

Events are dotted nouns (``poll.finished``, ``message.delivered``) with snake_case keys; the account and the UID are
bound as context by the poller, so every event about a message says which one. The standard library's loggers
render through the same chain, so nothing prints in another format.

Nothing secret reaches the output: tracebacks never show frame locals (a frame holding the password would print
it), and the last processor before rendering masks every secret `postbote.credentials` knows of, in every value,
the rendered exception included, for structlog events and standard-library records alike.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any, TextIO

import structlog
from postbote.credentials import knows_secrets, redact
from postbote.errors import ConfigError

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
# syslog priorities (sd-daemon(3)): a line journald reads from a service's stderr may start with <N>.
PRIORITIES = {"debug": 7, "info": 6, "warning": 4, "error": 3, "exception": 3, "critical": 2}


class JournalPriority:
    """Prefixes each rendered line with its syslog priority (``<3>`` for an error), so that ``journalctl -p err``
    shows postbote's errors; used only when stderr is the journal itself (systemd's ``JOURNAL_STREAM``)."""

    def __init__(self, renderer: structlog.typing.Processor) -> None:
        self.renderer = renderer

    def __call__(self, logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> Any:
        priority = PRIORITIES.get(str(event_dict.get("level", method)).lower(), 6)
        rendered = self.renderer(logger, method, event_dict)
        text = rendered.decode() if isinstance(rendered, bytes) else str(rendered)
        return f"<{priority}>{text}"


def writes_to_the_journal(stream: TextIO) -> bool:
    """Whether ``stream`` is the journal stream systemd connected (``JOURNAL_STREAM`` is its device:inode)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        status = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return bool(expected) and expected == f"{status.st_dev}:{status.st_ino}"


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time of each event, not the stream it was when configured."""

    def __init__(self) -> None:
        super().__init__()

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None,
                      file: Path | None = None) -> None:
    """Log at ``level`` in ``fmt`` to ``stream`` (default: stderr), or appended to ``file``: opened anew at each
    call, so the SIGHUP reload, which calls this again, follows a file logrotate has moved away."""
    handler: logging.Handler
    if file is not None:
        try:
            handler = logging.FileHandler(file, encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"log.file: cannot open {file} for appending: {exc.strerror or exc}") from None
        stream = handler.stream
    else:
        handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    stream = stream or sys.stderr
    use_console = fmt == "console" or (fmt == "auto" and stream.isatty())
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor
    if use_console:
        # A plain text traceback, rendered before redaction; the renderer's own formatter is set to one without
        # locals too, in case an exception ever reaches it (rich's, the default when rich is installed, shows them).
        shared.append(structlog.processors.ExceptionRenderer())
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty(),
                                                 exception_formatter=structlog.dev.plain_traceback)
    else:
        shared.append(structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)))
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    if writes_to_the_journal(stream):
        renderer = JournalPriority(renderer)
    handler.setFormatter(_EventFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, redact_secrets, renderer],
    ))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()  # a log file: closed, so that the moved file is let go
    root.addHandler(handler)
    root.setLevel(LEVELS[level])
    _skip_unrendered_record_fields()
    structlog.configure(
        # Events below the level are dropped first, before any formatting work is done for them.
        processors=[structlog.stdlib.filter_by_level, *shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=_LevelFirstLogger,
        cache_logger_on_first_use=False,
    )


class _LevelFirstLogger(structlog.stdlib.BoundLogger):
    """structlog's standard-library logger that drops a debug or info event below the logger's level before any work
    is done for it: the same decision `structlog.stdlib.filter_by_level` makes as the first processor, taken before
    the context is copied and the processor chain entered. A poll logging at ``warning`` drops one event per message.
    Only while that filter leads the chain: a test capturing every event (`structlog.testing.capture_logs`) gets
    them all."""

    def debug(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        if self._dropped(logging.DEBUG):
            return None
        return self._proxy_to_logger("debug", event, *args, **kw)

    def info(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        if self._dropped(logging.INFO):
            return None
        return self._proxy_to_logger("info", event, *args, **kw)

    def _dropped(self, level: int) -> bool:
        processors: Any = self._processors  # the configured list
        return bool(processors) and processors[0] is structlog.stdlib.filter_by_level \
            and not self._logger.isEnabledFor(level)


class ModuleLogger:
    """A module's logger (``log = get_logger("postbote.poll")``): structlog's lazy proxy, but assembled once per
    configuration rather than at every event. The proxy builds a bound logger -- and looks up the standard
    library's logger under its lock -- for each call, a dropped debug event included; this one builds it when
    structlog's configuration is another than the last time (a reconfiguration, a test's ``capture_logs``, which
    changes the processors in place, is seen by the logger built before it)."""

    __slots__ = ("_name", "_logger", "_processors", "_wrapper", "_factory", "_context")

    def __init__(self, name: str) -> None:
        self._name = name
        self._logger: Any = None
        self._processors = self._wrapper = self._factory = self._context = None

    def __getattr__(self, attribute: str) -> Any:
        config = structlog.get_config()
        if (self._logger is None or config["processors"] is not self._processors
                or config["wrapper_class"] is not self._wrapper or config["logger_factory"] is not self._factory
                or config["context_class"] is not self._context):
            self._logger = structlog.get_logger(self._name).bind()
            self._processors, self._wrapper = config["processors"], config["wrapper_class"]
            self._factory, self._context = config["logger_factory"], config["context_class"]
        return getattr(self._logger, attribute)


def get_logger(name: str) -> Any:
    """The logger of a module (or plugin) called ``name``: events go through the configured chain, as structlog's
    own ``get_logger`` does, for less (see `ModuleLogger`)."""
    return ModuleLogger(name)


class HeldBack(logging.Handler):
    """Routine events (below WARNING) wait in memory until `finish` says whether to print them: a cron job mails
    whatever a command prints, so a poll in which nothing happened must print nothing. A warning or an error prints
    at once, the events held before it first, and so does everything after it; so does everything once `CAPACITY`
    events are held (memory stays bounded, and that many events are something happening)."""

    CAPACITY = 10_000

    def __init__(self, target: logging.Handler) -> None:
        super().__init__()
        self.target = target
        self.held: list[logging.LogRecord] = []
        self.passing = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.passing and record.levelno < logging.WARNING and len(self.held) < self.CAPACITY:
            self.held.append(record)
            return
        self.let_through()
        self.target.handle(record)

    def let_through(self) -> None:
        """Print the events held, and every event from now on. (Not ``release``: that is `logging.Handler`'s
        lock.)"""
        self.passing = True
        held, self.held = self.held, []
        for record in held:
            self.target.handle(record)

    def finish(self, *, something_happened: bool) -> None:
        """Print the held events if ``something_happened`` (else forget them), and log straight to the stream
        again."""
        if something_happened:
            self.let_through()
        self.held = []
        root = logging.getLogger()
        if self in root.handlers:
            root.removeHandler(self)
            root.addHandler(self.target)


def hold_back_routine_events() -> HeldBack | None:
    """Under cron -- logging at the default level (info) to a stderr that is neither a terminal nor the journal --
    hold routine events back (`HeldBack`); None, and nothing changed, anywhere else."""
    root = logging.getLogger()
    if root.level != logging.INFO or len(root.handlers) != 1 or not isinstance(root.handlers[0], _StderrHandler):
        return None
    if sys.stderr.isatty() or writes_to_the_journal(sys.stderr):
        return None
    target = root.handlers[0]
    held = HeldBack(target)
    root.removeHandler(target)
    root.addHandler(held)
    return held


class _EventFormatter(structlog.stdlib.ProcessorFormatter):
    """structlog's formatter, with a short way for postbote's own events: their event dict is masked and rendered
    as it is (copied, as another handler may format the same record), without the copy of the whole record and the
    standard library's formatting around it that the general way makes -- a fifth of each event's cost, and a
    message's delivery logs one. Records from the standard library take the general way."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # what the general way adds (and removes again) is not there on the short way
        meta = structlog.stdlib.ProcessorFormatter.remove_processors_meta
        self._rendering = [processor for processor in self.processors if processor is not meta]

    def format(self, record: logging.LogRecord) -> str:
        method = getattr(record, "_name", None)
        if method is None or not isinstance(record.msg, dict) or not hasattr(record, "_logger"):
            return super().format(record)
        event: Any = dict(record.msg)
        for processor in self._rendering:
            event = processor(None, method, event)
        return event if isinstance(event, str) else str(event)


def redact_secrets(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Mask every known secret in the event: in every value, nested dicts and lists, the rendered exception.
    Runs last before the renderer, on structlog events and standard-library records alike."""
    if not knows_secrets() or _shows_no_secret(event_dict):
        return event_dict
    for key, value in list(event_dict.items()):
        masked = _redacted(value)
        if masked is not value:
            event_dict[key] = masked
    return event_dict


_PLAIN = (int, float, bool, type(None))
_PLAIN_TYPES = frozenset(_PLAIN)  # the exact types, told by one lookup (subclasses go by isinstance)


def _shows_no_secret(event_dict: MutableMapping[str, Any]) -> bool:
    """True when the event's values are text, lists of text and numbers only, and none shows a secret (the same
    event names and account names come back in every line: `redact` remembers them clean). The timestamp is made
    from the clock, after the event's own values: not searched. False sends the event value by value through
    `_redacted`: nested values and objects, or a secret found."""
    for key, value in event_dict.items():
        kind = type(value)
        if kind in _PLAIN_TYPES:
            continue
        if kind is str:
            if key != "timestamp" and redact(value) is not value:
                return False
        elif kind in (list, tuple):
            if not all(type(item) is str and redact(item) is item for item in value):
                return False  # the destinations of a message are text, say; anything else is looked at closely
        elif not isinstance(value, _PLAIN):
            return False
    return True


def _redacted(value: Any) -> Any:
    """``value`` itself when it shows no secret, else a copy (or, for an object, its repr) with each one masked."""
    if isinstance(value, str):
        masked = redact(value)
        return value if masked == value else masked
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, dict):
        pairs = [(_redacted(key), _redacted(item)) for key, item in value.items()]
        unchanged = all(new_key is key and new_item is item
                        for (new_key, new_item), (key, item) in zip(pairs, value.items(), strict=True))
        return value if unchanged else dict(pairs)
    if type(value) in (list, tuple):
        items = [_redacted(item) for item in value]
        return value if all(a is b for a, b in zip(items, value, strict=True)) else type(value)(items)
    # Anything else is rendered with its repr: an exception, a path, a set, an object. Kept unless that shows a secret.
    shown = repr(value)
    masked = redact(shown)
    return value if masked == shown else masked


def _skip_unrendered_record_fields() -> None:
    """Leave out of every log record what no renderer of ours prints: the caller's file and line (a stack walk per
    event), the thread and process names. The logging HOWTO's "Optimization" section names these switches; they
    take about a sixth off each event, and a poll logs one event per message."""
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


class bound:  # noqa: N801 - used as a function: ``with bound(uid=...):``
    """Log ``values`` with every event inside the block (``uid`` of the message in hand), as structlog's
    ``bound_contextvars`` does, for less: it sets and resets only these variables instead of copying the whole
    context first, and is a class rather than a generator, which matters on the per-message path."""

    __slots__ = ("_values", "_tokens")

    def __init__(self, **values: Any) -> None:
        self._values = values
        self._tokens: Mapping[str, Any] = {}

    def __enter__(self) -> None:
        self._tokens = structlog.contextvars.bind_contextvars(**self._values)

    def __exit__(self, *_exc: object) -> None:
        structlog.contextvars.reset_contextvars(**self._tokens)
