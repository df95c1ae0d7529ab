"""A POP3 server without UIDL (issue 15): messages are named by a digest of their headers (``TOP n 0``), or, without
TOP and with ``keep: false``, of the whole message; fetch-and-delete stays safe, ``keep: true`` delivers each message
once. Real Dovecot always has UIDL, so the scripted server plays the old server (``without={"UIDL"}``)."""

from __future__ import annotations

import poplib

import pytest
from postbote.testing.pop3server import Action, Faults

from tests.harness import RigFactory, corpus, corpus_message

pytestmark = pytest.mark.usefixtures("time_limit")

NO_UIDL = {"without": ("UIDL",)}
NO_UIDL_NO_TOP = {"without": ("UIDL", "TOP")}


def test_without_uidl_fetch_and_delete_delivers_every_message_once_and_empties_the_server(
        make_rig: RigFactory) -> None:
    rig = make_rig(corpus(5), **NO_UIDL)
    stats = rig.poll()
    assert (stats.ok, stats.delivered, stats.deleted) == (True, 5, 5)
    assert rig.server.messages() == []
    assert rig.audit().everything_delivered_once_and_deleted
    assert all(uid.startswith("headers:") for uid in rig.records())


def test_without_uidl_deletions_the_server_did_not_apply_are_done_next_poll_without_delivering_again(
        make_rig: RigFactory) -> None:
    rig = make_rig(corpus(3), Faults().on("QUIT", action=Action.reply("+OK bye")), **NO_UIDL)
    first = rig.poll()
    assert first.delivered == 3 and len(rig.server.messages()) == 3  # "+OK" to QUIT, nothing removed
    second = rig.poll()
    assert (second.delivered, second.deleted) == (0, 3)
    assert rig.audit().everything_delivered_once_and_deleted


def test_without_uidl_keep_delivers_each_message_once_even_after_others_were_deleted_by_another_client(
        make_rig: RigFactory) -> None:
    rig = make_rig(corpus(4), **NO_UIDL)
    assert rig.poll(keep=True).delivered == 4
    assert rig.poll(keep=True).delivered == 0
    delete_first_message_as_another_client(rig.server.port)  # the others' numbers all move down by one
    rig.server.add_message(corpus_message(5))
    again = rig.poll(keep=True)
    assert (again.ok, again.delivered, again.deleted) == (True, 1, 0)
    assert sorted(rig.audit().copies.values()) == [1] * 5


def test_without_uidl_two_messages_with_the_same_headers_are_both_delivered_once_with_keep(
        make_rig: RigFactory) -> None:
    twin = corpus_message(1)
    rig = make_rig([twin, twin], **NO_UIDL)
    assert rig.poll(keep=True).delivered == 2
    assert rig.poll(keep=True).delivered == 0
    assert len(rig.target.delivered()) == 2
    first, second = sorted(rig.records())
    assert second == f"{first}#2"


def test_without_uidl_or_top_fetch_and_delete_names_messages_by_their_content_and_stays_safe(
        make_rig: RigFactory) -> None:
    rig = make_rig(corpus(3), Faults().on("QUIT", action=Action.reply("+OK bye")), **NO_UIDL_NO_TOP)
    assert rig.poll().delivered == 3
    second = rig.poll()
    assert (second.ok, second.delivered, second.deleted) == (True, 0, 3)
    assert all(uid.startswith("message:") for uid in rig.records())
    assert rig.audit().everything_delivered_once_and_deleted


def test_without_uidl_or_top_keep_fails_the_poll_with_what_to_do_and_fetches_nothing(
        make_rig: RigFactory) -> None:
    rig = make_rig(corpus(2), **NO_UIDL_NO_TOP)
    stats = rig.poll(keep=True)
    assert not stats.ok and "neither UIDL nor TOP" in (stats.error or "") and "keep: false" in (stats.error or "")
    assert stats.delivered == 0 and len(rig.server.messages()) == 2


def test_a_server_that_lists_uidl_but_refuses_it_fails_the_poll_instead_of_renaming_its_messages(
        make_rig: RigFactory) -> None:
    rig = make_rig(corpus(2), Faults().on("UIDL", nth=2, action=Action.reply("-ERR [SYS/TEMP] try later")))
    assert rig.poll(keep=True).delivered == 2
    rig.server.add_message(corpus_message(3))
    refused = rig.poll(keep=True)
    assert not refused.ok and "UIDL" in (refused.error or "")
    assert len(rig.target.delivered()) == 2  # nothing fetched again under other names


def delete_first_message_as_another_client(port: int) -> None:
    client = poplib.POP3("127.0.0.1", port, timeout=5)
    try:
        client.user("demo")
        client.pass_("demo")
        client.dele(1)
    finally:
        client.quit()


def test_without_uidl_or_pipelining_the_headers_are_asked_for_one_at_a_time_and_keep_still_holds(
        make_rig: RigFactory) -> None:
    rig = make_rig(corpus(3), capabilities=("TOP", "USER"), **NO_UIDL)
    assert rig.poll(keep=True).delivered == 3
    again = rig.poll(keep=True)
    assert (again.ok, again.delivered, again.left) == (True, 0, 3)
