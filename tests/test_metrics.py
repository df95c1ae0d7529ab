"""The built-in ``metrics`` plugin (issue: runs as a service): Prometheus metrics per account in a node-exporter
textfile and/or on a loopback HTTP endpoint, from the state store's running totals.
"""

from __future__ import annotations

import os
import socket
import stat
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from postbote.cli import main
from postbote.config import Config, load_config
from postbote.errors import ConfigError
from postbote.jobs import plugins_started as configured
from postbote.pluginmanager import PluginManager, make_plugin_manager
from postbote.plugins import metrics
from postbote.poller import Poller
from postbote.state import PollRecord, StateStore
from postbote.status import WaitingSummary
from postbote.testing import FakeSource
from structlog.testing import capture_logs

from tests.harness import account, fake_account, fake_mailbox, mail, wait_until, write_config
from tests.servers import free_port


def load(tmp_path: Path, options: dict[str, Any] | bool, *accounts: dict[str, Any],
         pm: PluginManager | None = None) -> Config:
    """The config of ``accounts`` (one POP3 account by default) with the metrics ``options``, read with ``pm`` (a
    fresh plugin manager by default; give one holding a `FakeSource` for accounts with ``protocol: fake``)."""
    accounts = accounts or (account("alice", None, tmp_path / "Maildir"),)
    path = write_config(tmp_path / "postbote.yaml", list(accounts), plugins={"metrics": options})
    return load_config(path, pm or make_plugin_manager(entry_points=False))


def problems(tmp_path: Path, options: dict[str, Any] | bool) -> str:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, options)
    return str(caught.value)


@pytest.fixture
def source() -> FakeSource:
    """Serves the account ``alice`` (``protocol: fake``): two messages in her mailbox."""
    fake, _ = fake_mailbox([mail(1), mail(2)], account="alice")
    return fake


def record(account: str, **overrides: Any) -> PollRecord:
    values: dict[str, Any] = dict(account=account, finished=1_700_000_000.0, ok=True, duration=1.5,
                                  counts={"left": 2}, error=None, last_success=1_700_000_000.0,
                                  totals={"delivered": 10, "dropped": 1, "rejected": 2, "deferred": 3,
                                          "bytes": 12345},
                                  polls=7, failures=1, failure_streak=0, duration_total=9.25)
    values.update(overrides)
    return PollRecord(**values)


# --- options


def test_metrics_is_an_optional_built_in_off_unless_named(tmp_path: Path, capsys) -> None:
    path = write_config(tmp_path / "postbote.yaml", [account("alice", None, tmp_path / "Maildir")])
    assert main(["-c", str(path), "plugins"]) == 0
    assert "metrics  [built-in: postbote.plugins.metrics]\n    enabled: off" in capsys.readouterr().out


def test_options_need_a_textfile_or_a_listen_address(tmp_path: Path) -> None:
    assert "give textfile: PATH (for node-exporter's textfile collector) and/or listen:" in problems(tmp_path, True)


def test_the_textfile_must_be_a_prom_file(tmp_path: Path) -> None:
    assert "node-exporter reads only files ending in .prom" in problems(tmp_path, {"textfile": "postbote.txt"})


def test_a_bad_listen_address_is_the_one_problem_said_however_many_accounts_share_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, {"listen": "127.0.0.1:0"}, *(account(name, None, tmp_path / "Maildir") for name in "abc"))
    text = str(caught.value)  # not also "give textfile or listen", nor "plugin 'metrics' takes no options"
    assert text.count("\n") == 0 and "plugins.metrics.listen: expected HOST:PORT" in text, text


def test_listen_refuses_addresses_off_loopback_unless_allowed(tmp_path: Path) -> None:
    assert "0.0.0.0 is not a loopback address" in problems(tmp_path, {"listen": "0.0.0.0:9465"})
    config = load(tmp_path, {"listen": "0.0.0.0:9465", "allow_remote": True})
    assert config.accounts[0].options_for("metrics").listen == ("0.0.0.0", 9465)


@pytest.mark.parametrize(("given", "parsed"), [("127.0.0.1:9465", ("127.0.0.1", 9465)),
                                               ("localhost:9100", ("127.0.0.1", 9100)),
                                               ("[::1]:9465", ("::1", 9465))])
def test_listen_addresses(given: str, parsed: tuple[str, int]) -> None:
    assert metrics.listen_address(given) == parsed


