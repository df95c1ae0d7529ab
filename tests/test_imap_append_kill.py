"""Process death during IMAP APPEND (issue 13): ``postbote poll`` from POP3 into Dovecot by IMAP APPEND, killed with
SIGKILL at chosen points of chosen APPENDs, never loses a message and costs at most one extra copy per kill.

The points (`tests.model.imap_proxy.AppendProxy` sits between postbote and Dovecot and kills the child there):

- ``command``: the APPEND's command line has arrived, its literal not yet (Dovecot never gets the message);
- ``literal``: halfway through the literal (Dovecot gets a cut-short command and drops it);
- ``answer``: Dovecot has stored the message and answered OK, and postbote is killed before it reads the OK: the
  message is in the mailbox but not recorded. The APPENDs go out in a window, several unanswered at once, so a kill
  leaves several such messages; the next poll finds each in the folder (by Message-ID, size and header fields,
  ``message.found_delivered``) instead of delivering it once more. A kill may still cost one copy: of a message
  that cannot be searched for, delivered again (``message.delivering_again``).

Besides those, kills at moments spread over the POP3 session (`tests.test_kill.Chain`) land wherever the poll is:
fetching, appending, recording, deleting. After each kill and after a final clean poll every message is either on
the POP3 server or in bob's mailbox.

The same promise from IMAP to IMAP: alice's INBOX (``protocol: imap``, after_fetch delete) into bob's, killed at
APPEND points; a message whose delivery two kills cut short is held, as postbote promises, and released with
``postbote retry`` as an admin would.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import DovecotFactory
from tests.harness import (
    child_env,
    corpus_message,
    corpus_number,
    held_uids,
    postbote_argv,
    record_figures,
    run_postbote,
)
from tests.kill_harness import Chain, Tally, measure
from tests.model.imap_proxy import AppendProxy, Phase
from tests.servers.dovecot import DovecotServer

pytestmark = [pytest.mark.usefixtures("time_limit"), pytest.mark.dovecot]

TIME_LIMIT = 240.0
MAILBOX = 40
SEED = 20_261_207
# (the n-th APPEND of the run, the point of it), each once
APPEND_POINTS: list[tuple[int, Phase]] = [(1, "command"), (2, "literal"), (3, "answer"), (5, "answer"),
                                          (4, "literal"), (7, "command")]
SESSION_KILLS = 3


class DovecotIMAPTarget:
    """User ``bob``'s INBOX on Dovecot, reached through the APPEND proxy; what arrived is read from the Maildir."""

    def __init__(self, dovecot: DovecotServer, proxy: AppendProxy, user: str = "bob") -> None:
        self.dovecot = dovecot
        self.proxy = proxy
        self.user = user

    def deliver(self) -> dict[str, Any]:
        return {"imap": {"host": self.proxy.host, "port": self.proxy.port, "tls": "none", "username": self.user,
                         "password": self.dovecot.password(self.user), "timeout": "10s"}}

    def delivered(self) -> list[bytes]:
        return self.dovecot.messages(self.user)


def messages() -> list[bytes]:
    return [corpus_message(n, body_lines=20 + (n * 37) % 300) for n in range(1, MAILBOX + 1)]


def kill_at_append(chain: Chain, proxy: AppendProxy, number: int, phase: Phase, tally: Tally,
                   log: Path) -> bool:
    """Run the child poll, SIGKILLed by the proxy at ``phase`` of its ``number``-th APPEND; whether it was."""
    with open(log, "ab") as out:
        child = subprocess.Popen(postbote_argv(chain.config, "poll"), stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=out, env=child_env(), cwd=chain.rig.directory)
    killed: list[Phase] = []

    def at(n: int, point: Phase) -> bool:
        if n == number and point == phase and not killed:
            os.kill(child.pid, signal.SIGKILL)
            killed.append(point)
            return True  # what postbote wrote after this point never reaches Dovecot
        return False

    proxy.reset(at=at)
    try:
        child.wait(timeout=60)
    finally:
        proxy.reset()
        if child.poll() is None:
            child.kill()
            child.wait()
    tally.runs += 1
    if killed:
        tally.kills += 1
        tally.phases[f"APPEND {phase}"] += 1
    else:
        tally.missed += 1
    tally.check(chain.rig.audit())
    return bool(killed)


def test_sigkill_at_every_point_of_an_append_loses_nothing_and_costs_at_most_one_copy_per_kill(
        tmp_path: Path, dovecot_factory: DovecotFactory, request: pytest.FixtureRequest,
        capsys: pytest.CaptureFixture[str]) -> None:
    dovecot = dovecot_factory(tls=False)
    proxy = AppendProxy((dovecot.host, dovecot.imap_port))
    tally = Tally()
    chain: Chain | None = None
    try:
        measured = measure(tmp_path / "measure", DovecotIMAPTarget(dovecot, proxy, "alice"), messages())
        chain = Chain(tmp_path / "chain", DovecotIMAPTarget(dovecot, proxy), messages())
        points: list[tuple[int, Phase] | float] = [*APPEND_POINTS,
                                                   *((k + 0.5) / SESSION_KILLS for k in range(SESSION_KILLS))]
        random.Random(SEED).shuffle(points)
        for point in points:
            if isinstance(point, tuple):
                kill_at_append(chain, proxy, *point, tally, tmp_path / "child.log")
            else:
                chain.run_killed_at(point, measured, tally)
            time.sleep(0.05)  # Dovecot notices the killed session
        audit = chain.finish(tally)
        assert not audit.on_server and audit.undelivered == [], "not every message arrived"
        copies = Counter(corpus_number(data) for data in dovecot.messages("bob"))
        tally.duplicates = sum(max(0, copies[n] - 1) for n in audit.numbers)
    finally:
        proxy.stop()
        if chain is not None:
            chain.server.stop()
    figures = (f"IMAP APPEND kill test: {tally.kills} kills ({tally.missed} polls ended first) in {tally.runs} runs; "
               f"phases {dict(sorted(tally.phases.items()))}; {tally.fates_checked} message fates checked; "
               f"lost {tally.lost}; extra copies {tally.duplicates}; held after two cut-short deliveries "
               f"{tally.held}")
    with capsys.disabled():
        print(f"\n{figures}")
    record_figures(request.node.nodeid, [], kills=tally.kills, faults=tally.kills, messages=tally.fates_checked,
                   lost=tally.lost, duplicates=tally.duplicates)
    assert tally.lost == 0
    assert tally.duplicates <= tally.kills, figures
    # A kill before Dovecot had the whole APPEND costs no copy: only those after its OK, and those in the session.
    session_kills = tally.kills - sum(n for phase, n in tally.phases.items() if phase.startswith("APPEND"))
    assert tally.duplicates <= tally.phases["APPEND answer"] + session_kills, figures
    assert tally.phases["APPEND answer"] >= 1 and tally.phases["APPEND literal"] >= 1, figures
    assert tally.kills >= len(APPEND_POINTS), figures


