"""An IMAP account's own keys read into a frozen `IMAPSettings`, and the connection keys any IMAP section shares.

`connection_settings` reads what it takes to reach and log in to an IMAP server (host, port, TLS, username,
``auth`` and the secret) into a `ConnectionSettings`; the source (``protocol: imap``, `imap_settings`) and the
destination (``deliver: {imap: {...}}``, postbote.plugins.imap_append) both use it. The source adds which folders
to fetch and what happens to a message once it is delivered (``after_fetch``). Mistakes are recorded with the
core's ``FILE:LINE: key.path:`` errors. Nothing here talks to a server: reading a config loads no TLS, SASL or
OAuth2 code.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

from postbote import Node, Section, boolean, choice, nonempty_text
from postbote.plugins.signin.server import ServerSettings, TLSMode, read_server
from postbote.plugins.signin.settings import AUTH_CHOICES, AuthChoice

DEFAULT_PORTS = {TLSMode.IMPLICIT: 993, TLSMode.STARTTLS: 143, TLSMode.NONE: 143}
# IMAP logs in with SASL or its LOGIN command (chosen by ``auth: auto`` when the server offers no SASL for a
# password); POP3's USER and APOP have no IMAP counterpart.
IMAP_AUTH_CHOICES = tuple(name for name in AUTH_CHOICES if name not in (AuthChoice.USER, AuthChoice.APOP))
DEFAULT_FOLDER = "INBOX"
WILDCARDS = ("*", "%")


class AfterFetch(StrEnum):
    """What happens to a message on the server once it is delivered (``after_fetch:``)."""

    DELETE = "delete"  # \Deleted and UID EXPUNGE of exactly those UIDs
    MOVE = "move"  # into ``move_to``
    SEEN = "seen"  # \Seen set, left where it is
    KEEP = "keep"  # left as it is

    @property
    def stays(self) -> bool:
        """Whether the message stays in its folder (the poller keeps its record while it is listed)."""
        return self in (AfterFetch.SEEN, AfterFetch.KEEP)


@dataclass(frozen=True)
class ConnectionSettings(ServerSettings):
    """How to reach and log in to an IMAP server: the part of an IMAP source and of an IMAP destination that is
    the same (`AuthSettings.from_source` reads username, tls, auth and credentials from it)."""

    PROTOCOL = "IMAP"


@dataclass(frozen=True)
class FolderRule:
    """One entry of ``folders:``: a name (or a LIST pattern with ``*``/``%``) and what happens after delivery."""

    name: str
    after_fetch: AfterFetch
    move_to: str | None = None

    @property
    def is_pattern(self) -> bool:
        return any(wildcard in self.name for wildcard in WILDCARDS)


@dataclass(frozen=True)
class IMAPSettings(ConnectionSettings):
    """``account.source`` of an IMAP account (``protocol: imap``)."""

    folders: tuple[FolderRule, ...] = (FolderRule(DEFAULT_FOLDER, AfterFetch.DELETE),)
    after_fetch: AfterFetch = AfterFetch.DELETE  # the account's; a folder may say otherwise
    move_to: str | None = None
    unseen_only: bool = False
    gmail: bool = False  # one message under several labels is listed once (by X-GM-MSGID)
    idle: bool = True  # `postbote run` waits with IDLE for new mail where the server offers it

    def describe(self) -> str:
        folders = ", ".join(rule.name for rule in self.folders)
        return f"{super().describe()}; folders {folders}"

    @property
    def after_delivery(self) -> str:
        """What ``check`` says happens to a delivered message: ``delete``, ``move to Archive``, or per folder
        ``seen (Lists.*), delete (INBOX)`` when the folders differ."""
        def action(rule: FolderRule) -> str:
            return f"{rule.after_fetch}" + (f" to {rule.move_to}" if rule.after_fetch is AfterFetch.MOVE else "")

        actions = {action(rule) for rule in self.folders}
        if len(actions) == 1:
            return actions.pop()
        return ", ".join(f"{action(rule)} ({rule.name})" for rule in self.folders)


def connection_settings(section: Section, base_dir: Path, *,
                        default_tls: TLSMode = TLSMode.IMPLICIT) -> ConnectionSettings | None:
    """The connection and login keys of an IMAP section (an account, or a destination's ``imap:`` mapping);
    None when some are wrong (recorded as problems in ``section.problems``)."""
    return read_server(section, base_dir, ConnectionSettings, default_ports=DEFAULT_PORTS,
                       auth_choices=IMAP_AUTH_CHOICES, default_tls=default_tls)


def imap_settings(section: Section, base_dir: Path) -> IMAPSettings | None:
    """The keys of one ``protocol: imap`` account (``defaults:`` merged in); None when some are wrong."""
    before = section.problems.reported
    connection = connection_settings(section, base_dir)
    keep = _account_keeps(section)
    after_fetch = AfterFetch(section.get("after_fetch", choice(*AfterFetch),
                                         AfterFetch.KEEP.value if keep else AfterFetch.DELETE.value))
    move_to = section.get("move_to", nonempty_text, None)
    _check_action(section, section.node, after_fetch, move_to, keep)
    folders = _folders(section, after_fetch, move_to, keep)
    unseen_only = section.get("unseen_only", boolean, False)
    gmail = section.get("gmail", boolean, False)
    idle = section.get("idle", boolean, True)
    if connection is None or section.problems.reported > before:
        return None
    shared = {item.name: getattr(connection, item.name) for item in fields(ConnectionSettings)}
    return IMAPSettings(**shared, folders=folders, after_fetch=after_fetch, move_to=move_to,
                        unseen_only=unseen_only, gmail=gmail, idle=idle)


def _account_keeps(section: Section) -> bool:
    """The account's general ``keep:`` (postbote reads and checks it; only a plain true counts here)."""
    node = section.entries.get("keep")
    return node is not None and node.value is True


def _check_action(section: Section, node: Node, after_fetch: AfterFetch, move_to: str | None, keep: bool) -> None:
    """``after_fetch`` and ``move_to`` agree with each other and with the account's ``keep``."""
    action_node = _child(node, "after_fetch") or node
    if keep and after_fetch in (AfterFetch.DELETE, AfterFetch.MOVE):
        section.problem(f"{after_fetch} contradicts the account's keep: true (remove one of them, or use "
                        "after_fetch: seen or keep)", action_node)
    elif keep and after_fetch is AfterFetch.SEEN:
        # keep: true leaves every message untouched on the server, so \Seen would never be set
        section.problem("seen with the account's keep: true would never mark anything: leave keep: true out "
                        "(after_fetch: seen keeps the messages on the server too)", action_node)
    if after_fetch is AfterFetch.MOVE and move_to is None:
        section.problem("move needs move_to: the folder to move delivered messages into", action_node)
    if move_to is not None and after_fetch.stays:
        section.problem(f"move_to is for after_fetch: move (or delete, as the fallback when the server cannot "
                        f"expunge single messages), not for {after_fetch}", _child(node, "move_to") or node)


def _child(node: Node, key: str) -> Node | None:
    return node.value.get(key) if isinstance(node.value, dict) else None


def _folders(section: Section, after_fetch: AfterFetch, move_to: str | None,
             keep: bool) -> tuple[FolderRule, ...]:
    node = section.raw("folders")
    if node is None or node.value is None:
        return (FolderRule(DEFAULT_FOLDER, after_fetch, move_to),)
    items = node.value if isinstance(node.value, list) else None
    if not items:
        section.problem("expected a list of folder names (or {name: ..., after_fetch: ...} mappings), "
                        "e.g. [INBOX, Lists/*]", node)
        return ()
    rules: list[tuple[FolderRule, Node]] = []
    for item in items:
        rule = _folder(section, item, after_fetch, move_to, keep)
        if rule is None:
            continue
        if any(other.name == rule.name for other, _ in rules):
            section.problem(f"folder {rule.name!r} is listed twice", item)
            continue
        rules.append((rule, item))
    targets = {rule.move_to for rule, _ in rules if rule.move_to} | ({move_to} if move_to else set())
    for rule, item in rules:
        if rule.name in targets:
            section.problem(f"folder {rule.name!r} is where delivered messages are moved (move_to): read as a "
                            "source too, its messages would be fetched again and again", item)
    return tuple(rule for rule, _ in rules)


def _folder(section: Section, item: Node, after_fetch: AfterFetch, move_to: str | None,
            keep: bool) -> FolderRule | None:
    if not isinstance(item.value, dict):
        try:
            return FolderRule(_folder_name(item.value), after_fetch, move_to)
        except ValueError as exc:
            section.problem(str(exc), item)
            return None
    entry = Section(item, section.problems)
    before = section.problems.reported
    name = entry.get("name", _folder_name, required=True)
    own = AfterFetch(entry.get("after_fetch", choice(*AfterFetch), after_fetch.value))
    inherited = move_to if own in (after_fetch, AfterFetch.MOVE) else None
    own_move_to = entry.get("move_to", nonempty_text, inherited)
    entry.finish()
    _check_action(section, item, own, own_move_to, keep)
    if name is None or section.problems.reported > before:
        return None
    return FolderRule(name, own, own_move_to)


def _folder_name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a folder name (INBOX, Archive/2024, Lists/* ...)")
    if any(ch in value for ch in "\r\n\0"):
        raise ValueError("a folder name cannot contain a line break or NUL")
    return DEFAULT_FOLDER if value.upper() == DEFAULT_FOLDER else value  # INBOX is INBOX in any case (RFC 3501)