@pytest.mark.parametrize("given", ["9465", "127.0.0.1", "example.org:9465", "127.0.0.1:0", "127.0.0.1:http"])
def test_bad_listen_addresses(given: str) -> None:
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        metrics.listen_address(given)


# --- the exposition format


def test_render_gives_counters_gauges_and_a_summary_per_account() -> None:
    text = metrics.render([record("bob", ok=False, error="refused", failure_streak=2, last_success=None),
                           record('a"l\\ice')])
    assert text.endswith("\n")
    lines = text.splitlines()
    assert "# TYPE postbote_messages_total counter" in lines
    assert 'postbote_messages_total{account="a\\"l\\\\ice",outcome="delivered"} 10' in lines
    assert 'postbote_messages_total{account="bob",outcome="deferred"} 3' in lines
    assert 'postbote_bytes_total{account="bob"} 12345' in lines
    assert 'postbote_poll_failures_total{account="bob"} 1' in lines
    assert "# TYPE postbote_poll_duration_seconds summary" in lines
    assert 'postbote_poll_duration_seconds_sum{account="bob"} 9.25' in lines
    assert 'postbote_poll_duration_seconds_count{account="bob"} 7' in lines
    assert 'postbote_last_poll_success{account="bob"} 0' in lines
    assert 'postbote_consecutive_poll_failures{account="bob"} 2' in lines
    assert 'postbote_last_success_timestamp_seconds{account="bob"}' not in text
    assert 'postbote_last_poll_timestamp_seconds{account="bob"} 1700000000' in lines
    assert 'postbote_messages_left{account="bob"} 2' in lines


# --- exporting


def test_textfile_shows_the_polls_soon_after_they_finish_and_is_replaced_atomically(tmp_path: Path,
                                                                                     source: FakeSource) -> None:
    textfile = tmp_path / "textfiles" / "postbote.prom"
    textfile.parent.mkdir()
    pm = make_plugin_manager(entry_points=False, extra=[source])
    config = load(tmp_path, {"textfile": str(textfile)}, fake_account("alice", tmp_path / "Maildir"),
                  fake_account("bob", tmp_path / "Maildir", plugins={"metrics": False}), pm=pm)
    store = StateStore(config.state_dir)
    try:
        with configured(pm, config):
            assert textfile.read_text().count("# TYPE") == 13  # written at start-up, before any poll
            Poller(pm, store).poll(config.accounts[0])
            Poller(pm, store).poll(config.accounts[1])
            shown = wait_until(lambda: 'postbote_polls_total{account="alice"} 1' in textfile.read_text(), 10,
                               "the textfile showing alice's poll")  # while the daemon runs: within a second
    finally:
        store.close()
    text = textfile.read_text()
    assert shown and 'postbote_messages_total{account="alice",outcome="delivered"} 2' in text
    assert 'account="bob"' not in text  # bob turned the plugin off
    assert os.listdir(textfile.parent) == ["postbote.prom"]
    assert stat.S_IMODE(textfile.stat().st_mode) == 0o644


