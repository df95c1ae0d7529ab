"""mbox delivery: mboxrd format, locking against other programs, no half-written message, through real polls.

Each test uses real files and real locks held by a second process (the polls fetch from a `FakeMailbox` in memory),
and reads the mbox back with an mboxrd reader to prove that what went in comes out byte for byte (apart from CRLF
becoming LF).
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from postbote import Delivered, DeliveryError, Message
from postbote.config import Destination, load_config
from postbote.errors import ConfigError
from postbote.pluginmanager import make_plugin_manager
from postbote.plugins.mbox import MboxSettings, append_to_mbox, deliver_message, mboxrd_messages, mboxrd_quoted
from postbote.state import DEFERRED, StateStore
from structlog.testing import capture_logs

from tests.harness import mail
from tests.servers import interrupt_after

REPO = Path(__file__).resolve().parent.parent

TRICKY = {
    "dot line": b"Subject: dots\r\n\r\n.\r\n..\r\n.x\r\n",
    "From lines": b"Subject: from\r\n\r\nFrom here on\r\n>From quoted\r\n>>From twice\r\nFrom\r\n From indented\r\n",
    "8-bit and NUL": b"Subject: bin\r\n\r\n\x00 nul \xe4\xf6\xfc \xff\r\nbare\rcr\r\n",
    "no trailing newline": b"Subject: open\r\n\r\nlast line without end",
    "header only": b"Subject: nothing else\r\n",
    "starts with From": b"From nobody Mon Jan  1 00:00:00 2024\r\nSubject: x\r\n\r\nFrom x\r\n",
    "blank lines at the end": b"Subject: tail\r\n\r\nbody\r\n\r\n\r\n",
}


def on_disk(original: bytes) -> bytes:
    """What an mbox reader gets back: CRLF as LF, and a final line end (mbox cannot store its absence)."""
    data = original.replace(b"\r\n", b"\n")
    return data + b"\n" if data and not data.endswith(b"\n") else data


def without_trace_header(data: bytes) -> bytes:
    return re.sub(rb"\AReceived:[^\n]*\n(?:[ \t][^\n]*\n)*", b"", data)


# --- the format ---


@pytest.mark.parametrize("name", TRICKY)
def test_tricky_messages_round_trip_through_an_mbox(tmp_path: Path, name: str) -> None:
    mbox = tmp_path / "inbox"
    append_to_mbox(mbox, Message.from_bytes(b"Subject: before\r\n\r\nfirst\r\n"))
    append_to_mbox(mbox, Message.from_bytes(TRICKY[name]))
    append_to_mbox(mbox, Message.from_bytes(b"Subject: after\r\n\r\nlast\r\n"))
    assert mboxrd_messages(mbox.read_bytes()) == [b"Subject: before\n\nfirst\n", on_disk(TRICKY[name]),
                                                  b"Subject: after\n\nlast\n"]


def test_from_lines_get_one_more_quote_and_each_message_ends_with_an_empty_line(tmp_path: Path) -> None:
    mbox = tmp_path / "inbox"
    append_to_mbox(mbox, Message.from_bytes(TRICKY["From lines"]))
    lines = mbox.read_bytes().split(b"\n")
    assert re.fullmatch(rb"From MAILER-DAEMON \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}", lines[0])
    assert lines[1:] == [b"Subject: from", b"", b">From here on", b">>From quoted", b">>>From twice", b"From",
                         b" From indented", b"", b""]
    assert b"\r" not in mbox.read_bytes()


@pytest.mark.parametrize(("header", "sender"), [
    (b"Return-Path: <alice@example.org>\r\n", b"alice@example.org"),
    (b"Return-Path: <>\r\n", b"MAILER-DAEMON"),
    (b"", b"MAILER-DAEMON"),
    (b"Return-Path: <\"john doe\"@example.org>\r\n", b'"john_doe"@example.org'),
])
def test_the_separator_names_the_return_path_or_mailer_daemon(tmp_path: Path, header: bytes, sender: bytes) -> None:
    mbox = tmp_path / "inbox"
    append_to_mbox(mbox, Message.from_bytes(header + b"Subject: s\r\n\r\nb\r\n"))
    assert mbox.read_bytes().split(b" ")[:2] == [b"From", sender]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300) | st.lists(st.sampled_from(
    [b"From ", b">", b"\r\n", b"\n", b"\r", b".", b"x", b"\x00", b"\xff", b"From"]), max_size=30).map(b"".join),
    min_size=1, max_size=4))
def test_any_bytes_round_trip(tmp_path_factory: pytest.TempPathFactory, messages: list[bytes]) -> None:
    mbox = tmp_path_factory.mktemp("prop") / "inbox"
    for data in messages:
        append_to_mbox(mbox, Message.from_bytes(data))
    assert mboxrd_messages(mbox.read_bytes()) == [on_disk(data) for data in messages]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"From ", b">", b"\n", b"Fro", b"m ", b"x", b"\r"]), max_size=40).map(b"".join),
       st.lists(st.integers(min_value=0, max_value=60), max_size=8))
def test_quoting_does_not_depend_on_where_the_stream_is_split(data: bytes, cuts: list[int]) -> None:
    points = sorted({min(c, len(data)) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    expected = b"".join(b">" + line if re.match(rb">*From ", line) else line
                        for line in re.findall(rb"[^\n]*\n|[^\n]+", data))
    assert b"".join(mboxrd_quoted(chunks)) == expected


def test_a_file_whose_last_message_lacks_the_empty_line_gets_one_before_the_next(tmp_path: Path) -> None:
    mbox = tmp_path / "inbox"
    mbox.write_bytes(b"From someone Mon Jan  1 00:00:00 2024\nSubject: old\n\nno blank line after me\n")
    offset = append_to_mbox(mbox, Message.from_bytes(b"Subject: new\r\n\r\nhello\r\n"))
    data = mbox.read_bytes()
    assert data[offset - 2:offset + 5] == b"\n\nFrom "
    assert mboxrd_messages(data) == [b"Subject: old\n\nno blank line after me\n", b"Subject: new\n\nhello\n"]


# --- durability ---


class UnreadableSpool(Message):
    """A message whose body cannot be read past its first chunk, as when the spool file's disk fails."""

    def chunks(self, size: int = 1 << 16) -> Iterator[bytes]:
        yield self.header_bytes
        raise OSError(5, "Input/output error")


