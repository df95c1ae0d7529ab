"""Checking a run: every corpus message arrived exactly once, unaltered, and the mailbox is empty.

Each delivered file is matched to its corpus message by Message-ID and compared after two normalisations:
CRLF (the SMTP wire) becomes LF (the on-disk convention of the corpus and of Maildir), and the leading block
of trace fields -- ``Received:``, ``Return-Path:``, ``Delivered-To:``, ``X-*:`` with their continuation
lines -- is set aside. Then:

* everything after the trace block (all other header fields and the body) must be identical byte for byte;
* the original's ``Received:`` (and other trace) fields must all still be in the trace block, unchanged and
  in order. Tools may add their own anywhere in the block (fetchmail keeps ``Return-Path:`` on top and adds
  its ``Received:`` below it). ``Return-Path:`` is ignored: it belongs to the envelope, and a forwarder
  that turns it into ``MAIL FROM`` and drops the field (fetchmail, as RFC 5321 4.4 expects of a relay) is
  right.

A message whose header fields differ only in folding (getmail6 re-folds long ``Subject:`` lines through
Python's email package) is counted as *refolded*: equal once unfolded (RFC 5322 2.2.3), reported as a note,
not a failure. Anything else -- a missing, duplicated, altered or unknown message, mail left on the server --
makes the run fail, and the table says why.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from bench.corpus import MESSAGE_ID, Corpus

TRACE_FIELD = re.compile(rb"(?:Received|Return-Path|Delivered-To|X-[A-Za-z0-9-]+):", re.IGNORECASE)
RETURN_PATH = re.compile(rb"Return-Path:", re.IGNORECASE)
FOLD = re.compile(rb"\n(?=[ \t])")
HEADER_SCAN = 1 << 16


class Match(Enum):
    EXACT = "exact"
    REFOLDED = "refolded"
    ALTERED = "altered"


@dataclass
class Verdict:
    expected: int
    delivered: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def maildir_files(maildirs: Iterable[Path]) -> list[Path]:
    return [path for maildir in maildirs for sub in ("new", "cur") if (maildir / sub).is_dir()
            for path in (maildir / sub).iterdir() if path.is_file()]


def split_trace(data: bytes) -> tuple[list[bytes], bytes]:
    """The leading trace fields (each with its continuation lines) and the rest of the message."""
    fields: list[bytes] = []
    position = 0
    while TRACE_FIELD.match(data, position):
        end = position
        while True:
            newline = data.find(b"\n", end)
            if newline < 0:
                return fields, data[position:]
            end = newline + 1
            if data[end:end + 1] not in (b" ", b"\t"):
                break
        fields.append(data[position:end])
        position = end
    return fields, data[position:]


def is_subsequence(needles: list[bytes], haystack: list[bytes]) -> bool:
    remaining = iter(haystack)
    return all(any(needle == item for item in remaining) for needle in needles)


def _unfold(header: bytes) -> bytes:
    return FOLD.sub(b"", header)


def compare(delivered: bytes, original: bytes) -> Match:
    delivered_trace, delivered_rest = split_trace(delivered)
    original_trace = [f for f in split_trace(original)[0] if not RETURN_PATH.match(f)]
    original_rest = split_trace(original)[1]
    if delivered_rest == original_rest and is_subsequence(original_trace, delivered_trace):
        return Match.EXACT
    delivered_head, _, delivered_body = delivered_rest.partition(b"\n\n")
    original_head, _, original_body = original_rest.partition(b"\n\n")
    if (delivered_body == original_body and _unfold(delivered_head) == _unfold(original_head)
            and is_subsequence([_unfold(f) for f in original_trace], [_unfold(f) for f in delivered_trace])):
        return Match.REFOLDED
    return Match.ALTERED


def verify(corpus: Corpus, files: Iterable[Path], *, crlf: bool, left_on_server: int) -> Verdict:
    expected = corpus.by_id()
    verdict = Verdict(expected=len(expected))
    seen: Counter[bytes] = Counter()
    matches: Counter[Match] = Counter()
    unknown = 0
    for path in files:
        data = path.read_bytes()
        if crlf:
            data = data.replace(b"\r\n", b"\n")
        found = MESSAGE_ID.search(data, 0, min(len(data), HEADER_SCAN))
        original = expected.get(found.group(1)) if found else None
        if original is None:
            unknown += 1
            continue
        seen[original.message_id] += 1
        matches[compare(data, original.data)] += 1
    verdict.delivered = sum(seen.values())
    missing = len(expected) - len(seen)
    duplicates = sum(count - 1 for count in seen.values())
    for count, what in ((missing, "missing"), (duplicates, "duplicated"), (matches[Match.ALTERED], "altered"),
                        (unknown, "unknown files"), (left_on_server, "left on the server")):
        if count:
            verdict.problems.append(f"{count} {what}")
    if matches[Match.REFOLDED]:
        verdict.notes.append(f"{matches[Match.REFOLDED]} with header fields re-folded")
    return verdict
