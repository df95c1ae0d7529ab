"""Exception types, one per boundary where postbote catches them.

Each error carries a message meant for the admin as it is: the CLI prints it on one line, the poll loop logs it
with the account (and UID) bound, and nobody needs a traceback to know what went wrong.
"""

from __future__ import annotations


class PostboteError(Exception):
    """Base of every error postbote reports to the user without a traceback."""


class ConfigError(PostboteError):
    """The configuration is invalid; ``problems`` holds one line per mistake (file:line: key: what was expected)."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class StateLockedError(PostboteError):
    """Another postbote process holds the state directory."""


class StateError(PostboteError):
    """The state database cannot be opened or written: nothing may be deleted on the server."""


class CredentialError(PostboteError):
    """A password source (file, command, environment) could not produce a secret."""


class AccountError(PostboteError):
    """The account cannot be polled now (connection, TLS, login, protocol). Logged; other accounts go on."""


class LoginRefused(AccountError):
    """The server refused the login (a wrong password, a revoked token): a source plugin's login errors derive from
    it, so that the daemon reports a streak of refused logins once, whatever the protocol."""


class DeliveryError(PostboteError):
    """A destination did not take the message.

    ``temporary`` errors (4xx replies, connection trouble, exit 75) leave the message on the server to be retried on
    the next poll; permanent ones (5xx) leave it on the server too, but mark it rejected so it is not retried every
    poll.
    """

    def __init__(self, reason: str, *, temporary: bool, accepted: tuple[str, ...] = (), in_doubt: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.temporary = temporary
        self.accepted = accepted  # recipients that did take the message (a partial LMTP success)
        # The whole message went out and the answer was lost (the connection broke, the reply was garbage): the
        # destination may have it. Its "in flight" note is kept, so that a retry is counted as a possible second
        # copy and the message is held after that instead of being delivered again on every poll.
        self.in_doubt = in_doubt


class PluginError(PostboteError):
    """A plugin raised while handling a message; names the plugin and the hook."""

    def __init__(self, plugin: str, hook: str, error: BaseException) -> None:
        super().__init__(f"plugin {plugin!r} failed in {hook}: {type(error).__name__}: {error}")
        self.plugin = plugin
        self.hook = hook
        self.error = error


PSYCOPG_MISSING = ("a PostgreSQL state needs the driver psycopg 3, which is not installed (pip install "
                   "'psycopg[binary]>=3.1' beside postbote, or install postbote with its extra: pip install "
                   "'.[postgresql]' in its checkout)")
"""What the config and the PostgreSQL store say when the optional driver is missing (postbote is on no index)."""
