"""What the model knows was sent where, and the invariants every poll must keep.

1. No message leaves the server before every destination of its list holds its exact bytes.
2. Per destination, a message has at most 1 + (polls that handled it and crashed or lost the state store in the
   middle) copies: a refusal elsewhere, a server fault, a locked state store from the start never cost a copy.
3. After the faults stop, a few clean polls deliver everything deliverable and (without ``keep``) empty the server;
   only rejected messages, and messages whose UID the server lists twice, stay.
4. A poll that met a fault it could see does not look clean (no error, nothing deferred, nothing rejected).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from tests.model.destinations import Destination, Kind
from tests.model.messages import canonical, ident_of


class InvariantBroken(AssertionError):
    """An invariant failed; each kind its own class, so that hypothesis reports (and shrinks) each kind apart."""


class LostMail(InvariantBroken):
    pass


class Duplicated(InvariantBroken):
    pass


class Stuck(InvariantBroken):
    pass


class HiddenFault(InvariantBroken):
    pass


class CorruptCopy(InvariantBroken):
    pass


class DeletedDespiteKeep(InvariantBroken):
    pass


@dataclass
class Sent:
    ident: int
    uid: str
    canonical: bytes
    on_server: bool = True
    risky_polls: int = 0  # polls that handled it and were killed, or lost the state store midway


@dataclass
class Ledger:
    destinations: list[Destination]
    keep: bool
    sent: dict[int, Sent] = field(default_factory=dict)
    partial_copies: int = 0  # MDA inputs cut short by a kill (the MDA cannot tell: no end marker on a pipe)

    def add(self, ident: int, uid: str, wire: bytes) -> None:
        self.sent[ident] = Sent(ident, uid, canonical(wire))

    def copies(self, *, kills_so_far: int) -> dict[str, Counter[int]]:
        """Exact copies per destination label, by message; any copy that is not an exact original is a finding
        (except an MDA's input cut short by a killed postbote)."""
        result: dict[str, Counter[int]] = {}
        for destination in self.destinations:
            counts: Counter[int] = Counter()
            partial = 0
            for data in destination.copies():
                ident = ident_of(data)
                sent = self.sent.get(ident) if ident is not None else None
                if sent is not None and canonical(data) == sent.canonical:
                    counts[sent.ident] += 1
                elif destination.kind is Kind.MDA and kills_so_far and sent is not None and \
                        sent.canonical.startswith(canonical(data)):
                    partial += 1
                else:
                    raise CorruptCopy(
                        f"{destination.label} holds a copy that is no original's exact bytes (message {ident}):"
                        f"\n got      {canonical(data)[:300]!r}\n expected "
                        f"{sent.canonical[:300] if sent else None!r}")
            self.partial_copies = max(self.partial_copies, partial)
            result[destination.label] = counts
        return result

    def after_poll(self, on_server: set[int], risky: bool, kills_so_far: int) -> dict[str, Counter[int]]:
        """Invariants 1 and 2 after a poll; ``on_server``: the idents the server holds now."""
        copies = self.copies(kills_so_far=kills_so_far)
        for sent in self.sent.values():
            if sent.on_server and risky:
                sent.risky_polls += 1
        for sent in self.sent.values():
            if sent.on_server and sent.ident not in on_server:
                sent.on_server = False
                if self.keep:
                    raise DeletedDespiteKeep(f"message {sent.ident} (uid {sent.uid}) was deleted with keep: true")
                missing = [label for label, counts in copies.items() if counts[sent.ident] == 0]
                if missing:
                    raise LostMail(f"LOST: message {sent.ident} (uid {sent.uid}) was deleted on the server "
                                          f"but never reached {', '.join(missing)}")
        for label, counts in copies.items():
            for ident, count in counts.items():
                allowed = 1 + self.sent[ident].risky_polls
                if count > allowed:
                    raise Duplicated(f"DUPLICATES: {label} holds {count} copies of message {ident} (uid "
                                          f"{self.sent[ident].uid}); at most {allowed} allowed by the crashes and "
                                          "state failures it met")
        return copies

    def unsettled(self, copies: dict[str, Counter[int]], rejected_uids: set[str],
                  duplicated_uids: set[str]) -> list[str]:
        """Invariant 3: what is still neither delivered everywhere (and, without keep, deleted) nor rejected."""
        problems = []
        for sent in self.sent.values():
            if sent.on_server and (sent.uid in rejected_uids or sent.uid in duplicated_uids):
                continue
            missing = [label for label, counts in copies.items() if counts[sent.ident] == 0]
            if missing:
                problems.append(f"message {sent.ident} (uid {sent.uid}) never reached {', '.join(missing)}")
            elif sent.on_server and not self.keep:
                problems.append(f"message {sent.ident} (uid {sent.uid}) delivered but still on the server")
        return problems
