"""POP3 faults: whatever the server does wrong, every message ends up still on the server, delivered exactly once,
or recorded as rejected with the reason -- never lost.

The first part of this module is the harness the fault suites share (``test_faults_*``, ``test_bad_input``,
``test_security`` and ``test_kill`` import it): a corpus of numbered messages, a `Rig` that polls one account in
process against a scripted `POP3Server` and a real destination, an `Audit` of what became of every corpus message,
a subprocess runner that measures peak memory, and a per-test time limit so that no test can hang.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest
import yaml
from postbote.config import load_config
from postbote.errors import StateError
from postbote.pluginmanager import make_plugin_manager
from postbote.poller import Poller, PollStats
from postbote.state import REJECTED, Record, StateStore
from postbote.testing.pop3server import Action, Faults, POP3Server

from tests.servers import interrupt_after
from tests.servers.faulty_smtp import FaultySMTP
from tests.servers.smtp_sink import SMTPSink

REPO_ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "demo"
TIME_LIMIT = 60.0

# ================================================================== harness shared by the fault suites

# --- no test may hang ---------------------------------------------------------------------------------


def limited_time(request: pytest.FixtureRequest) -> Iterator[None]:
    """Interrupt the test after ``TIME_LIMIT`` seconds (a module may set its own): a hang fails, never blocks CI."""
    with interrupt_after(float(getattr(request.module, "TIME_LIMIT", TIME_LIMIT)), request.node.name):
        yield


# --- the corpus ---------------------------------------------------------------------------------------

_CORPUS_ID = re.compile(rb"^Message-ID: <corpus-(\d+)@postbote\.test>", re.MULTILINE)


def corpus_message(number: int, *, body_lines: int = 3) -> bytes:
    """A small message that says which corpus message it is, wherever it ends up (CRLF, as POP3 sends it)."""
    head = (f"From: Sender {number} <sender{number}@example.net>\r\nTo: me@example.org\r\n"
            f"Subject: corpus message {number}\r\nMessage-ID: <corpus-{number}@postbote.test>\r\n\r\n")
    return head.encode() + b"".join(f"line {i} of message {number}\r\n".encode() for i in range(body_lines))


def corpus(count: int, *, body_lines: int = 3) -> list[bytes]:
    return [corpus_message(number, body_lines=body_lines) for number in range(1, count + 1)]


def corpus_number(data: bytes) -> int | None:
    """Which corpus message ``data`` is (with any line endings), or None."""
    match = _CORPUS_ID.search(data)
    return int(match.group(1)) if match else None


# --- destinations -------------------------------------------------------------------------------------


class Target(Protocol):
    """Where a rig delivers: the ``deliver:`` entry for the config, and what has arrived there so far."""

    def deliver(self) -> dict[str, Any]: ...

    def delivered(self) -> list[bytes]: ...


class MaildirTarget:
    def __init__(self, path: Path) -> None:
        self.path = path

    def deliver(self) -> dict[str, Any]:
        return {"maildir": str(self.path)}

    def delivered(self) -> list[bytes]:
        return [file.read_bytes() for file in self.files("new") + self.files("cur")]

    def files(self, sub: str) -> list[Path]:
        folder = self.path / sub
        return sorted(folder.iterdir()) if folder.is_dir() else []


class SinkTarget:
    """The aiosmtpd sink (a real SMTP implementation) of ``tests/servers/smtp_sink.py``."""

    def __init__(self, sink: SMTPSink, recipients: tuple[str, ...] = ("me@example.org",)) -> None:
        self.sink = sink
        self.recipients = recipients

    def deliver(self) -> dict[str, Any]:
        return {"smtp": {"host": self.sink.host, "port": self.sink.port, "recipients": list(self.recipients),
                         "timeout": "3s"}}

    def delivered(self) -> list[bytes]:
        return [message.data for message in self.sink.messages]


class FaultyTarget:
    """The scriptable SMTP/LMTP server of ``tests/servers/faulty_smtp.py``."""

    def __init__(self, server: FaultySMTP, recipients: tuple[str, ...] = ("me@example.org",),
                 timeout: str = "1s") -> None:
        self.server = server
        self.recipients = recipients
        self.timeout = timeout

    def deliver(self) -> dict[str, Any]:
        kind = "lmtp" if self.server.lmtp else "smtp"
        return {kind: {"host": self.server.host, "port": self.server.port, "recipients": list(self.recipients),
                       "timeout": self.timeout}}

    def delivered(self) -> list[bytes]:
        """A message counts as often as the recipient who got it most often got it (LMTP answers per recipient:
        a copy for alice now and one for bob on the retry is one delivery, not a duplicate)."""
        most: dict[int | None, list[bytes]] = {}
        for recipient in self.recipients:
            copies: dict[int | None, list[bytes]] = {}
            for data in self.server.copies_for(recipient):
                copies.setdefault(corpus_number(data), []).append(data)
            for number, datas in copies.items():
                if len(datas) > len(most.get(number, [])):
                    most[number] = datas
        return [data for datas in most.values() for data in datas]


# --- what became of every message -------------------------------------------------------------------------


@dataclass(frozen=True)
class Audit:
    """The fate of each corpus message, by number: on the server, how many copies arrived, rejected (why)."""

    numbers: tuple[int, ...]
    on_server: tuple[int, ...]
    copies: Counter[int]
    rejected: dict[int, str]

    @property
    def lost(self) -> list[int]:
        """Neither on the server nor delivered: the one outcome that must never happen."""
        return [n for n in self.numbers if n not in self.on_server and self.copies[n] == 0]

    @property
    def delivered_once(self) -> list[int]:
        return [n for n in self.numbers if self.copies[n] == 1]

    @property
    def undelivered(self) -> list[int]:
        return [n for n in self.numbers if self.copies[n] == 0]

    @property
    def duplicates(self) -> int:
        return sum(max(0, self.copies[n] - 1) for n in self.numbers)

    @property
    def everything_delivered_once_and_deleted(self) -> bool:
        return not self.on_server and self.delivered_once == list(self.numbers)


# --- one account under test ------------------------------------------------------------------------------


class Rig:
    """One account, ``test``: a scripted POP3 server in front, a destination behind, its own state directory.

    `poll` runs a poll in this process the way ``postbote poll`` does; `configure` writes the YAML a user would.
    """

    def __init__(self, directory: Path, server: POP3Server, target: Target) -> None:
        self.directory = directory
        self.server = server
        self.target = target
        self.state_dir = directory / "state"
        self.config_path = directory / "postbote.yaml"
        self.uid_of = {n: uid for uid, data in server.messages() if (n := corpus_number(data)) is not None}
        self.numbers = tuple(sorted(self.uid_of))
        self.other_faults = 0
        self.last_audit: Audit | None = None
        directory.mkdir(parents=True, exist_ok=True)

    def configure(self, top: dict[str, Any] | None = None, **account: Any) -> Path:
        entry: dict[str, Any] = {"name": "test", "host": "127.0.0.1", "port": self.server.port, "tls": "none",
                                 "username": "demo", "password": PASSWORD, "timeout": "2s",
                                 "deliver": self.target.deliver()}
        entry.update(account)
        entry = {key: value for key, value in entry.items() if value is not None}  # None: leave the key out
        document = {"state_dir": str(self.state_dir), "log": {"level": "debug", "format": "json"},
                    **(top or {}), "accounts": [entry]}
        self.config_path.write_text(yaml.safe_dump(document, sort_keys=False))
        self.config_path.chmod(0o600)
        return self.config_path

    def poll(self, top: dict[str, Any] | None = None, **account: Any) -> PollStats:
        pm = make_plugin_manager(entry_points=False)
        config = load_config(self.configure(top, **account), pm)
        store = StateStore(config.state_dir, busy_timeout=config.state_busy_timeout)
        try:
            return Poller(pm, store).poll(config.accounts[0])
        finally:
            store.close()

    def poll_until_done(self, *, polls: int = 6, pause: float = 0.3, **account: Any) -> list[PollStats]:
        """Poll until a poll succeeds with nothing left to fetch (a stalled server session may still hold the
        mailbox for a moment after a timeout, so a failed poll is tried again after ``pause``)."""
        results = []
        for _ in range(polls):
            stats = self.poll(**account)
            results.append(stats)
            if stats.ok and stats.deferred == 0 and stats.delivered == 0 and stats.listed == stats.deleted:
                break
            if not stats.ok:
                time.sleep(pause)
        return results

    def records(self) -> dict[str, Record]:
        """The state's records, or none when there is no readable state (tests that break it on purpose)."""
        try:
            store = StateStore(self.state_dir, readonly=True)
        except StateError:
            return {}
        try:
            return store.records("test")
        except StateError:
            return {}
        finally:
            store.close()

    def audit(self) -> Audit:
        on_server = tuple(sorted(n for _, data in self.server.messages() if (n := corpus_number(data)) is not None))
        copies = Counter(n for data in self.target.delivered() if (n := corpus_number(data)) is not None)
        number_of = {uid: n for n, uid in self.uid_of.items()}
        rejected = {number_of[uid]: record.reason for uid, record in self.records().items()
                    if record.status == REJECTED and uid in number_of}
        self.last_audit = Audit(self.numbers, on_server, copies, rejected)
        assert self.last_audit.lost == [], f"messages lost: {self.last_audit.lost}"
        return self.last_audit

    def faults_injected(self) -> int:
        faults = self.server.faults
        fired = len(faults.fired) if faults is not None else 0
        target_server = getattr(self.target, "server", None)
        if isinstance(target_server, FaultySMTP):
            fired += len(target_server.fired)
        return fired + self.other_faults


