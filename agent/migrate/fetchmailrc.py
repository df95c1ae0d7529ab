"""A ``.fetchmailrc`` read into postbote accounts: a small tokenizer and parser of fetchmail's run-control grammar.

The grammar, as fetchmail's own lexer and parser define it: ``#`` comments to the end of a line; a backslash before
a newline joins lines; strings in double or single quotes (a quote inside escaped with a backslash; C escapes
``\\n \\t \\\\ \\x41 \\101`` processed, as in bare words); ``;`` ``:`` ``,`` and the words ``with and has wants
options`` are noise; keywords are recognised only unquoted and in their exact spelling (``user``/``username``,
``pass``/``password``, ``proto``/``protocol``, ``smtp``/``smtphost``, ``folder``/``folders``, ``nokeep`` = ``no
keep``, …); the word after ``user``, ``pass``, ``is``, ``to`` and ``=`` is always a name, even when it looks like a
keyword, and the word after ``auth`` an authentication type (``password`` included).

Statements: ``set …`` (globals: ``daemon``, ``logfile``, ``idfile``, ``postmaster``, …), ``defaults`` (options every
later entry starts from), ``poll NAME …`` and ``skip NAME …`` (``server`` is ``poll``). An entry has server options
(``via``, ``proto``, ``port``/``service``, ``auth``, ``timeout``, ``interval``, ``localdomains``, ``envelope``, ``aka``,
…) and one or more user descriptions: ``user REMOTE [there] [is|to] LOCAL… [here]`` with user options (``password``,
``ssl``, ``sslproto``, ``sslcertck``, ``sslfingerprint``, ``keep``, ``fetchall``, ``limit``, ``fetchlimit``,
``folder``, ``mda``, ``smtphost``, ``smtpname``, …). Each user becomes one postbote account.
"""

from __future__ import annotations

import getpass
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from postbote.migrate import (
    Imported,
    ImportResult,
    MigrationError,
    Unmapped,
    account_name,
    fingerprint_kind,
    repin_comments,
    without_sender,
)

# --- the tokenizer ------------------------------------------------------------------------------------------

WORD, STRING, NUMBER, WILD, MAP = "keyword", "string", "number", "wildcard", "="

# Every keyword, by each of its spellings.
_SPELLINGS = {
    "set": "set", "logfile": "logfile", "idfile": "idfile", "pidfile": "pidfile", "daemon": "daemon",
    "syslog": "syslog", "invisible": "invisible", "showdots": "showdots", "postmaster": "postmaster",
    "bouncemail": "bouncemail", "spambounce": "spambounce", "softbounce": "softbounce", "warnings": "warnings",
    "tracepolls": "tracepolls", "defaults": "defaults", "server": "poll", "poll": "poll", "skip": "skip",
    "via": "via", "aka": "aka", "local": "localdomains", "localdomains": "localdomains", "proto": "protocol",
    "protocol": "protocol", "service": "port", "port": "port", "interval": "interval", "auth": "auth",
    "authenticate": "auth", "preauth": "auth", "preauthenticate": "auth", "timeout": "timeout",
    "envelope": "envelope", "qvirtual": "qvirtual", "principal": "principal", "esmtpname": "esmtpname",
    "esmtppassword": "esmtppassword", "user": "user", "username": "user", "pass": "password",
    "password": "password", "folder": "folder", "folders": "folder", "smtp": "smtphost", "smtphost": "smtphost",
    "fetchdomains": "fetchdomains", "smtpaddress": "smtpaddress", "smtpname": "smtpname", "antispam": "antispam",
    "mda": "mda", "bsmtp": "bsmtp", "lmtp": "lmtp", "pre": "preconnect", "preconnect": "preconnect",
    "post": "postconnect", "postconnect": "postconnect", "interface": "interface", "monitor": "monitor",
    "plugin": "plugin", "plugout": "plugout", "batchlimit": "batchlimit", "fetchlimit": "fetchlimit",
    "fetchsizelimit": "fetchsizelimit", "fastuidl": "fastuidl", "expunge": "expunge", "properties": "properties",
    "is": "is", "here": "here", "there": "there", "to": "to", "no": "no", "keep": "keep", "flush": "flush",
    "limitflush": "limitflush", "fetchall": "fetchall", "rewrite": "rewrite", "forcecr": "forcecr",
    "stripcr": "stripcr", "pass8": "pass8bits", "pass8bits": "pass8bits", "dropstatus": "dropstatus",
    "dropdelivered": "dropdelivered", "mimedec": "mimedecode", "mimedecode": "mimedecode", "idle": "idle",
    "dns": "dns", "uidl": "uidl", "ssl": "ssl", "sslkey": "sslkey", "sslcert": "sslcert", "sslproto": "sslproto",
    "sslcertck": "sslcertck", "sslcertpath": "sslcertpath", "sslcertfile": "sslcertfile",
    "sslcommonname": "sslcommonname", "sslfingerprint": "sslfingerprint", "checkalias": "checkalias",
    "limit": "limit", "bad-header": "bad-header",
}
_NOISE = {"with", "and", "has", "wants", "options"}
_NEGATABLE = {"bouncemail", "uidl", "checkalias", "dns", "envelope", "keep", "flush", "limitflush", "fetchall",
              "rewrite", "forcecr", "stripcr", "pass8", "pass8bits", "dropstatus", "dropdelivered", "mimedec",
              "mimedecode", "spambounce", "idle", "sslcertck", "softbounce", "syslog"}
