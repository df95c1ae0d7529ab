"""Process death: ``postbote poll`` killed with SIGKILL at many points of a large poll never loses a message.

Four chains each start with a mailbox of 300 messages (two deliver into a Maildir, one over SMTP to the aiosmtpd
sink, whose answers to DATA postbote reads late, and one to a server offering CHUNKING, to which each message goes
as one pipelined MAIL, RCPT and BDAT). In a chain, ``python -m postbote poll`` runs as a child and is killed with
SIGKILL, five times at five different points, and then runs once more to completion. After every run, killed or
not, each message must be on the server or delivered; duplicates are counted and may be at most one per kill --
the promise: a crash costs at worst one duplicate, never a loss.

Kill points are spread over a whole poll, measured first: an uninterrupted poll of a full mailbox gives the time
the start-up takes and the number of POP3 commands a poll sends. A point in the first tenth is a moment in the
start-up (interpreter, config, state); any other point is the moment the server has received that share of the
commands the poll still has to send (logging in, listing, RETR and DELE interleaved, QUIT). Counting commands
instead of seconds makes every kill land inside the poll however fast or slow the machine is.

The figures (kills, the phases they hit, message fates checked, lost, duplicates) are printed at the end and, with
``POSTBOTE_FIGURES=FILE``, appended to that file for docs/reliability.md.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from postbote.plugins.mbox import mboxrd_messages

from tests.harness import (
    FaultyTarget,
    MaildirTarget,
    SinkTarget,
    Target,
    corpus_message,
    corpus_number,
    record_figures,
)
from tests.kill_harness import MAILBOX, SEED, Chain, Tally, TargetFactory, measure
from tests.servers.dovecot import DovecotServer
from tests.servers.faulty_smtp import FaultySMTP
from tests.servers.smtp_sink import SMTPSink

pytestmark = pytest.mark.usefixtures("time_limit")

TIME_LIMIT = 150.0
CHAINS = ("maildir", "smtp", "maildir", "bdat")
KILLS_PER_CHAIN = 5


@pytest.fixture
def new_target() -> Iterator[TargetFactory]:
    """A fresh destination of a chain's kind: a Maildir, the aiosmtpd sink, or a CHUNKING server."""
    servers: list[SMTPSink | FaultySMTP] = []

    def make(kind: str, directory: Path) -> Target:
        if kind == "maildir":
            return MaildirTarget(directory / "Maildir")
        if kind == "smtp":
            sink = SMTPSink()
            sink.start()
            servers.append(sink)
            return SinkTarget(sink)
        server = FaultySMTP(chunking=True).start()
        servers.append(server)
        return FaultyTarget(server, timeout="10s")

    yield make
    for server in servers:
        server.stop()


def test_sigkill_at_many_points_of_a_large_poll_loses_nothing_and_costs_at_most_one_duplicate_per_kill(
        tmp_path: Path, new_target: TargetFactory, request: pytest.FixtureRequest,
        capsys: pytest.CaptureFixture[str]) -> None:
    measured = {kind: measure(tmp_path / f"measure-{kind}", new_target(kind, tmp_path / f"measure-{kind}"))
                for kind in sorted(set(CHAINS))}
    points = [(k + 1) / (len(CHAINS) * KILLS_PER_CHAIN) for k in range(len(CHAINS) * KILLS_PER_CHAIN)]  # to 1: QUIT
    random.Random(SEED).shuffle(points)
    tally = Tally()
    chains: list[Chain] = []
    try:
        for index, kind in enumerate(CHAINS):
            directory = tmp_path / f"chain{index}-{kind}"
            chain = Chain(directory, new_target(kind, directory))
            chains.append(chain)
            kills_before = tally.kills
            for point in points[index * KILLS_PER_CHAIN:(index + 1) * KILLS_PER_CHAIN]:
                chain.run_killed_at(point, measured[kind], tally)
            audit = chain.finish(tally)
            assert not audit.on_server and audit.undelivered == [], f"chain {index}: not every message arrived"
            tally.duplicates += audit.duplicates
            assert audit.duplicates <= tally.kills - kills_before, f"chain {index}: more duplicates than kills"
    finally:
        for chain in chains:
            chain.server.stop()

    figures = (f"kill test: {tally.kills} kills ({tally.missed} polls ended first) in {tally.runs} runs; "
               f"phases {dict(sorted(tally.phases.items()))}; {tally.fates_checked} message fates checked; "
               f"lost {tally.lost}; duplicates {tally.duplicates}; an uninterrupted poll of {MAILBOX}: "
               + ", ".join(f"{kind} {m.seconds:.2f} s ({m.startup:.2f} s start-up, {m.commands} commands)"
                           for kind, m in measured.items())
               + f"; files left in Maildir tmp/ by killed polls: {tally.stray_tmp_files}")
    with capsys.disabled():
        print(f"\n{figures}")
    record_figures(request.node.nodeid, [], kills=tally.kills, faults=tally.kills,
                   messages=tally.fates_checked, lost=tally.lost, duplicates=tally.duplicates)
    assert tally.lost == 0
    assert tally.kills >= len(points) - 2, figures
    assert tally.duplicates <= tally.kills


# ================================================================== every destination kind, and a list

SMALL_MAILBOX = 60
KILLS_PER_KIND = 3

# An MDA that keeps each input it read to the end in a file of its own (as procmail would deliver it).
MDA_SCRIPT = """#!/bin/sh
here=$(dirname "$0")
cat > "$here/incoming.$$" && mv "$here/incoming.$$" "$here/copies/$$.$(date +%s%N)"
"""


