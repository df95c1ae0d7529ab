"""The CLI's error boundary, in one place: an error meant for the admin is one line on stderr and an exit status.

A `ConfigError` (usage, configuration, a plugin that cannot start) exits 2; any other `PostboteError` exits 1; a
reader of our output that went away (``postbote plugins | head -1``) exits 1 silently; Ctrl-C exits 130.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TextIO

from postbote.errors import ConfigError, PostboteError
from postbote.jobs import ExitStatus

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


def guarded(command: Callable[[], int]) -> int:
    """Run ``command`` and return its exit status, or the exit status of the error that stopped it."""
    try:
        status = command()
        sys.stdout.flush()  # a closed pipe is noticed here, inside the handlers below, not at interpreter exit
        return status
    except ConfigError as exc:
        print_error(exc)
        return ExitStatus.USAGE
    except PostboteError as exc:
        print_error(exc)
        return ExitStatus.FAILED
    except BrokenPipeError:
        _discard_stdout()
        return ExitStatus.FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def print_error(exc: PostboteError, out: TextIO | None = None) -> None:
    for line in _redacted(str(exc)).splitlines():
        print(f"postbote: error: {line}", file=out or sys.stderr)


def _discard_stdout() -> None:
    """The reader of our output went away: say nothing more, and point stdout at /dev/null so that Python's own
    flush at exit does not report the broken pipe with a traceback either."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is no real file (a test's capture): nothing is flushed at exit anyway
        pass


def _redacted(text: str) -> str:
    """``text`` without any secret postbote knows of: an error message may quote what a server or a command said."""
    from postbote.credentials import redact  # imported on the error path only: start-up stays lean

    return redact(text)
