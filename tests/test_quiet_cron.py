"""``postbote poll`` under cron (issue 15): a cron job mails whatever a command prints, so at the default level, with
stderr neither a terminal nor the journal, a poll in which nothing happened prints nothing at all; a poll that
delivered, deferred or rejected mail, or failed, prints as always -- and on a terminal everything prints.
Run as cron runs it: a child process whose output is a pipe, against a real Dovecot over POP3."""

from __future__ import annotations

import json
import os
import pty
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness import RUN_TIMEOUT, child_env, make_message, postbote_argv
from tests.servers.dovecot import DovecotServer
from tests.servers.smtp_sink import SMTPSink

pytestmark = [pytest.mark.dovecot, pytest.mark.usefixtures("time_limit")]


def configure(tmp_path: Path, dovecot: DovecotServer, **keys: Any) -> Path:
    """A config as a user writes one: no log section (level info, format auto)."""
    entry = {"name": "alice", "host": dovecot.host, "port": dovecot.pop3s_port, "tls": "implicit",
             "tls_ca_file": str(dovecot.ca_file), "username": "alice", "password": dovecot.password("alice"),
             "timeout": "10s",
             "deliver": {"maildir": str(tmp_path / "Maildir")}, **keys}
    entry = {key: value for key, value in entry.items() if value is not None}
    path = tmp_path / "postbote.yaml"
    path.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"), "accounts": [entry]}))
    path.chmod(0o600)
    return path


def test_a_warning_prints_with_what_the_poll_did(tmp_path: Path, dovecot: DovecotServer) -> None:
    config = configure(tmp_path, dovecot, port=dovecot.pop3_port, tls="none", tls_ca_file=None)
    shown = events(cron_poll(config).stderr)
    assert shown == ["login.cleartext", "poll.finished"]  # every poll: the password crosses the network in clear


def cron_poll(config: Path) -> subprocess.CompletedProcess[str]:
    """``postbote poll`` with its output going to pipes, as under cron."""
    env = child_env()
    env.pop("JOURNAL_STREAM", None)
    return subprocess.run(postbote_argv(config, "poll"), env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT, check=False)


def events(output: str) -> list[str]:
    return [json.loads(line)["event"] for line in output.splitlines() if line.startswith("{")]


def test_an_empty_poll_under_cron_prints_nothing(tmp_path: Path, dovecot: DovecotServer) -> None:
    done = cron_poll(configure(tmp_path, dovecot))
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_a_poll_that_finds_only_mail_delivered_before_prints_nothing(tmp_path: Path, dovecot: DovecotServer) -> None:
    dovecot.deliver("alice", make_message("kept"))
    config = configure(tmp_path, dovecot, keep=True)
    first = cron_poll(config)
    assert first.returncode == 0 and "message.delivered" in events(first.stderr)

    again = cron_poll(config)
    assert (again.returncode, again.stdout, again.stderr) == (0, "", "")


def test_a_poll_that_delivers_prints_its_events_in_order(tmp_path: Path, dovecot: DovecotServer) -> None:
    dovecot.deliver("alice", make_message("one"))
    done = cron_poll(configure(tmp_path, dovecot))
    assert done.returncode == 0
    shown = events(done.stderr)
    assert "message.delivered" in shown and shown[-1] == "poll.finished"


def test_a_deferred_message_prints(tmp_path: Path, dovecot: DovecotServer, smtp_sink: SMTPSink) -> None:
    smtp_sink.respond_with("451 4.3.0 try later")
    dovecot.deliver("alice", make_message("waits"))
    done = cron_poll(configure(tmp_path, dovecot, deliver={"smtp": {
        "host": smtp_sink.host, "port": smtp_sink.port, "recipients": ["alice@example.org"], "starttls": False}}))
    assert done.returncode == 1
    assert "message.deferred" in events(done.stderr) and "poll.finished" in events(done.stderr)


def test_a_failed_account_prints(tmp_path: Path, dovecot: DovecotServer) -> None:
    done = cron_poll(configure(tmp_path, dovecot, password="wrong"))
    assert done.returncode == 1 and "account.failed" in events(done.stderr)


def test_on_a_terminal_an_empty_poll_still_says_so(tmp_path: Path, dovecot: DovecotServer) -> None:
    controller, terminal = pty.openpty()
    try:
        child = subprocess.Popen(postbote_argv(configure(tmp_path, dovecot), "poll"), env=child_env(),
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=terminal)
        os.close(terminal)
        output = b""
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
        assert child.wait(RUN_TIMEOUT) == 0
    finally:
        os.close(controller)
    assert b"poll.finished" in output


def test_an_explicit_log_level_is_not_held_back(tmp_path: Path, dovecot: DovecotServer) -> None:
    env = child_env()
    env.pop("JOURNAL_STREAM", None)
    done = subprocess.run(postbote_argv(configure(tmp_path, dovecot), "--log-level", "debug", "poll"), env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
    assert done.returncode == 0 and "poll.finished" in events(done.stderr)
