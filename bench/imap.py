"""IMAP benchmarks (issue 13): IMAP -> Maildir against mbsync, fetchmail and getmail6, and POP3 -> IMAP APPEND
against a lock-step APPEND loop. One command each, one table each; nothing is asserted.

    python bench/imap.py fetch --net loopback            # 1,000 small messages, IMAP -> Maildir, 3 repetitions
    python bench/imap.py fetch --net rtt                 # the same through the 20 ms relay
    python bench/imap.py fetch --after-fetch delete      # postbote, fetchmail, getmail6 deleting (mbsync cannot)
    python bench/imap.py append                          # POP3 -> IMAP APPEND at 20 ms RTT vs. an imaplib loop
    python bench/imap.py fetch --quick                   # smoke run: 50 messages, one repetition
    python bench/imap.py profile --net loopback [--cpu]  # postbote alone: Poller.poll timed in process, py-spy

Everything as in bench/run.py (bench/README.md): the test suite's Dovecot on loopback (IMAP here), the same seeded
corpus, every tool run as the ``bench`` user from a fresh state directory into the same emptied Maildir, the tools
interleaved within each repetition (order rotated), every run verified (each message arrived once, unaltered apart
from trace fields). Wall time and CPU (user + system of the tool and its children, from GNU time) and the largest
process's peak RSS.

* ``fetch``: ``after_fetch: keep`` by default, since mbsync never removes what it pulled (``Sync Pull``; its
  ``Expunge`` only removes what is already flagged \\Deleted): postbote ``after_fetch: keep``, mbsync ``Sync Pull``,
  fetchmail ``keep fetchall`` (safecat MDA, as in the POP3 bench), getmail6 ``SimpleIMAPRetriever`` with
  ``delete = false``. ``--after-fetch delete``: postbote ``delete`` (\\Deleted + UID EXPUNGE), fetchmail ``nokeep``
  (its default EXPUNGE after each), getmail6 ``delete = true``; the mailbox must then be empty after each run.
* ``append``: a POP3 account on loopback delivered with ``deliver: {imap: ...}`` into another Dovecot user's INBOX
  through the delaying relay, against ``bench/imap_lockstep.py`` (stdlib poplib + imaplib, one APPEND at a time,
  each waiting for its OK: the script users write), same source and same destination; and the same script with
  TCP_NODELAY on imaplib's socket (imaplib sends a literal's final CRLF in a write of its own, which Nagle holds
  until the server's delayed ACK: without it the loop costs two round trips per message, not four).
"""

from __future__ import annotations

import argparse
import imaplib
import json
import os
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import environment  # noqa: E402
from bench.corpus import Corpus, small_corpus  # noqa: E402
from bench.environment import RunUser, find_binary  # noqa: E402
from bench.mailserver import PASSWORD, BenchMailServer  # noqa: E402
from bench.measure import _run_one  # noqa: E402
from bench.relay import RelayProcess  # noqa: E402
from bench.runner import empty_maildir  # noqa: E402
from bench.tools import Runtime  # noqa: E402
from bench.verify import maildir_files, verify  # noqa: E402
from tests.servers.dovecot import DovecotServer  # noqa: E402

SOURCE_USER = "u1"
DEST_USER = "dest"
IMAP_EXTRA_CONFIG = """
default_process_limit = 300
default_client_limit = 2000
mail_max_userip_connections = 50
"""
LOCKSTEP = Path(__file__).resolve().parent / "imap_lockstep.py"


# --- the server -------------------------------------------------------------------------------------------------


