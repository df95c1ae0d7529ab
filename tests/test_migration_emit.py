"""The YAML `postbote import` writes by hand (issue 15, Migration): every scalar reads back as the text it was, and
a note never escapes its comment, whatever the old config held."""

from __future__ import annotations

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from postbote.migrate import Imported, ImportResult, Unmapped
from postbote.migrate.emit import render, scalar

TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)


@settings(max_examples=300, deadline=None)
@given(TEXT)
def test_every_string_reads_back_as_itself(text: str) -> None:
    assert yaml.safe_load(f"key: {scalar(text)}") == {"key": text}


@settings(max_examples=200, deadline=None)
@given(st.lists(TEXT, max_size=4), TEXT, TEXT)
def test_notes_and_values_never_change_the_configs_structure(values: list[str], note: str, comment: str) -> None:
    account = Imported("acct", "rc:1", keys={"host": note, "folders": values, "deliver": {"mda": values or ["x"]}},
                       comments=[comment], unmapped=[Unmapped(note, comment)])
    result = ImportResult(accounts=[account], unmapped=[Unmapped(comment, note)], comments=[note])
    loaded = yaml.safe_load(render(result, "rc"))
    assert loaded == {"accounts": [{"name": "acct", "host": note, "folders": values,
                                    "deliver": {"mda": values or ["x"]}}]}


def test_words_yaml_would_read_as_something_else_are_quoted() -> None:
    for word in ("yes", "No", "null", "~", ".inf", "1.5", "0x1f", "12345", "- a", "a: b", "#x", "@x", "*x", "&x"):
        assert yaml.safe_load(f"k: {scalar(word)}") == {"k": word}
    assert scalar("/usr/bin/procmail") == "/usr/bin/procmail" and scalar(True) == "true" and scalar(7) == "7"