def test_polls_finishing_together_are_read_and_written_together_not_one_by_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon finishing hundreds of polls a second writes the textfile (all its accounts rendered) about once a
    second, reading the state for the accounts polled meanwhile in one go -- not once per poll, which with
    thousands of accounts in the file took longer than the polls themselves."""
    names = [f"user{number}" for number in range(200)]
    textfile = tmp_path / "postbote.prom"
    config = load(tmp_path, {"textfile": str(textfile)},
                  *(account(name, None, tmp_path / "Maildir") for name in names))
    writes: list[str] = []
    reads: list[int] = []
    real_write, real_read = metrics.write_textfile, metrics.read_accounts_state
    monkeypatch.setattr(metrics, "write_textfile",
                        lambda path, pieces: (writes.append(text := "".join(pieces)), real_write(path, [text])))
    monkeypatch.setattr(metrics, "read_accounts_state",
                        lambda where, accounts: (reads.append(len(accounts)), real_read(where, accounts))[1])
    store = StateStore(config.state_dir)
    exporter = metrics.MetricsExporter(config)
    try:
        exporter.start()
        started = time.monotonic()
        for name in names:
            store.record_poll(name, ok=True, duration=0.1, counts={}, error=None)
            exporter.poll_finished(name)
        assert wait_until(lambda: writes and writes[-1].count("postbote_polls_total{") == len(names), 10,
                          "every poll in the textfile")
        elapsed = time.monotonic() - started
    finally:
        exporter.close()
        store.close()
    # the start-up write, then at most one per WRITE_INTERVAL while polls kept finishing, and one at the end
    assert len(writes) <= 3 + elapsed / metrics.WRITE_INTERVAL < len(names)
    assert sum(reads[1:]) == len(names) and len(reads) <= len(writes) + 1  # each poll read once, in batches


def test_each_textfile_shows_its_accounts_polls_whoever_read_them_first(tmp_path: Path) -> None:
    """Two textfiles, and an endpoint scraped in between: a scrape reading alice's poll does not keep her textfile
    from being written, nor does writing alice's file keep bob's from it."""
    port = free_port()
    alice_file, bob_file = tmp_path / "alice.prom", tmp_path / "bob.prom"
    config = load(tmp_path, True,
                  account("alice", None, tmp_path / "Maildir",
                          plugins={"metrics": {"textfile": str(alice_file), "listen": f"127.0.0.1:{port}"}}),
                  account("bob", None, tmp_path / "Maildir", plugins={"metrics": {"textfile": str(bob_file)}}))
    store = StateStore(config.state_dir)
    exporter = metrics.MetricsExporter(config)
    try:
        exporter.start()
        for polls in (1, 2):
            for name in ("alice", "bob"):
                store.record_poll(name, ok=True, duration=0.1, counts={}, error=None)
                exporter.poll_finished(name)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                assert f'postbote_polls_total{{account="alice"}} {polls}' in response.read().decode()
            for name, textfile in (("alice", alice_file), ("bob", bob_file)):
                line = f'postbote_polls_total{{account="{name}"}} {polls}'
                assert wait_until(lambda line=line, textfile=textfile: line in textfile.read_text(), 10,
                                  f"{line} in {textfile.name}")
    finally:
        exporter.close()
        store.close()


def test_a_failed_textfile_write_is_logged_and_later_polls_are_written_all_the_same(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    textfile = tmp_path / "postbote.prom"
    config = load(tmp_path, {"textfile": str(textfile)})
    store = StateStore(config.state_dir)
    exporter = metrics.MetricsExporter(config)
    real_exposition, calls = metrics.exposition, []

    def exposition_failing_once(accounts):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 2:  # the first write after start-up
            raise RuntimeError("a bug in rendering")
        return real_exposition(accounts)

    monkeypatch.setattr(metrics, "exposition", exposition_failing_once)
    try:
        with capture_logs() as events:
            exporter.start()
            for polls in (1, 2):
                store.record_poll("alice", ok=True, duration=0.1, counts={}, error=None)
                exporter.poll_finished("alice")
                if polls == 1:
                    assert wait_until(lambda: any(e["event"] == "metrics.write_failed" for e in events), 10)
            assert wait_until(lambda: 'postbote_polls_total{account="alice"} 2' in textfile.read_text(), 10,
                              "the second poll written after the failed write")
    finally:
        exporter.close()
        store.close()
    (failed,) = [event for event in events if event["event"] == "metrics.write_failed"]
    assert failed["error"] == "RuntimeError: a bug in rendering"


def test_http_endpoint_serves_metrics_on_loopback_and_stops_with_the_config(tmp_path: Path,
                                                                             source: FakeSource) -> None:
    port = free_port()
    pm = make_plugin_manager(entry_points=False, extra=[source])
    config = load(tmp_path, {"listen": f"127.0.0.1:{port}"}, fake_account("alice", tmp_path / "Maildir"), pm=pm)
    store = StateStore(config.state_dir)
    try:
        with configured(pm, config):
            Poller(pm, store).poll(config.accounts[0])
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                body = response.read().decode()
                assert response.headers["Content-Type"] == metrics.CONTENT_TYPE
            assert 'postbote_messages_total{account="alice",outcome="delivered"} 2' in body
            with pytest.raises(urllib.error.HTTPError) as not_found:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
            assert not_found.value.code == 404
    finally:
        store.close()
    with socket.socket() as sock:  # the port is free again once the config is unconfigured (shutdown, reload)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()


def test_a_port_in_use_is_a_start_up_error_naming_the_option(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        pm = make_plugin_manager(entry_points=False)
        config = load(tmp_path, {"listen": f"127.0.0.1:{port}"}, pm=pm)
        with pytest.raises(ConfigError, match=f"plugins.metrics.listen: cannot listen on 127.0.0.1:{port}"), \
                configured(pm, config):
            pass


# --- mail that waits (issue 11, item 17)


def test_render_counts_the_messages_waiting_and_stale_per_account() -> None:
    text = metrics.render([record("alice"), record("bob")],
                          {"alice": WaitingSummary(deferred=2, rejected=1, stale=1, oldest=1_700_000_000.0)})
    lines = text.splitlines()
    assert "# TYPE postbote_messages_waiting gauge" in lines and "# TYPE postbote_messages_stale gauge" in lines
    assert 'postbote_messages_waiting{account="alice",state="deferred"} 2' in lines
    assert 'postbote_messages_waiting{account="alice",state="rejected"} 1' in lines
    assert 'postbote_messages_stale{account="alice"} 1' in lines
    assert 'postbote_messages_waiting{account="bob",state="deferred"} 0' in lines
    assert 'postbote_messages_stale{account="bob"} 0' in lines


def test_textfile_shows_the_messages_a_failing_destination_left_waiting(tmp_path: Path, source: FakeSource) -> None:
    textfile = tmp_path / "postbote.prom"
    mda = tmp_path / "mda"
    mda.write_text("#!/bin/sh\ncat >/dev/null\nexit 75\n")
    mda.chmod(0o755)
    pm = make_plugin_manager(entry_points=False, extra=[source])
    config = load(tmp_path, {"textfile": str(textfile)},
                  fake_account("alice", tmp_path / "Maildir", deliver={"mda": [str(mda)]}, stale_after="1s"), pm=pm)
    store = StateStore(config.state_dir)
    try:
        with configured(pm, config):  # as `postbote poll` runs: the textfile is written when it ends, at the latest
            Poller(pm, store).poll(config.accounts[0])
    finally:
        store.close()
    text = textfile.read_text()
    assert 'postbote_messages_waiting{account="alice",state="deferred"} 2' in text
    assert 'postbote_messages_waiting{account="alice",state="rejected"} 0' in text
    assert 'postbote_messages_stale{account="alice"} 0' in text  # written as the poll ended: not yet stale


def test_a_scrape_sees_mail_turn_stale_between_polls(tmp_path: Path) -> None:
    config = load(tmp_path, {"listen": f"127.0.0.1:{free_port()}"}, account("alice", None, tmp_path / "Maildir"))
    store = StateStore(config.state_dir)
    try:
        store.record_poll("alice", ok=True, duration=0.1, counts={}, error=None)
        store.record("alice", "u1", "deferred", reason="451 4.3.0 try later", size=10)
        (waiting,) = store.waiting("alice")
    finally:
        store.close()
    now = waiting.since + 60
    exporter = metrics.MetricsExporter(config, clock=lambda: now)
    try:
        exporter.refresh("alice")
        assert 'postbote_messages_stale{account="alice"} 0' in exporter.render(["alice"])
        now = waiting.since + 3601  # an hour later, with no poll in between (the server has been down)
        assert 'postbote_messages_stale{account="alice"} 1' in exporter.render(["alice"])
        assert 'postbote_messages_waiting{account="alice",state="deferred"} 1' in exporter.render(["alice"])
    finally:
        exporter.close()


# --- reading the state (issue 12: only the state store touches SQLite, and metrics only reads)


def test_the_exporter_only_reads_the_state_and_sees_every_later_poll(tmp_path: Path) -> None:
    """It opens a read-only store per refresh: it leaves no -wal/-shm files behind (which, made by another user, would
    lock the service out) and, unlike a store kept open from a moment nobody was writing, sees the polls after it."""
    config = load(tmp_path, {"listen": f"127.0.0.1:{free_port()}"}, account("alice", None, tmp_path / "Maildir"))
    exporter = metrics.MetricsExporter(config)
    try:
        exporter.refresh("alice")  # no database yet: nothing to read, and nothing created
        assert not config.state_dir.exists() or list(config.state_dir.iterdir()) == []
        store = StateStore(config.state_dir)
        store.record_poll("alice", ok=True, duration=0.1, counts={}, error=None)
        store.close()
        exporter.refresh("alice")
        assert sorted(path.name for path in config.state_dir.iterdir()) == ["postbote.sqlite3"]
        assert 'postbote_polls_total{account="alice"} 1' in exporter.render(["alice"])
        store = StateStore(config.state_dir)
        try:
            store.record_poll("alice", ok=False, duration=0.1, counts={}, error="connection refused")
            exporter.refresh("alice")
        finally:
            store.close()
        assert 'postbote_polls_total{account="alice"} 2' in exporter.render(["alice"])
        assert 'postbote_last_poll_success{account="alice"} 0' in exporter.render(["alice"])
    finally:
        exporter.close()
