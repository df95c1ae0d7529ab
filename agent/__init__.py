"""postbote: fetch mail from POP3 mailboxes and redeliver it without ever losing a message.

This module is the public face: everything a plugin needs is imported from here (``from postbote import hookimpl,
Message, Verdict, Section, DeliveryError``), never from the modules behind it, which may move. The names are
imported on first use (PEP 562), so that ``python -m postbote --help`` loads neither pluggy nor the message spooling,
and a plain poll loads no TLS, SASL or OAuth2 code it does not use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from postbote.config import Account, Config, Destination, parse_destination_entry
    from postbote.credentials import Secret, child_environment, redact, register_secret, register_secret_variable
    from postbote.delivery import Delivered, DeliveryResult, Pending, Staged
    from postbote.durable import fsync_directory, fsync_file, rename_durably, sync_filesystems
    from postbote.errors import (
        AccountError,
        ConfigError,
        CredentialError,
        DeliveryError,
        LoginRefused,
        PluginError,
        PostboteError,
        StateError,
        StateLockedError,
    )
    from postbote.hookspecs import hookimpl
    from postbote.logconfig import get_logger
    from postbote.mailbox import Fetched, Mailbox, MailboxEntry, NotFetched, TooLarge
    from postbote.message import Message, Verdict
    from postbote.poll import Poll, PollStats
    from postbote.smtp import AuthRefused, Delivery, Reply, SenderRefused, SessionRefused, SMTPClient
    from postbote.state import (
        KeyedTable,
        LegacyTable,
        PollRecord,
        WaitingMessage,
        WorkerFigures,
        read_account_state,
        read_accounts_state,
        read_workers,
    )
    from postbote.status import WaitingSummary, stale_after
    from postbote.tls import StartTLS, TLSError, TLSPolicy, certificate_facts
    from postbote.trace import ProtocolTrace, protocol_trace
    from postbote.watch import Watch
    from postbote.wire import (
        CRLFEncoder,
        LengthChanged,
        LFEncoder,
        SMTPDataEncoder,
        checked_length,
        crlf_lines,
        lf_lines,
        smtp_data,
    )
    from postbote.yaml_reader import (
        AccountRows,
        Node,
        Parser,
        Problems,
        Section,
        boolean,
        choice,
        describe,
        duration,
        integer,
        nonempty_text,
        path_relative_to,
        port_number,
        size,
        text,
        text_list,
    )

__version__ = "0.1.0"

# Where each public name lives: {module: (name, ...)} or, for a name the face gives another spelling,
# {module: {public name: name in the module}}.
_FACE: dict[str, tuple[str, ...] | dict[str, str]] = {
    # writing a plugin
    "postbote.hookspecs": ("hookimpl",),
    "postbote.message": ("Message", "Verdict"),
    "postbote.config": ("Account", "Config", "Destination", "parse_destination_entry"),
    "postbote.poll": ("Poll", "PollStats"),
    # a mail source: the mailbox seam (the open_mailbox hook)
    "postbote.mailbox": ("Fetched", "Mailbox", "MailboxEntry", "NotFetched", "TooLarge"),
    # push: connections that say when new mail arrives (the watch_mailbox hook)
    "postbote.watch": ("Watch",),
    # what a destination answers (the deliver_message hook)
    "postbote.delivery": ("Delivered", "DeliveryResult", "Pending", "Staged"),
    # reading a plugin's options, with the core's file:line errors
    "postbote.yaml_reader": ("AccountRows", "Node", "Parser", "Problems", "Section", "boolean", "choice",
                             "describe", "duration", "integer", "nonempty_text", "path_relative_to", "port_number",
                             "size", "text", "text_list"),
    # errors
    "postbote.errors": ("AccountError", "ConfigError", "CredentialError", "DeliveryError", "LoginRefused",
                        "PluginError", "PostboteError", "StateError", "StateLockedError"),
    "postbote.tls": ("StartTLS", "TLSError", "TLSPolicy", "certificate_facts"),
    # delivering: line endings for the wire and for files, an SMTP/LMTP client
    "postbote.wire": ("CRLFEncoder", "LFEncoder", "LengthChanged", "SMTPDataEncoder", "checked_length", "crlf_lines",
                      "lf_lines", "smtp_data"),
    "postbote.smtp": ("AuthRefused", "Delivery", "Reply", "SMTPClient", "SenderRefused", "SessionRefused"),
    # the protocol trace of ``postbote -v``: a protocol client's hooks (None when the trace is off)
    "postbote.trace": ("ProtocolTrace", "protocol_trace"),
    # secrets: a value no log shows (`redact` masks every one registered); a child's environment without them
    "postbote.credentials": ("Secret", "child_environment", "redact", "register_secret", "register_secret_variable"),
    # making written files survive a crash (each raises the kernel's OSError; turn it into your DeliveryError)
    "postbote.durable": ("fsync_directory", "fsync_file", "rename_durably", "sync_filesystems"),
    # keeping state: a plugin's own keyed table beside the state database, and read-only views of poll records
    "postbote.state": ("KeyedTable", "LegacyTable", "PollRecord", "WaitingMessage", "WorkerFigures",
                       "read_account_state", "read_accounts_state", "read_workers"),
    "postbote.status": ("WaitingSummary", "stale_after"),
    # a plugin's logger: structlog's, assembled once per configuration instead of at every event
    "postbote.logconfig": ("get_logger",),
}


def _lazy_table(face: dict[str, tuple[str, ...] | dict[str, str]]) -> dict[str, tuple[str, str]]:
    """{public name: (module, name in the module)}."""
    table: dict[str, tuple[str, str]] = {}
    for module, names in face.items():
        spelled = names if isinstance(names, dict) else {name: name for name in names}
        table.update({public: (module, inner) for public, inner in spelled.items()})
    return table


_LAZY = _lazy_table(_FACE)

__all__ = [  # spelled out, so that type checkers see the re-exports; tests/test_architecture.py keeps it in step
    "__version__",
    # writing a plugin
    "Account", "Config", "Destination", "Message", "Poll", "PollStats", "Verdict", "hookimpl",
    "parse_destination_entry",
    # a mail source
    "Fetched", "Mailbox", "MailboxEntry", "NotFetched", "TooLarge", "Watch",
    # what a destination answers
    "Delivered", "DeliveryResult", "Pending", "Staged",
    # reading a plugin's options
    "AccountRows", "Node", "Parser", "Problems", "Section", "boolean", "choice", "describe", "duration", "integer",
    "nonempty_text", "path_relative_to", "port_number", "size", "text", "text_list",
    # errors
    "AccountError", "ConfigError", "CredentialError", "DeliveryError", "LoginRefused", "PluginError", "PostboteError",
    "StateError", "StateLockedError", "TLSError",
    # delivering
    "AuthRefused", "CRLFEncoder", "Delivery", "LFEncoder", "Reply", "SMTPClient", "SMTPDataEncoder", "SenderRefused",
    "SessionRefused", "StartTLS", "TLSPolicy", "certificate_facts", "child_environment", "ProtocolTrace",
    "protocol_trace",
    "crlf_lines", "lf_lines", "smtp_data", "LengthChanged", "checked_length",
    # secrets
    "Secret", "redact", "register_secret", "register_secret_variable",
    # making written files durable
    "fsync_directory", "fsync_file", "rename_durably", "sync_filesystems",
    # keeping state
    "KeyedTable", "LegacyTable", "PollRecord", "WaitingMessage", "WaitingSummary", "WorkerFigures",
    "read_account_state", "read_accounts_state", "read_workers", "stale_after",
    # logging
    "get_logger",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    module, inner = _LAZY[name]
    value = getattr(importlib.import_module(module), inner)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
