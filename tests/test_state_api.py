"""The state store's keyed tables for plugins (`KeyedTable`), and the wall around SQLite: only ``postbote.state``
opens a database; plugins get tables from it, and readers get a read-only store."""

from __future__ import annotations

import ast
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from postbote.errors import StateError
from postbote.state import DEFERRED, DELIVERED, REJECTED, KeyedTable, LegacyTable, StateStore, read_account_state

REPOSITORY = Path(__file__).resolve().parent.parent
PRODUCT_FOLDERS = ("agent", "plugins")
THE_STATE_STORE = REPOSITORY / "agent" / "state.py"


@pytest.fixture
def table(tmp_path: Path) -> Iterator[KeyedTable]:
    opened = KeyedTable.open(tmp_path, "history")
    yield opened
    opened.close()


# --- the wall


def imported_modules(source: str) -> set[str]:
    """Every module a source text imports absolutely, wherever the import stands (a lazy one in a function too)."""
    modules: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
    return modules


def modules_importing(module: str) -> list[Path]:
    """The product's source files that import ``module`` or one of its submodules."""
    sources = sorted(path for folder in PRODUCT_FOLDERS for path in (REPOSITORY / folder).rglob("*.py"))
    assert len(sources) > 10  # the walk found the real folders, not an empty glob
    return [path for path in sources
            if any(name == module or name.startswith(module + ".")
                   for name in imported_modules(path.read_text(encoding="utf-8")))]


def test_only_the_state_store_imports_sqlite3() -> None:
    assert modules_importing("sqlite3") == [THE_STATE_STORE]


def test_only_the_state_stores_postgresql_layer_imports_the_driver() -> None:
    assert modules_importing("psycopg") == [REPOSITORY / "agent" / "state_postgres.py"]


@pytest.mark.parametrize("source", ["import sqlite3", "import os, sqlite3.dbapi2 as db", "from sqlite3 import connect",
                                    "def lazy():\n    import sqlite3\n",
                                    "class Store:\n    def open(self):\n        from sqlite3 import connect\n"])
def test_the_wall_sees_every_form_of_import(source: str) -> None:
    assert any(name.split(".")[0] == "sqlite3" for name in imported_modules(source))


def test_the_wall_ignores_a_sibling_module_of_the_same_name() -> None:
    assert imported_modules("from . import sqlite3\nfrom .sqlite3 import x\n") == set()


# --- reading an account's polls, read-only


def test_reading_an_account_before_any_poll_is_none_and_creates_nothing(tmp_path: Path) -> None:
    assert read_account_state(tmp_path / "state", "alice") is None
    assert not (tmp_path / "state").exists()
    StateStore(tmp_path / "state").close()
    assert read_account_state(tmp_path / "state", "alice") is None


