"""The plugin author's contract: every hook postbote calls, when, with what, and what happens when it raises.

Write a plugin as a module or class with functions marked ``@hookimpl`` (``from postbote import hookimpl``), named
after the hooks below. An implementation may accept any subset of a hook's arguments, by name. postbote always
calls hooks with keyword arguments. A function marked ``@hookimpl`` whose name is not a hook here is a start-up
error, so a misspelt hook never goes silently unused.

Order: implementations run from the most recently registered to the first; ``@hookimpl(tryfirst=True)`` and
``@hookimpl(trylast=True)`` move one to the front or the back. Built-in plugins are registered first, so plugins
loaded after them (entry points, ``plugin_paths``) run before them unless they say otherwise. pluggy calls the
implementations (its tracing shows every call, and ``@hookimpl(wrapper=True)`` works on every hook but the
historic ``configure``); a plugin an account turns off is left out of that account's calls.

Per poll, the account's source plugin opens the mailbox (``open_mailbox``); the poller then lists, fetches, hands
each message on, records it and only then asks the mailbox to delete it (see `postbote.Mailbox`).

Safety: an exception raised by ``filter_message``, ``backup_message`` or ``deliver_message`` fails that message
only. It stays on the server, is not recorded as delivered, the error is logged with the plugin's name, and the
poll goes on with the next message. Exceptions from the observer hooks (``poll_started`` … ``account_error``) are
logged and otherwise ignored: an observer can never lose or block mail.

Per message the hooks run in this order: ``filter_message`` (each filter in turn, until one gives a verdict),
``backup_message`` (all),
``deliver_message`` (once per configured destination). ``message_failed`` follows at once when the message could
not be handled. ``message_delivered`` / ``message_dropped`` follow once the outcome is recorded in the state store,
before DELE is sent; records are committed in batches (group commit), so several later messages may have been
filtered and delivered before an earlier one's ``message_delivered`` arrives.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import pluggy

if TYPE_CHECKING:
    # the names a plugin author sees, from the public face
    from postbote import (
        Account,
        AccountRows,
        Config,
        DeliveryResult,
        Destination,
        Mailbox,
        Message,
        Node,
        Poll,
        PollStats,
        PostboteError,
        Problems,
        Section,
        Verdict,
        Watch,
    )

PROJECT = "postbote"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --- configuration and lifecycle ---


@hookspec(firstresult=True)
def parse_destination(kind: str, options: Node, problems: Problems, base_dir: Path,
                      pluginmanager: pluggy.PluginManager) -> Any | None:
    """Validate the options of one ``deliver:`` entry of kind ``kind`` (``smtp``, ``maildir``, …).

    Return a settings object for your own ``deliver_message`` when ``kind`` is yours, else None (no opinion).
    ``options`` is the YAML value under the kind's key, with its line number; report mistakes with
    ``problems.add(options.line, options.path, "expected …")`` or read it through ``postbote.Section``.
    Relative paths are taken from ``base_dir``, the config file's directory. Stops at the first non-None result.
    A kind no plugin claims is a config error that lists the kinds known.
    """


@hookspec(firstresult=True)
def parse_plugin_options(name: str, options: Node, problems: Problems, base_dir: Path,
                         pluginmanager: pluggy.PluginManager) -> Any | None:
    """Validate the options of the plugin called ``name`` for one account; return them parsed if ``name`` is you.

    Called for every account where the plugin is enabled, with the top-level ``plugins: {name: {...}}`` mapping
    shallowly overridden by the account's own ``plugins:`` entry (an empty mapping when neither gives options),
    so defaults and required keys are checked in one place. The result is what ``account.options_for(name)``
    returns while handling that account's messages. Report mistakes through ``problems`` (or read ``options`` with
    ``postbote.Section``). Return None if ``name`` is not yours; options given to a plugin that parses none
    are a config error. A plugin whose options name delivery targets (as ``rules`` does) turns them into
    destinations with ``postbote.parse_destination_entry(node, problems, pluginmanager, base_dir)``.
    Stops at the first non-None result.
    """


@hookspec
def load_accounts(name: str, options: Node, base_dir: Path) -> AccountRows | None:
    """Supply accounts from somewhere other than the config files -- a database table, a directory service -- when
    ``name`` is yours: called once per config load (and reload) for each plugin the top-level ``plugins:`` enables,
    with that entry's ``options`` (also parsed by your ``parse_plugin_options``, as for every account).

    Return ``postbote.AccountRows(where, rows)``: ``where`` names the place in error messages, ``rows`` (number,
    mapping) pairs in the config's account format (``name``, ``host``, ``username``, ``password_file``, ``deliver``,
    ...), checked as the config's own accounts are, with ``defaults:`` applied. Keep secrets out of the rows where you
    can: a ``password_file`` in a directory only postbote reads, or a ``password_command``. Raise ``ConfigError``
    when the place cannot be read. Return None when ``name`` is not yours.
    """


@hookspec(firstresult=True)
def parse_source(protocol: str, section: Section, problems: Problems, base_dir: Path) -> Any | None:
    """Read the account keys of a mail source speaking ``protocol`` (``pop3``, the default; ``imap``, …).

    ``section`` is the whole account mapping (defaults merged): read your keys from it with ``section.get`` (the
    account's general keys -- name, deliver, keep, … -- are read by postbote; a key nobody reads is an error).
    Return your settings object when ``protocol`` is yours, else None. It becomes ``account.source``; give it a
    ``server`` property (``user@host:port``, shown by ``check`` and ``status``), and ``files`` (a mapping of key to
    (path, line, key path) for the files ``postbote check`` must be able to read) when it names files.
    Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def authorize(account: Account, state_dir: Path, out: TextIO, flow: str, open_browser: bool,
              destination: str | None) -> int | None:
    """``postbote auth ACCOUNT [--destination D]``: run a one-time authorization (an OAuth2 flow that stores a
    refresh token) and return the exit status. Without ``destination``: the account's source's, if the source is
    yours and needs one (or, when it needs none, a destination of yours that does); with it, the destination of
    yours whose label or kind is ``destination``. ``flow`` is ``auto``, ``device`` or ``loopback``; print only what
    the user must see (a URL, a user code) to ``out``. Raise `ConfigError` when there is nothing to authorize.
    Stops at the first non-None result.
    """


@hookspec(historic=True)
def configure(config: Config) -> None:
    """Called once after the configuration is loaded and valid, before the first poll; open shared resources.

    Historic: a plugin registered later still receives it. Raising here is a start-up error (exit status 2).
    """


@hookspec
def unconfigure(config: Config) -> None:
    """Called once at shutdown (and before a reload); close what ``configure`` opened."""


# --- per poll ---


@hookspec(firstresult=True)
def open_mailbox(account: Account, poll: Poll) -> Mailbox | None:
    """Connect to ``account``'s mailbox and log in, if ``account.protocol`` is yours; else return None.

    Return a `postbote.Mailbox`: the poller then lists, fetches, hands on, records and deletes through it (see
    ``docs/plugins.md``). Connect within ``poll.deadline`` (a ``time.monotonic()`` value); ``poll.state_dir`` is the
    state directory (for token caches). Raise an `AccountError` (or a subclass) when the server cannot be reached
    or refuses the login: the account's poll fails with that message and other accounts go on.
    Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def watch_mailbox(account: Account, state_dir: Path) -> list[Watch] | None:
    """Push for ``postbote run``: if ``account.protocol`` is yours and the account asks for it, open connections
    that wait for new mail (IMAP IDLE) and return them as `postbote.Watch` objects; else return None.

    Called by the daemon in a poll's thread after a successful poll of an account that has no open watch. The
    daemon waits on all watches in one thread and polls the account as soon as one says new mail arrived; a watch
    that breaks is closed and the account goes back to its ``poll_interval``. Raise an `AccountError` when the
    server cannot be watched (logged; the account is polled on schedule). Stops at the first non-None result.
    """


# --- per message, in this order ---


@hookspec(firstresult=True)
def filter_message(message: Message, account: Account) -> Verdict | None:
    """Decide about one message before it is delivered.

    Return None to pass it on to the next filter (after changing it in place if you like: add, remove or rewrite
    header fields through ``message.add_header`` / ``remove_header`` / ``replace_header``, reroute it by setting
    ``message.recipients`` (envelope recipients for SMTP/LMTP) or ``message.destinations`` (a list of
    ``Destination`` replacing the account's ``deliver:``)), ``Verdict.accept()`` to deliver it without asking the
    remaining filters, or ``Verdict.drop(reason)`` to deliver it nowhere: a dropped message counts as handled
    (deleted unless ``keep``) and the drop is logged with its reason. The first verdict ends the filtering
    (firstresult); an exception names the plugin that raised.
    """


@hookspec
def backup_message(message: Message, account: Account) -> None:
    """Archive a copy of a message that passed the filters, before it is delivered.

    Every implementation is called. Raise to refuse: the message is then not delivered, stays on the server and is
    retried on the next poll. Make the copy durable (fsync) before returning.
    """


@hookspec(firstresult=True)
def deliver_message(message: Message, destination: Destination, account: Account,
                    poll: Poll) -> DeliveryResult | None:
    """Hand a message to ``destination`` if its ``destination.kind`` is yours; else return None (no opinion).

    Return what became of it (``postbote.Delivered``, ``Staged`` or ``Pending``; see ``postbote.delivery``):
    ``Delivered(answer)`` once the message is durable there (``"250 2.0.0 Ok: queued as 4F…"``, a file name);
    ``Staged(answer, source, target)`` for a file written to ``source`` but not yet synced, which the poll syncs
    with its batch, records, and renames to ``target``; ``Pending(wait)`` when the answer arrives later: ``wait()``
    returns the answer or raises, and is called after the next message is fetched. A plain string counts as
    ``Delivered``.

    Deliver to ``destination.recipients`` when it is set (the recipients an earlier, partly successful attempt has
    not reached yet), else to ``message.recipients`` or your own configured ones.

    Raise ``postbote.DeliveryError(reason, temporary=…)`` when the destination refuses the message: temporary leaves
    it on the server to be retried next poll, permanent marks it rejected (still on the server, retried only after
    ``postbote retry``). Any other exception counts as temporary. Use ``poll.resource(key, opener)`` to keep one
    connection for all messages of a poll; it is closed when the poll ends. Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def find_delivered(message: Message, destination: Destination, account: Account, poll: Poll) -> str | None:
    """Whether ``message`` is already at ``destination`` although no answer said so: an earlier delivery ended
    without one (postbote was killed, the connection broke after the whole message was sent). Return a description
    of where it is (``"INBOX, UID 42"``) when you find it there for certain -- it then counts as delivered and is not
    handed over again -- or None when it is not there, or you cannot tell (it is then delivered again, once).

    Called only for a destination of your kind, only for messages with such an unanswered earlier delivery. Be
    strict: a message you claim to find that is not there is a message lost. A destination that implements this
    may answer ``Pending(wait, confirmable=True)`` for the messages it can find, so that the poll keeps several
    answers outstanding (see ``postbote.delivery``). Raise ``DeliveryError`` when the destination cannot be asked
    now (the message is deferred). Stops at the first non-None result.
    """


# --- events for observers ---


@hookspec
def poll_started(account: Account) -> None:
    """An account's poll begins (before connecting)."""


@hookspec
def messages_listed(account: Account, count: int, octets: int) -> None:
    """The server's listing was read: ``count`` messages of ``octets`` bytes in all will be fetched this poll."""


@hookspec
def poll_finished(account: Account, stats: PollStats) -> None:
    """An account's poll ended, successfully or not; ``stats`` has the counts, the duration and the error if any."""


@hookspec
def message_delivered(message: Message, account: Account, destinations: list[str]) -> None:
    """A message was delivered to every destination and recorded; ``destinations`` are the deliveries' answers."""


@hookspec
def message_dropped(message: Message, account: Account, reason: str) -> None:
    """A filter dropped a message; it is recorded as handled."""


@hookspec
def message_failed(message: Message, account: Account, error: PostboteError, temporary: bool) -> None:
    """A message could not be handled now; it stays on the server. ``temporary`` False means rejected."""


@hookspec
def account_error(account: Account, error: PostboteError) -> None:
    """An account could not be polled (connection, TLS, login, protocol error); other accounts go on."""
