"""The floor under any tool's figures: what the server, the disk and Python's start-up cost before any tool work.

    python bench/floor.py --n 1000 --repeat 5

Measures, on this machine, in this run (medians of ``--repeat``):

- **server**: the benchmark's Dovecot serving ``--n`` small messages to the cheapest client there is -- one
  connection, USER/PASS, UIDL, every RETR and DELE sent in one write, replies read and thrown away, QUIT (which
  is when Dovecot removes the messages). Split into login, transfer and QUIT.
- **disk**: ``--n`` files of 3 kB written into ``tmp/`` and renamed into ``new/`` of a Maildir in the cache
  directory, on the file system the benchmark's Maildirs live on, made durable with one fsync per file (as mpop
  and safecat do) or with one sync for all (postbote's group commit). Creating a file is mostly ext4 finding a
  free inode, and what that costs depends on where on the disk the directory is: on one VM, from 35 µs in one
  directory to 370 µs in another of the same file system.
- **start-up**: ``python -c pass`` with the benchmark venv's interpreter, and ``postbote poll`` of an empty
  mailbox (interpreter, imports, configuration, state store, login, QUIT).

and prints the lowest wall time a tool could reach in the ``maildir`` and ``smtp-prompt`` modes if its own
per-message work cost nothing, and so the best ratio a Python tool started per poll can have against a peer's
measured time: a target above that ratio cannot be met by making postbote's per-message path faster.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import environment  # noqa: E402
from bench.corpus import small_corpus  # noqa: E402
from bench.cost import one_run  # noqa: E402
from bench.mailserver import PASSWORD, BenchMailServer  # noqa: E402
from bench.profile import prepared_poll  # noqa: E402
from bench.runner import empty_maildir  # noqa: E402

SMALL_MESSAGE = b"x" * 75 + b"\n"


def server_floor(server: BenchMailServer, n: int) -> tuple[float, float, float]:
    """(login, transfer, QUIT) seconds for ``n`` seeded messages, fetched and deleted by a minimal client."""
    started = time.perf_counter()
    with socket.create_connection((server.host, server.port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        replies = sock.makefile("rb", buffering=1 << 18)
        replies.readline()
        sock.sendall(f"USER u1\r\nPASS {PASSWORD}\r\nUIDL\r\n".encode())
        for _ in range(2):
            replies.readline()
        _skip_multiline(replies)
        logged_in = time.perf_counter()
        sock.sendall(b"".join(b"RETR %d\r\nDELE %d\r\n" % (i, i) for i in range(1, n + 1)))
        for _ in range(n):
            _skip_multiline(replies)
            replies.readline()
        transferred = time.perf_counter()
        sock.sendall(b"QUIT\r\n")
        if not replies.readline().startswith(b"+OK"):
            raise RuntimeError("QUIT refused")
        quit_done = time.perf_counter()
    return logged_in - started, transferred - logged_in, quit_done - transferred


def _skip_multiline(replies) -> None:  # noqa: ANN001 - a buffered socket file
    if not replies.readline().startswith(b"+OK"):
        raise RuntimeError("the server refused a command")
    while replies.readline() != b".\r\n":
        pass


def disk_floor(maildir: Path, n: int, *, fsync_each: bool) -> tuple[float, float]:
    """Seconds to write ``n`` small files into an emptied Maildir, and then to make them durable with one sync (0 when
    each file was fsynced as it was written, inside the first figure)."""
    empty_maildir(maildir)
    os.sync()
    data = SMALL_MESSAGE * 40
    started = time.perf_counter()
    for i in range(n):
        source, target = f"{maildir}/tmp/{i}", f"{maildir}/new/{i}"
        fd = os.open(source, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, data)
        if fsync_each:
            os.fsync(fd)
        os.close(fd)
        os.rename(source, target)
    written = time.perf_counter()
    if not fsync_each:
        os.sync()
    return written - started, time.perf_counter() - written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/floor.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--cache-dir", type=Path, default=environment.DEFAULT_CACHE)
    args = parser.parse_args(argv)
    median = statistics.median

    with prepared_poll("maildir", 0, environment.REPO, args.cache_dir) as poll:
        python = poll.command[0]
        as_user = dict(poll.user.popen_args())
        interpreter = median(one_run([python, "-c", "pass"], poll.env, poll.work, as_user)[0]
                             for _ in range(args.repeat))
        empty_polls = []
        for _ in range(args.repeat):
            poll.seed()
            empty_polls.append(one_run(poll.command, poll.env, poll.work, as_user)[0])
        empty_poll = median(empty_polls)
        server = poll.server
        sessions = []
        for _ in range(args.repeat):
            server.seed("u1", small_corpus(args.n))
            server.warm("u1", args.n)
            sessions.append(server_floor(server, args.n))
            if server.left(["u1"]):
                raise SystemExit("the minimal client left messages on the server")
    login, transfer, quit_ = (median(column) for column in zip(*sessions, strict=True))
    maildir = args.cache_dir / "floor-Maildir"
    fsync_each = median(disk_floor(maildir, args.n, fsync_each=True)[0] for _ in range(args.repeat))
    create, one_sync = (median(column) for column in zip(
        *(disk_floor(maildir, args.n, fsync_each=False) for _ in range(args.repeat)), strict=True))
    shutil.rmtree(maildir)

    print(f"floor for {args.n} small messages, medians of {args.repeat}:")
    print(f"  server   login {login:.3f} s, RETR+DELE of all {transfer:.3f} s, QUIT (expunge) {quit_:.3f} s")
    print(f"  disk     write and rename {create:.3f} s, then one sync for all {one_sync:.3f} s; "
          f"with an fsync per file {fsync_each:.3f} s (in {maildir})")
    print(f"  start-up python -c pass {interpreter:.3f} s; postbote poll of an empty mailbox {empty_poll:.3f} s "
          f"(login included)")
    server_total = login + transfer + quit_
    smtp_floor = empty_poll + transfer + quit_
    # Creating the files can overlap with the transfer (postbote creates them on another thread, on the other core).
    maildir_floor = empty_poll + max(transfer, create) + one_sync + quit_
    print(f"  server alone: {server_total:.3f} s ({args.n / server_total:,.0f} msg/s)")
    print(f"lowest wall for postbote if its per-message work cost nothing: smtp-prompt {smtp_floor:.3f} s, "
          f"maildir {maildir_floor:.3f} s")
    print("a target of R x a peer's wall time T is out of reach when T / R is below these figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
