"""IMAP IDLE in ``postbote run``: memory per idle account, threads, and the push latency (issue 13).

    python bench/idle_rss.py --accounts 100,300,1000       # RSS and threads of the daemon with N idling accounts
    python bench/idle_rss.py --accounts 1000 --no-idle     # the same accounts with idle: false (no watches)
    python bench/idle_rss.py --accounts 1 --latency 10     # push latency only

For each N: a private Dovecot with N users (``a0001`` ...), limits raised for N IMAP connections (process and client
limits, ``mail_max_userip_connections``, ``service imap { process_limit }``, ``ulimit -n`` of Dovecot and of the
daemon), and ``postbote run`` (as the ``bench`` user, from a snapshot of the source like bench/run.py) with N
``protocol: imap`` accounts, ``poll_interval: 1h``, delivering into one Maildir. Once every account has logged
``watch.started`` (after its first poll) and the log has been quiet for ``--settle`` seconds, the daemon's VmRSS,
VmHWM and thread count are read from /proc. The RSS growth per idle account is the slope between the N measured
(and, with ``--no-idle``, what the watches add over the same accounts without IDLE).

Push latency (``--latency K``, with the smallest N idling: Dovecot's IDLE relies on inotify, and the kernel's
``fs.inotify.max_user_instances`` (128 by default) is per uid -- every mail process of this Dovecot runs as one uid,
so beyond ~128 connections Dovecot logs "Inotify instance limit ... exceeded, disabling" and falls back to checking
the mailbox every ``mailbox_idle_check_interval`` (30 s); the script counts those warnings): K times, another
client APPENDs a message to ``a0001``'s INBOX and the time until the file is in the Maildir is taken; and, for
comparison, the time from the same APPEND to the ``* n EXISTS`` a bare IDLE client (a socket, no postbote) reads from
Dovecot, in a mailbox of its own.
"""

from __future__ import annotations

import argparse
import imaplib
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import environment  # noqa: E402
from bench.corpus import small_corpus  # noqa: E402
from bench.imap import IMAPBenchServer  # noqa: E402
from bench.mailserver import PASSWORD  # noqa: E402
from bench.runner import empty_maildir  # noqa: E402
from bench.verify import maildir_files  # noqa: E402

NOFILE = 65536
RAW_USER = "rawidle"  # a mailbox no postbote account reads: the bare IDLE client's


def account_user(index: int) -> str:
    return f"a{index:04d}"


def dovecot_limits(accounts: int) -> str:
    processes = accounts + 200
    return f"""
default_process_limit = {processes}
default_client_limit = {4 * accounts + 2000}
default_vsz_limit = 512M
mail_max_userip_connections = 50
service imap {{
  process_limit = {processes}
}}
service imap-login {{
  process_limit = {processes}
}}
"""


