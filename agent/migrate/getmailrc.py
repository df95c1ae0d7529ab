"""getmail's rc files (INI, read with configparser) as postbote accounts: one account per file.

``[retriever]``: ``type`` (Simple/BrokenUIDL/Multidrop POP3, IMAP, with or without SSL), ``server``, ``port``,
``username``, ``password`` or ``password_command``, ``mailboxes``, ``move_on_delete``, ``ca_certs``,
``ssl_fingerprints``; ``[destination]``: ``type`` Maildir, Mboxrd, MDA_external (``path``, ``arguments``) or
MultiDestination; ``[options]``: ``delete``, ``delete_after``, ``read_all``, ``max_messages_per_session``,
``max_message_size``. getmail's defaults differ from postbote's: it keeps mail (``delete = false``) and re-reads
every message (``read_all = true``) unless told otherwise.
"""

from __future__ import annotations

import ast
import configparser
from pathlib import Path
from typing import Any

from postbote.migrate import Imported, ImportResult, MigrationError, account_name

_RETRIEVERS = {
    # type: (protocol, tls, multidrop)
    "SimplePOP3Retriever": ("pop3", "none", False),
    "BrokenUIDLPOP3Retriever": ("pop3", "none", False),
    "SimplePOP3SSLRetriever": ("pop3", "implicit", False),
    "BrokenUIDLPOP3SSLRetriever": ("pop3", "implicit", False),
    "MultidropPOP3Retriever": ("pop3", "none", True),
    "MultidropPOP3SSLRetriever": ("pop3", "implicit", True),
    "SimpleIMAPRetriever": ("imap", "none", False),
    "SimpleIMAPSSLRetriever": ("imap", "implicit", False),
    "MultidropIMAPRetriever": ("imap", "none", True),
    "MultidropIMAPSSLRetriever": ("imap", "implicit", True),
}
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_HANDLED_RETRIEVER = {"type", "server", "port", "username", "password", "password_command", "mailboxes",
                      "move_on_delete", "ca_certs", "ssl_fingerprints", "use_apop", "timeout"}
_HANDLED_OPTIONS = {"delete", "read_all", "max_messages_per_session", "max_message_size", "delete_after"}
_OPTION_REASONS = {
    "verbose": "postbote's log.level (or --log-level) says how much is logged",
    "message_log": "postbote logs one message.processed event per message (to stderr or the journal)",
    "message_log_syslog": "postbote logs to stderr: under systemd that is the journal",
    "message_log_verbose": "postbote logs one message.processed event per message",
    "delivered_to": "postbote does not add Delivered-To:",
    "received": "postbote adds its Received: trace field (the received plugin)",
    "max_bytes_per_session": "not supported: max_messages limits a poll by count",
    "delete_bigger_than": "not supported: messages over max_size stay on the server, reported once",
    "fingerprint": "run `openssl s_client ... | openssl x509 -noout -fingerprint -sha256` (docs/migration.md)",
    "to_oldmail_on_each_mail": "postbote records every message as soon as it is delivered",
}


def _flag(value: str | None, default: bool) -> bool:
    if value is None:
        return default
    text = value.strip().lower()
    return True if text in _TRUE else False if text in _FALSE else default


def _python_tuple(value: str, where: str) -> list[str]:
    """getmail writes lists as Python tuples (``("INBOX", "Sent")``); a bare string is one element."""
    try:
        parsed = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        parsed = value.strip()
    if isinstance(parsed, str):
        return [parsed]
    if isinstance(parsed, (tuple, list)) and all(isinstance(item, str) for item in parsed):
        return list(parsed)
    raise MigrationError(f"{where}: expected a tuple of quoted strings, found {value.strip()!r}")


def import_getmailrc(paths: list[Path], *, taken: set[str] | None = None) -> ImportResult:
    """One account per getmail rc file."""
    result = ImportResult()
    taken = taken if taken is not None else set()
    for path in paths:
        result.accounts.append(_import_one(path, taken))
    return result


def _line_of(text: str, section: str, key: str | None = None) -> int:
    """The line of ``[section]`` (or of ``key`` in it) in the file's text, for FILE:LINE notes (1 if not found)."""
    current, found = None, 1
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            current = stripped[1:-1].strip()
            if current == section and key is None:
                return number
        elif current == section and key is not None and stripped.split("=", 1)[0].split(":", 1)[0].strip() == key:
            return number
    return found


