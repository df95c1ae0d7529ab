"""Workers on a PostgreSQL state (issue 16): what one worker sustains on PostgreSQL against SQLite, and what each
poll costs the database.

    python bench/workers.py rate --users 1000 --repeat 3        # postbote run on SQLite, then on PostgreSQL

``rate``: the same ``postbote run`` as ``bench/scale.py cpu`` (one account per user of a private Dovecot, POP3S
with a pinned certificate, all empty but ``--with-mail``, a ``poll_interval`` short enough that the accounts are
always due), once with the default SQLite state and once with ``state: postgresql://...`` on a private PostgreSQL
(fsync on, as in production; ``pg_stat_statements`` loaded to count statements). Over ``--seconds`` after
``--warmup``: polls per second, postbote's CPU per poll, PostgreSQL's CPU per poll (every process of the server),
and the statements and commits per poll the server counted -- everything a worker sends: the poll's reads and
writes, and its share of the claims, lease renewals and releases.

The takeover time after a worker is killed is printed by the end-to-end test (three workers, 300 accounts):

    CI=1 .venv/bin/python -m pytest tests/test_workers_postgres.py -k three_workers -s -p no:cacheprovider

Figures go to docs/performance.md ("Scale") and docs/scaling.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.scale import Daemon, Setup, daemon_config, dovecot_cpu, machine, process_cpu, seed, set_up  # noqa: E402
from tests.servers.postgres import PostgresServer  # noqa: E402

Backend = str  # "sqlite" or "postgresql"


def server_cpu(server: PostgresServer) -> float:
    """PostgreSQL's CPU so far: the postmaster with its reaped children, and every live child."""
    assert server.pid is not None
    total = process_cpu(server.pid, children=True)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == server.pid:
                total += process_cpu(int(entry.name))
    return total


def statements_and_commits(dsn: str) -> tuple[int, int]:
    """Statements the server ran (pg_stat_statements, every database) and commits in the bench's database."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as db:
        (calls,) = db.execute("SELECT coalesce(sum(calls), 0) FROM pg_stat_statements").fetchone() or (0,)
        (commits,) = db.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
                                ).fetchone() or (0,)
    return int(calls), int(commits)


def config_for(setup: Setup, args: argparse.Namespace, backend: Backend, dsn: str, name: str) -> Path:
    path = daemon_config(setup, setup.users, f"{args.interval}s", args.parallel, name)
    document = yaml.safe_load(path.read_text())
    if backend == "postgresql":
        document.update(state=dsn, worker_lease="60s")
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def measure(setup: Setup, args: argparse.Namespace, backend: Backend, dsn: str, pg: PostgresServer,
            repetition: int) -> dict[str, Any]:
    config = config_for(setup, args, backend, dsn, f"{backend}-{repetition}")
    daemon = Daemon(setup, config, config.parent / "daemon.log")
    try:
        daemon.wait_ready()
        time.sleep(args.warmup)
        before = (process_cpu(daemon.process.pid), dovecot_cpu(setup.server), server_cpu(pg),
                  statements_and_commits(dsn), daemon.polls(), time.monotonic())
        time.sleep(args.seconds)
        after = (process_cpu(daemon.process.pid), dovecot_cpu(setup.server), server_cpu(pg),
                 statements_and_commits(dsn), daemon.polls(), time.monotonic())
    finally:
        daemon.stop()
    polls = after[4][0] - before[4][0]
    if polls <= 0:
        raise SystemExit(f"no poll finished in {args.seconds} s; see {daemon.log_path}")
    probe = 2  # the two queries of statements_and_commits itself, counted by pg_stat_statements
    return {"backend": backend, "run": repetition, "polls": polls, "failed": after[4][1] - before[4][1],
            "polls_per_s": polls / (after[5] - before[5]),
            "cpu_ms_per_poll": 1000 * (after[0] - before[0]) / polls,
            "dovecot_ms_per_poll": 1000 * (after[1] - before[1]) / polls,
            "postgres_ms_per_poll": 1000 * (after[2] - before[2]) / polls,
            "statements_per_poll": (after[3][0] - before[3][0] - probe) / polls,
            "commits_per_poll": (after[3][1] - before[3][1]) / polls}


def spread(values: list[float], digits: int = 2) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def run_rate(args: argparse.Namespace) -> int:
    print(f"machine: {machine()}", flush=True)
    rows: list[dict[str, Any]] = []
    with PostgresServer(fsync=True, settings={"shared_preload_libraries": "pg_stat_statements"}) as pg, \
            set_up(args) as setup:
        dsn = pg.database()
        import psycopg

        with psycopg.connect(dsn, autocommit=True) as db:
            db.execute("CREATE EXTENSION pg_stat_statements")
        seed(setup, args.with_mail)
        for repetition in range(1, args.repeat + 1):
            for backend in ("sqlite", "postgresql"):
                row = measure(setup, args, backend, dsn, pg, repetition)
                rows.append(row)
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}),
                      flush=True)
    print(f"\n{args.users} accounts, --parallel {args.parallel}; median (min–max) of {args.repeat} runs\n")
    print("| state | polls/s | postbote CPU ms/poll | PostgreSQL CPU ms/poll | statements/poll | commits/poll | "
          "failed |")
    print("|---|---|---|---|---|---|---|")
    for backend in ("sqlite", "postgresql"):
        mine = [row for row in rows if row["backend"] == backend]
        print(f"| {backend} | {spread([r['polls_per_s'] for r in mine], 0)} | "
              f"{spread([r['cpu_ms_per_poll'] for r in mine])} | {spread([r['postgres_ms_per_poll'] for r in mine])} | "
              f"{spread([r['statements_per_poll'] for r in mine], 1)} | "
              f"{spread([r['commits_per_poll'] for r in mine], 1)} | {sum(r['failed'] for r in mine)} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/workers.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    rate = commands.add_parser("rate")
    rate.add_argument("--users", type=int, default=1000)
    rate.add_argument("--parallel", type=int, default=32)
    rate.add_argument("--repeat", type=int, default=3)
    rate.add_argument("--with-mail", type=int, default=5)
    rate.add_argument("--interval", type=int, default=5, help="poll_interval in seconds: short, always due")
    rate.add_argument("--warmup", type=float, default=10.0)
    rate.add_argument("--seconds", type=float, default=20.0)
    rate.add_argument("--login-reuse", action="store_true")
    rate.add_argument("--cache-dir", type=Path, default=Path("/var/tmp"))
    rate.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    return {"rate": run_rate}[args.command](args)


if __name__ == "__main__":
    os.environ.setdefault("PGAPPNAME", "postbote-bench")
    sys.exit(main())
