"""What a poll costs per message without the start-up: CPU of `Poller.poll` alone, in a process, two revisions.

    python bench/poll_cpu.py --mode smtp --n 2000 --repeat 7 --source . --source /path/to/older/checkout

`bench/cost.py` times the whole ``postbote poll`` process: at ``--n 1000`` about a third of its CPU per message is
the interpreter starting and importing. This one starts the benchmark's Dovecot (and the prompt SMTP sink for
``--mode smtp``), seeds ``--n`` small messages, and runs a small driver in a child process that loads the config,
logs at ``warning`` as the benchmark does, and times ``Poller.poll`` with ``time.process_time()`` (every thread of
the process). The sources' runs are interleaved; the medians are printed. Works on revisions from before the one
installed name too (``agent`` as the top-level package).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import environment  # noqa: E402
from bench.profile import prepared_poll  # noqa: E402

DRIVER = """
import importlib, importlib.util, sys, time
from pathlib import Path
top = "postbote" if importlib.util.find_spec("postbote.poller") else "agent"
load_config = importlib.import_module(top + ".config").load_config
make_plugin_manager = importlib.import_module(top + ".pluginmanager").make_plugin_manager
Poller = importlib.import_module(top + ".poller").Poller
StateStore = importlib.import_module(top + ".state").StateStore
importlib.import_module(top + ".logconfig").configure_logging("warning", "json")
pm = make_plugin_manager(entry_points=False)
config = load_config(Path(sys.argv[1]), pm)
poller = Poller(pm, StateStore(config.state_dir))
if "--freeze" in sys.argv:
    import gc
    gc.freeze()
profile_to = next((arg.split("=", 1)[1] for arg in sys.argv if arg.startswith("--profile=")), None)
if profile_to:
    import cProfile
    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
started = time.process_time()
delivered = sum(poller.poll(account).delivered for account in config.accounts)
seconds = time.process_time() - started
if profile_to:
    profiler.disable()
    profiler.dump_stats(profile_to)
print("POLL", seconds, delivered)
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/poll_cpu.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("maildir", "smtp"), default="smtp")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--source", type=Path, action="append",
                        help="a postbote checkout to measure (repeat to compare; default: this one)")
    parser.add_argument("--freeze", action="store_true", help="gc.freeze() before the poll, as `postbote poll` does")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="also run each poll under cProfile and write DIR/<source>-<run>.pstats (slower: for "
                             "comparing where the time goes, not for rates)")
    parser.add_argument("--cache-dir", type=Path, default=environment.DEFAULT_CACHE)
    args = parser.parse_args(argv)
    sources = [source.resolve() for source in args.source or [environment.REPO]]
    cpu: dict[Path, list[float]] = {source: [] for source in sources}
    with prepared_poll(args.mode, args.n, sources[0], args.cache_dir) as poll:
        envs = poll.environments(sources)
        driver = poll.work / "poll_cpu_driver.py"
        driver.write_text(DRIVER)
        poll.user.own(driver)
        config = poll.command[poll.command.index("-c") + 1]
        for repetition in range(args.repeat):
            for source in sources:
                poll.seed()
                extra = ["--freeze"] if args.freeze else []
                if args.profile:
                    args.profile.mkdir(parents=True, exist_ok=True)
                    poll.user.own(args.profile)
                    extra.append(f"--profile={args.profile.resolve() / f'{source.name}-{repetition + 1}.pstats'}")
                done = subprocess.run([poll.command[0], str(driver), config, *extra],
                                      env=envs[source], cwd=poll.work, capture_output=True, text=True,
                                      **dict(poll.user.popen_args()))
                lines = [line for line in done.stdout.splitlines() if line.startswith("POLL ")]
                if done.returncode != 0 or not lines:
                    raise SystemExit(f"{source}: the driver failed:\n{done.stderr[-2000:]}")
                seconds, delivered = lines[-1].split()[1:]
                if int(delivered) != args.n or poll.left():
                    raise SystemExit(f"{source}: {delivered} of {args.n} delivered, {poll.left()} left on the server")
                cpu[source].append(float(seconds))
                print(f"{source} run {repetition + 1}: poll CPU {float(seconds):.3f} s")
    for source, measured in cpu.items():
        print(f"{source}: median of {args.repeat}, {args.n} messages to {args.mode}: poll CPU "
              f"{statistics.median(measured):.3f} s, {statistics.median(measured) * 1e6 / args.n:.0f} µs per message "
              f"(no start-up; min {min(measured):.3f} s, max {max(measured):.3f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
