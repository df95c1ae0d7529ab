"""postbote installs under one name: the core (``agent/``) as ``postbote``, the built-in plugins (``plugins/``) as
``postbote.plugins`` -- never as the generic top-level packages ``agent`` and ``plugins``, which would collide with
anything else in a shared site-packages."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_wheel_holds_one_top_level_package_postbote_with_its_plugins_and_types(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--wheel-dir", str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=120)
    (wheel,) = tmp_path.glob("postbote-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith((".dist-info", ".data"))}
    assert top_level == {"postbote"}
    assert {"postbote/__main__.py", "postbote/plugins/maildir.py", "postbote/py.typed"} <= set(names)
    example = zipfile.ZipFile(wheel).read("postbote/example.yaml")  # postbote.yaml(5) is made from it
    assert example == (REPO / "examples" / "postbote.yaml").read_bytes()
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "postbote = postbote.cli:run_command" in entry_points
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names), "the wheel ships the licence"
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: MIT" in metadata and "Classifier: Topic :: Communications :: Email" in metadata


def test_python_m_postbote_runs_the_command_outside_the_source_tree(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "postbote", "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0 and "poll" in done.stdout


def test_the_public_face_is_importable_under_the_installed_name(tmp_path: Path) -> None:
    probe = "import postbote; from postbote import hookimpl, Message, Verdict, DeliveryError; print(postbote.__name__)"
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0 and done.stdout.strip() == "postbote", done.stderr
    agent = subprocess.run([sys.executable, "-c", "import agent"], cwd=tmp_path, capture_output=True, timeout=60,
                           check=False)
    assert agent.returncode != 0, "the core must not be importable as the top-level package 'agent'"


def test_the_readme_installs_from_a_checkout_or_a_wheel_never_from_a_package_index() -> None:
    """postbote is on no package index: ``pip install postbote`` or ``'postbote[postgresql]'`` fails for a reader."""
    import re

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    from_an_index = re.findall(r"pip install (?:-\S+ )*['\"]?postbote(?:\[[^\]]*\])?['\"]?(?=[\s`|]|$)", readme)
    assert from_an_index == []
    assert "pip install '.[postgresql]'" in readme
