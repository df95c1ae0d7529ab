"""Runs a model `Case`: the scripted POP3 server, the destinations, each planned poll and the clean polls after.

A poll runs the way ``postbote poll`` runs one account (config YAML, then `postbote.testing.poll_once`), with one
extra plugin, `ModelPlugin`, that counts the poll's steps (hook calls) to SIGKILL the process or lock the state
database at a chosen step, and plays the refusals of Maildir and mbox destinations. A poll with a kill runs in a
forked child; the others run in this process.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import signal
import sqlite3
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest
from postbote import DeliveryError, hookimpl
from postbote.plugins.pop3.mailbox import HEADERS_NAME, NAME_DIGITS, header_block
from postbote.poll import PollStats
from postbote.state import DATABASE_NAME, REJECTED, StateStore
from postbote.testing import poll_once
from postbote.testing.pop3server import Action, Faults, POP3Server, Reply, crlf_normalised

from tests.harness import Rig
from tests.model.destinations import Destination, Kind, Outcome, stop_shared_servers
from tests.model.ledger import HiddenFault, InvariantBroken, Ledger, Stuck
from tests.model.messages import ident_of, model_message, on_the_wire
from tests.model.plan import Case, InjectedFault, KillPoint, PollPlan, ServerFault

POP3_TIMEOUT = "0.3s"
STALL_SECONDS = 0.6
STATE_BUSY_MS = 50
CHILD_DEADLINE = 30.0
CLEAN_POLLS = 3

TALLY: Counter[str] = Counter()
"""What all cases of this test session exercised (printed at the end)."""


# ------------------------------------------------------------------ the server's side


@dataclass(frozen=True)
class Crafted(Action):
    """RETR answered by the model: the stored bytes dot-stuffed only after CRLF, then ``stray`` (a stray line)."""

    stray: bytes


class ModelFaults(Faults):
    """The poll's server faults; also kills the child postbote when the server receives its k-th command."""

    def __init__(self, plan: PollPlan, snapshot: list[bytes], *, raw_line_endings: bool) -> None:
        super().__init__(raw_line_endings=raw_line_endings)
        self.snapshot = snapshot
        self.kill_at_command = plan.kill.k if plan.kill and plan.kill.at is KillPoint.COMMAND else None
        self.victim: int | None = None
        self.commands_seen = 0
        self.killed = False
        self.injected: dict[int, InjectedFault] = {}
        self.fired_faults: list[InjectedFault] = []
        for fault in plan.server_faults:
            for command, action in actions_for(fault):
                self.on(command, nth=fault.nth, action=action)
                self.injected[id(action)] = fault

    def action_for(self, keyword: str, arguments: str) -> Action | None:
        self.commands_seen += 1
        if self.victim is not None and self.commands_seen == self.kill_at_command:
            os.kill(self.victim, signal.SIGKILL)
            self.killed = True
        action = super().action_for(keyword, arguments)
        if action is not None:
            fault = self.injected[id(action)]
            if fault not in self.fired_faults:
                self.fired_faults.append(fault)
        if isinstance(action, Crafted):
            return self.crafted_retr(arguments, action.stray)
        return action

    def crafted_retr(self, arguments: str, stray: bytes) -> Action | None:
        number = int(arguments) if arguments.isdigit() else 0
        if not 1 <= number <= len(self.snapshot):
            return None
        data = self.snapshot[number - 1] if self.raw_line_endings else crlf_normalised(self.snapshot[number - 1])
        stuffed = re.sub(rb"(\A|\r\n)\.", rb"\1..", data)
        return Reply(b"+OK %d octets\r\n" % len(data) + stuffed + b".\r\n" + stray)


