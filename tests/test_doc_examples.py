"""Every whole config the docs show (a ```yaml block with ``accounts:``) is one postbote accepts: users copy them.

Blocks that are parts of a config (a ``deliver:`` mapping, one account's keys) are not whole configs and are not
read here. The files a config names (password files, CA files) need not exist: loading checks the keys and
values, as ``postbote run`` does at start-up; ``postbote check`` would also open the files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from postbote.config import load_config
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
