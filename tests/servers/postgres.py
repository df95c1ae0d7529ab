"""A private PostgreSQL server on loopback, started and stopped by the tests (and by bench/workers.py).

`PostgresServer` runs Debian's binaries (``pg_config --bindir``, or /usr/lib/postgresql/*/bin): ``initdb`` into a
fresh temporary directory, then ``postgres`` in the foreground on a free loopback port, with its Unix socket in
that directory too (no system cluster, no /var/run). PostgreSQL refuses to run as root: when the tests run as root
(as CI does), the data directory belongs to the ``postgres`` user and the server processes run as it.

The superuser is ``postbote`` with a password (`PASSWORD`), and connections over TCP must give it (SCRAM), so that
tests see what a real deployment sends. `PostgresServer.database` makes a fresh database per test.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from tests.servers import LOOPBACK, free_port, wait_until

PASSWORD = "pg-test-secret"
SUPERUSER = "postbote"
STARTUP_TIMEOUT = 30.0
SHUTDOWN_TIMEOUT = 15.0
SERVICE_USER = "postgres"  # who runs the server when the tests run as root


class PostgresError(RuntimeError):
    """PostgreSQL could not be started; the message includes its log."""


def postgres_bindir() -> Path | None:
    """Where ``initdb`` and ``postgres`` are, or None when PostgreSQL is not installed."""
    candidates: list[str] = []
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        found = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, timeout=10)
        if found.returncode == 0:
            candidates.append(found.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for candidate in candidates:
        if (Path(candidate) / "initdb").is_file() and (Path(candidate) / "postgres").is_file():
            return Path(candidate)
    return None


def _run_as(uid: int | None, gid: int | None) -> None:
    """Runs in the child before exec: drop to the service user (as root), and die with the test process."""
    if gid is not None and uid is not None:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class PostgresServer:
    host = LOOPBACK

    def __init__(self, *, fsync: bool = False, settings: dict[str, str] | None = None) -> None:
        """``fsync=False`` (tests): commits are not flushed to disk, which a test's throwaway cluster never needs;
        bench/workers.py measures with it on. ``settings``: more server settings (``-c key=value``)."""
        self.fsync = fsync
        self.settings = dict(settings or {})
        self.root = Path(tempfile.mkdtemp(prefix="pbpg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root / "run"
        self.log_file = self.root / "postgres.log"
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._databases = 0
        if os.geteuid() == 0:
            service = pwd.getpwnam(SERVICE_USER)
            self._uid: int | None = service.pw_uid
            self._gid: int | None = service.pw_gid
        else:
            self._uid = self._gid = None

    def dsn(self, database: str = "postgres", *, password: bool = True) -> str:
        secret = f":{PASSWORD}" if password else ""
        return f"postgresql://{SUPERUSER}{secret}@{self.host}:{self.port}/{database}"

    def start(self) -> None:
        bindir = postgres_bindir()
        if bindir is None:
            raise PostgresError("PostgreSQL is not installed (apt-get install postgresql)")
        self.root.chmod(0o755)
        self.socket_dir.mkdir()
        password_file = self.root / "password"
        password_file.write_text(PASSWORD + "\n")
        for path in (self.root, self.socket_dir, password_file):
            self._own(path)
        self.log_file.touch()
        self._own(self.log_file)
        subprocess.run([str(bindir / "initdb"), "-D", str(self.data), "-U", SUPERUSER, f"--pwfile={password_file}",
                        "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync"],
                       check=True, capture_output=True, preexec_fn=lambda: _run_as(self._uid, self._gid))
        settings = {"listen_addresses": self.host, "port": str(self.port), "unix_socket_directories":
                    str(self.socket_dir), "fsync": "on" if self.fsync else "off", "max_connections": "200",
                    "shared_buffers": "32MB", "log_min_messages": "warning", "logging_collector": "off",
                    **self.settings}
        with self.log_file.open("ab") as log:
            self._proc = subprocess.Popen(
                [str(bindir / "postgres"), "-D", str(self.data),
                 *(argument for key, value in settings.items() for argument in ("-c", f"{key}={value}"))],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=lambda: _run_as(self._uid, self._gid))
        if not wait_until(self._ready, STARTUP_TIMEOUT) or self._proc.poll() is not None:
            log_text = self.log_text()
            self.stop()
            raise PostgresError(f"PostgreSQL did not start on port {self.port}\n{log_text}")

    def _own(self, path: Path) -> None:
        if self._uid is not None and self._gid is not None:
            os.chown(path, self._uid, self._gid)

    def _ready(self) -> bool:
        if self._proc is None or self._proc.poll() is not None:
            return True  # dead: start() reports it
        import psycopg

        try:
            psycopg.connect(self.dsn(), connect_timeout=2).close()
        except psycopg.OperationalError:
            return False
        return True

    def database(self) -> str:
        """A fresh, empty database; returns its connection URI (with the password)."""
        import psycopg

        self._databases += 1
        name = f"test{self._databases}"
        with psycopg.connect(self.dsn(), autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name}")
        return self.dsn(name)

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def pid(self) -> int | None:
        """The postmaster's pid (its children are the server's other processes)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        """Fast shutdown (SIGINT: sessions ended, no waiting for clients), then the directory goes."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(SHUTDOWN_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()  # the postmaster's children exit when they see it gone
                proc.wait(SHUTDOWN_TIMEOUT)
            deadline = time.monotonic() + SHUTDOWN_TIMEOUT
            while (self.data / "postmaster.pid").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
