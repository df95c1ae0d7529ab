"""The ``dedupe`` plugin: a Message-ID delivered to the same recipients within the window is dropped, and only
real deliveries count. Polls fetch from a `FakeMailbox` in memory into a real Maildir; the clock is injected."""

from __future__ import annotations

import os
import sqlite3
import textwrap
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from postbote.config import Config, load_config
from postbote.errors import ConfigError, StateError
from postbote.jobs import plugins_started as configured
from postbote.message import Message, Verdict
from postbote.pluginmanager import make_plugin_manager
from postbote.plugins import dedupe
from postbote.poll import PollStats
from postbote.poller import Poller
from postbote.state import KeyedTable, StateStore
from postbote.testing import FakeMailbox, FakeSource
from structlog.testing import capture_logs

DAY = 86400.0
START = 1_700_000_000.0


def mail(message_id: str | None = "<m1@example.org>", subject: str = "hello", extra: str = "") -> bytes:
    id_field = f"Message-ID: {message_id}\r\n" if message_id else ""
    return f"From: a@example.org\r\nSubject: {subject}\r\n{id_field}{extra}\r\nbody\r\n".encode()


class FakeClock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(dedupe, "clock", fake)
    return fake


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "postbote.yaml"
    path.write_text(text)
    os.chmod(path, 0o600)
    return path


ACCOUNT = "accounts:\n  - {name: a, host: h, username: u, password: p, deliver: {maildir: m}}\n"


def load(tmp_path: Path, text: str) -> Config:
    return load_config(write_config(tmp_path, textwrap.dedent(text)), make_plugin_manager(entry_points=False))


# --- options ---


def test_window_defaults_to_a_week_and_takes_durations(tmp_path: Path) -> None:
    assert load(tmp_path, "plugins: {dedupe: true}\n" + ACCOUNT).accounts[0].options_for("dedupe").window == 7 * DAY
    config = load(tmp_path, "plugins:\n  dedupe: {window: 1d12h}\n" + ACCOUNT)
    assert config.accounts[0].options_for("dedupe").window == 1.5 * DAY


def test_bad_options_are_reported_with_their_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, "plugins:\n  dedupe:\n    window: soon\n    windw: 1d\n" + ACCOUNT)
    errors = str(caught.value)
    assert "postbote.yaml:3: plugins.dedupe.window: expected a duration such as 30, 30s, 5m or 1h, got 'soon'" in errors
    assert "postbote.yaml:4: plugins.dedupe.windw: unknown key (did you mean 'window'?)" in errors


def test_dedupe_is_off_unless_the_config_names_it(tmp_path: Path) -> None:
    config = load(tmp_path, ACCOUNT)
    assert not config.accounts[0].uses("dedupe")


# --- who counts as the same recipient ---


def test_recipient_keys_follow_reroutes_then_destination_recipients_then_the_account(tmp_path: Path) -> None:
    config = load(tmp_path, """\
        plugins: {dedupe: true}
        accounts:
          - name: mixed
            host: h
            username: u
            password: p
            deliver:
              - smtp: {recipients: [Alice@Example.org, bob@example.org]}
              - lmtp: {recipients: [alice@example.org]}
              - maildir: m
          - {name: disk, host: h, username: u, password: p, deliver: {maildir: m}}
        """)
    mixed, disk = config.accounts
    message = Message.from_bytes(mail())
    assert dedupe.recipient_keys(message, mixed) == ["account:mixed", "alice@example.org", "bob@example.org"]
    assert dedupe.recipient_keys(message, disk) == ["account:disk"]
    message.destinations = [mixed.destinations[1]]
    assert dedupe.recipient_keys(message, disk) == ["alice@example.org"]
    message.recipients = ["Carol@example.org"]
    assert dedupe.recipient_keys(message, disk) == ["carol@example.org"]


def test_message_ids_are_compared_without_folding_whitespace() -> None:
    folded = Message.from_bytes(b"Message-ID:\r\n <m1@example.org>\r\n\r\nx\r\n")
    assert dedupe.normalized_message_id(folded) == "<m1@example.org>"
    assert dedupe.normalized_message_id(Message.from_bytes(b"Message-ID: \r\n\r\nx\r\n")) is None
    assert dedupe.normalized_message_id(Message.from_bytes(b"Subject: x\r\n\r\nx\r\n")) is None


