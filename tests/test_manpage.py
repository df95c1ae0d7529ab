"""The man pages ``postbote(1)`` and ``postbote.yaml(5)`` and the bash, zsh and fish completions (issue 15): written
from the argument parser and the annotated example config, so every command, option and config key shows up, and
the bash script is valid bash that completes what the parser knows."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from postbote.cli import build_parser
from postbote.cli.manpage import options_of, subcommands, write_all
from postbote.config import TOP_KEYS, Account, LogSettings

REPO = Path(__file__).resolve().parent.parent
NOT_KEYS = {"destinations", "disabled_plugins", "source"}  # Account fields that are no key of their own


@pytest.fixture(scope="module")
def share(tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("share")
    write_all(build_parser(), output, REPO / "examples" / "postbote.yaml", date="2026-01-01")
    return output


def unescaped(path: Path) -> str:
    return path.read_text().replace("\\-", "-").replace("\\e", "\\")


def test_generating_writes_both_pages_and_the_three_completions_where_distributions_look(share: Path) -> None:
    written = sorted(str(path.relative_to(share)) for path in share.rglob("*") if path.is_file())
    assert written == ["bash-completion/completions/postbote", "fish/vendor_completions.d/postbote.fish",
                       "man/man1/postbote.1", "man/man5/postbote.yaml.5", "zsh/site-functions/_postbote"]


def test_the_command_page_names_every_command_and_every_option(share: Path) -> None:
    page = unescaped(share / "man" / "man1" / "postbote.1")
    parser = build_parser()
    for name, _, sub in subcommands(parser):
        assert f".SS {name}\n" in page
        for action in options_of(sub):
            for option in action.option_strings:
                assert option in page, f"{name} {option}"
    assert "--dry-run" in page and "exit status" in page.lower() and "Example:" in page


def test_the_config_page_names_every_key_the_config_reader_knows(share: Path) -> None:
    page = unescaped(share / "man" / "man5" / "postbote.yaml.5")
    keys = set(TOP_KEYS) | {f"log.{field.name}" for field in dataclasses.fields(LogSettings)}
    keys |= {field.name for field in dataclasses.fields(Account)} - NOT_KEYS | {"deliver"}
    missing = [key for key in sorted(keys) if f"\\fB{key}\\fR" not in page and f".{key}\\fR" not in page]
    assert missing == [], f"documented nowhere in examples/postbote.yaml: {missing}"


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")
@pytest.mark.parametrize("page", ["man/man1/postbote.1", "man/man5/postbote.yaml.5"])
def test_the_pages_render_without_a_warning(share: Path, page: str) -> None:
    done = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(share / page)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert (done.returncode, done.stderr) == (0, "")


def test_the_bash_completion_is_valid_bash(share: Path) -> None:
    done = subprocess.run(["bash", "-n", str(share / "bash-completion" / "completions" / "postbote")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stderr) == (0, "")


def complete(share: Path, *words: str) -> list[str]:
    """What bash completes for the command line ``postbote WORDS...`` (the last word being typed)."""
    script = share / "bash-completion" / "completions" / "postbote"
    quoted = " ".join(f"'{word}'" for word in ("postbote", *words))
    program = (f"source {script}; COMP_WORDS=({quoted}); COMP_CWORD={len(words)}; _postbote; "
               'printf "%s\\n" "${COMPREPLY[@]}"')
    done = subprocess.run(["bash", "-c", program], capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.split()


def test_bash_completes_commands_their_options_and_an_options_choices(share: Path) -> None:
    assert complete(share, "po") == ["poll"]
    assert {"--dry-run", "--keep", "--limit"} <= set(complete(share, "poll", "--"))
    assert complete(share, "-c", "x.yaml", "check", "--conn") == ["--connect"]
    assert complete(share, "--log-level", "") == ["debug", "info", "warning", "error"]
    assert set(complete(share, "")) >= {name for name, _, _ in subcommands(build_parser())}


@pytest.mark.parametrize(("shell", "path", "check"), [
    ("zsh", "zsh/site-functions/_postbote", ["zsh", "-n"]),
    ("fish", "fish/vendor_completions.d/postbote.fish", ["fish", "--no-execute"]),
])
def test_the_zsh_and_fish_completions_parse_where_the_shell_is_installed(share: Path, shell: str, path: str,
                                                                          check: list[str]) -> None:
    if shutil.which(shell) is None:
        if os.environ.get("CI"):  # .ci/run installs both: in CI nothing skips silently
            pytest.fail(f"{shell} is not installed, and CI must check its completion script")
        pytest.skip(f"{shell} is not installed")
    done = subprocess.run([*check, str(share / path)], capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stderr) == (0, "")


def test_the_zsh_and_fish_completions_offer_every_command(share: Path) -> None:
    zsh = (share / "zsh" / "site-functions" / "_postbote").read_text()
    fish = (share / "fish" / "vendor_completions.d" / "postbote.fish").read_text()
    for name, _, _ in subcommands(build_parser()):
        assert f"'{name}:" in zsh and f"-a {name} " in fish


def test_postbote_manual_writes_them_under_the_directory_given(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "postbote", "manual", "-o", str(tmp_path / "share")], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 5
    assert (tmp_path / "share" / "man" / "man1" / "postbote.1").read_text().startswith(".TH POSTBOTE 1")


def test_postbote_manual_with_an_example_that_is_not_there_says_so(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "postbote", "manual", "-o", str(tmp_path / "share"), "--example",
                           str(tmp_path / "missing.yaml")], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 2 and "--example" in done.stderr


def test_the_pages_are_made_outside_a_checkout_from_the_example_postbote_ships(tmp_path: Path) -> None:
    """Installed from a wheel there is no examples/ directory: the annotated example is installed with the code."""
    done = subprocess.run([sys.executable, "-m", "postbote", "manual", "-o", str(tmp_path / "share")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    page = (tmp_path / "share" / "man" / "man5" / "postbote.yaml.5").read_text()
    assert "poll_interval" in page and ".SH EXAMPLE" in page