_NAME_NEXT = {"user", "password", "is", "to"}  # the next word is a name, whatever it looks like
_SEPARATORS = " \t\r\n=;:,"


@dataclass(frozen=True)
class Token:
    kind: str  # WORD (a keyword, canonical), STRING, NUMBER, WILD, MAP
    value: str
    line: int


def tokenize(text: str, filename: str) -> Iterator[Token]:
    """The tokens of an rc file, noise dropped; `MigrationError` (``FILE:LINE``) on an unterminated string."""
    i, line, name_next, auth_next = 0, 1, False, False
    while i < len(text):
        char = text[i]
        if char == "\n":
            line += 1
            i += 1
        elif char in " \t\r;:,":
            i += 1
        elif char == "\\" and text[i + 1:i + 2] == "\n":
            line += 1
            i += 2
        elif char == "#":
            end = text.find("\n", i)
            i = len(text) if end < 0 else end
        elif char == "=":
            yield Token(MAP, "=", line)
            name_next = True
            i += 1
        elif char in "\"'":
            end = i + 1
            while end < len(text) and text[end] != char:
                end += 2 if text[end] == "\\" else 1  # an escaped quote does not end the string
            if end >= len(text):
                raise MigrationError(f"{filename}:{line}: unterminated quoted string (no closing {char})")
            raw = text[i + 1:end]
            yield Token(STRING, unescape(raw), line)
            line += raw.count("\n")
            name_next = False
            i = end + 1
        else:
            start = i
            while i < len(text) and text[i] not in _SEPARATORS:
                i += 1
            word = text[start:i]
            if name_next:
                yield Token(WILD if word == "*" else STRING, unescape(word), line)
                name_next = False
            elif auth_next:  # an authentication type: ``password`` is one here, not the keyword
                yield Token(STRING, word, line)
                auth_next = False
            elif word == "*":
                yield Token(WILD, word, line)
            elif word in _NOISE:
                continue
            elif word in _SPELLINGS:
                keyword = _SPELLINGS[word]
                yield Token(WORD, keyword, line)
                name_next = keyword in _NAME_NEXT
                auth_next = keyword == "auth"
            elif word.startswith("no") and word[2:] in _NEGATABLE:
                yield Token(WORD, "no", line)
                yield Token(WORD, _SPELLINGS[word[2:]], line)
            elif word.lstrip("-").isdigit() and word.count("-") <= 1 and not word.endswith("-"):
                yield Token(NUMBER, word, line)
            else:
                yield Token(STRING, unescape(word), line)


def unescape(text: str) -> str:
    """fetchmail's escapes: ``\\n \\t \\b \\r \\\\``, ``\\xHH``, ``\\0OOO`` (octal), ``\\DDD`` (decimal), a backslash
    before a newline joins lines, any other escaped character stands for itself."""
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char != "\\" or i + 1 >= len(text):
            out.append(char if char != "\\" else "")
            i += 1
            continue
        nxt = text[i + 1]
        if nxt in "xX":
            j = i + 2
            while j < len(text) and j < i + 4 and text[j] in "0123456789abcdefABCDEF":
                j += 1
            out.append(chr(int(text[i + 2:j] or "0", 16)))
            i = j
        elif nxt == "0":
            j = i + 1
            while j < len(text) and j < i + 4 and text[j] in "01234567":
                j += 1
            out.append(chr(int(text[i + 1:j], 8)))
            i = j
        elif nxt.isdigit():
            j = i + 1
            while j < len(text) and j < i + 4 and text[j].isdigit():
                j += 1
            out.append(chr(int(text[i + 1:j]) % 256))
            i = j
        else:
            out.append({"n": "\n", "t": "\t", "b": "\b", "r": "\r", "\n": ""}.get(nxt, nxt))
            i += 2
    return "".join(out)


# --- the parser ---------------------------------------------------------------------------------------------

# Options by the shape of their argument.
_SERVER_ONE = {"via", "protocol", "port", "auth", "timeout", "qvirtual", "principal", "esmtpname", "esmtppassword",
               "interval", "interface", "monitor", "plugin", "plugout", "bad-header"}
