"""postbote vs. fetchmail, mpop(+msmtp) and getmail6(+msmtp): one command, one table.

Starts a private Dovecot on loopback, seeds a deterministic corpus, runs every selected tool against the same
mailbox and the same destination (a Maildir, or SMTP to a sink), verifies that every message arrived exactly
once and that the mailbox is empty, and prints one table of medians. See bench/README.md.

    python bench/run.py --quick                       # smoke run, well under a minute
    python bench/run.py --n 1000 --repeat 3           # the default modes
    python bench/run.py --modes latency --tools postbote,mpop
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import environment  # noqa: E402
from bench.report import check_targets, format_table, summarise  # noqa: E402
from bench.runner import MODES, PEERS, Bench, Settings, timestamp  # noqa: E402
from bench.tools import Runtime  # noqa: E402

DEFAULT_MODES = ("maildir", "smtp-prompt", "smtp-delayed-ack", "latency")  # those the targets name first
QUICK = {"n": 50, "delayed_ack_n": 50, "latency_n": 50, "mixed_n": 50, "big_mb": 20, "accounts": 10,
         "per_account": 5, "repeat": 1}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python bench/run.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_modes_help())
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES),
                        help=f"comma-separated, or 'all' (default: {','.join(DEFAULT_MODES)})")
    parser.add_argument("--tools", default=",".join(("postbote", *PEERS)),
                        help="comma-separated subset of postbote,fetchmail,mpop,getmail6 (default: all)")
    parser.add_argument("--n", type=int, default=1000, help="messages in the maildir/smtp modes (default 1000)")
    parser.add_argument("--delayed-ack-n", type=int, default=300,
                        help="messages in the smtp-delayed-ack mode (default 300: the peers manage ~20 msg/s)")
    parser.add_argument("--latency-n", type=int, default=500, help="messages in the latency modes (default 500)")
    parser.add_argument("--mixed-n", type=int, default=300, help="messages in the mixed mode (default 300)")
    parser.add_argument("--big-mb", type=int, default=200, help="size of the one message of the big mode (MB)")
    parser.add_argument("--accounts", type=int, default=100, help="accounts in the many-accounts mode")
    parser.add_argument("--per-account", type=int, default=50, help="messages per account (many-accounts)")
    parser.add_argument("--max-parallel", type=int, help="postbote's max_parallel for many-accounts "
                                                        "(default: postbote's own default)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions; the table shows medians (default 3)")
    parser.add_argument("--rtt-ms", type=float, default=20.0, help="emulated round trip of the latency modes")
    parser.add_argument("--seed", type=int, default=1, help="corpus seed")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: N=50, 1 repetition, small big/many-accounts sizes (explicit options win)")
    parser.add_argument("--timeout", type=float, default=600.0, help="limit per run, seconds (default 600)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every run and the rows as JSON")
    parser.add_argument("--source", type=Path, default=environment.REPO, help="postbote source tree to measure")
    parser.add_argument("--cache-dir", type=Path, default=environment.DEFAULT_CACHE,
                        help=f"venv and work directories (default {environment.DEFAULT_CACHE})")
    parser.add_argument("--keep-workdir", action="store_true", help="keep destinations, spools and logs")
    parser.add_argument("--no-chunking", action="store_true",
                        help="SMTP sinks do not offer CHUNKING (BDAT), so every tool sends DATA")
    parser.add_argument("--no-install", action="store_true", help="never apt-get install missing packages")
    return parser


def _modes_help() -> str:
    return """modes:
  maildir           N small messages into a Maildir (fetchmail via safecat, mpop, getmail6, postbote)
  mixed             mixed sizes: attachments, a few multi-MB messages, into a Maildir
  smtp-prompt       N small messages forwarded over SMTP to a sink that answers and ACKs at once
  smtp-delayed-ack  the same to a sink with kernel-default Nagle and delayed ACKs, like a real MTA
  latency           latency-maildir and latency-smtp: the POP3 server behind a 20 ms round trip
  big               one 200 MB message into a Maildir (peak RSS matters here)
  many-accounts     100 accounts x 50 messages at 20 ms RTT: `postbote poll` (all accounts, the
                    daemon's parallelism) vs. `postbote poll ACCOUNT` for each account in turn
                    ("sequential") and vs. one `postbote poll` with max_parallel: 1"""


def parse_settings(argv: list[str] | None) -> tuple[argparse.Namespace, Settings]:
    parser = build_parser()
    given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv if argv is not None else sys.argv[1:])
             if a.startswith("--")}
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if key not in given:
                setattr(args, key, value)
    modes = list(MODES) if args.modes == "all" else [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    bad = [t for t in tools if t not in ("postbote", *PEERS)]
    if bad:
        parser.error(f"unknown tool(s) {', '.join(bad)}")
    if args.repeat < 1 or args.n < 1:
        parser.error("--repeat and --n must be at least 1")
    workdir = args.cache_dir / f"run-{timestamp()}-{os.getpid()}"
    settings = Settings(modes=modes, tools=tools, n=args.n, delayed_ack_n=args.delayed_ack_n,
                        latency_n=args.latency_n, mixed_n=args.mixed_n, big_mb=args.big_mb,
                        accounts=args.accounts, per_account=args.per_account,
                        repeat=args.repeat, rtt_ms=args.rtt_ms, seed=args.seed, timeout=args.timeout,
                        max_parallel=args.max_parallel, workdir=workdir, keep_workdir=args.keep_workdir,
                        chunking=not args.no_chunking)
    return args, settings


def prepare(args: argparse.Namespace, settings: Settings) -> Runtime:
    """Packages, the run user, postbote's venv and a snapshot of its code."""
    missing = environment.missing_binaries()
    if missing and not args.no_install:
        environment.install_packages(missing, settings.log)
    if environment.find_binary("dovecot") is None:
        raise SystemExit("bench: dovecot is not installed (apt-get install dovecot-pop3d)")
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    args.cache_dir.chmod(0o755)
    user = environment.run_user(args.cache_dir)
    python = environment.postbote_venv(args.cache_dir, user, args.source, settings.log)
    code = environment.snapshot_postbote(args.source, settings.workdir / "postbote-code", user)
    return Runtime(user=user, postbote_python=python, postbote_code=code)


def header(args: argparse.Namespace, settings: Settings, bench: Bench, runtime: Runtime) -> list[str]:
    lines = [f"command: python bench/run.py {shlex.join(sys.argv[1:])}",
             f"postbote source: {args.source} ({environment.source_revision(args.source)})",
             f"machine: {platform.node()}, {os.cpu_count()} CPUs, {platform.platform()}",
             f"tools run as: {runtime.user.name}; repetitions: {settings.repeat} (tool order rotated each time)"]
    lines += [f"{name}: {version}" for name, version in environment.versions().items()]
    lines += [f"{name}: {value}" for name, value in bench.facts.items()]
    return lines


def main(argv: list[str] | None = None) -> int:
    args, settings = parse_settings(argv)
    runtime = prepare(args, settings)
    bench = Bench(settings, runtime)
    try:
        bench.start()
        modes = ", ".join(s.mode for s in bench.scenarios)
        settings.log(f"benchmark: modes {modes}; tools {', '.join(settings.tools)}")
        bench.run_all()
    finally:
        bench.stop()
    rows = summarise(bench.records)
    lines = header(args, settings, bench, runtime)
    print("\n".join(lines))
    print()
    print(format_table(rows))
    targets = check_targets(rows)
    if targets:
        caveat = " (--quick: too few messages for these, start-up dominates)" if args.quick else ""
        print(f"\nTargets (issue), from this run{caveat}:")
        print("\n".join(targets))
    if settings.workdir.exists():
        print(f"\nlogs and leftovers: {settings.workdir}")
    if args.json:
        args.json.write_text(json.dumps({"header": lines, "rows": [vars(r) for r in rows],
                                         "runs": [r.as_dict() for r in bench.records]}, indent=2) + "\n")
    return 0 if all(r.ok or r.skipped for r in bench.records) else 1


if __name__ == "__main__":
    sys.exit(main())
