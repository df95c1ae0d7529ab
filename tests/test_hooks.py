"""The hook contract stays honest: every hook is documented with its signature and exercised here (issue #3)."""

from __future__ import annotations

import inspect
import os
import re
import textwrap
from pathlib import Path
from typing import Any

import postbote.hookspecs
import pytest
from postbote import DeliveryError, LoginRefused, Verdict, hookimpl
from postbote.poll import PollStats
from postbote.testing import FakeMailbox, FakeSource, poll_once

ROOT = Path(__file__).resolve().parent.parent
HOOKS = {name: fn for name, fn in inspect.getmembers(postbote.hookspecs, inspect.isfunction)
         if hasattr(fn, "postbote_spec")}


def test_every_hook_is_documented_with_its_exact_arguments() -> None:
    docs = (ROOT / "docs" / "plugins.md").read_text()
    for name, spec in HOOKS.items():
        arguments = ", ".join(inspect.signature(spec).parameters)
        assert f"### {name}({arguments})" in docs, f"docs/plugins.md lacks '### {name}({arguments})'"
        assert spec.__doc__ and len(spec.__doc__.strip()) > 40, f"hookspecs.{name} needs a docstring"


def test_every_hook_has_a_test_named_after_it() -> None:
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    missing = [name for name in HOOKS if not re.search(rf"def test_hook_{name}\b", tests)]
    assert not missing, f"hooks without a test_hook_<name>: {missing}"


class Recorder:
    """Records every call of every hook with its arguments, and can be told to misbehave."""

    name = "recorder"

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.verdicts: dict[str, Verdict] = {}
        self.refuse: dict[str, DeliveryError] = {}
        self.found: dict[str, str] = {}  # subject -> where find_delivered says the message is

    def seen(self, hook: str) -> list[dict[str, Any]]:
        return [kwargs for name, kwargs in self.calls if name == hook]

    def order(self) -> list[str]:
        return [name for name, _ in self.calls]

    @hookimpl
    def parse_destination(self, kind, options, problems, base_dir, pluginmanager):
        self.calls.append(("parse_destination", {"kind": kind, "base_dir": base_dir}))
        return {"label": "recorded"} if kind == "recorded" else None

    @hookimpl
    def parse_plugin_options(self, name, options):
        if name != "recorder":
            return None
        values = {key: node.value for key, node in options.value.items()}
        self.calls.append(("parse_plugin_options", {"line": options.line, "values": values}))
        return values

    @hookimpl
    def configure(self, config):
        self.calls.append(("configure", {"config": config}))

    @hookimpl
    def unconfigure(self, config):
        self.calls.append(("unconfigure", {"config": config}))

    @hookimpl
    def poll_started(self, account):
        self.calls.append(("poll_started", {"account": account.name}))

    @hookimpl
    def messages_listed(self, account, count, octets):
        self.calls.append(("messages_listed", {"count": count, "octets": octets}))

    @hookimpl
    def filter_message(self, message, account):
        self.calls.append(("filter_message", {"uid": message.uid, "options": account.options_for("recorder"),
                                              "traced": message.get_header("Received") is not None}))
        subject = message.get_header("Subject") or ""
        return self.verdicts.get(subject)

    @hookimpl
    def backup_message(self, message):
        self.calls.append(("backup_message", {"uid": message.uid}))

    @hookimpl
    def deliver_message(self, message, destination, account, poll):
        if destination.kind != "recorded":
            return None
        self.calls.append(("deliver_message", {"uid": message.uid, "destination": destination.label}))
        subject = message.get_header("Subject") or ""
        if subject in self.refuse:
            raise self.refuse[subject]
        return f"recorded {message.uid}"

    @hookimpl
    def find_delivered(self, message, destination, account, poll):
        if destination.kind != "recorded":
            return None
        self.calls.append(("find_delivered", {"uid": message.uid, "destination": destination.label}))
        return self.found.get(message.get_header("Subject") or "")

    @hookimpl
    def message_delivered(self, message, account, destinations):
        self.calls.append(("message_delivered", {"uid": message.uid, "destinations": destinations}))

    @hookimpl
    def message_dropped(self, message, reason):
        self.calls.append(("message_dropped", {"uid": message.uid, "reason": reason}))

    @hookimpl
    def message_failed(self, message, error, temporary):
        self.calls.append(("message_failed", {"uid": message.uid, "error": str(error), "temporary": temporary}))

    @hookimpl
    def poll_finished(self, account, stats):
        self.calls.append(("poll_finished", {"stats": stats}))

    @hookimpl
    def account_error(self, account, error):
        self.calls.append(("account_error", {"error": str(error)}))