# --- the store ---


def test_a_message_counts_as_seen_only_when_every_recipient_got_it_within_the_window(tmp_path: Path) -> None:
    clock = FakeClock()
    store = dedupe.DedupeStore.open(tmp_path, retention=7 * DAY, clock=clock)
    store.remember("<m1>", ["alice", "bob"])
    clock.advance(DAY)
    assert store.last_delivery("acct", "u2", "<m1>", ["bob", "alice"], 7 * DAY) == START
    assert store.last_delivery("acct", "u2", "<m1>", ["alice", "carol"], 7 * DAY) is None
    assert store.last_delivery("acct", "u2", "<m2>", ["alice"], 7 * DAY) is None
    assert store.last_delivery("acct", "u2", "<m1>", ["alice"], DAY / 2) is None
    store.remember("<m1>", ["alice"])
    assert store.last_delivery("acct", "u2", "<m1>", ["alice"], DAY / 2) == START + DAY
    store.close()


def test_copies_handed_on_earlier_in_the_poll_count_until_released(tmp_path: Path) -> None:
    clock = FakeClock()
    store = dedupe.DedupeStore.open(tmp_path, retention=DAY, clock=clock)
    store.hold("acct", "u1", "<m1>", ["alice"])
    store.remember("<m1>", ["bob"])
    assert store.last_delivery("acct", "u2", "<m1>", ["alice", "bob"], DAY) == START
    assert store.last_delivery("acct", "u1", "<m1>", ["alice"], DAY) is None
    assert store.last_delivery("other", "u2", "<m1>", ["alice"], DAY) is None
    store.release("acct", "u1")
    assert store.last_delivery("acct", "u2", "<m1>", ["alice"], DAY) is None
    store.hold("acct", "u1", "<m1>", ["alice"])
    store.release("acct")
    assert store.last_delivery("acct", "u2", "<m1>", ["alice"], DAY) is None
    store.close()


def test_old_deliveries_are_pruned(tmp_path: Path) -> None:
    clock = FakeClock()
    store = dedupe.DedupeStore.open(tmp_path, retention=2 * DAY, clock=clock)
    store.remember("<old>", ["alice"])
    clock.advance(3 * DAY)
    store.remember("<new>", ["alice"])
    assert len(store.table) == 1 and store.table.contains("<new>", "alice")
    assert store.prune() == 0
    store.close()


def test_the_store_is_safe_for_accounts_polling_in_threads(tmp_path: Path) -> None:
    store = dedupe.DedupeStore.open(tmp_path, retention=DAY)
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for n in range(200):
                store.remember(f"<{worker}.{n}>", [f"r{worker}"])
                store.hold(f"a{worker}", str(n), f"<{worker}.{n}>", [f"r{worker}"])
                assert store.last_delivery(f"a{worker}", "", f"<{worker}.{n}>", [f"r{worker}"], DAY) is not None
                store.release(f"a{worker}", str(n))
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(worker,)) for worker in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(store.table) == 1600
    store.close()


def test_a_broken_database_lets_mail_through_and_says_so(tmp_path: Path, clock: FakeClock) -> None:
    pm = make_plugin_manager(entry_points=False)
    config = load_config(write_config(tmp_path, f"state_dir: {tmp_path}\nplugins: {{dedupe: true}}\n" + ACCOUNT), pm)
    account = config.accounts[0]
    with configured(pm, config):
        account.options_for("dedupe").store.table.close()
        with capture_logs() as events:
            assert dedupe.filter_message(Message.from_bytes(mail()), account) is None
    assert events[0]["event"] == "dedupe.check_failed"


def test_filtering_without_configure_is_an_error_not_a_silent_pass(tmp_path: Path) -> None:
    account = load(tmp_path, "plugins: {dedupe: true}\n" + ACCOUNT).accounts[0]
    with pytest.raises(RuntimeError, match="dedupe is not configured"):
        dedupe.filter_message(Message.from_bytes(mail()), account)


