"""Turning individual runs into the table: medians per (mode, tool), ratios to postbote, the issue's targets."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

REFERENCE = "postbote"


@dataclass
class RunRecord:
    """One measured run of one tool in one mode."""

    mode: str
    tool: str
    repetition: int
    messages: int
    octets: int
    wall: float = 0.0
    peak_rss_kb: int = 0
    exit_codes: list[int] = field(default_factory=list)
    timed_out: bool = False
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None

    @property
    def ok(self) -> bool:
        return self.skipped is None and not self.problems

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "ok": self.ok}


@dataclass
class Row:
    mode: str
    tool: str
    messages: int
    runs: int
    verified: int
    wall: float | None = None
    msgs_per_s: float | None = None
    mb_per_s: float | None = None
    peak_rss_mb: float | None = None
    postbote_ratio: float | None = None  # postbote's msg/s divided by this row's
    status: str = "ok"
    walls: list[float] = field(default_factory=list)


def summarise(records: Iterable[RunRecord]) -> list[Row]:
    """One row per (mode, tool), in the order they first ran; figures from verified runs only."""
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for record in records:
        groups.setdefault((record.mode, record.tool), []).append(record)
    rows = [_row(mode, tool, runs) for (mode, tool), runs in groups.items()]
    _add_ratios(rows)
    return rows


def _row(mode: str, tool: str, runs: list[RunRecord]) -> Row:
    good = [r for r in runs if r.ok]
    row = Row(mode, tool, runs[0].messages, len(runs), len(good))
    skipped = [r.skipped for r in runs if r.skipped]
    failed = [r for r in runs if not r.ok and not r.skipped]
    if skipped and len(skipped) == len(runs):
        row.status = f"not run: {skipped[0]}"
    elif failed:
        row.status = f"FAILED {len(failed)}/{len(runs)}: {'; '.join(failed[0].problems)}"
    notes = sorted({note for r in good for note in r.notes})
    if notes:
        row.status += f" ({'; '.join(notes)})"
    if good:
        row.walls = [r.wall for r in good]
        row.wall = statistics.median(row.walls)
        row.msgs_per_s = good[0].messages / row.wall
        row.mb_per_s = good[0].octets / 1e6 / row.wall
        row.peak_rss_mb = max(r.peak_rss_kb for r in good) / 1024
    return row


def _add_ratios(rows: list[Row]) -> None:
    reference = {row.mode: row for row in rows if row.tool == REFERENCE}
    for row in rows:
        ref = reference.get(row.mode)
        if ref and ref.msgs_per_s and row.msgs_per_s:
            row.postbote_ratio = ref.msgs_per_s / row.msgs_per_s


def _number(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def format_table(rows: Sequence[Row]) -> str:
    """A Markdown table (readable as plain text too)."""
    header = ["tool", "mode", "N", "wall s (median)", "msg/s", "MB/s", "peak RSS MB", "postbote ×", "runs", "check"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * 7 + ["---"]) + "|"]
    for row in rows:
        spread = f" ({min(row.walls):.2f}–{max(row.walls):.2f})" if len(row.walls) > 1 else ""
        cells = [row.tool, row.mode, f"{row.messages:,}", _number(row.wall, 2) + spread,
                 _number(row.msgs_per_s, 1 if (row.msgs_per_s or 0) < 10 else 0),
                 _number(row.mb_per_s, 1), _number(row.peak_rss_mb, 1),
                 "–" if row.postbote_ratio is None else f"{row.postbote_ratio:.2f}",
                 f"{row.verified}/{row.runs}", row.status]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Target:
    """One of the issue's targets: postbote's msg/s at least ``factor`` × the other row's (or an RSS bound)."""

    mode: str
    other: str
    factor: float
    text: str


TARGETS = (
    Target("maildir", "mpop", 1.5, "Maildir, loopback: ≥ 1.5× mpop"),
    Target("smtp-prompt", "fetchmail", 2.0, "SMTP, prompt sink: ≥ 2× fetchmail"),
    Target("smtp-delayed-ack", "fetchmail", 10.0, "SMTP, delayed-ACK sink: ≥ 10× fetchmail"),
    Target("latency-maildir", "mpop", 1.0, "20 ms RTT, Maildir: ≥ 1.0× mpop"),
    Target("latency-maildir", "fetchmail", 10.0, "20 ms RTT, Maildir: ≥ 10× fetchmail"),
    Target("latency-maildir", "getmail6", 10.0, "20 ms RTT, Maildir: ≥ 10× getmail6"),
    Target("latency-smtp", "mpop+msmtp", 1.0, "20 ms RTT, SMTP: ≥ 1.0× mpop+msmtp"),
    Target("latency-smtp", "fetchmail", 10.0, "20 ms RTT, SMTP: ≥ 10× fetchmail"),
    Target("latency-smtp", "getmail6+msmtp", 10.0, "20 ms RTT, SMTP: ≥ 10× getmail6+msmtp"),
    Target("many-accounts", "postbote sequential", 5.0, "100×50 at 20 ms RTT: ≥ 5× the accounts one after another"),
)
BIG_RSS_LIMIT_MB = 64.0


def check_targets(rows: Sequence[Row]) -> list[str]:
    """A line per target that this run measured: the ratio found and whether it is met."""
    by_key = {(row.mode, row.tool): row for row in rows}
    lines = []
    for target in TARGETS:
        row = by_key.get((target.mode, target.other))
        if row is None or (target.mode, REFERENCE) not in by_key:
            continue
        if row.postbote_ratio is None:
            lines.append(f"- {target.text}: not measurable in this run ({row.status})")
            continue
        verdict = "met" if row.postbote_ratio >= target.factor else "NOT met"
        lines.append(f"- {target.text}: {row.postbote_ratio:.2f}× — {verdict}")
    big = by_key.get(("big", REFERENCE))
    if big is not None:
        if big.peak_rss_mb is None:
            lines.append(f"- one big message, postbote's peak RSS < {BIG_RSS_LIMIT_MB:.0f} MB: not measured "
                         f"({big.status})")
        else:
            verdict = "met" if big.peak_rss_mb < BIG_RSS_LIMIT_MB else "NOT met"
            lines.append(f"- one big message, postbote's peak RSS < {BIG_RSS_LIMIT_MB:.0f} MB: "
                         f"{big.peak_rss_mb:.1f} MB — {verdict}")
    return lines
