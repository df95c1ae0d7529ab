"""``postbote run``: poll every account at its ``poll_interval`` until told to stop.

A private `schedule.Scheduler` holds one job per account. Signals only set flags; the loop notices them between
jobs and the poller between messages, so a stop never interrupts a message half handed on.
"""

from __future__ import annotations

import random
import threading
from datetime import datetime, timedelta

import pluggy
import schedule
import structlog

from agent.cli import stop_on_signals
from agent.config import Account, Config
from agent.poller import Poller
from agent.state import StateStore

log = structlog.get_logger("postbote.daemon")
MAX_SLEEP = 60.0
START_JITTER = 5.0


class Daemon:
    def __init__(self, pm: pluggy.PluginManager, config: Config, store: StateStore,
                 stop: threading.Event | None = None) -> None:
        self.config = config
        self.stop = stop or threading.Event()
        self.poller = Poller(pm, store, self.stop)
        self.scheduler = schedule.Scheduler()
        for account in config.accounts:
            job = self.scheduler.every(account.poll_interval).seconds.do(self._poll, account)
            # Start soon, spread a little, so that many accounts do not all connect in the same second.
            job.next_run = datetime.now() + timedelta(seconds=random.uniform(0, min(START_JITTER, account.poll_interval)))

    def run(self) -> int:
        log.info("daemon.started", accounts=len(self.config.accounts), config=str(self.config.path))
        with stop_on_signals(self.stop):
            while not self.stop.is_set():
                self.scheduler.run_pending()
                idle = self.scheduler.idle_seconds
                self.stop.wait(MAX_SLEEP if idle is None else min(max(idle, 0.0), MAX_SLEEP))
        log.info("daemon.stopped")
        return 0

    def _poll(self, account: Account) -> None:
        if self.stop.is_set():
            return
        structlog.contextvars.clear_contextvars()
        try:
            self.poller.poll(account)
        except Exception:  # noqa: BLE001 - schedule does not catch; one account's bug must not end the daemon
            log.exception("poll.crashed", account=account.name)
