"""Delivery through a local mail delivery agent: ``deliver: {mda: [/usr/bin/procmail, -d, alice]}``
(or ``{mda: {command: [...], timeout: 5m}}``).

The command is an argument list run without a shell, so nothing in it is ever interpreted. ``{account}`` and
``{uid}`` in an argument are replaced by the account's name and the message's POP3 UID; other text, braces
included, is passed as written. The message goes to the command's standard input with LF line endings, as
procmail, maildrop and dovecot-lda expect.

The exit status decides, following sysexits(3): 0 means delivered, 75 (EX_TEMPFAIL) a temporary failure (the
message stays on the server for the next poll), anything else, or death by a signal, a permanent failure (the
message stays on the server, marked rejected). A command that runs past ``timeout`` is killed, with every process
it started, and the failure is temporary. A command that exits without reading all of its input is judged by its
exit status too: some filters decide from the header alone. The command's environment is postbote's without the
variables the configuration names as secret sources (``password_env``): an MDA has no use for a POP3 password.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from postbote import (
    Account,
    Delivered,
    DeliveryError,
    Destination,
    Message,
    Node,
    Parser,
    Problems,
    Section,
    child_environment,
    duration,
    hookimpl,
    lf_lines,
    path_relative_to,
    text_list,
)

if TYPE_CHECKING:
    import subprocess

DESTINATION_KINDS = ("mda",)
DEFAULT_TIMEOUT = 300.0
EX_TEMPFAIL = 75
IN_MEMORY_LIMIT = 8 << 20  # larger messages are handed to the command from a temporary file on disk
PLACEHOLDERS = ("{account}", "{uid}")
STDERR_EXCERPT = 300

_PLACEHOLDER_LIKE = re.compile(r"\{[A-Za-z_]+\}")


@dataclass(frozen=True)
class MDASettings:
    command: tuple[str, ...]
    timeout: float = DEFAULT_TIMEOUT

    @property
    def label(self) -> str:
        return self.command[0]


@hookimpl
def parse_destination(kind: str, options: Node, problems: Problems, base_dir: Path) -> MDASettings | None:
    if kind != "mda":
        return None
    if not isinstance(options.value, dict):
        options = Node({"command": options}, options.line, options.path)
    section = Section(options, problems)
    command = section.get("command", _command(base_dir), required=True)
    timeout = section.get("timeout", duration, DEFAULT_TIMEOUT)
    section.finish()
    if not command or not _placeholders_known(section):
        return None
    return MDASettings(tuple(command), timeout)


def _command(base_dir: Path) -> Parser[list[str]]:
    """An argument list; a program given with a relative path (``bin/deliver``) is taken from ``base_dir``,
    a bare name (``procmail``) is looked up in PATH when it runs."""

    def parse(value: Any) -> list[str]:
        if not isinstance(value, list):
            raise ValueError("expected a command as a list of arguments (it is run without a shell), "
                             "e.g. [/usr/bin/procmail, -d, alice]")
        argv = text_list(value)
        program = argv[0]
        if "/" in program or program.startswith("~"):
            argv[0] = str(path_relative_to(base_dir)(program))
        return argv

    return parse


def _placeholders_known(section: Section) -> bool:
    """A ``{word}`` that is not a placeholder is almost surely a mistake (``{recipient}``): report it."""
    known = True
    node = section.raw("command")
    for item in node.value if node is not None else []:
        for unknown in (p for p in _PLACEHOLDER_LIKE.findall(str(item.value)) if p not in PLACEHOLDERS):
            section.problem(f"unknown placeholder {unknown} (known: {', '.join(PLACEHOLDERS)})", item)
            known = False
    return known


@hookimpl
def deliver_message(message: Message, destination: Destination, account: Account) -> Delivered | None:
    if destination.kind != "mda":
        return None
    settings: MDASettings = destination.settings
    argv = [expand(argument, account=account.name, uid=message.uid) for argument in settings.command]
    return Delivered(run_mda(argv, lf_lines(message.chunks()), timeout=settings.timeout))


def expand(argument: str, *, account: str, uid: str) -> str:
    return argument.replace("{account}", account).replace("{uid}", uid)


def run_mda(argv: list[str], data: Iterable[bytes], *, timeout: float) -> str:
    """Run ``argv`` with ``data`` on its standard input; a description when it exits 0, else `DeliveryError`.

    The message is written whole into an unlinked file first, and that file is the command's standard input (not
    a pipe): if postbote is killed halfway, the command still reads the whole message, never a truncated one that
    it would take for complete -- and how much it read is the file offset it leaves behind."""
    # Imported here: this plugin is always loaded, but only mda: destinations run a command.
    import subprocess
    import tempfile

    name = Path(argv[0]).name
    with _message_file(data) as (message, size), tempfile.TemporaryFile() as stderr:
        try:
            process = subprocess.Popen(argv, stdin=message, stdout=subprocess.DEVNULL, stderr=stderr,
                                       start_new_session=True, env=child_environment())
        except OSError as exc:
            raise DeliveryError(f"mda {name}: cannot run {argv[0]}: {exc.strerror or exc}", temporary=True) from None
        try:
            status = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DeliveryError(f"mda {name}: no answer within {timeout:g}s, killed", temporary=True) from None
        finally:
            _kill_if_running(process)
        read_all = os.lseek(message.fileno(), 0, os.SEEK_CUR) >= size
        return _verdict(name, status, read_all, _first_line(stderr))


@contextlib.contextmanager
def _message_file(data: Iterable[bytes]) -> Iterator[tuple[IO[bytes], int]]:
    """The message in an anonymous file at offset 0, and its size: in memory (memfd) up to `IN_MEMORY_LIMIT`,
    in a temporary file on disk beyond."""
    import tempfile

    chunks = iter(data)
    head: list[bytes] = []
    for chunk in chunks:
        head.append(chunk)
        if sum(map(len, head)) > IN_MEMORY_LIMIT:
            break
    small = sum(map(len, head)) <= IN_MEMORY_LIMIT and hasattr(os, "memfd_create")
    with (os.fdopen(os.memfd_create("postbote-mda", os.MFD_CLOEXEC), "w+b") if small
          else tempfile.TemporaryFile()) as file:
        for chunk in itertools.chain(head, chunks):
            file.write(chunk)
        size = file.tell()
        file.flush()
        file.seek(0)
        yield file, size


def _kill_if_running(process: subprocess.Popen[bytes]) -> None:
    """Kill the command and everything it started (its own session), and reap it."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _verdict(name: str, status: int, read_all: bool, stderr_line: str) -> str:
    unread = "" if read_all else " (it did not read all of the message)"
    if status == 0:
        return f"mda {name}: exit status 0{unread}"
    detail = f": {stderr_line}" if stderr_line else ""
    if status < 0:
        raise DeliveryError(f"mda {name}: killed by {_signal_name(-status)}{unread}{detail}", temporary=False)
    raise DeliveryError(f"mda {name}: exit status {status}{unread}{detail}", temporary=status == EX_TEMPFAIL)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _first_line(stream: IO[bytes]) -> str:
    stream.seek(0)
    text = stream.read(4096).decode("utf-8", "replace")
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return line[:STDERR_EXCERPT]
