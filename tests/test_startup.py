"""Start-up cost: what ``postbote --help`` and a plain poll import, and the lazy loading that keeps it small.

The checks name modules, never times: a module that is not imported costs nothing, on any machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from postbote import hookimpl
from postbote.cli import COMMAND_MODULES
from postbote.config import load_config
from postbote.errors import ConfigError
from postbote.pluginmanager import (
    BUILTIN_DESTINATION_KINDS,
    BUILTIN_PLUGINS,
    ESSENTIAL_PLUGINS,
    OPTIONAL_PLUGINS,
    make_plugin_manager,
    may_have_entry_points,
)
from postbote.testing.pop3server import POP3Server

ROOT = Path(__file__).resolve().parent.parent

# Runs ``python -m postbote ARGS`` as the command line does, then writes the names of the modules it loaded to OUT.
RUN_AND_LIST_MODULES = textwrap.dedent("""\
    import runpy, sys
    out, sys.argv = sys.argv[1], ["postbote", *sys.argv[2:]]
    try:
        runpy.run_module("postbote", run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        status = exit_.code
    else:
        status = 0
    loaded = sorted(sys.modules)
    with open(out, "w") as handle:
        handle.write("\\n".join(loaded))
    sys.exit(status)
    """)

# Needed only by some commands or some configs; none of them is imported by --help or by a plain poll.
HTTP_AND_OAUTH2 = {"http.server", "http.client", "urllib.request", "webbrowser", "postbote.plugins.signin.oauth2",
                   "postbote.plugins.signin.authorize"}
UNUSED_BY_A_PLAIN_POLL = {*HTTP_AND_OAUTH2, "postbote.plugins.signin.oauth2_settings", "importlib.metadata",
                          "asyncio.events", "asyncio.base_events",  # "asyncio" itself is a stand-in
                          "difflib", "hmac", "postbote.daemon",
                          "postbote.status", "postbote.sdnotify", "postbote.cli.progress", "schedule",
                          *(f"postbote.cli.{module}" for command, module in COMMAND_MODULES.items()
                            if command != "poll"),
                          *(f"postbote.plugins.{name}" for name in OPTIONAL_PLUGINS)}


def modules_loaded_by(tmp_path: Path, *args: str) -> tuple[set[str], subprocess.CompletedProcess[str]]:
    out = tmp_path / "modules.txt"
    done = subprocess.run([sys.executable, "-c", RUN_AND_LIST_MODULES, str(out), *args], capture_output=True,
                          text=True, timeout=60, check=False, cwd=ROOT)
    return set(out.read_text().split("\n")), done


def write_config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "postbote.yaml"
    path.write_text(textwrap.dedent(body))
    os.chmod(path, 0o600)
    return path


def test_help_imports_no_plugin_no_yaml_no_logging_and_no_network_code(tmp_path: Path) -> None:
    loaded, done = modules_loaded_by(tmp_path, "--help")
    assert done.returncode == 0 and "poll" in done.stdout
    heavy = {"pluggy", "yaml", "structlog", "asyncio.base_events", "logging", "ssl", "sqlite3", "importlib.metadata",
             "postbote.config", "postbote.message", "postbote.poller", "postbote.plugins", *HTTP_AND_OAUTH2}
    assert heavy & loaded == set()


def test_help_imports_no_command_module(tmp_path: Path) -> None:
    """Each command's module is imported only when that command runs: ``--help`` needs none of them."""
    loaded, done = modules_loaded_by(tmp_path, "--help")
    assert done.returncode == 0 and "poll" in done.stdout
    command_modules = {f"postbote.cli.{module}" for module in COMMAND_MODULES.values()}
    assert len(command_modules) == len(COMMAND_MODULES)  # one module per command
    assert command_modules & loaded == set()
    assert "postbote.cli" in loaded


def test_a_plain_poll_imports_neither_http_nor_oauth2_nor_the_plugins_it_does_not_use(tmp_path: Path) -> None:
    """tls: none, a password, a Maildir: the case a timer runs every few minutes."""
    with POP3Server([b"Subject: hi\r\n\r\nbody\r\n"]) as server:
        path = write_config(tmp_path, f"""\
            state_dir: {tmp_path / 'state'}
            log: {{format: json}}
            accounts:
              - name: plain
                host: 127.0.0.1
                port: {server.port}
                tls: none
                username: demo
                password: demo
                deliver: {{maildir: {tmp_path / 'Maildir'}}}
            """)
        loaded, done = modules_loaded_by(tmp_path, "-c", str(path), "poll")
        assert done.returncode == 0, done.stderr
        assert server.uids() == []
    assert len(list((tmp_path / "Maildir" / "new").iterdir())) == 1
    assert {f"postbote.plugins.{name}" for name in ESSENTIAL_PLUGINS
            if name not in BUILTIN_DESTINATION_KINDS or name == "maildir"} <= loaded
    assert UNUSED_BY_A_PLAIN_POLL & loaded == set()
    other_destinations = {f"postbote.plugins.{name}" for name in BUILTIN_DESTINATION_KINDS if name != "maildir"}
    assert other_destinations & loaded == set()
    assert "postbote.cli.poll" in loaded


def test_a_built_in_delivery_target_is_imported_once_a_destination_names_one_of_its_kinds(tmp_path: Path) -> None:
    path = write_config(tmp_path, """\
        accounts:
          - {name: a, host: h, username: u, password: p, deliver: {maildir: m}}
          - {name: b, host: h, username: u, password: p, deliver: {lmtp: {host: 127.0.0.1, recipients: [b@x.org]}}}
        """)
    pm = make_plugin_manager(entry_points=False)
    assert all(pm.get_plugin(name) is None for name in BUILTIN_DESTINATION_KINDS)
    config = load_config(path, pm)
    assert {name for name in BUILTIN_DESTINATION_KINDS if pm.get_plugin(name) is not None} == {"maildir", "smtp"}
    assert [destination.kind for account in config.accounts for destination in account.destinations] == [
        "maildir", "lmtp"]


def test_the_table_of_built_in_delivery_targets_says_what_each_declares() -> None:
    """The kinds are known before the modules are imported: the table must not drift from the modules."""
    import importlib

    assert set(BUILTIN_DESTINATION_KINDS) <= set(ESSENTIAL_PLUGINS)
    for name in ESSENTIAL_PLUGINS:
        declared = getattr(importlib.import_module(f"postbote.plugins.{name}"), "DESTINATION_KINDS", ())
        assert tuple(declared) == BUILTIN_DESTINATION_KINDS.get(name, ()), name


def test_an_unknown_destination_kind_names_every_built_in_kind_loaded_or_not(tmp_path: Path) -> None:
    path = write_config(tmp_path, """\
        accounts:
          - {name: a, host: h, username: u, password: p, deliver: {maildri: m}}
        """)
    with pytest.raises(ConfigError) as raised:
        load_config(path, make_plugin_manager(entry_points=False))
    assert "unknown delivery target 'maildri' (known: gmail, imap, lmtp, maildir, mbox, mda, smtp)" in str(raised.value)


# Defers asyncio as the command does, imports structlog, then uses asyncio through structlog's own reference.
USE_ASYNCIO_THROUGH_STRUCTLOG = textwrap.dedent("""\
    import sys
    from postbote.cli.deferred import defer_unused_imports, is_deferred
    defer_unused_imports()
    import structlog
    from postbote.logconfig import configure_logging
    configure_logging("info", "json")
    print("after structlog:", is_deferred("asyncio"), "asyncio.base_events" in sys.modules)
    import asyncio
    asyncio.run(structlog.get_logger("check").ainfo("async.event", answer=42))
    print("after use:", is_deferred("asyncio"), sys.modules["asyncio"] is asyncio.events.sys.modules["asyncio"])
    """)


def test_asyncio_is_imported_only_once_something_uses_it_and_then_works_as_usual() -> None:
    done = subprocess.run([sys.executable, "-c", USE_ASYNCIO_THROUGH_STRUCTLOG], capture_output=True, text=True,
                          timeout=60, check=False, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["after structlog: True False", "after use: False True"]
    assert '"answer": 42, "event": "async.event"' in done.stderr  # structlog's async method ran on the real asyncio


def test_an_optional_built_in_is_imported_once_an_account_enables_it(tmp_path: Path) -> None:
    path = write_config(tmp_path, """\
        plugins: {rules: {rules: [{match: {sender: "@spam.example"}, action: drop}]}}
        accounts:
          - {name: a, host: h, username: u, password: p, deliver: {maildir: m}}
          - {name: b, host: h, username: u, password: p, deliver: {maildir: m}, plugins: {dedupe: true}}
        """)
    pm = make_plugin_manager(entry_points=False)
    assert all(pm.get_plugin(name) is None for name in OPTIONAL_PLUGINS)
    config = load_config(path, pm)
    assert {name for name in OPTIONAL_PLUGINS if pm.get_plugin(name) is not None} == {"rules", "dedupe"}
    assert config.accounts[0].uses("rules") and not config.accounts[0].uses("dedupe")
    assert set(pm.sources) >= set(BUILTIN_PLUGINS)


class Observer:
    """A third-party plugin registered before the config is read, as entry points and ``extra`` ones are."""

    name = "observer"

    @hookimpl
    def filter_message(self) -> None:
        pass


def test_built_ins_loaded_late_take_the_place_they_would_have_had_if_loaded_at_once(tmp_path: Path) -> None:
    """pluggy calls plugins in the reverse order of registration: the order must not depend on the lazy loading."""
    import importlib

    import pluggy
    from postbote import hookspecs

    path = write_config(tmp_path, """\
        plugins: {spamassassin: {host: 127.0.0.1}, dedupe: true, backup: {maildir: b}, metrics: {textfile: m.prom}}
        accounts:
          - {name: a, host: h, username: u, password: p, deliver: [{mbox: m}, {smtp: {recipients: [a@x.org]}}]}
        """)
    pm = make_plugin_manager(entry_points=False, extra=[Observer()])
    load_config(path, pm)
    pm.load_all_builtins()
    eager = pluggy.PluginManager(hookspecs.PROJECT)
    eager.add_hookspecs(hookspecs)
    for name in BUILTIN_PLUGINS:
        eager.register(importlib.import_module(f"postbote.plugins.{name}"), name=name)
    eager.register(Observer(), name="observer")
    for hook in ("filter_message", "backup_message", "configure", "poll_finished", "parse_plugin_options",
                 "parse_destination", "deliver_message", "find_delivered", "authorize"):
        lazy_order = [impl.plugin_name for impl in getattr(pm.hook, hook).get_hookimpls()]
        eager_order = [impl.plugin_name for impl in getattr(eager.hook, hook).get_hookimpls()]
        assert lazy_order == eager_order, hook


def test_postbote_plugins_lists_every_built_in_with_its_hooks(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from postbote.cli import main

    path = write_config(tmp_path, "accounts:\n  - {name: a, host: h, username: u, password: p, "
                                  "deliver: {maildir: m}}\n")
    assert main(["-c", str(path), "plugins"]) == 0
    out = capsys.readouterr().out
    for name in BUILTIN_PLUGINS:
        assert f"{name}  [built-in: postbote.plugins.{name}]" in out
    assert ("metrics  [built-in: postbote.plugins.metrics]\n    enabled: off\n"
            "    hooks: configure, parse_plugin_options, poll_finished, unconfigure") in out


def test_installed_plugins_are_looked_for_only_where_metadata_names_the_group(tmp_path: Path) -> None:
    """The cheap look before importlib.metadata: a false "no" would lose a plugin, so anything unclear is a "yes"."""
    site = tmp_path / "site"
    (site / "other-1.0.dist-info").mkdir(parents=True)
    (site / "other-1.0.dist-info" / "entry_points.txt").write_text("[console_scripts]\npostbote = postbote.cli:main\n")
    (site / "legacy.egg-info").write_text("Name: legacy\n")  # the old single-file form: no entry points
    assert not may_have_entry_points([str(site), str(tmp_path / "missing")])

    (site / "greeter-1.2.dist-info").mkdir()
    (site / "greeter-1.2.dist-info" / "entry_points.txt").write_text("[postbote]\ngreeter = greeter_plugin\n")
    assert may_have_entry_points([str(site)])

    egg = tmp_path / "tagger-1.0-py3.11.egg"
    (egg / "EGG-INFO").mkdir(parents=True)
    (egg / "EGG-INFO" / "entry_points.txt").write_text("[postbote]\ntagger = tagger\n")
    assert may_have_entry_points([str(egg)])

    with zipfile.ZipFile(tmp_path / "bundle.zip", "w") as bundle:
        bundle.writestr("x.py", "")
    assert may_have_entry_points([str(tmp_path / "bundle.zip")])
