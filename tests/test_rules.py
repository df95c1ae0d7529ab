"""The ``rules`` plugin: declarative filters validated at load time, matched against real (and broken) messages, and
proven end to end by polls of a `FakeMailbox` into a real Maildir (and a real SMTP server)."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from postbote.config import Account, Config, load_config
from postbote.errors import ConfigError
from postbote.message import Message, Verdict
from postbote.pluginmanager import make_plugin_manager
from postbote.plugins import rules
from postbote.plugins.maildir import MaildirSettings
from postbote.poll import PollStats
from postbote.testing import FakeMailbox, FakeSource, poll_once
from structlog.testing import capture_logs

ACCOUNT = "accounts:\n  - {name: a, host: h, username: u, password: p, deliver: {maildir: m}}\n"

NEWSLETTER = (b"Return-Path: <bounce@news.example.com>\r\nFrom: Weekly News <news@news.example.com>\r\n"
              b"To: alice@example.org\r\nList-Id: Weekly <weekly.news.example.com>\r\nSubject: This week\r\n"
              b"Message-ID: <n1@news.example.com>\r\n\r\nhello\r\n")
SPAM = (b"Return-Path: <x@spam.example>\r\nFrom: \"Bob, the builder\" <bob@example.org>\r\nTo: alice@example.org\r\n"
        b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n =?iso-8859-1?b?5A==?= aus Berlin\r\n"
        b"Message-ID: <s1@spam.example>\r\n\r\nbuy\r\n")
GARBAGE = (b"From: caf\xe9 \xff <odd@example.net>\r\nTo: =?bogus-charset?q?Bob?= <bob@example.org>\r\n"
           b"Subject: =?utf-8?b?A?= =?base64?q?x?= \xe4rger =?utf-8?q?unclosed\r\n"
           b"X-Weird: \x00\x7f\xfe\r\n\r\nbody\r\n")
PERSONAL = b"From: Carol <carol@example.org>\r\nTo: alice@example.org\r\nSubject: lunch?\r\n\r\nsee you\r\n"


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "postbote.yaml"
    path.write_text(text)
    os.chmod(path, 0o600)
    return path


def load(tmp_path: Path, text: str) -> Config:
    return load_config(write_config(tmp_path, textwrap.dedent(text)), make_plugin_manager(entry_points=False))


def problems_of(tmp_path: Path, plugins_yaml: str) -> str:
    """The config errors of ``plugins_yaml`` (first line is line 1) followed by one account."""
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, textwrap.dedent(plugins_yaml) + ACCOUNT)
    return str(caught.value)


def account_with_rules(tmp_path: Path, rules_yaml: str, stop: str = "first") -> Account:
    body = textwrap.indent(textwrap.dedent(rules_yaml), "      ")
    return load(tmp_path, f"plugins:\n  rules:\n    stop: {stop}\n    rules:\n{body}" + ACCOUNT).accounts[0]


def verdict(account: Account, data: bytes) -> tuple[Verdict | None, Message]:
    message = Message.from_bytes(data)
    return rules.filter_message(message, account), message


def matches(tmp_path: Path, match_yaml: str, data: bytes) -> bool:
    account = account_with_rules(tmp_path, f"- match: {match_yaml}\n  action: drop\n")
    result, _ = verdict(account, data)
    return result is not None and result.dropped


# --- validation ---


def test_unknown_keys_are_reported_with_their_line_and_a_did_you_mean(tmp_path: Path) -> None:
    errors = problems_of(tmp_path, """\
        plugins:
          rules:
            stpo: all
            rules:
              - nme: x
                match: {sender: a, recipent: b}
                action: {tag: {subjet_prefix: "[x] "}}
              - match: {header: Subject, regx: "^a"}
                action: {rerout: [a@b]}
        """)
    assert "postbote.yaml:3: plugins.rules.stpo: unknown key (did you mean 'stop'?)" in errors
    assert "postbote.yaml:5: plugins.rules.rules[0].nme: unknown key (did you mean 'name'?)" in errors
    assert "postbote.yaml:6: plugins.rules.rules[0].match.recipent: unknown key (did you mean 'recipient'?)" in errors
    assert ("postbote.yaml:7: plugins.rules.rules[0].action.tag.subjet_prefix: unknown key "
            "(did you mean 'subject_prefix'?)") in errors
    assert "postbote.yaml:8: plugins.rules.rules[1].match.regx: unknown key (did you mean 'regex'?)" in errors
    assert "postbote.yaml:9: plugins.rules.rules[1].action.rerout: unknown key (did you mean 'reroute'?)" in errors


def test_bad_regexes_sizes_and_stop_modes_are_reported_at_their_line(tmp_path: Path) -> None:
    errors = problems_of(tmp_path, """\
        plugins:
          rules:
            stop: sometimes
            rules:
              - match: {header: List-Id, regex: "news(\\\\.example"}
                action: drop
              - match: {sender: {regex: "[unclosed"}}
                action: drop
              - match: {size_over: 10 parsecs}
                action: drop
              - match: {header: "List Id"}
                action: drop
        """)
    assert "postbote.yaml:3: plugins.rules.stop: expected one of first, all, got 'sometimes'" in errors
    assert "postbote.yaml:5: plugins.rules.rules[0].match.regex: invalid regular expression: missing )" in errors
    assert "postbote.yaml:7: plugins.rules.rules[1].match.sender.regex: invalid regular expression" in errors
    assert "postbote.yaml:9: plugins.rules.rules[2].match.size_over: expected a size in bytes" in errors
    assert "postbote.yaml:11: plugins.rules.rules[3].match.header: expected a header field name" in errors


def test_each_action_mapping_holds_exactly_one_action_and_drop_stands_alone(tmp_path: Path) -> None:
    errors = problems_of(tmp_path, """\
        plugins:
          rules:
            rules:
              - match: {sender: a}
                action: {tag: {header: "X-A: 1"}, reroute: [a@b]}
              - match: {sender: a}
                action: [drop, {tag: {header: "X-A: 1"}}]
              - match: {sender: a}
                action: [accept, {tag: {header: "X-A: 1"}}]
              - match: {sender: a}
                action: dorp
              - match: {sender: a}
                action: {tag: {}}
              - match: {sender: a}
                action: {tag: {header: "no colon here"}}
        """)
    assert ("postbote.yaml:5: plugins.rules.rules[0].action: expected drop or accept, or a mapping with one of tag, "
            "reroute, deliver, got a mapping (give several actions as a list)") in errors
    assert "postbote.yaml:7: plugins.rules.rules[1].action: drop cannot be combined with other actions" in errors
    assert "postbote.yaml:9: plugins.rules.rules[2].action: accept can only be the last action" in errors
    assert "postbote.yaml:11: plugins.rules.rules[3].action: expected drop or accept" in errors
    assert "(did you mean 'drop'?)" in errors
    assert "postbote.yaml:13: plugins.rules.rules[4].action.tag: expected header:" in errors
    assert ('postbote.yaml:15: plugins.rules.rules[5].action.tag.header: expected "Name: value" header fields'
            in errors)


def test_missing_parts_and_misplaced_keys_are_reported(tmp_path: Path) -> None:
    errors = problems_of(tmp_path, """\
        plugins:
          rules:
            rules:
              - name: no action
                match: {sender: a}
              - action: drop
              - match: {regex: "x"}
                action: drop
              - match: {}
                action: drop
              - match: {not: {sender: {regex: a, exact: b}}}
                action: drop
        """)
    assert "postbote.yaml:4: plugins.rules.rules[0].action: required key is missing" in errors
    assert "postbote.yaml:6: plugins.rules.rules[1].match: required key is missing" in errors
    assert "postbote.yaml:7: plugins.rules.rules[2].match.regex: regex: needs header: NAME beside it" in errors
    assert "postbote.yaml:9: plugins.rules.rules[3].match: expected at least one condition" in errors
    assert ("postbote.yaml:11: plugins.rules.rules[4].match.not.sender: expected a text (a substring) or a mapping "
            "with exactly one of regex, exact, contains") in errors


def test_rules_enabled_without_rules_is_an_error(tmp_path: Path) -> None:
    errors = problems_of(tmp_path, "plugins:\n  rules: true\n")
    assert "plugins.rules.rules: required key is missing: list the rules" in errors


def test_reroute_and_deliver_targets_are_validated_like_the_core_ones(tmp_path: Path) -> None:
    errors = problems_of(tmp_path, """\
        plugins:
          rules:
            rules:
              - match: {sender: a}
                action: {reroute: ["not an address"]}
              - match: {sender: a}
                action: {deliver: {maildri: /tmp/x}}
              - match: {sender: a}
                action: {deliver: {maildir: {path: /tmp/x, craete: true}}}
        """)
    assert "postbote.yaml:5: plugins.rules.rules[0].action.reroute: expected a mail address" in errors
    assert "postbote.yaml:7: plugins.rules.rules[1].action.deliver.maildri: unknown delivery target 'maildri'" in errors
    assert ("postbote.yaml:9: plugins.rules.rules[2].action.deliver.maildir.craete: unknown key "
            "(did you mean 'create'?)") in errors


def test_a_valid_config_parses_into_rules_and_accounts_can_override_or_disable_them(tmp_path: Path) -> None:
    config = load(tmp_path, """\
        plugins:
          rules:
            stop: all
            rules:
              - {name: big, match: {size_over: 10MB}, action: {deliver: [{maildir: big}, {maildir: /srv/b}]}}
              - {match: {any: [{sender: x}, {recipient: {exact: y@z}}]}, action: [{reroute: bob@localhost}, accept]}
        accounts:
          - {name: a, host: h, username: u, password: p, deliver: {maildir: m}}
          - {name: b, host: h, username: u, password: p, deliver: {maildir: m}, plugins: {rules: false}}
          - name: c
            host: h
            username: u
            password: p
            deliver: {maildir: m}
            plugins: {rules: {rules: [{match: {header: X-Spam-Flag}, action: drop}]}}
        """)
    a, b, c = config.accounts
    options = a.options_for("rules")
    assert options.stop == "all" and [rule.name for rule in options.rules] == ["big", "#2"]
    deliver = options.rules[0].actions[0]
    assert [d.settings for d in deliver.destinations] == [MaildirSettings(tmp_path / "big"),
                                                          MaildirSettings(Path("/srv/b"))]
    assert [action.describe() for action in options.rules[1].actions] == ["reroute", "accept"]
    assert not b.uses("rules")
    assert c.options_for("rules").stop == "all" and len(c.options_for("rules").rules) == 1


# --- matching ---


def test_header_match_ignores_the_case_of_the_name_and_of_the_text(tmp_path: Path) -> None:
    assert matches(tmp_path, '{header: list-id, regex: "news\\\\.EXAMPLE\\\\.com"}', NEWSLETTER)
    assert matches(tmp_path, '{header: SUBJECT, exact: "this WEEK"}', NEWSLETTER)
    assert matches(tmp_path, '{header: Subject, contains: "s we"}', NEWSLETTER)
    assert matches(tmp_path, "{header: List-Id}", NEWSLETTER)
    assert not matches(tmp_path, "{header: List-Id}", PERSONAL)
    assert not matches(tmp_path, '{header: Subject, exact: "this"}', NEWSLETTER)
    assert not matches(tmp_path, '{header: Subject, regex: "(?-i:this)"}', NEWSLETTER)


def test_encoded_and_folded_subjects_are_matched_decoded(tmp_path: Path) -> None:
    assert matches(tmp_path, '{header: Subject, exact: "Grüßeä aus Berlin"}', SPAM)
    assert matches(tmp_path, '{header: Subject, regex: "^grüße"}', SPAM)


def test_broken_headers_are_matched_as_raw_text_and_never_raise(tmp_path: Path) -> None:
    assert matches(tmp_path, '{header: From, contains: "café ÿ"}', GARBAGE)
    assert matches(tmp_path, '{header: Subject, contains: "=?utf-8?b?A?= x ärger =?utf-8?q?unclosed"}', GARBAGE)
    assert matches(tmp_path, '{recipient: {exact: bob@example.org}}', GARBAGE)
    assert matches(tmp_path, '{sender: {exact: odd@example.net}}', GARBAGE)
    assert matches(tmp_path, '{header: X-Weird, regex: "þ"}', GARBAGE)


def test_garbage_in_every_field_never_fails_a_filter(tmp_path: Path) -> None:
    account = account_with_rules(tmp_path, """\
        - match: {any: [{header: Subject, regex: x}, {sender: x}, {recipient: {regex: x}}, {size_under: 1}]}
          action: {tag: {header: "X-Seen: 1", subject_prefix: "[Ä] "}}
        """)
    for data in (GARBAGE, b"\xff\xfe\x00:\r\n\r\n", b"Subject: \r\n\r\n", b"", b":::\r\n=?=?\r\n",
                 b"From: <<<@@@>>>\r\nTo: ,,,\r\nReturn-Path: <\r\n\r\n"):
        result, message = verdict(account, data)
        assert result is None
        message.as_bytes()


FIELD_NAMES = st.sampled_from([b"Subject", b"From", b"To", b"Cc", b"Return-Path", b"X-Original-To", b"List-Id"])
FIELD_BYTES = st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"\n "))
ENCODED_WORDS = st.builds(lambda cs, enc, text: b"=?" + cs + b"?" + enc + b"?" + text + b"?=",
                          st.sampled_from([b"utf-8", b"iso-8859-1", b"bogus", b"base64", b"utf-8*de", b""]),
                          st.sampled_from([b"q", b"B", b"x"]), st.binary(max_size=12).filter(lambda b: b"?" not in b))


@settings(max_examples=300, deadline=None)
@given(fields=st.lists(st.tuples(FIELD_NAMES, st.lists(st.one_of(FIELD_BYTES, ENCODED_WORDS), max_size=4)),
                       max_size=6))
def test_no_header_content_makes_matching_or_tagging_raise(fields: list[tuple[bytes, list[bytes]]]) -> None:
    header = b"".join(name + b": " + b" ".join(parts) + b"\r\n" for name, parts in fields)
    message = Message.from_bytes(header + b"\r\nbody\r\n")
    facts = rules.Facts(message)
    for name in ("subject", "from", "list-id"):
        facts.header(name)
    assert isinstance(facts.senders, list) and isinstance(facts.recipients, list)
    rules.prefix_subject(message, "[Ä] ")
    assert message.as_bytes().endswith(b"\r\n\r\nbody\r\n")


def test_sender_is_the_return_path_or_a_from_address(tmp_path: Path) -> None:
    assert matches(tmp_path, '{sender: "@spam.example"}', SPAM)
    assert matches(tmp_path, "{sender: {exact: BOB@example.org}}", SPAM)
    assert matches(tmp_path, '{sender: {regex: "^news@"}}', NEWSLETTER)
    assert not matches(tmp_path, '{sender: "builder"}', SPAM)
    assert not matches(tmp_path, '{sender: "example.org"}', NEWSLETTER)


@pytest.mark.parametrize("field", ["To", "Cc", "Delivered-To", "X-Original-To"])
def test_recipient_looks_at_the_address_fields(tmp_path: Path, field: str) -> None:
    data = f"{field}: Bob <Bob@Example.org>, other@example.net\r\nSubject: s\r\n\r\nbody\r\n".encode()
    assert matches(tmp_path, "{recipient: bob@example.org}", data)
    assert not matches(tmp_path, "{recipient: {exact: bob}}", data)


def test_size_over_and_under_compare_the_message_size(tmp_path: Path) -> None:
    big = b"Subject: big\r\n\r\n" + b"x" * 2000 + b"\r\n"
    assert matches(tmp_path, "{size_over: 1kB}", big)
    assert not matches(tmp_path, "{size_over: 1kB}", PERSONAL)
    assert matches(tmp_path, "{size_under: 1KiB}", PERSONAL)
    assert matches(tmp_path, "{size_over: 100, size_under: 1kB}", NEWSLETTER)


def test_all_any_and_not_combine_conditions(tmp_path: Path) -> None:
    listy = b"From: boss@example.org\r\nSubject: [list] hi\r\n\r\nx\r\n"
    rule = '{all: [{header: Subject, regex: "^\\\\[list\\\\]"}, {not: {sender: boss@example.org}}]}'
    assert not matches(tmp_path, rule, listy)
    assert matches(tmp_path, rule, listy.replace(b"boss@", b"intern@"))
    assert matches(tmp_path, "{any: [{sender: nobody}, {header: List-Id}]}", NEWSLETTER)
    assert not matches(tmp_path, "{any: [{sender: nobody}, {header: X-Nothing}]}", NEWSLETTER)


def test_a_message_without_a_header_body_separator_is_matched_and_tagged(tmp_path: Path) -> None:
    account = account_with_rules(tmp_path, """\
        - match: {header: Subject, contains: only}
          action: {tag: {header: "X-Postbote-Rule: headers-only", subject_prefix: "[x] "}}
        """)
    result, message = verdict(account, b"Subject: only headers\r\nX: y")
    assert result is None
    assert message.as_bytes() == b"Subject: [x] only headers\r\nX: y\r\nX-Postbote-Rule: headers-only\r\n"


# --- actions ---


def test_drop_names_the_rule_and_accept_ends_filtering(tmp_path: Path) -> None:
    account = account_with_rules(tmp_path, """\
        - {name: newsletters, match: {header: List-Id}, action: drop}
        - {match: {sender: carol}, action: accept}
        """)
    assert verdict(account, NEWSLETTER)[0] == Verdict.drop("rule newsletters")
    assert verdict(account, PERSONAL)[0] == Verdict.accept()
    assert verdict(account, SPAM)[0] is None


def test_tag_adds_fields_and_prefixes_the_subject_once_keeping_encoded_words(tmp_path: Path) -> None:
    account = account_with_rules(tmp_path, """\
        - match: {sender: "@spam.example"}
          action: {tag: {header: ["X-Postbote-Rule: spam", "X-Flag: ünïcode"], subject_prefix: "[SPAM] "}}
        """)
    _, message = verdict(account, SPAM)
    header = message.header_bytes
    assert b"X-Postbote-Rule: spam\r\n" in header
    assert b"X-Flag: =?utf-8?b?w7xuw69jb2Rl?=\r\n" in header
    assert b"Subject: [SPAM] =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n =?iso-8859-1?b?5A==?= aus Berlin\r\n" in header
    assert message.as_bytes().endswith(b"\r\n\r\nbuy\r\n")
    rules.prefix_subject(message, "[SPAM] ")
    assert message.header_bytes.count(b"[SPAM]") == 1
    assert rules.Facts(message).header("subject") == ["[SPAM] Grüßeä aus Berlin"]


def test_non_ascii_prefixes_are_encoded_and_subjectless_messages_get_one(tmp_path: Path) -> None:
    message = Message.from_bytes(PERSONAL)
    rules.prefix_subject(message, "[Späm] ")
    assert rules.Facts(message).header("subject") == ["[Späm] lunch?"]
    assert message.header_bytes.isascii()
    bare = Message.from_bytes(b"From: a@b\r\n\r\nx\r\n")
    rules.prefix_subject(bare, "[SPAM] ")
    assert bare.as_bytes() == b"From: a@b\r\nSubject: [SPAM]\r\n\r\nx\r\n"


def test_stop_first_applies_only_the_first_matching_rule(tmp_path: Path) -> None:
    tags = """\
        - {name: one, match: {sender: example}, action: {tag: {header: "X-Rule: one"}}}
        - {name: two, match: {sender: example}, action: {tag: {header: "X-Rule: two"}}}
        - {name: three, match: {sender: example}, action: {reroute: [a@localhost]}}
        - {name: four, match: {sender: example}, action: {reroute: [b@localhost, a@localhost]}}
        """
    with capture_logs() as events:
        _, message = verdict(account_with_rules(tmp_path, tags), SPAM)
    assert rules.Facts(message).header("x-rule") == ["one"] and message.recipients is None
    assert [(e["event"], e["rule"]) for e in events] == [("rule.matched", "one")]


def test_stop_all_applies_every_match_and_reroutes_add_up(tmp_path: Path) -> None:
    tags = """\
        - {name: one, match: {sender: example}, action: {tag: {header: "X-Rule: one"}}}
        - {name: two, match: {header: X-Rule, exact: one}, action: {tag: {header: "X-Rule: two"}}}
        - {name: skipped, match: {sender: nobody}, action: drop}
        - {name: three, match: {sender: example}, action: {reroute: [a@localhost]}}
        - {name: four, match: {sender: example}, action: [{reroute: [b@localhost, a@localhost]}, accept]}
        - {name: never, match: {sender: example}, action: drop}
        """
    with capture_logs() as events:
        result, message = verdict(account_with_rules(tmp_path, tags, stop="all"), SPAM)
    assert result == Verdict.accept()
    assert rules.Facts(message).header("x-rule") == ["one", "two"]
    assert message.recipients == ["a@localhost", "b@localhost"]
    assert [e["rule"] for e in events] == ["one", "two", "three", "four"]
    assert events[3]["actions"] == ["reroute", "accept"]


def test_deliver_sets_the_message_destinations(tmp_path: Path) -> None:
    account = account_with_rules(tmp_path, "- {match: {size_over: 100}, action: {deliver: {maildir: big}}}\n")
    _, message = verdict(account, NEWSLETTER)
    (destination,) = message.destinations
    assert destination.kind == "maildir" and destination.settings.path == tmp_path / "big"
    assert verdict(account, b"Subject: x\r\n\r\n")[1].destinations is None


def test_rules_run_after_the_received_header_is_added(tmp_path: Path) -> None:
    pm = make_plugin_manager(entry_points=False)
    config = load_config(write_config(tmp_path, "plugins:\n  rules: {rules: [{match: {header: Received, "
                                      "contains: postbote}, action: drop}]}\n" + ACCOUNT), pm)
    account = config.accounts[0]
    verdict = pm.hooks_for(account).call("filter_message", message=Message.from_bytes(PERSONAL), account=account)
    assert verdict == Verdict.drop("rule #1")


# --- end to end ---


class Agent:
    """A config for one account polling a FakeMailbox, loaded, configured and polled as ``postbote poll`` does."""

    def __init__(self, tmp_path: Path, messages: list[bytes]) -> None:
        self.tmp_path = tmp_path
        self.source = FakeSource()
        self.server: FakeMailbox = self.source.mailbox("test")
        for data in messages:
            self.server.add(data)
        self.maildir = tmp_path / "Maildir"

    def poll(self, plugins: str, account_extra: str = "", deliver: str = "") -> PollStats:
        deliver = deliver or f"deliver: {{maildir: {self.maildir}}}\n"
        path = write_config(self.tmp_path, f"state_dir: {self.tmp_path / 'state'}\n{plugins}\n" + textwrap.dedent("""\
            accounts:
              - name: test
                protocol: fake
                timeout: 2s
            """) + textwrap.indent(account_extra + deliver, "    "))
        return poll_once(path, plugins=[self.source], start_plugins=True)

    def delivered(self, maildir: Path | None = None) -> list[bytes]:
        folder = (maildir or self.maildir) / "new"
        return [p.read_bytes() for p in sorted(folder.iterdir())] if folder.is_dir() else []


@pytest.fixture
def agent(tmp_path: Path) -> Agent:
    return Agent(tmp_path, [NEWSLETTER, SPAM, PERSONAL])


RULES = """\
plugins:
  rules:
    rules:
      - {name: newsletters, match: {header: List-Id, regex: "news\\\\.example\\\\.com"}, action: drop}
      - name: spam
        match: {sender: "@spam.example"}
        action: {tag: {header: "X-Postbote-Rule: spam", subject_prefix: "[SPAM] "}}
