"""Many accounts on one machine (issue 16): CPU per empty TLS poll against a floor, polls/s, start-up and memory.

    python bench/scale.py cpu --users 3000 --repeat 3           # postbote run vs. the stdlib floor, same Dovecot
    python bench/scale.py cpu --users 3000 --login-reuse        # Dovecot's login processes reused: TLS resumption
    python bench/scale.py cpu --users 3000 --metrics            # with the metrics plugin's textfile
    python bench/scale.py startup --accounts 10000,100000       # READY, RSS and `check` with a conf.d of accounts
    python bench/scale.py profile --users 1000 --out /tmp/prof  # in process, one poll after another, cProfile
    python bench/scale.py profile --users 1000 --spy             # the same, sampled by py-spy (network waits count)

A private Dovecot (the test suite's, `tests/servers/dovecot.py`, with its limits raised for ``--parallel``
connections) holds ``--users`` users, all empty but ``--with-mail`` of them (one message each), served over POP3S
with a self-signed certificate that postbote pins (``tls_fingerprint``), as the floor does.

``cpu``: ``postbote run`` with one account per user, ``max_parallel`` and ``max_parallel_per_host`` at
``--parallel``, and a ``poll_interval`` short enough that the accounts are always due, so that the daemon polls as
fast as it can: after ``--warmup`` seconds (and with ``--steady`` once every account has been polled, so that
what an account's first poll alone does is behind the window), its CPU (utime + stime of the process, /proc) and
the polls it finished (``poll.finished`` in its JSON log, at level info: the log line is part of the cost) are
taken over ``--seconds`` seconds. In the same repetition the floor (`pop3_floor.py`: one SSL context, the same pin,
CAPA, AUTH PLAIN, UIDL, LIST, QUIT, ``--parallel`` threads) polls every user once. Dovecot's CPU is taken around
both, so the server's share of a poll is known too. Everything runs on this machine's cores: polls/s is what
postbote sustains with Dovecot beside it.

With ``--metrics`` the metrics plugin is on, every account in one node-exporter textfile (what a provider
watching its accounts in Prometheus runs).

``startup``: ``postbote run`` with ``N`` accounts (files of 1,000 accounts in an ``accounts_dir``, the users round
robin, ``poll_interval: 5m``): seconds from the start to systemd's READY=1 (a notify socket of our own), RSS
``--settle`` seconds later (while it polls), and the wall time of ``postbote check`` of that config.

The code measured is a copy of this checkout's ``agent/`` and ``plugins/`` taken at the start (edits made meanwhile
do not mix in). Figures go to docs/performance.md, "Scale (issue 16)".
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pwd
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import environment  # noqa: E402
from bench.profile import py_spy, summarise  # noqa: E402
from bench.scale_config import accounts, password_of, user_name, write  # noqa: E402
from tests.servers.certs import TestPKI, make_test_pki  # noqa: E402
from tests.servers.dovecot import DovecotServer  # noqa: E402

NOFILE = 20_000
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MAIL = (b"From: someone@example.org\r\nTo: you@example.org\r\nSubject: hello\r\n\r\n"
        b"One message among many empty boxes.\r\n")


# --- the machine and its processes


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(NOFILE, hard)), hard))


def process_cpu(pid: int, *, children: bool = False) -> float:
    """CPU seconds of ``pid`` (user + system), and of its reaped children with ``children``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if children else 0)
    return ticks / CLOCK_TICKS


def dovecot_cpu(server: DovecotServer) -> float:
    """Dovecot's CPU so far: every live process of it, and the master's reaped children (exited login processes)."""
    total = 0.0
    for pid in server.process_ids():
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += process_cpu(pid, children=pid == server.pid)
    return total


def vm_status(pid: int) -> dict[str, int]:
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            found[key] = int(value.split()[0])
    return found


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "?")
    return f"{os.cpu_count()} cores ({model}), load average {os.getloadavg()[0]:.2f} at the start"


# --- the server


@dataclass
class Setup:
    work: Path
    code: Path
    server: DovecotServer
    pki: TestPKI
    fingerprint: str
    users: int


