"""Every whole config the docs show (a ```yaml block with ``accounts:``) is one postbote accepts: users copy them.

Blocks that are parts of a config (a ``deliver:`` mapping, one account's keys, top-level keys) are put into a small
whole config, as a user would paste them, and must load too. The files a config names (password files, CA files)
need not exist: loading checks the keys and values, as ``postbote run`` does at start-up; ``postbote check`` would
also open the files."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from postbote.config import TOP_KEYS, load_config
from postbote.pluginmanager import make_plugin_manager

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```ya?ml\n(.*?)^```", re.MULTILINE | re.DOTALL)


def whole_configs() -> list[tuple[str, str]]:
    found = []
    for document in DOCUMENTS:
        text = document.read_text()
        for match in BLOCK.finditer(text):
            block = match.group(1)
            if re.search(r"^accounts:", block, re.MULTILINE):
                line = text.count("\n", 0, match.start()) + 1
                found.append((f"{document.relative_to(ROOT)}:{line}", block))
    return found


class NoNewsletters:
    """The installed plugin docs/plugins.md turns on and off in its example."""

    name = "no_newsletters"


@pytest.mark.parametrize(("where", "block"), whole_configs(), ids=[where for where, _ in whole_configs()])
def test_a_config_the_docs_show_is_accepted(where: str, block: str, tmp_path: Path) -> None:
    path = tmp_path / "postbote.yaml"
    path.write_text(block)
    path.chmod(0o600)
    load_config(path, make_plugin_manager(entry_points=False, extra=[NoNewsletters()]))


def test_the_docs_show_whole_configs() -> None:
    assert len(whole_configs()) >= 5  # the extraction finds them (a changed fence style would silently find none)


# --- parts of a config: each is put into a small whole config, as a user would paste it, and must load too

FENCED = re.compile(r"^( *)```ya?ml\n(.*?)^\1```", re.MULTILINE | re.DOTALL)
SECRET_KEYS = {"password", "password_file", "password_command", "password_env", "token_command", "oauth2"}
AN_ACCOUNT = {"name": "example", "host": "pop.example.org", "username": "me", "password": "secret",
              "deliver": {"maildir": "/var/mail/example"}}


def config_parts() -> list[tuple[str, str]]:
    """Every ```yaml block (indented ones too, inside a list) that is not a whole config."""
    found = []
    for document in DOCUMENTS:
        text = document.read_text()
        for match in FENCED.finditer(text):
            block = textwrap.dedent(match.group(2))
            if re.search(r"^accounts:", block, re.MULTILINE):
                continue
            line = text.count("\n", 0, match.start()) + 1
            found.append((f"{document.relative_to(ROOT)}:{line}", block))
    return found


def completed(part: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """``part`` in a whole config: top-level keys with one account beside them; an account's keys in an account."""
    if set(part) <= TOP_KEYS:
        whole = dict(part)
        if "accounts_dir" in whole:
            accounts_dir = tmp_path / "accounts.d"
            accounts_dir.mkdir()
            (accounts_dir / "example.yaml").write_text(yaml.safe_dump({"accounts": [AN_ACCOUNT]}))
            (accounts_dir / "example.yaml").chmod(0o600)
            whole["accounts_dir"] = str(accounts_dir)
        else:
            whole["accounts"] = [AN_ACCOUNT]
        whole.pop("state", None)  # a PostgreSQL server elsewhere: its URL is checked in test_postgres_store
        if "plugin_paths" in whole:  # directories of the reader's machine
            whole["plugin_paths"] = [str(tmp_path)]
        return whole
    account = {key: value for key, value in AN_ACCOUNT.items() if not (key == "password" and SECRET_KEYS & set(part))}
    return {"accounts": [{**account, **part}]}


@pytest.mark.parametrize(("where", "block"), config_parts(), ids=[where for where, _ in config_parts()])
def test_a_part_of_a_config_the_docs_show_is_accepted_in_a_config(where: str, block: str, tmp_path: Path) -> None:
    part = yaml.safe_load(block)
    assert isinstance(part, dict), f"{where}: not a mapping"
    path = tmp_path / "postbote.yaml"
    path.write_text(yaml.safe_dump(completed(part, tmp_path)))
    path.chmod(0o600)
    load_config(path, make_plugin_manager(entry_points=False, extra=[NoNewsletters()]))


def test_the_docs_show_parts_of_configs_indented_ones_included() -> None:
    parts = config_parts()
    assert len(parts) >= 8
    assert any(where.startswith("docs/service.md") and "password_file" in block for where, block in parts)
