"""The example plugin in examples/plugins works as its docstring says, through a real poll (issue #3)."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

from postbote.testing import poll_once
from postbote.testing.pop3server import POP3Server

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