RigFactory = Callable[..., Rig]


def rig_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RigFactory]:
    """``make_rig(messages, faults=None, target=None, **server_options)``: a started server and its rig; the
    servers are stopped and the test's figures recorded afterwards (``yield from rig_factory(tmp_path, request)``
    in a fixture)."""
    rigs: list[Rig] = []

    def make(messages: list[bytes], faults: Faults | None = None, target: Target | None = None,
             **server_options: Any) -> Rig:
        server = POP3Server(messages, faults=faults, **server_options).start()
        rig = Rig(tmp_path / f"rig{len(rigs)}", server, target or MaildirTarget(tmp_path / f"Maildir{len(rigs)}"))
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.server.stop()
    record_figures(request.node.nodeid, rigs)


def record_figures(test: str, rigs: list[Rig], **extra: int) -> None:
    """With ``POSTBOTE_FIGURES=FILE``, append this test's figures as a JSON line (docs/reliability.md sums them)."""
    target = os.environ.get("POSTBOTE_FIGURES")
    if not target:
        return
    audits = [rig.last_audit for rig in rigs if rig.last_audit is not None]
    figures = {"test": test, "faults": sum(rig.faults_injected() for rig in rigs),
               "messages": sum(len(a.numbers) for a in audits), "lost": sum(len(a.lost) for a in audits),
               "duplicates": sum(a.duplicates for a in audits), **extra}
    with open(target, "a", encoding="utf-8") as out:
        out.write(json.dumps(figures) + "\n")


