"""A model case: the mailbox, the destinations, and what goes wrong in each poll; and the strategies that make them.

A case is plain data, printed by hypothesis when it fails, so a shrunk case can be pasted into a regular test.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from hypothesis import strategies as st

from tests.model.destinations import Kind, Outcome, imap_available
from tests.model.messages import BODY_PIECES


class ServerFault(enum.Enum):
    DROP = "connection dropped instead of the reply"
    DROP_MIDWAY = "connection dropped midway through the reply"
    GARBAGE = "a line that is not a POP3 reply"
    STALL = "no reply until after the client's timeout"
    STRAY_LINE = "an extra empty line after the message's terminator"
    STRAY_STATUS = "an extra -ERR status line after the message's terminator: the next RETR looks refused"
    RETR_REFUSED = "-ERR to RETR: the message cannot be given now"
    LENIENT_STUFFING = "message sent as stored, dot-stuffed only after CRLF"
    EMPTY_LISTING = "UIDL and LIST list no message"
    QUIT_WITHOUT_COMMIT = "+OK to QUIT, deletions not applied"
    QUIT_REPLY_LOST = "QUIT applied, its reply lost"

    @property
    def makes_the_poll_fail(self) -> bool:
        """Whether the client can tell: a poll that met this fault must not look clean."""
        return self not in (ServerFault.EMPTY_LISTING, ServerFault.QUIT_WITHOUT_COMMIT, ServerFault.LENIENT_STUFFING,
                            ServerFault.RETR_REFUSED,  # logged, the message left for the next poll
                            ServerFault.STRAY_STATUS)  # read as a DELE's refusal, it is harmless and may go unseen


FAULT_COMMANDS: dict[ServerFault, tuple[str, ...]] = {
    ServerFault.DROP: ("UIDL", "LIST", "TOP", "RETR", "DELE", "QUIT"),
    ServerFault.DROP_MIDWAY: ("UIDL", "RETR"),
    ServerFault.GARBAGE: ("UIDL", "TOP", "RETR", "DELE", "QUIT"),
    ServerFault.STALL: ("UIDL", "TOP", "RETR", "DELE", "QUIT"),
    ServerFault.STRAY_LINE: ("RETR",),
    ServerFault.STRAY_STATUS: ("RETR",),
    ServerFault.RETR_REFUSED: ("RETR",),
    ServerFault.LENIENT_STUFFING: ("RETR",),
    ServerFault.EMPTY_LISTING: ("UIDL",),
    ServerFault.QUIT_WITHOUT_COMMIT: ("QUIT",),
    ServerFault.QUIT_REPLY_LOST: ("QUIT",),
}


@dataclass(frozen=True)
class InjectedFault:
    fault: ServerFault
    command: str
    nth: int = 1  # the nth such command of the poll

    def __str__(self) -> str:
        return f"{self.command}#{self.nth}: {self.fault.name}"


class KillPoint(enum.Enum):
    HOOK = "the k-th hook call of the poll (listed, filter, deliver, delivered, finished)"
    COMMAND = "the moment the server receives the k-th POP3 command of the poll"


@dataclass(frozen=True)
class Kill:
    at: KillPoint
    k: int


@dataclass(frozen=True)
class MessageSpec:
    pieces: tuple[str, ...]
    uid: str | None = None  # None: the server makes one; a given one may repeat (a UID listed twice)


@dataclass(frozen=True)
class Arrival:
    """A message arriving before a poll; ``reuse_uid_of``: take that earlier message's UID (and size) if it is
    gone from the server by then, as servers that number UIDs do."""

    pieces: tuple[str, ...]
    reuse_uid_of: int | None = None


@dataclass(frozen=True)
class PollPlan:
    server_faults: tuple[InjectedFault, ...] = ()
    destination_outcomes: tuple[tuple[Outcome, ...], ...] = ()  # per destination: its attempts in this poll
    state_locked_at: int | None = None  # hook step at which another process takes the state DB's write lock
    kill: Kill | None = None
    arrivals: tuple[Arrival, ...] = ()

    @property
    def destination_faults(self) -> bool:
        return any(o is not Outcome.OK for outcomes in self.destination_outcomes for o in outcomes)

    @property
    def clean(self) -> bool:
        return not (self.server_faults or self.destination_faults or self.state_locked_at is not None or self.kill)


@dataclass(frozen=True)
class Case:
    messages: tuple[MessageSpec, ...]
    destinations: tuple[Kind, ...]
    keep: bool
    raw_line_endings: bool  # the server sends stored bytes as they are (sizes are raw sizes)
    polls: tuple[PollPlan, ...] = field(default=())
    uidl: bool = True  # False: an old server without UIDL (-ERR, not in CAPA); postbote names messages by digest

    def describe(self) -> str:
        lines = [f"destinations {[k.value for k in self.destinations]}, keep={self.keep}, "
                 f"raw_line_endings={self.raw_line_endings}{'' if self.uidl else ', server without UIDL'}",
                 *(f"message {i}: uid={m.uid} {list(m.pieces)}" for i, m in enumerate(self.messages))]
        for number, poll in enumerate(self.polls, start=1):
            parts = [str(f) for f in poll.server_faults]
            parts += [f"dest {i}: {[o.value for o in outcomes]}" for i, outcomes in
                      enumerate(poll.destination_outcomes) if any(o is not Outcome.OK for o in outcomes)]
            if poll.state_locked_at is not None:
                parts.append(f"state locked at step {poll.state_locked_at}")
            if poll.kill:
                parts.append(f"SIGKILL at {poll.kill.at.name} {poll.kill.k}")
            parts += [f"arrives {list(a.pieces)} reusing uid of {a.reuse_uid_of}" for a in poll.arrivals]
            lines.append(f"poll {number}: " + ("; ".join(parts) or "clean"))
        return "\n".join(lines)


# ------------------------------------------------------------------ strategies

pieces = st.lists(st.sampled_from(sorted(BODY_PIECES)), max_size=6).map(tuple)
outcomes = st.sampled_from(Outcome)
kinds = st.sampled_from([kind for kind in Kind if kind is not Kind.IMAP or imap_available()])


@st.composite
def injected_faults(draw: st.DrawFn) -> InjectedFault:
    fault = draw(st.sampled_from(ServerFault))
    return InjectedFault(fault, draw(st.sampled_from(FAULT_COMMANDS[fault])), draw(st.integers(1, 3)))


def destination_schedule(kind: Kind) -> st.SearchStrategy[tuple[Outcome, ...]]:
    choices = [Outcome.OK, Outcome.TEMPORARY, Outcome.PERMANENT]
    if not kind.refused_by_plugin:
        choices.append(Outcome.CRASH)
    weighted = st.one_of(st.just(Outcome.OK), st.sampled_from(choices))
    return st.lists(weighted, max_size=4).map(tuple)


@st.composite
def poll_plans(draw: st.DrawFn, destinations: tuple[Kind, ...], message_count: int) -> PollPlan:
    arrivals = draw(st.lists(st.builds(Arrival, pieces, st.one_of(st.none(), st.integers(0, message_count - 1))),
                             max_size=2))
    return PollPlan(
        server_faults=tuple(draw(st.lists(injected_faults(), max_size=2))),
        destination_outcomes=tuple(draw(destination_schedule(kind)) for kind in destinations),
        state_locked_at=draw(st.one_of(st.none(), st.none(), st.integers(0, 12))),
        kill=draw(st.one_of(st.none(), st.none(), st.none(),
                            st.builds(Kill, st.sampled_from(KillPoint), st.integers(1, 25)))),
        arrivals=tuple(arrivals))


@st.composite
def cases(draw: st.DrawFn) -> Case:
    destinations = tuple(draw(st.lists(kinds, min_size=1, max_size=3)))
    messages = draw(st.lists(st.builds(MessageSpec, pieces, st.one_of(st.none(), st.none(), st.none(),
                                                                      st.sampled_from(["same-1", "same-2"]))),
                             min_size=1, max_size=5))
    polls = draw(st.lists(poll_plans(destinations, len(messages)), min_size=1, max_size=4))
    return Case(tuple(messages), destinations, keep=draw(st.booleans()), raw_line_endings=draw(st.booleans()),
                polls=tuple(polls), uidl=draw(st.sampled_from([True, True, True, False])))
