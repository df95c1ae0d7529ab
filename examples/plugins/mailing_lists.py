"""Example postbote plugin: tag mailing-list mail and drop newsletters.

Enable it with ``plugin_paths: [examples/plugins]`` and, optionally, options::

    plugins:
      mailing_lists:
        drop_from: [news@shop.example]   # drop mail from these senders
        prefix: "[{list}] "               # subject prefix for list mail; {list} is the List-Id's name
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from postbote import Message, Section, Verdict, hookimpl, nonempty_text, text_list

_LIST_NAME = re.compile(r"<([^.>]+)")


@dataclass(frozen=True)
class Options:
    drop_from: tuple[str, ...] = ()
    prefix: str = "[{list}] "


@hookimpl
def parse_plugin_options(name, options, problems):
    if name != "mailing_lists":
        return None
    section = Section(options, problems)
    parsed = Options(drop_from=tuple(a.lower() for a in section.get("drop_from", text_list, [])),
                     prefix=section.get("prefix", nonempty_text, Options.prefix))
    section.finish()
    return parsed


@hookimpl
def filter_message(message: Message, account):
    options: Options = account.options_for("mailing_lists") or Options()
    sender = (message.get_header("From") or "").lower()
    if any(address in sender for address in options.drop_from):
        return Verdict.drop(f"newsletter from {sender.strip()}")
    list_id = message.get_header("List-Id")
    if list_id and (match := _LIST_NAME.search(list_id)):
        prefix = options.prefix.format(list=match.group(1))
        subject = message.get_header("Subject") or ""
        if not subject.startswith(prefix):
            message.replace_header("Subject", prefix + subject)
    return None
