"""The harness the fault suites share (``test_faults_*``, ``test_bad_input``, ``test_security``, ``test_kill``,
``test_nothing_lost``, ``test_pop3_framing`` and the model-based test use it).

A corpus of numbered messages, a `Rig` that polls one account in process against a scripted `POP3Server` (or,
with ``source="fake"``, a `FakeMailbox` in memory) and a real destination, an `Audit` of what became of every corpus
message, a subprocess runner that measures peak memory, and a per-test time limit so that no test can hang. Its
fixtures (``make_rig``, ``time_limit``, ``make_setup``) are in ``tests/conftest.py``; a module that wants the time
limit says ``pytestmark = pytest.mark.usefixtures("time_limit")`` and may set its own ``TIME_LIMIT``.

The second part is the small poller harness of ``test_poller`` and the plugin suites: `Setup`, one account in front
of a scripted server (or a `FakeMailbox`) delivering to a Maildir, and `mail`, a numbered message.

Which mailbox: a test whose subject is what happens to a message between fetch and delete (filters, rules, backups,
deliveries, records, exit statuses) polls a `FakeMailbox` (``source="fake"``): no sockets, no threads, and what is
"on the server" is what the mailbox still holds. A test of the POP3 protocol, of its faults or of the login keeps the
scripted POP3 server (the default, ``source="pop3"``).
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import json
import logging
import os
import poplib
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import pytest
import structlog
import yaml
from postbote.config import Config
from postbote.errors import StateError
from postbote.logconfig import configure_logging
from postbote.poll import PollStats
from postbote.state import REJECTED, Record, StateStore
from postbote.testing import poll_once
from postbote.testing.mailbox import FAKE_PROTOCOL, FakeMailbox, FakeSource
from postbote.testing.pop3server import Faults, POP3Server

from tests.servers import interrupt_after
from tests.servers.dovecot import DovecotServer
from tests.servers.dovecot_sasl import FakeOAuthProvider
from tests.servers.faulty_smtp import FaultySMTP
from tests.servers.smtp_sink import SMTPSink

REPO_ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "demo"
TIME_LIMIT = 60.0

# --- no test may hang ---------------------------------------------------------------------------------


@contextmanager
def limited_time(item: pytest.Item) -> Iterator[None]:
    """Interrupt the test after ``TIME_LIMIT`` seconds (a module may set its own): a hang fails, never blocks CI."""
    with interrupt_after(float(getattr(item.module, "TIME_LIMIT", TIME_LIMIT)), item.name):  # type: ignore[attr-defined]
        yield


FIXTURE_TIME_LIMIT = 120.0
# Whatever a test's body does (a test without ``time_limit``, or a hang the interrupt cannot break, such as a lock
# taken by a thread that died), the run ends with every thread's stack after this long, never at CI's own limit.
# A soak (thousands of model cases) sets POSTBOTE_TEST_BACKSTOP to more seconds, or to 0 for none.
BODY_BACKSTOP = float(os.environ.get("POSTBOTE_TEST_BACKSTOP", "300"))


HANG_REPORT = Path(os.environ.get("POSTBOTE_HANG_REPORT")
                   or Path(tempfile.gettempdir()) / f"postbote-test-hang-{os.getpid()}.txt")
"""Where a run ended by a hang leaves the test's name and every thread's stack: pytest captures file descriptor 2
while a test runs, and what faulthandler wrote there was lost with the process. `.ci/run` prints it on failure."""
_hang_report: Any = None


def _hang_report_for(what: str) -> Any:
    """The hang report, holding only the name of what is watched now (the stacks follow it if it hangs)."""
    global _hang_report
    if _hang_report is None:
        _hang_report = HANG_REPORT.open("w", encoding="utf-8")
    _hang_report.seek(0)
    _hang_report.truncate()
    _hang_report.write(f"the test run (pid {os.getpid()}) was ended by a hang in {what}; every thread's stack:\n")
    _hang_report.flush()
    return _hang_report


@contextmanager
def run_ended_after(seconds: float, what: str) -> Iterator[None]:
    """End the whole run, writing every thread's stack to `HANG_REPORT`, if the block still runs after ``seconds``.

    Interrupting fixtures with an exception (as `limited_time` does the test's body) is not safe: pytest would keep
    a half-finalized fixture cached for the tests after it. A dead run with the stacks says where the hang is."""
    if seconds <= 0:
        yield
        return
    faulthandler.dump_traceback_later(seconds, exit=True, file=_hang_report_for(f"{what} (after {seconds:g} s)"))
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def fixtures_watched(item: pytest.Item, phase: str) -> contextlib.AbstractContextManager[None]:
    """Every test's set-up and tear-down (``phase``), whether or not it asked for ``time_limit``, end the run when
    they hang."""
    return run_ended_after(FIXTURE_TIME_LIMIT, f"the {phase} of {item.nodeid}")


@contextmanager
def body_watched(item: pytest.Item) -> Iterator[None]:
    """A test that asked for ``time_limit`` is interrupted after it (and the run ends a minute later if the
    interrupt did not free it); any other test ends the run after `BODY_BACKSTOP`."""
    if "time_limit" not in getattr(item, "fixturenames", ()):
        with run_ended_after(BODY_BACKSTOP, item.nodeid):
            yield
        return
    limit = float(getattr(item.module, "TIME_LIMIT", TIME_LIMIT))  # type: ignore[attr-defined]
    with run_ended_after(limit + 60.0, item.nodeid), limited_time(item):
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


Source = Literal["pop3", "fake"]  # which mailbox a rig or a setup polls: the scripted POP3 server, or in memory


def on_server(server: POP3Server | FakeMailbox) -> list[tuple[str, bytes]]:
    """The messages still on the server, (uid, data) in listing order: a POP3Server's, or a FakeMailbox's."""
    return list(server.messages.items()) if isinstance(server, FakeMailbox) else server.messages()


def fake_mailbox(messages: list[bytes], account: str = "test") -> tuple[FakeSource, FakeMailbox]:
    """A `FakeSource` whose account ``account`` holds ``messages`` (UIDs ``uid-1``, ``uid-2``, ...)."""
    source = FakeSource()
    mailbox = source.mailbox(account)
    for data in messages:
        mailbox.add(data)
    return source, mailbox


class Rig:
    """One account, ``test``: a scripted POP3 server in front (or a `FakeMailbox`, when ``source`` serves it), a
    destination behind, its own state directory.

    `poll` runs a poll in this process the way ``postbote poll`` does; `configure` writes the YAML a user would.
    """

    def __init__(self, directory: Path, server: POP3Server | FakeMailbox, target: Target,
                 source: FakeSource | None = None) -> None:
        self.directory = directory
        self.server = server
        self.source = source
        self.target = target
        self.state_dir = directory / "state"
        self.config_path = directory / "postbote.yaml"
        self.uid_of = {n: uid for uid, data in on_server(server) if (n := corpus_number(data)) is not None}
        self.numbers = tuple(sorted(self.uid_of))
        self.other_faults = 0
        self.last_audit: Audit | None = None
        directory.mkdir(parents=True, exist_ok=True)

    def configure(self, top: dict[str, Any] | None = None, **account: Any) -> Path:
        entry: dict[str, Any] = {"name": "test"}
        if isinstance(self.server, FakeMailbox):
            entry["protocol"] = FAKE_PROTOCOL
        else:
            entry.update(host="127.0.0.1", port=self.server.port, tls="none", username="demo", password=PASSWORD)
        entry.update(timeout="2s", deliver=self.target.deliver())
        entry.update(account)
        entry = {key: value for key, value in entry.items() if value is not None}  # None: leave the key out
        document = {"state_dir": str(self.state_dir), "log": {"level": "debug", "format": "json"},
                    **(top or {}), "accounts": [entry]}
        self.config_path.write_text(yaml.safe_dump(document, sort_keys=False))
        self.config_path.chmod(0o600)
        return self.config_path

    def poll(self, top: dict[str, Any] | None = None, *, plugins: tuple[object, ...] = (), **account: Any) -> PollStats:
        """One poll with the config `configure` writes; ``plugins`` are registered beside the built-ins."""
        return poll_once(self.configure(top, **account), plugins=self.plugins(*plugins))

    def plugins(self, *extra: object) -> list[object]:
        """The plugins a poll of this rig registers: the fake source, if the rig has one, and ``extra``."""
        return [*([self.source] if self.source is not None else []), *extra]

    def load(self, top: dict[str, Any] | None = None, **account: Any) -> Config:
        """The config `configure` writes, loaded as a poll of this rig loads it."""
        from postbote.config import load_config
        from postbote.pluginmanager import make_plugin_manager

        return load_config(self.configure(top, **account), make_plugin_manager(entry_points=False,
                                                                                extra=self.plugins()))

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
        left = tuple(sorted(n for _, data in on_server(self.server) if (n := corpus_number(data)) is not None))
        copies = Counter(n for data in self.target.delivered() if (n := corpus_number(data)) is not None)
        number_of = {uid: n for n, uid in self.uid_of.items()}
        rejected = {number_of[uid]: record.reason for uid, record in self.records().items()
                    if record.status == REJECTED and uid in number_of}
        self.last_audit = Audit(self.numbers, left, copies, rejected)
        assert self.last_audit.lost == [], f"messages lost: {self.last_audit.lost}"
        return self.last_audit

    def faults_injected(self) -> int:
        faults = None if isinstance(self.server, FakeMailbox) else self.server.faults
        fired = len(faults.fired) if faults is not None else 0
        target_server = getattr(self.target, "server", None)
        if isinstance(target_server, FaultySMTP):
            fired += len(target_server.fired)
        return fired + self.other_faults


RigFactory = Callable[..., Rig]


def rig_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RigFactory]:
    """``make_rig(messages, faults=None, target=None, source="pop3", **server_options)``: a started server and its
    rig, or with ``source="fake"`` a `FakeMailbox` holding the messages (no faults or server options then); the
    servers are stopped and the test's figures recorded afterwards (``yield from rig_factory(tmp_path, request)``
    in a fixture)."""
    rigs: list[Rig] = []

    def make(messages: list[bytes], faults: Faults | None = None, target: Target | None = None,
             source: Source = "pop3", **server_options: Any) -> Rig:
        target = target or MaildirTarget(tmp_path / f"Maildir{len(rigs)}")
        if source == "fake":
            assert faults is None and not server_options, "POP3 faults and server options need source='pop3'"
            fake, mailbox = fake_mailbox(messages)
            rig = Rig(tmp_path / f"rig{len(rigs)}", mailbox, target, fake)
        else:
            rig = Rig(tmp_path / f"rig{len(rigs)}", POP3Server(messages, faults=faults, **server_options).start(),
                      target)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        if isinstance(rig.server, POP3Server):
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


# ================================================================== the poller suites' harness


def mail(n: int) -> bytes:
    return f"Subject: message {n}\r\nMessage-ID: <{n}@test>\r\n\r\nbody {n}\r\n".encode()


class Setup:
    """One account, ``test``, in front of a scripted server (or a `FakeMailbox`, when ``source`` serves it),
    delivering to ``tmp_path/Maildir``."""

    def __init__(self, tmp_path: Path, server: POP3Server | FakeMailbox, source: FakeSource | None = None) -> None:
        self.tmp_path = tmp_path
        self.server = server
        self.source = source
        self.maildir = tmp_path / "Maildir"

    def configure(self, extra: str = "", deliver: str = "") -> Path:
        """Write the config: ``extra`` and ``deliver`` are YAML lines for the account (a 2 s timeout by default)."""
        path = self.tmp_path / "postbote.yaml"
        settings = extra if "timeout" in extra else extra + "timeout: 2s\n"
        settings += deliver or f"deliver: {{maildir: {self.maildir}}}\n"
        if isinstance(self.server, FakeMailbox):
            mailbox = f"protocol: {FAKE_PROTOCOL}\n"
        else:
            mailbox = f"host: 127.0.0.1\nport: {self.server.port}\ntls: none\nusername: demo\npassword: demo\n"
        path.write_text(f"state_dir: {self.tmp_path / 'state'}\naccounts:\n  - name: test\n"
                        + textwrap.indent(mailbox + settings, "    "))
        os.chmod(path, 0o600)
        return path

    def poll(self, *plugins: object, extra: str = "", deliver: str = "",
             stop: threading.Event | None = None) -> PollStats:
        source = [self.source] if self.source is not None else []
        return poll_once(self.configure(extra, deliver), plugins=[*source, *plugins], stop=stop)

    def delivered(self) -> list[bytes]:
        folder = self.maildir / "new"
        files = sorted(folder.iterdir(), key=lambda p: p.stat().st_mtime_ns) if folder.is_dir() else []
        return [p.read_bytes() for p in files]

    def subjects(self) -> list[str]:
        return sorted(line.decode() for data in self.delivered() for line in data.splitlines()
                      if line.startswith(b"Subject:"))


SetupFactory = Callable[..., Setup]


def setup_factory(tmp_path: Path) -> Iterator[SetupFactory]:
    """``make_setup(messages, faults=None, source="pop3")``: a started server and its `Setup`, or with
    ``source="fake"`` a `FakeMailbox` holding the messages (no faults then); the servers are stopped after."""
    servers: list[POP3Server] = []

    def make(messages: list[bytes], faults: Faults | None = None, source: Source = "pop3") -> Setup:
        if source == "fake":
            assert faults is None, "POP3 faults need source='pop3'; a FakeMailbox has its own"
            fake, mailbox = fake_mailbox(messages)
            return Setup(tmp_path, mailbox, fake)
        server = POP3Server(messages, faults=faults).start()
        servers.append(server)
        return Setup(tmp_path, server)

    yield make
    for server in servers:
        server.stop()


# ================================================================== postbote driven as a user drives it
# (test_end_to_end, test_exit_status, test_lmtp, test_cli): a config file and the commands, in process or as a child


RUN_TIMEOUT = 120.0  # seconds for one postbote command, in or out of process


def make_message(subject: str, body: bytes = b"Hello.\n", *, headers: bytes = b"") -> bytes:
    """A small RFC 5322 message with LF line endings (as Maildir stores it)."""
    return (
        b"From: Sender <sender@example.net>\n"
        b"To: alice@example.org\n"
        + f"Subject: {subject}\n".encode()
        + f"Message-ID: <{subject.replace(' ', '-')}@example.net>\n".encode()
        + headers
        + b"\n"
        + body
    )


def to_crlf(data: bytes) -> bytes:
    """*data* with every line ending as CRLF -- how it travels over POP3 and SMTP."""
    return re.sub(rb"\r?\n", b"\r\n", data)


def strip_trace_header(data: bytes) -> bytes:
    """Remove the ``Received:`` field postbote prepends, folded lines included.

    Only the first field is removed, so comparing the rest with the original
    also proves that exactly one field was added and nothing else changed.
    """
    first_line_end = data.find(b"\r\n")
    assert first_line_end > 0, "no CRLF line ending in the delivered message"
    assert data[:9].lower() == b"received:", f"no Received: trace field first: {data[:80]!r}"
    end = first_line_end + 2
    while data[end : end + 1] in (b" ", b"\t"):  # continuation lines of the folded field
        end = data.index(b"\r\n", end) + 2
    return data[end:]


@contextmanager
def logging_restored() -> Iterator[None]:
    """Undo postbote's process-wide logging set-up after an in-process run.

    ``main`` configures the root logger and structlog for a whole process; left
    in place, the next tests would run with postbote's handler and level.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    structlog_config = structlog.get_config()
    try:
        yield
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)
        structlog.configure(**structlog_config)


