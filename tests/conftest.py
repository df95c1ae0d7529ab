"""Shared fixtures: a test PKI, real Dovecot instances and SMTP sinks on loopback.

Fixtures
--------
``pki``               session-wide test CA + server certificate (:class:`TestPKI`)
``dovecot``           a fresh Dovecot with TLS (STLS + POP3S), users alice and bob
``dovecot_factory``   ``dovecot_factory(tls=False, users={...}, extra_config="")``
                      for variants; every server made is stopped after the test
``smtp_sink``         a fresh recording SMTP server (:class:`SMTPSink`)
``smtp_sink_factory`` ``smtp_sink_factory(starttls=True, require_starttls=False)``
``make_rig``          ``make_rig(messages, faults=None, target=None, source="pop3", **server_options)``: a
                      fault-suite `tests.harness.Rig` against a started scripted POP3 server, or with
                      ``source="fake"`` against a `FakeMailbox` in memory
``make_setup``        ``make_setup(messages, faults=None, source="pop3")``: a poller-suite
                      `tests.harness.Setup`, likewise
``postbote``           a `tests.harness.Postbote` in ``tmp_path``: write a config, run commands on it
``daemons``           ``daemons(config)``: ``postbote run`` subprocesses (`tests.harness.DaemonRun`), killed after
                      the test if still running
``time_limit``        interrupts the test after the module's ``TIME_LIMIT`` seconds (60 by default); a
                      module opts in with ``pytestmark = pytest.mark.usefixtures("time_limit")``

When the ``dovecot`` binary is missing, Dovecot tests are skipped -- except in
CI (``CI`` set) or with ``POSTBOTE_REQUIRE_DOVECOT=1``, where they fail loudly.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.harness import (
    OAUTH_CLIENT_ID,
    OAUTH_CLIENT_SECRET,
    DaemonRun,
    Postbote,
    RigFactory,
    SetupFactory,
    body_watched,
    fixtures_watched,
    rig_factory,
    setup_factory,
)
from tests.servers.certs import TestPKI, make_test_pki
from tests.servers.dovecot import DEFAULT_USERS, DovecotServer, dovecot_binary
from tests.servers.dovecot_sasl import FakeOAuthProvider
from tests.servers.smtp_sink import SMTPSink

DovecotFactory = Callable[..., DovecotServer]
SinkFactory = Callable[..., SMTPSink]


def dovecot_required() -> bool:
    """CI must never silently skip the tests against the real server."""
    return bool(os.environ.get("CI")) or os.environ.get("POSTBOTE_REQUIRE_DOVECOT") == "1"


def _require_dovecot() -> None:
    if dovecot_binary() is not None:
        return
    message = "the dovecot binary is not installed (apt-get install dovecot-pop3d dovecot-lmtpd)"
    if dovecot_required():
        pytest.fail(f"{message}; CI / POSTBOTE_REQUIRE_DOVECOT=1 requires it", pytrace=False)
    pytest.skip(message)


DOVECOT_FIXTURES = {"dovecot", "dovecot_factory"}
SPAMD_FIXTURES = {"spamd"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests using a real server's fixture get its marker even if unmarked, so that ``-m "not dovecot"`` or
    ``-m "not spamd"`` reliably deselects everything needing that server."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if DOVECOT_FIXTURES & fixtures:
            item.add_marker(pytest.mark.dovecot)
        if SPAMD_FIXTURES & fixtures:
            item.add_marker(pytest.mark.spamd)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Remember each phase's report on the item so fixtures can see failures."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"_report_{report.when}", report)


def _test_failed(request: pytest.FixtureRequest) -> bool:
    return any(
        getattr(getattr(request.node, f"_report_{when}", None), "failed", False)
        for when in ("setup", "call")
    )


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def _dovecot_shutdowns() -> Iterator[list[DovecotServer]]:
    """Servers told to stop; waited for at the end of the session.

    Dovecot's master sleeps a second before exiting, so waiting after every
    test would add a second per test.  The listeners close at once, and every
    server has its own ports and directories, so the stragglers harm no one.
    """
    stopping: list[DovecotServer] = []
    yield stopping
    for server in stopping:
        server.wait_stopped()


@pytest.fixture
def dovecot_factory(
    request: pytest.FixtureRequest, pki: TestPKI, _dovecot_shutdowns: list[DovecotServer]
) -> Iterator[DovecotFactory]:
    _require_dovecot()
    servers: list[DovecotServer] = []

    def make(
        *, tls: bool = True, users: Mapping[str, str] = DEFAULT_USERS, extra_config: str = ""
    ) -> DovecotServer:
        server = DovecotServer(pki=pki, tls=tls, users=users, extra_config=extra_config)
        servers.append(server)
        server.start()
        return server

    yield make

    failed = _test_failed(request)
    for server in servers:
        if failed:
            print(f"\n===== Dovecot log ({server.root}) =====\n{server.log_text()}")
        server.terminate()
        _dovecot_shutdowns[:] = [s for s in _dovecot_shutdowns if not _finished(s)]
        _dovecot_shutdowns.append(server)


def _finished(server: DovecotServer) -> bool:
    """Clean up *server* if its master has exited already; report whether it did."""
    if server.stopped:
        server.wait_stopped()
        return True
    return False


@pytest.fixture
def dovecot(dovecot_factory: DovecotFactory) -> DovecotServer:
    """A running Dovecot with TLS and the users alice and bob, empty mailboxes."""
    return dovecot_factory()


@pytest.fixture
def provider(pki: TestPKI) -> Iterator[FakeOAuthProvider]:
    """A local OAuth2 provider (token endpoint, refresh tokens, access tokens) that knows the test client
    ``OAUTH_CLIENT_ID``; a module that needs one for all its tests overrides this with a module-scoped one."""
    with FakeOAuthProvider(pki) as server:
        server.add_client(OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET)
        yield server


@pytest.fixture
def smtp_sink_factory(pki: TestPKI) -> Iterator[SinkFactory]:
    sinks: list[SMTPSink] = []

    def make(*, starttls: bool = False, require_starttls: bool = False, **kwargs: Any) -> SMTPSink:
        context = pki.server_context() if starttls else None
        sink = SMTPSink(tls_context=context, require_starttls=require_starttls, **kwargs)
        sink.start()
        sinks.append(sink)
        return sink

    yield make
    for sink in sinks:
        sink.stop()


@pytest.fixture
def smtp_sink(smtp_sink_factory: SinkFactory) -> SMTPSink:
    """A running SMTP server on 127.0.0.1 that accepts and records everything."""
    return smtp_sink_factory()


# --- the shared harnesses (tests/harness.py)


@pytest.fixture
def time_limit() -> None:
    """Opts a test in to the time limit that `pytest_runtest_call` below puts on its body."""


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Bound the body of every test (`tests.harness.body_watched`), never its fixtures' set-up or tear-down with
    an interrupt: one landing inside pytest's fixture machinery leaves a fixture cached, and every later test of
    the run would share one ``tmp_path``."""
    with body_watched(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    with fixtures_watched(item, "set-up"):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    with fixtures_watched(item, "tear-down"):
        return (yield)


@pytest.fixture
def make_rig(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RigFactory]:
    yield from rig_factory(tmp_path, request)


@pytest.fixture
def postbote(tmp_path: Path) -> Postbote:
    """A `tests.harness.Postbote`: a config in ``tmp_path`` and the commands to run on it."""
    return Postbote(tmp_path)


@pytest.fixture
def make_setup(tmp_path: Path) -> Iterator[SetupFactory]:
    yield from setup_factory(tmp_path)


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The common default umask, under which files are group- and world-readable unless created otherwise."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.fixture
def daemons() -> Iterator[Callable[..., DaemonRun]]:
    """``daemons(config, **DaemonRun options)``: ``postbote run`` subprocesses, killed after the test if still up."""
    running: list[DaemonRun] = []

    def start(config: Path, **kwargs: Any) -> DaemonRun:
        run = DaemonRun(config, **kwargs)
        running.append(run)
        return run

    yield start
    for run in running:
        if run.process.poll() is None:
            run.process.kill()
            run.wait(5)


# --- PostgreSQL (issue 16: the shared state of several workers)
#
# ``postgres_server``  one private PostgreSQL for the session (`tests.servers.postgres.PostgresServer`), started on
#                      first use and stopped at the end, even after failures
# ``postgres_dsn``     a fresh database on it, as a postgresql:// URI with the password
#
# When PostgreSQL is not installed these tests are skipped -- except in CI (``CI`` set) or with
# ``POSTBOTE_REQUIRE_POSTGRES=1``, where they fail loudly.

POSTGRES_FIXTURES = {"postgres_server", "postgres_dsn"}


def postgres_required() -> bool:
    return bool(os.environ.get("CI")) or os.environ.get("POSTBOTE_REQUIRE_POSTGRES") == "1"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    from tests.servers.postgres import PostgresServer, postgres_bindir

    if postgres_bindir() is None:
        message = "PostgreSQL is not installed (apt-get install postgresql)"
        if postgres_required():
            pytest.fail(f"{message}; CI / POSTBOTE_REQUIRE_POSTGRES=1 requires it", pytrace=False)
        pytest.skip(message)
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_dsn(postgres_server: Any) -> str:
    return str(postgres_server.database())


class _PostgresMarker:
    """Marks the tests using a PostgreSQL fixture ``postgres`` at collection, so that ``-m "not postgres"``
    deselects them (the ``open_state`` parameter ``postgresql`` included); a plugin of its own, beside the
    collection hook above."""

    @staticmethod
    def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
        for item in items:
            callspec = getattr(item, "callspec", None)
            shared = callspec is not None and callspec.params.get("open_state") == "postgresql"
            if shared or POSTGRES_FIXTURES & set(getattr(item, "fixturenames", ())):
                item.add_marker(pytest.mark.postgres)


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(_PostgresMarker(), "postbote-postgres-marker")


@pytest.fixture(params=["sqlite", "postgresql"])
def open_state(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Any]]:
    """Opens one `postbote.state.StateStore` -- again and again, as a restart after a crash does -- on each backend
    in turn: SQLite in ``tmp_path``, then a fresh PostgreSQL database (the same interface: the tests of the store's
    behaviour run against both). Every store opened is closed after the test."""
    from postbote.config import shared_state
    from postbote.state import StateStore

    shared = shared_state(request.getfixturevalue("postgres_dsn")) if request.param == "postgresql" else None
    opened: list[StateStore] = []

    def open_() -> StateStore:
        opened.append(StateStore(tmp_path / "state", shared=shared))
        return opened[-1]

    yield open_
    for store in opened:
        store.close()


@pytest.fixture
def state_store(open_state: Callable[[], Any]) -> Any:
    """One store opened by ``open_state`` (on SQLite, then on PostgreSQL)."""
    return open_state()
