"""Declarative filtering from the config: ``plugins: {rules: {...}}``, globally and/or per account.

Config shape::

    plugins:
      rules:
        stop: first            # first: the first matching rule ends the rules (default)
                               # all: every matching rule applies; drop and accept still end the rules
        rules:
          - name: newsletters                        # optional; shown in logs and drop reasons (default "#1", "#2", …)
            match: {header: List-Id, regex: "news\\.example\\.com"}
            action: drop
          - match: {sender: "@spam.example"}
            action: {tag: {header: "X-Postbote-Rule: spam", subject_prefix: "[SPAM] "}}
          - match: {recipient: {exact: bob@example.org}}
            action: {reroute: [bob@localhost]}
          - match: {size_over: 10MB}
            action: {deliver: {maildir: /srv/mail/big}}
          - match: {all: [{header: Subject, regex: "^\\[list\\]"}, {not: {sender: boss@example.org}}]}
            action: [{tag: {header: "X-List: yes"}}, accept]

Conditions (several keys in one ``match`` mapping must all hold):

* ``header: NAME`` with one of ``regex:``, ``exact:``, ``contains:`` (none: the field is present). The field name is
  case-insensitive; the value is unfolded and RFC 2047-decoded; any of several fields of that name may match.
* ``sender: TEXT`` (substring) or ``sender: {regex|exact|contains: TEXT}``: the Return-Path or a From address.
* ``recipient: …`` likewise, on the addresses in To, Cc, Delivered-To, X-Original-To, Envelope-To, X-Envelope-To.
* ``size_over: SIZE`` / ``size_under: SIZE`` (``512kB``, ``10MB``, ``1GiB``).
* ``all: [MATCH, …]``, ``any: [MATCH, …]``, ``not: MATCH``.

All text comparisons ignore case (as Sieve and procmail do); write ``(?-i:…)`` in a regex to match case.

Actions: ``drop``, ``accept`` (deliver now, skipping the remaining filters), ``{tag: {header: "Name: value" or a list,
subject_prefix: TEXT}}``, ``{reroute: [ADDRESS, …]}`` (envelope recipients for SMTP/LMTP destinations) and
``{deliver: DESTINATION or [DESTINATION, …]}`` (replaces the account's ``deliver:``). ``action`` is one action or a
list of them; ``drop`` stands alone and ``accept`` may only come last. Reroutes and delivers of several matching rules
(``stop: all``) add up. Everything is validated when the config is loaded.

Header values from the wild are often broken (8-bit bytes, unknown charsets, bad base64): matching decodes what it
can and treats the rest as raw text, so a bad header can never fail a poll.
"""

from __future__ import annotations

import difflib
import email.errors
import email.header
import email.utils
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import pluggy
from postbote import (
    Account,
    Destination,
    Message,
    Node,
    Problems,
    Section,
    Verdict,
    choice,
    describe,
    get_logger,
    hookimpl,
    nonempty_text,
    parse_destination_entry,
    size,
    text_list,
)
from postbote.plugins.smtp import addresses

PLUGIN_NAME = "rules"
RULE_KEYS = {"name", "match", "action"}


class TextTestKind(StrEnum):
    """How a condition compares text: ``{regex: …}``, ``{exact: …}``, ``{contains: …}`` (the default)."""

    REGEX = "regex"
    EXACT = "exact"
    CONTAINS = "contains"


class FinalWord(StrEnum):
    """The actions that end the filtering: ``drop`` (the message is not delivered) and ``accept``."""

    DROP = "drop"
    ACCEPT = "accept"


class ActionKind(StrEnum):
    """The actions given as a mapping, which change the message and let the filtering go on."""

    TAG = "tag"
    REROUTE = "reroute"
    DELIVER = "deliver"


class StopMode(StrEnum):
    """``stop: first``: the first matching rule ends the rules; ``stop: all``: every matching rule applies."""

    FIRST = "first"
    ALL = "all"


