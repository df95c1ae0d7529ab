"""The SIGKILL chains the kill tests share (POP3 here; the IMAP APPEND kill test reuses them): one mailbox, one
destination, one state directory, a child ``postbote poll`` killed again and again, and the tally of what each
kill cost."""

from __future__ import annotations

import gc
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from postbote.state import REJECTED
from postbote.testing.pop3server import POP3Server

from tests.harness import (
    Audit,
    MaildirTarget,
    Rig,
    Target,
    child_env,
    corpus_message,
    postbote_argv,
    run_postbote,
)

MAILBOX = 300
STARTUP_SHARE = 0.1  # kill points below this fraction fall into the start-up
SEED = 20_240_601


def mailbox() -> list[bytes]:
    """300 messages of 1-20 kB, so that batches end at different points when the kill lands."""
    return [corpus_message(n, body_lines=40 + (n * 37) % 700) for n in range(1, MAILBOX + 1)]


def phase_of(commands: list[str]) -> str:
    """Where in the POP3 session the child was when it died, from the commands the server received."""
    verbs = [command.split(" ", 1)[0].upper() for command in commands]
    if "QUIT" in verbs:
        return "at QUIT"
    if "DELE" in verbs:
        return "fetching and deleting"
    if "RETR" in verbs:
        return "fetching"
    if "UIDL" in verbs or "LIST" in verbs:
        return "listing"
    if verbs:
        return "logging in"
    return "starting up"


def kill_poll_when(config: Path, directory: Path, due: Callable[[float], bool]) -> bool:
    """Run ``postbote poll`` on ``config`` and SIGKILL it as soon as ``due(seconds since its start)``; whether it
    was killed (False: the poll ended first). A poll that reaches no kill point within a minute fails the test."""
    # No cyclic collection while watching: late in a suite the test process's heap is large, and one full pass
    # stalled this loop long enough for a poll to run past its kill point (or to its end).
    collecting = gc.isenabled()
    gc.disable()
    try:
        with open(directory / "child.log", "ab") as log:
            child = subprocess.Popen(postbote_argv(config, "poll"), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                     env=child_env(), cwd=directory)
            started = time.monotonic()
            while child.poll() is None:
                elapsed = time.monotonic() - started
                if due(elapsed) or elapsed > 60:
                    child.kill()  # SIGKILL
                    child.wait(timeout=30)
                    if elapsed > 60:
                        pytest.fail("a poll ran for a minute without reaching its kill point")
                    return True
                time.sleep(0.0005)
        return False
    finally:
        if collecting:
            gc.enable()


@dataclass
class Tally:
    kills: int = 0
    missed: int = 0
    runs: int = 0
    fates_checked: int = 0
    duplicates: int = 0
    lost: int = 0
    phases: Counter[str] = field(default_factory=Counter)
    stray_tmp_files: int = 0
    held: int = 0  # messages held after two deliveries cut short by kills, released with `postbote retry`

    def check(self, audit: Audit) -> None:
        self.fates_checked += len(audit.numbers)
        self.lost += len(audit.lost)


@dataclass(frozen=True)
class Measured:
    """An uninterrupted child poll of a full mailbox: how long it took, its start-up, the commands it sent."""

    seconds: float
    startup: float
    commands: int
    messages: int = MAILBOX

    @property
    def fixed_commands(self) -> int:
        """Commands that do not depend on the messages (log-in, listing, QUIT)."""
        return self.commands - 2 * self.messages


class Chain:
    """One mailbox, one destination, one state directory; the child postbote runs against them again and again."""

    def __init__(self, directory: Path, target: Target, messages: list[bytes] | None = None,
                 **account: Any) -> None:
        self.server = POP3Server(mailbox() if messages is None else messages).start()
        self.rig = Rig(directory, self.server, target)
        self.config = self.rig.configure(timeout="10s", **account)

    def commands_left(self, measured: Measured) -> int:
        """Commands a poll would send now: the fixed ones, a RETR per message not yet delivered, a DELE per
        message still on the server."""
        audit = self.rig.audit()
        return measured.fixed_commands + len(audit.undelivered) + len(audit.on_server)

    def run_killed_at(self, fraction: float, measured: Measured, tally: Tally) -> None:
        seen_before = len(self.server.commands)
        if fraction < STARTUP_SHARE:
            delay: float | None = measured.startup * fraction / STARTUP_SHARE
            commands: int | None = None
        else:
            delay = None
            share = (fraction - STARTUP_SHARE) / (1 - STARTUP_SHARE)
            commands = max(1, round(share * self.commands_left(measured)))
        def due(elapsed: float) -> bool:
            if delay is not None:
                return elapsed >= delay
            return len(self.server.commands) - seen_before >= (commands or 0)

        if kill_poll_when(self.config, self.rig.directory, due):
            tally.kills += 1
            tally.phases[phase_of(self.server.commands[seen_before:])] += 1
        else:
            tally.missed += 1  # the poll ended before its kill point
        tally.runs += 1
        tally.check(self.rig.audit())

    def finish(self, tally: Tally, *, keep: bool = False) -> Audit:
        for _ in range(4):
            run = run_postbote(self.config, "poll", timeout=60)
            tally.runs += 1
            held = self.held()  # held by this poll or an earlier one (a killed one, say)
            if run.status == 0 and not held and (keep or not self.server.uids()):
                break
            if held:
                # The admin's part: two kills cut the same delivery short, so postbote held the message (it may be
                # there twice already) and `status` shows it; after a look at the destination, it is retried.
                run_postbote(self.config, "retry", "test", *held, timeout=60)
                tally.held += len(held)
                continue
            time.sleep(0.5)  # the server had not yet noticed the killed session and said [IN-USE]
        audit = self.rig.audit()
        tally.check(audit)
        if isinstance(self.rig.target, MaildirTarget):
            tally.stray_tmp_files += len(self.rig.target.files("tmp"))
        return audit

    def held(self) -> list[str]:
        return [uid for uid, record in self.rig.records().items()
                if record.status == REJECTED and "ended without an answer" in record.reason]


TargetFactory = Callable[[str, Path], Target]


def measure(directory: Path, target: Target, messages: list[bytes] | None = None, **account: Any) -> Measured:
    chain = Chain(directory, target, messages, **account)
    try:
        startup = run_postbote(chain.config, "check", timeout=60).duration
        run = run_postbote(chain.config, "poll", timeout=60)
        assert run.status == 0, run.output
        audit = chain.rig.audit()
        assert audit.delivered_once == list(audit.numbers) and (account.get("keep") or not audit.on_server)
        return Measured(run.duration, startup, len(chain.server.commands), len(chain.rig.numbers))
    finally:
        chain.server.stop()
