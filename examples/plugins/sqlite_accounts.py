"""Example postbote plugin: the accounts from a SQLite table, as a provider keeps them (the ``load_accounts`` hook).

Enable it with ``plugin_paths: [examples/plugins]`` and::

    plugins:
      sqlite_accounts:
        database: /var/lib/postbote/accounts.sqlite3   # read-only; table accounts, one row an account
        password_dir: /etc/postbote/passwords          # account NAME's password is the file password_dir/NAME (0600)

The table::

    CREATE TABLE accounts (name TEXT PRIMARY KEY, host TEXT NOT NULL, username TEXT NOT NULL,
                           maildir TEXT NOT NULL, port INTEGER, protocol TEXT);

It holds no secrets: each password is a file of its own, readable by postbote's user only. The rows are read when
postbote starts and again at every reload (``systemctl reload postbote``: SIGHUP), and checked as accounts in the
config file are: a mistake names the database and the row (``accounts.sqlite3:3: accounts[2].port: ...``). The
config's ``defaults:`` apply to them.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from postbote import AccountRows, ConfigError, Problems, Section, hookimpl, path_relative_to

NAME = "sqlite_accounts"


@dataclass(frozen=True)
class Options:
    database: Path | None = None
    password_dir: Path | None = None


def read_options(options, problems, base_dir) -> Options:
    section = Section(options, problems)
    parsed = Options(database=section.get("database", path_relative_to(base_dir), None, required=True),
                     password_dir=section.get("password_dir", path_relative_to(base_dir), None, required=True))
    section.finish()
    return parsed


@hookimpl
def parse_plugin_options(name, options, problems, base_dir):
    if name != NAME:
        return None
    return read_options(options, problems, base_dir) if options.value else Options()


@hookimpl
def load_accounts(name, options, base_dir):
    if name != NAME:
        return None
    problems = Problems("postbote.yaml")
    settings = read_options(options, problems, base_dir)
    problems.raise_if_any()
    try:
        with sqlite3.connect(f"file:{settings.database}?mode=ro", uri=True) as database:
            rows = database.execute("SELECT rowid, name, host, username, maildir, port, protocol FROM accounts "
                                    "ORDER BY rowid").fetchall()
    except sqlite3.Error as exc:
        raise ConfigError(f"plugins.{NAME}: cannot read the accounts in {settings.database}: {exc}") from None
    return AccountRows(str(settings.database), [(rowid, account(settings, *row)) for rowid, *row in rows])


def account(settings: Options, name, host, username, maildir, port, protocol) -> dict:
    """One row as an account mapping of the config: NULL columns are left out (postbote's defaults apply)."""
    entry = {"name": name, "host": host, "username": username,
             "password_file": str(settings.password_dir / str(name)), "deliver": {"maildir": maildir}}
    if port is not None:
        entry["port"] = port
    if protocol is not None:
        entry["protocol"] = protocol
    return entry
