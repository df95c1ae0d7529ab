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
import contextlib
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import environment  # noqa: E402
from bench.corpus import small_corpus  # noqa: E402
from bench.mailserver import PASSWORD, BenchMailServer  # noqa: E402
from bench.runner import empty_maildir, spool_directory  # noqa: E402
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
    parser.add_argument("--cpu", action="store_true",
                        help="only time on the CPU (leave out waiting for servers, the disk and locks)")
    parser.add_argument("--focus", default="Poller.poll",
                        help="only stacks through this function (py-spy's name, default Poller.poll; '' for all)")
    parser.add_argument("--source", type=Path, default=environment.REPO)
    parser.add_argument("--cache-dir", type=Path, default=environment.DEFAULT_CACHE)
    parser.add_argument("--output", type=Path, help="keep the folded stacks here (default: a temp file)")
    args = parser.parse_args(argv)

    folded_output = args.output
    with prepared_poll(args.mode, args.n, args.source, args.cache_dir) as poll:
        profiler = py_spy(args.cache_dir)
        folded = poll.work / "profile.folded"
        line_option = [] if args.lines else ["--nolineno"]
        idle_option = [] if args.cpu else ["--idle"]
        argv_ = [str(profiler), "record", "--format", "raw", *line_option, *idle_option, "--rate", str(args.rate),
                 "--output", str(folded), "--", *poll.command]
        poll.seed()
        subprocess.run(argv_, env=poll.env, cwd=poll.work, check=True, stdout=subprocess.DEVNULL,
                       **poll.user.popen_args())
        print(f"postbote poll of {args.n} messages to {args.mode}; left on server: {poll.left()}")
        print(summarise(folded, args.top, args.focus))
        if folded_output:
            folded_output.write_bytes(folded.read_bytes())
    return 0


@dataclass
class PreparedPoll:
    """A running Dovecot (and SMTP sink) and the ``postbote poll`` command line for one mailbox of ``n`` messages.

    Run the command in ``work``: ``python -m`` puts the current directory first on ``sys.path``, and a checkout
    there would be imported instead of the snapshot.
    """

    server: BenchMailServer
    user: environment.RunUser
    work: Path
    command: list[str]
    env: dict[str, str]
    n: int
    maildir: Path | None
    sink: SinkProcess | None
    job: Job
    runtime: Runtime

    def environments(self, sources: list[Path]) -> dict[Path, dict[str, str]]:
        """The environment to run each checkout's postbote in: the first is the one this poll was prepared with,
        the others are snapshotted beside it and put first on ``PYTHONPATH``."""
        envs = {sources[0]: self.env}
        for index, source in enumerate(sources[1:], start=1):
            code = environment.snapshot_postbote(source, self.work / f"code-{index}", self.user)
            envs[source] = {**self.env, "PYTHONPATH": str(code)}
        return envs

    def seed(self, *, keep_state: bool = False) -> None:
        """A fresh mailbox of ``n`` small messages, indexed; an empty Maildir or SMTP spool; postbote's state
        directory removed unless ``keep_state`` (a running daemon holds it)."""
        if self.sink is not None:
            self.sink.clear()
        if self.maildir:
            empty_maildir(self.maildir)
            self.user.own(self.maildir)
        if not keep_state:
            shutil.rmtree(self.work / "run" / "state", ignore_errors=True)
        self.server.seed("u1", small_corpus(self.n))
        self.server.warm("u1", self.n)

    def left(self) -> int:
        return self.server.left(["u1"])


@contextlib.contextmanager
def prepared_poll(mode: str, n: int, source: Path, cache_dir: Path) -> Iterator[PreparedPoll]:
    cache_dir.mkdir(parents=True, exist_ok=True)
    user = environment.run_user(cache_dir)
    python = environment.postbote_venv(cache_dir, user, source, print)
    with tempfile.TemporaryDirectory(prefix="pbprofile-", dir=cache_dir) as scratch:
        work = Path(scratch)
        work.chmod(0o755)
        code = environment.snapshot_postbote(source, work / "code", user)
        runtime = Runtime(user=user, postbote_python=python, postbote_code=code)
        server = BenchMailServer()
        # The sink keeps what it gets, as in the benchmark (on tmpfs where there is one).
        sink = SinkProcess("prompt", spool_directory(work, "prompt")) if mode == "smtp" else None
        server.start()
        try:
            if sink:
                sink.start()
            target = Target("smtp", smtp_port=sink.port) if sink else Target("maildir", maildir=work / "Maildir")
            job = Job((Mailbox("u1", "u1", PASSWORD, server.host, server.port),), target, work / "run")
            job.workdir.mkdir()
            (command,) = Postbote().commands(job, runtime)
            user.own(work)
            yield PreparedPoll(server, user, work, command, Postbote().env(runtime), n, target.maildir, sink, job,
                               runtime)
        finally:
            if sink:
                sink.stop()
                if sink.spool:
                    shutil.rmtree(sink.spool, ignore_errors=True)
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