# --- postbote as a separate process -------------------------------------------------------------------------


@dataclass
class Run:
    """A finished ``python -m postbote`` process: exit status, stdout and stderr together, peak RSS in bytes."""

    status: int
    output: str
    peak_rss: int
    duration: float
    pid: int = 0
    lines: list[str] = field(default_factory=list)

    @property
    def peak_rss_mb(self) -> float:
        return self.peak_rss / (1 << 20)


def postbote_argv(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "postbote", "-c", str(config), *args]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


# Measuring a child's peak RSS with wait4 needs care: ru_maxrss also counts the memory the child shared with its
# parent between fork and exec (the kernel records the old address space's high-water mark at exec), and this
# test process may hold 100 MB of test messages. So a small launcher process, started fresh, forks and execs
# postbote and reports the pid, exit status and ru_maxrss of that grandchild, whose fork copied only the launcher.
_LAUNCHER = """
import os, resource, sys
report, limit, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
pid = os.fork()
if pid == 0:
    if limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    os.execv(argv[0], argv)
with open(report, "w") as out:
    out.write(f"{pid}\\n")
_, status, usage = os.wait4(pid, 0)
with open(report, "a") as out:
    out.write(f"{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss}\\n")
"""


def run_postbote(config: Path, *args: str, timeout: float = 60.0, address_space: int | None = None,
                 env: dict[str, str] | None = None, while_running: Callable[[int], None] | None = None) -> Run:
    """Run ``postbote -c CONFIG ARGS`` as a separate process; its exit status, all its output, its peak RSS.

    ``address_space`` caps its virtual memory (RLIMIT_AS): a runaway allocation then fails inside postbote instead
    of taking the machine down. ``while_running(pid)`` is called once while it runs (e.g. to read /proc/PID). It is
    killed, and the test fails, if it runs past ``timeout``.
    """
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report"
        output_path = Path(scratch) / "output"
        argv = [sys.executable, "-c", _LAUNCHER, str(report), str(address_space or 0), *postbote_argv(config, *args)]
        started = time.monotonic()
        with open(output_path, "wb") as output:
            launcher = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                                        env=env or child_env(), cwd=config.parent, start_new_session=True)
        try:
            while launcher.poll() is None:
                lines = report.read_text().split() if report.exists() else []
                if while_running is not None and lines:
                    while_running(int(lines[0]))
                    while_running = None
                if time.monotonic() - started > timeout:
                    os.killpg(launcher.pid, signal.SIGKILL)
                    pytest.fail(f"postbote {' '.join(args)} ran past {timeout} s:\n{output_path.read_text()}")
                time.sleep(0.005)
        finally:
            if launcher.poll() is None:
                os.killpg(launcher.pid, signal.SIGKILL)
                launcher.wait()
        pid, status, max_rss = (int(word) for word in report.read_text().split())
        text = output_path.read_bytes().decode("utf-8", "replace")
    return Run(status, text, max_rss * 1024, time.monotonic() - started, pid, text.splitlines())


