"""The systemd units in ``systemd/`` (issue: runs as a service): they pass ``systemd-analyze verify`` and keep the
hardening and the service contract (notify, reload by SIGHUP, state and config directories, a dedicated user).

``systemd-analyze`` (Debian package ``systemd``) works without systemd running, as in a container. Verification
checks that ``ExecStart=`` programs exist, so the units are verified in a copy whose ``postbote`` is a stub.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

UNITS_DIR = Path(__file__).resolve().parent.parent / "systemd"
SERVICES = ("postbote.service", "postbote@.service", "postbote-poll.service")
HARDENING = {
    "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
    "PrivateDevices": "yes", "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6", "RestrictNamespaces": "yes",
    "RestrictSUIDSGID": "yes", "CapabilityBoundingSet": "", "SystemCallArchitectures": "native",
    "LockPersonality": "yes", "ProtectKernelTunables": "yes", "ProtectControlGroups": "yes", "UMask": "0077",
}


def parse_unit(path: Path) -> dict[str, list[str]]:
    """``Section.Key`` -> values in order (keys such as After= and SystemCallFilter= may repeat)."""
    entries: dict[str, list[str]] = defaultdict(list)
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries[f"{section}.{key.strip()}"].append(value.strip())
    return entries


def tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/bin:/bin:/usr/sbin:/sbin")
    if found is None:
        message = f"{name} is not installed (apt-get install systemd)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI requires it", pytrace=False)
        pytest.skip(message)
    return found


@pytest.fixture
def installed_copy(tmp_path: Path) -> Path:
    """The units as they would be installed, with ``postbote`` replaced by a stub program that exists."""
    stub = tmp_path / "bin" / "postbote"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    units = tmp_path / "units"
    units.mkdir()
    for unit in UNITS_DIR.iterdir():
        if unit.is_dir():
            continue  # systemd/user/: the per-user unit, verified on its own
        text = unit.read_text()
        if unit.suffix in (".service", ".timer"):
            assert "ExecStart=postbote " in text or unit.suffix == ".timer"
            text = text.replace("ExecStart=postbote ", f"ExecStart={stub} ")
        (units / unit.name).write_text(text)
    return units


def verify(units: Path, name: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("systemd-analyze"), "verify", "--man=no", str(units / name)],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("name", ["postbote.service", "postbote@work.service", "postbote-poll.service",
                                  "postbote.timer"])
def test_unit_passes_systemd_analyze_verify_without_a_warning(installed_copy: Path, name: str) -> None:
    result = verify(installed_copy, name)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_verification_would_notice_a_mistake(installed_copy: Path) -> None:
    unit = installed_copy / "postbote@.service"
    unit.write_text(unit.read_text().replace("[Service]\n", "[Service]\nNoNewPrivilege=yes\n"))
    result = verify(installed_copy, "postbote@work.service")
    assert "Unknown key 'NoNewPrivilege'" in result.stderr


@pytest.mark.parametrize("name", ["postbote.service", "postbote@work.service", "postbote-poll.service"])
def test_services_are_rated_well_by_systemd_analyze_security(installed_copy: Path, name: str) -> None:
    result = subprocess.run([tool("systemd-analyze"), "security", "--offline=yes", "--threshold=20",
                             str(installed_copy / name)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout[-2000:]


@pytest.mark.parametrize("name", SERVICES)
def test_every_service_runs_as_the_postbote_user_with_the_same_hardening(name: str) -> None:
    unit = parse_unit(UNITS_DIR / name)
    assert unit["Service.User"] == ["postbote"] and unit["Service.Group"] == ["postbote"]
    assert unit["Service.SystemCallFilter"] == ["@system-service", "~@privileged @resources"]
    assert {key: unit[f"Service.{key}"] for key in HARDENING} == {key: [v] for key, v in HARDENING.items()}
    assert unit["Service.StateDirectory"] and unit["Service.ConfigurationDirectory"] == ["postbote"]
    assert "network-online.target" in unit["Unit.Wants"]


def test_the_daemon_unit_speaks_notify_and_reloads_with_sighup() -> None:
    for name in ("postbote.service", "postbote@.service"):
        unit = parse_unit(UNITS_DIR / name)
        assert unit["Service.Type"] == ["notify"] and unit["Service.NotifyAccess"] == ["main"]
        assert unit["Service.ExecReload"] == ["/bin/kill -HUP $MAINPID"]
        assert unit["Service.ExecStart"][0].endswith(" run") and unit["Service.WatchdogSec"]
        assert unit["Service.RestartPreventExitStatus"] == ["2"]
        assert unit["Install.WantedBy"] == ["multi-user.target"]


def test_the_template_gives_each_instance_its_own_config_and_state() -> None:
    unit = parse_unit(UNITS_DIR / "postbote@.service")
    assert unit["Service.ExecStart"] == ["postbote --config /etc/postbote/%i.yaml run"]
    assert unit["Service.StateDirectory"] == ["postbote/%i"]


def test_the_timer_starts_the_oneshot_poll() -> None:
    timer = parse_unit(UNITS_DIR / "postbote.timer")
    poll = parse_unit(UNITS_DIR / "postbote-poll.service")
    assert timer["Timer.Unit"] == ["postbote-poll.service"] and timer["Install.WantedBy"] == ["timers.target"]
    assert poll["Service.Type"] == ["oneshot"]
    assert poll["Service.ExecStart"] == ["postbote --config /etc/postbote/postbote.yaml poll"]


def test_the_sysusers_file_creates_the_postbote_user(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    result = subprocess.run([tool("systemd-sysusers"), f"--root={tmp_path}", str(UNITS_DIR / "postbote.sysusers")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    (entry,) = [line for line in (tmp_path / "etc/passwd").read_text().splitlines() if line.startswith("postbote:")]
    assert entry.endswith(":/var/lib/postbote:/usr/sbin/nologin")


def test_the_user_unit_runs_without_root_and_passes_verification(tmp_path: Path) -> None:
    """``systemctl --user``: for people without root; its own user's config and state, started at login (or
    boot, with lingering)."""
    unit_file = UNITS_DIR / "user" / "postbote.service"
    unit = parse_unit(unit_file)
    assert unit["Service.Type"] == ["notify"] and unit["Service.ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["Service.ExecStart"] == ["%h/.local/bin/postbote --config %E/postbote/postbote.yaml run"]
    assert "Service.User" not in unit and unit["Install.WantedBy"] == ["default.target"]
    assert unit["Service.StateDirectory"] == ["postbote"] and unit["Service.RestartPreventExitStatus"] == ["2"]
    home = tmp_path / "home"
    (home / ".local" / "bin").mkdir(parents=True)
    stub = home / ".local" / "bin" / "postbote"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    installed = tmp_path / "postbote.service"
    installed.write_text(unit_file.read_text().replace("%h/.local/bin/postbote", str(stub)))
    result = subprocess.run([tool("systemd-analyze"), "--user", "verify", "--man=no", str(installed)],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "XDG_RUNTIME_DIR": str(runtime), "HOME": str(home)})
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