_SERVER_LIST = {"aka", "localdomains"}
_SERVER_FLAGS = {"uidl", "dns", "checkalias", "tracepolls"}
_USER_ONE = {"password", "smtpaddress", "smtpname", "mda", "bsmtp", "preconnect", "postconnect", "sslkey", "sslcert",
             "sslproto", "sslcertpath", "sslcertfile", "sslcommonname", "sslfingerprint", "limit", "warnings",
             "batchlimit", "fetchlimit", "fetchsizelimit", "fastuidl", "expunge", "properties"}
_USER_LIST = {"folder", "smtphost", "fetchdomains", "antispam"}
_USER_FLAGS = {"keep", "flush", "limitflush", "fetchall", "rewrite", "forcecr", "stripcr", "pass8bits", "dropstatus",
               "dropdelivered", "mimedecode", "idle", "ssl", "sslcertck", "lmtp", "spambounce"}
_NUMERIC = {"timeout", "interval", "limit", "warnings", "batchlimit", "fetchlimit", "fetchsizelimit", "fastuidl",
            "expunge"}
_STARTS = {"poll", "skip", "defaults", "set"}


@dataclass
class Option:
    value: Any  # a string, an int, True/False for a flag, a list for a list option
    line: int


@dataclass
class User:
    line: int
    remote: str | None = None
    locals: list[str] = field(default_factory=list)
    mapped: list[tuple[str, str]] = field(default_factory=list)  # ``is "remote" = "local"``
    wildcard: bool = False  # ``to * here``
    options: dict[str, Option] = field(default_factory=dict)


@dataclass
class Entry:
    kind: str  # poll, skip, defaults
    name: str
    line: int
    options: dict[str, Option] = field(default_factory=dict)
    users: list[User] = field(default_factory=list)


@dataclass
class RcFile:
    entries: list[Entry]
    globals: dict[str, Option]


