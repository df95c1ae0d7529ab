"""A private Dovecot 2.3 instance on loopback, started and stopped by the tests.

Each :class:`DovecotServer` gets its own directory holding the configuration,
``base_dir`` (sockets, pid file), ``state_dir``, the log, a passwd-file with the
users and their Maildirs, and it listens on freshly picked loopback ports:

* ``pop3_port``  -- plain POP3; offers ``STLS`` when TLS is enabled
* ``pop3s_port`` -- POP3 over implicit TLS (``None`` when TLS is disabled)
* ``imap_port``  -- plain IMAP; offers ``STARTTLS`` when TLS is enabled
* ``imaps_port`` -- IMAP over implicit TLS (``None`` when TLS is disabled)
* ``lmtp_port`` and ``lmtp_socket`` -- LMTP over TCP and a unix socket

Running as root (how CI runs): Dovecot refuses mail access as root outright
("Mail access not allowed for root", not configurable for pop3/lmtp), so the
mail processes run as ``nobody`` and :meth:`DovecotServer.add_user` /
:meth:`DovecotServer.deliver` chown the Maildirs and messages they create to
it.  Dovecot's helper users (``dovecot``, ``dovenull``, created by the Debian
package) run the auth and login processes as usual.  Running as an ordinary
user works too: then every Dovecot process runs as that user, nothing is
chrooted and no chown is needed.
"""

from __future__ import annotations

import contextlib
import ctypes
import grp
import itertools
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from tests.servers import LOOPBACK, free_port, wait_until
from tests.servers.certs import TestPKI

DEFAULT_USERS: Mapping[str, str] = {"alice": "alice-secret", "bob": "bob-secret"}
STARTUP_TIMEOUT = 15.0
SHUTDOWN_TIMEOUT = 10.0
DEBIAN_PATHS = ("/usr/sbin", "/usr/bin", "/usr/local/sbin")


class DovecotError(RuntimeError):
    """Dovecot could not be started or misbehaved; the message includes its log."""


def _find_tool(name: str) -> str | None:
    """Look for *name* on PATH and in the sbin directories a user's PATH may lack."""
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(DEBIAN_PATHS))


def dovecot_binary() -> str | None:
    """Path of the ``dovecot`` master binary, or ``None`` when not installed."""
    return _find_tool("dovecot")


def _set_parent_death_signal() -> None:
    """Runs in the child before exec: if the test process dies, Dovecot gets SIGTERM.

    This keeps a killed pytest run from leaving a Dovecot behind (Linux only).
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time) for every process visible in /proc."""
    table: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may contain spaces and parentheses.
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry.name)] = (int(fields[1]), fields[19])
    return table


def _descendants(root_pid: int) -> dict[int, str]:
    """pid -> start time of all processes below *root_pid* (not including it)."""
    table = _process_table()
    found: dict[int, str] = {}
    frontier = [root_pid]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, started) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = started
                frontier.append(pid)
    return found


