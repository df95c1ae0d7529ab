"""What one poll costs the running service: ``postbote run`` woken by SIGUSR1, no process start-up.

    python bench/daemon.py --mode maildir --n 1000 --repeat 5
    python bench/daemon.py --mode smtp --n 1000 --repeat 5

The benchmark (`run.py`) starts a process per poll for every tool, as cron would, so postbote's ~0.2 s of
interpreter start-up and imports counts against it in every run. Under systemd, postbote is started once. This
script starts ``postbote run`` (the benchmark's configuration, as the ``bench`` user), lets its first poll find an
empty mailbox, then ``--repeat`` times: seeds ``--n`` small messages (indexed and synced, as in the benchmark),
sends SIGUSR1 ("poll now", what ``postbote poll`` sends a running daemon) and takes the time until every message
is at the destination and the mailbox on the server is empty (looked at every 5 ms). Each repetition is verified
like a benchmark run. Before that, the same number of runs of the peer the issue's target names (mpop for
Maildir, fetchmail for SMTP) and of ``postbote poll``, into the same destination, as the benchmark runs them:
creating files costs what the directory makes it cost (see `floor.py`), so only figures from one directory
compare.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from postbote.state import read_account_state  # noqa: E402

from bench import environment  # noqa: E402
from bench.children import stop_child  # noqa: E402
from bench.corpus import Corpus, small_corpus  # noqa: E402
from bench.cost import one_run  # noqa: E402
from bench.profile import PreparedPoll, prepared_poll  # noqa: E402
from bench.tools import Fetchmail, Mpop, Postbote, Tool  # noqa: E402
from bench.verify import maildir_files, verify  # noqa: E402

FIRST_POLL_WAIT = 7.0  # the daemon's first poll comes within START_JITTER (5 s) of its start
LOOK_EVERY = 0.005


def delivered(poll: PreparedPoll) -> list[Path]:
    if poll.maildir:
        return maildir_files([poll.maildir])
    assert poll.sink is not None
    return poll.sink.stored()


def delivered_count(poll: PreparedPoll) -> int:
    """How many messages arrived, counted without a stat per file (this runs every few ms beside the poll)."""
    if poll.maildir:
        return len(os.listdir(poll.maildir / "new")) + len(os.listdir(poll.maildir / "cur"))
    assert poll.sink is not None and poll.sink.spool is not None
    return sum(name.endswith(".eml") for name in os.listdir(poll.sink.spool))


def wait_until_done(poll: PreparedPoll, daemon: subprocess.Popen[bytes], timeout: float) -> float:
    """Seconds until all ``poll.n`` messages were delivered and the server's mailbox is empty."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if daemon.poll() is not None:
            raise SystemExit(f"postbote run exited with {daemon.returncode}")
        if delivered_count(poll) >= poll.n and poll.left() == 0:
            return time.perf_counter() - started
        time.sleep(LOOK_EVERY)
    raise SystemExit(f"not done after {timeout:.0f} s: {len(delivered(poll))} delivered, {poll.left()} left")


def recorded_duration(poll: PreparedPoll) -> float:
    """The duration the daemon recorded for its last poll (login to QUIT, measured inside the poll thread)."""
    last = read_account_state(poll.job.workdir / "state", "u1").last_poll
    if last is None:
        raise SystemExit("the daemon recorded no poll")
    return float(last.duration)


def check(poll: PreparedPoll, corpus: Corpus, label: str) -> None:
    verdict = verify(corpus, delivered(poll), crlf=poll.sink is not None, left_on_server=poll.left())
    if not verdict.ok:
        raise SystemExit(f"{label}: {'; '.join(verdict.problems)}")


def process_polls(poll: PreparedPoll, corpus: Corpus, tool: Tool, repeat: int) -> list[float]:
    """The tool started per poll, as the benchmark runs it, into the same destination."""
    (command,) = tool.commands(poll.job, poll.runtime)
    poll.user.own(poll.job.workdir)
    walls = []
    for repetition in range(repeat):
        poll.seed()
        wall, _, _ = one_run(command, tool.env(poll.runtime), poll.work, dict(poll.user.popen_args()))
        walls.append(wall)
        check(poll, corpus, f"{tool.name}, run {repetition + 1}")
        print(f"{tool.name}, run {repetition + 1}: {walls[-1]:.3f} s, verified")
    return walls


def daemon_polls(poll: PreparedPoll, corpus: Corpus, repeat: int, timeout: float) -> list[float]:
    poll.seed()  # a fresh state directory and destination; the daemon's first poll then finds an empty mailbox
    poll.server.clear(["u1"])
    daemon = subprocess.Popen([*poll.command[:-1], "run"], env=poll.env, cwd=poll.work, stdout=subprocess.DEVNULL,
                              **poll.user.popen_args())
    walls = []
    try:
        time.sleep(FIRST_POLL_WAIT)
        for repetition in range(repeat):
            poll.seed(keep_state=True)
            daemon.send_signal(signal.SIGUSR1)
            walls.append(wait_until_done(poll, daemon, timeout))
            check(poll, corpus, f"postbote run, poll {repetition + 1}")
            print(f"postbote run, poll {repetition + 1}: {walls[-1]:.3f} s, verified; the daemon's own poll "
                  f"duration {recorded_duration(poll):.3f} s")
    finally:
        stop_child(daemon)
    return walls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/daemon.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("maildir", "smtp"), default="maildir")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--cache-dir", type=Path, default=environment.DEFAULT_CACHE)
    args = parser.parse_args(argv)
    corpus = small_corpus(args.n)
    peer = Mpop() if args.mode == "maildir" else Fetchmail()
    with prepared_poll(args.mode, args.n, environment.REPO, args.cache_dir) as poll:
        results = {f"{peer.name} (a process per poll)": process_polls(poll, corpus, peer, args.repeat),
                   "postbote poll (a process per poll)": process_polls(poll, corpus, Postbote(), args.repeat),
                   "postbote run (the daemon)": daemon_polls(poll, corpus, args.repeat, args.timeout)}
    for label, walls in results.items():
        wall = statistics.median(walls)
        print(f"{label}: {args.n} messages to {args.mode}, median of {args.repeat}: {wall:.3f} s "
              f"({args.n / wall:,.0f} msg/s; min {min(walls):.3f} s, max {max(walls):.3f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
