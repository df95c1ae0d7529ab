"""Where postbote's time goes per message: one poll under py-spy, summarised.

    python bench/profile.py --mode maildir --n 2000
    python bench/profile.py --mode smtp --n 2000 --top 30

Starts the benchmark's Dovecot (and the prompt SMTP sink for ``--mode smtp``), seeds ``--n`` small
messages, and runs ``postbote poll`` once under ``py-spy record`` (installed into a venv in the cache
directory on first use, from PyPI). Prints the functions with the most samples -- *self* (the frame on top
of the stack) and *inclusive* (anywhere on the stack), counting time blocked in system calls too
(``--idle``: fsync and waiting for the server are part of the cost) -- and leaves the raw folded stacks
for flame-graph tools. Timings under a sampling profiler are a little slower than the benchmark's; use them for shares,
not rates.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import environment  # noqa: E402
from bench.corpus import small_corpus  # noqa: E402
from bench.mailserver import PASSWORD, BenchMailServer  # noqa: E402
from bench.sinks import SinkProcess  # noqa: E402
from bench.tools import Job, Mailbox, Postbote, Runtime, Target  # noqa: E402


def py_spy(cache: Path) -> Path:
    tool = cache / "profiler" / "bin" / "py-spy"
    if not tool.exists():
        subprocess.run([sys.executable, "-m", "venv", str(cache / "profiler")], check=True)
        subprocess.run([str(cache / "profiler" / "bin" / "pip"), "install", "-q", "py-spy"], check=True)
    return tool


def summarise(folded: Path, top: int, focus: str) -> str:
    """Self and inclusive sample shares per function, among the stacks that pass through ``focus``."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = everything = 0
    for line in folded.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        everything += count
        frames = stack.split(";")
        if focus and not any(frame.startswith(focus + " ") for frame in frames):
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return f"no samples under {focus!r} ({everything} in all)"
    lines = [f"{total} samples under {focus!r} ({everything} in all, including start-up and idle threads)",
             "", "self %   function"]
    lines += [f"{100 * n / total:6.1f}   {name}" for name, n in own.most_common(top)]
    lines += ["", "incl %   function"]
    lines += [f"{100 * n / total:6.1f}   {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/profile.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("maildir", "smtp"), default="maildir")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--rate", type=int, default=400, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--lines", action="store_true", help="per source line instead of per function")
    parser.add_argument("--focus", default="Poller.poll",
                        help="only stacks through this function (py-spy's name, default Poller.poll; '' for all)")
    parser.add_argument("--source", type=Path, default=environment.REPO)
    parser.add_argument("--cache-dir", type=Path, default=environment.DEFAULT_CACHE)
    parser.add_argument("--output", type=Path, help="keep the folded stacks here (default: a temp file)")
    args = parser.parse_args(argv)

    args.cache_dir.mkdir(parents=True, exist_ok=True)
    user = environment.run_user(args.cache_dir)
    python = environment.postbote_venv(args.cache_dir, user, args.source, print)
    profiler = py_spy(args.cache_dir)
    with tempfile.TemporaryDirectory(prefix="pbprofile-", dir=args.cache_dir) as scratch:
        work = Path(scratch)
        work.chmod(0o755)
        code = environment.snapshot_postbote(args.source, work / "code", user)
        runtime = Runtime(user=user, postbote_python=python, postbote_code=code)
        server = BenchMailServer()
        sink = SinkProcess("prompt", None) if args.mode == "smtp" else None
        server.start()
        try:
            if sink:
                sink.start()
            corpus = small_corpus(args.n)
            server.seed("u1", corpus)
            server.warm("u1", len(corpus))
            target = Target("smtp", smtp_port=sink.port) if sink else Target("maildir", maildir=work / "Maildir")
            if target.maildir:
                for sub in ("tmp", "new", "cur"):
                    (target.maildir / sub).mkdir(parents=True)
            job = Job((Mailbox("u1", "u1", PASSWORD, server.host, server.port),), target, work / "run")
            job.workdir.mkdir()
            (command,) = Postbote().commands(job, runtime)
            folded = work / "profile.folded"
            user.own(work)
            line_option = [] if args.lines else ["--nolineno"]
            argv_ = [str(profiler), "record", "--format", "raw", *line_option, "--idle", "--rate", str(args.rate),
                     "--output", str(folded), "--", *command]
            subprocess.run(argv_, env=Postbote().env(runtime), check=True, stdout=subprocess.DEVNULL,
                           **user.popen_args())
            left = server.left(["u1"])
            print(f"postbote poll of {args.n} messages to {args.mode}; left on server: {left}")
            print(summarise(folded, args.top, args.focus))
            if args.output:
                args.output.write_bytes(folded.read_bytes())
        finally:
            if sink:
                sink.stop()
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
