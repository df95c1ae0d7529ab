"""Running one tool invocation (or a sequence of them) and measuring wall time and peak RSS.

Peak RSS is ``ru_maxrss`` from ``wait4`` -- the largest resident set of any single process in the reaped
tree (msmtp under mpop, safecat under fetchmail, the Python process that is postbote): what
``/usr/bin/time -v`` calls "Maximum resident set size". It has to be taken by a *small* parent: Linux
carries a process's high-water mark across ``exec`` (``signal->maxrss``), so a child forked from this
~30 MB Python driver would report at least 30 MB whatever it ran. GNU time (a few hundred kB) forks the
tool and writes the figure to a file (``-f %M``); wall time is taken here around the whole invocation.
For a sequence, the peak is the largest over all commands and the wall time their sum.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from bench.environment import RunUser, find_binary


@dataclass
class Measurement:
    wall: float = 0.0
    peak_rss_kb: int = 0
    exit_codes: list[int] = field(default_factory=list)
    timed_out: bool = False


def run_measured(commands: list[list[str]], *, user: RunUser, env: dict[str, str], cwd: Path, log: Path,
                 timeout: float) -> Measurement:
    """Run ``commands`` one after another (stopping at a timeout); stdout and stderr go to ``log``."""
    gnu_time = find_binary("time")
    if gnu_time is None:
        raise RuntimeError("GNU time is needed to measure peak RSS (apt-get install time)")
    result = Measurement()
    deadline = time.monotonic() + timeout
    with log.open("ab") as output, tempfile.TemporaryDirectory(prefix="pbbench-time-") as scratch:
        os.chmod(scratch, 0o777)
        rss_file = Path(scratch) / "rss"
        started = time.perf_counter()
        for argv in commands:
            output.write(f"$ {' '.join(argv)}\n".encode())
            output.flush()
            wrapped = [gnu_time, "-f", "%M", "-o", str(rss_file), "--", *argv]
            code, timed_out = _run_one(wrapped, user=user, env=env, cwd=cwd, output=output,
                                       timeout=max(0.1, deadline - time.monotonic()))
            result.exit_codes.append(code)
            result.peak_rss_kb = max(result.peak_rss_kb, _read_rss(rss_file))
            if timed_out:
                result.timed_out = True
                break
        result.wall = time.perf_counter() - started
    return result


def _read_rss(path: Path) -> int:
    """The last line of GNU time's output file (earlier lines may say the command was killed)."""
    try:
        lines = path.read_text().split()
    except FileNotFoundError:
        return 0
    return int(lines[-1]) if lines and lines[-1].isdigit() else 0


def _run_one(argv: list[str], *, user: RunUser, env: dict[str, str], cwd: Path, output: BinaryIO,
             timeout: float) -> tuple[int, bool]:
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=output, stderr=output,
                            start_new_session=True, **user.popen_args())
    expired = threading.Event()

    def kill() -> None:
        expired.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    timer = threading.Timer(timeout, kill)
    timer.start()
    try:
        proc.wait()
    finally:
        timer.cancel()
    return proc.returncode, expired.is_set()