# The spellings, as plain text for the messages that list them.
TEXT_TESTS = tuple(kind.value for kind in TextTestKind)
CONDITION_KEYS = {"header", *TEXT_TESTS, "sender", "recipient", "size_over", "size_under", "all", "any", "not"}
ACTION_WORDS = tuple(word.value for word in FinalWord)
ACTION_KINDS = tuple(kind.value for kind in ActionKind)
RECIPIENT_FIELDS = ("to", "cc", "delivered-to", "x-original-to", "envelope-to", "x-envelope-to")
STOP_MODES = tuple(mode.value for mode in StopMode)

_FIELD_NAME = re.compile(r"[!-9;-~]+")
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([qQbB])\?([^?\s]*)\?=")
_FOLD = re.compile(r"\r?\n(?=[ \t])")

log = get_logger("postbote.rules")


# --- reading header fields tolerantly ---


def raw_text(value: str) -> str:
    """A header value as text: the parser keeps 8-bit bytes as surrogates; read them as UTF-8, else Latin-1."""
    if value.isascii():
        return value
    try:
        data = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        data = value.encode("utf-8", "replace")
    return bytes_as_text(data)


def bytes_as_text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def decode_words(value: str) -> str:
    """Unfold ``value`` and decode its RFC 2047 encoded words; a word that cannot be decoded stays as it is."""
    text = _FOLD.sub("", raw_text(value))
    pieces: list[str] = []
    position = 0
    previous_was_word = False
    for match in _ENCODED_WORD.finditer(text):
        between = text[position:match.start()]
        if not (previous_was_word and not between.strip()):
            pieces.append(between)
        decoded = _decode_word(match.group(0), match.group(1))
        pieces.append(decoded if decoded is not None else match.group(0))
        previous_was_word = decoded is not None
        position = match.end()
    pieces.append(text[position:])
    return "".join(pieces)


def _decode_word(word: str, charset: str) -> str | None:
    try:
        ((payload, _),) = email.header.decode_header(word)
    except (email.errors.HeaderParseError, ValueError):
        return None
    if isinstance(payload, str):
        return payload
    try:
        return payload.decode(charset.split("*", 1)[0], "replace")
    except (LookupError, ValueError):
        return bytes_as_text(payload)


def field_values(message: Message, name: str) -> list[str]:
    """The raw values of every field called ``name`` (any case), 8-bit bytes kept as surrogates.

    ``raw_items`` rather than ``get_all``: the latter wraps 8-bit values in ``Header`` objects that replace the
    bytes with U+FFFD, losing what a rule might want to match.
    """
    wanted = name.lower()
    return [value for field_name, value in message.headers.raw_items() if field_name.lower() == wanted]


def address_candidates(values: Iterable[str]) -> list[str]:
    """The addresses in address fields; the whole decoded value as well when no address can be made out."""
    candidates: list[str] = []
    for value in values:
        text = _FOLD.sub("", raw_text(value))
        found = [address for _, address in email.utils.getaddresses([text]) if address]
        candidates.extend(found)
        if not any("@" in address for address in found) and text.strip():
            candidates.append(decode_words(text).strip())
    return candidates


class Facts:
    """What conditions look at, worked out once per message (and again after a rule edits the header)."""

    def __init__(self, message: Message) -> None:
        self.message = message
        self._headers: dict[str, list[str]] = {}
        self._senders: list[str] | None = None
        self._recipients: list[str] | None = None

    def header(self, name: str) -> list[str]:
        key = name.lower()
        if key not in self._headers:
            self._headers[key] = [decode_words(value).strip() for value in field_values(self.message, key)]
        return self._headers[key]

    @property
    def senders(self) -> list[str]:
        if self._senders is None:
            return_path = [_without_brackets(raw_text(v)) for v in field_values(self.message, "return-path")[:1]]
            self._senders = [p for p in return_path if p] + address_candidates(field_values(self.message, "from"))
        return self._senders

    @property
    def recipients(self) -> list[str]:
        if self._recipients is None:
            self._recipients = address_candidates(
                value for name in RECIPIENT_FIELDS for value in field_values(self.message, name))
        return self._recipients

    @property
    def size(self) -> int:
        return self.message.size


