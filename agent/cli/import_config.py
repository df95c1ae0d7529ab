"""``postbote import [--from fetchmail|getmail|mpop] [FILE...]``: print a postbote.yaml for the accounts of a
``.fetchmailrc`` (default ``~/.fetchmailrc``), of getmail rc files or of an ``.mpoprc``, the passwords written into
0600 files.

The format is recognised by content (a ``[retriever]`` section is getmail's, ``account`` and ``host`` lines are
mpop's) unless ``--from`` says. What could not be
taken over is listed in the YAML's comments and on stderr, each with its reason. Exit status 0 when the accounts were
written (notes or not), 2 when a file cannot be read or parsed (``FILE:LINE: what``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TextIO

from postbote.jobs import ExitStatus


def run(args: argparse.Namespace) -> int:
    return import_command(args.files, tool=args.tool, output=args.output, secrets_dir=args.secrets_dir,
                          include_skipped=args.include_skipped, local_user=args.local_user, netrc=args.netrc)


def detect_tool(path: Path) -> str:
    """``getmail`` for an INI file with a ``[retriever]`` section, ``mpop`` for one with ``account`` and ``host``
    lines, else ``fetchmail``."""
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        return "fetchmail"  # the reader reports the error
    if any(line.lower() == "[retriever]" for line in lines):
        return "getmail"
    words = {line.split()[0] for line in lines if line and not line.startswith("#")}
    return "mpop" if {"account", "host"} <= words and not words & {"poll", "server", "skip"} else "fetchmail"


def import_command(files: list[str], *, tool: str | None = None, output: str | None = None,
                   secrets_dir: str | None = None, include_skipped: bool = False, local_user: str | None = None,
                   netrc: str | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    from postbote.errors import ConfigError
    from postbote.migrate import ImportResult
    from postbote.migrate.emit import render, write_secrets
    from postbote.migrate.fetchmailrc import import_fetchmailrc
    from postbote.migrate.getmailrc import import_getmailrc

    out, err = out or sys.stdout, err or sys.stderr
    paths = [Path(name).expanduser() for name in files] or [Path("~/.fetchmailrc").expanduser()]
    tools = {path: tool or detect_tool(path) for path in paths}
    if tool is None and len(set(tools.values())) > 1:
        raise ConfigError("these files are of different tools: import "
                          "them one tool at a time, or say which with --from")
    chosen = next(iter(tools.values()))
    if chosen == "fetchmail":
        if len(paths) > 1:
            raise ConfigError("one .fetchmailrc at a time (it holds every account)")
        netrc_path = Path(netrc).expanduser() if netrc else Path("~/.netrc").expanduser()
        result: ImportResult = import_fetchmailrc(
            paths[0], include_skipped=include_skipped, local_user=local_user,
            netrc=netrc_path if netrc or netrc_path.is_file() else None)
    elif chosen == "mpop":
        from postbote.migrate.mpoprc import import_mpoprc

        result = ImportResult()
        taken: set[str] = set()
        for path in paths:
            found = import_mpoprc(path, taken=taken)
            result.accounts += found.accounts
            result.unmapped += found.unmapped
    else:
        result = import_getmailrc(paths)
    target = Path(output).expanduser() if output else None
    directory = Path(secrets_dir).expanduser() if secrets_dir else (target.parent if target else Path.cwd())
    written = write_secrets(result, directory)
    text = render(result, ", ".join(str(path) for path in paths))
    if target is None:
        out.write(text)
    else:
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise ConfigError(f"{target} exists: remove it or name another --output") from None
        except OSError as exc:
            raise ConfigError(f"cannot write {target}: {exc.strerror or exc}") from None
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
    _report(result, written, target, err)
    return ExitStatus.OK


def _report(result: object, written: list[Path], target: Path | None, err: TextIO) -> None:
    from postbote.migrate import ImportResult

    assert isinstance(result, ImportResult)
    names = ", ".join(account.name for account in result.accounts) or "none"
    print(f"postbote import: {len(result.accounts)} account(s): {names}"
          + (f"; written to {target}" if target else ""), file=err)
    for path in written:
        print(f"postbote import: password written to {path} (mode 0600)", file=err)
    notes = [str(note) for note in result.unmapped] + \
        [f"{note} (account {account.name})" for account in result.accounts for note in account.unmapped]
    if notes:
        print("postbote import: not taken over:", file=err)
        for note in notes:
            print(f"  - {note}", file=err)
    keeping = [account.name for account in result.accounts if account.keys.get("keep")]
    if keeping:
        print(f"postbote import: {', '.join(keeping)} keep mail on the server: import the old tool's UID list "
              "first (postbote import-state ACCOUNT FILE) or run postbote mark-seen ACCOUNT, else the first poll "
              "delivers every message on the server again", file=err)