class _Parser:
    def __init__(self, text: str, filename: str) -> None:
        self.tokens = list(tokenize(text, filename))
        self.filename = filename
        self.at = 0

    def error(self, line: int, message: str) -> MigrationError:
        return MigrationError(f"{self.filename}:{line}: {message}")

    def peek(self) -> Token | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def take(self) -> Token:
        token = self.tokens[self.at]
        self.at += 1
        return token

    def parse(self) -> RcFile:
        entries: list[Entry] = []
        globals_: dict[str, Option] = {}
        while (token := self.peek()) is not None:
            self.take()
            if token.kind != WORD or token.value not in _STARTS:
                raise self.error(token.line, f"expected 'poll', 'skip', 'defaults' or 'set', found "
                                             f"{token.value!r}")
            if token.value == "set":
                self.set_statement(token, globals_)
            elif token.value == "defaults":
                entries.append(self.entry(Entry("defaults", "", token.line)))
            else:
                name = self.peek()
                if name is None or name.kind not in (STRING, NUMBER):
                    raise self.error(token.line, f"'{token.value}' needs a server name")
                self.take()
                entries.append(self.entry(Entry(token.value, name.value, token.line)))
        return RcFile(entries, globals_)

    def set_statement(self, start: Token, globals_: dict[str, Option]) -> None:
        token = self.peek()
        if token is None or token.kind != WORD:
            raise self.error(start.line, "'set' needs a keyword (daemon, logfile, idfile, postmaster, …)")
        self.take()
        negated = token.value == "no"
        if negated:
            token = self.take() if self.peek() is not None else token
        if token.value in ("daemon", "logfile", "idfile", "pidfile", "postmaster", "properties"):
            if (nxt := self.peek()) is not None and nxt.kind == MAP:
                self.take()
            value = self.argument(token)
            if token.value == "daemon" and not value.isdigit():
                raise self.error(token.line, f"'set daemon' needs a number of seconds, found {value!r}")
            globals_[token.value] = Option(int(value) if token.value == "daemon" else value, token.line)
        else:
            globals_[token.value] = Option(not negated, token.line)

    def argument(self, keyword: Token, numeric: bool = False) -> str:
        token = self.peek()
        if token is None or token.kind not in (STRING, NUMBER):
            found = f", found {token.value!r}" if token is not None else " at the end of the file"
            raise self.error(keyword.line, f"'{keyword.value}' needs a value{found}")
        self.take()
        if numeric and token.kind != NUMBER:
            raise self.error(token.line, f"'{keyword.value}' needs a number, found {token.value!r}")
        return token.value

    def values(self) -> list[str]:
        found: list[str] = []
        while (token := self.peek()) is not None and token.kind in (STRING, NUMBER):
            found.append(self.take().value)
        return found

    def entry(self, entry: Entry) -> Entry:
        """Server options, then the users. fetchmail wants user options after ``user NAME`` (those before the first
        ``user`` describe its implicit user); options written before the first ``user`` are taken here as applying
        to every user of the entry, which is what their author meant."""
        user: User | None = None
        leading = User(entry.line)  # user options before any ``user``
        while (token := self.peek()) is not None and not (token.kind == WORD and token.value in _STARTS):
            self.take()
            if token.kind != WORD:
                raise self.error(token.line, f"unexpected {token.value!r}: not a fetchmail keyword (a misspelt "
                                             "keyword? quote it if it is a name)")
            keyword, value = token.value, True
            if keyword == "no":
                nxt = self.peek()
                if nxt is None or nxt.kind != WORD:
                    raise self.error(token.line, "'no' needs a keyword after it")
                keyword, value = self.take().value, False
                if keyword == "envelope":
                    entry.options["envelope"] = Option(False, token.line)
                    continue
            if keyword == "user":
                user = User(token.line, remote=self.argument(token))
                nxt = self.peek()
                where = self.take().value if nxt is not None and nxt.kind == WORD and nxt.value in ("here",
                                                                                                  "there") else ""
                if where == "here":  # ``user NAME here [is REMOTE there]``: a local name
                    user.locals.append(user.remote or "")
                    user.remote = None
                entry.users.append(user)
            elif keyword in ("is", "to"):
                self.local_names(user or leading, token)
            elif keyword in ("here", "there"):
                continue  # after a name list: where those names live (already read)
            elif keyword in _SERVER_FLAGS and value is not None:
                entry.options[keyword] = Option(value, token.line)
            elif keyword in _SERVER_ONE:
                entry.options[keyword] = Option(self.server_argument(keyword, token), token.line)
            elif keyword in _SERVER_LIST:
                entry.options[keyword] = Option(self.values(), token.line)
            elif keyword == "envelope":
                first = self.argument(token)
                header = self.argument(token) if first.isdigit() else first
                entry.options["envelope"] = Option(header, token.line)
            elif keyword in _USER_FLAGS:
                (user or leading).options[keyword] = Option(value, token.line)
            elif keyword in _USER_ONE:
                text = self.argument(token, numeric=keyword in _NUMERIC)
                (user or leading).options[keyword] = Option(int(text) if keyword in _NUMERIC else text, token.line)
            elif keyword in _USER_LIST:
                found = self.values()
                if not found:
                    raise self.error(token.line, f"'{keyword}' needs at least one value")
                (user or leading).options[keyword] = Option(found, token.line)
            else:
                raise self.error(token.line, f"'{keyword}' does not belong in a server entry")
        if not entry.users and (leading.options or leading.locals or leading.mapped or leading.wildcard):
            entry.users.append(leading)  # fetchmail's implicit user
        elif entry.users:
            for each in entry.users:
                each.options = {**leading.options, **each.options}
        return entry

    def server_argument(self, keyword: str, token: Token) -> Any:
        if keyword == "auth":
            nxt = self.peek()
            if nxt is None:
                raise self.error(token.line, "'auth' needs a value")
            return self.take().value  # ``password`` is a keyword elsewhere, an auth type here
        text = self.argument(token, numeric=keyword in _NUMERIC)
        return int(text) if keyword in _NUMERIC else text

    def local_names(self, user: User, token: Token) -> None:
        found: list[str] = []
        while (nxt := self.peek()) is not None and nxt.kind in (STRING, NUMBER, WILD):
            self.take()
            if nxt.kind == WILD:
                user.wildcard = True
                found.append("*")
            elif (after := self.peek()) is not None and after.kind == MAP:
                self.take()
                local = self.argument(Token(WORD, "=", after.line))
                user.mapped.append((nxt.value, local))
                found.append("=")
            else:
                user.locals.append(nxt.value)
                found.append(nxt.value)
        if not found:
            raise self.error(token.line, f"'{token.value}' needs a local name (or *)")
        nxt = self.peek()
        if nxt is not None and nxt.kind == WORD and nxt.value == "there" and len(found) == 1 \
                and found[0] not in ("*", "="):  # ``is NAME there``: the remote name
            user.remote = user.locals.pop()


def parse(text: str, filename: str = "fetchmailrc") -> RcFile:
    """The entries and globals of an rc file; `MigrationError` with ``FILE:LINE`` on a syntax error."""
    return _Parser(text, filename).parse()


# --- the mapping to postbote keys ---------------------------------------------------------------------------