def mail(subject: str) -> bytes:
    return f"Subject: {subject}\r\n\r\nbody\r\n".encode()


@pytest.fixture
def run(tmp_path: Path):
    """``run(messages, recorder, open_error=None)``: one poll of the account ``acct`` (the recorder's options set,
    its plugins started as a job starts them) against a FakeMailbox holding ``messages``; the stats and the mailbox
    afterwards. ``open_error`` is raised when the poll opens the mailbox."""
    def poll(messages: list[bytes], recorder: Recorder,
             open_error: Exception | None = None) -> tuple[PollStats, FakeMailbox]:
        source = FakeSource()
        mailbox = source.mailbox("acct")
        for data in messages:
            mailbox.add(data)
        mailbox.open_error = open_error
        path = tmp_path / "postbote.yaml"
        path.write_text(textwrap.dedent("""\
            state_dir: {state}
            plugins: {{recorder: {{colour: blue}}}}
            accounts:
              - {{name: acct, protocol: fake, timeout: 2s, deliver: {{recorded: {{}}}}}}
            """).format(state=tmp_path / "state"))
        os.chmod(path, 0o600)
        stats = poll_once(path, plugins=[source, recorder], start_plugins=True)
        return stats, mailbox

    return poll


def test_hook_parse_destination(run, tmp_path: Path) -> None:
    recorder = Recorder()
    run([], recorder)
    assert {"kind": "recorded", "base_dir": tmp_path.resolve()} in recorder.seen("parse_destination")


def test_hook_parse_plugin_options(run) -> None:
    recorder = Recorder()
    run([mail("a")], recorder)
    assert recorder.seen("parse_plugin_options") == [{"line": 2, "values": {"colour": "blue"}}]
    assert recorder.seen("filter_message")[0]["options"] == {"colour": "blue"}


def test_hook_configure(run) -> None:
    recorder = Recorder()
    run([], recorder)
    assert recorder.order()[recorder.order().index("configure") + 1] == "poll_started"


def test_hook_unconfigure(run) -> None:
    recorder = Recorder()
    run([], recorder)
    assert recorder.order()[-1] == "unconfigure"


def test_hook_poll_started(run) -> None:
    recorder = Recorder()
    run([mail("a")], recorder)
    assert recorder.seen("poll_started") == [{"account": "acct"}]


def test_hook_messages_listed(run) -> None:
    recorder = Recorder()
    run([mail("a"), mail("b")], recorder)
    assert recorder.seen("messages_listed") == [{"count": 2, "octets": 2 * len(mail("a"))}]


def test_hook_filter_message(run) -> None:
    recorder = Recorder()
    run([mail("a")], recorder)
    (call,) = recorder.seen("filter_message")
    assert call["traced"], "the built-in trace header is added before any other filter runs"


def test_hook_backup_message(run) -> None:
    recorder = Recorder()
    run([mail("a")], recorder)
    order = recorder.order()
    assert order.index("filter_message") < order.index("backup_message") < order.index("deliver_message")


def test_hook_deliver_message(run) -> None:
    recorder = Recorder()
    stats, mailbox = run([mail("a"), mail("b")], recorder)
    assert [c["destination"] for c in recorder.seen("deliver_message")] == ["recorded", "recorded"]
    assert stats.delivered == 2 and mailbox.uids() == []


def test_hook_find_delivered(run) -> None:
    recorder = Recorder()
    recorder.refuse["cut"] = DeliveryError("connection lost after the whole message was sent", temporary=True,
                                           in_doubt=True)
    stats, _ = run([mail("cut"), mail("fine")], recorder)
    assert stats.deferred == 1 and recorder.seen("find_delivered") == []  # asked only after an unanswered delivery

    recorder = Recorder()
    recorder.found["cut"] = "shelf 3"
    stats, mailbox = run([mail("cut"), mail("fine")], recorder)
    assert recorder.seen("find_delivered") == [{"uid": "uid-1", "destination": "recorded"}]
    assert recorder.seen("deliver_message") == [], "found there: not handed over again"
    (call,) = recorder.seen("message_delivered")
    assert call["destinations"] == ["found already delivered: shelf 3"]
    assert stats.delivered == 1 and mailbox.uids() == []


