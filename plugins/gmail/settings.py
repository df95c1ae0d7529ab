"""The ``deliver: {gmail: {...}}`` options, read with the core's ``file:line: key:`` errors.

Apart from the HTTP client (`postbote.plugins.gmail.api`) so that reading a config loads no TLS or HTTP code.
"""

from __future__ import annotations

import enum
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from postbote import Node, Problems, Section, boolean, choice, duration, nonempty_text, path_relative_to, text_list

if TYPE_CHECKING:
    from postbote.plugins.signin.oauth2 import TokenSource
    from postbote.plugins.signin.oauth2_settings import OAuth2Settings

API_URL = "https://gmail.googleapis.com"
# The narrowest pair that imports and labels: gmail.insert lets users.messages.import add a message (with labelIds)
# but neither read nor delete mail; gmail.labels lists and creates labels and reads nothing else. gmail.modify
# would also read and trash every message of the mailbox, which a fetcher never needs.
SCOPES = ("https://www.googleapis.com/auth/gmail.insert", "https://www.googleapis.com/auth/gmail.labels")
DEFAULT_LABELS = ("INBOX", "UNREAD")
# Gmail's system labels that a message can be given (their ids are their names); any other name is a user label.
SYSTEM_LABELS = frozenset({"INBOX", "UNREAD", "STARRED", "IMPORTANT", "SPAM", "TRASH", "CATEGORY_PERSONAL",
                           "CATEGORY_SOCIAL", "CATEGORY_PROMOTIONS", "CATEGORY_UPDATES", "CATEGORY_FORUMS"})
NOT_SETTABLE = frozenset({"SENT", "DRAFT", "CHAT"})
DEFAULT_RATE = 4.0  # imports a second: 6,000 quota units a minute per user (Gmail's 2026 quota page), 25 an import
MAX_LABEL = 225  # Gmail refuses longer label names
_USER = re.compile(r"me|[^@\s]+@[^@\s]+")


class DateSource(enum.StrEnum):
    """``internal_date_source``: what Gmail sorts the message by (the API's ``internalDateSource``)."""

    DATE_HEADER = "date_header"  # the Date: field (the API's dateHeader; Gmail falls back to the time of import)
    RECEIVED_TIME = "received_time"  # the time Gmail took it (receivedTime)

    @property
    def api_name(self) -> str:
        return {"date_header": "dateHeader", "received_time": "receivedTime"}[self.value]


@dataclass(frozen=True)
class GmailSettings:
    user: str = "me"  # the mailbox: "me" (whose token it is), or an address (a Workspace service account)
    labels: tuple[str, ...] = DEFAULT_LABELS
    create_labels: bool = True
    internal_date_source: DateSource = DateSource.DATE_HEADER
    never_mark_spam: bool = False
    process_for_calendar: bool = False
    timeout: float = 60.0
    rate_limit: float = DEFAULT_RATE
    pipeline: bool = True
    oauth2: OAuth2Settings | None = None
    token_command: tuple[str, ...] = ()
    api_url: str = API_URL
    tls_ca_file: Path | None = None
    key_path: str = "deliver.gmail"  # where the options are in the config, for ``check``'s messages

    @property
    def label(self) -> str:
        """Names the destination in logs, answers and the state's delivery notes (and keys its session and its rate
        limit): the mailbox, whose token, and the endpoint unless it is Google's."""
        if self.user != "me":
            name = self.user
        elif self.oauth2 is not None:
            name = f"me ({self.oauth2.refresh_token_file})"  # the whole path: two token files may share a name
        else:
            name = f"me ({self.token_command[0]})" if self.token_command else "me"
        return name if self.api_url == API_URL else f"{name} via {urllib.parse.urlsplit(self.api_url).netloc}"

    @property
    def user_labels(self) -> tuple[str, ...]:
        return tuple(name for name in self.labels if name not in SYSTEM_LABELS)

    @property
    def files(self) -> Mapping[str, tuple[Path, int, str]]:
        """The files ``postbote check`` reads (path, line, key path): the client secret, the CA."""
        found: dict[str, tuple[Path, int, str]] = {}  # not the refresh token: `postbote auth` writes it later
        if self.oauth2 is not None and self.oauth2.client_secret_file is not None:
            found["client_secret_file"] = (self.oauth2.client_secret_file, 0,
                                           f"{self.key_path}.oauth2.client_secret_file")
        if self.tls_ca_file is not None:
            found["tls_ca_file"] = (self.tls_ca_file, 0, f"{self.key_path}.tls_ca_file")
        return found

    @property
    def holds_inline_password(self) -> bool:
        return False

    def describe(self) -> str:
        how = (f"oauth2 ({self.oauth2.provider or 'custom'}, client {self.oauth2.client_id})" if self.oauth2
               else f"token_command {self.token_command[0]}")
        flags = [f"labels {', '.join(self.labels) or '(none: archived)'}",
                 f"date from {self.internal_date_source.value}"]
        if self.never_mark_spam:
            flags.append("never spam")
        if self.process_for_calendar:
            flags.append("calendar")
        return f"Gmail import for {self.user} via {self.api_url}, {how}; {', '.join(flags)}"

    def token_source(self, name: str, cache_dir: Path | None) -> TokenSource:
        """Where the access tokens come from; ``name`` names the token cache (STATE_DIR/oauth2/NAME.json)."""
        if self.token_command:
            from postbote.plugins.signin.oauth2 import TokenCommand

            return TokenCommand(self.token_command)
        from postbote.plugins.signin.oauth2 import OAuth2Refresher

        assert self.oauth2 is not None, "a gmail destination has oauth2 or token_command"
        return OAuth2Refresher(self.oauth2, account=name, cache_dir=cache_dir, timeout=self.timeout)