def raise_nofile() -> None:
    """Dovecot's master and log process and the daemon hold a descriptor (or more) per connection."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < NOFILE:
        print(f"ulimit -n: the hard limit is {hard} (this sandbox does not let root raise it)", file=sys.stderr)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(NOFILE, hard)), hard))


def proc_status(pid: int) -> dict[str, int]:
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
            found[key] = int(value.split()[0])
    found["tasks"] = len(os.listdir(f"/proc/{pid}/task"))
    found["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return found


class Daemon:
    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path, log: Path, user: environment.RunUser) -> None:
        self.log_path = log
        self._log = log.open("wb")
        self.process = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=self._log, start_new_session=True, **user.popen_args())
        self._offset = 0
        self.counts: dict[str, int] = {}
        self.last_event = time.monotonic()

    def read_events(self) -> None:
        with self.log_path.open("rb") as handle:
            handle.seek(self._offset)
            data = handle.read()
        complete = data.rfind(b"\n") + 1
        self._offset += complete
        for line in data[:complete].splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            name = event.get("event", "?")
            self.counts[name] = self.counts.get(name, 0) + 1
            self.last_event = time.monotonic()

    def wait_for(self, name: str, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.read_events()
            if self.counts.get(name, 0) >= count:
                return
            if self.process.poll() is not None:
                raise SystemExit(f"the daemon exited ({self.process.returncode}); log: {self.log_path}")
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.counts.get(name, 0)} of {count} {name} after {timeout:.0f} s; "
                                 f"events {self.counts}; log: {self.log_path}")
            time.sleep(0.2)

    def settle(self, quiet: float, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.read_events()
            if time.monotonic() - self.last_event >= quiet:
                return
            time.sleep(0.2)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


def config(work: Path, server: IMAPBenchServer, accounts: int, idle: bool, maildir: Path) -> Path:
    entries = [{"name": account_user(i), "protocol": "imap", "host": server.host, "port": server.imap_port,
                "tls": "none", "username": account_user(i), "password": PASSWORD, "poll_interval": "1h",
                "idle": idle, "deliver": {"maildir": str(maildir)}} for i in range(1, accounts + 1)]
    path = work / "postbote.yaml"
    path.write_text(json.dumps({"state_dir": str(work / "state"), "log": {"level": "info", "format": "json"},
                                "defaults": {"timeout": "60s"}, "accounts": entries}, indent=1) + "\n")
    path.chmod(0o600)
    return path


def append(server: IMAPBenchServer, user: str, data: bytes) -> None:
    with imaplib.IMAP4(server.host, server.imap_port, timeout=30) as client:
        client.login(user, PASSWORD)
        status, answer = client.append("INBOX", None, None, data.replace(b"\n", b"\r\n"))
        if status != "OK":
            raise RuntimeError(f"APPEND refused: {answer!r}")
        client.logout()


def raw_idle_delay(server: IMAPBenchServer, user: str, data: bytes) -> float:
    """Seconds from another client's APPEND (its tagged OK) to the EXISTS a bare IDLE client reads."""
    with socket.create_connection((server.host, server.imap_port), timeout=90) as sock:
        reader = sock.makefile("rb")

        def command(line: bytes) -> None:
            sock.sendall(line + b"\r\n")
            tag = line.split()[0]
            while not reader.readline().startswith(tag + b" "):
                pass

        reader.readline()
        command(f"a LOGIN {user} {PASSWORD}".encode())
        command(b"b EXAMINE INBOX")
        sock.sendall(b"c IDLE\r\n")
        while not reader.readline().startswith(b"+"):
            pass
        started = time.perf_counter()
        append(server, user, data)
        appended = time.perf_counter()
        while not (line := reader.readline()).endswith(b"EXISTS\r\n"):
            if not line:
                raise RuntimeError("the IDLE connection closed")
        seen = time.perf_counter()
        sock.sendall(b"DONE\r\n")
        del started
        return seen - appended