def _import_one(path: Path, taken: set[str]) -> Imported:
    try:
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        raise MigrationError(f"cannot read {path}: {exc.strerror or exc}") from None
    parser = configparser.RawConfigParser()  # getmail interpolates %(name)s only in a few places: keep them as read
    try:
        parser.read_string(text, source=str(path))
    except configparser.Error as exc:
        raise MigrationError(f"{path}: {exc}".replace("\n", " ")) from None
    if not parser.has_section("retriever"):
        raise MigrationError(f"{path}:1: no [retriever] section: not a getmail rc file")

    def where(section: str, key: str | None = None) -> str:
        return f"{path}:{_line_of(text, section, key)}"

    retriever = dict(parser.items("retriever"))
    kind = retriever.get("type", "").strip()
    server = retriever.get("server", "").strip()
    username = retriever.get("username", "").strip()
    if not server or not username:
        raise MigrationError(f"{where('retriever')}: [retriever] needs server and username")
    account = Imported(account_name(username, server, taken=taken), where("retriever"))
    keys = account.keys
    account.comments.append(f"from getmail's {path.name}")

    def skip(section: str, key: str, reason: str, shown: str | None = None) -> None:
        account.skip(f"{where(section, key)}: [{section}] {shown or key}", reason)

    protocol, tls, multidrop = _RETRIEVERS.get(kind, ("pop3", "implicit", False))
    if kind not in _RETRIEVERS:
        skip("retriever", "type", "not a retriever postbote can stand in for (POP3 and IMAP only): written as POP3 "
                                  "over TLS, check it", shown=f"type = {kind}")
    if protocol == "imap":
        keys["protocol"] = "imap"
    keys["host"] = server
    if tls == "none":
        keys["tls"] = "none"
        account.comments.append("getmail talked to this server without TLS; if it offers STARTTLS, use "
                                "tls: starttls (the password then never crosses the network in the clear)")
    default = {("pop3", "implicit"): "995", ("pop3", "none"): "110", ("imap", "implicit"): "993",
               ("imap", "none"): "143"}[(protocol, tls)]
    port_used = retriever.get("port", "").strip() or default
    if "port" in retriever:
        port = retriever["port"].strip()
        if port != default:
            keys["port"] = int(port) if port.isdigit() else port
    if "ca_certs" in retriever:
        keys["tls_ca_file"] = retriever["ca_certs"].strip()
    if "ssl_fingerprints" in retriever:
        pins = _python_tuple(retriever["ssl_fingerprints"], where("retriever", "ssl_fingerprints"))
        if pins:
            keys["tls_fingerprint"] = pins[0]  # getmail's are SHA-256 already
        if len(pins) > 1:
            skip("retriever", "ssl_fingerprints", "postbote pins one fingerprint: the first one was written")
    keys["username"] = username
    if _flag(retriever.get("use_apop"), False):
        keys["auth"] = "apop"
    if "password_command" in retriever:
        keys["password_command"] = _python_tuple(retriever["password_command"],
                                                 where("retriever", "password_command"))
    else:
        if "password" in retriever:
            account.password = retriever["password"]
        else:
            account.comments.append("getmail had no password in this file (it asked, or used a keyring): write it "
                                    "into the password_file named below (chmod 600)")
        keys["password_file"] = None  # filled in by the writer
    if "timeout" in retriever and retriever["timeout"].strip().isdigit():
        keys["timeout"] = int(retriever["timeout"])

    options = dict(parser.items("options")) if parser.has_section("options") else {}
    delete = _flag(options.get("delete"), False)
    read_all = _flag(options.get("read_all"), True)
    if not delete:
        keys["keep"] = True
        account.comments.append(f"keep: import getmail's oldmail file before the first poll, or every message "
                                f"still on the server is delivered again: postbote import-state {account.name} "
                                f"~/.getmail/oldmail-{server}-{port_used}-{username}"
                                f"{'-INBOX (one file per folder)' if protocol == 'imap' else ''}")
        if read_all:
            keys["fetch_all"] = True
            account.comments.append("getmail's read_all (its default) fetched every message on every run; "
                                    "fetch_all: false fetches only new ones")
    after = options.get("delete_after", "").strip()
    if after not in ("", "0") and not delete:
        if after.isdigit():
            keys["delete_after"] = f"{int(after)}d"  # getmail counts days
        else:
            skip("options", "delete_after", "not a number of days: set delete_after yourself (e.g. 7d)",
                 shown=f"delete_after = {after}")
    if options.get("max_messages_per_session", "").strip() not in ("", "0"):
        keys["max_messages"] = int(options["max_messages_per_session"])
    if options.get("max_message_size", "").strip() not in ("", "0"):
        keys["max_size"] = int(options["max_message_size"])
    for key, value in options.items():
        if key not in _HANDLED_OPTIONS and value.strip() not in ("", "0", "false", "False"):
            skip("options", key, _OPTION_REASONS.get(key, "not supported by postbote"), shown=f"{key} = {value}")

    if protocol == "imap":
        mailboxes = _python_tuple(retriever.get("mailboxes", '("INBOX",)'), where("retriever", "mailboxes"))
        if mailboxes == ["ALL"]:
            mailboxes = ["*"]
        if mailboxes != ["INBOX"]:
            keys["folders"] = mailboxes
        if "move_on_delete" in retriever and retriever["move_on_delete"].strip():
            keys["after_fetch"] = "move"
            keys["move_to"] = retriever["move_on_delete"].strip()
            keys.pop("keep", None)
            keys.pop("fetch_all", None)
            keys.pop("delete_after", None)
    for key, value in retriever.items():
        if key not in _HANDLED_RETRIEVER and value.strip():
            shown = f"{key} = (not shown)" if "pass" in key or "secret" in key or "token" in key else \
                f"{key} = {value}"
            skip("retriever", key, "not supported by postbote", shown=shown)
    if multidrop:
        skip("retriever", "type", "postbote delivers every message of an account to the same destination; routing "
                                  "by the envelope recipient header is not supported (the rules plugin's recipient "
                                  "match and reroute action can route by address; docs/plugins.md)",
             shown=f"type = {kind} (multidrop)")

    keys["deliver"] = _destination(parser, "destination", account, where, skip)
    for section in parser.sections():
        if section.startswith("filter"):
            skip(section, "type", "getmail filters do not carry over: use the rules or spamassassin plugin "
                                  "(docs/plugins.md)", shown=f"type = {parser.get(section, 'type', fallback='?')}")
    return account


