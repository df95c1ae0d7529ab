"""Helper processes of the benchmark (SMTP sinks, the delaying relay): stopping them the same way."""

from __future__ import annotations

import subprocess


def stop_child(process: subprocess.Popen[str] | None) -> None:
    """SIGTERM, then SIGKILL after 5 s; reaps the process either way."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
