"""Imported accounts written as a postbote.yaml (text with comments), the passwords into 0600 files.

The YAML is written by hand, not dumped, so that every note can sit as a comment beside what it is about. A password
never appears in it, nor on stdout or stderr: it goes into ``SECRETS_DIR/ACCOUNT.password`` (mode 0600, the directory
0700), and the account names that file in ``password_file``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from postbote.migrate import Imported, ImportResult, MigrationError

_PLAIN = re.compile(r"[A-Za-z/~_.][A-Za-z0-9_./@+~-]*")
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~", ".inf", ".nan"}


def scalar(value: Any) -> str:
    """One YAML scalar: plain where that cannot be misread, double-quoted with escapes otherwise."""
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    text = str(value)
    if _PLAIN.fullmatch(text) and text.lower() not in _YAML_WORDS:
        return text
    return '"' + "".join(_escaped(char) for char in text) + '"'


def _escaped(char: str) -> str:
    """One character inside a YAML double-quoted scalar: printable text as it is, the rest as an escape (YAML reads
    a raw control character as an error, a raw NEL or line separator as a line break)."""
    if char in '"\\':
        return "\\" + char
    if char.isprintable():
        return char
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _flow(value: Any) -> str | None:
    """A short list or mapping of scalars on one line (``[a, b]``, ``{host: x}``), or None if it is not one."""
    if isinstance(value, list) and all(not isinstance(v, (list, dict)) for v in value):
        return "[" + ", ".join(scalar(v) for v in value) + "]"
    if isinstance(value, dict) and all(not isinstance(v, dict) for v in value.values()):
        parts = [f"{k}: {_flow(v) if isinstance(v, list) else scalar(v)}" for k, v in value.items()]
        line = "{" + ", ".join(parts) + "}"
        return line if len(line) <= 80 else None
    return None


def _block(key: str, value: Any, indent: str) -> list[str]:
    if key.startswith("# "):  # a key written commented out, for the user to fill in
        return [f"{indent}# {key[2:]}: {scalar(value)}"]
    if isinstance(value, (list, dict)):
        flow = _flow(value)
        if flow is not None:
            return [f"{indent}{key}: {flow}"]
        lines = [f"{indent}{key}:"]
        if isinstance(value, dict):
            for sub_key, sub_value in value.items():
                lines += _block(sub_key, sub_value, indent + "  ")
        else:
            for item in value:
                flow = _flow(item) if isinstance(item, (list, dict)) else scalar(item)
                if flow is None:
                    raise ValueError("nested lists are not written")
                lines.append(f"{indent}  - {flow}")
        return lines
    return [f"{indent}{key}: {scalar(value)}"]


def write_secrets(result: ImportResult, secrets_dir: Path) -> list[Path]:
    """Write each account's password into ``secrets_dir/NAME.password`` (0600; the directory made 0700) and name the
    file in the account's ``password_file``. Returns the files written. An existing file is replaced."""
    written: list[Path] = []
    for account in result.accounts:
        if "password_file" not in account.keys:
            continue
        path = (secrets_dir / f"{account.name}.password").absolute()
        account.keys["password_file"] = str(path)
        if account.password is None:
            continue
        if "\n" in account.password or "\r" in account.password:
            account.skip(f"{account.origin}: password", "it holds a line break, which a password_file cannot: "
                                                        "write it into the file yourself")
            continue
        try:
            secrets_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            try:
                os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT: make sure
                os.write(fd, account.password.encode("utf-8", "surrogateescape") + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise MigrationError(f"cannot write the password file {path}: {exc.strerror or exc}") from None
        written.append(path)
    return written


def _one_line(text: str) -> str:
    """A note as one comment line: a line break in a value quoted from the old config must not end the comment."""
    return "".join(char if char.isprintable() else
                   {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char) or f"\\u{ord(char):04x}" for char in text)


def render(result: ImportResult, source: str) -> str:
    """The postbote.yaml for ``result`` (after `write_secrets` has named the password files)."""
    lines = [f"# postbote.yaml imported from {source} by `postbote import`.",
             "# Read it through, then check it: postbote -c THIS_FILE check",
             "# Passwords are in the password_file each account names (mode 0600), never in this file."]
    for comment in result.comments:
        lines.append(f"# {_one_line(comment)}")
    notes = [str(note) for note in result.unmapped] + \
        [f"{note} (account {account.name})" for account in result.accounts for note in account.unmapped]
    if notes:
        lines.append("#")
        lines.append("# Not taken over (also printed on stderr):")
        lines += [f"#   - {_one_line(note)}" for note in notes]
    lines.append("")
    if result.defaults:
        lines.append("defaults:")
        for key, value in result.defaults.items():
            lines += _block(key, value, "  ")
        lines.append("")
    lines.append("accounts:" if result.accounts else "accounts: []")
    for account in result.accounts:
        lines += _account(account)
    return "\n".join(lines) + "\n"


def _account(account: Imported) -> list[str]:
    lines = ["", f"  # {account.name}: from {_one_line(account.origin)}"]
    lines += [f"  # {_one_line(comment)}" for comment in account.comments]
    lines += [f"  # not taken over: {_one_line(str(note))}" for note in account.unmapped]
    lines.append(f"  - name: {scalar(account.name)}")
    for key, value in account.keys.items():
        if value is None:
            continue
        lines += _block(key, value, "    ")
    return lines
