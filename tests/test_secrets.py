"""Secrets never reach a log, a traceback or a child process (issue 11, items 8 and 9).

Every secret postbote reads -- a password from any source, an access token from a token_command or a token endpoint,
an OAuth refresh token, an OAuth client secret -- is masked in every log line, whatever the format and whichever
way it got there: an event value, a nested value, an exception's text, a traceback whose frames hold it, a record of
the standard library's logging. Programs postbote starts (an MDA, a password_command, a token_command) do not
inherit the environment variables that password_env names. A password that is not UTF-8 is a one-line error.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml
from postbote import credentials
from postbote.credentials import MASK, Secret, child_environment, redact, register_secret
from postbote.errors import CredentialError
from postbote.logconfig import configure_logging
from postbote.plugins.mda import run_mda
from postbote.plugins.signin.oauth2 import TokenCommand, parse_token_response, read_secret_file
from postbote.plugins.signin.passwords import PasswordSource

from tests.conftest import DovecotFactory
from tests.servers import interrupt_after

REPO = Path(__file__).resolve().parent.parent
RUN_TIMEOUT = 60.0
LOG_FORMATS = ("json", "console")


def fresh_secret(kind: str) -> str:
    """A value no other test uses, so that a pass never rests on another test having registered it."""
    return f"{kind}-{secrets.token_hex(8)}"


# --- each kind of secret, read the way postbote reads it ------------------------------------------------------------

def password_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    value = fresh_secret("env-password")
    monkeypatch.setenv("POSTBOTE_TEST_SECRET_PW", value)
    return PasswordSource("password_env", env="POSTBOTE_TEST_SECRET_PW").resolve().reveal()


def password_from_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    value = fresh_secret("file-password")
    path = tmp_path / "password"
    path.write_text(value + "\n")
    path.chmod(0o600)
    return PasswordSource("password_file", file=path).resolve().reveal()


def password_from_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    value = fresh_secret("command-password")
    return PasswordSource("password_command", command=("/bin/echo", value)).resolve().reveal()


def token_from_token_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    value = fresh_secret("access-token")
    return TokenCommand(["/bin/echo", value]).token().reveal()


def tokens_from_the_token_endpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    access, refresh = fresh_secret("endpoint-access-token"), fresh_secret("endpoint-refresh-token")
    response = parse_token_response({"access_token": access, "refresh_token": refresh, "token_type": "Bearer"},
                                    "https://idp.example/token")
    assert response.refresh_token is not None
    return response.refresh_token.reveal()


def refresh_token_from_its_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    return _secret_file(tmp_path / "refresh-token", "refresh_token_file", fresh_secret("refresh-token"))


def client_secret_from_its_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    return _secret_file(tmp_path / "client-secret", "client_secret_file", fresh_secret("client-secret"))


def _secret_file(path: Path, what: str, value: str) -> str:
    path.write_text(value + "\n")
    path.chmod(0o600)
    return read_secret_file(path, what).reveal()


SECRET_SOURCES: list[Callable[[Path, pytest.MonkeyPatch], str]] = [
    password_from_env, password_from_file, password_from_command, token_from_token_command,
    tokens_from_the_token_endpoint, refresh_token_from_its_file, client_secret_from_its_file,
]


@pytest.fixture(autouse=True)
def only_this_tests_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry of secrets is process-wide: secrets that earlier tests registered (a password "secret", say)
    would mask words this test looks for. Each test here starts with an empty one."""
    monkeypatch.setattr(credentials, "_secrets", credentials._SecretRegistry())


