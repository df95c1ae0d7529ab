"""The benchmark proper: servers up once, then every (repetition × scenario × tool) run, interleaved.

Per run: empty and re-seed the mailbox, let Dovecot index it, give the tool a fresh state directory and an
empty destination, run it (wall time and peak RSS measured), verify, clean up. Tools take turns: the order
is rotated every repetition, so slow drifts of a shared machine spread over all of them.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from bench import corpus as corpora
from bench.corpus import Corpus
from bench.environment import RunUser
from bench.mailserver import PASSWORD, BenchMailServer, account_user
from bench.measure import run_measured
from bench.relay import RelayProcess, probe
from bench.report import RunRecord
from bench.sinks import SinkProcess, selftest
from bench.tools import TOOLS, Job, Mailbox, Runtime, Target, Tool
from bench.verify import maildir_files, verify

MODES = ("maildir", "mixed", "smtp-prompt", "smtp-delayed-ack", "latency", "big", "many-accounts")
PEERS = ("fetchmail", "mpop", "getmail6")


@dataclass(frozen=True)
class Contender:
    """A tool as one row of the table (postbote appears twice in the many-accounts mode)."""

    tool: Tool
    one_by_one: bool = False  # `postbote poll ACCOUNT`, one process per account, in turn
    max_parallel: int | None = None  # overrides the scenario's

    def label(self, target: Target) -> str:
        if self.one_by_one:
            return f"{self.tool.label(target)} sequential"
        if self.max_parallel is not None:
            return f"{self.tool.label(target)} max_parallel={self.max_parallel}"
        return self.tool.label(target)


@dataclass(frozen=True)
class Scenario:
    mode: str
    target_kind: Literal["maildir", "smtp"]
    corpora: Callable[[], list[Corpus]]  # one corpus per mailbox
    contenders: tuple[Contender, ...]
    sink: str | None = None  # "prompt" | "delayed-ack"
    via_relay: bool = False
    max_parallel: int | None = None


@dataclass
class Settings:
    modes: list[str]
    tools: list[str]
    n: int
    delayed_ack_n: int
    latency_n: int
    mixed_n: int
    big_mb: int
    accounts: int
    per_account: int
    repeat: int
    rtt_ms: float
    seed: int
    timeout: float
    max_parallel: int | None
    workdir: Path
    keep_workdir: bool = False
    chunking: bool = True  # the SMTP sinks offer CHUNKING, as Postfix does
    log: Callable[[str], None] = field(default=lambda text: print(text, file=sys.stderr, flush=True))


def build_scenarios(settings: Settings) -> list[Scenario]:
    """The scenarios of the selected modes, each with the selected tools that apply to it."""
    wanted = [TOOLS[name] for name in settings.tools if name in TOOLS]
    peers = tuple(Contender(tool) for tool in wanted)
    cache: dict[str, list[Corpus]] = {}

    def once(key: str, make: Callable[[], list[Corpus]]) -> Callable[[], list[Corpus]]:
        def get() -> list[Corpus]:
            if key not in cache:
                cache[key] = make()
            return cache[key]
        return get

    small = once("small", lambda: [corpora.small_corpus(settings.n, settings.seed)])
    delayed_small = once("delayed", lambda: [corpora.small_corpus(settings.delayed_ack_n, settings.seed, tag="d")])
    latency_small = once("latency", lambda: [corpora.small_corpus(settings.latency_n, settings.seed, tag="l")])
    scenarios: list[Scenario] = []
    for mode in settings.modes:
        if mode == "maildir":
            scenarios.append(Scenario("maildir", "maildir", small, peers))
        elif mode == "mixed":
            scenarios.append(Scenario("mixed", "maildir",
                                      once("mixed", lambda: [corpora.mixed_corpus(settings.mixed_n, settings.seed)]),
                                      peers))
        elif mode == "smtp-prompt":
            scenarios.append(Scenario(mode, "smtp", small, peers, sink="prompt"))
        elif mode == "smtp-delayed-ack":
            scenarios.append(Scenario(mode, "smtp", delayed_small, peers, sink="delayed-ack"))
        elif mode == "latency":
            scenarios.append(Scenario("latency-maildir", "maildir", latency_small, peers, via_relay=True))
            scenarios.append(Scenario("latency-smtp", "smtp", latency_small, peers, sink="prompt", via_relay=True))
        elif mode == "big":
            scenarios.append(Scenario("big", "maildir",
                                      once("big", lambda: [corpora.big_corpus(settings.big_mb << 20, settings.seed)]),
                                      peers))
        elif mode == "many-accounts":
            if "postbote" not in settings.tools:
                continue
            many = once("many", lambda: [corpora.small_corpus(settings.per_account, settings.seed, tag=account_user(i))
                                         for i in range(1, settings.accounts + 1)])
            scenarios.append(Scenario("many-accounts", "maildir", many,
                                      (Contender(TOOLS["postbote"]), Contender(TOOLS["postbote"], one_by_one=True),
                                       Contender(TOOLS["postbote"], max_parallel=1)),
                                      via_relay=True, max_parallel=settings.max_parallel))
        else:
            raise ValueError(f"unknown mode {mode!r}")
    return scenarios


def spool_directory(workdir: Path, kind: str) -> Path:
    """Where a sink keeps what it accepts for the verification: on tmpfs where there is one, so that the sink's
    own file creation (hundreds of microseconds per file on a busy ext4) is not what the SMTP modes measure."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix=f"postbote-bench-spool-{kind}-", dir=shm))
    return workdir / f"spool-{kind}"