# ================================================================== the POP3 faults


@pytest.fixture(autouse=True)
def time_limit(request: pytest.FixtureRequest) -> Iterator[None]:
    yield from limited_time(request)


@pytest.fixture
def make_rig(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RigFactory]:
    yield from rig_factory(tmp_path, request)


# Each fault fires once (``times=1``); the polls after it meet a well-behaved server. What a user checks after
# the first, faulty poll: nothing was deleted that was not delivered; after the later polls: every message was
# delivered exactly once and the mailbox is empty.

BROKEN_AT: dict[str, tuple[str, Action]] = {
    "greeting never sent": ("GREETING", Action.drop()),
    "dropped at CAPA": ("CAPA", Action.drop()),
    "dropped at USER": ("USER", Action.drop()),
    "dropped at PASS": ("PASS", Action.drop()),
    "dropped at UIDL": ("UIDL", Action.drop()),
    "dropped midway through UIDL": ("UIDL", Action.drop_midway(after_bytes=30)),
    "dropped at LIST": ("LIST", Action.drop()),
    "dropped at the first RETR": ("RETR 1", Action.drop()),
    "dropped midway through RETR": ("RETR 2", Action.drop_midway(after_bytes=60)),
    "dropped after RETR's status line": ("RETR 3", Action.drop_midway(after_bytes=0)),
    "dropped at DELE": ("DELE 2", Action.drop()),
    "dropped after DELE's reply": ("DELE 1", Action.drop_after_reply()),
    "dropped before QUIT": ("QUIT", Action.drop()),
    "dropped after QUIT's +OK": ("QUIT", Action.drop_after_reply()),
    "QUIT applied but its reply lost": ("QUIT", Action.drop_midway(after_bytes=0)),
    "-ERR to RETR": ("RETR 2", Action.reply("-ERR [SYS/TEMP] cannot open message")),
    "-ERR to UIDL": ("UIDL", Action.reply("-ERR [SYS/TEMP] index busy")),
    "-ERR to LIST": ("LIST", Action.reply("-ERR [SYS/TEMP] index busy")),
    "-ERR to DELE": ("DELE 1", Action.reply("-ERR [SYS/TEMP] cannot delete now")),
    "-ERR to QUIT": ("QUIT", Action.reply("-ERR [SYS/TEMP] expunge failed")),
    "garbage greeting": ("GREETING", Action.reply("HTTP/1.1 400 Bad Request")),
    "garbage reply to PASS": ("PASS", Action.reply("\x00\x01\x02 nonsense")),
    "garbage reply to UIDL": ("UIDL", Action.reply("+OK\r\nthis is not a listing\r\n.")),
    "garbage reply to LIST": ("LIST", Action.reply("+OK\r\n1 many\r\n.")),
    "garbage reply to RETR": ("RETR 1", Action.reply("OK here it comes")),
    "garbage reply to DELE": ("DELE 2", Action.reply("what?")),
    "garbage reply to QUIT": ("QUIT", Action.reply("bye?")),
    "over-long greeting": ("GREETING", Action.reply(b"+OK " + b"x" * 100_000)),
    "over-long reply to UIDL": ("UIDL", Action.reply(b"+OK " + b"x" * 100_000)),
    "over-long reply to RETR": ("RETR 2", Action.reply(b"+OK " + b"x" * 100_000)),
    "over-long reply to DELE": ("DELE 1", Action.reply(b"-ERR " + b"x" * 100_000)),
    "over-long UIDL line": ("UIDL", Action.flood(b"1 " + b"u" * 20_000, count=1)),
}