class Postbote:
    """A postbote configuration in a temp dir plus ways to run commands on it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.config_file = directory / "postbote.yaml"
        self.state_dir = directory / "state"

    def configure(
        self,
        accounts: list[dict[str, Any]],
        *,
        defaults: Mapping[str, Any] | None = None,
        mode: int = 0o600,
        top: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write the config file (0600: inline passwords in readable files are refused); ``top`` holds more
        top-level keys (``plugin_paths``: e.g. a `FakeSource.plugin_file`, for accounts with ``protocol: fake``)."""
        config: dict[str, Any] = {
            "state_dir": str(self.state_dir),
            "log": {"level": "debug", "format": "json"},
            **(top or {}),
        }
        if defaults:
            config["defaults"] = dict(defaults)
        config["accounts"] = accounts
        self.config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        self.config_file.chmod(mode)
        return self.config_file

    def run(self, *args: str) -> int:
        """``postbote -c CONFIG ARGS...`` in this process; returns the exit code."""
        from postbote.cli import main  # imported late: a missing core fails tests, not collection

        with interrupt_after(RUN_TIMEOUT, "postbote"), logging_restored():
            try:
                return main(["-c", str(self.config_file), *args])
            except SystemExit as exit:
                return exit.code if isinstance(exit.code, int) else 1

    def poll(self) -> int:
        return self.run("poll")

    def retry(self, account: str, *uids: str) -> int:
        return self.run("retry", account, *uids)

    def run_process(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``python -m postbote -c CONFIG ARGS...`` as a child process, output captured."""
        return subprocess.run(
            postbote_argv(self.config_file, *args),
            cwd=self.directory,
            env=child_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            check=False,
        )


def uidls(dovecot: DovecotServer, user: str) -> list[str]:
    """The POP3 UIDLs of *user*'s messages, in mailbox order."""
    client = poplib.POP3(dovecot.host, dovecot.pop3_port, timeout=10)
    try:
        client.user(user)
        client.pass_(dovecot.password(user))
        return [line.split()[1].decode() for line in client.uidl()[1]]
    finally:
        client.quit()


def capture_logging(stream: io.StringIO) -> Callable[[], None]:
    """Route postbote's logs (debug and up, JSON) to ``stream``; returns what puts the previous set-up back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    configure_logging("debug", "json", stream=stream)

    def restore() -> None:
        structlog.reset_defaults()
        root.handlers[:] = handlers
        root.setLevel(level)

    return restore


# ================================================================== the daemon as a process



def wait_until(condition: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    """The condition's first true value, or AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def account(name: str, server: POP3Server | None, maildir: Path, **extra: Any) -> dict[str, Any]:
    entry = {"name": name, "host": "127.0.0.1", "port": server.port if server else 1, "tls": "none",
             "username": "demo", "password": "demo", "poll_interval": "1s", "timeout": "2s",
             "deliver": {"maildir": str(maildir)}}
    entry.update(extra)
    return {key: value for key, value in entry.items() if value is not None}


def fake_account(name: str, maildir: Path, **extra: Any) -> dict[str, Any]:
    """An account served by a `FakeSource` (``protocol: fake``), as `account` writes one for a POP3 server."""
    entry = {"name": name, "protocol": FAKE_PROTOCOL, "poll_interval": "1s", "timeout": "2s",
             "deliver": {"maildir": str(maildir)}}
    entry.update(extra)
    return {key: value for key, value in entry.items() if value is not None}


def write_config(path: Path, accounts: list[dict[str, Any]], **top: Any) -> Path:
    document = {"state_dir": str(path.parent / "state"), "log": {"format": "json", "level": "debug"},
                "accounts": accounts, **top}
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    os.chmod(path, 0o600)
    return path


def subjects(maildir: Path) -> list[str]:
    folder = maildir / "new"
    if not folder.is_dir():
        return []
    return sorted(line.decode() for p in folder.iterdir() for line in p.read_bytes().splitlines()
                  if line.startswith(b"Subject:"))


class DaemonRun:
    """``postbote -c CONFIG run`` in a subprocess, its JSON log collected in a file."""

    def __init__(self, config: Path, env: dict[str, str] | None = None, command: str = "run") -> None:
        self.log_path = config.with_name(f"daemon-{time.monotonic_ns()}.log")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in wait()
        self.process = subprocess.Popen([sys.executable, "-m", "postbote", "-c", str(config), command], cwd=REPO_ROOT,
                                        stdout=subprocess.PIPE, stderr=self._log, env={**os.environ, **(env or {})})

    def events(self, name: str | None = None, **fields: Any) -> list[dict[str, Any]]:
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if (name is None or event.get("event") == name) and all(event.get(k) == v for k, v in fields.items()):
                found.append(event)
        return found

    def wait_for(self, name: str, count: int = 1, timeout: float = 5.0, **fields: Any) -> list[dict[str, Any]]:
        def enough() -> list[dict[str, Any]] | None:
            if self.process.poll() is not None and len(self.events(name, **fields)) < count:
                raise AssertionError(f"daemon exited ({self.process.returncode}) before {name}:\n{self.log()}")
            events = self.events(name, **fields)
            return events if len(events) >= count else None

        return wait_until(enough, timeout, f"{count} x {name} {fields or ''}")

    def send(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout: float = 10.0) -> int:
        if self.process.poll() is None:
            self.send(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def held_uids(state_dir: Path, account: str) -> list[str]:
    """The UIDs postbote holds for the admin after deliveries that ended without an answer (two kills, or lost
    answers, mid-delivery): what ``postbote retry`` releases."""
    from postbote.state import REJECTED, StateStore

    store = StateStore(state_dir, readonly=True)
    try:
        return [uid for uid, record in store.records(account).items()
                if record.status == REJECTED and "ended without an answer" in record.reason]
    finally:
        store.close()


# --- OAuth2 against the fake provider (tests/servers/dovecot_sasl.FakeOAuthProvider) --------------------------------

OAUTH_CLIENT_ID = "postbote-test-client"
OAUTH_CLIENT_SECRET = "cs-very-secret-client-secret"


def secret_file(path: Path, value: str, mode: int = 0o600) -> Path:
    """``value`` in a file of its own, mode 0600 unless told (a password, a client secret, a refresh token)."""
    path.write_text(value + "\n")
    path.chmod(mode)
    return path


Browser = Callable[[str], None]


def oauth_browser(provider: FakeOAuthProvider, *, tamper: dict[str, str] | None = None) -> Browser:
    """Plays the user's browser: checks the authorization URL, 'signs in', follows the redirect to 127.0.0.1."""

    def open_url(url: str) -> None:
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
        assert query["response_type"] == "code" and query["code_challenge_method"] == "S256"
        assert query["client_id"] == OAUTH_CLIENT_ID and query["scope"] == "pop offline_access"
        redirect = query["redirect_uri"]
        assert redirect.startswith("http://127.0.0.1:")
        code = provider.issue_code("alice", OAUTH_CLIENT_ID, redirect, query["code_challenge"])
        params = {"code": code, "state": query["state"], **(tamper or {})}
        try:
            urllib.request.urlopen(f"{redirect}?{urllib.parse.urlencode(params)}", timeout=5).read()
        except urllib.error.HTTPError as exc:
            assert exc.code == 404

    return open_url


class RecordingLog:
    """Stands in for the structlog logger `login` is given: remembers the events."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **fields: self.events.append((level, event, fields))

    def names(self, level: str) -> list[str]:
        return [event for lvl, event, _ in self.events if lvl == level]