def _without_brackets(value: str) -> str:
    value = _FOLD.sub("", value).strip()
    if value.startswith("<") and ">" in value:
        value = value[1:value.index(">")]
    return value.strip()


# --- conditions ---


class Condition(Protocol):
    def matches(self, facts: Facts) -> bool: ...


TextTest = Callable[[str], bool]


@dataclass(frozen=True)
class HeaderCondition:
    name: str
    test: TextTest | None

    def matches(self, facts: Facts) -> bool:
        values = facts.header(self.name)
        if self.test is None:
            return bool(values)
        return any(self.test(value) for value in values)


@dataclass(frozen=True)
class AddressCondition:
    which: str  # "senders" or "recipients"
    test: TextTest

    def matches(self, facts: Facts) -> bool:
        return any(self.test(address) for address in getattr(facts, self.which))


@dataclass(frozen=True)
class SizeCondition:
    limit: int
    over: bool

    def matches(self, facts: Facts) -> bool:
        return facts.size > self.limit if self.over else facts.size < self.limit


@dataclass(frozen=True)
class AllOf:
    parts: tuple[Condition, ...]

    def matches(self, facts: Facts) -> bool:
        return all(part.matches(facts) for part in self.parts)


@dataclass(frozen=True)
class AnyOf:
    parts: tuple[Condition, ...]

    def matches(self, facts: Facts) -> bool:
        return any(part.matches(facts) for part in self.parts)


@dataclass(frozen=True)
class Not:
    part: Condition

    def matches(self, facts: Facts) -> bool:
        return not self.part.matches(facts)


# --- actions ---


@dataclass(frozen=True)
class Tag:
    headers: tuple[tuple[str, str], ...]
    subject_prefix: str | None

    def describe(self) -> str:
        return "tag"


@dataclass(frozen=True)
class Reroute:
    recipients: tuple[str, ...]

    def describe(self) -> str:
        return "reroute"


@dataclass(frozen=True)
class Deliver:
    destinations: tuple[Destination, ...]

    def describe(self) -> str:
        return "deliver"


@dataclass(frozen=True)
class Final:
    """``drop`` or ``accept``: ends the filtering."""

    word: FinalWord

    def describe(self) -> str:
        return self.word.value


Action = Tag | Reroute | Deliver | Final


@dataclass(frozen=True)
class Rule:
    name: str
    condition: Condition
    actions: tuple[Action, ...]


@dataclass(frozen=True)
class RulesOptions:
    rules: tuple[Rule, ...]
    stop: StopMode = StopMode.FIRST


# --- parsing the options ---


@dataclass
class _Reader:
    """What every parser below needs: where to report, and how to read delivery targets."""

    problems: Problems
    base_dir: Path
    pm: pluggy.PluginManager

    def problem(self, node: Node, message: str) -> None:
        self.problems.add(node.line, node.path, message)


@hookimpl
def parse_plugin_options(name: str, options: Node, problems: Problems, base_dir: Path,
                         pluginmanager: pluggy.PluginManager) -> RulesOptions | None:
    if name != PLUGIN_NAME:
        return None
    reader = _Reader(problems, base_dir, pluginmanager)
    section = Section(options, problems, what="a mapping with rules: [...]")
    stop = StopMode(section.get("stop", choice(*STOP_MODES), StopMode.FIRST))
    rules_node = section.raw("rules")
    section.finish({"rules", "stop"})
    if rules_node is None or rules_node.value is None:
        problems.add(section.line, f"{section.path}.rules", "required key is missing: list the rules, "
                     "e.g. rules: [{match: {sender: '@spam.example'}, action: drop}]")
        return RulesOptions((), stop)
    if not isinstance(rules_node.value, list) or not rules_node.value:
        reader.problem(rules_node, f"expected a non-empty list of rules, got {describe(rules_node.value)}")
        return RulesOptions((), stop)
    rules = [rule for index, item in enumerate(rules_node.value) if (rule := _rule(item, index, reader))]
    return RulesOptions(tuple(rules), stop)