_WELL_KNOWN_PORTS = {"pop3": 110, "pop3s": 995, "imap": 143, "imap2": 143, "imaps": 993}
_SAME_AS_POSTBOTE = {
    ("uidl", True), ("sslcertck", True), ("forcecr", True), ("forcecr", False), ("rewrite", False),
    ("mimedecode", False), ("stripcr", False), ("dropstatus", False), ("dropdelivered", False), ("keep", False),
    ("fetchall", False), ("flush", False), ("limitflush", False), ("pass8bits", True), ("pass8bits", False),
    ("idle", True), ("dns", False), ("checkalias", False), ("spambounce", False), ("tracepolls", False),
}
_REASONS = {
    "flush": "postbote deletes only messages it delivered (or recorded as delivered); delete old mail on the server "
             "once by hand",
    "limitflush": "postbote never deletes a message it did not deliver; oversized messages stay on the server, "
                  "reported once",
    "rewrite": "postbote never rewrites addresses in headers",
    "stripcr": "postbote hands messages over with the line endings each destination expects",
    "mimedecode": "postbote never re-encodes message bodies",
    "dropstatus": "no built-in way to drop Status: headers; a small filter plugin can (docs/plugins.md)",
    "dropdelivered": "no built-in way to drop Delivered-To: headers; a small filter plugin can (docs/plugins.md)",
    "bsmtp": "postbote does not write BSMTP files; deliver to a Maildir, an mbox or an MDA instead",
    "preconnect": "run the command before postbote (e.g. ExecStartPre= in the systemd unit)",
    "postconnect": "run the command after postbote (e.g. ExecStopPost= in the systemd unit)",
    "sslkey": "TLS client certificates are not supported yet",
    "sslcert": "TLS client certificates are not supported yet",
    "sslcommonname": "postbote checks the certificate against the host name; pin an odd certificate with "
                     "tls_fingerprint instead",
    "sslcertpath": "postbote takes one CA file (tls_ca_file), not a hashed directory: concatenate the CA "
                   "certificates you need into one file and name it in tls_ca_file",
    "warnings": "an oversized message is reported once per message, not every N seconds",
    "batchlimit": "postbote keeps one SMTP session per poll and needs no batch limit",
    "fetchsizelimit": "postbote lists sizes once per poll; nothing to tune",
    "fastuidl": "postbote always reads the whole UIDL listing (its state needs it)",
    "expunge": "POP3 applies deletions at QUIT and IMAP expunges exactly the delivered messages at the end of a "
               "poll; there is no interval to set",
    "properties": "only meaningful to fetchmail's extensions",
    "antispam": "postbote never treats an MTA refusal as spam to delete; a refused message stays on the server, "
                "marked rejected (see `postbote status`, `postbote retry`)",
    "fetchdomains": "multidrop ETRN/ODMR domains are not supported",
    "smtpaddress": "postbote does not qualify addresses; give full addresses in recipients",
    "spambounce": "postbote never sends bounces",
    "idle": "IMAP IDLE is postbote's default for `postbote run` (idle: true)",
    "interface": "no interface check; start postbote only when the link is up (a systemd dependency)",
    "monitor": "no interface check; start postbote only when the link is up (a systemd dependency)",
    "plugin": "no tunnelling command: use an SSH tunnel or stunnel, and point host/port at it",
    "plugout": "no tunnelling command for the MTA side: use an SSH tunnel or stunnel",
    "principal": "Kerberos is not supported",
    "esmtpname": "SMTP AUTH towards the MTA is not supported yet: let the MTA accept local submissions",
    "esmtppassword": "SMTP AUTH towards the MTA is not supported yet: let the MTA accept local submissions",
    "tracepolls": "postbote adds its own Received: trace field (the received plugin)",
    "bad-header": "postbote delivers messages with malformed headers as they are",
    "dns": "multidrop address checks are not supported",
    "checkalias": "multidrop address checks are not supported",
    "aka": "multidrop routing is not supported (see 'multidrop')",
    "localdomains": "multidrop routing is not supported (see 'multidrop')",
    "envelope": "multidrop routing is not supported (see 'multidrop')",
    "qvirtual": "multidrop routing is not supported (see 'multidrop')",
    "via": "",
}
_SHELL_CHARS = set("|&;<>()$`\\*?[]#~{}\n")


def import_fetchmailrc(path: Path, *, include_skipped: bool = False, local_user: str | None = None,
                       netrc: Path | None = None) -> ImportResult:
    """The accounts of the rc file at ``path`` as postbote keys (one per user of each ``poll`` entry). A password
    the rc file does not hold is looked up in ``netrc`` (fetchmail reads ``~/.netrc`` the same way)."""
    try:
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        raise MigrationError(f"cannot read {path}: {exc.strerror or exc}") from None
    result = map_rcfile(parse(text, str(path)), str(path), include_skipped=include_skipped,
                        local_user=local_user or _login_name())
    if netrc is not None:
        _passwords_from_netrc(result, netrc)
    return result


def _passwords_from_netrc(result: ImportResult, path: Path) -> None:
    import netrc as netrc_module

    missing = [account for account in result.accounts if account.password is None and "password_file" in account.keys]
    if not missing:
        return
    try:
        entries = netrc_module.netrc(str(path))
    except (OSError, netrc_module.NetrcParseError) as exc:
        result.unmapped.append(Unmapped(str(path), f"cannot read it for the passwords the rc file lacks: {exc}"))
        return
    for account in missing:
        found = entries.authenticators(str(account.keys.get("host", "")))
        if found is not None and found[0] == account.keys.get("username") and found[2]:
            account.password = found[2]
            account.comments = [comment for comment in account.comments if "had no password" not in comment]
            account.comments.append(f"the password came from {path} (machine {account.keys['host']})")