@pytest.mark.parametrize("fault", BROKEN_AT.values(), ids=BROKEN_AT.keys())
def test_whatever_breaks_in_the_session_no_message_is_lost_and_each_arrives_once(
        make_rig: RigFactory, fault: tuple[str, Action]) -> None:
    command, action = fault
    faults = Faults().on(command, action=action)
    rig = make_rig(corpus(4), faults)

    rig.poll()
    after_fault = rig.audit()
    assert after_fault.duplicates == 0

    rig.poll_until_done()
    assert faults.fired, "the fault never fired: the test proves nothing"
    assert rig.audit().everything_delivered_once_and_deleted


def test_a_drop_midway_through_retr_keeps_that_message_and_those_after_it(make_rig: RigFactory,
                                                                          tmp_path: Path) -> None:
    maildir = MaildirTarget(tmp_path / "Maildir")
    rig = make_rig(corpus(5), Faults().on("RETR 3", action=Action.drop_midway(after_bytes=100)), target=maildir)

    first = rig.poll()

    assert not first.ok and "connection closed by the server" in (first.error or "")
    audit = rig.audit()
    assert audit.on_server == (1, 2, 3, 4, 5)  # no QUIT reached the server: nothing is deleted
    assert audit.delivered_once == [1, 2] and audit.undelivered == [3, 4, 5]
    assert maildir.files("tmp") == [], "a partial message was left in the Maildir"
    second = rig.poll()
    assert (second.ok, second.delivered, second.deleted) == (True, 3, 5)
    assert rig.audit().everything_delivered_once_and_deleted


def test_a_drop_midway_through_retr_to_smtp_delivers_nothing_partial(make_rig: RigFactory,
                                                                      smtp_sink: SMTPSink) -> None:
    rig = make_rig(corpus(3, body_lines=200), Faults().on("RETR 2", action=Action.drop_midway(after_bytes=2000)),
                   target=SinkTarget(smtp_sink))

    rig.poll()

    assert [corpus_number(m.data) for m in smtp_sink.messages] == [1]
    assert rig.audit().on_server == (1, 2, 3)
    rig.poll()
    assert rig.audit().everything_delivered_once_and_deleted


def test_retr_data_much_shorter_than_list_said_is_not_trusted_and_stays_on_the_server(make_rig: RigFactory) -> None:
    """A properly terminated reply that is far shorter than LIST said is a broken transfer (a server or proxy cut
    the message), not the message: delivering it and sending DELE would destroy the rest."""
    rig = make_rig(corpus(3, body_lines=40), Faults().on("RETR 2", action=Action.truncate(n_bytes=150)))

    rig.poll()

    audit = rig.audit()
    assert 2 in audit.on_server, "the truncated message was deleted from the server"
    assert all(len(data) > 1000 for data in rig.target.delivered()), "a truncated copy was delivered"