def test_hook_message_delivered(run) -> None:
    recorder = Recorder()
    run([mail("a")], recorder)
    (call,) = recorder.seen("message_delivered")
    assert call["destinations"] == [f"recorded {call['uid']}"]


def test_hook_message_dropped(run) -> None:
    recorder = Recorder()
    recorder.verdicts["spam"] = Verdict.drop("looks like spam")
    stats, mailbox = run([mail("spam"), mail("ham")], recorder)
    assert [c["reason"] for c in recorder.seen("message_dropped")] == ["looks like spam"]
    assert len(recorder.seen("deliver_message")) == 1 and mailbox.uids() == []


def test_hook_message_failed(run) -> None:
    recorder = Recorder()
    recorder.refuse["later"] = DeliveryError("451 4.3.0 try later", temporary=True)
    recorder.refuse["never"] = DeliveryError("550 5.1.1 no such user", temporary=False)
    stats, mailbox = run([mail("later"), mail("never"), mail("fine")], recorder)
    failed = recorder.seen("message_failed")
    assert [(c["error"], c["temporary"]) for c in failed] == [("451 4.3.0 try later", True),
                                                              ("550 5.1.1 no such user", False)]
    assert (stats.delivered, stats.deferred, stats.rejected) == (1, 1, 1) and mailbox.uids() == ["uid-1", "uid-2"]


def test_hook_poll_finished(run) -> None:
    recorder = Recorder()
    run([mail("a")], recorder)
    (call,) = recorder.seen("poll_finished")
    assert call["stats"].ok and call["stats"].delivered == 1 and call["stats"].deleted == 1


def test_hook_account_error(run) -> None:
    recorder = Recorder()
    stats, mailbox = run([mail("a")], recorder, open_error=LoginRefused("login refused: [AUTH] go away"))
    assert not stats.ok and mailbox.uids() == ["uid-1"]
    (call,) = recorder.seen("account_error")
    assert "login refused: [AUTH] go away" in call["error"]
    assert recorder.seen("poll_finished")[0]["stats"].error == stats.error
    assert "filter_message" not in recorder.order()


def fake_config(tmp_path: Path, account: str = "{name: acct, protocol: fake, deliver: {recorded: {}}}",
                top: str = "") -> Path:
    path = tmp_path / "fake.yaml"
    path.write_text(f"state_dir: {tmp_path / 'state'}\n{top}accounts:\n  - {account}\n")
    return path


def test_hook_parse_source(tmp_path: Path) -> None:
    """A source plugin reads its own account keys; what it returns is ``account.source``."""
    from postbote.config import load_config
    from postbote.pluginmanager import make_plugin_manager

    pm = make_plugin_manager(entry_points=False, extra=[FakeSource(), Recorder()])
    config = load_config(fake_config(tmp_path), pm)
    (account,) = config.accounts
    assert account.protocol == "fake" and account.source.server == "acct@fake"


def test_hook_open_mailbox(tmp_path: Path) -> None:
    """The poller lists, fetches and deletes only through the mailbox the source opened."""
    source, recorder = FakeSource(), Recorder()
    mailbox = source.mailbox("acct")
    mailbox.add(mail("a"))
    mailbox.add(mail("b"))
    stats = poll_once(fake_config(tmp_path), plugins=[source, recorder])
    assert stats.ok and stats.delivered == 2 and stats.deleted == 2
    assert mailbox.sessions == 1 and mailbox.fetched == ["uid-1", "uid-2"] and mailbox.messages == {}


def test_an_account_whose_protocol_no_plugin_opens_fails_with_a_clear_error(tmp_path: Path) -> None:
    stats = poll_once(fake_config(tmp_path), plugins=[FakeSourceParsingOnly(), Recorder()])
    assert not stats.ok and "no plugin reads mail over 'fake'" in (stats.error or "")