def _login_name() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "postmaster"


def map_rcfile(rc: RcFile, filename: str, *, include_skipped: bool = False,
               local_user: str = "postmaster") -> ImportResult:
    result = ImportResult()
    daemon = rc.globals.get("daemon")
    if daemon is not None and isinstance(daemon.value, int) and daemon.value > 0:
        result.defaults["poll_interval"] = daemon.value
    for key, option in rc.globals.items():
        where = f"{filename}:{option.line}: set {key}"
        if key == "daemon":
            continue
        if key == "idfile":
            result.comments.append(f"fetchmail kept its UIDs in {option.value} (set idfile): import them with "
                                   f"`postbote import-state ACCOUNT {option.value}`")
        elif key == "logfile":
            result.unmapped.append(Unmapped(where, "postbote logs to stderr (the journal under systemd); "
                                                   "log.format: json for files"))
        elif key == "postmaster":
            result.unmapped.append(Unmapped(where, "postbote never bounces or redirects refused mail: it stays on "
                                                   "the server, marked rejected, for `postbote retry`"))
        elif key in ("syslog", "invisible", "showdots", "bouncemail", "softbounce", "spambounce", "pidfile",
                     "properties"):
            result.unmapped.append(Unmapped(where, _GLOBAL_REASONS.get(key, "not needed by postbote")))
        else:
            result.unmapped.append(Unmapped(where, "unknown global setting"))
    defaults: Entry | None = None
    taken: set[str] = set()
    for entry in rc.entries:
        if entry.kind == "defaults":
            defaults = entry
            continue
        if entry.kind == "skip" and not include_skipped:
            result.unmapped.append(Unmapped(f"{filename}:{entry.line}: skip {entry.name}",
                                            "not imported: fetchmail polls a skip entry only when named on its "
                                            "command line, postbote polls every account (use --include-skipped "
                                            "to import it anyway)"))
            continue
        users = entry.users or [User(entry.line)]
        for user in users:
            result.accounts.append(_map_user(entry, user, defaults, filename, taken, local_user,
                                             daemon.value if daemon else None))
    return result


_GLOBAL_REASONS = {
    "syslog": "postbote logs to stderr: under systemd that is the journal (journalctl -u postbote)",
    "invisible": "postbote always adds its Received: trace field (the received plugin)",
    "showdots": "postbote shows progress on a terminal by itself",
    "bouncemail": "postbote never sends bounces: refused mail stays on the server, marked rejected",
    "softbounce": "postbote never sends bounces: refused mail stays on the server, marked rejected",
    "spambounce": "postbote never sends bounces",
    "pidfile": "postbote keeps its lock (with the pid) in state_dir",
    "properties": "only meaningful to fetchmail's extensions",
}


