"""``postbote auth ACCOUNT``: the one-time OAuth2 authorization of an account (`postbote.authcli.run_auth`)."""

from __future__ import annotations

import argparse
import sys

from postbote.cli.startup import set_up


def run(args: argparse.Namespace) -> int:
    from postbote.authcli import run_auth
    from postbote.login import AuthSettings

    _pm, config = set_up(args)
    settings = AuthSettings.from_account(config.account(args.account), config.state_dir)
    return run_auth(settings, sys.stdout, flow=args.flow, open_browser=not args.no_browser)