class FakeSourceParsingOnly:
    """Claims ``protocol: fake`` in the config but opens no mailbox."""

    name = "fake-parsing-only"
    SOURCE_PROTOCOLS = ("fake",)

    @hookimpl
    def parse_source(self, protocol):
        from postbote.testing.mailbox import FakeSourceSettings

        return FakeSourceSettings("acct") if protocol == "fake" else None


def test_a_wrapper_around_a_message_hook_is_called_by_pluggy(tmp_path: Path) -> None:
    """pluggy calls the implementations, so a ``wrapper=True`` implementation sees every filter's verdict."""
    class Wrapper:
        name = "wrapper"
        seen: list[Any] = []

        @hookimpl(wrapper=True)
        def filter_message(self, message):
            verdict = yield
            self.seen.append((message.get_header("Subject"), verdict))
            return verdict

    source, recorder = FakeSource(), Recorder()
    recorder.verdicts["spam"] = Verdict.drop("spam")
    source.mailbox("acct").add(mail("spam"))
    source.mailbox("acct").add(mail("ham"))
    stats = poll_once(fake_config(tmp_path), plugins=[source, recorder, Wrapper()])
    assert stats.dropped == 1 and stats.delivered == 1
    assert Wrapper.seen == [("spam", Verdict.drop("spam")), ("ham", None)]


def test_a_plugin_an_account_turns_off_is_not_called_for_it(tmp_path: Path) -> None:
    class Dropper:
        name = "dropper"

        @hookimpl
        def filter_message(self):
            return Verdict.drop("dropper was called")

    source = FakeSource()
    source.mailbox("acct").add(mail("a"))
    account = "{name: acct, protocol: fake, plugins: {dropper: false}, deliver: {recorded: {}}}"
    stats = poll_once(fake_config(tmp_path, account), plugins=[source, Recorder(), Dropper()])
    assert stats.delivered == 1 and stats.dropped == 0


def test_a_failure_names_the_plugin_that_raised_among_several_filters(tmp_path: Path) -> None:
    class Quiet:
        name = "quiet"

        @hookimpl
        def filter_message(self):
            return None

    class Broken:
        name = "broken"

        @hookimpl
        def filter_message(self, message):
            return message.no_such_attribute

    source = FakeSource()
    mailbox = source.mailbox("acct")
    mailbox.add(mail("a"))
    stats = poll_once(fake_config(tmp_path), plugins=[source, Recorder(), Broken(), Quiet()])
    assert stats.deferred == 1 and list(mailbox.messages) == ["uid-1"]
    from postbote.state import read_account_state

    state = read_account_state(tmp_path / "state", "acct")
    assert state is not None
    (waiting,) = state.waiting
    assert "plugin 'broken' failed in filter_message: AttributeError" in waiting.reason


def test_every_observer_is_called_even_when_an_earlier_one_raises(tmp_path: Path) -> None:
    class Failing:
        name = "failing"

        @hookimpl(tryfirst=True)
        def message_delivered(self):
            raise RuntimeError("observer bug")

    source, recorder = FakeSource(), Recorder()
    source.mailbox("acct").add(mail("a"))
    stats = poll_once(fake_config(tmp_path), plugins=[source, recorder, Failing()])
    assert stats.ok and stats.delivered == 1
    assert len(recorder.seen("message_delivered")) == 1, "the observer after the failing one was still called"


def test_hook_authorize(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``postbote auth ACCOUNT`` is run by the plugin whose account it is; its status is the command's."""
    plugin = tmp_path / "fake_auth.py"
    plugin.write_text(textwrap.dedent("""\
        from postbote import hookimpl
        from postbote.testing.mailbox import FakeSourceSettings

        SOURCE_PROTOCOLS = ("fake",)


        @hookimpl
        def parse_source(protocol):
            return FakeSourceSettings("acct") if protocol == "fake" else None


        @hookimpl
        def authorize(account, out, flow, open_browser):
            if account.protocol == "fake":
                print(f"authorized {account.name} by the {flow} flow, browser {open_browser}", file=out)
                return 0
        """))
    config = fake_config(tmp_path, "{name: acct, protocol: fake, deliver: {maildir: Maildir}}",
                         top=f"plugin_paths: [{plugin}]\n")
    from postbote.cli import main

    assert main(["-c", str(config), "auth", "--no-browser", "acct"]) == 0
    assert "authorized acct by the auto flow, browser False" in capsys.readouterr().out