@pytest.fixture(params=SECRET_SOURCES, ids=lambda source: source.__name__)
def secret(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    return request.param(tmp_path, monkeypatch)


# --- logging to a buffer --------------------------------------------------------------------------------------------

@pytest.fixture
def logging_restored() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level, config = list(root.handlers), root.level, structlog.get_config()
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    structlog.configure(**config)


@pytest.fixture(params=LOG_FORMATS)
def log_output(request: pytest.FixtureRequest, logging_restored: None) -> io.StringIO:
    buffer = io.StringIO()
    configure_logging(level="debug", fmt=request.param, stream=buffer)
    return buffer


class Holder:
    """An object whose repr shows what it holds, as a careless dataclass would."""

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"Holder(value={self.value!r})"


def fail_with_the_secret_in_a_local(secret: str) -> None:
    password = secret  # noqa: F841 - the frame's local variable is the point
    raise RuntimeError("the login exploded")


# --- item 8: nothing secret in a log line ---------------------------------------------------------------------------

def test_a_secret_in_an_event_value_is_masked(secret: str, log_output: io.StringIO) -> None:
    structlog.get_logger("t").warning("login.refused", reply=f"-ERR [AUTH] PASS {secret} is wrong")
    assert secret not in log_output.getvalue()
    assert f"PASS {MASK} is wrong" in log_output.getvalue()


def test_a_secret_nested_in_dicts_and_lists_is_masked(secret: str, log_output: io.StringIO) -> None:
    structlog.get_logger("t").info("oauth2.answer", body={"tokens": [{"refresh_token": secret}], "n": 1})
    assert secret not in log_output.getvalue()
    assert MASK in log_output.getvalue()


def test_a_secret_in_an_object_or_bytes_value_is_masked(secret: str, log_output: io.StringIO) -> None:
    structlog.get_logger("t").info("state.dumped", holder=Holder(secret), raw=secret.encode())
    assert secret not in log_output.getvalue()
    assert "Holder(" in log_output.getvalue()


def test_a_secret_in_an_exception_message_is_masked(secret: str, log_output: io.StringIO) -> None:
    log = structlog.get_logger("t")
    try:
        raise ValueError(f"the server answered: {secret}")
    except ValueError as exc:
        log.error("account.failed", error=exc)
        log.exception("poll.crashed")
    assert secret not in log_output.getvalue()
    assert "the server answered: " + MASK in log_output.getvalue()


def test_a_traceback_never_shows_frame_locals(secret: str, log_output: io.StringIO) -> None:
    try:
        fail_with_the_secret_in_a_local(secret)
    except RuntimeError:
        structlog.get_logger("t").exception("poll.crashed", account="alice")
    assert "the login exploded" in log_output.getvalue()
    assert "fail_with_the_secret_in_a_local" in log_output.getvalue()
    assert secret not in log_output.getvalue()


def test_a_secret_logged_through_the_standard_library_is_masked(secret: str, log_output: io.StringIO) -> None:
    stdlib = logging.getLogger("some.library")
    stdlib.error("connection to %s failed", f"https://user:{secret}@idp.example/")
    try:
        fail_with_the_secret_in_a_local(secret)
    except RuntimeError:
        stdlib.exception("handler crashed with %s", secret)
    assert secret not in log_output.getvalue()
    assert f"https://user:{MASK}@idp.example/" in log_output.getvalue()
    assert "the login exploded" in log_output.getvalue()


@pytest.mark.parametrize("awkward", ['quote"and\\backslash', "na\u00efve-p\u00e4sswort", "tab\tinside-it",
                                     "it's-\U0001f511"])
def test_a_secret_the_renderer_escapes_is_masked_in_text_objects_and_exceptions(awkward: str,
                                                                                 log_output: io.StringIO) -> None:
    register_secret(awkward)
    log = structlog.get_logger("t")
    log.warning("login.refused", reply=f"-ERR {awkward}", holder=Holder(awkward), nested={"k": [awkward, (awkward,)]})
    try:
        raise ValueError(f"the server said {awkward}")
    except ValueError as exc:
        log.error("account.failed", error=exc)
        log.exception("poll.crashed")
    written = log_output.getvalue()
    forms = {awkward, *credentials.secret_forms(awkward)}
    escaped_again = {again for form in forms for again in (json.dumps(form)[1:-1], repr(form)[1:-1])}
    assert [form for form in forms | escaped_again if form in written] == []
    assert written.count(MASK) >= 6


def test_redact_masks_every_form_of_a_secret_an_error_line_may_quote(secret: str) -> None:
    line = f"postbote: error: {secret!r} {secret.encode()!r} {json.dumps({'t': secret})}"
    assert redact(line) == f"postbote: error: '{MASK}' b'{MASK}' {{\"t\": \"{MASK}\"}}"


def test_redact_masks_a_non_ascii_secret_also_where_it_is_escaped() -> None:
    value = "pässwörd\x00" + fresh_secret("non-ascii")
    Secret(value)
    line = f"{value} | {value!r} | {value.encode()!r} | {json.dumps(value)}"
    assert redact(line) == f"{MASK} | '{MASK}' | b'{MASK}' | \"{MASK}\""


def test_values_shorter_than_four_characters_are_not_masked() -> None:
    Secret("abc")
    assert redact("abc is not worth hiding") == "abc is not worth hiding"


# --- item 8: a password that is not UTF-8 ---------------------------------------------------------------------------

NOT_UTF8 = b"\xff\xfeZebra-" + secrets.token_hex(6).encode()


def test_a_password_env_value_that_is_not_utf8_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(os.environb, b"POSTBOTE_TEST_BAD_PW", NOT_UTF8)
    with pytest.raises(CredentialError) as raised:
        PasswordSource("password_env", env="POSTBOTE_TEST_BAD_PW").resolve()
    assert str(raised.value) == "password_env POSTBOTE_TEST_BAD_PW: the value is not valid UTF-8"


def test_a_password_file_that_is_not_utf8_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "password"
    path.write_bytes(NOT_UTF8 + b"\n")
    path.chmod(0o600)
    with pytest.raises(CredentialError) as raised:
        PasswordSource("password_file", file=path).resolve()
    assert str(raised.value) == f"password_file {path}: the value is not valid UTF-8"


def test_a_password_command_printing_non_utf8_is_a_clear_error(tmp_path: Path) -> None:
    script = tmp_path / "print-password"
    script.write_bytes(b"#!/bin/sh\nprintf '" + b"".join(b"\\%03o" % byte for byte in NOT_UTF8) + b"\\n'\n")
    script.chmod(0o700)
    with pytest.raises(CredentialError) as raised:
        PasswordSource("password_command", command=(str(script),)).resolve()
    assert str(raised.value) == f"password_command {script}: the value is not valid UTF-8"


# --- item 8 end to end: postbote poll and postbote run ----------------------------------------------------------------

def write_config(directory: Path, account: dict[str, Any]) -> Path:
    config = directory / "postbote.yaml"
    config.write_text(yaml.safe_dump({"state_dir": str(directory / "state"), "log": {"level": "debug",
                                                                                    "format": "json"},
                                      "accounts": [account]}, sort_keys=False))
    config.chmod(0o600)
    return config


def alice_account(dovecot: Any, directory: Path, **source: Any) -> dict[str, Any]:
    return {"name": "alice", "host": "127.0.0.1", "port": dovecot.pop3_port, "tls": "none", "username": "alice",
            "poll_interval": "1s", "timeout": "10s", "deliver": {"maildir": str(directory / "Maildir")}, **source}


def environment_with(**variables: bytes) -> dict[bytes, bytes]:
    environment = dict(os.environb)
    environment[b"PYTHONPATH"] = str(REPO).encode()
    environment.update({name.encode(): value for name, value in variables.items()})
    return environment


def postbote(config: Path, command: str, environment: dict[bytes, bytes], **popen: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "postbote", "-c", str(config), command], cwd=REPO,
                            env=environment, stdin=subprocess.DEVNULL, **popen)


