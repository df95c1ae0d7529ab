"""What one ``postbote poll`` costs in CPU, not only in wall time: a steadier figure on a shared machine.

    python bench/cost.py --mode maildir --n 1000 --repeat 5
    python bench/cost.py --mode smtp --n 1000 --repeat 5
    python bench/cost.py --source . --source /tmp/older-checkout     # two revisions, runs interleaved

Starts the benchmark's Dovecot (and the prompt SMTP sink for ``--mode smtp``), then ``--repeat`` times seeds
``--n`` small messages and runs one poll, printing its wall time and the user and system CPU time of the
postbote process (from ``wait4``), and the medians. Wall time depends on what else the machine runs; CPU time
much less, so use this to compare two revisions of postbote (each ``--source`` is a checkout; their runs are
interleaved), and `bench/run.py` to compare with the peers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import environment  # noqa: E402
from bench.profile import prepared_poll  # noqa: E402


def one_run(command: list[str], env: dict[str, str], cwd: Path, popen_args: dict) -> tuple[float, float, float]:
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, **popen_args)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"postbote exited with {process.returncode}")
    return wall, usage.ru_utime, usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/cost.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("maildir", "smtp"), default="maildir")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--source", type=Path, action="append",
                        help="a postbote checkout to measure (repeat to compare; default: this one)")
    parser.add_argument("--cache-dir", type=Path, default=environment.DEFAULT_CACHE)
    args = parser.parse_args(argv)
    sources = [source.resolve() for source in args.source or [environment.REPO]]
    runs: dict[Path, list[tuple[float, float, float]]] = {source: [] for source in sources}
    with prepared_poll(args.mode, args.n, sources[0], args.cache_dir) as poll:
        envs = poll.environments(sources)
        for repetition in range(args.repeat):
            for source in sources:
                poll.seed()
                wall, user, system = one_run(poll.command, envs[source], poll.work, dict(poll.user.popen_args()))
                if poll.left():
                    raise SystemExit(f"{source}: {poll.left()} messages left on the server")
                runs[source].append((wall, user, system))
                print(f"{source} run {repetition + 1}: wall {wall:.3f} s, user {user:.3f} s, sys {system:.3f} s")
    for source, measured in runs.items():
        wall, user, system = (statistics.median(column) for column in zip(*measured, strict=True))
        print(f"{source}: median of {args.repeat}, {args.n} messages to {args.mode}: wall {wall:.3f} s "
              f"({args.n / wall:,.0f} msg/s), user {user:.3f} s, sys {system:.3f} s; CPU per message "
              f"{(user + system) * 1e6 / args.n:.0f} µs (start-up included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