def test_reading_an_account_gives_its_last_poll_and_waiting_mail_and_leaves_no_file(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.record_poll("alice", ok=True, duration=0.5, counts={"delivered": 2}, error=None)
    store.record("alice", "u2", REJECTED, reason="550 no such user")
    store.record("alice", "u1", DEFERRED, reason="451 try later")
    store.record_poll("bob", ok=True, duration=0.5, counts={}, error=None)
    store.close()
    state = read_account_state(tmp_path, "alice")
    assert state is not None
    assert (state.last_poll.account, state.last_poll.totals, state.last_poll.polls) == ("alice", {"delivered": 2}, 1)
    assert [(message.uid, message.status) for message in state.waiting] == [("u2", REJECTED), ("u1", DEFERRED)]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["postbote.sqlite3"]  # no -wal/-shm, nothing written


def test_reading_sees_each_poll_committed_since_the_last_read(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    try:
        for polls in (1, 2, 3):
            store.record_poll("alice", ok=True, duration=0.1, counts={}, error=None)
            assert read_account_state(tmp_path, "alice").last_poll.polls == polls  # type: ignore[union-attr]
    finally:
        store.close()


def test_an_unreadable_database_is_a_state_error(tmp_path: Path) -> None:
    (tmp_path / "postbote.sqlite3").write_bytes(b"this is not SQLite\n" * 500)
    with pytest.raises(StateError):
        read_account_state(tmp_path, "alice")


# --- a keyed table


def test_entries_are_kept_per_namespace_and_key_with_when_they_were_written(table: KeyedTable) -> None:
    table.put("<m1>", "alice", {"folder": "INBOX", "sizes": [1, 2]}, written=100.0)
    table.put("<m2>", "alice", "other", written=200.0)
    assert table.get("<m1>", "alice") == (entry := table.get_many("<m1>", ["alice", "bob"])["alice"])
    assert (entry.value, entry.written) == ({"folder": "INBOX", "sizes": [1, 2]}, 100.0)
    assert table.get("<m1>", "bob") is None and table.get("<m3>", "alice") is None
    assert table.get("<m2>", "alice").value == "other"  # type: ignore[union-attr]
    assert len(table) == 2


def test_values_are_json_or_bytes_and_none_by_default(table: KeyedTable) -> None:
    table.put("n", "raw", b"\x00\xffbytes")
    table.put("n", "text", "b'not bytes'")
    table.put("n", "number", 1.5)
    table.put("n", "nothing")
    values = {key: entry.value for key, entry in table.get_many("n", ["raw", "text", "number", "nothing"]).items()}
    assert values == {"raw": b"\x00\xffbytes", "text": "b'not bytes'", "number": 1.5, "nothing": None}


def test_writing_a_key_again_replaces_its_value_and_time(table: KeyedTable) -> None:
    table.put_many("<m1>", ["alice", "bob"], written=100.0)
    table.put("<m1>", "alice", 2, written=300.0)
    entries = table.get_many("<m1>", ["alice", "bob"])
    assert {key: (entry.value, entry.written) for key, entry in entries.items()} == {
        "alice": (2, 300.0), "bob": (None, 100.0)}
    assert len(table) == 2


def test_the_written_time_defaults_to_now(table: KeyedTable) -> None:
    before = time.time()
    table.put("n", "k")
    assert before <= table.get("n", "k").written <= time.time()  # type: ignore[union-attr]


def test_since_keeps_only_entries_written_at_or_after_it(table: KeyedTable) -> None:
    table.put("n", "old", written=100.0)
    table.put("n", "edge", written=200.0)
    table.put("n", "new", written=300.0)
    assert sorted(table.get_many("n", ["old", "edge", "new"], since=200.0)) == ["edge", "new"]
    assert table.contains("n", "old") and not table.contains("n", "old", since=101.0)
    assert table.get_many("n", []) == {}


def test_expiring_removes_what_was_written_before_the_cutoff(table: KeyedTable) -> None:
    table.put_many("a", ["1", "2"], written=100.0)
    table.put("b", "1", written=199.0)
    table.put("b", "2", written=200.0)
    assert table.expire_older_than(200.0) == 3
    assert len(table) == 1 and table.contains("b", "2")
    assert table.expire_older_than(200.0) == 0


def test_delete_removes_one_entry(table: KeyedTable) -> None:
    table.put_many("n", ["a", "b"])
    assert table.delete("n", "a") and not table.delete("n", "a")
    assert not table.contains("n", "a") and table.contains("n", "b")


def test_writes_are_committed_when_put_returns(tmp_path: Path) -> None:
    writer = KeyedTable.open(tmp_path, "history")
    writer.put("n", "k", [1], written=5.0)
    reader = KeyedTable.open(tmp_path, "history")  # another connection sees it without any close or sync
    try:
        assert reader.get("n", "k") is not None and reader.get("n", "k").value == [1]  # type: ignore[union-attr]
    finally:
        reader.close()
        writer.close()


def test_a_table_lives_in_its_own_file_beside_the_state_database(tmp_path: Path) -> None:
    KeyedTable.open(tmp_path / "state", "dedupe").close()
    assert (tmp_path / "state" / "dedupe.sqlite3").is_file()
    assert not (tmp_path / "state" / "postbote.sqlite3").exists()


@pytest.mark.parametrize("name", ["", "../escape", "a/b", "postbote.sqlite3", "two words", "postbote"])
def test_a_table_name_is_a_plain_word_not_a_path(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="plugin table name"):
        KeyedTable.open(tmp_path, name)


def test_the_file_and_its_companions_are_private_under_umask_022(tmp_path: Path, umask_022: None) -> None:
    table = KeyedTable.open(tmp_path / "state", "history")
    try:
        table.put("n", "k")
        modes = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "state").iterdir()}
    finally:
        table.close()
    assert modes == {"history.sqlite3": 0o600, "history.sqlite3-wal": 0o600, "history.sqlite3-shm": 0o600}
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    assert table.tightened == []


