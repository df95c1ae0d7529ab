"""A delaying TCP relay on loopback: emulated network latency when ``tc qdisc ... netem`` is unavailable.

Every chunk read from one side is written to the other side ``--delay`` seconds later (10 ms each way gives
a 20 ms round trip), in order, with no bandwidth limit: like a long, fat link, data keeps flowing while
earlier chunks are still "on the wire". Back-pressure is passed through (a side whose peer cannot keep up
stops being read).

Run as ``python -m bench.relay --target-port P --delay 0.010``; it prints ``READY <port>`` when it listens.
``python -m bench.relay --probe HOST:PORT`` measures the round trip of a POP3 ``NOOP`` through it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from bench.children import stop_child

HIGH_WATER = 1 << 20
# The loop runs on select(2), whose timeout has microsecond resolution (epoll's is rounded up to whole
# milliseconds, which made every hop up to 1 ms late); wake this much early to absorb the timer's overshoot.
EARLY = 0.0004


class _DelayedHalf:
    """One direction: chunks (``None`` = end of stream) are released to ``target`` after the delay, in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        self.loop = loop
        self.delay = delay
        self.target: _Side | None = None
        self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.timer: asyncio.TimerHandle | None = None

    def push(self, chunk: bytes | None) -> None:
        self.queue.append((self.loop.time() + self.delay, chunk))
        if self.timer is None and self.target is not None:
            self._schedule()

    def attach(self, target: _Side) -> None:
        self.target = target
        if self.queue and self.timer is None:
            self._schedule()

    def _schedule(self) -> None:
        self.timer = self.loop.call_at(self.queue[0][0] - EARLY, self._release)

    def _release(self) -> None:
        self.timer = None
        assert self.target is not None and self.target.transport is not None
        transport = self.target.transport
        now = self.loop.time() + EARLY
        while self.queue and self.queue[0][0] <= now:
            _, chunk = self.queue.popleft()
            if transport.is_closing():
                self.queue.clear()
                return
            if chunk is not None:
                transport.write(chunk)
            else:
                self.target.end_writing()
        if self.queue:
            self._schedule()


class _Side(asyncio.Protocol):
    """One socket of a relayed connection; what it reads goes into ``outgoing``."""

    def __init__(self, outgoing: _DelayedHalf) -> None:
        self.outgoing = outgoing
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.eof = False
        self.wrote_eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        self.outgoing.push(data)

    def eof_received(self) -> bool:
        self.eof = True
        self.outgoing.push(None)
        return not self.wrote_eof  # keep the socket open until the other direction has been delivered too

    def end_writing(self) -> None:
        """The other side's stream ended (and its last data has been delivered here)."""
        assert self.transport is not None
        self.wrote_eof = True
        if self.eof or not self.transport.can_write_eof():
            self.transport.close()
        else:
            self.transport.write_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.eof:
            self.eof = True
            self.outgoing.push(None)

    # back-pressure: when our socket cannot take more, stop reading the peer
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class Relay:
    def __init__(self, target_host: str, target_port: int, delay: float) -> None:
        self.target = (target_host, target_port)
        self.delay = delay

    async def serve(self, host: str, port: int) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        return await loop.create_server(lambda: _Accepted(self, loop), host, port, backlog=512)


class _Accepted(_Side):
    """The client's side; connects upstream on arrival and holds the client's data until then."""

    def __init__(self, relay: Relay, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(_DelayedHalf(loop, relay.delay))
        self.relay = relay
        self.loop = loop

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.loop.create_task(self._connect_upstream())

    async def _connect_upstream(self) -> None:
        downstream = _DelayedHalf(self.loop, self.relay.delay)
        try:
            _, upstream = await self.loop.create_connection(lambda: _Side(downstream), *self.relay.target)
        except OSError:
            assert self.transport is not None
            self.transport.close()
            return
        assert self.transport is not None and upstream.transport is not None
        upstream.peer, self.peer = self, upstream
        downstream.attach(self)
        self.outgoing.attach(upstream)


def probe(host: str, port: int, rounds: int = 20) -> float:
    """Median round trip (seconds) of a POP3 NOOP-less exchange: CAPA before login, through ``host:port``."""
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = sock.makefile("rb")
        reader.readline()
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            sock.sendall(b"CAPA\r\n")
            while reader.readline() not in (b".\r\n", b""):
                pass
            times.append(time.perf_counter() - started)
        sock.sendall(b"QUIT\r\n")
    return sorted(times)[len(times) // 2]


class RelayProcess:
    """A relay in a child process, for the benchmark driver."""

    def __init__(self, target_port: int, delay: float, target_host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.delay = delay
        self.port = 0
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        argv = [sys.executable, "-m", "bench.relay", "--target-host", self.target_host,
                "--target-port", str(self.target_port), "--delay", str(self.delay)]
        repo = Path(__file__).resolve().parent.parent
        self._proc = subprocess.Popen(argv, cwd=repo, stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline().split()
        if len(line) != 2 or line[0] != "READY":
            self.stop()
            raise RuntimeError("the delaying relay did not start")
        self.port = int(line[1])

    def stop(self) -> None:
        stop_child(self._proc)
        self._proc = None


async def _serve(args: argparse.Namespace) -> None:
    relay = Relay(args.target_host, args.target_port, args.delay)
    server = await relay.serve(args.host, args.port)
    port = server.sockets[0].getsockname()[1]
    print(f"READY {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--target-host", default="127.0.0.1")
    parser.add_argument("--target-port", type=int)
    parser.add_argument("--delay", type=float, default=0.010, help="seconds added each way (default 0.010)")
    parser.add_argument("--probe", metavar="HOST:PORT", help="measure a POP3 server's round trip and exit")
    args = parser.parse_args(argv)
    if args.probe:
        host, _, port = args.probe.rpartition(":")
        print(f"round trip {probe(host, int(port)) * 1000:.2f} ms")
        return 0
    if args.target_port is None:
        parser.error("--target-port is required")
    selector = selectors.SelectSelector()  # < 1024 sockets; see EARLY
    with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(selector)) as runner:
        runner.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