def _map_user(entry: Entry, user: User, defaults: Entry | None, filename: str, taken: set[str], local_user: str,
              daemon: int | None) -> Imported:
    server = dict(defaults.options) if defaults else {}
    server.update(entry.options)
    options: dict[str, Option] = {}
    if defaults:
        for template in defaults.users:
            options.update(template.options)
    options.update(user.options)

    locals_ = list(user.locals) + [local for _, local in user.mapped]
    remote = user.remote or (locals_[0] if locals_ else local_user)  # fetchmail: the (first) local name
    local = locals_[0] if locals_ else local_user  # fetchmail: the user running it, when no local name is given
    host = str(server["via"].value) if "via" in server else entry.name
    account = Imported(account_name(remote, entry.name, taken=taken), f"{filename}:{user.line}")
    keys = account.keys
    here = f"{filename}:{{}}: "

    def skip(option_name: str, line: int, reason: str) -> None:
        account.skip(f"{here.format(line)}{option_name}", reason)

    # the server and the protocol
    protocol = str(server["protocol"].value).lower() if "protocol" in server else "auto"
    if protocol in ("pop3", "apop", "rpop", "kpop", "sdps"):
        chosen = "pop3"
    elif protocol == "imap":
        chosen = "imap"
    elif protocol == "auto":
        chosen = "imap" if "folder" in options else "pop3"
        skip("protocol auto", server["protocol"].line if "protocol" in server else entry.line,
             f"fetchmail tried IMAP, then POP3; postbote needs one: {chosen} assumed, change protocol: if the server "
             "speaks the other")
    else:
        chosen = "pop3"
        skip(f"protocol {protocol}", server["protocol"].line,
             "not supported by postbote (POP3 and IMAP only): written as pop3, check it")
    if chosen == "imap":
        keys["protocol"] = "imap"
    keys["host"] = host
    if "via" in server:
        account.comments.append(f"fetchmail named this server {entry.name!r} and reached it via {host}")
    port = None
    if "port" in server:
        text = str(server["port"].value)
        port = int(text) if text.isdigit() else _WELL_KNOWN_PORTS.get(text.lower())
        if port is None:
            skip(f"service {text}", server["port"].line, "not a number or a well-known POP3/IMAP service name: "
                                                         "set port: yourself")

    # TLS
    ssl = options.get("ssl")
    sslproto = options.get("sslproto")
    if ssl is not None and ssl.value:
        tls = "implicit"
    elif sslproto is not None and str(sslproto.value) == "":
        tls = "none"
        account.comments.append("fetchmail was told not to use TLS at all (sslproto ''): the password crosses "
                                "the network in the clear")
    elif sslproto is not None:
        tls = "starttls"
    else:
        tls = "starttls"
        account.comments.append("fetchmail used STARTTLS when the server offered it and went on in the clear when "
                                "it did not; postbote insists on it (tls: starttls). If the server has no "
                                "STARTTLS, use its TLS port (tls: implicit) or, knowingly, tls: none")
    if sslproto is not None and str(sslproto.value).lower() not in ("", "auto", "tls1+", "tls1.2+", "tls1.3+",
                                                                     "tls1", "tls1.1", "tls1.2", "tls1.3",
                                                                     "ssl23"):
        skip(f"sslproto {sslproto.value}", sslproto.line,
             "postbote uses the system's TLS settings (TLS 1.2 or later); SSLv2/SSLv3 are refused")
    if tls != "implicit":
        keys["tls"] = tls
    if port is not None:
        default = {"implicit": 995, "starttls": 110, "none": 110}[tls] if chosen == "pop3" else \
            {"implicit": 993, "starttls": 143, "none": 143}[tls]
        if port != default:
            keys["port"] = port
    if (check := options.get("sslcertck")) is not None and not check.value:
        skip("no sslcertck", check.line, "postbote always verifies the certificate (tls_verify: true); for a "
                                         "self-signed server pin it with tls_fingerprint instead")
    if "sslcertfile" in options:
        keys["tls_ca_file"] = str(options["sslcertfile"].value)
    if (pin := options.get("sslfingerprint")) is not None:
        value = str(pin.value)
        kind = fingerprint_kind(value)
        if kind == "sha256":
            keys["tls_fingerprint"] = value
        else:
            starttls = ("pop3" if chosen == "pop3" else "imap") if tls == "starttls" else None
            shown_port = port or ({"pop3": 995, "imap": 993} if tls == "implicit" else
                                  {"pop3": 110, "imap": 143})[chosen]
            account.comments.extend(repin_comments(value, kind if kind != "unknown" else "MD5", host, shown_port,
                                                   starttls))
            keys["# tls_fingerprint"] = "SHA-256 FINGERPRINT HERE"
            skip("sslfingerprint", pin.line, f"an {kind.upper()} fingerprint cannot be converted: re-pin the "
                                             "certificate by its SHA-256 fingerprint (see the comment above the "
                                             "account)")

    # the login
    keys["username"] = remote
    if "auth" in server:
        auth = str(server["auth"].value).lower()
        mapped_auth = {"password": "auto", "any": "auto", "cram": "cram-md5", "cram-md5": "cram-md5"}.get(auth)
        if mapped_auth is None:
            skip(f"auth {auth}", server["auth"].line, "not supported by postbote (it offers user, apop, plain, "
                                                      "login, cram-md5, scram-sha-*, xoauth2, oauthbearer): "
                                                      "auth: auto written")
        elif mapped_auth != "auto":
            keys["auth"] = mapped_auth
    if protocol == "apop":
        keys["auth"] = "apop"
        account.comments.append("APOP relies on MD5 and is broken (CVE-2007-1558): prefer TLS with auth: auto")
    if "password" in options:
        account.password = str(options["password"].value)
    else:
        account.comments.append("fetchmail had no password for this account in the rc file (it read ~/.netrc or "
                                "asked): write it into the password_file named below (chmod 600)")
    keys["password_file"] = None  # filled in by the writer

    # what happens to the mail on the server
    keeping = (keep := options.get("keep")) is not None and keep.value
    fetching_all = (fetchall := options.get("fetchall")) is not None and fetchall.value
    if keeping:
        keys["keep"] = True
        if chosen == "pop3":
            account.comments.append(f"keep: import fetchmail's UID list before the first poll, or every message "
                                    f"still on the server is delivered again: postbote import-state {account.name} "
                                    "~/.fetchids")
    if fetching_all:
        keys["fetch_all"] = True
    elif chosen == "imap":
        keys["unseen_only"] = True
        account.comments.append("fetchmail fetched only IMAP messages without the \\Seen flag (and set it): "
                                "unseen_only: true does the same. To fetch every message not delivered yet instead, "
                                f"remove it and run `postbote mark-seen {account.name}` before the first poll")
    if "limit" in options and int(options["limit"].value) > 0:
        keys["max_size"] = int(options["limit"].value)
    if "fetchlimit" in options and int(options["fetchlimit"].value) > 0:
        keys["max_messages"] = int(options["fetchlimit"].value)
    if "timeout" in server and int(server["timeout"].value) > 0:
        keys["timeout"] = int(server["timeout"].value)
    if "interval" in server:
        every = int(server["interval"].value)
        if daemon:
            keys["poll_interval"] = every * daemon
        else:
            skip(f"interval {every}", server["interval"].line, "fetchmail polled this server every Nth cycle of "
                                                               "`set daemon`, which is not set: set poll_interval")
    if "folder" in options:
        if chosen == "imap":
            keys["folders"] = list(options["folder"].value)
        else:
            skip("folder", options["folder"].line, "folders exist only in IMAP; a POP3 account has one mailbox")

    # delivery
    keys["deliver"] = _delivery(options, local, account, skip)

    # multidrop and what else was not taken over
    if user.wildcard or len(locals_) > 1 or any(key in server for key in ("localdomains", "envelope", "qvirtual")):
        names = "*" if user.wildcard else " ".join(locals_)
        account.skip(f"{here.format(user.line)}multidrop (to {names} here)",
                     "postbote delivers every message of an account to the same destination; it does not route by "
                     "To/Cc/envelope headers to several local users. Written: everything to the one destination "
                     "below. Per-recipient routing can be written with the rules plugin (match: {recipient: ...}, "
                     "action: {reroute: [...]}; docs/plugins.md)")
    for source in (server, options):
        for key, option in source.items():
            if key in _HANDLED or (isinstance(option.value, bool) and (key, option.value) in _SAME_AS_POSTBOTE):
                continue
            if isinstance(option.value, bool):
                shown = key if option.value else f"no {key}"
            elif isinstance(option.value, list):
                shown = f"{key} {' '.join(str(v) for v in option.value)}"
            elif key in ("esmtppassword",):
                shown = f"{key} (secret not shown)"
            else:
                shown = f"{key} {option.value}"
            skip(shown, option.line, _REASONS.get(key) or "not supported by postbote")
    return account