def test_a_file_left_wider_is_tightened_and_reported(tmp_path: Path, umask_022: None) -> None:
    KeyedTable.open(tmp_path, "history").close()
    (tmp_path / "history.sqlite3").chmod(0o644)
    table = KeyedTable.open(tmp_path, "history")
    table.close()
    assert table.tightened == [(tmp_path / "history.sqlite3", 0o644)]
    assert (tmp_path / "history.sqlite3").stat().st_mode & 0o777 == 0o600


def test_a_writer_waits_the_busy_timeout_for_another_process_then_fails_clearly(tmp_path: Path) -> None:
    table = KeyedTable.open(tmp_path, "history", busy_timeout=0.3)
    other_process = sqlite3.connect(tmp_path / "history.sqlite3", isolation_level=None)  # plays another process
    other_process.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        with pytest.raises(StateError, match="history.sqlite3: database is locked"):
            table.put("n", "k")
        assert 0.25 <= time.monotonic() - started < 5.0
    finally:
        other_process.execute("ROLLBACK")
        other_process.close()
    table.put("n", "k")  # and works again once the lock is gone
    assert table.contains("n", "k")
    table.close()


def test_every_failure_is_a_state_error(tmp_path: Path) -> None:
    (tmp_path / "broken.sqlite3").write_bytes(b"this is not SQLite\n" * 500)
    with pytest.raises(StateError, match=r"cannot open .*broken.sqlite3: file is not a database"):
        KeyedTable.open(tmp_path, "broken")
    table = KeyedTable.open(tmp_path, "history")
    table.close()
    for use in (lambda: table.put("n", "k"), lambda: table.get("n", "k"), lambda: len(table),
                lambda: table.expire_older_than(0.0), lambda: table.delete("n", "k")):
        with pytest.raises(StateError, match="closed database"):
            use()


def test_poll_threads_share_one_table(table: KeyedTable) -> None:
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for n in range(100):
                table.put(f"w{worker}", str(n), n)
                assert table.get(f"w{worker}", str(n)) is not None
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(worker,)) for worker in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == [] and len(table) == 600


# --- an older version's table


OLDER = LegacyTable(table="delivered", namespace="message_id", key="recipient", written="delivered_at")


def write_older_version_file(path: Path, rows: list[tuple[str, str, float]]) -> None:
    """The file as the version before keyed tables wrote it (the dedupe history): written here as that version did."""
    with sqlite3.connect(path) as db:
        db.executescript("CREATE TABLE delivered (message_id TEXT NOT NULL, recipient TEXT NOT NULL, "
                         "delivered_at REAL NOT NULL, PRIMARY KEY (message_id, recipient)) WITHOUT ROWID;"
                         "CREATE INDEX delivered_by_time ON delivered (delivered_at);")
        db.executemany("INSERT INTO delivered VALUES (?, ?, ?)", rows)
    db.close()


