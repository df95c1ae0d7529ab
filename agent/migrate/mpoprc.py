"""mpop's ``~/.mpoprc`` (or ``~/.config/mpop/config``) as postbote accounts: one per ``account`` section.

The format: one command per line (``COMMAND [ARGUMENT]``, ``#`` comments, an argument in double quotes may hold
spaces and ``\\"``); ``defaults`` starts the settings every later account starts from; ``account NAME [: OTHER,
...]`` starts an account, copying the named ones first; ``account default : NAME`` names the default (nothing to
import). Commands mapped: ``host``, ``port``, ``tls``, ``tls_starttls``, ``tls_trust_file``, ``tls_fingerprint``,
``tls_certcheck``, ``user``, ``password``, ``passwordeval``, ``auth``, ``delivery`` (``maildir``, ``mbox``, ``mda``),
``keep``, ``only_new``, ``skipsize``, ``timeout``, ``uidls_file``; the rest are listed with their reasons.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from postbote.migrate import (
    Imported,
    ImportResult,
    MigrationError,
    account_name,
    fingerprint_kind,
    repin_comments,
    without_sender,
)

_ON = {"on", ""}
_REASONS = {
    "killsize": "postbote never deletes a message it did not deliver; messages over max_size stay, reported once",
    "filter": "no filter command; the rules plugin filters by headers and size (docs/plugins.md)",
    "received_header": "postbote adds its own Received: trace field (the received plugin)",
    "pipelining": "postbote pipelines POP3 commands whenever the server offers PIPELINING",
    "proxy_host": "no SOCKS proxy support",
    "proxy_port": "no SOCKS proxy support",
    "socket": "no local socket sources",
    "source_ip": "no choice of the source address",
    "tls_key_file": "TLS client certificates are not supported yet",
    "tls_cert_file": "TLS client certificates are not supported yet",
    "tls_crl_file": "no certificate revocation lists",
    "tls_priorities": "postbote uses the system's TLS settings (TLS 1.2 or later)",
    "tls_min_dh_prime_bits": "postbote uses the system's TLS settings",
    "tls_host_override": "postbote checks the certificate against host; pin an odd certificate with tls_fingerprint",
    "ntlmdomain": "NTLM is not supported",
}


def _lines(text: str, filename: str) -> list[tuple[int, str, str]]:
    """(line, command, argument) per non-empty line; the argument unquoted."""
    found = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        command, _, rest = line.partition(" ")
        rest = rest.strip()
        if rest.startswith('"'):
            match = re.fullmatch(r'"((?:[^"\\]|\\.)*)"\s*(#.*)?', rest)
            if not match:
                raise MigrationError(f"{filename}:{number}: unterminated quoted argument")
            rest = re.sub(r"\\(.)", r"\1", match.group(1))
        found.append((number, command.strip(), rest))
    return found


def import_mpoprc(path: Path, *, taken: set[str] | None = None) -> ImportResult:
    try:
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        raise MigrationError(f"cannot read {path}: {exc.strerror or exc}") from None
    taken = taken if taken is not None else set()
    defaults: dict[str, tuple[int, str]] = {}
    accounts: dict[str, tuple[int, dict[str, tuple[int, str]]]] = {}
    current: dict[str, tuple[int, str]] | None = None
    for number, command, argument in _lines(text, str(path)):
        if command == "defaults":
            current = defaults
        elif command == "account":
            name, _, inherits = argument.partition(":")
            name = name.strip()
            if not name:
                raise MigrationError(f"{path}:{number}: 'account' needs a name")
            settings = dict(defaults)
            for other in (item.strip() for item in inherits.split(",") if item.strip()):
                if other not in accounts:
                    raise MigrationError(f"{path}:{number}: account {name!r} copies {other!r}, which is not "
                                         "defined above")
                settings.update(accounts[other][1])
            current = settings
            if name != "default":
                accounts[name] = (number, settings)
        elif current is None:
            raise MigrationError(f"{path}:{number}: {command!r} before any 'defaults' or 'account'")
        else:
            current[command] = (number, argument)
    result = ImportResult()
    for name, (line, settings) in accounts.items():
        result.accounts.append(_account(name, line, settings, path, taken))
    return result


def _account(name: str, line: int, settings: dict[str, tuple[int, str]], path: Path, taken: set[str]) -> Imported:
    account = Imported(account_name(name, taken=taken), f"{path}:{line}")
    keys = account.keys
    account.comments.append(f"from mpop's account {name!r}")

    def value(key: str, default: str = "") -> str:
        return settings.get(key, (0, default))[1]

    def skip(key: str, reason: str) -> None:
        number, argument = settings[key]
        shown = f"{key} (not shown)" if "password" in key else f"{key} {argument}".strip()
        account.skip(f"{path}:{number}: {shown}", reason)

    host = value("host")
    if not host:
        raise MigrationError(f"{path}:{line}: account {name!r} has no host")
    keys["host"] = host
    tls_on = value("tls", "on").lower() in _ON
    starttls = value("tls_starttls", "on").lower() in _ON
    tls = "none" if not tls_on else "starttls" if starttls else "implicit"
    if "tls" not in settings:
        account.comments.append("mpop's tls was not set (on since mpop 1.4): written as STARTTLS")
    if tls != "implicit":
        keys["tls"] = tls
    port = value("port")
    if port and port != {"none": "110", "starttls": "110", "implicit": "995"}[tls]:
        keys["port"] = int(port) if port.isdigit() else port
    if value("tls_trust_file") and value("tls_trust_file") != "system":
        keys["tls_ca_file"] = value("tls_trust_file")
    if "tls_certcheck" in settings and value("tls_certcheck").lower() == "off":
        skip("tls_certcheck", "postbote always verifies the certificate; pin a self-signed one with tls_fingerprint")
    if "tls_fingerprint" in settings:
        pin = value("tls_fingerprint")
        kind = fingerprint_kind(pin)
        if kind == "sha256":
            keys["tls_fingerprint"] = pin
        else:
            account.comments.extend(repin_comments(pin, kind, host, int(port) if port.isdigit() else
                                                   (995 if tls == "implicit" else 110),
                                                   "pop3" if tls == "starttls" else None))
            keys["# tls_fingerprint"] = "SHA-256 FINGERPRINT HERE"
            skip("tls_fingerprint", f"an {kind.upper()} fingerprint: re-pin by SHA-256 (see the comment above)")
    user = value("user")
    if not user:
        raise MigrationError(f"{path}:{line}: account {name!r} has no user")
    keys["username"] = user
    auth = value("auth", "on").lower()
    mapped_auth = {"on": None, "": None, "user": "user", "apop": "apop", "plain": "plain", "cram-md5": "cram-md5",
                   "scram-sha-1": "scram-sha-1", "scram-sha-256": "scram-sha-256", "xoauth2": "xoauth2",
                   "oauthbearer": "oauthbearer", "login": "login"}
    if auth in mapped_auth:
        if mapped_auth[auth]:
            keys["auth"] = mapped_auth[auth]
    else:
        skip("auth", "not supported by postbote: auth: auto written")
    if "passwordeval" in settings and settings["passwordeval"][0] > settings.get("password", (0, ""))[0]:
        keys["password_command"] = ["/bin/sh", "-c", value("passwordeval")]
    else:
        if "password" in settings:
            account.password = value("password")
        else:
            account.comments.append("mpop had no password for this account (it asked, or used a keyring or "
                                    "~/.netrc): write it into the password_file named below (chmod 600)")
        keys["password_file"] = None
    if "timeout" in settings and value("timeout").isdigit():
        keys["timeout"] = int(value("timeout"))
    if value("keep", "off").lower() in _ON:
        keys["keep"] = True
        uidls = value("uidls_file", "~/.mpop_uidls")
        account.comments.append(f"keep: import mpop's UID list before the first poll, or every message still on the "
                                f"server is delivered again: postbote import-state {account.name} {uidls}")
    if value("only_new", "on").lower() not in _ON:
        keys["fetch_all"] = True
    if value("skipsize") and value("skipsize") != "0":
        keys["max_size"] = _size(value("skipsize"))
    keys["deliver"] = _delivery(value("delivery"), account, skip)
    for key in settings:
        if key in _REASONS:
            skip(key, _REASONS[key])
    return account


def _size(text: str) -> Any:
    """mpop sizes: a number with an optional k or m (1024-based)."""
    match = re.fullmatch(r"(\d+)\s*([kKmM]?)", text)
    if not match:
        return text
    number, unit = int(match.group(1)), match.group(2).lower()
    return number * {"": 1, "k": 1024, "m": 1024 * 1024}[unit]


def _delivery(text: str, account: Imported, skip: Any) -> Any:
    method, _, target = text.partition(" ")
    target = target.strip()
    if (quoted := re.fullmatch(r'"((?:[^"\\]|\\.)*)"', target)) is not None:
        target = re.sub(r"\\(.)", r"\1", quoted.group(1))
    if method == "maildir" and target:
        return {"maildir": target}
    if method == "mbox" and target:
        return {"mbox": target}
    if method == "mda" and target:
        if "%F" in target:
            skip("delivery", "postbote's MDA gets no sender argument (%F); the message's Return-Path: holds it")
            target = without_sender(target)
        return {"mda": _argv(target.strip())}
    if text:
        skip("delivery", "not a delivery postbote can stand in for: written as a Maildir ./Maildir, change it")
    else:
        account.comments.append("mpop had no delivery for this account: written as a Maildir ./Maildir, change it")
    return {"maildir": "Maildir"}


def _argv(command: str) -> list[str]:
    """mpop runs an MDA through the shell: a plain command is split into words, one that needs the shell stays
    ``[/bin/sh, -c, COMMAND]``."""
    import shlex

    if not any(char in command for char in "|&;<>()$`\\*?[]#~{}\n"):
        try:
            return shlex.split(command)
        except ValueError:
            pass
    return ["/bin/sh", "-c", command]