class Bench:
    def __init__(self, settings: Settings, runtime: Runtime) -> None:
        self.settings = settings
        self.runtime = runtime
        self.user: RunUser = runtime.user
        self.log = settings.log
        self.scenarios = build_scenarios(settings)
        many = any(s.mode == "many-accounts" for s in self.scenarios)
        self.server = BenchMailServer(extra_users=settings.accounts if many else 0)
        self.sinks: dict[str, SinkProcess] = {}
        self.relay: RelayProcess | None = None
        self.records: list[RunRecord] = []
        self.facts: dict[str, str] = {}
        self.logs = settings.workdir / "logs"

    # -- infrastructure -----------------------------------------------------------

    def start(self) -> None:
        self.settings.workdir.mkdir(parents=True, exist_ok=True)
        self.settings.workdir.chmod(0o755)
        self.logs.mkdir(exist_ok=True)
        self.server.start()
        for kind in sorted({s.sink for s in self.scenarios if s.sink}):
            sink = SinkProcess(kind, spool_directory(self.settings.workdir, kind), chunking=self.settings.chunking)
            sink.start()
            self.sinks[kind] = sink
        for kind in self.sinks:
            self.facts[f"{kind} sink alone, lock-step client"] = f"{selftest(kind, 2000):,.0f} msg/s"
        if self.sinks:
            self.facts["SMTP sinks offer CHUNKING (BDAT)"] = "yes, as Postfix does" if self.settings.chunking else "no"
            spools = {str(sink.spool.parent) for sink in self.sinks.values() if sink.spool}
            self.facts["SMTP sinks keep messages in"] = ", ".join(sorted(spools))
        if any(s.via_relay for s in self.scenarios):
            self.relay = RelayProcess(self.server.port, self.settings.rtt_ms / 2000)
            self.relay.start()
            rtt = probe(self.server.host, self.relay.port) * 1000
            self.facts["POP3 round trip through the relay (median of 20 CAPA)"] = f"{rtt:.2f} ms"
        self.facts["POP3 round trip on loopback"] = f"{probe(self.server.host, self.server.port) * 1000:.2f} ms"

    def stop(self) -> None:
        for sink in self.sinks.values():
            sink.stop()
        if self.relay is not None:
            self.relay.stop()
        self.server.stop()
        if self.settings.keep_workdir:
            return
        for sink in self.sinks.values():
            if sink.spool is not None:
                shutil.rmtree(sink.spool, ignore_errors=True)
        if self.records and all(record.ok or record.skipped for record in self.records):
            shutil.rmtree(self.settings.workdir, ignore_errors=True)
        else:
            shutil.rmtree(self.settings.workdir / "postbote-code", ignore_errors=True)

    # -- the runs -------------------------------------------------------------------

    def run_all(self) -> list[RunRecord]:
        for scenario in self.scenarios:
            described = "; ".join(corpora.describe(c) for c in scenario.corpora()[:3])
            more = f" (+{len(scenario.corpora()) - 3} more)" if len(scenario.corpora()) > 3 else ""
            self.facts[f"corpus for {scenario.mode}"] = described + more
        for repetition in range(self.settings.repeat):
            for scenario in self.scenarios:
                contenders = scenario.contenders
                shift = repetition % max(1, len(contenders))
                for contender in contenders[shift:] + contenders[:shift]:
                    self.records.append(self.run_one(scenario, contender, repetition))
        return self.records

    def run_one(self, scenario: Scenario, contender: Contender, repetition: int) -> RunRecord:
        mailbox_corpora = scenario.corpora()
        target_stub = Target(scenario.target_kind)
        label = contender.label(target_stub)
        record = RunRecord(scenario.mode, label, repetition + 1, sum(len(c) for c in mailbox_corpora),
                           sum(c.total_bytes for c in mailbox_corpora))
        reason = contender.tool.missing(target_stub)
        if reason:
            record.skipped = reason
            return record
        rundir = self.settings.workdir / "runs" / f"{scenario.mode}-{label.replace(' ', '_')}-{repetition + 1}"
        shutil.rmtree(rundir, ignore_errors=True)
        rundir.mkdir(parents=True)
        users = self._users(scenario)
        self._seed(users, mailbox_corpora)
        target = self._prepare_target(scenario, rundir)
        max_parallel = contender.max_parallel if contender.max_parallel is not None else scenario.max_parallel
        job = Job(self._mailboxes(scenario, users), target, rundir, contender.one_by_one, max_parallel)
        commands = contender.tool.commands(job, self.runtime)
        self.user.own(rundir)
        measured = run_measured(commands, user=self.user, env=contender.tool.env(self.runtime), cwd=rundir,
                                log=self.logs / f"{rundir.name}.log", timeout=self.settings.timeout)
        record.wall, record.peak_rss_kb = measured.wall, measured.peak_rss_kb
        record.exit_codes, record.timed_out = measured.exit_codes, measured.timed_out
        self._check(record, scenario, target, users, mailbox_corpora)
        self._report(record)
        self._clean(rundir, scenario, keep=not record.ok)
        return record

    def _users(self, scenario: Scenario) -> list[str]:
        count = len(scenario.corpora())
        return ["u1"] if count == 1 else [account_user(i) for i in range(1, count + 1)]

    def _mailboxes(self, scenario: Scenario, users: list[str]) -> tuple[Mailbox, ...]:
        port = self.relay.port if scenario.via_relay and self.relay else self.server.port
        return tuple(Mailbox(user, user, PASSWORD, self.server.host, port) for user in users)

    def _seed(self, users: list[str], mailbox_corpora: list[Corpus]) -> None:
        self.server.clear(users)
        for user, corpus in zip(users, mailbox_corpora, strict=True):
            self.server.seed(user, corpus)
            self.server.warm(user, len(corpus))

    def _prepare_target(self, scenario: Scenario, rundir: Path) -> Target:
        if scenario.target_kind == "maildir":
            maildir = self._maildir(scenario)
            empty_maildir(maildir)
            self.user.own(maildir)
            return Target("maildir", maildir=maildir)
        assert scenario.sink is not None
        sink = self.sinks[scenario.sink]
        sink.clear()
        return Target("smtp", smtp_port=sink.port)

    def _maildir(self, scenario: Scenario) -> Path:
        return self.settings.workdir / "maildirs" / scenario.mode

    def _check(self, record: RunRecord, scenario: Scenario, target: Target, users: list[str],
               mailbox_corpora: list[Corpus]) -> None:
        if record.timed_out:
            record.problems.append(f"timed out after {self.settings.timeout:.0f} s")
        bad_exits = sorted({code for code in record.exit_codes if code != 0})
        if bad_exits:
            record.problems.append(f"exit status {', '.join(map(str, bad_exits))}")
        files = maildir_files([target.maildir]) if target.maildir else self.sinks[scenario.sink or ""].stored()
        merged = Corpus("all", tuple(m for c in mailbox_corpora for m in c.messages))
        verdict = verify(merged, files, crlf=target.kind == "smtp", left_on_server=self.server.left(users))
        record.problems.extend(verdict.problems)
        record.notes.extend(verdict.notes)

    def _report(self, record: RunRecord) -> None:
        rate = record.messages / record.wall if record.wall else 0.0
        status = "ok" if record.ok else "; ".join(record.problems)
        if record.notes:
            status += f" ({'; '.join(record.notes)})"
        self.log(f"  [{record.repetition}/{self.settings.repeat}] {record.mode:<17} {record.tool:<20} "
                 f"{record.wall:8.2f} s {rate:9.1f} msg/s {record.peak_rss_kb / 1024:7.1f} MB  {status}")

    def _clean(self, rundir: Path, scenario: Scenario, *, keep: bool) -> None:
        """Remove the run's destination and state; a failed run's stay for inspection (with the SMTP spool)."""
        if scenario.sink:
            sink = self.sinks[scenario.sink]
            if keep:
                (rundir / "spool").mkdir(exist_ok=True)
                for path in sink.stored():
                    shutil.move(path, rundir / "spool" / path.name)
            sink.clear()
        if keep and scenario.target_kind == "maildir":
            shutil.copytree(self._maildir(scenario), rundir / "Maildir")
        if not (keep or self.settings.keep_workdir):
            shutil.rmtree(rundir, ignore_errors=True)


def empty_maildir(maildir: Path) -> None:
    """A Maildir with nothing in it, made once per mode and emptied before each run, never made anew.

    Every tool and repetition of a mode writes into the same directories: where ext4 places a new directory decides
    what creating a file in it costs (on one VM, from 35 to 370 µs, the same in a directory for as long as it lives),
    and that is not what the benchmark measures."""
    for sub in ("tmp", "new", "cur"):
        directory = maildir / sub
        directory.mkdir(parents=True, exist_ok=True)
        for entry in os.scandir(directory):
            os.unlink(entry.path)


def timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")