def _rule(node: Node, index: int, reader: _Reader) -> Rule | None:
    section = Section(node, reader.problems, what="a rule mapping with match: and action:")
    name = section.get("name", nonempty_text, f"#{index + 1}")
    match_node, action_node = section.raw("match"), section.raw("action")
    section.finish(RULE_KEYS)
    for key, given in (("match", match_node), ("action", action_node)):
        if isinstance(node.value, dict) and (given is None or given.value is None):
            reader.problems.add(node.line, f"{node.path}.{key}", "required key is missing")
    condition = _condition(match_node, reader) if match_node is not None and match_node.value is not None else None
    actions = _actions(action_node, reader) if action_node is not None and action_node.value is not None else None
    if condition is None or not actions:
        return None
    return Rule(name, condition, actions)


def _condition(node: Node, reader: _Reader) -> Condition | None:
    before = reader.problems.reported
    section = Section(node, reader.problems, what="a mapping of conditions, e.g. {header: Subject, regex: ...}")
    parts = [part for part in _condition_parts(section, reader) if part is not None]
    section.finish(CONDITION_KEYS)
    if reader.problems.reported > before:
        return None
    if not parts:
        reader.problem(node, f"expected at least one condition: {', '.join(sorted(CONDITION_KEYS - set(TEXT_TESTS)))}")
        return None
    return parts[0] if len(parts) == 1 else AllOf(tuple(parts))


def _condition_parts(section: Section, reader: _Reader) -> list[Condition | None]:
    parts: list[Condition | None] = []
    if "header" in section:
        parts.append(_header_condition(section, reader))
    elif given := [key for key in TEXT_TESTS if key in section]:
        section.problem(f"{given[0]}: needs header: NAME beside it (for senders and recipients write "
                        f"sender: {{{given[0]}: ...}})", section.raw(given[0]))
    for key, which in (("sender", "senders"), ("recipient", "recipients")):
        if key in section:
            test = _address_test(section.present(key), reader)
            parts.append(AddressCondition(which, test) if test else None)
    for key, over in (("size_over", True), ("size_under", False)):
        if key in section:
            limit = section.get(key, size)
            parts.append(SizeCondition(limit, over) if limit is not None else None)
    for key, combine in (("all", AllOf), ("any", AnyOf)):
        if key in section:
            parts.append(_combination(section.present(key), combine, reader))
    if "not" in section:
        inner = _condition(section.present("not"), reader)
        parts.append(Not(inner) if inner is not None else None)
    return parts


def _header_condition(section: Section, reader: _Reader) -> HeaderCondition | None:
    name = section.get("header", _field_name)
    given = [key for key in TEXT_TESTS if key in section]
    if len(given) > 1:
        section.problem(f"give at most one of {', '.join(TEXT_TESTS)} (found {', '.join(given)})")
        return None
    test = _text_test(TextTestKind(given[0]), section.present(given[0]), reader) if given else None
    if name is None or (given and test is None):
        return None
    return HeaderCondition(name, test)


def _address_test(node: Node, reader: _Reader) -> TextTest | None:
    if not isinstance(node.value, dict):
        return _text_test(TextTestKind.CONTAINS, node, reader)
    section = Section(node, reader.problems)
    given = [key for key in TEXT_TESTS if key in section]
    section.finish(set(TEXT_TESTS))
    if len(given) != 1:
        reader.problem(node, f"expected a text (a substring) or a mapping with exactly one of {', '.join(TEXT_TESTS)}")
        return None
    return _text_test(TextTestKind(given[0]), section.present(given[0]), reader)


