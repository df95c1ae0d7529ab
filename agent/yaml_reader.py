"""Typed reading of YAML with file and line numbers, so that every config mistake can be named precisely.

`load_yaml` turns a document into `Node`s that remember their line and key path. A `Section` wraps one mapping
and hands out typed values (`section.get("port", port_number)`); a bad value is recorded as a problem and the
reading goes on, so that one run of ``postbote check`` reports every mistake at once. Built-in and third-party
plugins read their own options with the same `Section`, so their errors look the same as the core's.
"""

from __future__ import annotations

import datetime
import functools
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from postbote.errors import ConfigError

T = TypeVar("T")
Parser = Callable[[Any], T]


@dataclass(slots=True)
class Node:
    """A value read from YAML: scalars as Python values, mappings as ``dict[str, Node]``, lists as ``list[Node]``."""

    value: Any
    line: int
    path: str


def node_of(value: Any, line: int, path: str) -> Node:
    """``value`` (scalars, lists, mappings with str keys) as a `Node` tree, every node on ``line``: config read from
    somewhere else than YAML (a database row) and checked as YAML is, its mistakes named by that line."""
    if isinstance(value, dict):
        return Node({str(key): node_of(item, line, f"{path}.{key}" if path else str(key))
                     for key, item in value.items()}, line, path)
    if isinstance(value, list | tuple):
        return Node([node_of(item, line, f"{path}[{index}]") for index, item in enumerate(value)], line, path)
    return Node(value, line, path)


@dataclass(frozen=True)
class AccountRows:
    """Accounts a plugin supplies (the ``load_accounts`` hook): ``where`` names their place in error messages
    (``/etc/postbote/accounts.sqlite3``), ``rows`` are (number, account mapping) pairs, the number standing for the
    line: a mistake in the third row is ``accounts.sqlite3:3: accounts[2].port: …``."""

    where: str
    rows: list[tuple[int, dict[str, Any]]]


class Problems:
    """Collects config problems as ``file:line: key: message`` lines."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.lines: list[str] = []
        self._line_of: dict[str, int] = {}
        # every problem added, the repeated ones too: whether a parser found any is told by this growing, not by
        # `lines` (the second account sharing a bad option adds no line, and must not look fine)
        self.reported = 0

    def add(self, line: int, path: str, message: str) -> None:
        self.reported += 1
        where = f"{self.file}:{line}" if line else self.file
        text = f"{where}: {path}: {message}" if path else f"{where}: {message}"
        if text not in self._line_of:  # options shared by several accounts are checked once per account
            self.lines.append(text)
            self._line_of[text] = line

    def raise_if_any(self) -> None:
        """All problems at once, in the order of their lines in the file (the file's own problems first)."""
        if self.lines:
            raise ConfigError(sorted(self.lines, key=self._line_of.__getitem__))


MAX_CONFIG_BYTES = 1 << 20
"""A config file larger than this is refused before it is parsed: real ones are a few kB."""
MAX_ALIAS_USES = 100
"""Uses of YAML anchors (``*name``, ``<<: *name``) while reading one file: a config needs a handful. Every use copies
the anchored value, so a few nested aliases in a few hundred bytes can stand for billions of values."""
MAX_VALUES = 100_000
"""Values (scalars, lists, mappings) one config file may expand to, aliases included."""
MAX_DEPTH = 64
"""Nesting of lists and mappings; a config needs about six levels."""
_MERGE_TAG = "tag:yaml.org,2002:merge"
_STR_TAG = "tag:yaml.org,2002:str"
# libyaml's parser where PyYAML has it (five times faster: 100,000 accounts are read in seconds, not minutes); it
# refuses nesting beyond 1,000 levels itself, and every bound below applies to what either parser composed.
_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml(path: Path) -> Node:
    """Read ``path`` into a `Node` tree; unreadable files and malformed YAML are `ConfigError`s naming the line.

    Reading is bounded against a hostile or broken file: its size, the aliases used, the values they expand to and
    the nesting depth are limited (`MAX_CONFIG_BYTES`, `MAX_ALIAS_USES`, `MAX_VALUES`, `MAX_DEPTH`), so that
    ``postbote check`` answers at once with one line instead of filling the memory.
    """
    text = _read_bounded(path)
    try:
        fast = _BlockDocument(str(path)).build(text)
        if fast is None:
            fast = _SimpleDocument(str(path)).build(text)
        if fast is not None:
            return fast
        root = yaml.compose(text, Loader=_LOADER)
    except yaml.reader.ReaderError as exc:
        line = text[: exc.position].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: malformed YAML: not valid UTF-8 text, byte 0x{exc.character:02x} "
                          "(save the file as UTF-8)") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 0
        if "maximum nesting depth" in str(exc.problem):  # libyaml's own bound, far beyond ours
            raise ConfigError(f"{path}:{line}: malformed YAML: lists or mappings nested more than {MAX_DEPTH} "
                              "deep") from None
        raise ConfigError(f"{path}:{line}: malformed YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: malformed YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: malformed YAML: lists or mappings nested more than {MAX_DEPTH} deep") from None
    if root is None:
        return Node({}, 1, "")
    return _Expansion(str(path)).convert(root, "", 0, copying=False)