def label_name(value: Any) -> str:
    name = nonempty_text(value)
    upper = name.upper()
    if upper in SYSTEM_LABELS:
        return upper
    if upper in NOT_SETTABLE:
        raise ValueError(f"the system label {upper} cannot be given to an imported message")
    if len(name) > MAX_LABEL or any(not ch.isprintable() for ch in name):
        raise ValueError(f"expected a label name of at most {MAX_LABEL} printable characters")
    return name


def label_list(value: Any) -> list[str]:
    return list(dict.fromkeys(label_name(item) for item in text_list(value))) if value != [] else []


def rate(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1000:
        raise ValueError("expected a number of imports a second (above 0, at most 1000)")
    return float(value)


def user_id(value: Any) -> str:
    text = nonempty_text(value)
    if not _USER.fullmatch(text):
        raise ValueError("expected me or the mailbox's address")
    return text


def https_url(value: Any) -> str:
    text = nonempty_text(value).rstrip("/")
    parts = urllib.parse.urlsplit(text)
    if parts.scheme != "https" or not parts.hostname or parts.username or parts.password or parts.query:
        raise ValueError("expected an https:// URL without credentials or query (tokens never travel unencrypted)")
    return text


def argv(value: Any) -> list[str]:
    items = text_list(value)
    if not items:
        raise ValueError("expected a program and its arguments")
    return items


def parse_settings(options: Node, problems: Problems, base_dir: Path) -> GmailSettings | None:
    section = Section(options, problems)
    before = problems.reported
    fields: dict[str, Any] = dict(
        user=section.get("user", user_id, "me"),
        labels=tuple(section.get("labels", label_list, list(DEFAULT_LABELS))),
        create_labels=section.get("create_labels", boolean, True),
        internal_date_source=DateSource(section.get("internal_date_source", choice(*DateSource),
                                                    DateSource.DATE_HEADER.value)),
        never_mark_spam=section.get("never_mark_spam", boolean, False),
        process_for_calendar=section.get("process_for_calendar", boolean, False),
        timeout=section.get("timeout", duration, 60.0),
        rate_limit=section.get("rate_limit", rate, DEFAULT_RATE),
        pipeline=section.get("pipeline", boolean, True),
        api_url=section.get("api_url", https_url, API_URL),
        tls_ca_file=section.get("tls_ca_file", path_relative_to(base_dir), None),
        token_command=tuple(section.get("token_command", argv, [])),
        key_path=section.path,
    )
    oauth = section.section("oauth2")
    if oauth is not None:
        fields["oauth2"] = _oauth2(oauth, base_dir)
    if (oauth is None) == (not fields["token_command"]):
        section.problem("give exactly one of oauth2 (postbote refreshes the tokens; run postbote auth ACCOUNT "
                        "--destination gmail once) or token_command")
    section.finish()
    if problems.reported > before:
        return None
    return GmailSettings(**fields)


def _oauth2(section: Section, base_dir: Path) -> OAuth2Settings | None:
    """The ``oauth2:`` section as for a source, but asking for the Gmail import scopes unless ``scope`` is given
    (the Google preset's scope is the whole mailbox, which POP3 and IMAP need and an import does not)."""
    from postbote.plugins.signin.oauth2_settings import oauth2_from_section

    if "scope" not in section:
        section.entries = {**section.entries, "scope": Node(" ".join(SCOPES), section.line, f"{section.path}.scope")}
    return oauth2_from_section(section, base_dir)