class IMAPBenchServer(BenchMailServer):
    """The benchmark's Dovecot with ``u1`` (the source) and ``dest`` (the APPEND destination), IMAP on loopback."""

    def __init__(self, users: Sequence[str] = (SOURCE_USER, DEST_USER), extra_config: str = IMAP_EXTRA_CONFIG) -> None:
        self.users = list(users)
        self.dovecot = DovecotServer(tls=False, users={name: PASSWORD for name in self.users},
                                     extra_config=extra_config)

    @property
    def imap_port(self) -> int:
        return self.dovecot.imap_port

    def warm_imap(self, user: str, expected: int) -> None:
        """SELECT once (Dovecot indexes new/ and moves it to cur/) and list what a fetcher lists, untimed."""
        with imaplib.IMAP4(self.host, self.imap_port, timeout=120) as client:
            client.login(user, PASSWORD)
            status, data = client.select("INBOX")
            count = int(data[0]) if status == "OK" and data[0] else 0
            if count:
                client.uid("FETCH", "1:*", "(UID FLAGS RFC822.SIZE INTERNALDATE)")
            client.close()
        if count != expected:
            raise RuntimeError(f"Dovecot lists {count} messages in {user}'s INBOX, {expected} were seeded")
        os.sync()

    def clear_imap(self, user: str) -> None:
        """Expunge everything in ``user``'s INBOX through IMAP: files removed behind Dovecot's back may still be listed
        by its index for a while."""
        with imaplib.IMAP4(self.host, self.imap_port, timeout=120) as client:
            client.login(user, PASSWORD)
            status, data = client.select("INBOX")
            if status == "OK" and data[0] and int(data[0]):
                client.store("1:*", "+FLAGS.SILENT", "(\\Deleted)")
                client.expunge()
            client.close()
        self.clear([user])

    def imap_count(self, user: str) -> int:
        with imaplib.IMAP4(self.host, self.imap_port, timeout=120) as client:
            client.login(user, PASSWORD)
            status, data = client.select("INBOX", readonly=True)
            return int(data[0]) if status == "OK" and data[0] else 0