def _read_bounded(path: Path) -> bytes:
    """The file's bytes, refusing one larger than `MAX_CONFIG_BYTES` without reading it all (``/dev/zero``)."""
    try:
        with path.open("rb") as file:
            text = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from None
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: config file larger than {MAX_CONFIG_BYTES // 1024} KiB: not a postbote config")
    return text


class _NotSimple(Exception):
    """The document uses what only the composer handles (anchors, aliases, tags, merge keys, several documents)."""


class _BlockDocument:
    """Builds `Node`s from the text itself, line by line, for the documents a provider's conf.d holds: block
    mappings and lists of one-line keys and values, plain or quoted, and comments (`build` answers None for
    anything else, which `_SimpleDocument` or the composer then reads).

    libyaml made two Python event objects with two marks for every key and value; a file of 1,000 accounts has
    25,000 of them. Here a line is one split and one match: reading 100 such files took 2.3 s of CPU, not 3.1. What
    this reader answers is what the composer answers, values, lines and key paths alike: tests/test_yaml_reader.py
    compares both on generated documents and on generated lines, odd ones included. Being unsure is cheap, so
    it is unsure often: ASCII only, no tabs or carriage returns, no flow collections, block scalars, anchors,
    tags, documents markers, keys other than plain words, multi-line or escaped scalars, or empty list items.
    """

    def __init__(self, file: str) -> None:
        self.file = file
        self._lines: list[tuple[int, str, int]] = []  # (indent, content without the indent, line number)
        self._at = 0

    def build(self, text: bytes) -> Node | None:
        if not text.isascii() or _NOT_BLOCK_TEXT.search(text):
            return None
        lines = self._lines
        for number, raw in enumerate(text.decode("ascii").split("\n"), 1):
            content = raw.lstrip(" ")
            if content and content[0] != "#":
                lines.append((len(raw) - len(content), content.rstrip(" "), number))
        if not lines:
            return Node({}, 1, "")
        if 2 * len(lines) + 1 > MAX_VALUES:
            return None  # a line makes two values at most: below this nothing needs counting; above, the others count
        if lines[0][1].startswith(("---", "...", "%")):
            return None
        lines.append((-1, "", 0))  # the end: less indented than anything
        try:
            root = self._block(lines[0][0], "", 0)
        except _NotSimple:
            return None
        return root if self._at == len(lines) - 1 else None

    def _block(self, indent: int, path: str, depth: int) -> Node:
        if depth > MAX_DEPTH:
            raise _NotSimple  # the others name the bound
        content = self._lines[self._at][1]
        if content[:2] == "- " or content == "-":
            return self._sequence(indent, path, depth)
        return self._mapping(indent, path, depth)

    def _mapping(self, indent: int, path: str, depth: int) -> Node:
        lines = self._lines
        at = self._at
        first_line = lines[at][2]
        mapping: dict[str, Node] = {}
        match_key = _BLOCK_KEY.match
        while True:
            at_indent, content, number = lines[at]
            if at_indent != indent:
                if at_indent > indent:
                    raise _NotSimple  # a value continued on the next line, or a mistake the composer names
                break
            key_match = match_key(content)
            if key_match is None:
                raise _NotSimple
            key = key_match.group(1)
            if key in mapping:
                raise _NotSimple  # `_SimpleDocument` names the line
            child_path = f"{path}.{key}" if path else key
            value = content[key_match.end():]
            at += 1
            if value and value[0] != "#":
                if value[0] in _NOT_PLAIN_STARTS or " #" in value or ": " in value or value[-1] == ":":
                    mapping[key] = Node(self._scalar(value, number, child_path), number, child_path)
                elif value[0] in _RESOLVABLE_STARTS:
                    mapping[key] = Node(_resolved_plain(value, self.file, number, child_path), number, child_path)
                else:
                    mapping[key] = Node(value, number, child_path)  # most values: plain text
                continue
            next_indent, next_content, _ = lines[at]
            if next_indent > indent or (next_indent == indent and (next_content[:2] == "- " or next_content == "-")):
                self._at = at
                mapping[key] = self._block(next_indent, child_path, depth + 1)
                at = self._at
                continue
            mapping[key] = Node(None, number, child_path)
        self._at = at
        return Node(mapping, first_line, path)

    def _sequence(self, indent: int, path: str, depth: int) -> Node:
        lines = self._lines
        first_line = lines[self._at][2]
        items: list[Node] = []
        while True:
            at_indent, content, number = lines[self._at]
            if at_indent != indent:
                if at_indent > indent:
                    raise _NotSimple
                break
            if content[:2] != "- ":
                if content[0] == "-":
                    raise _NotSimple  # an empty item, or a key starting with "-"
                break  # the next key of the mapping this list is the value of
            item = content[2:].lstrip(" ")
            child_path = f"{path}[{len(items)}]"
            if _BLOCK_KEY.match(item):  # "- name: x": a mapping whose keys line up under "name"
                column = indent + len(content) - len(item)
                lines[self._at] = (column, item, number)
                items.append(self._block(column, child_path, depth + 1))
                continue
            items.append(Node(self._scalar(item, number, child_path), number, child_path))
            self._at += 1
        return Node(items, first_line, path)

    def _scalar(self, value: str, line: int, path: str) -> Any:
        """A one-line value (the rest of its line, comment included), or `_NotSimple`."""
        first = value[0]
        if first == "'" or first == '"':
            end = value.find(first, 1)
            while end != -1 and first == "'" and value[end + 1:end + 2] == "'":  # '' stands for '
                end = value.find("'", end + 2)
            rest = value[end + 1:]
            if end == -1 or (first == '"' and "\\" in value[:end]) or (rest and not _COMMENT.fullmatch(rest)):
                raise _NotSimple  # continued on the next line, escaped, or followed by more than a comment
            inner = value[1:end]
            return inner.replace("''", "'") if first == "'" else inner
        if first in _NOT_PLAIN_STARTS:
            raise _NotSimple
        comment = value.find(" #")
        if comment != -1:
            value = value[:comment].rstrip(" ")
        if ": " in value or value[-1] == ":":
            raise _NotSimple
        if first not in _RESOLVABLE_STARTS:
            return value
        return _resolved_plain(value, self.file, line, path)


_NOT_BLOCK_TEXT = re.compile(rb"[\x00-\x09\x0b-\x1f\x7f]")
"""Tabs, carriage returns and other controls: indentation and line breaks the block reader leaves to libyaml."""
_BLOCK_KEY = re.compile(r"([A-Za-z0-9_][A-Za-z0-9_.@+/-]*):(?: +|$)")
_COMMENT = re.compile(r" +#.*")
_NOT_PLAIN_STARTS = frozenset("-?:,[]{}#&*!|>'\"%@`")
"""Indicators: a value starting with one is a list, flow collection, anchor, tag, block scalar (or a mistake)."""


class _SimpleDocument:
    """Builds `Node`s straight from the parser's events, for the documents most configs are: mappings, lists and
    scalars, no anchors, aliases, tags or merge keys (`build` answers None for anything else, which is then composed).

    Composing first made a node, two marks and a call of the pure-Python resolver for every scalar; here a plain
    scalar is resolved only when its first character can start something other than a string (the resolver's own
    table says which), and quoted ones never. Reading 100,000 accounts took half as long. The values are those the
    composer path gives: tests/test_yaml_reader.py compares both on generated documents."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.values = 0
        self._loader: Any = None

    def build(self, text: bytes) -> Node | None:
        loader = self._loader = _LOADER(text)
        try:
            loader.get_event()  # StreamStart
            event = loader.get_event()
            if isinstance(event, yaml.StreamEndEvent):
                return Node({}, 1, "")
            root = self._node(loader.get_event(), "", 0)
            loader.get_event()  # DocumentEnd
            if not isinstance(loader.get_event(), yaml.StreamEndEvent):
                return None  # several documents: the composer says so
            return root
        except _NotSimple:
            return None
        finally:
            loader.dispose()

    def _node(self, event: Any, path: str, depth: int) -> Node:
        line = event.start_mark.line + 1
        self.values += 1
        if self.values > MAX_VALUES or depth > MAX_DEPTH:
            _check_bounds(self.file, line, depth, self.values, alias_uses=0)
        kind = type(event)
        if kind is yaml.ScalarEvent:
            value = event.value
            if event.tag is None and event.anchor is None and (
                    not event.implicit[0] or value[:1] not in _RESOLVABLE_STARTS):
                return Node(value, line, path)  # most values: text, quoted or plain
            return Node(self._scalar(event, line, path), line, path)
        if getattr(event, "anchor", None) is not None or getattr(event, "tag", None) is not None:
            raise _NotSimple
        if kind is yaml.MappingStartEvent:
            return Node(self._mapping(path, depth), line, path)
        if kind is yaml.SequenceStartEvent:
            return Node(self._sequence(path, depth), line, path)
        raise _NotSimple  # an alias

    def _mapping(self, path: str, depth: int) -> dict[str, Node]:
        mapping: dict[str, Node] = {}
        get_event = self._loader.get_event
        while True:
            event: Any = get_event()
            if type(event) is yaml.MappingEndEvent:
                return mapping
            if type(event) is not yaml.ScalarEvent or event.anchor is not None or event.tag is not None:
                raise _NotSimple  # a key that is no plain word, or is tagged or anchored: the composer reports it
            key = event.value
            if key == "<<" and event.implicit[0]:
                raise _NotSimple  # a merge key
            child_path = f"{path}.{key}" if path else key
            if key in mapping:
                mark: Any = event.start_mark
                raise ConfigError(f"{self.file}:{mark.line + 1}: {child_path}: key given twice")
            mapping[key] = self._node(get_event(), child_path, depth + 1)

    def _sequence(self, path: str, depth: int) -> list[Node]:
        items: list[Node] = []
        get_event = self._loader.get_event
        while True:
            event: Any = get_event()
            if type(event) is yaml.SequenceEndEvent:
                return items
            items.append(self._node(event, f"{path}[{len(items)}]", depth + 1))

    def _scalar(self, event: Any, line: int, path: str) -> Any:
        """A plain scalar that may be more than text (`_node` takes the others), resolved as the composer would."""
        if event.anchor is not None or event.tag is not None:
            raise _NotSimple
        return _resolved_plain(event.value, self.file, line, path)


def _resolved_plain(value: str, file: str, line: int, path: str) -> Any:
    """What an untagged plain scalar means (``995``, ``true``, ``~``, a date, or the text itself), as the composer
    resolves it; `_NotSimple` for what only the composer handles (``<<``)."""
    known = _RESOLVED.get(value, _UNKNOWN)
    if known is not _UNKNOWN:
        return known
    tag = _RESOLVER.resolve(yaml.ScalarNode, value, (True, False))
    if tag == _STR_TAG:
        return _remembered(value, value)
    if tag in _COMPOSER_ONLY_TAGS:
        raise _NotSimple
    try:
        resolved = _CONSTRUCTOR.construct_object(yaml.ScalarNode(tag, value), deep=True)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}:{line}: {path}: {exc}") from None
    return _remembered(value, resolved) if isinstance(resolved, _IMMUTABLE_SCALARS) else resolved


_RESOLVER = yaml.resolver.Resolver()
_RESOLVABLE_STARTS = frozenset(_RESOLVER.yaml_implicit_resolvers)
_COMPOSER_ONLY_TAGS = frozenset({_MERGE_TAG, "tag:yaml.org,2002:value", "tag:yaml.org,2002:yaml"})
_CONSTRUCTOR = yaml.SafeLoader("")
_UNKNOWN = object()
_RESOLVED: dict[str, Any] = {}
"""Plain scalars read before and what they meant (``995``, ``5m``, ``true``): a provider's accounts repeat the same
few ports, intervals and switches, and the resolver tries a dozen patterns on each."""
MAX_RESOLVED = 4096
_IMMUTABLE_SCALARS = (bool, int, float, type(None), datetime.date)


def _remembered(text: str, meaning: Any) -> Any:
    if len(_RESOLVED) < MAX_RESOLVED:
        _RESOLVED[text] = meaning
    return meaning


def _check_bounds(file: str, line: int, depth: int, values: int, *, alias_uses: int) -> None:
    """`MAX_VALUES` and `MAX_DEPTH`, with the messages both ways of reading give."""
    if values > MAX_VALUES and alias_uses:
        raise ConfigError(f"{file}:{line}: too many YAML aliases (they expand to more than {MAX_VALUES} "
                          "values): refused as a possible alias bomb")
    if values > MAX_VALUES:
        raise ConfigError(f"{file}:{line}: too many YAML values (more than {MAX_VALUES})")
    if depth > MAX_DEPTH:
        raise ConfigError(f"{file}:{line}: lists or mappings nested more than {MAX_DEPTH} deep")


class _Expansion:
    """Turns a composed YAML graph into `Node`s, counting what it costs.

    PyYAML's composer shares one node among all the aliases of an anchor, which is cheap; copying it for every
    alias is our work, and it is where an alias bomb would explode. So every node met again is counted as an alias
    use and every value made as a value, and the conversion stops with a `ConfigError` the moment a bound is
    passed, long before the expansion could grow.
    """

    def __init__(self, file: str) -> None:
        self.file = file
        self.values = 0
        self.alias_uses = 0
        self._seen: set[int] = set()  # ids of nodes converted once; the graph is alive meanwhile, so ids are unique
        self._constructor = yaml.SafeLoader("")

    def convert(self, node: yaml.Node, path: str, depth: int, *, copying: bool) -> Node:
        """``node`` as a `Node`; ``copying`` when it is inside an alias's copy (then it is no alias use itself)."""
        copying = self._count(node, depth, copying)
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            return Node(self._mapping(node, path, depth, copying), line, path)
        if isinstance(node, yaml.SequenceNode):
            return Node([self.convert(item, f"{path}[{i}]", depth + 1, copying=copying)
                         for i, item in enumerate(node.value)], line, path)
        if node.tag == _STR_TAG:  # most values: no constructor needed
            return Node(node.value, line, path)
        try:
            value = self._constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{self.file}:{line}: {path}: {exc}") from None
        return Node(value, line, path)

    def _mapping(self, node: yaml.MappingNode, path: str, depth: int, copying: bool) -> dict[str, Node]:
        """The mapping's own keys, then those of its merge keys (``<<: *defaults``) that it does not set itself."""
        mapping: dict[str, Node] = {}
        merged: list[dict[str, Node]] = []
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                line = key_node.start_mark.line + 1
                raise ConfigError(f"{self.file}:{line}: {path or 'top level'}: keys must be plain words")
            if key_node.tag == _MERGE_TAG:
                merged.extend(self._merge_sources(value_node, path, depth, copying))
                continue
            key = str(key_node.value)
            child_path = f"{path}.{key}" if path else key
            if key in mapping:
                raise ConfigError(f"{self.file}:{key_node.start_mark.line + 1}: {child_path}: key given twice")
            mapping[key] = self.convert(value_node, child_path, depth + 1, copying=copying)
        for source in merged:
            for key, value in source.items():
                mapping.setdefault(key, value)
        return mapping

    def _merge_sources(self, node: yaml.Node, path: str, depth: int, copying: bool) -> list[dict[str, Node]]:
        """The mappings named by a merge key: one mapping or a list of them, earlier ones winning (YAML 1.1)."""
        items = node.value if isinstance(node, yaml.SequenceNode) else [node]
        sources = []
        for item in items:
            if not isinstance(item, yaml.MappingNode):
                line = item.start_mark.line + 1
                raise ConfigError(f"{self.file}:{line}: {path or 'top level'}: '<<' merges only mappings")
            converted = self.convert(item, path, depth, copying=copying)
            sources.append(converted.value)
        return sources

    def _count(self, node: yaml.Node, depth: int, copying: bool) -> bool:
        """Count one value made from ``node``; True when it is (part of) a copy made for an alias."""
        line = node.start_mark.line + 1
        self.values += 1
        seen_before = id(node) in self._seen
        if seen_before and not copying:
            self.alias_uses += 1
            if self.alias_uses > MAX_ALIAS_USES:
                raise ConfigError(f"{self.file}:{line}: too many YAML aliases (more than {MAX_ALIAS_USES} uses of "
                                  "anchors, the last of the one on this line): refused as a possible alias bomb")
        self._seen.add(id(node))
        _check_bounds(self.file, line, depth, self.values, alias_uses=self.alias_uses)
        return copying or seen_before


class Section:
    """One YAML mapping being validated. Typed getters record problems instead of raising."""

    def __init__(self, node: Node, problems: Problems, *, what: str = "a mapping") -> None:
        self.node = node
        self.problems = problems
        self.used: set[str] = set()
        if not isinstance(node.value, dict):
            self.problem(f"expected {what}, got {describe(node.value)}")
            self.entries: dict[str, Node] = {}
        else:
            self.entries = node.value

    @property
    def path(self) -> str:
        return self.node.path

    @property
    def line(self) -> int:
        return self.node.line

    def problem(self, message: str, node: Node | None = None) -> None:
        target = node or self.node
        self.problems.add(target.line, target.path, message)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def keys(self) -> list[str]:
        return list(self.entries)

    def raw(self, key: str) -> Node | None:
        self.used.add(key)
        return self.entries.get(key)

    def present(self, key: str) -> Node:
        """The node of a key known to be present (``key in section``)."""
        self.used.add(key)
        return self.entries[key]

    def get(self, key: str, parse: Parser[T], default: Any = ..., *, required: bool = False) -> Any:
        """The value of ``key`` parsed by ``parse``; ``default`` when absent (a problem when ``required``)."""
        self.used.add(key)
        node = self.entries.get(key)
        if node is None or node.value is None:
            if required:
                self.problems.add(self.line, _join(self.path, key), "required key is missing")
            return None if default is ... else default
        try:
            return parse(node.value)
        except ValueError as exc:
            self.problem(f"{exc}, got {describe(node.value)}", node)
            return None if default is ... else default

    def section(self, key: str, *, what: str = "a mapping") -> Section | None:
        node = self.raw(key)
        if node is None or node.value is None:
            return None
        return Section(node, self.problems, what=what)

    def finish(self, allowed: set[str] | None = None) -> None:
        """Report keys nobody asked for, with a "did you mean" when one is close to a known key."""
        known = allowed if allowed is not None else self.used
        for key, node in self.entries.items():
            if key in known:
                continue
            import difflib  # only for the error message

            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.problems.add(node.line, node.path, f"unknown key{hint}")

    def items(self) -> Iterator[tuple[str, Node]]:
        return iter(self.entries.items())


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, str):
        return repr(value)
    return f"{value!r} ({type(value).__name__})"