def assert_no_trace_of(password: bytes, output: bytes) -> None:
    visible_part = password.lstrip(b"\xff\xfe")
    assert visible_part not in output
    assert b"Traceback" not in output
    assert b'"frames"' not in output


def test_poll_with_a_non_utf8_password_env_fails_in_one_line_without_the_password(
        dovecot_factory: DovecotFactory, tmp_path: Path) -> None:
    dovecot = dovecot_factory(tls=False)
    dovecot.deliver("alice", b"Subject: waiting\n\nfor a good password\n")
    config = write_config(tmp_path, alice_account(dovecot, tmp_path, password_env="POSTBOTE_TEST_PW"))
    process = postbote(config, "poll", environment_with(POSTBOTE_TEST_PW=NOT_UTF8),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = process.communicate(timeout=RUN_TIMEOUT)
    output = stdout + stderr
    assert process.returncode == 1, output.decode(errors="replace")
    assert_no_trace_of(NOT_UTF8, output)
    errors = [line for line in output.decode().splitlines() if "not valid UTF-8" in line]
    assert len(errors) == 1, output.decode(errors="replace")
    assert "password_env POSTBOTE_TEST_PW: the value is not valid UTF-8" in errors[0]


def test_the_daemon_with_a_non_utf8_password_env_logs_one_line_without_the_password(
        dovecot_factory: DovecotFactory, tmp_path: Path) -> None:
    dovecot = dovecot_factory(tls=False)
    dovecot.deliver("alice", b"Subject: waiting\n\nfor a good password\n")
    config = write_config(tmp_path, alice_account(dovecot, tmp_path, password_env="POSTBOTE_TEST_PW"))
    log_file = tmp_path / "daemon.log"
    with open(log_file, "wb") as log, interrupt_after(RUN_TIMEOUT, "postbote run"):
        daemon = postbote(config, "run", environment_with(POSTBOTE_TEST_PW=NOT_UTF8),
                          stdout=subprocess.DEVNULL, stderr=log)
        try:
            while b"not valid UTF-8" not in log_file.read_bytes() and daemon.poll() is None:
                time.sleep(0.05)
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=20)
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
    output = log_file.read_bytes()
    assert b"password_env POSTBOTE_TEST_PW: the value is not valid UTF-8" in output, output.decode(errors="replace")
    assert_no_trace_of(NOT_UTF8, output)