def actions_for(fault: InjectedFault) -> list[tuple[str, Action]]:
    kind = fault.fault
    if kind is ServerFault.EMPTY_LISTING:
        return [("UIDL", Action.reply(b"+OK\r\n.\r\n")), ("LIST", Action.reply(b"+OK 0 messages\r\n.\r\n"))]
    action: Action = {
        ServerFault.DROP: lambda: Action.drop(),
        ServerFault.DROP_MIDWAY: lambda: Action.drop_midway(after_bytes=20),
        ServerFault.GARBAGE: lambda: Action.reply("what is this"),
        ServerFault.STALL: lambda: Action.stall(STALL_SECONDS),
        ServerFault.STRAY_LINE: lambda: Crafted(stray=b"\r\n"),
        ServerFault.STRAY_STATUS: lambda: Crafted(stray=b"-ERR no such message\r\n"),
        ServerFault.RETR_REFUSED: lambda: Action.reply("-ERR [SYS/TEMP] cannot open the message now"),
        ServerFault.LENIENT_STUFFING: lambda: Crafted(stray=b""),
        ServerFault.QUIT_WITHOUT_COMMIT: lambda: Action.reply("+OK bye"),
        ServerFault.QUIT_REPLY_LOST: lambda: Action.drop_midway(after_bytes=0),
    }[kind]()
    return [(fault.command, action)]


# ------------------------------------------------------------------ postbote's side


class ModelPlugin:
    """Counts the poll's steps; at a chosen step kills the process or takes the state DB's write lock from another
    connection; refuses deliveries to Maildir/mbox destinations as their schedules say."""

    def __init__(self, plan: PollPlan, destinations: list[Destination], database: Path, *, in_child: bool) -> None:
        self.kill_at = plan.kill.k if in_child and plan.kill and plan.kill.at is KillPoint.HOOK else None
        self.lock_at = plan.state_locked_at
        self.database = database
        self.lock: sqlite3.Connection | None = None
        self.steps = 0
        self.attempts: Counter[int] = Counter()
        self.refused = 0
        self.schedules = {d.index: plan.destination_outcomes[d.index] for d in destinations
                          if d.kind.refused_by_plugin and d.index < len(plan.destination_outcomes)}
        if self.lock_at == 0:
            self.take_lock()

    def step(self) -> None:
        self.steps += 1
        if self.steps == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.steps == self.lock_at:
            self.take_lock()

    def take_lock(self) -> None:
        connection = sqlite3.connect(self.database, timeout=1.0, isolation_level=None)
        try:
            connection.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            connection.close()
            return
        self.lock = connection

    def release(self) -> None:
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    @hookimpl
    def messages_listed(self, account: Any, count: int, octets: int) -> None:
        self.step()

    @hookimpl(tryfirst=True)
    def filter_message(self, message: Any, account: Any) -> None:
        self.step()

    @hookimpl(tryfirst=True)
    def deliver_message(self, message: Any, destination: Any, account: Any, poll: Any) -> None:
        self.step()
        index = next((i for i, d in enumerate(account.destinations) if d is destination), -1)
        if index not in self.schedules:
            return
        self.attempts[index] += 1
        schedule = self.schedules[index]
        attempt = self.attempts[index]
        outcome = schedule[attempt - 1] if attempt <= len(schedule) else Outcome.OK
        if outcome is not Outcome.OK:
            self.refused += 1
            raise DeliveryError(f"model: destination {index} refuses ({outcome.value})",
                                temporary=outcome is Outcome.TEMPORARY)

    @hookimpl
    def message_delivered(self, message: Any, account: Any, destinations: list[str]) -> None:
        self.step()

    @hookimpl
    def poll_finished(self, account: Any, stats: PollStats) -> None:
        self.step()


@dataclass
class PollResult:
    stats: dict[str, Any] | None  # None: the poll was killed
    killed: bool = False
    state_locked: bool = False
    destination_refusals: int = 0
    server_faults: list[InjectedFault] = field(default_factory=list)

    @property
    def looks_clean(self) -> bool:
        s = self.stats
        return s is not None and s["error"] is None and s["deferred"] == 0 and s["rejected"] == 0


# ------------------------------------------------------------------ one case