def _still_running(pid: int, started: str) -> bool:
    """Whether *pid* is alive and still the same process (not a reused pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[19] == started and fields[0] != "Z"


def _mail_ids() -> tuple[int, int]:
    """uid/gid the mail processes run as: ``nobody`` for root, else ourselves."""
    if os.geteuid() != 0:
        return os.getuid(), os.getgid()
    nobody = pwd.getpwnam("nobody")
    return nobody.pw_uid, nobody.pw_gid


class _MaildirNames:
    """Unique Maildir file names whose time part strictly increases.

    Dovecot assigns UIDs to new mails in the order of the time stamp at the
    start of their file names, so increasing names keep POP3's message order
    equal to the delivery order.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = 0
        self._counter = itertools.count()
        self._host = socket.gethostname().replace("/", "_").replace(":", "_") or "localhost"

    def next(self) -> str:
        with self._lock:
            now_us = max(time.time_ns() // 1000, self._last + 1)
            self._last = now_us
            seconds, micros = divmod(now_us, 1_000_000)
            return f"{seconds}.M{micros}P{os.getpid()}Q{next(self._counter)}.{self._host}"


_NAMES = _MaildirNames()


def _maildir_sort_key(path: Path) -> tuple[int, int, str]:
    """Order Maildir files the way Dovecot numbers them: by their time stamp."""
    match = re.match(r"(\d+)(?:\.M(\d+))?", path.name)
    if match is None:
        return (0, 0, path.name)
    return (int(match.group(1)), int(match.group(2) or 0), path.name)


class DovecotServer:
    """A Dovecot master process serving POP3 and LMTP for a few test users.

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    host = LOOPBACK

    def __init__(
        self,
        root: Path | None = None,
        *,
        pki: TestPKI | None = None,
        tls: bool = True,
        users: Mapping[str, str] = DEFAULT_USERS,
        extra_config: str = "",
        clients: int | None = None,
        login_reuse: bool = False,
    ) -> None:
        """Prepare (but do not start) a server.

        *clients*: limits raised for that many simultaneous connections
        (process, client and per-user limits; None keeps Dovecot's).
        *login_reuse*: login processes serve many connections each
        (``service_count = 0``, Dovecot's high-performance mode), so TLS
        sessions can be resumed; by default each connection gets its own.

        *root* must be short: unix socket paths are limited to 107 bytes.  By
        default a fresh directory under the system temp dir is used and
        removed again by :meth:`stop`.  *tls* needs a *pki*; with ``tls=False``
        Dovecot runs with ``ssl = no``, so the plain port does not offer STLS
        and there is no POP3S port.
        """
        if tls and pki is None:
            raise ValueError("tls=True needs a pki (see tests.servers.certs.make_test_pki)")
        self._owns_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="pbdc-")) if root is None else root
        # The auth process runs as the unprivileged "dovecot" user and must be
        # able to reach the passwd-file; mkdtemp's 0700 would stop it.
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        self.pki = pki
        self.tls = tls
        self.extra_config = extra_config
        self.clients = clients
        self.login_reuse = login_reuse
        self.config_file = self.root / "dovecot.conf"
        self.base_dir = self.root / "run"
        self.state_dir = self.root / "state"
        self.home_root = self.root / "home"
        self.passwd_file = self.root / "passwd"
        self.log_file = self.root / "dovecot.log"
        self.stderr_file = self.root / "dovecot.stderr"
        self.lmtp_socket = self.base_dir / "lmtp"
        self.pop3_port = free_port()
        self.pop3s_port: int | None = free_port() if tls else None
        self.imap_port = free_port()
        self.imaps_port: int | None = free_port() if tls else None
        self.lmtp_port = free_port()
        self.uid, self.gid = _mail_ids()
        self.users: dict[str, str] = {}
        self._users_lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopping: dict[int, str] | None = None
        for name, password in users.items():
            self.add_user(name, password)

    # -- lifecycle ---------------------------------------------------------

    @property
    def ca_file(self) -> Path | None:
        """The CA certificate clients need to trust this server (``None`` without TLS)."""
        return self.pki.ca_file if self.tls and self.pki else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._stopping is None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Start Dovecot and return once every listener accepts connections."""
        binary = dovecot_binary()
        if binary is None:
            raise DovecotError("the dovecot binary was not found (apt-get install dovecot-pop3d dovecot-lmtpd)")
        self.state_dir.mkdir(exist_ok=True)
        self.config_file.write_text(self.render_config())
        with self.stderr_file.open("wb") as stderr:
            self._proc = subprocess.Popen(
                [binary, "-F", "-c", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=subprocess.STDOUT,
                preexec_fn=_set_parent_death_signal,
            )
        ready = wait_until(self._ready, timeout)
        exited = self._proc.poll()
        if not ready or exited is not None:
            state = f"exited with status {exited}" if exited is not None else f"not ready after {timeout}s"
            self.terminate()
            log = self.log_text()
            self.wait_stopped()
            raise DovecotError(f"Dovecot {state}\n{log}")

    def _ready(self) -> bool:
        if self._proc is None or self._proc.poll() is not None:
            return True  # dead: stop waiting, start() reports it
        return (
            self._greets(self.pop3_port, b"+OK")
            and (self.pop3s_port is None or self._accepts(self.pop3s_port))
            and self._greets(self.imap_port, b"* OK")
            and (self.imaps_port is None or self._accepts(self.imaps_port))
            and self._greets(self.lmtp_port, b"220")
            and self.lmtp_socket.is_socket()
        )

    def _accepts(self, port: int) -> bool:
        try:
            with socket.create_connection((self.host, port), timeout=1.0):
                return True
        except OSError:
            return False

    def _greets(self, port: int, greeting: bytes) -> bool:
        try:
            with socket.create_connection((self.host, port), timeout=2.0) as sock:
                return sock.recv(64).startswith(greeting)
        except OSError:
            return False

    def stop(self, timeout: float = SHUTDOWN_TIMEOUT) -> None:
        """Stop Dovecot and make sure none of its processes is left behind."""
        self.terminate()
        self.wait_stopped(timeout)

    def terminate(self) -> None:
        """Ask Dovecot to shut down without waiting for it (see :meth:`wait_stopped`).

        The listeners close at once, but the master then sleeps a hard-coded
        second to let its log process flush.  Fixtures therefore terminate
        servers after each test and wait for them all at the end of the session.
        """
        if self._proc is None or self._stopping is not None:
            return
        self._stopping = _descendants(self._proc.pid)
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)

    @property
    def stopped(self) -> bool:
        """Whether the master has exited (its children may still be on their way out)."""
        return self._proc is None or self._proc.poll() is not None

    def wait_stopped(self, timeout: float = SHUTDOWN_TIMEOUT) -> None:
        """Wait until the master and all its children have exited; clean up."""
        self.terminate()
        proc, self._proc = self._proc, None
        children, self._stopping = self._stopping or {}, None
        if proc is not None:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
            self._reap(children, timeout)
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    @staticmethod
    def _reap(children: Mapping[int, str], timeout: float) -> None:
        """SIGKILL any child the master did not take down with it."""
        if wait_until(lambda: not any(_still_running(p, s) for p, s in children.items()), timeout):
            return
        for pid, started in children.items():
            if _still_running(pid, started):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def process_ids(self) -> set[int]:
        """The master's pid and those of all its descendants."""
        if self._proc is None:
            return set()
        return {self._proc.pid, *_descendants(self._proc.pid)}

    def __enter__(self) -> DovecotServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- configuration -----------------------------------------------------

    def render_config(self) -> str:
        """The complete dovecot.conf (no include of the system configuration)."""
        return "\n".join(
            [
                "# Generated by tests/servers/dovecot.py -- a private test instance.",
                f"instance_name = postbote-test-{self.pop3_port}",
                f"base_dir = {self.base_dir}",
                f"state_dir = {self.state_dir}",
                f"listen = {self.host}",
                "protocols = pop3 imap lmtp",
                "",
                f"log_path = {self.log_file}",
                "auth_verbose = yes",
                "",
                self._privilege_config(),
                "",
                "mail_location = maildir:~/Maildir",
                "mail_fsync = never",
                "",
                "auth_mechanisms = plain login",
                "disable_plaintext_auth = no",
                "auth_cache_size = 0",
                "auth_failure_delay = 0",  # tests with wrong passwords need no 2 s penalty
                "passdb {",
                "  driver = passwd-file",
                f"  args = scheme=PLAIN username_format=%u {self.passwd_file}",
                "}",
                "userdb {",
                "  driver = passwd-file",
                f"  args = username_format=%u {self.passwd_file}",
                "}",
                "",
                self._tls_config(),
                "",
                "service pop3-login {",
                "  inet_listener pop3 {",
                f"    address = {self.host}",
                f"    port = {self.pop3_port}",
                "  }",
                self._pop3s_listener(),
                "}",
                "service imap-login {",
                "  inet_listener imap {",
                f"    address = {self.host}",
                f"    port = {self.imap_port}",
                "  }",
                self._imaps_listener(),
                "}",
                "protocol imap {",
                "  imap_idle_notify_interval = 2 mins",
                "}",
                "service lmtp {",
                "  unix_listener lmtp {",
                "    mode = 0666",
                "  }",
                "  inet_listener lmtp {",
                f"    address = {self.host}",
                f"    port = {self.lmtp_port}",
                "  }",
                "}",
                "protocol lmtp {",
                "  postmaster_address = postmaster@example.org",
                "}",
                "",
                "# No auth penalty: after a failed login anvil would delay every further",
                "# login from 127.0.0.1 by 2-15 s.  The auth process finds the penalty",
                "# socket inaccessible and disables the feature (2.3 has no setting).",
                "service anvil {",
                "  unix_listener anvil-auth-penalty {",
                "    mode = 0",
                "  }",
                "}",
                "",
                self._scale_config(),
                self.extra_config,
                "",
            ]
        )

    def _scale_config(self) -> str:
        """The limits for `clients` connections and the login processes' reuse (both off by default)."""
        lines = []
        if self.clients is not None:
            processes = self.clients + 100
            lines += [
                f"default_process_limit = {processes}",
                f"default_client_limit = {4 * self.clients + 1000}",
                "mail_max_userip_connections = 50",
                *(f"service {name} {{\n  process_limit = {processes}\n}}" for name in ("pop3", "imap")),
            ]
        if self.login_reuse or self.clients is not None:
            login = ["service_count = 0", "process_min_avail = 2"] if self.login_reuse else []
            if self.clients is not None:
                login.append(f"process_limit = {self.clients + 100}")
            lines += [f"service {name} {{\n" + "".join(f"  {line}\n" for line in login) + "}"
                      for name in ("pop3-login", "imap-login")]
        return "\n".join(lines)

    def _privilege_config(self) -> str:
        lines = [
            f"first_valid_uid = {self.uid}",
            f"first_valid_gid = {self.gid}",
        ]
        if os.geteuid() != 0:
            # Unprivileged: no user switching and no chroot are possible.
            me = pwd.getpwuid(self.uid).pw_name
            my_group = grp.getgrgid(self.gid).gr_name
            lines += [
                f"default_login_user = {me}",
                f"default_internal_user = {me}",
                f"default_internal_group = {my_group}",
                "service pop3-login {\n  chroot =\n}",
                "service imap-login {\n  chroot =\n}",
                "service anvil {\n  chroot =\n}",
            ]
        return "\n".join(lines)

    def _tls_config(self) -> str:
        if not self.tls:
            return "ssl = no"
        assert self.pki is not None
        return "\n".join(
            [
                "ssl = yes",
                f"ssl_cert = <{self.pki.cert_file}",
                f"ssl_key = <{self.pki.key_file}",
                "ssl_min_protocol = TLSv1.2",
            ]
        )

    def _pop3s_listener(self) -> str:
        if self.pop3s_port is None:
            return ""
        return "\n".join(
            [
                "  inet_listener pop3s {",
                f"    address = {self.host}",
                f"    port = {self.pop3s_port}",
                "    ssl = yes",
                "  }",
            ]
        )

    def _imaps_listener(self) -> str:
        if self.imaps_port is None:
            return ""
        return "\n".join(
            [
                "  inet_listener imaps {",
                f"    address = {self.host}",
                f"    port = {self.imaps_port}",
                "    ssl = yes",
                "  }",
            ]
        )

    # -- users and mailboxes -----------------------------------------------

    def add_user(self, name: str, password: str) -> None:
        """Add a user (or change their password); works while Dovecot runs.

        Dovecot re-reads the passwd-file when its size or mtime changed.
        """
        self.add_users({name: password})

    def add_users(self, users: Mapping[str, str]) -> None:
        """`add_user` for many users, with one write of the passwd-file (thousands of users stay quick)."""
        for value in (value for pair in users.items() for value in pair):
            if not value or re.search(r"[:\s]", value):
                raise ValueError(f"user names and passwords must be non-empty without ':' or blanks: {value!r}")
        with self._users_lock:
            for name, password in users.items():
                self.users[name] = password
                self._make_maildir(name)
            lines = [
                f"{user}:{{PLAIN}}{secret}:{self.uid}:{self.gid}::{self.home_root / user}::\n"
                for user, secret in self.users.items()
            ]
            staging = self.passwd_file.with_suffix(".new")
            staging.write_text("".join(lines))
            staging.chmod(0o644)
            staging.replace(self.passwd_file)

    def _make_maildir(self, user: str) -> None:
        home = self.home_root / user
        for path in (home, self.maildir(user), *(self.maildir(user) / sub for sub in ("new", "cur", "tmp"))):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._own(path)

    def _own(self, path: Path) -> None:
        """Hand *path* to the mail user (only needed when that is not us)."""
        if (os.geteuid(), os.getegid()) != (self.uid, self.gid):
            os.chown(path, self.uid, self.gid)

    def password(self, user: str) -> str:
        return self.users[user]

    def maildir(self, user: str) -> Path:
        return self.home_root / user / "Maildir"

    def deliver(self, user: str, data: bytes) -> Path:
        """Put *data* into *user*'s mailbox as a new message, byte for byte.

        The message is written to ``tmp/`` and renamed into ``new/`` as the
        Maildir convention demands.  Line endings are stored as given; Dovecot
        serves LF-only files with CRLF line endings over POP3.
        """
        if user not in self.users:
            raise KeyError(f"unknown user {user!r}; add_user() first")
        name = _NAMES.next()
        staging = self.maildir(user) / "tmp" / name
        staging.write_bytes(data)
        self._own(staging)
        target = self.maildir(user) / "new" / name
        staging.replace(target)
        return target

    def message_files(self, user: str) -> list[Path]:
        """The files of *user*'s messages, in Dovecot's (delivery) order."""
        maildir = self.maildir(user)
        files = [p for sub in ("new", "cur") for p in (maildir / sub).iterdir() if p.is_file()]
        return sorted(files, key=_maildir_sort_key)

    def messages(self, user: str) -> list[bytes]:
        """The contents of the messages currently in *user*'s mailbox."""
        for _ in range(10):
            try:
                return [path.read_bytes() for path in self.message_files(user)]
            except FileNotFoundError:  # Dovecot moved a file new/ -> cur/ under our feet
                continue
        raise DovecotError(f"{user}'s Maildir keeps changing while being read")

    def count(self, user: str) -> int:
        return len(self.message_files(user))

    # -- logs ----------------------------------------------------------------

    def log_text(self) -> str:
        """Dovecot's log plus anything the master printed (startup errors)."""
        parts = []
        for path in (self.stderr_file, self.log_file):
            try:
                text = path.read_text(errors="replace")
            except FileNotFoundError:
                continue
            if text:
                parts.append(f"--- {path} ---\n{text}")
        return "\n".join(parts) or "(Dovecot wrote no log)"

    def log_mark(self) -> int:
        """The log's current length, for :meth:`wait_for_log` ``since=``."""
        try:
            return len(self.log_file.read_text(errors="replace"))
        except FileNotFoundError:
            return 0

    def new_log(self, since: int = 0) -> str:
        """The log's text from offset *since* (a :meth:`log_mark`) on."""
        try:
            return self.log_file.read_text(errors="replace")[since:]
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str, timeout: float = 5.0, since: int = 0) -> re.Match[str]:
        """Wait until the log (from *since* on) matches *pattern*, a multi-line regex.

        Log lines arrive asynchronously through Dovecot's log process, so tests
        looking for a line written at disconnect must wait for it.  Pass
        ``since=server.log_mark()`` taken before the action to ignore older
        lines (e.g. those of the start-up probes).
        """
        regex = re.compile(pattern, re.MULTILINE)
        found: list[re.Match[str]] = []

        def seen() -> bool:
            match = regex.search(self.new_log(since))
            if match:
                found.append(match)
            return match is not None

        if not wait_until(seen, timeout):
            raise AssertionError(f"no log line matching {pattern!r} within {timeout}s\n{self.log_text()}")
        return found[0]
