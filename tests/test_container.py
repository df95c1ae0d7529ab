"""The container image (Dockerfile, examples/container/compose.yaml): built when a container runtime is here;
without one, the Dockerfile is held to what the image promises -- an unprivileged user, `postbote run` as the
command, the state as a volume, a health check through `postbote status`, no tests or secrets copied in -- and its
install step is run for real in a fresh virtualenv (what the image's pip does)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, comments left out."""
    joined = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    found = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def test_the_image_runs_postbote_run_as_an_unprivileged_user_with_state_as_a_volume() -> None:
    final = instructions()[max(i for i, (word, _) in enumerate(instructions()) if word == "FROM"):]
    words = dict(final)
    assert words["USER"] not in ("root", "0")
    assert words["ENTRYPOINT"] == '["postbote"]' and words["CMD"] == '["run"]'
    assert "/var/lib/postbote" in words["VOLUME"]
    assert '"postbote", "status"' in words["HEALTHCHECK"]
    assert words["STOPSIGNAL"] == "SIGTERM"


def test_nothing_but_the_package_is_copied_into_the_build() -> None:
    copied = " ".join(rest for word, rest in instructions() if word in ("COPY", "ADD") and "--from" not in rest)
    assert "tests" not in copied and ".venv" not in copied and "postbote.yaml" not in copied
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests"} <= set(ignored)


def test_the_compose_example_uses_the_image_with_config_and_state_volumes() -> None:
    compose = yaml.safe_load((ROOT / "examples" / "container" / "compose.yaml").read_text())
    service = compose["services"]["postbote"]
    assert any(volume.endswith(":/var/lib/postbote") for volume in service["volumes"])
    assert any(":/etc/postbote" in volume for volume in service["volumes"])
    assert service["stop_grace_period"] == "30s"


def usable_runtime() -> str | None:
    """docker or podman, if one is installed and its daemon answers."""
    for name in ("docker", "podman"):
        found = shutil.which(name)
        if found and subprocess.run([found, "info"], capture_output=True, timeout=60).returncode == 0:
            return found
    return None


def test_the_image_builds_where_a_container_runtime_is_installed(tmp_path: Path) -> None:
    runtime = usable_runtime()
    if runtime is None:
        # No runtime that can build (CI has none): the image's install step, for real, in a fresh virtualenv.
        subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True, timeout=120)
        pip = tmp_path / "venv" / "bin" / "pip"
        subprocess.run([str(pip), "install", "--quiet", str(ROOT)], check=True, timeout=600, capture_output=True)
        done = subprocess.run([str(tmp_path / "venv" / "bin" / "postbote"), "--help"], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0 and "run" in done.stdout
        return
    done = subprocess.run([runtime, "build", "-q", "-t", "postbote-test", str(ROOT)], capture_output=True, text=True,
                          timeout=900)
    if done.returncode != 0:
        pytest.fail(f"{runtime} build failed:\n{done.stderr[-3000:]}")
