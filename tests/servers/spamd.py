"""A private SpamAssassin spamd on loopback, started and stopped by the tests.

Each :class:`SpamdServer` runs ``/usr/sbin/spamd`` (Debian package ``spamd``) in the foreground with its own
directory holding the site configuration, a home directory and its log (spamd's syslog output sent to stderr). It
listens on a freshly picked loopback port and, by default, on a Unix socket too.

No network, no ``sa-update``: spamd runs with ``-L`` (local tests only) and reads its rules from the rules the
``spamassassin`` package ships in ``/usr/share/spamassassin``, which recognise GTUBE. Should a package ever come
without them (they can also come from ``sa-update`` alone), a one-rule set recognising GTUBE is written instead.
The site configuration is Debian's plugin list (``/etc/spamassassin/*.pre``, without ``sa-compile.pre``, whose
compiled rules would not match ours) and a ``local.cf`` of our own: the admin's ``local.cf`` never applies, Bayes
and auto-learning are off, ``required_score`` is 5. ``-x`` turns per-user configuration off; as root, spamd runs
its children as ``nobody`` (it refuses to scan as root).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from tests.servers import LOOPBACK, free_port, wait_until

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
STARTUP_TIMEOUT = 60.0
SHUTDOWN_TIMEOUT = 10.0
PACKAGE_RULES = Path("/usr/share/spamassassin")
PACKAGE_SITE_CONFIG = Path("/etc/spamassassin")
SKIPPED_PRE_FILES = {"sa-compile.pre"}
SEARCH_PATH = ("/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin")

LOCAL_CF = """\
required_score 5
use_bayes 0
bayes_auto_learn 0
skip_rbl_checks 1
dns_available no
"""

FALLBACK_PRE = "loadplugin Mail::SpamAssassin::Plugin::Check\n"

FALLBACK_RULES = r"""
body GTUBE /XJS\*C4JDBQADN1\.NSBN3\*2IDNEN\*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL\*C\.34X/
describe GTUBE Generic Test for Unsolicited Bulk Email
score GTUBE 1000
required_score 5
report_safe 1
add_header all Checker-Version SpamAssassin _VERSION_ (_SUBVERSION_) on _HOSTNAME_
add_header spam Flag _YESNOCAPS_
add_header all Level _STARS(*)_
add_header all Status "_YESNO_, score=_SCORE_ required=_REQD_ tests=_TESTS_ autolearn=_AUTOLEARN_ version=_VERSION_"
"""


class SpamdStartError(RuntimeError):
    """spamd could not be started; the message includes its log."""


def spamd_binary() -> str | None:
    """Path of ``spamd``, also found in the sbin directories a user's PATH may lack; None when not installed."""
    return shutil.which("spamd") or shutil.which("spamd", path=os.pathsep.join(SEARCH_PATH))


def spamd_required() -> bool:
    """CI must never silently skip the tests against the real spamd."""
    return bool(os.environ.get("CI")) or os.environ.get("POSTBOTE_REQUIRE_SPAMD") == "1"


def package_rules_recognise_gtube(rules: Path = PACKAGE_RULES) -> bool:
    return any("GTUBE-STANDARD-ANTI-UBE" in cf.read_text("latin-1") for cf in sorted(rules.glob("*.cf")))


def ping(address: tuple[str, int] | Path, timeout: float = 1.0) -> bool:
    """Whether spamd answers ``PING`` with ``PONG`` at a TCP address or a Unix socket path."""
    try:
        if isinstance(address, Path):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(str(address))
        else:
            sock = socket.create_connection(address, timeout=timeout)
        with sock:
            sock.sendall(b"PING SPAMC/1.5\r\n\r\n")
            return sock.recv(128).split(b"\r\n")[0].endswith(b" 0 PONG")
    except OSError:
        return False


def _die_with_parent() -> None:
    """Runs in the child before exec: should the test process die, spamd gets SIGTERM (Linux only)."""
    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class SpamdServer:
    """One spamd master process and its children. Use as a context manager, or call :meth:`start` and :meth:`stop`."""

    host = LOOPBACK

    def __init__(self, root: Path | None = None, *, unix_socket: bool = True, extra_config: str = "") -> None:
        """Prepare (but do not start) a server. *root* must be short: Unix socket paths are limited to 107 bytes."""
        self._owns_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="pbsa-")) if root is None else root
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        self.extra_config = extra_config
        self.site_dir = self.root / "site"
        self.rules_dir = PACKAGE_RULES
        self.home_dir = self.root / "home"
        self.log_file = self.root / "spamd.log"
        self.pid_file = self.root / "spamd.pid"
        self.port = free_port()
        self.socket_path: Path | None = self.root / "spamd.sock" if unix_socket else None
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SpamdServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def command(self, binary: str) -> list[str]:
        argv = [binary, "--local", "--nouser-config", "--syslog=stderr", f"--configpath={self.rules_dir}",
                f"--siteconfigpath={self.site_dir}", f"--listen={self.host}:{self.port}",
                f"--pidfile={self.pid_file}", "--min-children=1", "--max-children=2",
                f"--helper-home-dir={self.home_dir}"]
        if self.socket_path is not None:
            argv.append(f"--listen={self.socket_path}")
        if os.geteuid() == 0:
            argv.append("--username=nobody")
        return argv

    def start(self) -> SpamdServer:
        binary = spamd_binary()
        if binary is None:
            raise SpamdStartError("spamd is not installed (apt-get install spamd)")
        self._write_config()
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(self.home_dir), "LANG": "C.UTF-8"}
        with self.log_file.open("wb") as log:
            self._process = subprocess.Popen(self.command(binary), stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                             preexec_fn=_die_with_parent)
        if not wait_until(self._ready_or_dead, STARTUP_TIMEOUT, interval=0.1) or self._process.poll() is not None:
            status = self._process.poll()
            what = f"exited with status {status}" if status is not None else f"not ready after {STARTUP_TIMEOUT:g} s"
            log = self.log_text()
            self.stop()
            raise SpamdStartError(f"spamd {what}; its log:\n{log}")
        return self

    def _ready_or_dead(self) -> bool:
        assert self._process is not None
        if self._process.poll() is not None:
            return True
        return ping(self.address) and (self.socket_path is None or ping(self.socket_path))

    def _write_config(self) -> None:
        self.site_dir.mkdir(exist_ok=True)
        self.home_dir.mkdir(exist_ok=True)
        pre_files = [p for p in sorted(PACKAGE_SITE_CONFIG.glob("*.pre")) if p.name not in SKIPPED_PRE_FILES]
        for pre in pre_files:
            shutil.copyfile(pre, self.site_dir / pre.name)
        if not pre_files:
            (self.site_dir / "init.pre").write_text(FALLBACK_PRE)
        (self.site_dir / "local.cf").write_text(LOCAL_CF + self.extra_config)
        if not package_rules_recognise_gtube():
            self.rules_dir = self.root / "rules"
            self.rules_dir.mkdir(exist_ok=True)
            (self.rules_dir / "10_gtube.cf").write_text(FALLBACK_RULES)
        for path in (self.root, self.site_dir, self.home_dir, *self.site_dir.iterdir()):
            path.chmod(0o755 if path.is_dir() else 0o644)

    def stop(self) -> None:
        """SIGTERM (spamd then ends its children), SIGKILL to the whole process group if that takes too long."""
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(SHUTDOWN_TIMEOUT)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(SHUTDOWN_TIMEOUT)
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)
