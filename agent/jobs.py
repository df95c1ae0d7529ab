"""What ``postbote poll`` and ``postbote run`` share: how plugins are started, the boundary around one account's
poll, and what the polls' outcome means for the exit status.

Both commands go through here so that they cannot drift apart: a plugin that cannot start is one line and exit
status 2 for both (the systemd unit's ``RestartPreventExitStatus=2`` relies on it), and a bug in one account's poll
is one ``poll.crashed`` event, a failed account and exit status 1 for both, while the other accounts are polled.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from postbote.errors import ConfigError, PostboteError

if TYPE_CHECKING:
    import pluggy
    from postbote.config import Account, Config
    from postbote.poll import PollStats
    from postbote.poller import Poller
    from postbote.state_postgres import LeaseKeeper


class ExitStatus(enum.IntEnum):
    OK = 0  # every listed message delivered, dropped by a filter, or left on purpose
    FAILED = 1  # some message deferred or rejected, or some account failed
    USAGE = 2  # usage or configuration error (not worth restarting)


class PollVerdict(enum.StrEnum):
    """What one account's poll means for whoever watches the exit status."""

    CLEAN = "clean"  # nothing needs anyone's attention
    WAITING = "waiting"  # the poll worked, but some message was deferred or rejected: it waits on the server
    FAILED = "failed"  # the account could not be polled (connection, login, protocol, a crash)


def verdict(stats: PollStats) -> PollVerdict:
    if not stats.ok:
        return PollVerdict.FAILED
    if stats.deferred or stats.rejected:
        return PollVerdict.WAITING
    return PollVerdict.CLEAN


def exit_status(results: Iterable[PollStats | None]) -> ExitStatus:
    """0 only when every poll was clean; ``None`` stands for an account not polled because a stop was asked for."""
    clean = all(stats is None or verdict(stats) is PollVerdict.CLEAN for stats in results)
    return ExitStatus.OK if clean else ExitStatus.FAILED


# --- plugins


def start_plugins(pm: pluggy.PluginManager, config: Config) -> None:
    """Call every plugin's ``configure``; a plugin that raises is a start-up error naming it (exit status 2)."""
    try:
        pm.hook.configure.call_historic(kwargs={"config": config})
    except PostboteError:
        raise
    except Exception as exc:  # noqa: BLE001 - a plugin that cannot start is a start-up error, named, exit 2
        from postbote.pluginmanager import culprit

        plugin = culprit(pm.hook.configure, exc)
        raise ConfigError(f"plugin {plugin!r} failed to start (configure): "
                          f"{_redacted(f'{type(exc).__name__}: {exc}')}") from None


def keep_out_of_the_collector() -> None:
    """Move everything made so far -- modules, the config, the plugins -- to the permanent generation
    (`gc.freeze`): the cyclic garbage collector then never walks it again, which it otherwise does in every full
    collection that a poll's allocations trigger (9 % of an SMTP poll's CPU, measured in-process over 2,000
    messages). Objects are still freed by reference counting; only cycles among them would stay, and start-up
    makes few. Called once the job is set up, by ``poll`` and by the daemon (again after a reload)."""
    import gc

    gc.freeze()


@contextmanager
def plugins_started(pm: pluggy.PluginManager, config: Config) -> Iterator[None]:
    """Plugins configured for the duration of the block, and unconfigured after it."""
    start_plugins(pm, config)
    try:
        yield
    finally:
        pm.hook.unconfigure(config=config)


# --- one account's poll


def poll_guarded(poller: Poller, account: Account) -> PollStats:
    """``poller.poll(account)``, with any unexpected exception (a bug, a plugin raising outside the per-message
    boundary) turned into a failed poll of this account: logged once as ``poll.crashed`` with the exception's text
    and where it was raised, never with frame locals (they can hold a password), and remembered in the state store
    so that ``postbote status`` shows it. Never raises an `Exception`."""
    import structlog
    from postbote.poll import PollStats

    started = time.monotonic()
    try:
        return poller.poll(account)
    except Exception as exc:  # noqa: BLE001 - a bug in one account's poll must not stop the other accounts
        error = f"internal error: {_redacted(f'{type(exc).__name__}: {exc}')}"
        structlog.get_logger("postbote.poll").error("poll.crashed", account=account.name, error=error,
                                                    where=_where(exc))
        stats = PollStats(account.name, error=error, duration=round(time.monotonic() - started, 3))
        _remember_crash(poller, stats)
        return stats


def poll_leased(poller: Poller, account: Account, leases: LeaseKeeper) -> PollStats | None:
    """`poll_guarded` under the account's lease in a shared state store (``postbote poll`` beside running
    workers): None, and nothing done, when a worker holds the lease -- it is polling the account right now. A lease
    that cannot be taken or given back (the database is away) fails this account's poll, like any state failure."""
    import structlog
    from postbote.poll import PollStats

    logger = structlog.get_logger("postbote.poll")
    try:
        with leases.leased(account.name, account.poll_interval) as holder:
            if holder is not None:
                logger.info("poll.skipped", account=account.name, held_by=holder.worker,
                            reason="a worker is polling this account now")
                return None
            return poll_guarded(poller, account)
    except PostboteError as exc:
        error = _redacted(str(exc))
        logger.error("account.failed", account=account.name, error=error, error_type=type(exc).__name__)
        return PollStats(account.name, error=error)


def _remember_crash(poller: Poller, stats: PollStats) -> None:
    """Record the crashed poll as failed (its messages' counts were already added, if the poller got that far)."""
    import structlog

    try:
        poller.store.record_poll(stats.account, ok=False, duration=stats.duration, counts={}, error=stats.error)
    except Exception as exc:  # noqa: BLE001 - the crash is what to report; the store's trouble is logged
        structlog.get_logger("postbote.poll").error("state.poll_not_recorded", account=stats.account,
                                                    error=_redacted(str(exc)))


def _where(exc: BaseException) -> str:
    """``file:line in function`` of the innermost frame: enough to find the bug, with no variable's value."""
    frame = exc.__traceback__
    if frame is None:
        return "unknown"
    while frame.tb_next is not None:
        frame = frame.tb_next
    code = frame.tb_frame.f_code
    return f"{code.co_filename}:{frame.tb_lineno} in {code.co_name}"


def _redacted(text: str) -> str:
    """``text`` without the secrets postbote knows of: an exception's text may quote a password."""
    from postbote.credentials import redact

    return redact(text)