def _text_test(kind: TextTestKind, node: Node, reader: _Reader) -> TextTest | None:
    try:
        wanted = nonempty_text(node.value)
    except ValueError as exc:
        reader.problem(node, f"{exc}, got {describe(node.value)}")
        return None
    if kind is TextTestKind.REGEX:
        try:
            pattern = re.compile(wanted, re.IGNORECASE)
        except re.error as exc:
            reader.problem(node, f"invalid regular expression: {exc}")
            return None
        return lambda value: pattern.search(value) is not None
    folded = wanted.casefold()
    if kind is TextTestKind.EXACT:
        return lambda value: value.casefold() == folded
    return lambda value: folded in value.casefold()


def _combination(node: Node, combine: type[AllOf] | type[AnyOf], reader: _Reader) -> Condition | None:
    if not isinstance(node.value, list) or not node.value:
        reader.problem(node, f"expected a non-empty list of conditions, got {describe(node.value)}")
        return None
    parts = [_condition(item, reader) for item in node.value]
    if any(part is None for part in parts):
        return None
    return combine(tuple(part for part in parts if part is not None))


def _field_name(value: Any) -> str:
    name = nonempty_text(value).strip()
    if not _FIELD_NAME.fullmatch(name):
        raise ValueError("expected a header field name such as List-Id (no spaces or colons)")
    return name


def _actions(node: Node, reader: _Reader) -> tuple[Action, ...] | None:
    items = node.value if isinstance(node.value, list) else [node]
    if not items:
        reader.problem(node, "expected an action or a non-empty list of actions")
        return None
    actions = [_action(item, reader) for item in items]
    if any(action is None for action in actions):
        return None
    words = [(index, action.word) for index, action in enumerate(actions) if isinstance(action, Final)]
    if len(actions) > 1 and any(word is FinalWord.DROP for _, word in words):
        reader.problem(node, "drop cannot be combined with other actions")
        return None
    if words and [index for index, _ in words] != [len(actions) - 1]:
        reader.problem(node, "accept can only be the last action")
        return None
    return tuple(action for action in actions if action is not None)