def test_an_older_versions_table_is_moved_in_once_and_dropped(tmp_path: Path) -> None:
    write_older_version_file(tmp_path / "history.sqlite3", [("<m1>", "alice", 100.0), ("<m1>", "bob", 150.0),
                                                            ("<m2>", "alice", 200.0)])
    table = KeyedTable.open(tmp_path, "history", legacy=OLDER)
    try:
        assert len(table) == 3
        assert {key: entry.written for key, entry in table.get_many("<m1>", ["alice", "bob"]).items()} == {
            "alice": 100.0, "bob": 150.0}
        assert table.get("<m2>", "alice") == table.get_many("<m2>", ["alice"])["alice"]
    finally:
        table.close()
    with sqlite3.connect(tmp_path / "history.sqlite3") as db:  # reads the file's catalogue, as an upgrade check
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    db.close()
    assert tables == {"entries"}
    reopened = KeyedTable.open(tmp_path, "history", legacy=OLDER)  # a second open finds nothing more to move
    try:
        assert len(reopened) == 3
    finally:
        reopened.close()


def test_a_legacy_table_names_only_plain_identifiers() -> None:
    with pytest.raises(ValueError, match="not a plain SQL identifier"):
        LegacyTable(table="delivered; DROP TABLE entries", namespace="a", key="b", written="c")


# --- a state database an earlier version wrote


def test_a_database_of_the_first_release_is_upgraded_in_place_and_keeps_its_records(tmp_path: Path) -> None:
    """The first release's ``messages`` table: a rowid table without the columns added since (new databases are
    clustered on their key). The store adds the columns and reads and writes it as it does a new one."""
    with sqlite3.connect(tmp_path / "postbote.sqlite3") as db:
        db.execute("CREATE TABLE messages (account TEXT NOT NULL, uid TEXT NOT NULL, status TEXT NOT NULL, "
                   "reason TEXT NOT NULL DEFAULT '', message_id TEXT, size INTEGER, updated REAL NOT NULL, "
                   "PRIMARY KEY (account, uid))")
        db.execute("INSERT INTO messages VALUES ('alice', 'u1', 'delivered', '250 ok', '<m1@x>', 100, 1000.0)")
    db.close()
    store = StateStore(tmp_path)
    try:
        store.record("alice", "u2", DELIVERED, reason="250 queued", size=200, header_digest="d2")
        store.record("alice", "u3", DEFERRED, reason="451 later")
        store.record("alice", "u3", DEFERRED, reason="451 still later")
        records = store.records("alice")
        assert {uid: (record.status, record.reason) for uid, record in records.items()} == {
            "u1": (DELIVERED, "250 ok"), "u2": (DELIVERED, "250 queued"), "u3": (DEFERRED, "451 still later")}
        assert (records["u2"].size, records["u2"].header_digest) == (200, "d2")
        assert [(message.uid, message.attempts) for message in store.waiting("alice")] == [("u3", 2)]
        store.forget("alice", ["u1"])
        assert set(store.records("alice")) == {"u2", "u3"}
    finally:
        store.close()


def test_held_poll_records_stay_held_while_the_database_cannot_be_written(tmp_path: Path) -> None:
    """A write of the held poll records that fails (another process holds the write lock) keeps them, in order,
    for the next write."""
    store = StateStore(tmp_path, busy_timeout=0.05)
    store.hold_poll_records()
    store.record_poll("alice", ok=True, duration=0.1, counts={"delivered": 1}, error=None, may_hold=True)
    blocker = sqlite3.connect(tmp_path / "postbote.sqlite3", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StateError, match="locked"):
            store.write_held_poll_records()
        store.record_poll("alice", ok=False, duration=0.2, counts={}, error="refused", may_hold=True)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    store.write_held_poll_records()
    last = store.last_poll("alice")
    assert last is not None and (last.ok, last.polls, last.totals) == (False, 2, {"delivered": 1})
    store.close()
