"""The model-based test of the whole poll (issue 11, "How we test from now on").

Hypothesis generates cases (`tests.model.plan.cases`): a mailbox of unusual messages on the scripted POP3 server
(dot lines, bare CR and LF, NUL, 8-bit, long lines, UIDs listed twice, a new message taking a deleted one's UID at the
same size), one to three destinations of every kind (Maildir, mbox, MDA, SMTP, LMTP, IMAP APPEND into a real
Dovecot) each refusing on its own schedule (temporarily, permanently, or crashing), and several polls, each with
server faults (drops, garbage, stalls, a stray line after a message, lenient dot-stuffing, an empty listing, ``+OK``
to QUIT without committing), the state database locked by another process from some step on, and SIGKILL at some
step; one case in four has an old server without UIDL (postbote names its messages by a digest of their headers).
Clean polls follow. After every poll
the invariants of `tests.model.ledger` must hold: nothing lost, no duplicate beyond what a crash may cost, nothing
stuck, no fault hidden from the poll's result.

CI runs ``POSTBOTE_MODEL_EXAMPLES`` cases (default 150). The soak::

    POSTBOTE_TEST_BACKSTOP=0 POSTBOTE_MODEL_EXAMPLES=5000 .venv/bin/python -m pytest tests/test_model_poll.py -x -s

A failure prints the shrunk case (``case.describe()``) and what each poll did; it reads as a regular test's setup.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, note, settings

from tests.model.destinations import Kind, Outcome, imap_available
from tests.model.plan import (
    Arrival,
    Case,
    InjectedFault,
    Kill,
    KillPoint,
    MessageSpec,
    PollPlan,
    ServerFault,
    cases,
)
from tests.model.runner import CaseRun, report_tally, run_model_case

EXAMPLES = int(os.environ.get("POSTBOTE_MODEL_EXAMPLES", "150"))
# CI, which decides whether a change lands, runs the same cases every time; the soak explores new ones, and what it
# finds joins KNOWN_PATHS below.
IN_CI = bool(os.environ.get("CI"))


@pytest.fixture(scope="module", autouse=True)
def summary(request: pytest.FixtureRequest) -> Iterator[None]:
    """At the end: how many cases and polls ran, and which faults they exercised."""
    yield from report_tally(request, "model test")


def run_case(case: Case) -> None:
    run_model_case(lambda scratch: CaseRun(case, scratch), case, "model-")


@settings(max_examples=EXAMPLES, deadline=None, derandomize=IN_CI,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(case=cases())
def test_whatever_the_server_destinations_state_store_and_crashes_do_no_mail_is_lost_duplicated_or_stuck(
        case: Case) -> None:
    note(case.describe())
    run_case(case)


# The paths of issue 11 that the model finds on 206c887, as regular cases (shrunk by hand from what it printed).
TWO = (MessageSpec(("text",)), MessageSpec(("dot line", "8-bit")))
KNOWN_PATHS = {
    "several destinations after a Maildir, the MDA deferring: no copy per poll (item 4)": Case(
        TWO, (Kind.MAILDIR, Kind.MBOX, Kind.MDA), keep=False, raw_line_endings=False,
        polls=(PollPlan(destination_outcomes=((), (), (Outcome.TEMPORARY,) * 2)),) * 3),
    "the same after SMTP (item 4)": Case(
        TWO, (Kind.MAILDIR, Kind.SMTP, Kind.MDA), keep=False, raw_line_endings=False,
        polls=(PollPlan(destination_outcomes=((), (), (Outcome.TEMPORARY,) * 2)),) * 3),
    "a locked state database: no copy per poll (item 5)": Case(
        TWO, (Kind.MDA,), keep=False, raw_line_endings=False, polls=(PollPlan(state_locked_at=0),) * 3),
    "one empty listing with keep: nothing delivered again (item 6)": Case(
        TWO, (Kind.MAILDIR,), keep=True, raw_line_endings=False,
        polls=(PollPlan(), PollPlan(server_faults=(InjectedFault(ServerFault.EMPTY_LISTING, "UIDL"),)))),
    "+OK to QUIT without committing: nothing delivered again (item 7)": Case(
        TWO, (Kind.SMTP,), keep=False, raw_line_endings=False,
        polls=(PollPlan(server_faults=(InjectedFault(ServerFault.QUIT_WITHOUT_COMMIT, "QUIT"),)),)),
    "a stray line after a message: the session ends, nothing deleted unread (item 1)": Case(
        TWO + (MessageSpec(("text",)),), (Kind.MAILDIR,), keep=False, raw_line_endings=False,
        polls=(PollPlan(server_faults=(InjectedFault(ServerFault.STRAY_LINE, "RETR"),)),)),
    "garbage instead of a RETR reply is not an -ERR (item 1)": Case(
        TWO, (Kind.MAILDIR,), keep=False, raw_line_endings=False,
        polls=(PollPlan(server_faults=(InjectedFault(ServerFault.GARBAGE, "RETR"),)),)),
    "a bare-LF dot line from a server stuffing only after CRLF (item 2)": Case(
        (MessageSpec(("text", "bare LF dot", "text")),), (Kind.MAILDIR,), keep=False, raw_line_endings=True,
        polls=(PollPlan(server_faults=(InjectedFault(ServerFault.LENIENT_STUFFING, "RETR"),)),)),
    "a new message at a reused UID after a lost QUIT reply is not deleted unread (item 3)": Case(
        (MessageSpec(("text",)),), (Kind.MAILDIR,), keep=False, raw_line_endings=False,
        polls=(PollPlan(server_faults=(InjectedFault(ServerFault.QUIT_REPLY_LOST, "QUIT"),)),
               PollPlan(arrivals=(Arrival(("text",), reuse_uid_of=0),)))),
    # Found by the soak after the fixes: the state store locked between a Maildir's rename and its record, twice.
    "two cut-short deliveries to [maildir, maildir]: held and shown, not delivered again and again (item 5)": Case(
        (MessageSpec(()),), (Kind.MAILDIR, Kind.MAILDIR), keep=False, raw_line_endings=False,
        polls=(PollPlan(), PollPlan(state_locked_at=3, arrivals=(Arrival(()),)), PollPlan(state_locked_at=3))),
}


@pytest.mark.parametrize("case", KNOWN_PATHS.values(), ids=KNOWN_PATHS.keys())
def test_the_loss_and_duplicate_paths_of_issue_11_stay_closed(case: Case) -> None:
    run_case(case)


# POP3 -> IMAP APPEND (issue 13), as regular cases: what the random ones reach only now and then.
IMAP_PATHS = {
    "a refused, a full and a cut APPEND, then clean polls: each message once in the folder": Case(
        TWO + (MessageSpec(("NUL", "long line")),), (Kind.IMAP,), keep=False, raw_line_endings=False,
        polls=(PollPlan(destination_outcomes=((Outcome.PERMANENT, Outcome.TEMPORARY, Outcome.CRASH),)),)),
    "IMAP after a Maildir, IMAP deferring: no second Maildir copy": Case(
        TWO, (Kind.MAILDIR, Kind.IMAP), keep=False, raw_line_endings=True,
        polls=(PollPlan(destination_outcomes=((), (Outcome.TEMPORARY, Outcome.CRASH))),) * 2),
    "SIGKILL at the third hook step of a poll into IMAP and SMTP": Case(
        TWO + (MessageSpec(("8-bit",)),), (Kind.IMAP, Kind.SMTP), keep=False, raw_line_endings=False,
        polls=(PollPlan(kill=Kill(KillPoint.HOOK, 3)), PollPlan(kill=Kill(KillPoint.COMMAND, 4)))),
    "keep: true into IMAP, with a cut": Case(
        TWO, (Kind.IMAP,), keep=True, raw_line_endings=False,
        polls=(PollPlan(destination_outcomes=((Outcome.CRASH,),)), PollPlan())),
}


# A server without UIDL (issue 15): postbote names messages by a digest of their headers; the same invariants.
NO_UIDL_PATHS = {
    "+OK to QUIT without committing: the next poll deletes without delivering again": Case(
        TWO, (Kind.MAILDIR, Kind.SMTP), keep=False, raw_line_endings=False, uidl=False,
        polls=(PollPlan(server_faults=(InjectedFault(ServerFault.QUIT_WITHOUT_COMMIT, "QUIT"),)),)),
    "keep, with messages the server lists under one UID and a dropped TOP": Case(
        (MessageSpec(("text",), "same-1"), MessageSpec(("8-bit",), "same-1")), (Kind.MAILDIR,), keep=True,
        raw_line_endings=True, uidl=False,
        polls=(PollPlan(server_faults=(InjectedFault(ServerFault.DROP, "TOP", 2),)), PollPlan(arrivals=(
            Arrival(("text",)),)))),
    "SIGKILL mid-poll, then a lost QUIT reply": Case(
        TWO, (Kind.MDA,), keep=False, raw_line_endings=False, uidl=False,
        polls=(PollPlan(kill=Kill(KillPoint.HOOK, 3)),
               PollPlan(server_faults=(InjectedFault(ServerFault.QUIT_REPLY_LOST, "QUIT"),)))),
}


@pytest.mark.parametrize("case", NO_UIDL_PATHS.values(), ids=NO_UIDL_PATHS.keys())
def test_a_server_without_uidl_loses_nothing_and_duplicates_only_what_a_crash_may_cost(case: Case) -> None:
    run_case(case)


@pytest.mark.dovecot
@pytest.mark.skipif(not imap_available(), reason="the dovecot binary is not installed")
@pytest.mark.parametrize("case", IMAP_PATHS.values(), ids=IMAP_PATHS.keys())
def test_pop3_to_imap_append_loses_nothing_and_duplicates_only_what_a_crash_may_cost(case: Case) -> None:
    run_case(case)
