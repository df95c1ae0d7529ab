"""The two ways `postbote.yaml_reader.load_yaml` reads a document give the same `Node`s.

Most configs are plain mappings, lists and scalars; those are built straight from the parser's events (fast: a
conf.d of 100,000 accounts). Anything else (anchors, aliases, merge keys, tags, several documents) goes through
PyYAML's composer. Whatever the document, the values, lines and key paths must be those the composer path gives,
or a config would mean something else depending on how it was read.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from postbote.errors import ConfigError
from postbote.yaml_reader import Node, _BlockDocument, _Expansion, _SimpleDocument, load_yaml

# Plain scalars that YAML 1.1 reads as something other than a string, and look-alikes that stay strings.
TRICKY_PLAIN = ["yes", "No", "on", "OFF", "true", "False", "y", "n", "~", "null", "Null", "", "0", "007", "0o17",
                "0x1F", "0b101", "1_000", "-12", "+3", "1e3", "1.5e-3", ".5", "-.inf", ".NaN", "1:30", "190:20:30",
                "2001-12-14", "2001-12-14t21:59:43.10-05:00", "=", "<<", "!", "&a", "*b", "0.", "1.2.3",
                "- x", "12abc", "yes please", "nullable", "onwards", "0xZZ", "+", "-", ".", "..."]


def composed(text: str) -> Node:
    return _Expansion("f.yaml").convert(yaml.compose(text, Loader=yaml.CSafeLoader), "", 0, copying=False)


def built(text: str) -> Node | None:
    return _SimpleDocument("f.yaml").build(text.encode())


def read_by_lines(text: str) -> Node | None:
    return _BlockDocument("f.yaml").build(text.encode())


def read_otherwise(text: str) -> Node:
    """What `load_yaml` gives without the line reader: built from events, or composed; empty documents are {}."""
    fast = built(text)
    if fast is not None:
        return fast
    return composed(text) if yaml.compose(text, Loader=yaml.CSafeLoader) is not None else Node({}, 1, "")


scalars = st.one_of(st.text(max_size=12), st.integers(), st.floats(allow_nan=False), st.booleans(), st.none(),
                    st.sampled_from(TRICKY_PLAIN), st.dates())
keys = st.one_of(st.from_regex(r"[a-z_][a-z0-9_.-]{0,10}", fullmatch=True), st.sampled_from(TRICKY_PLAIN[:20]),
                 st.text(min_size=1, max_size=6))
documents = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                          st.dictionaries(keys, inner, max_size=4)), max_leaves=25)


class NoAliases(yaml.SafeDumper):
    def ignore_aliases(self, data: object) -> bool:
        return True


@settings(max_examples=300, deadline=None)
@given(document=documents, flow=st.sampled_from([False, None, True]), style=st.sampled_from([None, "'", '"']),
       width=st.sampled_from([20, 80, 10_000]))
def test_a_document_reads_the_same_from_events_as_composed(document: object, flow: bool | None, style: str | None,
                                                           width: int) -> None:
    text = yaml.dump({"top": document}, Dumper=NoAliases, default_flow_style=flow, default_style=style,
                     width=width, allow_unicode=True)
    fast = built(text)
    if fast is None:
        assert "!!" in text, text  # only a tag (quoted styles tag non-strings) sends a dumped document elsewhere
    else:
        assert repr(fast) == repr(composed(text)), text


@given(value=st.sampled_from(TRICKY_PLAIN), key=st.sampled_from(TRICKY_PLAIN[:20]))
def test_a_plain_scalar_is_resolved_as_the_composer_resolves_it(value: str, key: str) -> None:
    text = f"{key or 'k'}: {value}\nlist:\n  - {value}\n"
    try:
        expected = repr(composed(text))
    except (ConfigError, yaml.YAMLError):
        return  # not a mapping of plain keys (say "- x: - x"): the composer reports it either way
    fast = built(text)
    assert fast is None or repr(fast) == expected, text


@pytest.mark.parametrize("text", [
    "base: &b {host: x}\na: *b\n",
    "defaults: &d\n  port: 995\naccount:\n  <<: *d\n  host: y\n",
    "a: !!str 12\n",
    "a: !custom x\n",
    "--- 1\n--- 2\n",
    "? [a, b]\n: c\n",
])
def test_anchors_aliases_merge_keys_tags_and_several_documents_are_left_to_the_composer(text: str) -> None:
    assert built(text) is None


def test_a_timestamp_is_read_as_the_composer_reads_it() -> None:
    fast = built("when: 2001-12-14\n")
    assert fast is not None and fast.value["when"].value == datetime.date(2001, 12, 14)


def test_a_key_given_twice_names_its_second_line_either_way(tmp_path: Path) -> None:
    config = tmp_path / "postbote.yaml"
    config.write_text("accounts:\n  - name: a\n    host: x\n    host: y\n")
    with pytest.raises(ConfigError, match=r"postbote\.yaml:4: accounts\[0\]\.host: key given twice"):
        load_yaml(config)
    config.write_text("x: &x 1\naccounts:\n  - name: a\n    host: *x\n    host: y\n")
    with pytest.raises(ConfigError, match=r"postbote\.yaml:5: accounts\[0\]\.host: key given twice"):
        load_yaml(config)


def test_lines_and_key_paths_of_a_built_document(tmp_path: Path) -> None:
    config = tmp_path / "postbote.yaml"
    config.write_text("accounts:\n  - name: a\n    port: 995\n    deliver:\n      - maildir: ~/Mail\n")
    account = load_yaml(config).value["accounts"].value[0]
    assert (account.line, account.path) == (2, "accounts[0]")
    port = account.value["port"]
    assert (port.value, port.line, port.path) == (995, 3, "accounts[0].port")
    maildir = account.value["deliver"].value[0].value["maildir"]
    assert (maildir.value, maildir.line, maildir.path) == ("~/Mail", 5, "accounts[0].deliver[0].maildir")


# --- the line reader: whatever it answers is what the composer answers; when unsure it answers None


@settings(max_examples=300, deadline=None)
@given(document=documents, style=st.sampled_from([None, "'", '"']), indent=st.sampled_from([2, 4]),
       width=st.sampled_from([20, 80, 10_000]))
def test_a_dumped_block_document_reads_the_same_by_lines_as_composed(document: object, style: str | None,
                                                                     indent: int, width: int) -> None:
    text = yaml.dump({"top": document}, Dumper=NoAliases, default_flow_style=False, default_style=style,
                     indent=indent, width=width, allow_unicode=True)
    fast = read_by_lines(text)
    assert fast is None or repr(fast) == repr(composed(text)), text


words = st.from_regex(r"[a-z_][a-z0-9_.-]{0,10}", fullmatch=True)
plain_values = st.one_of(words, st.sampled_from(["995", "5m", "30s", "true", "no", "~", "127.0.0.1", "/var/mail",
                                                 "~/Maildir", "pw#1", "a, b", "user@example.org", "x]", "0.5"]))
quoted_values = st.text(st.characters(min_codepoint=32, max_codepoint=126, exclude_characters="\\"), max_size=12)


@st.composite
def account_files(draw: st.DrawFn) -> str:
    """A conf.d file as a provider writes one: a list of accounts of one-line values, comments here and there."""
    lines = ["# accounts", "accounts:"]
    dash = draw(st.sampled_from(["- ", "  - "]))
    for _ in range(draw(st.integers(1, 4))):
        keys = draw(st.lists(words, min_size=1, max_size=5, unique=True))
        for index, key in enumerate(keys):
            value = draw(st.one_of(plain_values, quoted_values.map(lambda v: "'" + v.replace("'", "''") + "'"),
                                   quoted_values.map(lambda v: '"' + v.replace('"', "") + '"')))
            comment = draw(st.sampled_from(["", "  # note"]))
            lead = dash if index == 0 else " " * len(dash)
            lines.append(f"{lead}{key}: {value}{comment}")
        lines.append(" " * len(dash) + "deliver:")
        lines.append(" " * len(dash) + "  - maildir: /var/mail/x")
    return "\n".join(lines) + "\n"


@settings(max_examples=200, deadline=None)
@given(text=account_files())
def test_a_provider_s_account_file_is_read_by_lines_as_composed(text: str) -> None:
    fast = read_by_lines(text)
    assert fast is not None, text  # the reader exists for these: it must not send them elsewhere
    assert repr(fast) == repr(composed(text)), text


line_parts = st.sampled_from(["", " ", "  ", "    ", "- ", "-", "--- ", "key", "k2", "on", "a.b", "x/y", "<<", "?",
                              ":", ": ", ":  ", " #", "#c", "'", "''", '"', "\\", "v", "995", "1:2", "~", "[a]",
                              "{b: 1}", "&x ", "*x", "!t ", "|", ">", "%", "@", "`", ",", "]", "a: b", "\t", "\r",
                              "é", "-1", "yes", "2001-12-14", "null", "x #y", "x#y"])


shaped_lines = st.tuples(st.sampled_from(["", "  ", "    ", " "]), st.sampled_from(["", "- ", "-  ", "-"]),
                         st.sampled_from(["", "key:", "k2:", "a.b:", "on:", "key :", "key:x"]),
                         st.sampled_from(["", " ", "  "]), st.lists(line_parts, max_size=2).map("".join),
                         st.sampled_from(["", " # c", "#c", "   "])).map("".join)


@settings(max_examples=1500, deadline=None)
@given(lines=st.lists(st.one_of(shaped_lines, st.lists(line_parts, max_size=6).map("".join)), max_size=8))
def test_lines_the_reader_answers_for_are_read_as_composed_and_the_rest_left_alone(lines: list[str]) -> None:
    text = "\n".join(lines) + "\n"
    try:
        expected = repr(read_otherwise(text))
    except (ConfigError, yaml.YAMLError, RecursionError):
        expected = None  # not YAML the config reader takes: the line reader must not take it either
    fast = read_by_lines(text)
    assert fast is None or repr(fast) == expected, text


def test_the_line_reader_leaves_what_it_does_not_know_to_the_others() -> None:
    for text in ["a: |\n  x\n", "a: >\n  x\n", "a: [1, 2]\n", "a: &x 1\nb: *x\n", "a: !!str 1\n", "a: b\n  c\n",
                 "a: 'x\n  y'\n", 'a: "x\\ty"\n', "--- \na: 1\n", "a:\n-\n", "\"k\": 1\n", "a: 1\na: 2\n",
                 "a:\tb\n", "a: 1\r\n", "a: \u00e9\n", "- 1\nb: 2\n"]:
        assert read_by_lines(text) is None, text
