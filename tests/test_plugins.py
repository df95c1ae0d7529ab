"""Plugin discovery, configuration and per-account enabling (issue #3)."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
from postbote.cli import main
from postbote.config import load_config
from postbote.errors import ConfigError
from postbote.pluginmanager import make_plugin_manager

LOCAL_PLUGIN = '''
from postbote import hookimpl, Verdict
from postbote.yaml_reader import Section, text


@hookimpl
def parse_plugin_options(name, options, problems):
    if name != "tagger":
        return None
    section = Section(options, problems)
    tag = section.get("tag", text, "[tagged]")
    section.finish()
    return tag


@hookimpl
def filter_message(message, account):
    subject = message.get_header("Subject") or ""
    message.replace_header("Subject", account.options_for("tagger") + " " + subject)
'''


def write_config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "postbote.yaml"
    path.write_text(textwrap.dedent(body))
    os.chmod(path, 0o600)
    return path


ACCOUNTS = """\
accounts:
  - {name: a, host: h, username: u, password: p, deliver: {maildir: m}}
  - {name: b, host: h, username: u, password: p, deliver: {maildir: m}, plugins: {tagger: false}}
  - {name: c, host: h, username: u, password: p, deliver: {maildir: m}, plugins: {tagger: {tag: "[c]"}}}
"""


@pytest.fixture
def plugin_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "myplugins"
    folder.mkdir()
    (folder / "tagger.py").write_text(LOCAL_PLUGIN)
    return folder


def test_local_plugins_load_from_plugin_paths_with_global_and_per_account_options(tmp_path: Path,
                                                                                   plugin_dir: Path) -> None:
    path = write_config(tmp_path, f"plugin_paths: [{plugin_dir}]\nplugins:\n  tagger: {{tag: '[list]'}}\n" + ACCOUNTS)
    config = load_config(path, make_plugin_manager(entry_points=False))
    a, b, c = config.accounts
    assert a.options_for("tagger") == "[list]" and a.uses("tagger")
    assert not b.uses("tagger")
    assert c.options_for("tagger") == "[c]"


def test_bad_plugin_options_are_config_errors_with_line(tmp_path: Path, plugin_dir: Path) -> None:
    path = write_config(tmp_path, f"plugin_paths: [{plugin_dir}]\nplugins:\n  tagger: {{tga: x}}\n" + ACCOUNTS)
    with pytest.raises(ConfigError, match=r"postbote.yaml:3: plugins.tagger.tga: unknown key \(did you mean 'tag'\?\)"):
        load_config(path, make_plugin_manager(entry_points=False))


def test_unknown_plugin_names_are_config_errors(tmp_path: Path) -> None:
    path = write_config(tmp_path, "plugins:\n  recieved: {}\n" + ACCOUNTS)
    with pytest.raises(ConfigError, match=r":2: plugins.recieved: unknown plugin \(did you mean 'received'\?"):
        load_config(path, make_plugin_manager(entry_points=False))


def test_essential_built_ins_cannot_be_disabled(tmp_path: Path) -> None:
    path = write_config(tmp_path, "plugins:\n  smtp: false\n" + ACCOUNTS)
    with pytest.raises(ConfigError, match="the built-in plugin 'smtp' cannot be disabled"):
        load_config(path, make_plugin_manager(entry_points=False))


def test_a_misspelt_hook_name_is_a_start_up_error(tmp_path: Path) -> None:
    (tmp_path / "typo.py").write_text("from postbote import hookimpl\n\n"
                                      "@hookimpl\ndef filter_mesage(message):\n    pass\n")
    path = write_config(tmp_path, f"plugin_paths: [{tmp_path / 'typo.py'}]\n" + ACCOUNTS)
    expected = (r"plugin 'typo' implements 'filter_mesage', which is not a postbote hook"
                r" \(did you mean 'filter_message'\?\)")
    with pytest.raises(ConfigError, match=expected):
        load_config(path, make_plugin_manager(entry_points=False))


def test_a_plugin_that_fails_to_import_is_named(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("import does_not_exist\n")
    path = write_config(tmp_path, f"plugin_paths: [{tmp_path / 'broken.py'}]\n" + ACCOUNTS)
    with pytest.raises(ConfigError, match=r"broken.py failed to load: ModuleNotFoundError"):
        load_config(path, make_plugin_manager(entry_points=False))


def test_plugins_command_lists_source_enabling_and_hooks(tmp_path: Path, plugin_dir: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, f"plugin_paths: [{plugin_dir}]\n" + ACCOUNTS)
    assert main(["-c", str(path), "plugins"]) == 0
    out = capsys.readouterr().out
    assert f"tagger  [plugin_paths: {plugin_dir / 'tagger.py'}]\n    enabled: a, c\n" \
           "    hooks: filter_message, parse_plugin_options" in out
    assert "received  [built-in: postbote.plugins.received]\n    enabled: always" in out
    assert "    provides: deliver: smtp, lmtp\n" in out and "    provides: protocol: imap\n" in out
    assert "    provides: deliver: imap\n" in out and "    provides: protocol: pop3\n" in out