def text(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError("expected a string")
    result = value if type(value) is str else str(value)
    if "\n" in result or "\r" in result or "\0" in result:
        raise ValueError("expected a single line without control characters")
    return result


def nonempty_text(value: Any) -> str:
    result = text(value)
    if not result.strip():
        raise ValueError("expected a non-empty string")
    return result


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


@functools.lru_cache(maxsize=256)  # the same parser for every account that asks
def integer(minimum: int | None = None, maximum: int | None = None) -> Parser[int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer{_range_text(minimum, maximum)}")
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise ValueError(f"expected an integer{_range_text(minimum, maximum)}")
        return value

    return parse


def _range_text(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f" from {minimum} to {maximum}"
    if minimum is not None:
        return f" of at least {minimum}"
    return ""


port_number = integer(1, 65535)


@functools.lru_cache(maxsize=256)  # the same parser for every account that asks
def choice(*options: str) -> Parser[str]:
    def parse(value: Any) -> str:
        if not isinstance(value, str) or value.lower() not in options:
            raise ValueError(f"expected one of {', '.join(options)}")
        return value.lower()

    return parse


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")


def duration(value: Any) -> float:
    """Seconds from a number or a string such as ``30s``, ``5m``, ``1h30m``, ``2d``; must be positive."""
    expected = "expected a duration such as 30, 30s, 5m or 1h"
    if isinstance(value, bool):
        raise ValueError(expected)
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _duration_text(value)
    else:
        raise ValueError(expected)
    if seconds <= 0:
        raise ValueError("expected a positive duration")
    return seconds


@functools.lru_cache(maxsize=1024)
def _duration_text(value: str) -> float:
    """The seconds ``5m`` stands for; remembered, as every account of a large config says the same few."""
    compact = value.strip().lower().replace(" ", "")
    parts = _DURATION.findall(compact)
    if not parts or "".join(n + u for n, u in parts) != compact:
        raise ValueError("expected a duration such as 30, 30s, 5m or 1h")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
               "g": 1000**3, "gb": 1000**3, "gib": 1024**3}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)")


def size(value: Any) -> int:
    """Bytes from a number or a string such as ``512k``, ``25MB``, ``1GiB``."""
    expected = "expected a size in bytes such as 1000000, 512kB, 25MB or 1GiB"
    if isinstance(value, bool):
        raise ValueError(expected)
    if isinstance(value, int):
        number, unit = float(value), ""
    elif isinstance(value, str) and (match := _SIZE.fullmatch(value.strip().lower())):
        number, unit = float(match.group(1)), match.group(2)
    else:
        raise ValueError(expected)
    if unit not in _SIZE_UNITS or number <= 0:
        raise ValueError(expected)
    return int(number * _SIZE_UNITS[unit])


def text_list(value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError("expected a non-empty list of strings")
    return [nonempty_text(item.value if isinstance(item, Node) else item) for item in value]


@functools.lru_cache(maxsize=256)  # the same parser for every account that asks
def path_relative_to(base: Path) -> Parser[Path]:
    """A filesystem path; ``~`` is expanded and relative paths are taken from the config file's directory."""

    def parse(value: Any) -> Path:
        raw = nonempty_text(value)
        return _path_from(base, raw, os.environ.get("HOME") if raw.startswith("~") else None)

    return parse


@functools.lru_cache(maxsize=4096)
def _path_from(base: Path, raw: str, home: str | None) -> Path:
    """``raw`` as a path, ``~`` expanded (from ``home``, part of what is remembered), relative ones under ``base``;
    remembered (paths are immutable), as the accounts of a large config name the same few Maildirs and CA files."""
    candidate = Path(raw).expanduser()
    return candidate if candidate.is_absolute() else (base / candidate)
