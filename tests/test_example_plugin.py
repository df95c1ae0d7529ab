"""The example plugin in examples/plugins works as its docstring says, through a real poll (issue #3)."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

from postbote.testing import poll_once
from postbote.testing.pop3server import POP3Server

from tests.harness import strip_trace_header, to_crlf

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "plugins"

LIST_MAIL = b"From: dev@lists.example\r\nList-Id: Developers <devel.lists.example>\r\nSubject: release\r\n\r\nhi\r\n"
NEWSLETTER = b"From: Shop <news@shop.example>\r\nSubject: offers\r\n\r\nbuy\r\n"
PERSONAL = b"From: friend@example.org\r\nSubject: lunch?\r\n\r\n12:30\r\n"


def poll(tmp_path: Path, server: POP3Server) -> list[bytes]:
    config_path = tmp_path / "postbote.yaml"
    config_path.write_text(textwrap.dedent(f"""\
        state_dir: {tmp_path / 'state'}
        plugin_paths: [{EXAMPLES}]
        plugins:
          mailing_lists: {{drop_from: [news@shop.example]}}
        accounts:
          - {{name: me, host: 127.0.0.1, port: {server.port}, tls: none, username: demo, password: demo,
              deliver: {{maildir: {tmp_path / 'Maildir'}}}}}
        """))
    os.chmod(config_path, 0o600)
    stats = poll_once(config_path)
    assert stats.ok
    return [p.read_bytes() for p in (tmp_path / "Maildir" / "new").iterdir()]


def test_list_mail_is_tagged_newsletters_dropped_and_personal_mail_untouched(tmp_path: Path) -> None:
    with POP3Server([LIST_MAIL, NEWSLETTER, PERSONAL]) as server:
        delivered = poll(tmp_path, server)
        assert server.uids() == []
    subjects = sorted(line for data in delivered for line in data.splitlines() if line.startswith(b"Subject:"))
    assert subjects == [b"Subject: [devel] release", b"Subject: lunch?"]
    personal = next(d for d in delivered if b"lunch" in d)
    assert personal.split(b"\n", 3)[3] == PERSONAL.replace(b"\r\n", b"\n")


def test_the_example_source_plugin_takes_a_spool_directory_as_a_mailbox(tmp_path: Path) -> None:
    """examples/plugins/spool_directory.py, the example of docs/plugins.md's "A mail source": the files in the
    directory are delivered, then removed; a second poll finds nothing new."""
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "scan-1.eml").write_bytes(PERSONAL)
    (spool / "scan-2.eml").write_bytes(LIST_MAIL)
    config_path = tmp_path / "postbote.yaml"
    config_path.write_text(textwrap.dedent(f"""\
        state_dir: {tmp_path / 'state'}
        plugin_paths: [{EXAMPLES / 'spool_directory.py'}]
        accounts:
          - {{name: scanner, protocol: spooldir, directory: {spool}, deliver: {{maildir: {tmp_path / 'Maildir'}}}}}
        """))
    stats = poll_once(config_path)
    assert stats.ok and (stats.delivered, stats.deleted) == (2, 2)
    delivered = sorted(p.read_bytes() for p in (tmp_path / "Maildir" / "new").iterdir())
    assert sorted(strip_trace_header(to_crlf(data)) for data in delivered) == sorted([PERSONAL, LIST_MAIL])
    assert list(spool.iterdir()) == []
    assert poll_once(config_path).listed == 0