@contextlib.contextmanager
def set_up(args: argparse.Namespace) -> Iterator[Setup]:
    raise_nofile()
    work = Path(tempfile.mkdtemp(prefix="scale-", dir=args.cache_dir))
    me = pwd.getpwuid(os.geteuid())
    code = environment.snapshot_postbote(environment.REPO, work / "code",
                                         environment.RunUser(me.pw_name, me.pw_uid, me.pw_gid, Path(me.pw_dir)))
    pki = make_test_pki(work / "pki")
    fingerprint = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pki.cert_file.read_text())).hexdigest()
    server = DovecotServer(pki=pki, users={}, clients=2 * args.parallel + 50, login_reuse=args.login_reuse)
    server.add_users({user_name(i): password_of(user_name(i)) for i in range(args.users)})
    server.start()
    try:
        yield Setup(work, code, server, pki, fingerprint, args.users)
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def seed(setup: Setup, count: int) -> None:
    for index in range(count):
        setup.server.deliver(user_name(index), MAIL)


# --- postbote run


class NotifySocket:
    """Stands in for systemd: a datagram socket that postbote's READY=1 arrives on."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="sn-", dir="/tmp"))
        self.address = str(self.directory / "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.address)

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                if b"READY=1" in self.sock.recv(65536).split(b"\n"):
                    return True
            except TimeoutError:
                return False
        return False

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.directory, ignore_errors=True)


class Daemon:
    def __init__(self, setup: Setup, config: Path, log: Path) -> None:
        self.notify = NotifySocket()
        self.log_path = log
        self.log = log.open("wb")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(setup.code), "LANG": "C.UTF-8",
               "NOTIFY_SOCKET": self.notify.address}
        self.started = time.monotonic()
        self.process = subprocess.Popen([sys.executable, "-m", "postbote", "-c", str(config), "run"], env=env,
                                        cwd=setup.work, stdout=subprocess.DEVNULL, stderr=self.log)

    def wait_ready(self, timeout: float = 900) -> float:
        if not self.notify.wait_ready(timeout):
            raise SystemExit(f"postbote run sent no READY=1 within {timeout:g} s; see {self.log_path}")
        return time.monotonic() - self.started

    def polls(self) -> tuple[int, int]:
        """Polls finished so far, and how many of them failed."""
        done = failed = 0
        with self.log_path.open("rb") as log:
            for line in log:
                if b'"poll.finished"' in line:
                    done += 1
                    failed += b'"ok": false' in line or b'"ok":false' in line
        return done, failed

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
        self.notify.close()


def daemon_config(setup: Setup, count: int, interval: str, parallel: int, name: str, *,
                  metrics: bool = False) -> Path:
    """With ``metrics``: the metrics plugin on, every account in one node-exporter textfile."""
    entries = accounts(count, setup.users, setup.server.host, setup.server.pop3s_port or 0,
                       fingerprint=setup.fingerprint, maildir=setup.work / "Maildir", interval=interval)
    directory = setup.work / name
    if directory.exists():
        shutil.rmtree(directory)
    plugins = {"metrics": {"textfile": str(directory / "postbote.prom")}} if metrics else None
    return write(directory / "postbote.yaml", entries, state_dir=directory / "state",
                 per_file=1000 if count > 1000 else 0, max_parallel=parallel, max_parallel_per_host=parallel,
                 plugins=plugins)


def measure_postbote(setup: Setup, args: argparse.Namespace, repetition: int) -> dict[str, Any]:
    config = daemon_config(setup, setup.users, f"{args.interval}s", args.parallel, f"run-{repetition}",
                           metrics=args.metrics)
    daemon = Daemon(setup, config, config.parent / "daemon.log")
    try:
        ready = daemon.wait_ready()
        time.sleep(args.warmup)
        if args.steady:  # every account polled once: what its first poll alone does is behind the window
            deadline = time.monotonic() + 900
            while daemon.polls()[0] < setup.users and time.monotonic() < deadline:
                time.sleep(1)
        spy = sampled(daemon.process.pid, args, repetition)
        cpu0, server0, (polls0, failed0), wall0 = (process_cpu(daemon.process.pid), dovecot_cpu(setup.server),
                                                   daemon.polls(), time.monotonic())
        time.sleep(args.seconds)
        cpu1, server1, (polls1, failed1), wall1 = (process_cpu(daemon.process.pid), dovecot_cpu(setup.server),
                                                   daemon.polls(), time.monotonic())
        status = vm_status(daemon.process.pid)
        if spy is not None:
            spy.wait()
            print(summarise(args.spy / f"daemon-{repetition}.txt", 40, "postbote"), flush=True)
    finally:
        daemon.stop()
    polls = polls1 - polls0
    if polls <= 0:
        raise SystemExit(f"postbote finished no poll in {args.seconds} s; see {daemon.log_path}")
    return {"who": "postbote", "ready_s": round(ready, 2), "polls": polls, "failed": failed1 - failed0,
            "cpu_ms_per_poll": 1000 * (cpu1 - cpu0) / polls, "polls_per_s": polls / (wall1 - wall0),
            "server_ms_per_poll": 1000 * (server1 - server0) / polls, "rss_mb": status.get("VmRSS", 0) / 1024,
            "threads": status.get("Threads", 0)}


def sampled(pid: int, args: argparse.Namespace, repetition: int) -> subprocess.Popen[bytes] | None:
    """py-spy sampling the daemon over the measured window (``--spy DIR``: shares, not rates -- it slows it)."""
    if args.spy is None:
        return None
    args.spy.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([str(py_spy(environment.DEFAULT_CACHE)), "record", "-p", str(pid), "-d",
                             str(int(args.seconds)), "-r", "250", "-f", "raw", "-o",
                             str(args.spy / f"daemon-{repetition}.txt"), *(["--gil"] if args.gil else [])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def measure_floor(setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    users_file = setup.work / "floor-users.txt"
    users_file.write_text("".join(f"{user_name(i)} {password_of(user_name(i))}\n" for i in range(setup.users)))
    server0 = dovecot_cpu(setup.server)
    done = subprocess.run([sys.executable, "-m", "bench.pop3_floor", "--host", setup.server.host,
                           "--port", str(setup.server.pop3s_port), "--fingerprint", setup.fingerprint,
                           "--users", str(users_file), "--parallel", str(args.parallel), "--rounds", "1"],
                          cwd=environment.REPO, capture_output=True, text=True, check=False)
    server1 = dovecot_cpu(setup.server)
    if not done.stdout.strip():
        raise SystemExit(f"the floor client failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    polls = result["polls"]
    return {"who": "floor", "polls": polls, "failed": result["failures"],
            "cpu_ms_per_poll": 1000 * result["cpu_s"] / polls, "polls_per_s": polls / result["wall_s"],
            "server_ms_per_poll": 1000 * (server1 - server0) / polls}


def run_cpu(args: argparse.Namespace) -> int:
    print(f"machine: {machine()}; shared with other engineers' test runs", flush=True)
    rows: list[dict[str, Any]] = []
    with set_up(args) as setup:
        seed(setup, args.with_mail)
        for repetition in range(1, args.repeat + 1):
            for who in ("postbote", "floor"):
                load = round(os.getloadavg()[0], 2)
                measured = (measure_postbote(setup, args, repetition) if who == "postbote"
                            else measure_floor(setup, args))
                row = {"run": repetition, "load": load, **measured}
                rows.append(row)
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    print_cpu_table(rows, args)
    return 0


def spread(values: list[float], digits: int = 2) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def print_cpu_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    postbote = [row for row in rows if row["who"] == "postbote"]
    floor = [row for row in rows if row["who"] == "floor"]
    ratios = [p["cpu_ms_per_poll"] / f["cpu_ms_per_poll"] for p, f in zip(postbote, floor, strict=True)]
    print(f"\n{args.users} users, --parallel {args.parallel}, login processes "
          f"{'reused' if args.login_reuse else 'one per connection'}"
          f"{'; measured once every account was polled' if args.steady else ''}"
          f"{'; metrics textfile of every account' if args.metrics else ''}; median (min–max) of "
          f"{args.repeat} runs\n")
    print("| | CPU ms per empty poll | × floor | polls/s | Dovecot CPU ms per poll | failed polls |")
    print("|---|---|---|---|---|---|")
    print(f"| postbote run | {spread([r['cpu_ms_per_poll'] for r in postbote])} | {spread(ratios, 1)} | "
          f"{spread([r['polls_per_s'] for r in postbote], 0)} | "
          f"{spread([r['server_ms_per_poll'] for r in postbote])} | {sum(r['failed'] for r in postbote)} |")
    print(f"| floor (stdlib) | {spread([r['cpu_ms_per_poll'] for r in floor])} | 1 | "
          f"{spread([r['polls_per_s'] for r in floor], 0)} | "
          f"{spread([r['server_ms_per_poll'] for r in floor])} | {sum(r['failed'] for r in floor)} |")
    print(f"\npostbote run: RSS {spread([r['rss_mb'] for r in postbote], 0)} MB, "
          f"threads {spread([float(r['threads']) for r in postbote], 0)}")


# --- start-up


def run_startup(args: argparse.Namespace) -> int:
    print(f"machine: {machine()}; shared with other engineers' test runs", flush=True)
    rows = []
    with set_up(args) as setup:
        for count in (int(n) for n in args.accounts.split(",")):
            for repetition in range(1, args.repeat + 1):
                config = daemon_config(setup, count, "5m", args.parallel, f"start-{count}-{repetition}")
                daemon = Daemon(setup, config, config.parent / "daemon.log")
                try:
                    ready = daemon.wait_ready()
                    time.sleep(args.settle)
                    status = vm_status(daemon.process.pid)
                finally:
                    daemon.stop()
                started = time.monotonic()
                subprocess.run([sys.executable, "-m", "postbote", "-c", str(config), "check"], cwd=setup.work,
                               env={**os.environ, "PYTHONPATH": str(setup.code)}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, check=False)
                row = {"accounts": count, "run": repetition, "load": round(os.getloadavg()[0], 2),
                       "ready_s": round(ready, 2), "rss_mb": round(status["VmRSS"] / 1024),
                       "hwm_mb": round(status["VmHWM"] / 1024), "threads": status["Threads"],
                       "check_s": round(time.monotonic() - started, 2)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\nmedian (min–max) of {args.repeat} runs; RSS {args.settle:g} s after READY=1, while polling\n")
    print("| accounts | READY=1 s | RSS MB | peak RSS MB | `check` s |")
    print("|---|---|---|---|---|")
    for count in sorted({row["accounts"] for row in rows}):
        mine = [row for row in rows if row["accounts"] == count]
        print(f"| {count:,} | {spread([r['ready_s'] for r in mine], 1)} | {spread([r['rss_mb'] for r in mine], 0)} | "
              f"{spread([r['hwm_mb'] for r in mine], 0)} | {spread([r['check_s'] for r in mine], 1)} |")
    return 0


# --- in process, under cProfile

DRIVER = """
import cProfile, pstats, sys, time
from pathlib import Path
from postbote.config import load_config
from postbote.jobs import plugins_started
from postbote.logconfig import configure_logging
from postbote.pluginmanager import make_plugin_manager
from postbote.poller import Poller
from postbote.state import StateStore
configure_logging("info", "json", stream=open("/dev/null", "w"))
pm = make_plugin_manager(entry_points=False)
config = load_config(Path(sys.argv[1]), pm)
store = StateStore(config.state_dir)
with plugins_started(pm, config):
    poller = Poller(pm, store)
    poller.poll(config.accounts[0])  # imports, the context: not per poll
    profiler = cProfile.Profile(time.process_time) if sys.argv[2] != "-" else None
    started = time.process_time()
    if profiler:
        profiler.enable()
    ok = sum(poller.poll(account).ok for account in config.accounts[1:])
    if profiler:
        profiler.disable()
        profiler.dump_stats(sys.argv[2])
    seconds = time.process_time() - started