def test_a_failure_while_writing_leaves_the_file_exactly_as_it_was(tmp_path: Path) -> None:
    mbox = tmp_path / "inbox"
    append_to_mbox(mbox, Message.from_bytes(b"Subject: kept\r\n\r\nkept\r\n"))
    before = mbox.read_bytes()
    broken = UnreadableSpool.from_bytes(b"Subject: broken\r\n\r\n" + b"x" * 200_000)
    with pytest.raises(OSError, match="Input/output error"):
        append_to_mbox(mbox, broken)
    assert mbox.read_bytes() == before
    assert not (tmp_path / "inbox.lock").exists()


def test_a_full_disk_midway_truncates_the_partial_message(tmp_path: Path) -> None:
    """A real EFBIG: the writing process may not grow the file beyond a limit (RLIMIT_FSIZE), root included."""
    mbox = tmp_path / "inbox"
    append_to_mbox(mbox, Message.from_bytes(b"Subject: kept\r\n\r\nkept\r\n"))
    before = mbox.read_bytes()
    script = textwrap.dedent(f"""\
        import resource, signal, sys
        from pathlib import Path
        from postbote import Message
        from postbote.plugins.mbox import append_to_mbox
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({len(before) + 1000}, resource.RLIM_INFINITY))
        try:
            append_to_mbox(Path({str(mbox)!r}), Message.from_bytes(b"Subject: big\\r\\n\\r\\n" + b"y" * 100_000))
        except OSError as exc:
            print("failed:", exc.strerror)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.stdout.strip() == "failed: File too large", result.stderr
    assert mbox.read_bytes() == before


def test_create_false_refuses_a_missing_mbox(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="create: false"):
        append_to_mbox(tmp_path / "missing", Message.from_bytes(mail(1)), create=False)
    assert not (tmp_path / "missing").exists()


# --- locking against other programs ---


HOLD_LOCK = """\
import fcntl, sys
with open(sys.argv[1], "ab") as handle:
    if sys.argv[2] == "flock":
        fcntl.flock(handle, fcntl.LOCK_EX)
    else:
        fcntl.lockf(handle, fcntl.LOCK_EX)
    print("locked", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def lock_holder() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Another process holding the fcntl lock (or, with ``kind="flock"``, the BSD lock) on a file until released."""
    processes: list[subprocess.Popen[str]] = []

    def hold(path: Path, kind: str = "fcntl") -> subprocess.Popen[str]:
        process = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path), kind], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True)
        processes.append(process)
        assert process.stdout is not None and process.stdout.readline() == "locked\n"
        return process

    yield hold
    for process in processes:
        release(process)


def release(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        assert process.stdin is not None
        process.stdin.close()
        process.wait(timeout=10)


def test_a_fcntl_lock_held_by_another_process_makes_delivery_wait_then_fail(tmp_path: Path, lock_holder) -> None:
    mbox = tmp_path / "inbox"
    mbox.write_bytes(b"")
    lock_holder(mbox)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="fcntl lock"):
        append_to_mbox(mbox, Message.from_bytes(mail(1)), lock_timeout=0.5)
    assert time.monotonic() - started >= 0.5
    assert mbox.read_bytes() == b"" and not (tmp_path / "inbox.lock").exists()


def test_delivery_goes_ahead_once_the_other_process_releases_its_lock(tmp_path: Path, lock_holder) -> None:
    mbox = tmp_path / "inbox"
    mbox.write_bytes(b"")
    holder = lock_holder(mbox)
    threading.Timer(0.5, release, [holder]).start()
    started = time.monotonic()
    append_to_mbox(mbox, Message.from_bytes(mail(1)), lock_timeout=10)
    assert time.monotonic() - started >= 0.5
    assert mboxrd_messages(mbox.read_bytes()) == [on_disk(mail(1))]


def test_a_dot_lock_held_by_a_live_process_is_respected(tmp_path: Path) -> None:
    mbox, lock = tmp_path / "inbox", tmp_path / "inbox.lock"
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]) as holder:
        try:
            lock.write_text(f"{holder.pid}\n")
            with pytest.raises(TimeoutError, match="inbox.lock is held by another program"):
                append_to_mbox(mbox, Message.from_bytes(mail(1)), lock_timeout=0.3)
            assert lock.read_text() == f"{holder.pid}\n"
            assert not mbox.exists() or mbox.read_bytes() == b""
        finally:
            holder.kill()


def test_a_dot_lock_left_by_a_dead_process_is_removed(tmp_path: Path) -> None:
    mbox, lock = tmp_path / "inbox", tmp_path / "inbox.lock"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(dead.stdout)
    append_to_mbox(mbox, Message.from_bytes(mail(1)), lock_timeout=0.3)
    assert mboxrd_messages(mbox.read_bytes()) == [on_disk(mail(1))]
    assert not lock.exists()


def test_an_old_dot_lock_without_a_pid_is_removed(tmp_path: Path) -> None:
    mbox, lock = tmp_path / "inbox", tmp_path / "inbox.lock"
    lock.write_bytes(b"")
    an_hour_ago = time.time() - 3600
    os.utime(lock, (an_hour_ago, an_hour_ago))
    append_to_mbox(mbox, Message.from_bytes(mail(1)), lock_timeout=0.3)
    assert mboxrd_messages(mbox.read_bytes()) == [on_disk(mail(1))]


def test_a_fresh_dot_lock_without_a_pid_is_respected(tmp_path: Path) -> None:
    (tmp_path / "inbox.lock").write_bytes(b"")
    with pytest.raises(TimeoutError):
        append_to_mbox(tmp_path / "inbox", Message.from_bytes(mail(1)), lock_timeout=0.3)


def test_concurrent_writers_never_interleave(tmp_path: Path) -> None:
    mbox = tmp_path / "inbox"
    writer = textwrap.dedent(f"""\
        import sys
        from pathlib import Path
        from postbote import Message
        from postbote.plugins.mbox import append_to_mbox
        for n in range(25):
            body = (sys.argv[1] * 5000 + "\\r\\n") * 20
            append_to_mbox(Path({str(mbox)!r}), Message.from_bytes(f"Subject: {{n}}\\r\\n\\r\\n{{body}}".encode()))
    """)
    writers = [subprocess.Popen([sys.executable, "-c", writer, letter], cwd=REPO) for letter in "abc"]
    assert [w.wait(timeout=60) for w in writers] == [0, 0, 0]
    messages = mboxrd_messages(mbox.read_bytes())
    assert len(messages) == 75
    for data in messages:
        body = data.split(b"\n\n", 1)[1]
        assert body == (body[:1] * 5000 + b"\n") * 20
    assert not (tmp_path / "inbox.lock").exists()


# --- configuration ---


def load(tmp_path: Path, deliver: str):
    path = tmp_path / "postbote.yaml"
    path.write_text(f"accounts:\n  - {{name: a, host: h, username: u, password: p,\n     deliver: {deliver}}}\n")
    os.chmod(path, 0o600)
    return load_config(path, make_plugin_manager(entry_points=False))


def test_a_path_or_a_mapping_configures_an_mbox(tmp_path: Path) -> None:
    (short,) = load(tmp_path, "{mbox: mail/inbox}").accounts[0].destinations
    assert short.settings.path == tmp_path / "mail" / "inbox" and short.settings.create
    assert short.label == f"mbox:{tmp_path / 'mail' / 'inbox'}"
    (full,) = load(tmp_path, "{mbox: {path: /var/mail/a, create: false, lock_timeout: 1m}}").accounts[0].destinations
    assert (full.settings.path, full.settings.create, full.settings.lock_timeout) == (Path("/var/mail/a"), False, 60)


def test_mbox_option_mistakes_are_config_errors_with_their_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"postbote.yaml:3: accounts\[0\].deliver.mbox.crate: unknown key "
                                          r"\(did you mean 'create'\?\)"):
        load(tmp_path, "{mbox: {path: x, crate: false}}")
    with pytest.raises(ConfigError, match=r"deliver.mbox.path: required key is missing"):
        load(tmp_path, "{mbox: {create: false}}")


# --- through a poll ---


def test_a_poll_appends_each_message_once_and_deletes_it_from_the_server(make_setup) -> None:
    messages = [TRICKY["dot line"], TRICKY["From lines"], TRICKY["8-bit and NUL"]]
    setup = make_setup(messages, source="fake")
    mbox = setup.tmp_path / "inbox"
    stats = setup.poll(deliver=f"deliver: {{mbox: {mbox}}}\n")
    assert (stats.delivered, stats.deleted) == (3, 3)
    assert setup.server.uids() == []
    delivered = mboxrd_messages(mbox.read_bytes())
    assert [without_trace_header(data) for data in delivered] == [on_disk(m) for m in messages]
    assert all(data.startswith(b"Received: from localhost by ") for data in delivered)
    assert setup.poll(deliver=f"deliver: {{mbox: {mbox}}}\n").delivered == 0
    assert len(mboxrd_messages(mbox.read_bytes())) == 3


def test_a_locked_mbox_defers_the_message_which_stays_on_the_server(make_setup, lock_holder) -> None:
    setup = make_setup([mail(1)], source="fake")
    mbox = setup.tmp_path / "inbox"
    mbox.write_bytes(b"")
    holder = lock_holder(mbox)
    deliver = f"deliver: {{mbox: {{path: {mbox}, lock_timeout: 0.3s}}}}\n"
    stats = setup.poll(deliver=deliver)
    assert (stats.delivered, stats.deferred) == (0, 1)
    assert len(setup.server.uids()) == 1 and mbox.read_bytes() == b""
    store = StateStore(setup.tmp_path / "state")
    assert [record.status for record in store.records("test").values()] == [DEFERRED]  # waiting, not handled
    store.close()
    release(holder)
    assert setup.poll(deliver=deliver).delivered == 1
    assert setup.server.uids() == [] and len(mboxrd_messages(mbox.read_bytes())) == 1


def test_a_missing_mbox_with_create_false_is_a_temporary_failure(make_setup) -> None:
    setup = make_setup([mail(1)], source="fake")
    mbox = setup.tmp_path / "inbox"
    stats = setup.poll(deliver=f"deliver: {{mbox: {{path: {mbox}, create: false}}}}\n")
    assert (stats.delivered, stats.deferred, stats.rejected) == (0, 1, 0)
    assert len(setup.server.uids()) == 1 and not mbox.exists()


def test_the_delivery_answer_names_the_file_and_offset(tmp_path: Path) -> None:
    mbox = tmp_path / "inbox"
    destination = Destination("mbox", MboxSettings(mbox), f"mbox:{mbox}", 1)
    assert deliver_message(Message.from_bytes(mail(1)), destination) == Delivered(f"mbox {mbox} (offset 0)")
    size = mbox.stat().st_size
    assert deliver_message(Message.from_bytes(mail(2)), destination) == Delivered(f"mbox {mbox} (offset {size})")
    missing = Destination("mbox", MboxSettings(tmp_path / "nope", create=False), "mbox:nope", 1)
    with pytest.raises(DeliveryError, match="no such mbox file") as info:
        deliver_message(Message.from_bytes(mail(1)), missing)
    assert info.value.temporary


# --- /var/mail: a directory where the user may not create a dot-lock (issue 11 item 15) -----------------

CHILD_TIME_LIMIT = 30  # seconds; the child has no interval timer of ours (fork does not inherit them)


@dataclass
class VarMail:
    """A Debian-style mail spool: the directory root:mail 2775, the user's mbox user:mail 0660."""

    mbox: Path
    uid: int
    gid: int


@pytest.fixture
def var_mail() -> Iterator[VarMail]:
    if os.geteuid() != 0:
        pytest.skip("needs root to build a root:mail 2775 spool and deliver into it as another user (CI runs as root)")
    user, group = pwd.getpwnam("nobody"), grp.getgrnam("mail")
    assert group.gr_gid not in os.getgrouplist(user.pw_name, user.pw_gid), "nobody must not be in group mail"
    top = Path(tempfile.mkdtemp(prefix="postbote-var-"))
    try:
        top.chmod(0o755)
        spool = top / "mail"
        spool.mkdir()
        os.chown(spool, 0, group.gr_gid)
        spool.chmod(0o2775)
        mbox = spool / "nobody"
        mbox.write_bytes(b"")
        os.chown(mbox, user.pw_uid, group.gr_gid)
        mbox.chmod(0o660)
        yield VarMail(mbox, user.pw_uid, user.pw_gid)
    finally:
        shutil.rmtree(top)


def deliver_as(spool: VarMail, messages: list[bytes], *, lock_timeout: float,
               started: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Append ``messages`` to the spool's mbox in a forked child that runs as the spool's user, as postbote does
    there; returns what the child saw: the offsets or the error, and the log events."""
    reading, writing = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest
        try:
            signal.alarm(CHILD_TIME_LIMIT)
            # Only the report pipe stays open: an inherited end of a lock holder's stdin would keep it holding.
            os.closerange(3, writing)
            os.closerange(writing + 1, os.sysconf("SC_OPEN_MAX"))
            os.setgroups([])
            os.setresgid(spool.gid, spool.gid, spool.gid)
            os.setresuid(spool.uid, spool.uid, spool.uid)
            os.write(writing, b"started\n")
            report: dict[str, Any] = {"offsets": []}
            with capture_logs() as logs:
                try:
                    for data in messages:
                        report["offsets"].append(append_to_mbox(spool.mbox, Message.from_bytes(data),
                                                                lock_timeout=lock_timeout))
                except OSError as exc:
                    report["error"] = f"{type(exc).__name__}: {exc}"
            report["events"] = [entry for entry in logs if entry["event"].startswith("mbox.")]
            os.write(writing, json.dumps(report, default=str).encode())
        finally:
            os._exit(0)
    os.close(writing)
    try:
        with os.fdopen(reading, "rb") as pipe, interrupt_after(CHILD_TIME_LIMIT + 5, "the delivering child"):
            assert pipe.readline() == b"started\n"
            started()
            output = pipe.read()
    finally:
        os.waitpid(pid, 0)
    return json.loads(output)


def test_in_a_spool_without_the_right_to_dot_lock_the_message_lands_and_it_is_said_once(var_mail: VarMail) -> None:
    report = deliver_as(var_mail, [mail(1), mail(2)], lock_timeout=5)

    assert "error" not in report, report
    assert mboxrd_messages(var_mail.mbox.read_bytes()) == [on_disk(mail(1)), on_disk(mail(2))]
    assert [event["event"] for event in report["events"]] == ["mbox.dotlock_unavailable"]
    assert report["events"][0]["mbox"] == str(var_mail.mbox)
    assert sorted(p.name for p in var_mail.mbox.parent.iterdir()) == ["nobody"], "no lock file left behind"
    status = var_mail.mbox.stat()
    assert (status.st_uid, stat.S_IMODE(status.st_mode)) == (var_mail.uid, 0o660)


@pytest.mark.parametrize("kind", ["fcntl", "flock"])
def test_in_a_spool_without_dot_locks_a_lock_held_by_another_program_defers_the_message(
        var_mail: VarMail, lock_holder, kind: str) -> None:
    lock_holder(var_mail.mbox, kind)

    report = deliver_as(var_mail, [mail(1)], lock_timeout=0.5)

    assert report["error"].startswith("TimeoutError") and f"{kind} lock" in report["error"]
    assert var_mail.mbox.read_bytes() == b""


@pytest.mark.parametrize("kind", ["fcntl", "flock"])
def test_in_a_spool_without_dot_locks_delivery_waits_for_the_other_program(var_mail: VarMail, lock_holder,
                                                                           kind: str) -> None:
    holder = lock_holder(var_mail.mbox, kind)
    seen_while_locked: list[bytes] = []

    def release_later() -> None:
        time.sleep(0.3)  # the child is trying meanwhile; had it ignored the lock, the file would have grown
        seen_while_locked.append(var_mail.mbox.read_bytes())
        release(holder)

    report = deliver_as(var_mail, [mail(1)], lock_timeout=20, started=release_later)

    assert "error" not in report, report
    assert seen_while_locked == [b""]
    assert mboxrd_messages(var_mail.mbox.read_bytes()) == [on_disk(mail(1))]