class CaseRun:
    def __init__(self, case: Case, directory: Path) -> None:
        self.case = case
        self.directory = directory
        self.destinations = [Destination.create(kind, i, directory / f"dest{i}-{kind.value}")
                             for i, kind in enumerate(case.destinations)]
        self.server = POP3Server([], lock_timeout=2.0, without=() if case.uidl else ("UIDL",)).start()
        self.rig = Rig(directory / "rig", self.server, _NoTarget())  # type: ignore[arg-type]
        self.ledger = Ledger(self.destinations, case.keep)
        self.pieces: dict[int, tuple[str, ...]] = {}
        self.kills = 0
        self.risky_polls = 0  # polls cut short where a hand-over's outcome may not have been recorded
        self.log: list[str] = []
        TALLY["cases with an IMAP destination"] += Kind.IMAP in case.destinations
        TALLY["cases with a Gmail destination"] += Kind.GMAIL in case.destinations
        TALLY["cases with a server without UIDL"] += not case.uidl
        for spec in case.messages:
            self.arrive(spec.pieces, spec.uid)
        StateStore(self.rig.state_dir).close()  # the database exists before any lock is taken on it

    @property
    def database(self) -> Path:
        return self.rig.state_dir / DATABASE_NAME

    def arrive(self, pieces: tuple[str, ...], uid: str | None = None) -> None:
        ident = len(self.pieces) + 1
        self.pieces[ident] = pieces
        data = model_message(ident, pieces)
        uid = self.server.add_message(data, uid=uid)
        self.ledger.add(ident, uid, on_the_wire(data, raw_line_endings=self.case.raw_line_endings))

    def reuse_uid(self, earlier: int, pieces: tuple[str, ...]) -> None:
        """A new message that takes the UID of message ``earlier`` (0-based) once that one is gone: same size."""
        old = self.ledger.sent.get(earlier + 1)
        if old is None or old.on_server:
            self.arrive(pieces)
            return
        TALLY["UID reused at the same size"] += 1
        self.arrive(self.pieces[earlier + 1], uid=old.uid)

    def close(self) -> None:
        self.server.stop()
        for destination in self.destinations:
            destination.stop()

    # ---- polls

    def run(self) -> None:
        for number, plan in enumerate(self.case.polls, start=1):
            self.poll(plan, f"poll {number}")
        for number in range(1, CLEAN_POLLS + 1):
            copies = self.poll(PollPlan(), f"clean poll {number}")
            problems = self.ledger.unsettled(copies, self.rejected_uids(), self.duplicated_uids())
            if not problems:
                return
        raise Stuck(f"STUCK after {CLEAN_POLLS} clean polls: " + "; ".join(problems))

    def poll(self, plan: PollPlan, name: str) -> Any:
        # a session the last poll gave up on may still be stalled, holding the mailbox: the next poll starts after it
        self.server.wait_until_unlocked(STALL_SECONDS * 3)
        for arrival in plan.arrivals:
            if arrival.reuse_uid_of is not None:
                self.reuse_uid(arrival.reuse_uid_of, arrival.pieces)
            else:
                self.arrive(arrival.pieces)
        for destination in self.destinations:
            outcomes = plan.destination_outcomes[destination.index] if plan.destination_outcomes else ()
            destination.schedule(outcomes)
        fired_before = {d.label: d.refusals_fired() for d in self.destinations}
        faults = ModelFaults(plan, [data for _, data in self.server.messages()],
                             raw_line_endings=self.case.raw_line_endings)
        self.server.faults = faults
        result = self.run_forked(plan, faults) if plan.kill else self.run_here(plan)
        result.server_faults = faults.fired_faults
        result.destination_refusals += sum(d.refusals_fired() - fired_before[d.label] for d in self.destinations)
        TALLY["IMAP APPENDs refused or cut"] += sum(d.refusals_fired() - fired_before[d.label]
                                                   for d in self.destinations if d.kind is Kind.IMAP)
        TALLY["Gmail imports refused or left unanswered"] += sum(d.refusals_fired() - fired_before[d.label]
                                                                 for d in self.destinations if d.kind is Kind.GMAIL)
        result.destination_refusals += sum(refusals_seen(d, plan) for d in self.destinations if d.kind is Kind.MDA)
        result.killed = result.killed or faults.killed
        self.kills += result.killed
        self.tally(plan, result)
        self.log.append(f"{name}: {result.stats if result.stats else 'killed'}"
                        f"{'; state locked' if result.state_locked else ''}")
        on_server = {ident for _, data in self.server.messages() if (ident := ident_of(data)) is not None}
        risky = result.killed or (result.state_locked and (plan.state_locked_at or 0) > 0)
        self.risky_polls += bool(risky)
        copies = self.ledger.after_poll(on_server, risky, self.kills)
        self.check_stats(plan, result, name)
        return copies

    def check_stats(self, plan: PollPlan, result: PollResult, name: str) -> None:
        """Invariant 4: a poll that met a fault it could see does not look clean; a clean poll is."""
        if result.stats is None:
            return
        visible = [f for f in result.server_faults if f.fault.makes_the_poll_fail]
        if (visible or result.destination_refusals) and result.looks_clean:
            raise HiddenFault(f"{name} looks clean (no error, nothing deferred or rejected) although it met "
                                  f"{[str(f) for f in visible] or f'{result.destination_refusals} refusal(s)'}: "
                                  f"{result.stats}")
        if plan.clean and not result.looks_clean and not self.only_held_after_repeated_cuts(result):
            raise HiddenFault(f"{name}, without any fault, did not end cleanly: {result.stats}")

    def only_held_after_repeated_cuts(self, result: PollResult) -> bool:
        """A clean poll may reject, visibly, what postbote holds on purpose: a message whose delivery two cut-short
        polls (kills, a state store locked mid-poll) or two lost answers (an MTA that dropped the connection after
        the whole message) left without a recorded answer is held for the admin instead of
        being delivered again and again (docs/reliability.md)."""
        stats = result.stats or {}
        in_doubt = self.risky_polls + sum(destination.answers_lost() for destination in self.destinations)
        return (in_doubt >= 2 and stats.get("error") is None and not stats.get("deferred")
                and 0 < stats.get("rejected", 0) <= len(self.held_uids()))

    def run_here(self, plan: PollPlan) -> PollResult:
        plugin = ModelPlugin(plan, self.destinations, self.database, in_child=False)
        try:
            stats = self.poll_with(plugin)
        finally:
            locked = plugin.lock is not None
            plugin.release()
        return PollResult(asdict(stats), state_locked=locked, destination_refusals=plugin.refused)

    def run_forked(self, plan: PollPlan, faults: ModelFaults) -> PollResult:
        go_read, go_write = os.pipe()
        out_read, out_write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: wait for the parent to aim the kill, poll, report, leave without cleanup
            status = 0
            try:
                os.close(go_write)
                os.close(out_read)
                os.read(go_read, 1)
                plugin = ModelPlugin(plan, self.destinations, self.database, in_child=True)
                stats = self.poll_with(plugin)
                report = {"stats": asdict(stats), "locked": plugin.lock is not None, "refused": plugin.refused}
                os.write(out_write, json.dumps(report).encode())
            except BaseException:  # noqa: BLE001 - reported to the parent through the exit status
                status = 3
            finally:
                os._exit(status)
        os.close(go_read)
        os.close(out_write)
        faults.victim = pid
        os.write(go_write, b"x")
        os.close(go_write)
        output = b""
        deadline = time.monotonic() + CHILD_DEADLINE
        while time.monotonic() < deadline:
            ready, _, _ = select.select([out_read], [], [], 0.2)
            if ready:
                chunk = os.read(out_read, 65536)
                if not chunk:
                    break
                output += chunk
        else:
            os.kill(pid, signal.SIGKILL)
        os.close(out_read)
        _, status = os.waitpid(pid, 0)
        faults.victim = None
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
            return PollResult(None, killed=True, state_locked=plan.state_locked_at is not None)
        if os.waitstatus_to_exitcode(status) != 0 or not output:
            raise InvariantBroken(f"the forked poll crashed (exit status {os.waitstatus_to_exitcode(status)})")
        report = json.loads(output)
        return PollResult(report["stats"], state_locked=report["locked"], destination_refusals=report["refused"])

    def poll_with(self, plugin: ModelPlugin) -> PollStats:
        top = {"state_busy_timeout": f"{STATE_BUSY_MS / 1000}s"}  # a locked state DB fails a write in ms
        return poll_once(self.rig.configure(top, timeout=POP3_TIMEOUT, keep=self.case.keep,
                                            deliver=[d.config() for d in self.destinations]), plugins=[plugin])

    # ---- what the state says

    def held_uids(self) -> set[str]:
        server_uid = self.server_uids_by_name()
        return {server_uid[name] for name, record in self.rig.records().items() if name in server_uid
                and record.status == REJECTED and "ended without an answer" in record.reason}

    def rejected_uids(self) -> set[str]:
        server_uid = self.server_uids_by_name()
        return {server_uid[name] for name, record in self.rig.records().items()
                if name in server_uid and record.status == REJECTED}

    def duplicated_uids(self) -> set[str]:
        if not self.case.uidl:
            return set()  # postbote never sees the server's UIDs: every message has a name of its own
        return {uid for uid, count in Counter(self.server.uids()).items() if count > 1}

    def server_uids_by_name(self) -> dict[str, str]:
        """The server's UID of each message on it, by the name postbote knows it by: its UID, or without UIDL the
        digest of its header block (`postbote.plugins.pop3.mailbox`), ``#n`` for the n-th with the same headers."""
        if self.case.uidl:
            return {uid: uid for uid in self.server.uids()}
        names: dict[str, str] = {}
        seen: Counter[str] = Counter()
        for uid, data in self.server.messages():
            name = HEADERS_NAME + hashlib.sha256(header_block(data)).hexdigest()[:NAME_DIGITS]
            seen[name] += 1
            names[name if seen[name] == 1 else f"{name}#{seen[name]}"] = uid
        return names

    def tally(self, plan: PollPlan, result: PollResult) -> None:
        TALLY["polls"] += 1
        TALLY["polls killed"] += result.killed
        TALLY["polls with the state DB locked"] += result.state_locked
        TALLY["destination refusals"] += result.destination_refusals
        for fault in result.server_faults:
            TALLY[f"server fault {fault.fault.name} at {fault.command}"] += 1