def _action(node: Node, reader: _Reader) -> Action | None:
    expected = f"expected {' or '.join(ACTION_WORDS)}, or a mapping with one of {', '.join(ACTION_KINDS)}"
    if isinstance(node.value, str):
        word = node.value.strip().lower()
        if word in ACTION_WORDS:
            return Final(FinalWord(word))
        close = difflib.get_close_matches(word, [*ACTION_WORDS, *ACTION_KINDS], n=1)
        reader.problem(node, f"{expected}, got {node.value!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        return None
    if not isinstance(node.value, dict) or len(node.value) != 1:
        reader.problem(node, f"{expected}, got {describe(node.value)}"
                       + (" (give several actions as a list)" if isinstance(node.value, dict) and node.value else ""))
        return None
    ((kind, options),) = node.value.items()
    if kind == ActionKind.TAG:
        return _tag(options, reader)
    if kind == ActionKind.REROUTE:
        return _reroute(options, reader)
    if kind == ActionKind.DELIVER:
        return _deliver(options, reader)
    Section(node, reader.problems).finish(set(ACTION_KINDS))
    return None


def _tag(node: Node, reader: _Reader) -> Tag | None:
    before = reader.problems.reported
    section = Section(node, reader.problems, what="a mapping with header: and/or subject_prefix:")
    headers = section.get("header", _tag_headers, None)
    prefix = section.get("subject_prefix", nonempty_text, None)
    section.finish({"header", "subject_prefix"})
    if reader.problems.reported > before:
        return None
    if headers is None and prefix is None:
        reader.problem(node, "expected header: \"Name: value\" and/or subject_prefix: TEXT")
        return None
    return Tag(tuple(headers or ()), prefix)


def _tag_headers(value: Any) -> list[tuple[str, str]]:
    fields = []
    for text in text_list(value):
        name, colon, field_value = text.partition(":")
        if not colon:
            raise ValueError('expected "Name: value" header fields')
        fields.append((_field_name(name), field_value.strip()))
    return fields


def _reroute(node: Node, reader: _Reader) -> Reroute | None:
    try:
        return Reroute(tuple(addresses(node.value)))
    except ValueError as exc:
        reader.problem(node, f"{exc} (the new envelope recipients), got {describe(node.value)}")
        return None


def _deliver(node: Node, reader: _Reader) -> Deliver | None:
    entries = node.value if isinstance(node.value, list) else [node]
    if not entries:
        reader.problem(node, "expected at least one destination")
        return None
    before = reader.problems.reported
    destinations = [parse_destination_entry(entry, reader.problems, reader.pm, reader.base_dir) for entry in entries]
    if reader.problems.reported > before or any(d is None for d in destinations):
        return None
    return Deliver(tuple(d for d in destinations if d is not None))


# --- applying the rules ---


@dataclass
class _Run:
    """One message going through the rules; reroutes and delivers of several matching rules add up."""

    message: Message
    facts: Facts = field(init=False)
    rerouted: list[str] = field(default_factory=list)
    delivered_to: list[Destination] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.facts = Facts(self.message)

    def apply(self, rule: Rule) -> Verdict | None:
        for action in rule.actions:
            if isinstance(action, Final):
                return Verdict.drop(f"rule {rule.name}") if action.word is FinalWord.DROP else Verdict.accept()
            if isinstance(action, Tag):
                self._tag(action)
            elif isinstance(action, Reroute):
                self.rerouted += [r for r in action.recipients if r not in self.rerouted]
                self.message.recipients = list(self.rerouted)
            elif isinstance(action, Deliver):
                self.delivered_to += action.destinations
                self.message.destinations = list(self.delivered_to)
        return None

    def _tag(self, tag: Tag) -> None:
        for name, value in tag.headers:
            self.message.add_header(name, _header_safe(value))
        if tag.subject_prefix is not None:
            prefix_subject(self.message, tag.subject_prefix)
        self.facts = Facts(self.message)


def prefix_subject(message: Message, prefix: str) -> None:
    """Put ``prefix`` before the Subject, once: a subject that already starts with it is left alone.

    The rest of the subject keeps its encoded words as they were; only 8-bit bytes in it (not allowed there) are
    rewritten, as UTF-8.
    """
    values = field_values(message, "subject")
    if not values:
        message.add_header("Subject", _header_safe(prefix.strip()))
        return
    if decode_words(values[0]).strip().casefold().startswith(prefix.strip().casefold()):
        return
    message.replace_header("Subject", _joined(prefix, raw_text(values[0])))


def _joined(prefix: str, subject: str) -> str:
    """``prefix`` + ``subject`` as a raw field value, keeping the whitespace RFC 2047 decoders would swallow."""
    head = prefix.rstrip()
    gap = prefix[len(head):]
    if not subject.strip():
        return _header_safe(head)
    starts_encoded = _ENCODED_WORD.match(subject) is not None
    if head.isascii():
        return f"{head}{gap or (' ' if starts_encoded else '')}{subject}"
    if starts_encoded:
        return f"{_header_safe(prefix)} {subject}"
    return f"{_header_safe(head)}{gap or ' '}{subject}"


def _header_safe(value: str) -> str:
    """Non-ASCII text as an RFC 2047 encoded word, so tags never put 8-bit bytes in a header."""
    return value if value.isascii() else email.header.Header(value, "utf-8").encode()


@hookimpl
def filter_message(message: Message, account: Account) -> Verdict | None:
    options: RulesOptions | None = account.options_for(PLUGIN_NAME)
    if options is None:
        return None
    run = _Run(message)
    for rule in options.rules:
        if not rule.condition.matches(run.facts):
            continue
        log.info("rule.matched", rule=rule.name, actions=[action.describe() for action in rule.actions])
        verdict = run.apply(rule)
        if verdict is not None or options.stop is StopMode.FIRST:
            return verdict
    return None