_HANDLED = {"protocol", "port", "via", "ssl", "sslproto", "sslcertck", "sslcertfile", "sslfingerprint", "auth",
            "password", "keep", "fetchall", "limit", "fetchlimit", "timeout", "interval", "folder", "mda",
            "smtphost", "smtpname", "lmtp"}


def _delivery(options: dict[str, Option], local: str, account: Imported, skip: Any) -> dict[str, Any]:
    """``deliver:`` from ``mda``, ``smtphost`` (with ``lmtp``) and ``smtpname``; fetchmail's default is SMTP to
    localhost:25 for the local user."""
    recipient = str(options["smtpname"].value) if "smtpname" in options else local
    if "@" not in recipient:
        recipient += "@localhost"
    if "mda" in options:
        command = str(options["mda"].value)
        if "smtphost" in options:
            skip("smtphost", options["smtphost"].line, "fetchmail ignores smtphost when an mda is set")
        return {"mda": mda_argv(command, local, account, skip, options["mda"].line)}
    lmtp = bool(options.get("lmtp") and options["lmtp"].value)
    hosts = list(options["smtphost"].value) if "smtphost" in options else ["localhost"]
    if len(hosts) > 1:
        skip(f"smtphost {' '.join(hosts[1:])}", options["smtphost"].line,
             "fetchmail tried these in turn when the first was down; postbote delivers to the first one and "
             "retries it on the next poll")
    target = hosts[0]
    kind = "lmtp" if lmtp else "smtp"
    settings: dict[str, Any] = {}
    if target.startswith("/"):
        settings["socket"] = target
    else:
        host, _, port = target.partition("/")
        settings["host"] = host
        if port:
            settings["port"] = int(port) if port.isdigit() else port
    settings["recipients"] = [recipient]
    return {kind: settings}


def mda_argv(command: str, local: str, account: Imported, skip: Any, line: int) -> list[str]:
    """fetchmail runs its MDA through ``sh -c`` with ``%T``/``%s`` (recipient) and ``%F`` (sender) replaced; postbote
    runs an argument list without a shell. A plain command is split into words; one that needs the shell stays
    ``[/bin/sh, -c, COMMAND]``."""
    import shlex

    replaced = command.replace("%T", local).replace("%s", local)
    if "%F" in replaced:
        skip("mda %F", line, "postbote's MDA gets no sender argument; the message's Return-Path: holds it (most MDAs "
                             "read it)")
        replaced = without_sender(replaced)
    if "%T" in command or "%s" in command:
        account.comments.append(f"fetchmail's %T/%s in the MDA command stood for the local user: written as {local!r}")
    if not any(char in _SHELL_CHARS for char in replaced):
        try:
            return shlex.split(replaced)
        except ValueError:
            pass
    account.comments.append("the MDA command needs a shell (pipes, redirections or variables): it runs as "
                            "/bin/sh -c, as fetchmail ran it")
    return ["/bin/sh", "-c", replaced]