def test_unconfigure_closes_the_database(tmp_path: Path, clock: FakeClock) -> None:
    pm = make_plugin_manager(entry_points=False)
    config = load_config(write_config(tmp_path, f"state_dir: {tmp_path}\nplugins: {{dedupe: true}}\n" + ACCOUNT), pm)
    with configured(pm, config):
        store = config.accounts[0].options_for("dedupe").store
        assert (tmp_path / dedupe.DATABASE_NAME).exists()
    assert config.accounts[0].options_for("dedupe").store is None
    with pytest.raises(StateError, match="closed database"):
        len(store.table)


# --- end to end ---


@dataclass
class Mailbox:
    """One account of the test config: its mailbox (a FakeMailbox: ``server``), its Maildir, its own ``plugins:``
    line."""

    name: str
    server: FakeMailbox
    maildir: Path
    plugins: str = ""
    deliver: str = ""

    def yaml(self) -> str:
        deliver = self.deliver or f"deliver: {{maildir: {self.maildir}}}"
        lines = [f"- name: {self.name}", "  protocol: fake", "  timeout: 2s", f"  {deliver}"]
        if self.plugins:
            lines.append(f"  plugins: {self.plugins}")
        return "".join(f"  {line}\n" for line in lines)

    def delivered(self) -> list[bytes]:
        folder = self.maildir / "new"
        return [p.read_bytes() for p in sorted(folder.iterdir())] if folder.is_dir() else []


