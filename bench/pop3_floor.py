"""The floor for an empty POP3S poll: a bare stdlib client, what postbote's CPU per poll is compared with.

    python -m bench.pop3_floor --host 127.0.0.1 --port 995 --fingerprint HEX --users users.txt --parallel 32

One SSL context for the whole run; per user: connect, TLS (certificate pinned by SHA-256, as postbote's
``tls_fingerprint``), the greeting, CAPA, AUTH PLAIN (initial response), UIDL, LIST, QUIT. ``--parallel`` threads
poll the users (``NAME PASSWORD`` per line) ``--rounds`` times; prints one JSON line: polls, failures, the process's
CPU seconds (every thread, ``time.process_time``) and wall seconds. Nothing is stored or logged: that is the point.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import socket
import ssl
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


class FloorError(Exception):
    pass


def poll(context: ssl.SSLContext, host: str, port: int, pin: str, user: str, password: str) -> None:
    with socket.create_connection((host, port), timeout=30) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with context.wrap_socket(raw, server_hostname=host) as tls:
            if not hmac.compare_digest(hashlib.sha256(tls.getpeercert(binary_form=True) or b"").hexdigest(), pin):
                raise FloorError("certificate does not match the pin")
            reader = tls.makefile("rb")
            expect_ok(reader)
            command(tls, reader, b"CAPA", listing=True)
            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
            command(tls, reader, f"AUTH PLAIN {token}".encode())
            command(tls, reader, b"UIDL", listing=True)
            command(tls, reader, b"LIST", listing=True)
            command(tls, reader, b"QUIT")
            reader.close()


def command(tls: ssl.SSLSocket, reader: object, line: bytes, *, listing: bool = False) -> None:
    tls.sendall(line + b"\r\n")
    expect_ok(reader)
    if listing:
        while reader.readline() not in (b".\r\n", b""):  # type: ignore[attr-defined]
            pass


def expect_ok(reader: object) -> None:
    answer = reader.readline()  # type: ignore[attr-defined]
    if not answer.startswith(b"+OK"):
        raise FloorError(answer[:80].decode(errors="replace"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pop3_floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fingerprint", required=True, help="SHA-256 of the server certificate (hex)")
    parser.add_argument("--users", type=Path, required=True, help="a file of NAME PASSWORD lines")
    parser.add_argument("--parallel", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args(argv)
    users = [tuple(line.split()) for line in args.users.read_text().splitlines() if line.strip()]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the pin is the check, as with postbote's tls_fingerprint
    pin = args.fingerprint.replace(":", "").lower()
    failures = 0

    def one(pair: tuple[str, ...]) -> bool:
        try:
            poll(context, args.host, args.port, pin, pair[0], pair[1])
        except (OSError, FloorError) as exc:
            print(f"{pair[0]}: {exc}", file=sys.stderr)
            return False
        return True

    cpu, wall = time.process_time(), time.monotonic()
    with ThreadPoolExecutor(args.parallel) as pool:
        for _ in range(args.rounds):
            failures += sum(not ok for ok in pool.map(one, users))
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    polls = len(users) * args.rounds
    print(json.dumps({"polls": polls, "failures": failures, "cpu_s": round(cpu, 4), "wall_s": round(wall, 4)}))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