print("POLLS", len(config.accounts) - 1, ok, seconds)
"""


def run_profile(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    with set_up(args) as setup:
        driver = setup.work / "driver.py"
        driver.write_text(DRIVER)
        for repetition in range(1, args.repeat + 1):
            config = daemon_config(setup, setup.users, "5m", 1, f"profile-{repetition}")
            for profiled in (False, True):
                stats = args.out / f"poll-{repetition}.pstats" if profiled else None
                spy = [] if profiled or args.spy is None else [
                    str(py_spy(environment.DEFAULT_CACHE)), "record", "-r", "1000", "-f", "raw", "-o",
                    str(args.out / f"spy-{repetition}.txt"), "--"]
                done = subprocess.run([*spy, sys.executable, str(driver), str(config), str(stats) if stats else "-"],
                                      cwd=setup.work, env={**os.environ, "PYTHONPATH": str(setup.code)},
                                      capture_output=True, text=True, check=False)
                line = next((line for line in done.stdout.splitlines() if line.startswith("POLLS ")), None)
                if line is None:
                    raise SystemExit(f"the driver failed:\n{done.stderr[-3000:]}")
                polls, ok, seconds = line.split()[1:]
                print(f"run {repetition}{' (under cProfile)' if profiled else ''}: {ok}/{polls} polls ok, "
                      f"{1000 * float(seconds) / int(polls):.2f} ms CPU per poll, one after another", flush=True)
        if args.spy:
            print(summarise(args.out / f"spy-{args.repeat}.txt", args.top, ""), flush=True)
            return 0
        import pstats

        pstats.Stats(str(args.out / f"poll-{args.repeat}.pstats")).sort_stats("tottime").print_stats(args.top)
        pstats.Stats(str(args.out / f"poll-{args.repeat}.pstats")).sort_stats("cumulative").print_stats(args.top)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/scale.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("cpu", "startup", "profile"):
        sub = commands.add_parser(name)
        sub.add_argument("--users", type=int, default=3000)
        sub.add_argument("--parallel", type=int, default=32)
        sub.add_argument("--repeat", type=int, default=3)
        sub.add_argument("--login-reuse", action="store_true",
                         help="Dovecot's login processes serve many connections (service_count = 0): TLS resumption")
        sub.add_argument("--cache-dir", type=Path, default=Path("/var/tmp"))
        sub.add_argument("--keep", action="store_true", help="keep the work directory")
    cpu, startup, profile = (commands.choices[name] for name in ("cpu", "startup", "profile"))
    cpu.add_argument("--with-mail", type=int, default=5, help="users given one message (the others stay empty)")
    cpu.add_argument("--interval", type=int, default=5, help="poll_interval in seconds: short, always due")
    cpu.add_argument("--warmup", type=float, default=10.0)
    cpu.add_argument("--seconds", type=float, default=20.0)
    cpu.add_argument("--steady", action="store_true",
                     help="measure once every account has been polled (the daemon's steady state): an account's "
                          "first poll also asks for push and registers its login's secrets")
    cpu.add_argument("--metrics", action="store_true",
                     help="the metrics plugin on: every account in one node-exporter textfile")
    cpu.add_argument("--spy", type=Path, metavar="DIR", help="sample the daemon with py-spy into DIR (slower)")
    cpu.add_argument("--gil", action="store_true", help="with --spy: only samples of the thread holding the GIL")
    startup.add_argument("--accounts", default="10000,100000")
    startup.add_argument("--settle", type=float, default=20.0)
    profile.add_argument("--out", type=Path, default=Path("/var/tmp/scale-profile"))
    profile.add_argument("--top", type=int, default=30)
    profile.add_argument("--spy", action="store_true",
                         help="sample the unprofiled runs with py-spy and show those shares (network waits count)")
    args = parser.parse_args(argv)
    return {"cpu": run_cpu, "startup": run_startup, "profile": run_profile}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