def measure(args: argparse.Namespace, user: environment.RunUser, python: Path, code: Path, accounts: int,
            idle: bool, latency: int, work: Path) -> dict[str, object]:
    server = IMAPBenchServer([RAW_USER, *(account_user(i) for i in range(1, accounts + 1))],
                             extra_config=dovecot_limits(accounts))
    result: dict[str, object] = {"accounts": accounts, "idle": idle}
    started = time.monotonic()
    server.start()
    maildir = work / f"Maildir-{accounts}"
    empty_maildir(maildir)
    config_file = config(work, server, accounts, idle, maildir)
    user.own(work)
    daemon = Daemon([str(python), "-m", "postbote", "-c", str(config_file), "run"],
                    env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(user.home), "LANG": "C.UTF-8",
                         "TZ": "UTC", "PYTHONPATH": str(code)},
                    cwd=work, log=work / f"daemon-{accounts}-{'idle' if idle else 'noidle'}.log", user=user)
    try:
        daemon.wait_for("poll.finished", accounts, args.timeout)
        if idle:
            daemon.wait_for("watch.started", accounts, args.timeout)
        daemon.settle(args.settle, args.timeout)
        result["ready_s"] = round(time.monotonic() - started, 1)
        status = proc_status(daemon.process.pid)
        result.update(status)
        connections = subprocess.run(["ss", "-tnH", "state", "established", f"dport = :{server.imap_port}"],
                                     capture_output=True, text=True).stdout.count("\n")
        result["imap_connections"] = connections
        result["inotify_limit_warnings"] = server.dovecot.log_text().count("Inotify instance limit")
        result["events"] = {k: v for k, v in daemon.counts.items() if k.startswith(("watch.", "poll.finished"))}
        print(f"N={accounts} idle={idle}: {json.dumps(result)}", file=sys.stderr, flush=True)
        if latency:
            corpus = small_corpus(2 * latency, args.seed, tag="p")
            pushes = []
            for number in range(latency):
                before = len(maildir_files([maildir]))
                t0 = time.perf_counter()
                append(server, account_user(1), corpus.messages[number].data)
                while len(maildir_files([maildir])) <= before:
                    if time.perf_counter() - t0 > 90:
                        raise SystemExit("a pushed message was not delivered within 90 s")
                    time.sleep(0.002)
                pushes.append(time.perf_counter() - t0)
                time.sleep(args.gap)  # the poll's own changes (EXPUNGE) must not have a notify timer running
            raw = []
            for number in range(latency):
                raw.append(raw_idle_delay(server, RAW_USER, corpus.messages[latency + number].data))
                time.sleep(args.gap)
            result["push_ms"] = [round(p * 1000) for p in pushes]
            result["raw_exists_ms"] = [round(r * 1000) for r in raw]
            after = proc_status(daemon.process.pid)
            result["after_pushes"] = after
    finally:
        result["exit"] = daemon.stop()
        server.stop()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/idle_rss.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accounts", default="100,300,1000", help="comma-separated N (default 100,300,1000)")
    parser.add_argument("--no-idle", action="store_true", help="also measure the largest N with idle: false")
    parser.add_argument("--latency", type=int, default=10, help="push latency samples at the largest N (0: none)")
    parser.add_argument("--gap", type=float, default=2.0,
                        help="seconds between pushes: Dovecot delays a notification 500 ms after the first change, "
                             "so a push within that window of the previous poll's EXPUNGE would come early")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds without log events before measuring")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--source", type=Path, default=environment.REPO)
    parser.add_argument("--cache-dir", type=Path, default=environment.DEFAULT_CACHE)
    parser.add_argument("--keep-workdir", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    counts = sorted(int(n) for n in args.accounts.split(","))
    raise_nofile()
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    user = environment.run_user(args.cache_dir)
    python = environment.postbote_venv(args.cache_dir, user, args.source, print)
    base = args.cache_dir / f"idle-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    base.mkdir(parents=True)
    base.chmod(0o755)
    code = environment.snapshot_postbote(args.source, base / "postbote-code", user)
    results = []
    plan = [(n, True, args.latency if n == counts[0] else 0) for n in counts]
    if args.no_idle:
        plan.append((counts[-1], False, 0))
    for accounts, idle, latency in plan:
        work = base / f"n{accounts}-{'idle' if idle else 'noidle'}"
        work.mkdir()
        results.append(measure(args, user, python, code, accounts, idle, latency, work))
    print(f"command: python bench/idle_rss.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"postbote source: {args.source} ({environment.source_revision(args.source)}); machine: {os.cpu_count()} "
          f"CPUs; load average at the end {os.getloadavg()[0]:.2f}")
    print()
    print("| accounts | idle | IMAP connections | VmRSS MB | VmHWM MB | RssAnon MB | threads | fds | ready after s "
          "| Dovecot inotify-limit warnings |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['accounts']:,} | {'yes' if r['idle'] else 'no'} | {r.get('imap_connections', '–')} | "
              f"{r.get('VmRSS', 0) / 1024:.1f} | {r.get('VmHWM', 0) / 1024:.1f} | {r.get('RssAnon', 0) / 1024:.1f} | "
              f"{r.get('tasks', '–')} | {r.get('fds', '–')} | {r.get('ready_s', '–')} | "
              f"{r.get('inotify_limit_warnings', '–')} |")
    idle_runs = [r for r in results if r["idle"] and "VmRSS" in r]
    if len(idle_runs) >= 2:
        low, high = idle_runs[0], idle_runs[-1]
        slope = (high["VmRSS"] - low["VmRSS"]) / (high["accounts"] - low["accounts"])
        anon = (high["RssAnon"] - low["RssAnon"]) / (high["accounts"] - low["accounts"])
        print(f"\nRSS growth per idle account, N={low['accounts']} -> {high['accounts']}: {slope:.0f} KB "
              f"(anonymous memory {anon:.0f} KB)")
    off = [r for r in results if not r["idle"] and "VmRSS" in r]
    same = [r for r in idle_runs if off and r["accounts"] == off[0]["accounts"]]
    if off and same:
        print(f"watches alone (idle: true minus idle: false, N={off[0]['accounts']}): "
              f"{(same[0]['VmRSS'] - off[0]['VmRSS']) / off[0]['accounts']:.0f} KB per account")
    for r in results:
        if "push_ms" in r:
            push, raw = r["push_ms"], r["raw_exists_ms"]
            print(f"\npush latency with {r['accounts']:,} accounts idling, APPEND by another client -> file in the "
                  f"Maildir: median {statistics.median(push):.0f} ms (min {min(push)}, max {max(push)}, "
                  f"n={len(push)})")
            print(f"Dovecot alone, APPEND's OK -> '* n EXISTS' at a bare IDLE client: median "
                  f"{statistics.median(raw):.0f} ms (min {min(raw)}, max {max(raw)}, n={len(raw)})")
            print(f"daemon after the pushes: {r['after_pushes']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if not args.keep_workdir:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