def test_retr_data_a_little_longer_than_list_said_is_delivered_as_the_server_sent_it(make_rig: RigFactory) -> None:
    """Servers that count LF-only sizes announce less than they send; the data is the message."""
    extra = b"X-Appended-By-Server: yes\r\n"
    rig = make_rig(corpus(2), Faults().on("RETR 1", action=Action.extend(extra)))

    assert rig.poll().ok

    assert rig.audit().everything_delivered_once_and_deleted
    (first,) = [data for data in rig.target.delivered() if corpus_number(data) == 1]
    assert first.endswith(extra.replace(b"\r\n", b"\n"))


def test_retr_data_far_longer_than_list_said_is_rejected_with_the_reason_and_left_on_the_server(
        make_rig: RigFactory) -> None:
    rig = make_rig(corpus(3), Faults().on("RETR 2", action=Action.extend(b"y" * 100 + b"\r\n" * 3_000_000)))

    first = rig.poll()

    assert not first.ok and "exceeds" in (first.error or "")
    second = rig.poll()
    assert second.ok and second.left == 1
    audit = rig.audit()
    assert audit.on_server == (2,) and audit.delivered_once == [1, 3]
    assert "message data exceeds" in audit.rejected[2]


def test_an_endless_retr_is_cut_off_at_max_size_and_the_message_recorded_as_rejected(make_rig: RigFactory) -> None:
    rig = make_rig(corpus(2), Faults().on("RETR 1", action=Action.flood(b"z" * 998)))

    first = rig.poll(max_size="200kB")

    assert not first.ok and "exceeds 200000 bytes" in (first.error or "")
    rig.poll(max_size="200kB")
    audit = rig.audit()
    assert audit.on_server == (1,) and audit.delivered_once == [2] and 1 in audit.rejected


def test_a_retr_without_its_terminating_dot_times_out_and_the_message_stays(make_rig: RigFactory) -> None:
    rig = make_rig(corpus(3), Faults().on("RETR 2", action=Action.no_terminator()))

    started = time.monotonic()
    first = rig.poll(timeout="0.5s")

    assert time.monotonic() - started < 3.0
    assert not first.ok and "timed out" in (first.error or "")
    assert rig.audit().on_server == (1, 2, 3)
    rig.poll_until_done()
    assert rig.audit().everything_delivered_once_and_deleted


STALLS = ["GREETING", "USER", "PASS", "UIDL", "LIST", "RETR 2", "DELE 1", "QUIT"]


@pytest.mark.parametrize("command", STALLS)
def test_a_stalling_server_is_given_up_on_after_the_timeout_and_nothing_is_lost(make_rig: RigFactory,
                                                                               command: str) -> None:
    rig = make_rig(corpus(3), Faults().on(command, action=Action.stall(0.9)))

    started = time.monotonic()
    first = rig.poll(timeout="0.2s")

    assert time.monotonic() - started < 0.8, "the poll waited for the stalled server instead of timing out"
    assert not first.ok and "timed out" in (first.error or "")
    assert rig.audit().duplicates == 0
    time.sleep(0.7)  # until the stalled server session lets go of the mailbox
    rig.poll_until_done()
    assert rig.audit().everything_delivered_once_and_deleted


def test_a_server_listing_one_uid_twice_gets_neither_message_touched(make_rig: RigFactory) -> None:
    rig = make_rig(corpus(3), Faults(uidl_override=lambda _session, uids: [uids[0], *uids[:-1]]))

    for _ in range(2):
        stats = rig.poll()
        assert stats.ok and stats.left == 2

    audit = rig.audit()
    assert audit.on_server == (1, 2) and audit.undelivered == [1, 2] and audit.delivered_once == [3]


def test_an_invalid_uid_fails_the_poll_without_touching_any_message(make_rig: RigFactory) -> None:
    rig = make_rig(corpus(2), Faults(uidl_override=lambda _session, uids: ["u" * 71, uids[1]]))

    stats = rig.poll()

    assert not stats.ok and "invalid unique id" in (stats.error or "")
    audit = rig.audit()
    assert audit.on_server == (1, 2) and audit.undelivered == [1, 2]


