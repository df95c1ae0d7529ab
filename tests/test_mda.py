"""Delivery through an MDA: real commands (small Python scripts) on real pipes, judged by their exit status.

What a user checks afterwards: what the command received, what is still on the server, what the state store says.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from postbote import DeliveryError, Message
from postbote.config import load_config
from postbote.errors import ConfigError
from postbote.pluginmanager import make_plugin_manager
from postbote.plugins.mda import run_mda
from postbote.state import DEFERRED, REJECTED, StateStore

from tests.harness import mail
from tests.servers import wait_until

REPO_ROOT = Path(__file__).resolve().parent.parent

TRICKY = b"From: a@example.org\r\nSubject: tricky\r\n\r\n.\r\nFrom here\r\n>From there\r\n\x00 \xe4\xf6\r\nbare\rcr\r\n"


def script(tmp_path: Path, name: str, body: str) -> list[str]:
    path = tmp_path / f"{name}.py"
    path.write_text("import os, sys, time\n" + textwrap.dedent(body))
    return [sys.executable, str(path)]


def argv_yaml(argv: list[str]) -> str:
    return "[" + ", ".join(f"'{argument}'" for argument in argv) + "]"


def store_records(tmp_path: Path) -> dict:
    store = StateStore(tmp_path / "state")
    try:
        return store.records("test")
    finally:
        store.close()


def keep_stdin(tmp_path: Path) -> list[str]:
    """An MDA that stores its input in the file named by its first argument, and its arguments next to it."""
    return script(tmp_path, "deliver", """\
        data = sys.stdin.buffer.read()
        with open(sys.argv[1], "ab") as out:
            out.write(data)
        with open(sys.argv[1] + ".args", "a") as out:
            out.write(" ".join(sys.argv[2:]) + "\\n")
    """)


# --- the exit status decides ---


def test_exit_0_is_delivered_with_the_data_on_stdin_unchanged(tmp_path: Path) -> None:
    out = tmp_path / "out"
    answer = run_mda([*keep_stdin(tmp_path), str(out)], Message.from_bytes(TRICKY).chunks(), timeout=10)
    assert answer == f"mda {Path(sys.executable).name}: exit status 0"
    assert out.read_bytes() == TRICKY


def test_exit_75_is_a_temporary_failure(tmp_path: Path) -> None:
    argv = script(tmp_path, "tempfail", "sys.stdin.buffer.read(); print('mailbox busy', file=sys.stderr); sys.exit(75)")
    with pytest.raises(DeliveryError, match="exit status 75: mailbox busy") as info:
        run_mda(argv, [mail(1)], timeout=10)
    assert info.value.temporary


def test_another_exit_status_is_permanent_and_quotes_the_first_line_of_stderr(tmp_path: Path) -> None:
    argv = script(tmp_path, "nouser", """\
        sys.stdin.buffer.read()
        sys.stderr.write("\\nprocmail: Unknown user \\"alice\\"\\nsecond line\\n")
        sys.exit(67)
    """)
    with pytest.raises(DeliveryError) as info:
        run_mda(argv, [mail(1)], timeout=10)
    assert info.value.reason.endswith(': exit status 67: procmail: Unknown user "alice"')
    assert not info.value.temporary


def test_death_by_a_signal_is_permanent(tmp_path: Path) -> None:
    argv = script(tmp_path, "crash", "sys.stdin.buffer.read(); os.kill(os.getpid(), 9)")
    with pytest.raises(DeliveryError, match="killed by SIGKILL") as info:
        run_mda(argv, [mail(1)], timeout=10)
    assert not info.value.temporary


def test_a_command_that_cannot_be_run_is_a_temporary_failure(tmp_path: Path) -> None:
    with pytest.raises(DeliveryError, match="cannot run .*/no-such-mda: No such file or directory") as info:
        run_mda([str(tmp_path / "no-such-mda")], [mail(1)], timeout=10)
    assert info.value.temporary


# --- commands that do not read, or do not end ---


def pid_is_gone(pid: int) -> bool:
    """Gone or a zombie (in a container nobody may reap a killed grandchild)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def test_a_command_running_past_the_timeout_is_killed_with_its_children(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    argv = script(tmp_path, "hang", f"""\
        import subprocess
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open({str(pids)!r}, "w").write(f"{{os.getpid()}} {{child.pid}}")
        sys.stdin.buffer.read()
        time.sleep(60)
    """)
    started = time.monotonic()
    with pytest.raises(DeliveryError, match=r"no answer within 1s, killed") as info:
        run_mda(argv, [mail(1)], timeout=1)
    assert time.monotonic() - started < 5
    assert info.value.temporary
    assert wait_until(lambda: all(pid_is_gone(int(pid)) for pid in pids.read_text().split()), 5)  # dying takes a moment


def test_the_timeout_holds_while_the_command_does_not_read_its_input(tmp_path: Path) -> None:
    argv = script(tmp_path, "stuck", "time.sleep(60)")
    started = time.monotonic()
    with pytest.raises(DeliveryError, match="no answer within 0.5s") as info:
        run_mda(argv, [b"x" * 100_000] * 20, timeout=0.5)
    assert time.monotonic() - started < 5 and info.value.temporary


def test_exiting_without_reading_the_input_is_judged_by_the_exit_status(tmp_path: Path) -> None:
    big = [b"Subject: big\n\n", b"y" * 2_000_000]
    discard = script(tmp_path, "discard", "sys.exit(0)")
    assert run_mda(discard, big, timeout=10).endswith("exit status 0 (it did not read all of the message)")
    refuse = script(tmp_path, "refuse", "print('too big', file=sys.stderr); sys.exit(1)")
    with pytest.raises(DeliveryError, match=r"exit status 1 \(it did not read all of the message\): too big") as info:
        run_mda(refuse, big, timeout=10)
    assert not info.value.temporary


# --- configuration ---


def load(tmp_path: Path, deliver: str):
    path = tmp_path / "postbote.yaml"
    path.write_text(f"accounts:\n  - name: a\n    host: h\n    username: u\n    password: p\n    deliver: {deliver}\n")
    os.chmod(path, 0o600)
    return load_config(path, make_plugin_manager(entry_points=False))


def test_a_list_or_a_mapping_configures_an_mda(tmp_path: Path) -> None:
    (short,) = load(tmp_path, "{mda: [/usr/bin/procmail, -d, alice]}").accounts[0].destinations
    assert short.settings.command == ("/usr/bin/procmail", "-d", "alice") and short.settings.timeout == 300
    assert short.label == "mda:/usr/bin/procmail"
    (full,) = load(tmp_path, "{mda: {command: [bin/deliver, '{account}'], timeout: 30s}}").accounts[0].destinations
    assert full.settings.command == (str(tmp_path / "bin" / "deliver"), "{account}")
    assert full.settings.timeout == 30
    (bare,) = load(tmp_path, "{mda: [maildrop]}").accounts[0].destinations
    assert bare.settings.command == ("maildrop",)


@pytest.mark.parametrize(("deliver", "error"), [
    ("{mda: /usr/bin/procmail -d alice}", r":6: accounts\[0\].deliver.mda: expected a command as a list"),
    ("{mda: [procmail, -a, '{recipient}']}",
     r":6: accounts\[0\].deliver.mda\[2\]: unknown placeholder \{recipient\} \(known: \{account\}, \{uid\}\)$"),
    ("{mda: {command: [procmail, '{acount}']}}", r":6: accounts\[0\].deliver.mda.command\[1\]: unknown placeholder"),
    ("{mda: {command: [procmail], timout: 5m}}", r"deliver.mda.timout: unknown key \(did you mean 'timeout'\?\)"),
    ("{mda: {timeout: 5m}}", r"deliver.mda.command: required key is missing"),
])
def test_mda_option_mistakes_are_config_errors_with_their_line(tmp_path: Path, deliver: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        load(tmp_path, deliver)


# --- through a poll ---


def test_a_poll_delivers_each_message_once_through_the_mda_and_deletes_it(make_setup) -> None:
    setup = make_setup([TRICKY, mail(2)], source="fake")
    out = setup.tmp_path / "out"
    argv = [*keep_stdin(setup.tmp_path), str(out), "--account={account}", "{uid}"]
    stats = setup.poll(deliver=f"deliver: {{mda: {argv_yaml(argv)}}}\n")
    assert (stats.delivered, stats.deleted) == (2, 2)
    assert setup.server.uids() == []
    received = out.read_bytes()
    assert received.count(b"Received: from localhost") == 2
    assert b"\r" not in received.replace(b"bare\rcr", b"")
    assert TRICKY.replace(b"\r\n", b"\n") in received and mail(2).replace(b"\r\n", b"\n") in received
    uids = [line.split()[1] for line in (setup.tmp_path / "out.args").read_text().splitlines()]
    assert [line.split()[0] for line in (setup.tmp_path / "out.args").read_text().splitlines()] == \
        ["--account=test", "--account=test"]
    assert len(set(uids)) == 2 and all(uid in received.decode("latin-1") for uid in uids)
    assert all(record.status == "delivered" for record in store_records(setup.tmp_path).values())


def deferred_only(records: dict) -> bool:
    """The message is remembered as waiting (what `postbote status` shows), not as handled."""
    return [record.status for record in records.values()] == [DEFERRED]


def test_a_temporary_mda_failure_leaves_the_message_on_the_server_recorded_as_deferred(make_setup) -> None:
    setup = make_setup([mail(1)], source="fake")
    argv = script(setup.tmp_path, "tempfail", "sys.stdin.buffer.read(); sys.exit(75)")
    stats = setup.poll(deliver=f"deliver: {{mda: {argv_yaml(argv)}}}\n")
    assert (stats.delivered, stats.deferred, stats.rejected) == (0, 1, 0)
    assert len(setup.server.uids()) == 1
    assert deferred_only(store_records(setup.tmp_path))


def test_a_permanent_mda_failure_leaves_the_message_on_the_server_as_rejected(make_setup) -> None:
    setup = make_setup([mail(1)], source="fake")
    argv = script(setup.tmp_path, "nouser", "sys.stdin.buffer.read(); print('no such user', file=sys.stderr); "
                                            "sys.exit(1)")
    deliver = f"deliver: {{mda: {argv_yaml(argv)}}}\n"
    stats = setup.poll(deliver=deliver)
    assert (stats.delivered, stats.deferred, stats.rejected) == (0, 0, 1)
    assert len(setup.server.uids()) == 1
    (record,) = store_records(setup.tmp_path).values()
    assert record.status == REJECTED and record.reason.endswith("exit status 1: no such user")
    assert setup.poll(deliver=deliver).rejected == 0


def test_an_mda_timeout_in_a_poll_is_temporary(make_setup) -> None:
    setup = make_setup([mail(1)], source="fake")
    argv = script(setup.tmp_path, "slow", "sys.stdin.buffer.read(); time.sleep(60)")
    stats = setup.poll(deliver=f"deliver: {{mda: {{command: {argv_yaml(argv)}, timeout: 0.5s}}}}\n")
    assert (stats.delivered, stats.deferred) == (0, 1)
    assert len(setup.server.uids()) == 1 and deferred_only(store_records(setup.tmp_path))


def test_signals_are_named(tmp_path: Path) -> None:
    argv = script(tmp_path, "term", f"sys.stdin.buffer.read(); os.kill(os.getpid(), {int(signal.SIGTERM)})")
    with pytest.raises(DeliveryError, match="killed by SIGTERM"):
        run_mda(argv, [mail(1)], timeout=10)


def test_an_mda_gets_the_whole_message_even_when_postbote_is_killed_while_it_runs(tmp_path: Path) -> None:
    """The MDA reads the message from a file, not a pipe: postbote killed halfway (SIGKILL) cannot leave it reading
    an end of input it would take for the end of the message and deliver a truncated copy (procmail would)."""
    out = tmp_path / "received"
    slow_reader = script(tmp_path, "slow", "import time; time.sleep(0.5); "
                                           f"open({str(out)!r}, 'wb').write(sys.stdin.buffer.read())")
    big = b"".join(b"line %06d of a long message\n" % n for n in range(200_000))  # 5.8 MB: no pipe holds it
    code = ("import os, sys, threading; from postbote.plugins.mda import run_mda\n"
            "threading.Timer(0.2, lambda: os.kill(os.getpid(), 9)).start()\n"
            f"run_mda({slow_reader!r}, [sys.stdin.buffer.read()], timeout=30)\n")
    killed = subprocess.run([sys.executable, "-c", code], input=big, cwd=REPO_ROOT, timeout=30, check=False)
    assert killed.returncode == -9
    assert wait_until(lambda: out.exists() and out.stat().st_size == len(big), 10)
    assert out.read_bytes() == big
