"""Finding (or installing) what the benchmark runs: Dovecot, the peers, an unprivileged user, postbote itself.

* Debian packages: ``dovecot-pop3d fetchmail getmail6 mpop msmtp safecat``, installed with apt-get when
  missing and we are root (``--no-install`` turns that off; missing peers are then reported, not run).
* The peers run as an unprivileged user (getmail6 refuses to deliver into a Maildir as root, fetchmail
  warns): as root we create a system user ``bench`` once; otherwise everything runs as the caller.
* postbote runs from a snapshot of the source tree (``agent/`` as ``postbote/``, ``plugins/`` as
  ``postbote/plugins/``) copied at the start, so that edits made while the benchmark runs cannot mix two
  versions, with a venv holding its dependencies. The venv is built from an interpreter the run user can
  execute (pyenv under /root is not) and kept in the cache directory between runs.
"""

from __future__ import annotations

import compileall
import os
import pwd
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = Path("/var/tmp/postbote-bench")
BENCH_USER = "bench"
PACKAGES = {  # binary -> Debian package
    "dovecot": "dovecot-pop3d",
    "fetchmail": "fetchmail",
    "getmail": "getmail6",
    "mpop": "mpop",
    "msmtp": "msmtp",
    "safecat": "safecat",
    "time": "time",
}
SBIN_PATHS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


class PopenIdentity(TypedDict, total=False):
    user: int
    group: int
    extra_groups: list[int]


@dataclass(frozen=True)
class RunUser:
    """Who the tools run as: ``uid``/``gid`` for ``subprocess.Popen(user=, group=)``, or ourselves."""

    name: str
    uid: int
    gid: int
    home: Path

    @property
    def is_self(self) -> bool:
        return self.uid == os.geteuid()

    def popen_args(self) -> PopenIdentity:
        """Keyword arguments for ``subprocess`` that make the child run as this user."""
        return {} if self.is_self else {"user": self.uid, "group": self.gid, "extra_groups": []}

    def own(self, path: Path) -> None:
        """Hand ``path`` (recursively) to the run user."""
        if self.is_self:
            return
        for root, dirs, files in os.walk(path):
            os.chown(root, self.uid, self.gid)
            for name in (*dirs, *files):
                os.lchown(os.path.join(root, name), self.uid, self.gid)


def find_binary(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN_PATHS))


def missing_binaries() -> list[str]:
    return [name for name in PACKAGES if find_binary(name) is None]


def install_packages(names: list[str], log: Callable[[str], None]) -> None:
    """apt-get install the Debian packages providing ``names`` (root only)."""
    packages = sorted({PACKAGES[name] for name in names})
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        log(f"not installing {' '.join(packages)}: needs root and apt-get")
        return
    log(f"installing {' '.join(packages)} with apt-get ...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=False, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages], check=False,
                   env=env, stdout=subprocess.DEVNULL)


def run_user(home_base: Path) -> RunUser:
    """The ``bench`` user when we are root (created if needed), else the caller."""
    if os.geteuid() != 0:
        entry = pwd.getpwuid(os.geteuid())
        return RunUser(entry.pw_name, entry.pw_uid, entry.pw_gid, Path(entry.pw_dir))
    try:
        entry = pwd.getpwnam(BENCH_USER)
    except KeyError:
        home = home_base / "home"
        subprocess.run(["useradd", "--system", "--user-group", "--create-home", "--home-dir", str(home),
                        "--shell", "/usr/sbin/nologin", BENCH_USER], check=True)
        entry = pwd.getpwnam(BENCH_USER)
    return RunUser(entry.pw_name, entry.pw_uid, entry.pw_gid, Path(entry.pw_dir))


def _usable_by(python: str, user: RunUser) -> bool:
    try:
        done = subprocess.run([python, "-c", "import venv, ensurepip"], capture_output=True, timeout=60,
                              **user.popen_args())
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def _dependencies(source: Path) -> list[str]:
    with (source / "pyproject.toml").open("rb") as handle:
        return list(tomllib.load(handle)["project"]["dependencies"])


def postbote_venv(cache: Path, user: RunUser, source: Path, log: Callable[[str], None]) -> Path:
    """A venv with postbote's dependencies, usable by ``user``; returns its python."""
    venv = cache / "venv"
    python = venv / "bin" / "python"
    stamp = venv / "bench-dependencies.txt"
    wanted = "\n".join(_dependencies(source))
    if python.exists() and stamp.exists() and stamp.read_text() == wanted and _usable_by(str(python), user):
        return python
    candidates = [sys.executable, "/usr/bin/python3"]
    base = next((c for c in candidates if Path(c).exists() and _usable_by(c, user)), None)
    if base is None:
        raise RuntimeError(f"no Python with venv that user {user.name} can run (tried {', '.join(candidates)}); "
                           "apt-get install python3-venv")
    log(f"creating a venv for postbote in {venv} (from {base}) ...")
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    *_dependencies(source)], check=True)
    stamp.write_text(wanted)
    cache.chmod(0o755)
    return python


def snapshot_postbote(source: Path, target: Path, user: RunUser) -> Path:
    """Copy postbote's importable code to ``target``, byte-compile it, hand it to ``user``; returns ``target``."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    target.mkdir(parents=True, exist_ok=True)
    if _installs_as_postbote(source):
        shutil.copytree(source / "agent", target / "postbote", ignore=ignore)
        shutil.copytree(source / "plugins", target / "postbote" / "plugins", ignore=ignore)
    else:  # a revision from before the one installed name: top-level agent and plugins, run as `-m postbote` too
        for package in ("agent", "plugins"):
            shutil.copytree(source / package, target / package, ignore=ignore)
        (target / "postbote").mkdir()
        (target / "postbote" / "__init__.py").write_text("")
        main = 'import runpy\nrunpy.run_module("agent", run_name="__main__")\n'
        (target / "postbote" / "__main__.py").write_text(main)
    compileall.compile_dir(str(target), quiet=1)
    user.own(target)
    return target


def _installs_as_postbote(source: Path) -> bool:
    """Whether the checkout maps agent/ and plugins/ onto the package postbote (pyproject's package-dir)."""
    try:
        return '"postbote" = "agent"' in (source / "pyproject.toml").read_text()
    except OSError:
        return False


def source_revision(source: Path) -> str:
    """``git describe`` of the source tree, marked ``-dirty`` when it has uncommitted changes."""
    try:
        done = subprocess.run(["git", "-C", str(source), "describe", "--always", "--dirty"], capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() or "unknown"


def versions() -> dict[str, str]:
    """First line of each tool's version output (for the report)."""
    probes = {
        "dovecot": ["dovecot", "--version"],
        "fetchmail": ["fetchmail", "-V"],
        "mpop": ["mpop", "--version"],
        "msmtp": ["msmtp", "--version"],
        "getmail6": ["getmail", "--version"],
        "kernel": ["uname", "-r"],
    }
    found: dict[str, str] = {"python (driver)": sys.version.split()[0]}
    for name, argv in probes.items():
        binary = find_binary(argv[0])
        if binary is None:
            found[name] = "not installed"
            continue
        try:
            done = subprocess.run([binary, *argv[1:]], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            found[name] = "?"
            continue
        lines = (done.stdout or done.stderr).strip().splitlines()
        found[name] = next((line for line in lines if "fetchmail" in line.lower()), lines[0] if lines else "?") \
            if name == "fetchmail" else (lines[0] if lines else "?")
    return found