class Agent:
    """Writes the config, then polls every mailbox the way ``postbote poll`` does (configure … unconfigure)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.mailboxes: list[Mailbox] = []
        self.plugins = "plugins:\n  dedupe: {window: 7d}\n"
        self.source = FakeSource()

    def mailbox(self, name: str, **options: str) -> Mailbox:
        box = Mailbox(name, self.source.mailbox(name), self.tmp_path / f"Maildir-{name}", **options)
        self.mailboxes.append(box)
        return box

    def poll(self) -> dict[str, PollStats]:
        accounts = "".join(box.yaml() for box in self.mailboxes)
        path = write_config(self.tmp_path, f"state_dir: {self.tmp_path / 'state'}\n{self.plugins}accounts:\n{accounts}")
        pm = make_plugin_manager(entry_points=False, extra=[self.source])
        config = load_config(path, pm)
        store = StateStore(config.state_dir)
        try:
            with configured(pm, config):
                poller = Poller(pm, store)
                return {account.name: poller.poll(account) for account in config.accounts}
        finally:
            store.close()


@pytest.fixture
def agent(tmp_path: Path, clock: FakeClock) -> Agent:
    return Agent(tmp_path)


def test_a_second_copy_within_the_window_is_dropped_and_deleted_from_the_server(agent: Agent,
                                                                                clock: FakeClock) -> None:
    box = agent.mailbox("a")
    box.server.add(mail())
    assert agent.poll()["a"].delivered == 1
    clock.advance(6 * DAY)
    box.server.add(mail(subject="the same, again"))
    stats = agent.poll()["a"]
    assert (stats.delivered, stats.dropped, stats.deleted) == (0, 1, 1)
    assert box.server.uids() == [] and len(box.delivered()) == 1


def test_a_copy_after_the_window_is_delivered_again(agent: Agent, clock: FakeClock) -> None:
    box = agent.mailbox("a")
    box.server.add(mail())
    agent.poll()
    clock.advance(7 * DAY + 1)
    box.server.add(mail())
    assert agent.poll()["a"].delivered == 1
    assert len(box.delivered()) == 2


def test_two_copies_in_one_poll_deliver_one(agent: Agent) -> None:
    box = agent.mailbox("a")
    box.server.add(mail())
    box.server.add(mail())
    stats = agent.poll()["a"]
    assert (stats.delivered, stats.dropped, stats.deleted) == (1, 1, 2)


def test_a_copy_failing_earlier_in_the_poll_does_not_hold_back_the_next(agent: Agent, tmp_path: Path) -> None:
    agent.plugins += (f"  rules: {{rules: [{{match: {{header: X-Broken}}, "
                      f"action: {{deliver: {{maildir: {{path: {tmp_path / 'missing'}, create: false}}}}}}}}]}}\n")
    box = agent.mailbox("a")
    box.server.add(mail(extra="X-Broken: yes\r\n"))
    box.server.add(mail())
    first = agent.poll()["a"]
    assert (first.deferred, first.delivered, first.dropped) == (1, 1, 0)
    second = agent.poll()["a"]
    assert (second.dropped, second.deleted) == (1, 1)
    assert box.server.uids() == [] and len(box.delivered()) == 1


def test_messages_without_message_id_are_never_dropped(agent: Agent) -> None:
    box = agent.mailbox("a")
    box.server.add(mail(message_id=None))
    box.server.add(mail(message_id=None))
    assert agent.poll()["a"].delivered == 2


def test_a_copy_whose_delivery_failed_does_not_count(agent: Agent, tmp_path: Path) -> None:
    """Recording at filter time would drop the retry of a deferred message: it would never be delivered."""
    box = agent.mailbox("a", deliver=f"deliver: {{maildir: {{path: {tmp_path / 'missing'}, create: false}}}}")
    box.server.add(mail())
    assert agent.poll()["a"].deferred == 1
    box.deliver = ""
    stats = agent.poll()["a"]
    assert (stats.delivered, stats.dropped) == (1, 0)
    assert box.server.uids() == [] and len(box.delivered()) == 1


def test_a_copy_dropped_by_another_filter_does_not_count(agent: Agent) -> None:
    agent.plugins += "  rules: {rules: [{match: {header: X-Junk}, action: drop}]}\n"
    box = agent.mailbox("a")
    box.server.add(mail(extra="X-Junk: yes\r\n"))
    box.server.add(mail())
    stats = agent.poll()["a"]
    assert (stats.dropped, stats.delivered) == (1, 1)
    assert len(box.delivered()) == 1 and b"X-Junk" not in box.delivered()[0]


def test_accounts_delivering_to_different_places_do_not_dedupe_each_other(agent: Agent) -> None:
    a, b = agent.mailbox("a"), agent.mailbox("b")
    a.server.add(mail())
    b.server.add(mail())
    stats = agent.poll()
    assert (stats["a"].delivered, stats["b"].delivered) == (1, 1)


def test_an_account_with_dedupe_disabled_delivers_every_copy(agent: Agent) -> None:
    deduped, plain = agent.mailbox("deduped"), agent.mailbox("plain", plugins="{dedupe: false}")
    for _ in range(2):
        deduped.server.add(mail())
        plain.server.add(mail())
        agent.poll()
    assert (len(deduped.delivered()), len(plain.delivered())) == (1, 2)
    history = KeyedTable.open(agent.tmp_path / "state", dedupe.TABLE_NAME)
    try:
        assert len(history) == 1 and history.contains("<m1@example.org>", "account:deduped")
    finally:
        history.close()


def test_rerouted_copies_count_per_envelope_recipient(agent: Agent, smtp_sink) -> None:
    agent.plugins += "  rules: {rules: [{match: {header: X-For, exact: bob}, action: {reroute: [bob@localhost]}}]}\n"
    box = agent.mailbox("a", deliver=f"deliver: {{smtp: {{host: 127.0.0.1, port: {smtp_sink.port}, "
                                     f"recipients: [alice@localhost]}}}}")
    box.server.add(mail())
    box.server.add(mail(extra="X-For: bob\r\n"))
    box.server.add(mail(extra="X-For: bob\r\n"))
    box.server.add(mail())
    stats = agent.poll()["a"]
    assert (stats.delivered, stats.dropped) == (2, 2)
    assert sorted(m.rcpt_tos for m in smtp_sink.messages) == [["alice@localhost"], ["bob@localhost"]]


def test_the_drop_reason_says_when_the_first_copy_arrived(tmp_path: Path, clock: FakeClock) -> None:
    pm = make_plugin_manager(entry_points=False)
    config = load_config(write_config(tmp_path, f"state_dir: {tmp_path}\nplugins: {{dedupe: true}}\n" + ACCOUNT), pm)
    account = config.accounts[0]
    with configured(pm, config):
        dedupe.message_delivered(Message.from_bytes(mail()), account)
        clock.advance(60)
        assert dedupe.filter_message(Message.from_bytes(mail()), account) == Verdict.drop(
            "duplicate of a message delivered at 2023-11-14T22:13:20Z")


def file_modes(directory: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mode & 0o777 for path in directory.iterdir()}


def test_the_history_and_its_wal_files_are_private_under_umask_022(tmp_path: Path, clock: FakeClock,
                                                                   umask_022: None) -> None:
    """The history holds Message-IDs and recipients: owner-only, whatever the umask outside systemd."""
    pm = make_plugin_manager(entry_points=False)
    config = load_config(write_config(tmp_path, f"state_dir: {tmp_path}/state\nplugins: {{dedupe: true}}\n"
                                      + ACCOUNT), pm)
    with configured(pm, config):
        dedupe.message_delivered(Message.from_bytes(mail()), config.accounts[0])
        modes = file_modes(tmp_path / "state")
    assert {"dedupe.sqlite3", "dedupe.sqlite3-wal", "dedupe.sqlite3-shm"} <= set(modes)
    assert {name: mode for name, mode in modes.items() if name.startswith("dedupe")} == {
        name: 0o600 for name in modes if name.startswith("dedupe")}


def test_a_history_left_world_readable_by_an_older_version_is_made_private(tmp_path: Path,
                                                                           umask_022: None) -> None:
    path = tmp_path / dedupe.DATABASE_NAME
    dedupe.DedupeStore.open(tmp_path, retention=DAY).close()
    os.chmod(path, 0o644)
    with capture_logs() as events:
        store = dedupe.DedupeStore.open(tmp_path, retention=DAY)
    try:
        store.remember("<m1@example.org>", ["alice"])
        assert {name: mode for name, mode in file_modes(tmp_path).items()} == {
            "dedupe.sqlite3": 0o600, "dedupe.sqlite3-wal": 0o600, "dedupe.sqlite3-shm": 0o600}
    finally:
        store.close()
    assert [(e["event"], e["path"], e["mode"]) for e in events] == [
        ("dedupe.permissions_tightened", str(path), "0o644")]


# --- upgrading from the history's own schema


def write_history_of_the_previous_version(state_dir: Path, rows: list[tuple[str, str, float]]) -> None:
    """``dedupe.sqlite3`` as the version before the state store's keyed tables wrote it (its own schema)."""
    state_dir.mkdir(mode=0o700)
    with sqlite3.connect(state_dir / dedupe.DATABASE_NAME) as db:
        db.executescript("CREATE TABLE delivered (message_id TEXT NOT NULL, recipient TEXT NOT NULL, "
                         "delivered_at REAL NOT NULL, PRIMARY KEY (message_id, recipient)) WITHOUT ROWID;"
                         "CREATE INDEX delivered_by_time ON delivered (delivered_at);")
        db.executemany("INSERT INTO delivered VALUES (?, ?, ?)", rows)
    db.close()


def test_a_history_written_by_the_previous_version_still_drops_its_copies(agent: Agent, clock: FakeClock) -> None:
    """Upgrading must not forget the window: a copy of mail delivered before the upgrade is still a duplicate."""
    write_history_of_the_previous_version(agent.tmp_path / "state", [
        ("<m1@example.org>", "account:a", START - DAY),  # delivered yesterday by the previous version
        ("<m2@example.org>", "account:a", START - 8 * DAY),  # outside the window
    ])
    box = agent.mailbox("a")
    box.server.add(mail("<m1@example.org>"))
    box.server.add(mail("<m2@example.org>"))
    stats = agent.poll()["a"]
    assert (stats.dropped, stats.delivered) == (1, 1)
    assert [b"<m2@example.org>" in message for message in box.delivered()] == [True]
    history = KeyedTable.open(agent.tmp_path / "state", dedupe.TABLE_NAME)
    try:
        assert history.get("<m1@example.org>", "account:a").written == START - DAY  # type: ignore[union-attr]
    finally:
        history.close()