def imap_probe(host: str, port: int, rounds: int = 20) -> float:
    """Median round trip (seconds) of an IMAP NOOP before login."""
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = sock.makefile("rb")
        reader.readline()
        times = []
        for number in range(rounds):
            tag = f"p{number}".encode()
            started = time.perf_counter()
            sock.sendall(tag + b" NOOP\r\n")
            while not reader.readline().startswith(tag + b" "):
                pass
            times.append(time.perf_counter() - started)
        sock.sendall(b"q LOGOUT\r\n")
    return sorted(times)[len(times) // 2]


# --- the tools --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    host: str
    port: int  # IMAP (fetch) or POP3 (append) of the source
    maildir: Path | None  # fetch: the destination
    workdir: Path
    delete: bool = False
    dest_port: int | None = None  # append: IMAP of the destination (through the relay)


def _private(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


class Tool:
    name = ""
    binaries: tuple[str, ...] = ()
    deletes = True  # can remove what it fetched

    def missing(self) -> str | None:
        absent = [name for name in self.binaries if find_binary(name) is None]
        return f"not installed: {', '.join(absent)}" if absent else None

    def commands(self, job: Job, runtime: Runtime) -> list[list[str]]:
        raise NotImplementedError

    def env(self, runtime: Runtime) -> dict[str, str]:
        return runtime.env()


class Postbote(Tool):
    name = "postbote"

    def commands(self, job: Job, runtime: Runtime) -> list[list[str]]:
        if job.dest_port is None:  # IMAP -> Maildir
            account = {"name": SOURCE_USER, "protocol": "imap", "host": job.host, "port": job.port, "tls": "none",
                       "username": SOURCE_USER, "password": PASSWORD, "folders": ["INBOX"],
                       "after_fetch": "delete" if job.delete else "keep",
                       "deliver": {"maildir": str(job.maildir)}}
        else:  # POP3 -> IMAP APPEND
            account = {"name": SOURCE_USER, "host": job.host, "port": job.port, "tls": "none",
                       "username": SOURCE_USER, "password": PASSWORD,
                       "deliver": {"imap": {"host": job.host, "port": job.dest_port, "tls": "none",
                                            "username": DEST_USER, "password": PASSWORD, "folder": "INBOX"}}}
        config = {"state_dir": str(job.workdir / "state"), "log": {"level": "warning", "format": "json"},
                  "defaults": {"timeout": "300s"}, "accounts": [account]}
        path = _private(job.workdir / "postbote.yaml", json.dumps(config, indent=2) + "\n")
        return [[str(runtime.postbote_python), "-m", "postbote", "-c", str(path), "poll"]]

    def env(self, runtime: Runtime) -> dict[str, str]:
        return {**runtime.env(), "PYTHONPATH": str(runtime.postbote_code)}


class Mbsync(Tool):
    """isync's mbsync: an IMAPStore and a MaildirStore, one channel, ``Sync Pull`` (new mail from the server).
    mbsync fsyncs every message it stores by default (``FSync yes``); ``fsync=False`` is the ``FSync no`` row
    (``--tools ...,mbsync-nofsync``): faster, and after a crash its state may list messages as copied that never
    reached the disk."""

    binaries = ("mbsync",)
    deletes = False

    def __init__(self, fsync: bool = True) -> None:
        self.fsync = fsync
        self.name = "mbsync" if fsync else "mbsync-nofsync"

    def commands(self, job: Job, runtime: Runtime) -> list[list[str]]:
        state = job.workdir / "mbsync-state"
        state.mkdir(exist_ok=True)
        rc = _private(job.workdir / "mbsyncrc", (
            ("" if self.fsync else "FSync no\n\n")
            + f"IMAPAccount bench\nHost {job.host}\nPort {job.port}\nUser {SOURCE_USER}\nPass {PASSWORD}\n"
            "SSLType None\nAuthMechs LOGIN\nTimeout 300\n\n"
            "IMAPStore far\nAccount bench\n\n"
            f"MaildirStore near\nInbox {job.maildir}\n\n"
            "Channel bench\nFar :far:\nNear :near:\nPatterns INBOX\nSync Pull\nCreate Near\nExpunge None\n"
            f"SyncState {state}/\n"))
        return [[find_binary("mbsync") or "mbsync", "-q", "-c", str(rc), "bench"]]


class Fetchmail(Tool):
    name = "fetchmail"
    binaries = ("fetchmail", "safecat")

    def commands(self, job: Job, runtime: Runtime) -> list[list[str]]:
        assert job.maildir is not None
        mda = f'mda "{find_binary("safecat")} {job.maildir / "tmp"} {job.maildir / "new"}"'
        rc = _private(job.workdir / "fetchmailrc", (
            f"poll {job.host} protocol imap port {job.port} auth password timeout 300\n"
            f'  user "{SOURCE_USER}" password "{PASSWORD}" folder INBOX\n'
            f"  sslproto '' fetchall {'nokeep' if job.delete else 'keep'} {mda}\n"))
        return [[find_binary("fetchmail") or "fetchmail", "-d0", "-s", "--nosyslog", "-f", str(rc),
                 "-i", str(job.workdir / ".fetchids"), "--pidfile", str(job.workdir / "fetchmail.pid")]]


class Getmail(Tool):
    name = "getmail6"
    binaries = ("getmail",)

    def commands(self, job: Job, runtime: Runtime) -> list[list[str]]:
        _private(job.workdir / "getmailrc", (
            "[retriever]\ntype = SimpleIMAPRetriever\n"
            f"server = {job.host}\nport = {job.port}\nusername = {SOURCE_USER}\n"
            f"password = {PASSWORD}\nmailboxes = (\"INBOX\",)\ntimeout = 20\n\n"
            f"[destination]\ntype = Maildir\npath = {job.maildir}/\n\n"
            f"[options]\nread_all = false\ndelete = {'true' if job.delete else 'false'}\nverbose = 0\n"))
        return [[find_binary("getmail") or "getmail", "-q", f"--getmaildir={job.workdir}", "--rcfile=getmailrc"]]


class Lockstep(Tool):
    """POP3 -> IMAP by the stdlib, one message at a time: RETR, APPEND and its OK, then the next (see the script)."""

    def __init__(self, nodelay: bool = False) -> None:
        self.nodelay = nodelay
        self.name = "imaplib lock-step" + (" TCP_NODELAY" if nodelay else "")

    def commands(self, job: Job, runtime: Runtime) -> list[list[str]]:
        return [["/usr/bin/python3", str(job.workdir / LOCKSTEP.name), job.host, str(job.port),
                 str(job.dest_port), SOURCE_USER, DEST_USER, PASSWORD, *(["--nodelay"] if self.nodelay else [])]]


FETCHERS: dict[str, Tool] = {tool.name: tool for tool in (Postbote(), Mbsync(), Fetchmail(), Getmail())}
VARIANTS: dict[str, Tool] = {tool.name: tool for tool in (Mbsync(fsync=False),)}


# --- measuring --------------------------------------------------------------------------------------------------


@dataclass
class Run:
    mode: str
    tool: str
    repetition: int
    messages: int
    octets: int
    wall: float = 0.0
    cpu: float = 0.0  # user + system of the tool and its reaped children
    peak_rss_kb: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def run_timed(argv_list: list[list[str]], *, user: RunUser, env: dict[str, str], cwd: Path, log: Path,
              timeout: float) -> tuple[float, float, int, list[int], bool]:
    """Like bench.measure.run_measured, and the CPU time too: (wall, cpu, peak RSS kB, exit codes, timed out)."""
    gnu_time = find_binary("time")
    if gnu_time is None:
        raise RuntimeError("GNU time is needed (apt-get install time)")
    cpu = 0.0
    peak = 0
    codes: list[int] = []
    deadline = time.monotonic() + timeout
    with log.open("ab") as output, tempfile.TemporaryDirectory(prefix="pbbench-time-") as scratch:
        os.chmod(scratch, 0o777)
        figures = Path(scratch) / "figures"
        started = time.perf_counter()
        for argv in argv_list:
            output.write(f"$ {shlex.join(argv)}\n".encode())
            output.flush()
            wrapped = [gnu_time, "-f", "%M %U %S", "-o", str(figures), "--", *argv]
            code, timed_out = _run_one(wrapped, user=user, env=env, cwd=cwd, output=output,
                                       timeout=max(0.1, deadline - time.monotonic()))
            codes.append(code)
            try:
                last = figures.read_text().splitlines()[-1].split()
                peak = max(peak, int(last[0]))
                cpu += float(last[1]) + float(last[2])
            except (OSError, IndexError, ValueError):
                pass
            if timed_out:
                return time.perf_counter() - started, cpu, peak, codes, True
        return time.perf_counter() - started, cpu, peak, codes, False


@dataclass
class Row:
    mode: str
    tool: str
    messages: int
    runs: list[Run]

    @property
    def good(self) -> list[Run]:
        return [run for run in self.runs if run.ok]

    def median(self, attribute: str) -> float | None:
        values = [getattr(run, attribute) for run in self.good]
        return statistics.median(values) if values else None


def table(runs: list[Run], reference: str = "postbote") -> str:
    rows: dict[tuple[str, str], Row] = {}
    for run in runs:
        rows.setdefault((run.mode, run.tool), Row(run.mode, run.tool, run.messages, [])).runs.append(run)
    head = ["tool", "mode", "N", "wall s (median)", "msg/s", "CPU s", "peak RSS MB", "postbote ×", "runs", "check"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * 7 + "---|"]
    for row in rows.values():
        wall, cpu = row.median("wall"), row.median("cpu")
        ref = rows.get((row.mode, reference))
        ref_wall = ref.median("wall") if ref else None
        walls = [run.wall for run in row.good]
        spread = f" ({min(walls):.2f}–{max(walls):.2f})" if len(walls) > 1 else ""
        failed = [run for run in row.runs if not run.ok]
        status = f"FAILED {len(failed)}/{len(row.runs)}: {'; '.join(failed[0].problems)}" if failed else "ok"
        notes = sorted({note for run in row.good for note in run.notes})
        if notes:
            status += f" ({'; '.join(notes)})"
        cells = [row.tool, row.mode, f"{row.messages:,}",
                 "–" if wall is None else f"{wall:.2f}{spread}",
                 "–" if wall is None else f"{row.messages / wall:,.0f}",
                 "–" if cpu is None else f"{cpu:.2f}",
                 "–" if not row.good else f"{max(run.peak_rss_kb for run in row.good) / 1024:.1f}",
                 "–" if wall is None or ref_wall is None else f"{wall / ref_wall:.2f}",
                 f"{len(row.good)}/{len(row.runs)}", status]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goals(runs: list[Run], wanted: Sequence[tuple[str, str, float]]) -> list[str]:
    """``(mode, tool, factor)``: postbote's msg/s at least ``factor`` × the tool's in that mode."""
    def median_wall(mode: str, tool: str) -> float | None:
        walls = [run.wall for run in runs if run.mode == mode and run.tool == tool and run.ok]
        return statistics.median(walls) if walls else None

    lines = []
    for mode, tool, factor in wanted:
        ours, theirs = median_wall(mode, "postbote"), median_wall(mode, tool)
        if ours is None or theirs is None:
            continue
        ratio = theirs / ours
        verdict = "met" if ratio >= factor else "NOT met"
        lines.append(f"- {mode}: postbote ≥ {factor:g}× {tool}: {ratio:.2f}× — {verdict}")
    return lines


# --- the benchmark ----------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.log = lambda text: print(text, file=sys.stderr, flush=True)
        self.workdir = args.cache_dir / f"imap-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        self.server = IMAPBenchServer()
        self.relay: RelayProcess | None = None
        self.facts: dict[str, str] = {}
        self.runs: list[Run] = []

    def prepare(self) -> Runtime:
        self.args.cache_dir.mkdir(parents=True, exist_ok=True)
        self.args.cache_dir.chmod(0o755)
        user = environment.run_user(self.args.cache_dir)
        python = environment.postbote_venv(self.args.cache_dir, user, self.args.source, self.log)
        self.workdir.mkdir(parents=True)
        self.workdir.chmod(0o755)
        (self.workdir / "logs").mkdir()
        code = environment.snapshot_postbote(self.args.source, self.workdir / "postbote-code", user)
        self.runtime = Runtime(user=user, postbote_python=python, postbote_code=code)
        return self.runtime

    def start(self, relay_to: int | None) -> None:
        self.server.start()
        self.facts["IMAP round trip on loopback (median of 20 NOOP)"] = \
            f"{imap_probe(self.server.host, self.server.imap_port) * 1000:.2f} ms"
        if relay_to is not None:
            self.relay = RelayProcess(relay_to, self.args.rtt_ms / 2000)
            self.relay.start()
            self.facts["IMAP round trip through the relay (median of 20 NOOP)"] = \
                f"{imap_probe(self.server.host, self.relay.port) * 1000:.2f} ms"

    def stop(self, ok: bool) -> None:
        if self.relay is not None:
            self.relay.stop()
        self.server.stop()
        if ok and not self.args.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def seed(self, corpus: Corpus) -> None:
        self.server.clear_imap(SOURCE_USER)
        self.server.clear_imap(DEST_USER)
        self.server.seed(SOURCE_USER, corpus)
        self.server.warm_imap(SOURCE_USER, len(corpus))
        self.server.warm_imap(DEST_USER, 0)

    def one(self, mode: str, tool: Tool, repetition: int, corpus: Corpus, job_of: callable) -> Run:
        run = Run(mode, tool.name, repetition + 1, len(corpus), corpus.total_bytes)
        rundir = self.workdir / "runs" / f"{mode}-{tool.name.replace(' ', '_')}-{repetition + 1}"
        rundir.mkdir(parents=True)
        self.seed(corpus)
        job: Job = job_of(rundir)
        if job.maildir is not None:
            empty_maildir(job.maildir)
            for leftover in (".uidvalidity", ".mbsyncstate", ".mbsyncstate.lock"):
                (job.maildir / leftover).unlink(missing_ok=True)
            self.runtime.user.own(job.maildir)
        if isinstance(tool, Lockstep):
            shutil.copy(LOCKSTEP, rundir / LOCKSTEP.name)
        commands = tool.commands(job, self.runtime)
        self.runtime.user.own(rundir)
        run.wall, run.cpu, run.peak_rss_kb, codes, timed_out = run_timed(
            commands, user=self.runtime.user, env=tool.env(self.runtime), cwd=rundir,
            log=self.workdir / "logs" / f"{rundir.name}.log", timeout=self.args.timeout)
        if timed_out:
            run.problems.append(f"timed out after {self.args.timeout:.0f} s")
        if any(codes):
            run.problems.append(f"exit status {', '.join(str(c) for c in codes if c)}")
        self.check(run, job, corpus)
        status = "ok" if run.ok else "; ".join(run.problems)
        if run.notes:
            status += f" ({'; '.join(run.notes)})"
        self.log(f"  [{repetition + 1}/{self.args.repeat}] {mode:<14} {tool.name:<18} {run.wall:8.2f} s "
                 f"{run.messages / run.wall if run.wall else 0:8.0f} msg/s  CPU {run.cpu:6.2f} s "
                 f"{run.peak_rss_kb / 1024:6.1f} MB  {status}")
        if run.ok and not self.args.keep_workdir:
            shutil.rmtree(rundir, ignore_errors=True)
        elif job.maildir is not None:
            shutil.copytree(job.maildir, rundir / "Maildir-copy", dirs_exist_ok=True)
        return run

    def check(self, run: Run, job: Job, corpus: Corpus) -> None:
        if job.dest_port is None:  # fetch: the Maildir; the server keeps all (keep) or nothing (delete)
            assert job.maildir is not None
            files = maildir_files([job.maildir])
            left = self.server.imap_count(SOURCE_USER)
            expected_left = 0 if job.delete else len(corpus)
            if left != expected_left:
                run.problems.append(f"{left} left on the server, {expected_left} expected")
        else:  # append: what the destination user's INBOX holds (Dovecot's Maildir), the POP3 mailbox empty
            files = self.server.dovecot.message_files(DEST_USER)
            left = self.server.left([SOURCE_USER])
            if left:
                run.problems.append(f"{left} left on the POP3 server")
        for path in files:
            strip_added_fields(path)
        verdict = verify(corpus, files, crlf=True, left_on_server=0)
        run.problems.extend(verdict.problems)
        run.notes.extend(verdict.notes)


ADDED_FIELDS = re.compile(rb"^(?:X-TUID|X-getmail-retrieved-from-mailbox):[^\n]*\n", re.MULTILINE | re.IGNORECASE)


def strip_added_fields(path: Path) -> None:
    """Drop the header fields a peer appends at the end of the header, where bench.verify does not look for trace
    fields: mbsync's ``X-TUID:`` (its own tracking id) and getmail6's ``X-getmail-retrieved-from-mailbox:``."""
    data = path.read_bytes()
    head_end = data.find(b"\n\n")
    if head_end < 0:
        return
    head = ADDED_FIELDS.sub(b"", data[:head_end + 1])
    if len(head) != head_end + 1:
        path.write_bytes(head + data[head_end + 1:])


def header(bench: Bench, extra: list[str]) -> list[str]:
    import platform

    lines = [f"command: python bench/imap.py {shlex.join(sys.argv[1:])}",
             f"postbote source: {bench.args.source} ({environment.source_revision(bench.args.source)})",
             f"machine: {platform.node()}, {os.cpu_count()} CPUs, {platform.platform()}; "
             f"load average at the end {os.getloadavg()[0]:.2f}",
             f"tools run as: {bench.runtime.user.name}; repetitions: {bench.args.repeat} (tool order rotated)",
             *extra]
    lines += [f"{name}: {value}" for name, value in bench.facts.items()]
    return lines


def tool_versions(names: Sequence[str]) -> list[str]:
    probes = {"mbsync": ["mbsync", "--version"], "fetchmail": ["fetchmail", "-V"],
              "getmail6": ["getmail", "--version"], "dovecot": ["dovecot", "--version"]}
    found = []
    for name in ("dovecot", *names):
        argv = probes.get(name)
        binary = find_binary(argv[0]) if argv else None
        if not argv or binary is None:
            continue
        done = subprocess.run([binary, *argv[1:]], capture_output=True, text=True, timeout=20)
        text = (done.stdout or done.stderr).strip().splitlines()
        line = next((t for t in text if "fetchmail" in t.lower()), text[0] if text else "?") \
            if name == "fetchmail" else (text[0] if text else "?")
        found.append(f"{name}: {line}")
    return found


def main_fetch(args: argparse.Namespace) -> int:
    tools = [{**FETCHERS, **VARIANTS}[name] for name in args.tools.split(",")]
    if args.after_fetch == "delete":
        tools = [tool for tool in tools if tool.deletes]
    absent = [f"{tool.name} ({tool.missing()})" for tool in tools if tool.missing()]
    if absent:
        raise SystemExit(f"cannot run: {', '.join(absent)}")
    nets = args.net.split(",")
    bench = Bench(args)
    runtime = bench.prepare()
    corpus = small_corpus(args.n, args.seed, tag="i")
    ok = False
    try:
        bench.start(relay_to=bench.server.imap_port if "rtt" in nets else None)
        for repetition in range(args.repeat):
            for net in nets:
                port = bench.relay.port if net == "rtt" and bench.relay else bench.server.imap_port
                mode = f"imap-{args.after_fetch}-{'loopback' if net == 'loopback' else f'{args.rtt_ms:g}ms'}"
                maildir = bench.workdir / "maildirs" / mode
                shift = repetition % len(tools)
                for tool in tools[shift:] + tools[:shift]:
                    def job_of(rundir: Path, port: int = port, maildir: Path = maildir) -> Job:
                        return Job(bench.server.host, port, maildir, rundir, delete=args.after_fetch == "delete")
                    bench.runs.append(bench.one(mode, tool, repetition, corpus, job_of))
        ok = all(run.ok for run in bench.runs)
    finally:
        bench.stop(ok)
    del runtime
    print("\n".join(header(bench, tool_versions([t.name for t in tools]) +
                           [f"corpus: {len(corpus):,} small messages, {corpus.total_bytes / 1e6:.2f} MB "
                            f"(median {statistics.median(len(m.data) for m in corpus.messages) / 1000:.1f} kB)",
                            f"after fetch: {args.after_fetch}"])))
    print()
    print(table(bench.runs))
    wanted = []
    for mode in sorted({run.mode for run in bench.runs}):
        if mode.endswith("loopback"):
            wanted.append((mode, "mbsync", 1.0))
        else:
            wanted += [(mode, "mbsync", 1.5), (mode, "fetchmail", 10.0), (mode, "getmail6", 10.0)]
    print("\nGoals (issue 13), from this run:")
    print("\n".join(goals(bench.runs, wanted)) or "(none measurable)")
    if not ok:
        print(f"\nlogs and leftovers: {bench.workdir}")
    if args.json:
        args.json.write_text(json.dumps([vars(run) for run in bench.runs], indent=2) + "\n")
    return 0 if ok else 1


def main_append(args: argparse.Namespace) -> int:
    tools: list[Tool] = [Postbote(), Lockstep(), Lockstep(nodelay=True)]
    bench = Bench(args)
    bench.prepare()
    corpus = small_corpus(args.n, args.seed, tag="a")
    ok = False
    try:
        bench.start(relay_to=bench.server.imap_port)
        assert bench.relay is not None
        mode = f"pop3-append-{args.rtt_ms:g}ms"
        for repetition in range(args.repeat):
            shift = repetition % len(tools)
            for tool in tools[shift:] + tools[:shift]:
                def job_of(rundir: Path) -> Job:
                    assert bench.relay is not None
                    return Job(bench.server.host, bench.server.port, None, rundir, dest_port=bench.relay.port)
                bench.runs.append(bench.one(mode, tool, repetition, corpus, job_of))
        ok = all(run.ok for run in bench.runs)
    finally:
        bench.stop(ok)
    print("\n".join(header(bench, tool_versions([]) +
                           [f"corpus: {len(corpus):,} small messages, {corpus.total_bytes / 1e6:.2f} MB",
                            "source: POP3 on loopback; destination: IMAP APPEND into another user's INBOX "
                            "through the relay"])))
    print()
    print(table(bench.runs))
    print("\nGoals (issue 13), from this run:")
    print("\n".join(goals(bench.runs, [(mode, tool.name, 10.0) for tool in tools[1:]])) or "(none measurable)")
    if not ok:
        print(f"\nlogs and leftovers: {bench.workdir}")
    if args.json:
        args.json.write_text(json.dumps([vars(run) for run in bench.runs], indent=2) + "\n")
    return 0 if ok else 1


POLL_DRIVER = """
import sys, time
from pathlib import Path
from postbote.config import load_config
from postbote.logconfig import configure_logging
from postbote.pluginmanager import make_plugin_manager
from postbote.poller import Poller
from postbote.state import StateStore
configure_logging("warning", "json")
pm = make_plugin_manager(entry_points=False)
config = load_config(Path(sys.argv[1]), pm)
poller = Poller(pm, StateStore(config.state_dir))
import gc
gc.freeze()
cpu, wall = time.process_time(), time.perf_counter()
delivered = sum(poller.poll(account).delivered for account in config.accounts)
print("POLL", time.process_time() - cpu, time.perf_counter() - wall, delivered)
"""


def main_profile(args: argparse.Namespace) -> int:
    """postbote alone: ``--repeat`` polls timed inside the process (CPU and wall of ``Poller.poll``, no start-up), then
    one poll under py-spy (``--cpu``: on-CPU samples only) summarised by function."""
    from bench.profile import py_spy, summarise

    net = args.net.split(",")[0]
    bench = Bench(args)
    runtime = bench.prepare()
    corpus = small_corpus(args.n, args.seed, tag="i")
    delete = args.after_fetch == "delete"
    try:
        bench.start(relay_to=bench.server.imap_port if net == "rtt" else None)
        port = bench.relay.port if net == "rtt" and bench.relay else bench.server.imap_port
        maildir = bench.workdir / "maildirs" / "profile"
        rundir = bench.workdir / "profile"
        rundir.mkdir()
        job = Job(bench.server.host, port, maildir, rundir, delete=delete)
        (command,) = Postbote().commands(job, runtime)
        driver = rundir / "driver.py"
        driver.write_text(POLL_DRIVER)
        env = Postbote().env(runtime)

        def fresh() -> None:
            bench.seed(corpus)
            empty_maildir(maildir)
            shutil.rmtree(rundir / "state", ignore_errors=True)
            runtime.user.own(bench.workdir / "maildirs")
            runtime.user.own(rundir)

        figures = []
        for repetition in range(args.repeat):
            fresh()
            done = subprocess.run([command[0], str(driver), command[command.index("-c") + 1]], env=env, cwd=rundir,
                                  capture_output=True, text=True, **runtime.user.popen_args())
            line = next((x for x in done.stdout.splitlines() if x.startswith("POLL ")), None)
            if done.returncode or line is None:
                raise SystemExit(f"the driver failed:\n{done.stderr[-3000:]}")
            cpu, wall, delivered = line.split()[1:]
            figures.append((float(cpu), float(wall)))
            print(f"poll {repetition + 1}: {delivered} delivered, Poller.poll CPU {float(cpu):.3f} s, "
                  f"wall {float(wall):.3f} s", file=sys.stderr, flush=True)
        cpu = statistics.median(f[0] for f in figures)
        wall = statistics.median(f[1] for f in figures)
        fresh()
        folded = rundir / "profile.folded"
        subprocess.run([str(py_spy(args.cache_dir)), "record", "--format", "raw", "--nolineno",
                        *([] if args.cpu else ["--idle"]), "--rate", "400", "--output", str(folded), "--", *command],
                       env=env, cwd=rundir, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       **runtime.user.popen_args())
        summary = summarise(folded, args.top, args.focus)
    finally:
        bench.stop(True)
    print("\n".join(header(bench, [f"after fetch: {args.after_fetch}; net: {net}"])))
    print(f"\nPoller.poll of {args.n:,} messages, median of {args.repeat} (in process, no start-up): CPU {cpu:.3f} s "
          f"({cpu * 1e6 / args.n:.0f} µs per message), wall {wall:.3f} s ({args.n / wall:,.0f} msg/s)\n")
    print(summary)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/imap.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("fetch", "append", "profile"))
    parser.add_argument("--net", default="loopback,rtt", help="fetch: loopback, rtt or both (default both)")
    parser.add_argument("--tools", default=",".join(FETCHERS),
                        help="fetch: comma-separated (default: all four; also mbsync-nofsync)")
    parser.add_argument("--after-fetch", choices=("keep", "delete"), default="keep")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rtt-ms", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--quick", action="store_true", help="50 messages, one repetition")
    parser.add_argument("--cpu", action="store_true", help="profile: on-CPU samples only (py-spy without --idle)")
    parser.add_argument("--top", type=int, default=25, help="profile: functions listed")
    parser.add_argument("--focus", default="Poller.poll", help="profile: only stacks through this function")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--source", type=Path, default=environment.REPO)
    parser.add_argument("--cache-dir", type=Path, default=environment.DEFAULT_CACHE)
    parser.add_argument("--keep-workdir", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.repeat = 50, 1
    return {"fetch": main_fetch, "append": main_append, "profile": main_profile}[args.what](args)


if __name__ == "__main__":
    sys.exit(main())