"""


def test_a_poll_deletes_dropped_messages_undelivered_and_delivers_tagged_ones(agent: Agent) -> None:
    stats = agent.poll(RULES)
    assert (stats.ok, stats.dropped, stats.delivered, stats.deleted) == (True, 1, 2, 3)
    assert agent.server.uids() == []
    delivered = agent.delivered()
    assert not any(b"List-Id" in data for data in delivered)
    (spam,) = [data for data in delivered if b"spam.example" in data]
    assert b"\nX-Postbote-Rule: spam\n" in spam and b"\nSubject: [SPAM] =?utf-8?q?Gr=C3=BC=C3=9Fe?=\n" in spam
    assert spam.endswith(b"\n\nbuy\n")
    (personal,) = [data for data in delivered if b"carol" in data]
    assert personal.startswith(b"Received: ") and personal.endswith(b"\n" + PERSONAL.replace(b"\r\n", b"\n"))


def test_a_poll_delivers_matching_messages_to_the_rule_s_destination(agent: Agent, tmp_path: Path) -> None:
    stats = agent.poll(f"plugins:\n  rules: {{rules: [{{match: {{sender: carol}}, "
                       f"action: {{deliver: {{maildir: {tmp_path / 'carol'}}}}}}}]}}\n")
    assert (stats.delivered, stats.deleted) == (3, 3)
    assert len(agent.delivered()) == 2
    (carol,) = agent.delivered(tmp_path / "carol")
    assert b"Subject: lunch?" in carol


def test_an_account_with_rules_disabled_gets_everything(agent: Agent) -> None:
    stats = agent.poll(RULES, account_extra="plugins: {rules: false}\n")
    assert (stats.dropped, stats.delivered) == (0, 3)
    assert not any(b"X-Postbote-Rule" in data for data in agent.delivered())


def test_a_poll_reroutes_to_other_envelope_recipients(agent: Agent, smtp_sink) -> None:
    rerouting = "plugins:\n  rules: {rules: [{match: {sender: carol}, action: {reroute: [carol@localhost]}}]}\n"
    deliver = f"deliver: {{smtp: {{host: 127.0.0.1, port: {smtp_sink.port}, recipients: [alice@localhost]}}}}\n"
    stats = agent.poll(rerouting, deliver=deliver)
    assert stats.delivered == 3
    by_recipients = {tuple(m.rcpt_tos): m.data for m in smtp_sink.messages}
    assert set(by_recipients) == {("alice@localhost",), ("carol@localhost",)}
    assert b"Subject: lunch?" in by_recipients[("carol@localhost",)]
