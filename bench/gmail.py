"""Gmail import figures (issue 14): POP3 -> ``deliver: {gmail: ...}`` against the local stand-in for the Gmail API
(`postbote.testing.gmail_api`), which answers every request after ``--rtt`` (20 ms: the round trip to Google).

    python bench/gmail.py                 # 500 small messages, pipelined and one at a time; a 30 MB message's RSS
    python bench/gmail.py --n 100 --rtt 0.005

Prints, for 500 small messages: wall time of ``postbote poll`` (a child process), messages a second, HTTP requests per
message, with ``pipeline: true`` (the import runs while the source sends the next message) and ``pipeline: false``
(each import answered before the next message is fetched), with the POP3 source on loopback and behind the delaying
relay (bench/relay.py) at the same RTT, as an old provider on the internet is; then the peak RSS of a poll that
imports one 30 MB message (resumable upload, streamed from the spool) and of one that imports one small message, for
the difference. The source is postbote's own test POP3 server on loopback, in this process, so its memory is not
counted; the token comes from a ``token_command``.
Nothing is asserted; the figures go into docs/performance.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml  # noqa: E402
from postbote.testing.gmail_api import GmailAPIServer  # noqa: E402
from postbote.testing.pop3server import POP3Server  # noqa: E402

from bench.relay import RelayProcess  # noqa: E402
from tests.harness import run_postbote  # noqa: E402
from tests.servers.certs import make_test_pki  # noqa: E402

TOKEN = "bench-access-token"


def small(number: int) -> bytes:
    body = b"".join(f"line {line} of message {number}, some text to fill it\r\n".encode() for line in range(40))
    return (f"From: a@example.net\r\nTo: me@example.org\r\nSubject: message {number}\r\n"
            f"Message-ID: <{number}@bench>\r\nDate: Mon, 7 Dec 2026 04:00:00 +0000\r\n\r\n").encode() + body


def large(megabytes: int) -> bytes:
    line = b"x" * 76 + b"\r\n"
    return b"Subject: large\r\nMessage-ID: <large@bench>\r\n\r\n" + line * (megabytes * 1024 * 1024 // len(line))


def poll(work: Path, pop3_port: int, gmail: GmailAPIServer, ca_file: Path,
         **options: object) -> tuple[float, int]:
    """One ``postbote poll`` as a child: its wall time and peak RSS (bytes)."""
    state = work / "state"
    config = work / "postbote.yaml"
    config.write_text(yaml.safe_dump({
        "state_dir": str(state), "log": {"level": "warning", "format": "json"},
        "accounts": [{"name": "bench", "host": "127.0.0.1", "port": pop3_port, "tls": "none", "username": "demo",
                      "password": "demo", "timeout": "60s",
                      "deliver": {"gmail": {"api_url": gmail.base_url, "tls_ca_file": str(ca_file),
                                            "token_command": ["/bin/echo", TOKEN], "rate_limit": 1000,
                                            **options}}}]}))
    config.chmod(0o600)
    done = run_postbote(config, "poll", timeout=600)  # a small launcher forks it: no RSS inherited from here
    if done.status != 0:
        raise SystemExit(f"postbote poll failed (status {done.status}):\n{done.output}")
    return done.duration, done.peak_rss


def run(n: int, rtt: float, megabytes: int, repeat: int) -> None:
    with tempfile.TemporaryDirectory(prefix="postbote-gmail-bench-") as scratch:
        root = Path(scratch)
        pki = make_test_pki(root / "pki")
        print(f"Gmail import, {n} small messages ({len(small(1))} octets), {rtt * 1000:g} ms RTT to the API")
        print(f"{'source':<22} {'mode':<22} {'time s':>8} {'msg/s':>8} {'requests/msg':>13}   (min-max, "
              f"{repeat} runs)")
        for source_rtt in (0.0, rtt):
            for mode, pipeline in (("pipelined (Pending)", True), ("one at a time", False)):
                times, requests = [], 0.0
                for repetition in range(repeat):
                    work = root / f"{mode.split()[0]}-{source_rtt}-{repetition}"
                    work.mkdir()
                    with POP3Server([small(number) for number in range(1, n + 1)]) as pop3, \
                            GmailAPIServer(pki.server_context(), work / "gmail",
                                           lambda token: "me" if token == TOKEN else None, rtt=rtt) as gmail:
                        relay = RelayProcess(pop3.port, source_rtt / 2) if source_rtt else None
                        if relay is not None:
                            relay.start()
                        try:
                            elapsed, _ = poll(work, relay.port if relay else pop3.port, gmail, pki.ca_file,
                                              pipeline=pipeline)
                        finally:
                            if relay is not None:
                                relay.stop()
                        assert len(gmail.imported) == n and not gmail.refused, gmail.refused
                        times.append(elapsed)
                        requests = len(gmail.log) / n
                where = f"POP3 at {source_rtt * 1000:g} ms RTT" if source_rtt else "POP3 on loopback"
                median = statistics.median(times)
                print(f"{where:<22} {mode:<22} {median:8.2f} {n / median:8.1f} {requests:13.3f}   "
                      f"({min(times):.2f}-{max(times):.2f} s)")
        print(f"\nPeak RSS of postbote poll (rtt {rtt * 1000:g} ms)")
        for label, message in ((f"one {megabytes} MB message", large(megabytes)), ("one small message", small(1))):
            work = root / label.replace(" ", "-")
            work.mkdir()
            with POP3Server([message]) as pop3, \
                    GmailAPIServer(pki.server_context(), work / "gmail", lambda token: "me" if token == TOKEN else None,
                                   rtt=rtt) as gmail:
                elapsed, rss = poll(work, pop3.port, gmail, pki.ca_file)
                (imported,) = gmail.imported
                print(f"{label:<26} {rss / (1 << 20):8.1f} MB  ({imported.upload_type} upload, {elapsed:.2f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--rtt", type=float, default=0.020, help="seconds before each API answer (default 0.020)")
    parser.add_argument("--mb", type=int, default=30, help="the large message's size in MB (default 30)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each mode; the median is shown (default 3)")
    arguments = parser.parse_args()
    run(arguments.n, arguments.rtt, arguments.mb, arguments.repeat)


if __name__ == "__main__":
    main()