def _destination(parser: configparser.RawConfigParser, section: str, account: Imported, where: Any,
                 skip: Any) -> Any:
    if not parser.has_section(section):
        raise MigrationError(f"{where('retriever')}: no [{section}] section")
    items = dict(parser.items(section))
    kind = items.get("type", "").strip()
    if kind == "Maildir":
        return {"maildir": items.get("path", "").strip().rstrip("/") or "Maildir"}
    if kind in ("Mboxrd", "Mboxo"):
        return {"mbox": items.get("path", "").strip()}
    if kind == "MDA_external":
        argv = [items.get("path", "").strip()]
        if "arguments" in items:
            argv += _python_tuple(items["arguments"], where(section, "arguments"))
        for placeholder in ("%(sender)", "%(recipient)", "%(local)", "%(domain)", "%(mailbox)"):
            if any(placeholder in arg for arg in argv):
                skip(section, "arguments", f"postbote fills in only {{account}} and {{uid}}; {placeholder} is "
                                           "passed as written: replace it", shown=placeholder)
        for key in ("unixfrom", "user", "group", "allow_root_commands", "ignore_stderr"):
            if key in items:
                skip(section, key, "not supported by postbote's mda destination", shown=f"{key} = {items[key]}")
        return {"mda": argv}
    if kind == "MultiDestination":
        names = _python_tuple(items.get("destinations", "()"), where(section, "destinations"))
        targets = []
        for name in names:
            if name.startswith("[") and name.endswith("]"):
                targets.append(_destination(parser, name[1:-1], account, where, skip))
            elif name.endswith("/"):
                targets.append({"maildir": name.rstrip("/")})
            else:
                targets.append({"mbox": name})
        return targets
    skip(section, "type", "not a destination postbote can stand in for: written as a Maildir ./Maildir, change it",
         shown=f"type = {kind}")
    return {"maildir": "Maildir"}