class MboxTarget:
    def __init__(self, path: Path) -> None:
        self.path = path

    def deliver(self) -> dict[str, Any]:
        return {"mbox": str(self.path)}

    def delivered(self) -> list[bytes]:
        return mboxrd_messages(self.path.read_bytes()) if self.path.exists() and self.path.stat().st_size else []


class MdaTarget:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        (directory / "copies").mkdir(parents=True)
        self.script = directory / "deliver.sh"
        self.script.write_text(MDA_SCRIPT)
        self.script.chmod(0o755)

    def deliver(self) -> dict[str, Any]:
        return {"mda": [str(self.script)]}

    def delivered(self) -> list[bytes]:
        return [file.read_bytes() for file in sorted((self.directory / "copies").iterdir())]


class DovecotLmtpTarget:
    """Dovecot's own LMTP service, delivering into the Maildir of ``user``."""

    def __init__(self, dovecot: DovecotServer, user: str) -> None:
        self.dovecot = dovecot
        self.user = user

    def deliver(self) -> dict[str, Any]:
        return {"lmtp": {"host": self.dovecot.host, "port": self.dovecot.lmtp_port, "recipients": [self.user],
                         "timeout": "10s"}}

    def delivered(self) -> list[bytes]:
        return self.dovecot.messages(self.user)


class ListTarget:
    """Several destinations for every message (``deliver: [...]``); each must end up with every message."""

    def __init__(self, parts: list[Target]) -> None:
        self.parts = parts

    def deliver(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return [part.deliver() for part in self.parts]

    def delivered(self) -> list[bytes]:
        """The first destination's copies (the audit's view); `copies_per_destination` checks them all."""
        return self.parts[0].delivered()


def copies_per_destination(target: Target) -> list[Counter[int | None]]:
    parts = target.parts if isinstance(target, ListTarget) else [target]
    return [Counter(corpus_number(data) for data in part.delivered()) for part in parts]


KINDS: dict[str, dict[str, Any]] = {"mbox": {}, "mda": {}, "lmtp": {}, "maildir, mda, smtp": {},
                                    "maildir, mda, smtp with keep": {"keep": True}}


@pytest.mark.parametrize("kind", [pytest.param(kind, marks=[pytest.mark.dovecot] if kind == "lmtp" else [])
                                  for kind in KINDS])
def test_sigkill_during_a_poll_to_each_destination_kind_and_to_a_list_loses_nothing_and_costs_one_copy_per_kill(
        tmp_path: Path, kind: str, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]) -> None:
    """After each kill and a final clean poll, every message is in every destination, with at most one extra copy
    per destination per kill, and nothing is left on the server (everything, with keep)."""
    account = KINDS[kind]
    sinks: list[SMTPSink] = []
    dovecot: DovecotServer | None = None
    if kind == "lmtp":  # only this case needs (and starts) a Dovecot; the measuring run delivers to alice
        dovecot = request.getfixturevalue("dovecot_factory")(tls=False)

    def target(directory: Path) -> Target:
        directory.mkdir(parents=True, exist_ok=True)
        if kind == "mbox":
            return MboxTarget(directory / "mbox")
        if kind == "mda":
            return MdaTarget(directory / "mda")
        if dovecot is not None:
            return DovecotLmtpTarget(dovecot, "alice" if directory.name == "measure" else "bob")
        sink = SMTPSink()
        sink.start()
        sinks.append(sink)
        parts: list[Target] = [MaildirTarget(directory / "Maildir"), MdaTarget(directory / "mda"), SinkTarget(sink)]
        return ListTarget(parts)  # type: ignore[return-value]

    messages = [corpus_message(n, body_lines=20 + (n * 37) % 300) for n in range(1, SMALL_MAILBOX + 1)]
    tally = Tally()
    chain: Chain | None = None
    try:
        measured = measure(tmp_path / "measure", target(tmp_path / "measure"), messages, **account)
        chain = Chain(tmp_path / "chain", target(tmp_path / "chain"), messages, **account)
        points = [(k + 0.5) / KILLS_PER_KIND for k in range(KILLS_PER_KIND)]
        random.Random(f"{SEED}-{kind}").shuffle(points)
        for point in points:
            chain.run_killed_at(point, measured, tally)
        audit = chain.finish(tally, keep=bool(account.get("keep")))
        assert audit.on_server == (audit.numbers if account.get("keep") else ()), "the server's mailbox is wrong"
        for index, copies in enumerate(copies_per_destination(chain.rig.target)):
            missing = [n for n in audit.numbers if copies[n] == 0]
            extra = sum(max(0, copies[n] - 1) for n in audit.numbers)
            assert not missing, f"destination {index} never got messages {missing}"
            assert extra <= tally.kills, f"destination {index}: {extra} extra copies after {tally.kills} kills"
            tally.duplicates += extra
    finally:
        if chain is not None:
            chain.server.stop()
        for sink in sinks:
            sink.stop()
    with capsys.disabled():
        print(f"\nkill test ({kind}): {tally.kills} kills ({tally.missed} polls ended first) in {tally.runs} runs; "
              f"phases {dict(sorted(tally.phases.items()))}; lost {tally.lost}; extra copies {tally.duplicates}; "
              f"held after two cut-short deliveries {tally.held}")
    record_figures(request.node.nodeid, [], kills=tally.kills, faults=tally.kills, messages=tally.fates_checked,
                   lost=tally.lost, duplicates=tally.duplicates)
    assert tally.lost == 0
    assert tally.kills >= KILLS_PER_KIND - 1, "the polls ended before their kill points: the test proves little"
