"""The state store on PostgreSQL (issue 16): the same records and rules as on SQLite, a versioned schema, and the
leases by which workers share the accounts.

The store's behaviour is specified once and checked on both backends (``backend`` below): what a poll records,
what a crash leaves behind for the next poll (the in-flight notes), what waits, what is forgotten. Then what only
a shared store has: schema migrations at open, and leases -- claimed in batches, never by two claimers at once,
renewed, run out and taken over.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from postbote.config import shared_state
from postbote.errors import ConfigError, StateError
from postbote.state import (
    DEFERRED,
    DELIVERED,
    DROPPED,
    REJECTED,
    DeliveryKey,
    DeliveryState,
    Outcome,
    StateStore,
)
from postbote.state_postgres import MIGRATIONS, SCHEMA_VERSION, LeaseBoard, PostgresDatabase, holders

from tests import harness
from tests.servers.postgres import PASSWORD, PostgresServer

StoreOpener = Callable[[], StateStore]
SMTP = DeliveryKey(0, "smtp")
MAILDIR = DeliveryKey(1, "maildir")


@pytest.fixture
def store(state_store: StateStore) -> StateStore:
    """On SQLite, then on PostgreSQL (``open_state`` and ``state_store`` in conftest)."""
    return state_store


# --- the records, on both backends


def test_a_delivered_message_is_recorded_and_read_back(store: StateStore) -> None:
    store.record("alice", "1", DELIVERED, message_id="<m1@x>", size=120, header_digest="abc")
    record = store.records("alice")["1"]
    assert (record.status, record.size, record.header_digest, record.handled) == (DELIVERED, 120, "abc", True)
    assert store.records("bob") == {}


def test_a_message_deferred_twice_keeps_when_it_first_failed_and_counts_the_attempts(store: StateStore) -> None:
    store.record("alice", "1", DEFERRED, reason="451 try later")
    first = store.waiting("alice")[0].since
    store.record("alice", "1", DEFERRED, reason="452 still later")
    (waiting,) = store.waiting("alice")
    assert (waiting.since, waiting.attempts, waiting.reason) == (first, 2, "452 still later")
    store.record("alice", "1", DELIVERED)
    assert store.waiting("alice") == []


def test_in_flight_notes_survive_a_restart_and_go_once_the_message_is_handled(open_state: StoreOpener) -> None:
    store = open_state()
    store.begin_delivery("alice", "1", SMTP)
    store.finish_delivery("alice", "1", SMTP, "250 ok")
    store.begin_delivery("alice", "1", MAILDIR)
    store.close()  # killed here: the next poll, maybe on another worker, finds what the destinations may have
    again = open_state()
    assert again.partly_delivered("alice") == {"1"}
    notes = again.deliveries("alice", "1")
    assert {key: note.state for key, note in notes.items()} == {SMTP: DeliveryState.DONE,
                                                                 MAILDIR: DeliveryState.IN_FLIGHT}
    again.record_batch("alice", [Outcome("1", DELIVERED)])
    assert again.partly_delivered("alice") == set()


def test_a_refusal_drops_the_in_flight_note_but_a_failure_in_doubt_keeps_it(store: StateStore) -> None:
    store.begin_delivery("alice", "1", SMTP)
    store.begin_delivery("alice", "2", SMTP)
    store.record_batch("alice", [Outcome("1", DEFERRED, "550 no"), Outcome("2", DEFERRED, "timeout", in_doubt=True)])
    assert store.partly_delivered("alice") == {"2"}
    assert store.deliveries("alice", "2")[SMTP].attempts == 1


def test_notes_of_other_messages_commit_with_a_batch(store: StateStore) -> None:
    store.record_batch("alice", [Outcome("1", DELIVERED)], notes=[("2", SMTP), ("2", SMTP)])
    assert store.deliveries("alice", "2")[SMTP].attempts == 2


def test_renames_are_journaled_until_cleared(store: StateStore) -> None:
    store.record_batch("alice", [Outcome("1", DELIVERED)], renames=[("1", "/tmp/a", "/new/a")])
    assert store.pending_renames("alice") == [("1", "/tmp/a", "/new/a")]
    store.clear_renames("alice", ["1"])
    assert store.pending_renames("alice") == []


def test_the_sole_poller_remembers_the_journal_and_still_finds_what_a_crash_left(open_state: StoreOpener) -> None:
    """The daemon asks the database once which accounts have renames journaled (an earlier run's crash), then
    keeps that knowledge as it journals and clears renames itself."""
    crashed = open_state()
    crashed.record_batch("alice", [Outcome("1", DELIVERED)], renames=[("1", "/tmp/a", "/new/a")])
    store = open_state()
    store.remember_journal()
    assert store.pending_renames("alice") == [("1", "/tmp/a", "/new/a")]
    assert store.pending_renames("bob") == []
    store.record_batch("bob", [Outcome("2", DELIVERED)], renames=[("2", "/tmp/b", "/new/b")])
    assert store.pending_renames("bob") == [("2", "/tmp/b", "/new/b")]
    store.clear_renames("alice", ["1"])
    store.clear_renames("bob", ["2"])
    assert store.pending_renames("alice") == [] and store.pending_renames("bob") == []
    store.record_batch("alice", [Outcome("3", DELIVERED)], renames=[("3", "/tmp/c", "/new/c")])
    assert store.pending_renames("alice") == [("3", "/tmp/c", "/new/c")]


def test_a_record_is_forgotten_only_after_three_listings_without_it_over_a_day(store: StateStore) -> None:
    store.record("alice", "1", DELIVERED)
    now = time.time()
    for listing in range(3):
        assert store.note_listing("alice", store.records("alice"), set(), now=now + listing) == []
    assert store.records("alice")["1"].absent == 3
    assert store.note_listing("alice", store.records("alice"), set(), now=now + 86_401) == ["1"]
    assert store.records("alice") == {}


def test_a_uid_listed_again_is_no_longer_counted_absent(store: StateStore) -> None:
    store.record("alice", "1", DELIVERED)
    store.note_listing("alice", store.records("alice"), set())
    store.note_listing("alice", store.records("alice"), {"1"})
    assert store.records("alice")["1"].absent == 0


def test_imported_uids_are_added_once_and_never_replace_what_postbote_recorded(store: StateStore) -> None:
    store.record("alice", "1", REJECTED, reason="550")
    assert store.record_imported("alice", ["1", "2", "3", "2"], reason="fetchmail") == 2
    assert store.record_imported("alice", ["2", "3"], reason="fetchmail") == 0
    assert store.records("alice")["1"].status == REJECTED


def test_a_retry_clears_the_rejected_record_but_keeps_the_destinations_that_took_it(store: StateStore) -> None:
    store.finish_delivery("alice", "1", SMTP, "250 ok")
    store.record("alice", "1", REJECTED, reason="550 maildir full")
    store.record("alice", "2", DROPPED)
    assert store.clear_rejected("alice") == ["1"]
    assert "1" not in store.records("alice") and store.deliveries("alice", "1")[SMTP].state is DeliveryState.DONE


def test_polls_keep_the_last_outcome_running_totals_and_the_failure_streak(store: StateStore) -> None:
    store.record_poll("alice", ok=True, duration=0.5, counts={"delivered": 2}, error=None)
    store.record_poll("alice", ok=False, duration=1.5, counts={"delivered": 1}, error="connection refused")
    store.record_poll("alice", ok=False, duration=1.0, counts={}, error="connection refused")
    last = store.last_poll("alice")
    assert last is not None
    assert (last.ok, last.error, last.totals, last.polls, last.failures, last.failure_streak, last.duration_total) \
        == (False, "connection refused", {"delivered": 3}, 3, 2, 2, 3.0)
    assert last.last_success is not None and last.last_success < last.finished


def test_a_poll_that_moved_nothing_keeps_the_totals_and_a_success_is_remembered(store: StateStore) -> None:
    nothing = {"listed": 0, "delivered": 0, "deleted": 0}
    store.record_poll("alice", ok=True, duration=0.5, counts={"delivered": 2, "listed": 2}, error=None)
    store.record_poll("alice", ok=True, duration=0.1, counts=nothing, error=None)
    last = store.last_poll("alice")
    assert last is not None
    assert (last.totals, last.counts, last.polls, last.last_success) == (
        {"delivered": 2, "listed": 2}, nothing, 2, last.finished)
    store.record_poll("bob", ok=False, duration=0.1, counts=nothing, error="connection refused")
    first = store.last_poll("bob")
    assert first is not None and (first.totals, first.last_success) == (nothing, None)


def test_held_poll_records_are_written_together_in_order_and_read_back_by_the_store(
        store: StateStore, open_state: StoreOpener) -> None:
    """The daemon holds poll records to write many in one transaction: another reader sees them once written; the
    store itself reads them back at once, and a record written at once never lands under an older held one."""
    store.hold_poll_records()
    store.record_poll("alice", ok=True, duration=0.1, counts={"delivered": 1}, error=None, may_hold=True)
    store.record_poll("alice", ok=True, duration=0.2, counts={"delivered": 2}, error=None, may_hold=True)
    other = open_state()
    assert other.last_poll("alice") is None  # held: not written yet
    store.write_held_poll_records()
    written = other.last_poll("alice")
    assert written is not None and (written.duration, written.totals, written.polls) == (0.2, {"delivered": 3}, 2)
    store.record_poll("bob", ok=True, duration=0.3, counts={}, error=None, may_hold=True)
    store.record_poll("bob", ok=False, duration=0.4, counts={}, error="refused", may_hold=False)  # not held
    bob = other.last_poll("bob")
    assert bob is not None and (bob.ok, bob.polls, bob.failure_streak) == (False, 2, 1)
    store.record_poll("carol", ok=True, duration=0.5, counts={}, error=None, may_hold=True)
    assert store.last_poll("carol") is not None  # the store's own read writes what it holds first
    store.record_poll("dave", ok=True, duration=0.6, counts={}, error=None, may_hold=True)
    store.hold_poll_records(False)  # turning it off writes the rest
    assert other.last_poll("dave") is not None


def test_a_poll_record_that_may_not_be_held_is_written_at_once(store: StateStore, open_state: StoreOpener) -> None:
    store.record_poll("alice", ok=True, duration=0.1, counts={}, error=None, may_hold=True)  # not holding: written
    store.hold_poll_records()
    store.record_poll("bob", ok=True, duration=0.1, counts={}, error=None)  # may_hold defaults to False
    other = open_state()
    assert other.last_poll("alice") is not None and other.last_poll("bob") is not None


def test_the_waiting_messages_are_listed_longest_waiting_first(store: StateStore) -> None:
    store.record("alice", "b", REJECTED, reason="550")
    store.record("alice", "a", DEFERRED, reason="451")
    assert [message.uid for message in store.waiting("alice")] == ["b", "a"]
    assert list(store.waiting_everywhere()) == ["alice"]


def test_a_read_only_store_reads_what_a_writer_committed(open_state: StoreOpener, tmp_path: Path,
                                                         request: pytest.FixtureRequest) -> None:
    writer = open_state()
    writer.record("alice", "1", DELIVERED)
    writer.record_poll("alice", ok=True, duration=0.1, counts={}, error=None)
    shared = shared_state(request.getfixturevalue("postgres_dsn")) if "postgresql" in request.node.name else None
    reader = StateStore(tmp_path / "state", readonly=True, shared=shared)
    try:
        assert set(reader.records("alice")) == {"1"} and reader.last_poll("alice") is not None
    finally:
        reader.close()


# --- PostgreSQL only: the schema


def test_a_new_database_gets_the_whole_schema_at_open(postgres_dsn: str, tmp_path: Path) -> None:
    store = StateStore(tmp_path, shared=shared_state(postgres_dsn))
    try:
        database = store.database
        assert isinstance(database, PostgresDatabase)
        assert database.schema_version() == SCHEMA_VERSION
        assert {"messages", "delivery_notes", "polls", "account_leases", "workers"} <= database.tables()
    finally:
        store.close()


def test_a_database_of_an_older_version_is_upgraded_at_open_and_keeps_its_records(postgres_dsn: str,
                                                                                   tmp_path: Path) -> None:
    older = PostgresDatabase(shared_state(postgres_dsn), migrations=MIGRATIONS[:1])  # as version 1 left it
    with older.transaction() as tx:
        tx.execute("INSERT INTO messages (account, uid, status, updated) VALUES (?, ?, ?, ?)",
                   ("alice", "1", DELIVERED, time.time()))
    assert older.schema_version() == 1 and "account_leases" not in older.tables()
    older.close()
    store = StateStore(tmp_path, shared=shared_state(postgres_dsn))
    try:
        assert store.records("alice")["1"].status == DELIVERED
        assert isinstance(store.database, PostgresDatabase) and store.database.schema_version() == SCHEMA_VERSION
    finally:
        store.close()


def test_a_database_newer_than_this_postbote_is_refused_clearly(postgres_dsn: str, tmp_path: Path) -> None:
    StateStore(tmp_path, shared=shared_state(postgres_dsn)).close()
    newer = PostgresDatabase(shared_state(postgres_dsn))
    with newer.transaction() as tx:
        tx.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    newer.close()
    with pytest.raises(StateError, match="newer than this postbote knows.*upgrade postbote"):
        StateStore(tmp_path, shared=shared_state(postgres_dsn))


def test_workers_opening_a_new_database_together_migrate_it_once(postgres_dsn: str, tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            StateStore(tmp_path, shared=shared_state(postgres_dsn)).close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []


# --- PostgreSQL only: what an error shows


def test_the_password_is_masked_in_what_config_status_and_errors_show(postgres_server: PostgresServer,
                                                                      tmp_path: Path) -> None:
    wrong_port = postgres_server.dsn().replace(f":{postgres_server.port}/", ":1/")
    state = shared_state(wrong_port)
    assert state is not None and PASSWORD not in state.shown and PASSWORD not in repr(state)
    with pytest.raises(StateError) as refused:
        StateStore(tmp_path, shared=state)
    assert PASSWORD not in str(refused.value) and "********" in str(refused.value)


def test_a_conninfo_is_accepted_and_its_password_masked() -> None:
    state = shared_state("host=db.example.org dbname=postbote user=postbote password='s3cret word'")
    assert state is not None and "s3cret" not in state.shown and "dbname=postbote" in state.shown


def write_config(tmp_path: Path, state: str) -> Path:
    return harness.write_config(tmp_path / "postbote.yaml", [harness.account("alice", None, tmp_path / "inbox")],
                                state=state)


def test_a_state_that_is_no_connection_string_is_a_config_error_with_file_line_and_key(tmp_path: Path) -> None:
    from postbote.config import load_config
    from postbote.pluginmanager import make_plugin_manager

    with pytest.raises(ConfigError, match=r"postbote.yaml:[0-9]+: state: expected sqlite, a postgresql:// URI "
                                          r"or a libpq conninfo"):
        load_config(write_config(tmp_path, "mysql://somewhere"), make_plugin_manager(entry_points=False))


def test_a_missing_driver_is_a_config_error_with_file_line_and_key(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from postbote.config import load_config
    from postbote.pluginmanager import make_plugin_manager

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "psycopg" else real(name, *a))
    config = write_config(tmp_path, "postgresql://postbote:hunter22@localhost/postbote")
    with pytest.raises(ConfigError, match=r"postbote.yaml:[0-9]+: state: a PostgreSQL state needs the driver "
                                          r"psycopg 3, which is not installed \(pip install "
                                          r"'psycopg\[binary\]>=3.1' beside postbote") as raised:
        load_config(config, make_plugin_manager(entry_points=False))
    assert "hunter22" not in str(raised.value)


# --- PostgreSQL only: leases


@pytest.fixture
def database(postgres_dsn: str, tmp_path: Path) -> Iterator[Callable[[], PostgresDatabase]]:
    """Opens connections to one migrated database: each worker of a test has its own, as separate processes do."""
    StateStore(tmp_path, shared=shared_state(postgres_dsn)).close()
    opened: list[PostgresDatabase] = []

    def open_() -> PostgresDatabase:
        opened.append(PostgresDatabase(shared_state(postgres_dsn)))  # type: ignore[arg-type]
        return opened[-1]

    yield open_
    for connection in opened:
        connection.close()


def board(database: PostgresDatabase, lease: float = 30.0) -> LeaseBoard:
    made = LeaseBoard(database, lease=lease)
    made.join()
    return made


def test_a_claim_takes_due_accounts_soonest_first_up_to_the_limit(database: Callable[[], PostgresDatabase]) -> None:
    worker = board(database())
    worker.add_accounts({"later": 3600.0, "second": -5.0, "first": -10.0, "third": 0.0})
    assert worker.claim(2) == ["first", "second"]
    assert worker.claim(10) == ["third"]
    assert worker.claim(10) == [], "held or not due"


def test_two_claimers_never_get_the_same_account(database: Callable[[], PostgresDatabase]) -> None:
    workers = [board(database()) for _ in range(3)]
    workers[0].add_accounts({f"a{index:03d}": 0.0 for index in range(300)})
    claimed: dict[str, list[str]] = {worker.worker: [] for worker in workers}

    def claim_all(worker: LeaseBoard) -> None:
        while batch := worker.claim(7):
            claimed[worker.worker].extend(batch)

    threads = [threading.Thread(target=claim_all, args=(worker,)) for worker in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    everything = [name for names in claimed.values() for name in names]
    assert sorted(everything) == [f"a{index:03d}" for index in range(300)], "each account claimed exactly once"


def test_an_account_is_due_again_after_its_release_and_not_before(database: Callable[[], PostgresDatabase]) -> None:
    worker = board(database())
    worker.add_accounts({"alice": 0.0})
    assert worker.claim(1) == ["alice"]
    worker.release({"alice": 3600.0}, polls=1)
    assert worker.claim(1) == []
    worker.release({"alice": 0.0})  # no longer held: a release by a worker without the lease changes nothing
    assert worker.claim(1) == []
    worker.make_due(["alice"])
    assert worker.claim(1) == ["alice"]


def test_a_dead_workers_accounts_are_taken_over_when_its_lease_runs_out(
        database: Callable[[], PostgresDatabase]) -> None:
    dead, alive = board(database(), lease=1.0), board(database(), lease=1.0)
    dead.add_accounts({"alice": 0.0})
    assert dead.claim(1) == ["alice"]
    assert alive.claim(1) == [], "the lease is live"
    deadline = time.monotonic() + 30
    while not (taken := alive.claim(1)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert taken == ["alice"]
    assert dead.renew(["alice"]) == {"alice"}, "the dead worker, back, learns it lost the lease"
    assert holders(alive.database)["alice"].worker == alive.worker


def test_a_renewed_lease_is_kept_past_its_first_term(database: Callable[[], PostgresDatabase]) -> None:
    holder, other = board(database(), lease=1.0), board(database(), lease=1.0)
    holder.add_accounts({"alice": 0.0})
    holder.claim(1)
    until = time.monotonic() + 2.5
    while time.monotonic() < until:
        assert holder.renew(["alice"]) == set()
        assert other.claim(1) == []
        time.sleep(0.2)


def test_a_one_shot_poll_waits_for_no_one_but_never_takes_a_held_account(
        database: Callable[[], PostgresDatabase]) -> None:
    daemon, poll = board(database()), board(database())
    daemon.add_accounts({"alice": 3600.0, "bob": 3600.0})
    daemon.make_due(["alice"])
    assert daemon.claim(5) == ["alice"]
    holder = poll.claim_now("alice")
    assert holder is not None and holder.worker == daemon.worker
    assert poll.claim_now("bob") is None, "not due, but free: a poll asked for now takes it"
    assert poll.claim_now("carol") is None, "an account no worker has seen yet"


def test_a_worker_leaving_releases_its_leases_but_those_it_keeps(database: Callable[[], PostgresDatabase]) -> None:
    leaving, other = board(database(), lease=3600.0), board(database())
    leaving.add_accounts({"alice": 0.0, "bob": 0.0})
    assert sorted(leaving.claim(2)) == ["alice", "bob"]
    leaving.leave(keeping=["bob"])
    assert other.claim(5) == ["alice"]
    assert leaving.worker not in {row[0] for row in other.database.query("SELECT id FROM workers")}


def test_a_connection_the_server_dropped_fails_one_call_and_the_next_reconnects(postgres_dsn: str,
                                                                                tmp_path: Path) -> None:
    """A PostgreSQL restart or a network cut mid-run: the poll in hand fails (its mail stays on the server), and the
    worker goes on with a new connection instead of failing every poll until restarted."""
    import psycopg

    store = StateStore(tmp_path, shared=shared_state(postgres_dsn))
    try:
        store.record("alice", "1", DELIVERED)
        with psycopg.connect(postgres_dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE application_name = 'postbote' AND pid <> pg_backend_pid()")
        with pytest.raises(StateError, match="state database postgresql://postbote:\\*+@"):
            store.records("alice")
        assert set(store.records("alice")) == {"1"}
    finally:
        store.close()


def test_the_password_can_stay_out_of_the_config_in_a_libpq_passfile(postgres_server: PostgresServer,
                                                                      tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"{postgres_server.host}:{postgres_server.port}:*:postbote:{PASSWORD}\n")
    passfile.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    store = StateStore(tmp_path, shared=shared_state(postgres_server.dsn(password=False)))
    try:
        store.record("alice", "1", DELIVERED)
        assert set(store.records("alice")) == {"1"}
    finally:
        store.close()


def test_poll_threads_share_a_few_connections_and_never_open_more(postgres_dsn: str, tmp_path: Path) -> None:
    import psycopg
    from postbote.state_postgres import POOL_SIZE

    store = StateStore(tmp_path, shared=shared_state(postgres_dsn))
    errors: list[BaseException] = []

    def poll_like(account: str) -> None:
        try:
            for uid in range(20):
                store.begin_delivery(account, str(uid), SMTP)
                store.record_batch(account, [Outcome(str(uid), DELIVERED)])
                store.records(account)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    try:
        threads = [threading.Thread(target=poll_like, args=(f"a{index}",)) for index in range(3 * POOL_SIZE)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert errors == []
        assert all(len(store.records(f"a{index}")) == 20 for index in range(3 * POOL_SIZE))
        assert store.partly_delivered("a0") == set()
        with psycopg.connect(postgres_dsn) as admin:
            (connections,) = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                                           "'postbote'").fetchone() or (0,)
        assert 1 <= connections <= POOL_SIZE
    finally:
        store.close()
