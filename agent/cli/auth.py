"""``postbote auth ACCOUNT``: the one-time authorization of an account (an OAuth2 flow that stores a refresh token),
run by the plugin whose account it is (the ``authorize`` hook)."""

from __future__ import annotations

import argparse
import sys

from postbote.cli.startup import set_up
from postbote.errors import ConfigError


def run(args: argparse.Namespace) -> int:
    pm, config = set_up(args)
    account = config.account(args.account)
    destination = getattr(args, "destination", None)
    status = pm.hook.authorize(account=account, state_dir=config.state_dir, out=sys.stdout, flow=args.flow,
                               open_browser=not args.no_browser, destination=destination)
    if status is None:
        if destination is not None:
            labels = ", ".join(d.label for d in account.destinations)
            raise ConfigError(f"account {account.name} has no destination {destination!r} that logs in with OAuth2 "
                              f"(its destinations: {labels})")
        raise ConfigError(f"account {account.name} has nothing to authorize (its protocol {account.protocol} "
                          "needs no postbote auth)")
    return int(status)