def refusals_seen(destination: Destination, plan: PollPlan) -> int:
    """How many of the MDA's scheduled refusals it actually gave in the last poll."""
    attempts = destination.attempts_in_last_poll() or 0
    outcomes = plan.destination_outcomes[destination.index] if plan.destination_outcomes else ()
    return sum(1 for o in outcomes[:attempts] if o is not Outcome.OK)


class _NoTarget:
    """`Rig` wants a target; the model's destinations are configured by the case."""

    def deliver(self) -> list[dict[str, Any]]:
        return []

    def delivered(self) -> list[bytes]:
        return []


# ------------------------------------------------------------------ what the model tests share


def report_tally(request: pytest.FixtureRequest, title: str) -> Iterator[None]:
    """A module fixture's body: counts from nothing, then at the end writes how many cases and polls ran and which
    faults they exercised, and stops the shared servers."""
    TALLY.clear()
    yield
    stop_shared_servers()
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        reporter.write_line(f"{title}: {TALLY['cases']} cases, {TALLY['polls']} polls; exercised:")
        for name, count in sorted(TALLY.items()):
            if name not in ("cases", "polls") and count:
                reporter.write_line(f"  {count:6d}  {name}")


def run_model_case(make_run: Callable[[Path], Any], case: Any, prefix: str) -> None:
    """Run one case in a scratch directory; a broken invariant is raised with the case and its polls' log."""
    TALLY["cases"] += 1
    with tempfile.TemporaryDirectory(prefix=prefix) as scratch:
        run = make_run(Path(scratch))
        try:
            run.run()
        except InvariantBroken as broken:
            raise type(broken)(f"{broken}\n--- case ---\n{case.describe()}\n--- polls ---\n"
                               + "\n".join(run.log)) from None
        finally:
            run.close()