# --- item 9: children do not inherit the secret variables -------------------------------------------------------------

def dumped_environment(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


@pytest.fixture
def secret_variable(monkeypatch: pytest.MonkeyPatch) -> str:
    """An account's password_env variable, set; and an ordinary variable beside it that children must still see."""
    monkeypatch.setenv("POSTBOTE_TEST_CHILD_PW", fresh_secret("inherited"))
    monkeypatch.setenv("POSTBOTE_TEST_ORDINARY", "still-there")
    PasswordSource("password_env", env="POSTBOTE_TEST_CHILD_PW")  # what loading the configuration does
    return "POSTBOTE_TEST_CHILD_PW"


def test_child_environment_drops_secret_variables_unless_kept(secret_variable: str) -> None:
    assert secret_variable not in child_environment()
    assert child_environment()["POSTBOTE_TEST_ORDINARY"] == "still-there"
    assert secret_variable in child_environment(keep=[secret_variable])


def test_an_mda_does_not_inherit_the_password_env_variable(secret_variable: str, tmp_path: Path) -> None:
    dump = tmp_path / "mda-env"
    run_mda(["/bin/sh", "-c", f"env > {dump}; cat > /dev/null"], [b"Subject: x\n\nbody\n"], timeout=10)
    assert "POSTBOTE_TEST_ORDINARY" in dumped_environment(dump)
    assert secret_variable not in dumped_environment(dump)


def test_a_password_command_does_not_inherit_the_password_env_variable(secret_variable: str, tmp_path: Path) -> None:
    dump = tmp_path / "command-env"
    PasswordSource("password_command", command=("/bin/sh", "-c", f"env > {dump}; echo some-password")).resolve()
    assert "POSTBOTE_TEST_ORDINARY" in dumped_environment(dump)
    assert secret_variable not in dumped_environment(dump)


def test_a_token_command_does_not_inherit_the_password_env_variable(secret_variable: str, tmp_path: Path) -> None:
    dump = tmp_path / "token-env"
    TokenCommand(["/bin/sh", "-c", f"env > {dump}; echo some-token"]).token()
    assert "POSTBOTE_TEST_ORDINARY" in dumped_environment(dump)
    assert secret_variable not in dumped_environment(dump)


def test_poll_starts_the_mda_without_the_accounts_password_variable(dovecot_factory: DovecotFactory,
                                                                    tmp_path: Path) -> None:
    dovecot = dovecot_factory(tls=False)
    dovecot.deliver("alice", b"Subject: for the MDA\n\nhello\n")
    dump = tmp_path / "mda-env"
    account = alice_account(dovecot, tmp_path, password_env="POSTBOTE_TEST_PW",
                            deliver={"mda": ["/bin/sh", "-c", f"env > {dump}; cat > /dev/null"]})
    config = write_config(tmp_path, account)
    environment = environment_with(POSTBOTE_TEST_PW=dovecot.password("alice").encode(),
                                   POSTBOTE_TEST_ORDINARY=b"still-there")
    process = postbote(config, "poll", environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output, _ = process.communicate(timeout=RUN_TIMEOUT)
    assert dump.exists(), output.decode(errors="replace")
    assert "POSTBOTE_TEST_ORDINARY" in dumped_environment(dump)
    assert "POSTBOTE_TEST_PW" not in dumped_environment(dump)


# --- many accounts ----------------------------------------------------------------------------------------------------


def test_the_passwords_of_thousands_of_accounts_are_all_masked_the_first_as_the_last() -> None:
    """A provider's daemon logs in to thousands of accounts: every password stays masked (the registry once kept only
    the newest thousand forms), registering them costs linear time, and the regex module's cache does not fill."""
    import re

    passwords = [f"password-of-account-{number:05d}" for number in range(3000)]
    for password in passwords:
        register_secret(password)
    text = f"refused {passwords[0]}, {passwords[1500]} and {passwords[-1]}; plain text stays"
    assert redact(text) == f"refused {MASK}, {MASK} and {MASK}; plain text stays"
    assert redact(f"prefix{passwords[7]}suffix") == f"prefix{MASK}suffix"
    assert len(re._cache) < 100  # type: ignore[attr-defined]


def test_a_secret_that_contains_another_is_masked_whole_however_many_there_are() -> None:
    for number in range(300):  # past the one-pattern regime
        register_secret(f"filler-secret-{number:04d}")
    register_secret("token-abcd")
    register_secret("token-abcd-and-more")
    assert redact("x token-abcd-and-more y token-abcd z") == f"x {MASK} y {MASK} z"


def test_secrets_that_all_start_alike_are_masked_each_longest_first_and_forgotten_one_by_one() -> None:
    """The base64 of logins whose user names start alike all start with the same characters (``AHVzZXI`` for
    ``\\0user``): thousands of them share the index's first characters, and each is still found, the longest first."""
    registry = credentials._SecretRegistry(limit=12_000, pattern_forms=4)
    logins = [base64.b64encode(f"\0user{number:05d}\0pw-{number:05d}".encode()).decode() for number in range(5000)]
    for login in logins:
        registry.add([login, login[-12:]])  # a shorter secret inside each: the longer one must win
    assert len({login[:credentials.MIN_SECRET_LENGTH] for login in logins}) < 10
    assert registry.redact(f"said {logins[0]}; {logins[4999]} and {logins[2500][-12:]}") == \
        f"said {MASK}; {MASK} and {MASK}"
    for number in range(2100):  # past the bound: the oldest are forgotten, the rest stay found
        registry.add([f"token-{number:05d}-of-an-hour"])
    assert registry.redact(logins[0]) == logins[0]  # and its inner secret with it
    assert registry.redact(logins[4999]) == MASK


def test_beyond_its_bound_the_registry_forgets_the_forms_not_seen_for_longest() -> None:
    registry = credentials._SecretRegistry(limit=10, pattern_forms=4)
    registry.add(["old-token-1", "kept-password"])
    for number in range(12):
        registry.add([f"hourly-token-{number:02d}", "kept-password"])  # the password is seen at every login
    assert registry.redact("old-token-1") == "old-token-1"  # forgotten
    assert registry.redact("kept-password hourly-token-11") == f"{MASK} {MASK}"


@pytest.mark.parametrize("pattern_forms", [256, 4], ids=["one pattern", "indexed"])
def test_a_text_found_clean_is_searched_again_once_a_secret_it_shows_is_registered(pattern_forms: int) -> None:
    """The registry remembers texts that showed no secret (event and account names come back in every log line);
    a secret registered later is masked in them all the same."""
    registry = credentials._SecretRegistry(pattern_forms=pattern_forms)
    registry.add([f"earlier-secret-{number}" for number in range(8)])
    line = "login refused for alice: late-token-1234 expired"
    assert registry.redact(line) is line
    assert registry.redact(line) is line  # remembered clean
    registry.add(["late-token-1234"])
    assert registry.redact(line) == f"login refused for alice: {MASK} expired"


def test_the_memory_of_clean_texts_stays_bounded() -> None:
    registry = credentials._SecretRegistry(pattern_forms=4)
    registry.add([f"secret-number-{number}" for number in range(8)])
    for number in range(3 * credentials.CLEAN_TEXTS):
        registry.redact(f"account-{number}")
    registry.redact("x" * (credentials.CLEAN_TEXT_LENGTH + 1))
    assert len(registry._clean) <= credentials.CLEAN_TEXTS
    assert "x" * (credentials.CLEAN_TEXT_LENGTH + 1) not in registry._clean


@pytest.mark.parametrize("pattern_forms", [256, 4], ids=["one pattern", "indexed"])
def test_the_configurations_passwords_are_masked_however_many_secrets_come_after(pattern_forms: int) -> None:
    """No login registers an inline password again: with a provider's 100,000 accounts the registry's bound would
    forget the first ones. The configuration's secrets last; passwords and tokens that come and go stay bounded."""
    registry = credentials._SecretRegistry(limit=10, pattern_forms=pattern_forms)
    registry.add(["configured-password-1", "seen-now-token-0"], lasting=False)
    registry.add(["configured-password-1", "configured-password-2"], lasting=True)  # a known one made lasting
    for number in range(30):
        registry.add([f"hourly-token-{number:02d}"])
    assert registry.redact("configured-password-1 configured-password-2") == f"{MASK} {MASK}"
    assert registry.redact("hourly-token-29") == MASK
    assert registry.redact("hourly-token-00") == "hourly-token-00"  # runtime forms: bounded, oldest forgotten
    assert registry.redact("seen-now-token-0") == "seen-now-token-0"


def test_an_inline_password_from_the_configuration_is_registered_to_last(tmp_path: Path) -> None:
    from postbote.config import load_config
    from postbote.pluginmanager import make_plugin_manager

    password = fresh_secret("inline-password")
    config = tmp_path / "postbote.yaml"
    config.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"), "accounts": [
        {"name": "a", "host": "pop.example", "username": "a", "password": password,
         "deliver": {"maildir": str(tmp_path / "Maildir")}}]}))
    config.chmod(0o600)
    load_config(config, make_plugin_manager(entry_points=False))
    assert password in credentials._secrets._lasting


def test_the_wire_form_of_a_configured_password_lasts_as_the_password_does() -> None:
    """A PLAIN login's initial response carries the password whole: registered with it for good, so that the
    login at every later poll finds it known."""
    from postbote.plugins.signin.login import register_wire_form
    from postbote.plugins.signin.sasl import Plain

    password = Secret(fresh_secret("configured"), lasting=True)
    register_wire_form(Plain("alice", password), lasting=password.lasting)
    wire = base64.b64encode(f"\0alice\0{password.reveal()}".encode()).decode()
    assert credentials._secrets.lasts(wire)
    assert redact(f"server said: {wire}") == f"server said: {MASK}"
