"""The suite's own watchdog (`tests.harness.body_watched`, `fixtures_watched`): a test that hangs ends the run within
a bound, and leaves its name and every thread's stack in the hang report that `.ci/run` prints, instead of
running into CI's time limit with nothing to show (pytest holds file descriptor 2 while a test runs, so the stacks
cannot go to stderr)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.harness import REPO_ROOT


def test_a_hanging_test_ends_the_run_and_leaves_its_name_and_stacks_in_the_hang_report(tmp_path: Path) -> None:
    hanging = tmp_path / "test_hangs.py"
    hanging.write_text(textwrap.dedent("""
        import threading
        import time


        def test_waits_for_an_answer_that_never_comes():
            threading.Event().wait()
    """))
    report = tmp_path / "hang.txt"
    env = {**os.environ, "POSTBOTE_TEST_BACKSTOP": "1", "POSTBOTE_HANG_REPORT": str(report)}
    done = subprocess.run([sys.executable, "-m", "pytest", str(hanging), "-q", "-p", "no:cacheprovider",
                           "-p", "tests.conftest"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0
    written = report.read_text()
    assert "test_hangs.py::test_waits_for_an_answer_that_never_comes (after 1 s)" in written
    assert "Thread 0x" in written and "in test_waits_for_an_answer_that_never_comes" in written