# ================================================================== IMAP to IMAP

IMAP_MAILBOX = 50  # enough that the last kill point is reached although a window of APPENDs goes out per run
IMAP_POINTS: list[tuple[int, Phase]] = [(2, "answer"), (1, "literal"), (3, "command"), (1, "answer"),
                                        (4, "literal"), (2, "answer")]


class IMAPToIMAP:
    """alice's INBOX (``protocol: imap``, after_fetch delete) delivered into bob's by APPEND, through the proxy."""

    def __init__(self, directory: Path, dovecot: DovecotServer, proxy: AppendProxy) -> None:
        self.directory = directory
        self.dovecot = dovecot
        self.numbers = tuple(range(1, IMAP_MAILBOX + 1))
        for number in self.numbers:
            dovecot.deliver("alice", corpus_message(number, body_lines=20 + (number * 37) % 300))
        directory.mkdir(parents=True, exist_ok=True)
        self.state_dir = directory / "state"
        self.config = directory / "postbote.yaml"
        entry = {"name": "alice", "protocol": "imap", "host": dovecot.host, "port": dovecot.imap_port,
                 "tls": "none", "username": "alice", "password": dovecot.password("alice"), "timeout": "10s",
                 "deliver": DovecotIMAPTarget(dovecot, proxy).deliver()}
        document = {"state_dir": str(self.state_dir), "log": {"level": "debug", "format": "json"},
                    "accounts": [entry]}
        self.config.write_text(yaml.safe_dump(document, sort_keys=False))
        self.config.chmod(0o600)

    def in_inbox(self) -> set[int]:
        return {n for data in self.dovecot.messages("alice") if (n := corpus_number(data)) is not None}

    def copies(self) -> Counter[int | None]:
        return Counter(corpus_number(data) for data in self.dovecot.messages("bob"))

    def check(self) -> Counter[int | None]:
        copies, inbox = self.copies(), self.in_inbox()
        lost = [n for n in self.numbers if n not in inbox and copies[n] == 0]
        assert lost == [], f"messages lost: {lost}"
        return copies

    def held(self) -> list[str]:
        return held_uids(self.state_dir, "alice")

    def finish(self) -> tuple[Counter[int | None], int]:
        """Poll until alice's INBOX is empty, releasing held messages with ``postbote retry`` as an admin would."""
        held = 0
        for _ in range(5):
            run = run_postbote(self.config, "poll", timeout=120)
            stuck = self.held()
            if stuck:
                run_postbote(self.config, "retry", "alice", *stuck, timeout=60)
                held += len(stuck)
                continue
            if run.status == 0 and not self.in_inbox():
                break
            time.sleep(0.5)
        return self.check(), held


def test_sigkill_during_imap_to_imap_appends_loses_nothing_and_costs_at_most_one_copy_per_kill(
        tmp_path: Path, dovecot_factory: DovecotFactory, capsys: pytest.CaptureFixture[str]) -> None:
    dovecot = dovecot_factory(tls=False)
    proxy = AppendProxy((dovecot.host, dovecot.imap_port))
    chain = IMAPToIMAP(tmp_path, dovecot, proxy)
    kills = answer_kills = 0
    try:
        for number, phase in IMAP_POINTS:
            with open(tmp_path / "child.log", "ab") as out:
                child = subprocess.Popen(postbote_argv(chain.config, "poll"), stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=out, env=child_env(), cwd=tmp_path)
            killed: list[int] = []

            def at(n: int, point: Phase, number: int = number, phase: Phase = phase,
                   child: subprocess.Popen[bytes] = child, killed: list[int] = killed) -> bool:
                if (n, point) == (number, phase) and not killed:
                    os.kill(child.pid, signal.SIGKILL)
                    killed.append(n)
                    return True
                return False

            proxy.reset(at=at)
            try:
                child.wait(timeout=60)
            finally:
                proxy.reset()
            kills += bool(killed)
            answer_kills += bool(killed) and phase == "answer"
            chain.check()
            time.sleep(0.05)
        copies, held = chain.finish()
    finally:
        proxy.stop()
    extra = sum(max(0, copies[n] - 1) for n in chain.numbers)
    with capsys.disabled():
        print(f"\nIMAP -> IMAP kill test: {kills} kills at APPEND points; extra copies {extra}; held after two "
              f"cut-short deliveries {held}")
    assert not chain.in_inbox() and all(copies[n] >= 1 for n in chain.numbers)
    assert kills >= len(IMAP_POINTS) - 1
    assert extra <= answer_kills, "only a kill after Dovecot's OK may cost a copy"
