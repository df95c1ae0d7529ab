"""``postbote import`` of a .fetchmailrc (issue 15, Migration): the tokenizer, the parser, the mapping onto postbote's
keys, what is listed as not taken over, the passwords kept out of the output, and errors with FILE:LINE.

The rc files are in tests/data/migration/ (made for these tests, written as fetchmail's grammar defines it).
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from postbote.cli import main
from postbote.config import load_config
from postbote.migrate import MigrationError
from postbote.migrate.fetchmailrc import MAP, NUMBER, STRING, WILD, WORD, import_fetchmailrc, parse, tokenize
from postbote.pluginmanager import make_plugin_manager

DATA = Path(__file__).parent / "data" / "migration"
PASSWORDS = ("p@ss", "c4tch", "w0rk", "h0me", "l3gacy!", "tab\there")


def run_import(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str, Path]:
    secrets = tmp_path / "secrets"
    status = main(["import", *args, "--secrets-dir", str(secrets), "--local-user", "me"])
    out, err = capsys.readouterr()
    return status, out, err, secrets


def accounts_of(text: str) -> dict[str, dict[str, Any]]:
    return {account["name"]: account for account in yaml.safe_load(text)["accounts"]}


def loads_as_postbote_config(tmp_path: Path, text: str) -> list[str]:
    """The YAML is a config postbote reads without a problem; returns the account names."""
    path = tmp_path / "postbote.yaml"
    path.write_text(f"state_dir: {tmp_path / 'state'}\n" + text)
    config = load_config(path, make_plugin_manager(entry_points=False))
    return [account.name for account in config.accounts]


# --- the tokenizer --------------------------------------------------------------------------------------------


def test_tokens_drop_noise_words_punctuation_and_comments_and_count_lines() -> None:
    text = 'poll mail.example with proto pop3, port 995; # a comment: user x\n  user "joe" there has password "p"\n'
    tokens = [(t.kind, t.value, t.line) for t in tokenize(text, "rc")]
    assert tokens == [(WORD, "poll", 1), (STRING, "mail.example", 1), (WORD, "protocol", 1), (STRING, "pop3", 1),
                      (WORD, "port", 1), (NUMBER, "995", 1), (WORD, "user", 2), (STRING, "joe", 2),
                      (WORD, "there", 2), (WORD, "password", 2), (STRING, "p", 2)]


def test_the_word_after_user_password_is_and_to_is_a_name_even_when_it_is_a_keyword() -> None:
    tokens = [(t.kind, t.value) for t in tokenize("user keep password poll is here here to *", "rc")]
    assert tokens == [(WORD, "user"), (STRING, "keep"), (WORD, "password"), (STRING, "poll"), (WORD, "is"),
                      (STRING, "here"), (WORD, "here"), (WORD, "to"), (WILD, "*")]


def test_quoted_strings_keep_keywords_as_text_and_process_fetchmails_escapes() -> None:
    tokens = list(tokenize(r'''"keep" 'it\'s' "a\tb\x41\101\\" "say \"hi\"" nokeep = x''', "rc"))
    assert [(t.kind, t.value) for t in tokens] == [
        (STRING, "keep"), (STRING, "it's"), (STRING, "a\tbAe\\"), (STRING, 'say "hi"'), (WORD, "no"),
        (WORD, "keep"), (MAP, "="), (STRING, "x")]


def test_a_backslash_newline_continues_the_line_and_a_string_may_span_lines() -> None:
    tokens = list(tokenize('poll a \\\n  proto pop3 mda "x\ny"\nkeep', "rc"))
    assert [(t.value, t.line) for t in tokens] == [("poll", 1), ("a", 1), ("protocol", 2), ("pop3", 2),
                                                   ("mda", 2), ("x\ny", 2), ("keep", 4)]


def test_the_word_after_auth_is_an_authentication_type_even_password() -> None:
    entry = parse("poll h auth password user u pass p", "rc").entries[0]
    assert entry.options["auth"].value == "password"
    assert entry.users[0].remote == "u" and entry.users[0].options["password"].value == "p"


# --- errors name the file and the line -------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "line", "words"), [
    ("fetchmailrc-misspelt", 4, "unexpected 'protocl'"),
    ("fetchmailrc-unterminated", 2, "unterminated quoted string"),
    ("fetchmailrc-not-a-number", 2, "'limit' needs a number, found 'lots'"),
])
def test_a_broken_rc_file_is_one_error_with_file_and_line_and_exit_status_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, line: int, words: str) -> None:
    status, out, err, secrets = run_import(tmp_path, capsys, str(DATA / name))
    assert status == 2 and out == ""
    assert f"postbote: error: {DATA / name}:{line}: {words}" in err
    assert not secrets.exists()  # nothing written before the whole file parsed


@pytest.mark.parametrize(("text", "words"), [
    ("poll\n", "'poll' needs a server name"),
    ("poll h proto pop3\n user\n", "'user' needs a value"),
    ("keep\n", "expected 'poll', 'skip', 'defaults' or 'set'"),
    ("poll h user u is\n", "'is' needs a local name"),
    ("set daemon often\n", "'set daemon' needs a number of seconds"),
])
def test_grammar_errors_say_what_was_expected(text: str, words: str) -> None:
    with pytest.raises(MigrationError, match=r"^rc:\d+: .*") as caught:
        parse(text, "rc")
    assert words in str(caught.value)


# --- the mapping ------------------------------------------------------------------------------------------------


def test_a_simple_rc_file_becomes_a_config_postbote_reads(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err, secrets = run_import(tmp_path, capsys, str(DATA / "fetchmailrc-simple"))
    assert status == 0
    account = accounts_of(out)["joe.sixpack@pop.isp.example"]
    assert account == {
        "name": "joe.sixpack@pop.isp.example", "host": "pop.isp.example", "username": "joe.sixpack",
        "password_file": str(secrets / "joe.sixpack@pop.isp.example.password"), "keep": True,
        "max_size": 20000000, "max_messages": 200,
        "deliver": {"smtp": {"host": "localhost", "recipients": ["joe@localhost"]}}}
    assert yaml.safe_load(out)["defaults"] == {"poll_interval": 600}
    assert loads_as_postbote_config(tmp_path, out) == ["joe.sixpack@pop.isp.example"]
    assert "postbote import-state joe.sixpack@pop.isp.example ~/.fetchids" in out  # keep: no flood of old mail
    assert "set syslog" in err and "journal" in err


def test_passwords_go_to_0600_files_and_never_to_the_output(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("fetchmailrc-simple", "fetchmailrc-multidrop", "fetchmailrc-defaults", "fetchmailrc-quoting"):
        status, out, err, secrets = run_import(tmp_path / name, capsys, str(DATA / name))
        assert status == 0
        for account in accounts_of(out).values():
            path = Path(account["password_file"])
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        for password in PASSWORDS:
            assert password not in out and password not in err
    assert (tmp_path / "fetchmailrc-simple" / "secrets" / "joe.sixpack@pop.isp.example.password").read_text() \
        == 'p@ss"word\n'
    assert (tmp_path / "fetchmailrc-quoting" / "secrets" / "keep@mail.quoted.example.password").read_text() \
        == "tab\there!e\\\n"  # \101 is decimal in fetchmail


def test_multidrop_maps_the_login_and_one_destination_and_lists_the_routing_as_not_taken_over(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err, _ = run_import(tmp_path, capsys, str(DATA / "fetchmailrc-multidrop"))
    assert status == 0
    accounts = accounts_of(out)
    catchall = accounts["catchall@example.com"]  # an address as user name names the account alone
    assert catchall["tls"] == "starttls" and "port" not in catchall  # sslproto without ssl: STARTTLS on 110
    assert catchall["deliver"] == {"smtp": {"host": "mail.internal", "port": 2525,
                                            "recipients": ["postmaster@example.com"]}}  # smtpname
    assert accounts["domainbox@pop.other.example"]["deliver"]["smtp"]["recipients"] == ["me@localhost"]
    for words in ("multidrop (to alice bob charlie here)", "multidrop (to * here)", "localdomains example.com",
                  "envelope X-Original-To", "aka mail.example.com", "smtphost mail2.internal"):
        assert words in err and words in out  # on stderr and as YAML comments
    assert "fetchmailrc-multidrop:6: multidrop" in err  # with the line
    assert "no rewrite" not in err  # postbote never rewrites: nothing lost
    assert loads_as_postbote_config(tmp_path, out) == list(accounts)


def test_defaults_options_intervals_folders_mda_and_fingerprints(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err, _ = run_import(tmp_path, capsys, str(DATA / "fetchmailrc-defaults"))
    assert status == 0
    accounts = accounts_of(out)
    work = accounts["ann@imap.work.example"]
    assert work["protocol"] == "imap" and "tls" not in work  # ssl from defaults: implicit TLS on 993
    assert work["keep"] is True and work["fetch_all"] is True and work["timeout"] == 45  # from defaults
    assert work["folders"] == ["INBOX", "Lists/postbote dev", "Archive"]
    assert work["deliver"] == {"mda": ["/usr/bin/procmail", "-d", "ann"]}  # %T: the local user, no shell
    home = accounts["annie@imap.home.example"]
    assert "keep" not in home  # nokeep wins over the defaults
    assert home["auth"] == "cram-md5" and home["poll_interval"] == 1200  # interval 4 x set daemon 300
    assert home["deliver"] == {"mda": ["/bin/sh", "-c", "/usr/bin/spamc | /usr/bin/procmail -d ann"]}
    legacy = accounts["ann@legacy.example"]
    assert legacy["tls"] == "none"  # no ssl, sslproto ''
    assert legacy["deliver"] == {"lmtp": {"socket": "/run/dovecot/lmtp", "recipients": ["ann@localhost"]}}
    # fetchmail's fingerprints (MD5, SHA-1) cannot be converted: how to re-pin by SHA-256, in a comment
    assert "MD5 fingerprint 0B:1E:63:A0:5C:5E:0B:27:39:55:1F:09:8C:2E:2B:0A" in out
    assert "SHA1 fingerprint 3F:44:86" in out
    assert "openssl s_client -connect imap.work.example:993 -servername imap.work.example" in out
    assert "| openssl x509 -noout -fingerprint -sha256" in out
    assert '# tls_fingerprint: "SHA-256 FINGERPRINT HERE"' in out
    assert "fetchmailrc-defaults:13: sslfingerprint" in err
    for words in ("set postmaster", "flush", "dropstatus"):
        assert words in err
    assert "import-state ACCOUNT /home/ann/.fetchids" in out  # set idfile
    assert loads_as_postbote_config(tmp_path, out) == list(accounts)


def test_quoted_names_keywords_as_names_and_continued_lines(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _err, _ = run_import(tmp_path, capsys, str(DATA / "fetchmailrc-quoting"))
    assert status == 0
    accounts = accounts_of(out)
    assert set(accounts) == {"keep@mail.quoted.example", "poll@pop.single.example"}
    quoted = accounts["keep@mail.quoted.example"]
    assert quoted["host"] == "mail.quoted.example" and quoted["username"] == "keep"
    assert "port" not in quoted and "tls" not in quoted  # ssl on 995: the default
    assert quoted["fetch_all"] is True
    assert quoted["deliver"]["smtp"]["recipients"] == ["local user@localhost"]
    assert "keep" not in accounts["poll@pop.single.example"]


def test_skip_entries_are_listed_and_imported_only_when_asked(tmp_path: Path) -> None:
    rc = tmp_path / "rc"
    rc.write_text("poll a.example proto pop3 user x pass y\nskip b.example proto pop3 user z pass w\n")
    result = import_fetchmailrc(rc, local_user="me")
    assert [account.name for account in result.accounts] == ["x@a.example"]
    assert any("skip b.example" in str(note) and "--include-skipped" in str(note) for note in result.unmapped)
    assert [a.name for a in import_fetchmailrc(rc, include_skipped=True).accounts] == ["x@a.example", "z@b.example"]


def test_a_user_named_here_and_a_remote_name_there(tmp_path: Path) -> None:
    rc = tmp_path / "rc"
    rc.write_text("poll a.example proto pop3 user joe here is jsmith there password p\n")
    account = import_fetchmailrc(rc, local_user="me").accounts[0]
    assert account.keys["username"] == "jsmith"
    assert account.keys["deliver"]["smtp"]["recipients"] == ["joe@localhost"]


def test_unsupported_protocols_and_auth_are_listed(tmp_path: Path) -> None:
    rc = tmp_path / "rc"
    rc.write_text("poll a.example proto etrn auth gssapi user x pass y\npoll b.example user q pass r\n")
    result = import_fetchmailrc(rc, local_user="me")
    notes = [str(note) for account in result.accounts for note in account.unmapped]
    assert any("protocol etrn" in note for note in notes)
    assert any("auth gssapi" in note for note in notes)
    assert any("protocol auto" in note and "pop3 assumed" in note for note in notes)


def test_the_yaml_can_be_written_to_a_file_that_is_never_overwritten(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "out" / "postbote.yaml"
    target.parent.mkdir()
    assert main(["import", str(DATA / "fetchmailrc-simple"), "-o", str(target), "--local-user", "me"]) == 0
    assert (target.parent / "joe.sixpack@pop.isp.example.password").is_file()  # next to the output
    assert "joe.sixpack" in target.read_text()
    assert main(["import", str(DATA / "fetchmailrc-simple"), "-o", str(target)]) == 2
    assert "exists" in capsys.readouterr().err


def test_an_imap_account_without_fetchall_fetches_only_unseen_mail_as_fetchmail_did(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = tmp_path / "rc"
    rc.write_text('poll imap.example proto imap user u password "p" is u here keep ssl\n')
    status, out, _err, _ = run_import(tmp_path, capsys, str(rc))
    assert status == 0
    account = accounts_of(out)["u@imap.example"]
    assert account["unseen_only"] is True and account["keep"] is True
    assert "postbote mark-seen u@imap.example" in out  # the other way, in a comment
    assert "import-state" not in out  # fetchmail's .fetchids holds POP3 UIDs only
    assert loads_as_postbote_config(tmp_path, out) == ["u@imap.example"]


def test_the_imported_config_passes_postbote_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "imported.yaml"
    assert main(["import", str(DATA / "fetchmailrc-simple"), "-o", str(target), "--local-user", "me"]) == 0
    config = tmp_path / "postbote.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\n" + target.read_text())
    capsys.readouterr()
    assert main(["-c", str(config), "check"]) == 0
    assert "OK, 1 account(s)" in capsys.readouterr().out


def test_a_password_the_rc_file_lacks_is_taken_from_netrc_as_fetchmail_does(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = tmp_path / "rc"
    rc.write_text("poll pop.example proto pop3 user joe is joe here\npoll other.example proto pop3 user ann\n")
    netrc = tmp_path / "netrc"
    netrc.write_text("machine pop.example login joe password n3trc-secret\n")
    netrc.chmod(0o600)
    status, out, err, secrets = run_import(tmp_path, capsys, str(rc), "--netrc", str(netrc))
    assert status == 0
    assert (secrets / "joe@pop.example.password").read_text() == "n3trc-secret\n"
    assert "n3trc-secret" not in out + err
    assert not (secrets / "ann@other.example.password").exists()  # none anywhere: the user writes it
    assert "fetchmail had no password for this account" in out


def test_a_line_break_in_a_quoted_value_does_not_break_the_yaml(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    rc = tmp_path / "rc"
    rc.write_text('poll pop.example proto pop3 user joe pass p preconnect "echo one\\necho two"\n'
                  '  postconnect "echo\nthree"\n')
    status, out, _err, _ = run_import(tmp_path, capsys, str(rc))
    assert status == 0
    assert loads_as_postbote_config(tmp_path, out) == ["joe@pop.example"]
    assert "preconnect echo one\\necho two" in out


_RC_WORDS = st.sampled_from(["poll", "skip", "defaults", "set", "daemon", "user", "is", "to", "here", "there", "=",
                             "*", "password", "proto", "pop3", "imap", "port", "995", "ssl", "keep", "no", "nokeep",
                             "folder", "mda", "smtphost", "limit", "-1", "auth", "with", ";", ",", ":", "#", "\n",
                             "\\\n", '"', "'", '"x y"', "'a\\'b'", "\\x41", "host.example", "via", "envelope",
                             "localdomains", "sslfingerprint", "interval", "options", "aka"])


@settings(max_examples=400, deadline=None)
@given(st.lists(_RC_WORDS, max_size=30))
def test_any_rc_text_parses_or_is_one_migration_error(words: list[str]) -> None:
    """Whatever an rc file holds, the import ends with accounts or with one FILE:LINE error -- never a crash."""
    from postbote.migrate.fetchmailrc import map_rcfile

    try:
        map_rcfile(parse(" ".join(words), "rc"), "rc", include_skipped=True)
    except MigrationError as exc:
        assert str(exc).startswith("rc:")