def test_uids_renumbered_between_polls_cost_at_most_one_duplicate_and_lose_nothing(make_rig: RigFactory) -> None:
    """A server that re-indexes (a new UIDVALIDITY) gives every message a new UID. Messages delivered but not yet
    deleted (here: QUIT was lost) then look new and are delivered once more -- never lost."""
    renumbered = Faults(uidl_override=lambda session, uids: uids if session == 1 else [f"new-{u}" for u in uids])
    rig = make_rig(corpus(4), renumbered.on("QUIT", action=Action.drop()))

    rig.poll()
    rig.poll_until_done()

    audit = rig.audit()
    assert not audit.on_server
    assert all(1 <= audit.copies[n] <= 2 for n in audit.numbers)


def test_a_uid_that_the_server_gives_to_another_message_does_not_get_that_message_deleted(
        make_rig: RigFactory) -> None:
    """RFC 1939 forbids it, but servers that derive UIDs from message numbers do it: poll 1 delivers message 1
    (UID a), cannot fetch message 2 (UID b) and loses QUIT; in poll 2 the UIDs have swapped."""
    swapped = Faults(uidl_override=lambda session, uids: uids if session == 1 else list(reversed(uids)))
    swapped.on("RETR 2", action=Action.reply("-ERR [SYS/TEMP] try later")).on("QUIT", action=Action.drop())
    rig = make_rig([corpus_message(1), corpus_message(2, body_lines=30)], swapped)

    rig.poll_until_done()

    audit = rig.audit()
    assert 2 in audit.copies or 2 in audit.on_server, "message 2 was deleted without ever being delivered"


def test_a_refused_dele_keeps_the_record_and_the_next_poll_deletes_without_delivering_again(
        make_rig: RigFactory) -> None:
    rig = make_rig(corpus(3), Faults().on("DELE", times=None, action=Action.reply("-ERR [SYS/TEMP] read-only")))

    first = rig.poll()

    assert (first.ok, first.delivered, first.deleted) == (True, 3, 0)
    assert rig.audit().on_server == (1, 2, 3)
    rig.server.faults = None
    second = rig.poll()
    assert (second.delivered, second.deleted) == (0, 3)
    assert rig.audit().everything_delivered_once_and_deleted


@pytest.mark.parametrize("refusal", [("USER", "-ERR [AUTH] no such user"),
                                     ("PASS", "-ERR [AUTH] Authentication failed"),
                                     ("PASS", "-ERR [IN-USE] mailbox locked by another session"),
                                     ("PASS", "-ERR [SYS/TEMP] try again later")])
def test_a_refused_login_fails_the_account_with_the_servers_reason_and_touches_nothing(
        make_rig: RigFactory, refusal: tuple[str, str]) -> None:
    command, reply = refusal
    rig = make_rig(corpus(2), Faults().on(command, action=Action.reply(reply)))

    stats = rig.poll()

    assert not stats.ok and f"login refused: {reply[5:]}" in (stats.error or "")
    audit = rig.audit()
    assert audit.on_server == (1, 2) and audit.undelivered == [1, 2]
    assert not any(c.split()[0] in ("RETR", "DELE") for c in rig.server.commands)


def test_a_wrong_password_is_refused_and_nothing_is_fetched(make_rig: RigFactory) -> None:
    rig = make_rig(corpus(1))

    stats = rig.poll(password="not-the-password")

    assert not stats.ok and "login refused" in (stats.error or "")
    assert rig.audit().on_server == (1,)


def test_a_message_the_server_cannot_send_does_not_hold_up_the_others(make_rig: RigFactory) -> None:
    rig = make_rig(corpus(4), Faults().on("RETR 2", action=Action.reply("-ERR message is damaged")))

    stats = rig.poll()

    assert stats.ok and stats.left == 1
    audit = rig.audit()
    assert audit.on_server == (2,) and audit.delivered_once == [1, 3, 4]
    rig.poll()
    assert rig.audit().everything_delivered_once_and_deleted
