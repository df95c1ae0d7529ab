"""A postbote config with many POP3S accounts, for the scale measurements of issue 16 (`scale.py`).

    python bench/scale_config.py --accounts 100000 --users 2000 --port 995 --out /var/tmp/scale/postbote.yaml

Account ``aNNNNNN`` logs in as user ``uNNNN`` (accounts beyond ``--users`` reuse the users round robin), with the
password ``pw-uNNNN``, over implicit TLS pinned to ``--fingerprint`` or verified against ``--ca-file``, and delivers
into one Maildir. Written as a main file and, with ``--per-file``, a conf.d of account files (``accounts_dir``),
as a provider would keep them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def user_name(index: int) -> str:
    return f"u{index:05d}"


def password_of(user: str) -> str:
    return f"pw-{user}"


def accounts(count: int, users: int, host: str, port: int, *, fingerprint: str | None = None,
             ca_file: Path | None = None, maildir: Path, interval: str = "5m") -> list[dict[str, Any]]:
    tls: dict[str, Any] = {"tls_fingerprint": fingerprint} if fingerprint else {"tls_ca_file": str(ca_file)}
    made = []
    for index in range(count):
        user = user_name(index % users)
        made.append({"name": f"a{index:06d}", "host": host, "port": port, "tls": "implicit", **tls,
                     "username": user, "password": password_of(user), "poll_interval": interval,
                     "timeout": "30s", "deliver": {"maildir": str(maildir)}})
    return made


def write(path: Path, entries: list[dict[str, Any]], *, state_dir: Path, per_file: int = 0,
          max_parallel: int = 32, max_parallel_per_host: int = 32, level: str = "info",
          plugins: dict[str, Any] | None = None) -> Path:
    """The config at ``path`` (0600); with ``per_file`` the accounts go into ``path``'s ``accounts.d``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    top: dict[str, Any] = {"state_dir": str(state_dir), "log": {"format": "json", "level": level},
                           "max_parallel": max_parallel, "max_parallel_per_host": max_parallel_per_host}
    if plugins:
        top["plugins"] = plugins
    if per_file:
        directory = path.parent / "accounts.d"
        directory.mkdir(exist_ok=True)
        for old in directory.glob("*.yaml"):
            old.unlink()
        for start in range(0, len(entries), per_file):
            chunk = directory / f"{start // per_file:05d}.yaml"
            chunk.write_text(yaml.dump({"accounts": entries[start:start + per_file]}, Dumper=DUMPER, sort_keys=False))
            chunk.chmod(0o600)
        top["accounts_dir"] = str(directory)
    else:
        top["accounts"] = entries
    path.write_text(yaml.dump(top, Dumper=DUMPER, sort_keys=False))
    path.chmod(0o600)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/scale_config.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--accounts", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=995)
    parser.add_argument("--fingerprint", help="SHA-256 of the server certificate (hex)")
    parser.add_argument("--ca-file", type=Path)
    parser.add_argument("--interval", default="5m")
    parser.add_argument("--per-file", type=int, default=0, help="accounts per file of an accounts_dir (0: one file)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if not args.fingerprint and not args.ca_file:
        parser.error("--fingerprint or --ca-file")
    entries = accounts(args.accounts, args.users, args.host, args.port, fingerprint=args.fingerprint,
                       ca_file=args.ca_file, maildir=args.out.parent / "Maildir", interval=args.interval)
    write(args.out, entries, state_dir=args.out.parent / "state", per_file=args.per_file)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
