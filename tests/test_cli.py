"""The command line: start-up errors as one line with exit status 2, systemd paths, parallel polls."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from postbote import hookimpl
from postbote.cli import main
from postbote.config import load_config
from postbote.pluginmanager import make_plugin_manager
from postbote.poller import Poller
from postbote.testing.pop3server import Action, Faults, POP3Server

from tests.harness import logging_restored

REPO = Path(__file__).resolve().parent.parent


def write_config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "postbote.yaml"
    path.write_text(textwrap.dedent(body))
    os.chmod(path, 0o600)
    return path


def test_a_plugin_whose_configure_raises_is_named_and_exits_2(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "fragile.py").write_text("from postbote import hookimpl\n\n@hookimpl\ndef configure(config):\n"
                                         "    raise OSError(13, 'Permission denied')\n")
    path = write_config(tmp_path, f"""\
        state_dir: {tmp_path / 'state'}
        plugin_paths: [{tmp_path / 'fragile.py'}]
        accounts:
          - {{name: a, host: 127.0.0.1, port: 1, tls: none, username: u, password: p, deliver: {{maildir: m}}}}
        """)
    assert main(["-c", str(path), "poll"]) == 2
    err = capsys.readouterr().err
    assert "plugin 'fragile' failed to start (configure): PermissionError: [Errno 13] Permission denied" in err
    assert "Traceback" not in err


def test_password_file_may_name_the_systemd_credentials_directory(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "alice").write_text("s3cret\n")
    os.chmod(tmp_path / "creds" / "alice", 0o400)
    path = write_config(tmp_path, """\
        accounts:
          - name: a
            host: h
            username: u
            password_file: ${CREDENTIALS_DIRECTORY}/alice
            deliver: {maildir: m}
        """)
    account = load_config(path, make_plugin_manager(entry_points=False)).accounts[0]
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "creds"))
    password = account.source.credentials.password
    assert password is not None and password.resolve().reveal() == "s3cret"


def test_the_state_directory_defaults_to_systemds_state_directory(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/postbote:/var/lib/other")
    path = write_config(tmp_path, "accounts:\n  - {name: a, host: h, username: u, password: p, "
                                  "deliver: {maildir: m}}\n")
    assert load_config(path, make_plugin_manager(entry_points=False)).state_dir == Path("/var/lib/postbote")


def test_poll_polls_accounts_in_parallel_so_a_slow_one_does_not_hold_up_the_others(tmp_path: Path) -> None:
    mail = b"Subject: hi\r\n\r\nbody\r\n"
    slow_faults = Faults().on("UIDL", action=Action.stall(1.5))
    with POP3Server([mail], faults=slow_faults) as slow, POP3Server([mail]) as fast1, POP3Server([mail]) as fast2:
        accounts = "\n".join(
            f"  - {{name: {name}, host: 127.0.0.1, port: {server.port}, tls: none, username: demo, password: demo, "
            f"deliver: {{maildir: {tmp_path / name}}}}}"
            for name, server in (("slow", slow), ("fast1", fast1), ("fast2", fast2)))
        path = write_config(tmp_path, f"state_dir: {tmp_path / 'state'}\nmax_parallel: 3\naccounts:\n{accounts}\n")
        started = time.monotonic()
        assert main(["-c", str(path), "poll"]) == 0
        elapsed = time.monotonic() - started
        assert [s.uids() for s in (slow, fast1, fast2)] == [[], [], []]
    assert elapsed < 3.0, f"three accounts, one stalling 1.5 s, took {elapsed:.1f} s"


def test_auth_refuses_an_account_without_oauth2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, "accounts:\n  - {name: a, host: h, username: u, password: p, "
                                  "deliver: {maildir: m}}\n")
    assert main(["-c", str(path), "auth", "a"]) == 2
    assert "has no oauth2: section" in capsys.readouterr().err


def test_demo_fetches_the_sample_mail_into_a_maildir_with_nothing_else_installed(tmp_path: Path) -> None:
    """The README's first command: a built-in POP3 server, a poll, a Maildir whose path is printed."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "postbote", "demo", "--maildir", str(tmp_path / "Mail")],
                          capture_output=True, text=True, timeout=120, check=False,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    assert f"4 message(s) delivered to the Maildir {tmp_path / 'Mail'} (0 left on the server)" in done.stdout
    delivered = [p.read_bytes() for p in (tmp_path / "Mail" / "new").iterdir()]
    assert any(b"\n.\n..and one that starts with two.\n" in data for data in delivered)
    assert any("Grüße aus Köln".encode() in data for data in delivered)


def test_installed_plugins_are_found_through_the_postbote_entry_point_group(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A package declaring ``[project.entry-points.postbote]`` is loaded and listed with its distribution."""
    site = tmp_path / "site"
    (site / "greeter_plugin.py").parent.mkdir(parents=True)
    (site / "greeter_plugin.py").write_text("from postbote import hookimpl\n\n@hookimpl\ndef filter_message(message):\n"
                                            "    message.add_header('X-Greeting', 'hello')\n")
    dist_info = site / "postbote_greeter-1.2.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: postbote-greeter\nVersion: 1.2\n")
    (dist_info / "entry_points.txt").write_text("[postbote]\ngreeter = greeter_plugin\n")
    monkeypatch.syspath_prepend(str(site))
    pm = make_plugin_manager()
    assert pm.sources["greeter"].origin == "entry point"
    assert pm.sources["greeter"].where == "postbote-greeter 1.2"
    assert pm.hooks_of("greeter") == ["filter_message"]


# --- one configure path, one job boundary, no tracebacks (issue 11, item 18)

FRAGILE_PLUGIN = ("from postbote import hookimpl\n\n@hookimpl\ndef configure(config):\n"
                  "    raise OSError(13, 'Permission denied')\n")


def run_postbote(*args: str, stdout: int = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "postbote", *args], cwd=REPO, stdout=stdout, stderr=subprocess.PIPE,
                          text=True, timeout=60, check=False)


def test_run_and_poll_refuse_a_plugin_whose_configure_raises_with_the_same_line_and_exit_2(tmp_path: Path) -> None:
    """``RestartPreventExitStatus=2`` in the unit relies on it: a broken plugin must not crash-loop the service."""
    (tmp_path / "fragile.py").write_text(FRAGILE_PLUGIN)
    path = write_config(tmp_path, f"""\
        state_dir: {tmp_path / 'state'}
        plugin_paths: [{tmp_path / 'fragile.py'}]
        accounts:
          - {{name: a, host: 127.0.0.1, port: 1, tls: none, username: u, password: p, deliver: {{maildir: m}}}}
        """)
    expected = ("postbote: error: plugin 'fragile' failed to start (configure): "
                "PermissionError: [Errno 13] Permission denied\n")
    for command in ("poll", "run"):
        done = run_postbote("-c", str(path), command)
        assert (command, done.returncode, done.stderr) == (command, 2, expected)


def test_a_crash_in_one_accounts_poll_is_one_event_the_others_are_polled_and_poll_exits_1(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    secret_local = "s3cret-in-a-local"  # noqa: F841 - a frame local that must never reach the log
    real_session = Poller._session

    def session(self: Poller, account: Any, *args: Any) -> Any:
        if account.name == "broken":
            password = secret_local  # noqa: F841 - in the crashing frame's locals
            raise RuntimeError("unexpected state")
        return real_session(self, account, *args)

    monkeypatch.setattr(Poller, "_session", session)
    mail = b"Subject: hi\r\n\r\nbody\r\n"
    with POP3Server([mail]) as first, POP3Server([mail]) as second:
        accounts = "\n".join(
            f"  - {{name: {name}, host: 127.0.0.1, port: {server.port}, tls: none, username: demo, "
            f"password: demo, deliver: {{maildir: {tmp_path / name}}}}}"
            for name, server in (("broken", first), ("fine", second)))
        path = write_config(tmp_path, f"state_dir: {tmp_path / 'state'}\nlog: {{format: json}}\n"
                                      f"accounts:\n{accounts}\n")
        with logging_restored():
            assert main(["-c", str(path), "poll"]) == 1
        assert second.uids() == [] and first.uids() != []
    err = capsys.readouterr().err
    crashes = [json.loads(line) for line in err.splitlines() if '"poll.crashed"' in line]
    assert len(crashes) == 1
    (crash,) = crashes
    assert (crash["account"], crash["error"]) == ("broken", "internal error: RuntimeError: unexpected state")
    assert crash["where"].endswith("in session")
    assert "Traceback" not in err and "s3cret-in-a-local" not in err
    with logging_restored():
        assert main(["-c", str(path), "status"]) == 1
    assert "error: internal error: RuntimeError: unexpected state" in capsys.readouterr().out


@pytest.mark.parametrize("command", [["plugins"], ["status", "--json"], ["check"]])
def test_output_into_a_closed_pipe_ends_quietly(tmp_path: Path, command: list[str]) -> None:
    """``postbote plugins | head -1``: once the reader has gone, no traceback and no second complaint at exit."""
    path = write_config(tmp_path, f"state_dir: {tmp_path / 'state'}\naccounts:\n  - {{name: a, host: h, "
                                  "username: u, password: p, deliver: {maildir: m}}\n")
    reader, writer = os.pipe()
    os.close(reader)
    try:
        done = run_postbote("-c", str(path), *command, stdout=writer)
    finally:
        os.close(writer)
    assert (done.returncode, done.stderr) == (1, "")


def test_the_one_line_error_masks_a_secret_a_plugin_quoted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "leaky.py").write_text(
        "from postbote import hookimpl\n\n@hookimpl\ndef configure(config):\n"
        "    password = config.accounts[0].source.credentials.password\n"
        "    raise ValueError('cannot log in with ' + password.resolve().reveal())\n")
    path = write_config(tmp_path, f"""\
        state_dir: {tmp_path / 'state'}
        plugin_paths: [{tmp_path / 'leaky.py'}]
        accounts:
          - {{name: a, host: 127.0.0.1, port: 1, tls: none, username: u, password: pw-s3cret-1234,
              deliver: {{maildir: m}}}}
        """)
    assert main(["-c", str(path), "poll"]) == 2
    err = capsys.readouterr().err
    assert err == ("postbote: error: plugin 'leaky' failed to start (configure): "
                   "ValueError: cannot log in with ********\n")


# --- the CLI as a package: one module per command, above the core


def _imported_modules(path: Path) -> set[str]:
    """The postbote modules ``path`` imports anywhere (module level or inside a function), by absolute name."""
    import ast

    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {name for name in names if name == "postbote" or name.startswith("postbote.")}


def test_no_core_module_imports_the_cli() -> None:
    """The CLI sits on top of the core: the daemon, the poller, the state store... never reach up into it."""
    core = [path for path in (REPO / "agent").rglob("*.py")
            if "cli" not in path.relative_to(REPO / "agent").parts and path.name != "__main__.py"]
    assert core
    offenders = {str(path.relative_to(REPO)): sorted(name for name in _imported_modules(path)
                                                     if name == "postbote.cli" or name.startswith("postbote.cli."))
                 for path in core}
    assert {path: names for path, names in offenders.items() if names} == {}


def test_no_command_module_imports_the_clis_top() -> None:
    """The top (the parser and the dispatch) imports the commands, lazily; a command, the demo included, imports
    only the shared pieces it needs (startup, boundary, another command), so no import cycle runs through the top."""
    modules = [path for path in (REPO / "agent" / "cli").glob("*.py") if path.name != "__init__.py"]
    assert {"poll.py", "demo.py", "boundary.py"} <= {path.name for path in modules}
    offenders = [path.name for path in modules if "postbote.cli" in _imported_modules(path)]
    assert offenders == []


def test_under_systemd_each_log_line_carries_its_syslog_priority_for_journalctl_p(tmp_path: Path) -> None:
    """stderr connected to the journal (JOURNAL_STREAM names it): ``<3>`` before an error, ``<6>`` before info, so
    ``journalctl -p err`` shows the failed poll; anywhere else the lines stay plain JSON."""
    config = tmp_path / "postbote.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\nlog: {{format: json, level: info}}\naccounts:\n"
                      "  - {name: a, host: 127.0.0.1, port: 1, tls: none, username: u, password: p, timeout: 2s,\n"
                      f"     deliver: {{maildir: {tmp_path / 'Maildir'}}}}}\n")
    config.chmod(0o600)
    outputs = {}
    for journal in (True, False):
        with open(tmp_path / f"stderr-{journal}", "w+b") as stderr:
            status = os.fstat(stderr.fileno())
            env = {**os.environ, "JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}" if journal else "1:2"}
            subprocess.run([sys.executable, "-m", "postbote", "-c", str(config), "poll"], stderr=stderr, env=env,
                           stdout=subprocess.DEVNULL, timeout=60, check=False)
            stderr.seek(0)
            outputs[journal] = stderr.read().decode().splitlines()
    failed = [line for line in outputs[True] if '"account.failed"' in line]
    assert failed and all(line.startswith("<3>{") for line in failed)
    assert outputs[True] and all(line[:1] == "<" and line[1].isdigit() and line[2:4] == ">{" for line in outputs[True])
    assert outputs[False] and all(line.startswith("{") for line in outputs[False])


def test_each_level_has_its_syslog_priority() -> None:
    from postbote.logconfig import JournalPriority

    render = JournalPriority(lambda _logger, _method, event: event["event"])
    assert [render(None, level, {"event": "x", "level": level}) for level in ("debug", "info", "warning", "error")] \
        == ["<7>x", "<6>x", "<4>x", "<3>x"]


def one_account(tmp_path: Path, server: POP3Server) -> Path:
    return write_config(tmp_path, f"state_dir: {tmp_path / 'state'}\nlog: {{format: json, level: info}}\n"
                                  f"accounts:\n  - {{name: a, host: 127.0.0.1, port: {server.port}, tls: none, "
                                  f"username: demo, password: demo, deliver: {{maildir: {tmp_path / 'Maildir'}}}}}\n")


def delivered(tmp_path: Path) -> int:
    new = tmp_path / "Maildir" / "new"
    return len(list(new.iterdir())) if new.exists() else 0


def test_the_config_option_may_follow_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with POP3Server([]) as server:
        path = one_account(tmp_path, server)
        with logging_restored():
            assert main(["check", "-c", str(path)]) == 0
            assert main(["-c", "/nonexistent.yaml", "check", "--config", str(path)]) == 0  # the later one wins
            assert main(["-c", str(path), "check"]) == 0  # and one before the command is not undone
    assert capsys.readouterr().out.count("config ") == 3


def test_every_command_says_what_it_does_its_exit_statuses_and_an_example(
        capsys: pytest.CaptureFixture[str]) -> None:
    from postbote.cli import COMMAND_MODULES

    for command in COMMAND_MODULES:
        assert main([command, "--help"]) == 0
        text = capsys.readouterr().out
        assert "exit status:" in text and "example: postbote" in text, command


def test_poll_keep_all_and_limit_apply_to_this_poll_only(tmp_path: Path) -> None:
    mail = [f"Subject: {n}\r\nMessage-ID: <{n}@x>\r\n\r\nbody\r\n".encode() for n in range(3)]
    with POP3Server(mail) as server:
        path = one_account(tmp_path, server)
        with logging_restored():
            assert main(["poll", "-c", str(path), "--keep", "--limit", "1"]) == 0
            assert delivered(tmp_path) == 1 and len(server.uids()) == 3  # one fetched, nothing deleted
            assert main(["poll", "-c", str(path), "-k", "-a", "-l", "1"]) == 0  # --all: the delivered one again
            assert delivered(tmp_path) == 2 and len(server.uids()) == 3
            assert main(["poll", "-c", str(path)]) == 0  # the config again: delete what was delivered, fetch the rest
    assert delivered(tmp_path) == 4 and server.uids() == []


def test_quiet_logs_warnings_and_errors_only(tmp_path: Path) -> None:
    with POP3Server([b"Subject: hi\r\n\r\nbody\r\n"]) as server:
        path = one_account(tmp_path, server)
        done = subprocess.run([sys.executable, "-m", "postbote", "poll", "-q", "-c", str(path)], capture_output=True,
                              text=True, timeout=60, check=False)
    assert done.returncode == 0 and delivered(tmp_path) == 1
    levels = {json.loads(line)["level"] for line in done.stderr.splitlines()}
    assert levels <= {"warning", "error"}  # tls: none's warning, and no poll.finished or message.delivered


class Concurrency:
    """Counts the polls running at once (poll_started / poll_finished)."""

    def __init__(self) -> None:
        import threading

        self.lock = threading.Lock()
        self.running = 0
        self.most = 0

    @hookimpl
    def poll_started(self, account: Any) -> None:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(0.05)  # long enough for the other workers to start theirs, if they may

    @hookimpl
    def poll_finished(self, account: Any, stats: Any) -> None:
        with self.lock:
            self.running -= 1


def test_poll_runs_at_most_max_parallel_per_host_polls_against_one_server(tmp_path: Path) -> None:
    from postbote.cli.poll import poll
    from postbote.state import StateStore

    servers = [POP3Server([b"Subject: hi\r\n\r\nbody\r\n"]).start() for _ in range(4)]
    try:
        accounts = "".join(f"  - {{name: a{n}, host: 127.0.0.1, port: {server.port}, tls: none, username: demo, "
                           f"password: demo, deliver: {{maildir: {tmp_path / 'Maildir'}}}}}\n"
                           for n, server in enumerate(servers))
        path = write_config(tmp_path, f"state_dir: {tmp_path / 'state'}\nmax_parallel: 4\nmax_parallel_per_host: 1\n"
                                      f"accounts:\n{accounts}")
        counter = Concurrency()
        pm = make_plugin_manager(entry_points=False, extra=[counter])
        config = load_config(path, pm)
        store = StateStore(config.state_dir)
        try:
            with logging_restored():
                assert poll(pm, config, store, []) == 0
        finally:
            store.close()
    finally:
        for server in servers:
            server.stop()
    assert counter.most == 1 and all(server.uids() == [] for server in servers)
