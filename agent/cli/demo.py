"""``postbote demo``: the main job end to end with nothing installed but postbote.

Starts the built-in POP3 server on a loopback port with sample messages (among them the kinds that trip other
tools: a line that is only a dot, 8-bit text, an attachment), writes an ordinary config file for it, polls it
exactly as ``postbote poll`` would (the ``poll`` command itself, inside the CLI's error boundary), and delivers into
a Maildir whose path it prints.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import tempfile
from email.utils import formatdate, make_msgid
from pathlib import Path

from postbote.cli.boundary import guarded
from postbote.cli.poll import run as run_poll
from postbote.testing.pop3server import POP3Server

DEMO_USER, DEMO_PASSWORD = "demo", "demo-password"

CONFIG_TEMPLATE = """\
# Written by `postbote demo`: an ordinary postbote config, pointing at the built-in demo POP3 server.
state_dir: {state_dir}
log: {{level: {log_level}, format: {log_format}}}
accounts:
  - name: demo
    host: 127.0.0.1
    port: {port}
    tls: none            # loopback demo server only; real accounts use implicit TLS or starttls
    username: {user}
    password: {password}
    deliver:
      maildir: {maildir}
"""


def sample_messages(extra: int = 0) -> list[bytes]:
    def message(subject: str, body: str, headers: str = "", charset: str = "us-ascii") -> bytes:
        head = (f"From: Postbote Demo <demo@example.org>\r\nTo: you@example.org\r\nSubject: {subject}\r\n"
                f"Date: {formatdate(localtime=True)}\r\nMessage-ID: {make_msgid('demo')}\r\n"
                f"Return-Path: <demo@example.org>\r\nMIME-Version: 1.0\r\n{headers}")
        if "Content-Type" not in headers:
            head += f"Content-Type: text/plain; charset={charset}\r\nContent-Transfer-Encoding: 8bit\r\n"
        return (head + "\r\n" + body).encode("utf-8")

    attachment = base64.encodebytes(bytes(range(256)) * 64).decode().replace("\n", "\r\n")
    messages = [
        message("Welcome to postbote", "This message came from a POP3 server and went into your Maildir.\r\n"),
        message("Dots survive", "A line with only a dot follows:\r\n.\r\n..and one that starts with two.\r\n"),
        message("Grüße aus Köln", "8-bit text passes through untouched: Grüße, 日本語, naïve café.\r\n",
                charset="utf-8"),
        message("An attachment", "--b\r\nContent-Type: text/plain\r\n\r\nSee the attachment.\r\n--b\r\n"
                "Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
                f"{attachment}--b--\r\n", headers='Content-Type: multipart/mixed; boundary="b"\r\n'),
    ]
    messages += [message(f"Generated message {n}", f"Body of message {n}.\r\n") for n in range(1, extra + 1)]
    return messages


def run(args: argparse.Namespace) -> int:
    return run_demo(maildir=args.maildir, extra_messages=args.messages, log_format=args.log_format or "auto",
                    log_level=args.log_level or "info")


def poll_config(config: Path) -> int:
    """``postbote -c CONFIG poll``: one line and an exit status for an error, as on the command line."""
    poll_args = argparse.Namespace(config=str(config), log_level=None, log_format=None, accounts=[])
    return guarded(lambda: run_poll(poll_args))


def run_demo(*, maildir: str | None, extra_messages: int | None, log_format: str, log_level: str) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="postbote-demo-"))
    target = Path(maildir).resolve() if maildir else workdir / "Maildir"
    with POP3Server(sample_messages(extra_messages or 0), users={DEMO_USER: DEMO_PASSWORD}) as server:
        config = workdir / "postbote.yaml"
        config.write_text(CONFIG_TEMPLATE.format(state_dir=workdir / "state", port=server.port, user=DEMO_USER,
                                                 password=DEMO_PASSWORD, maildir=target, log_format=log_format,
                                                 log_level=log_level))
        os.chmod(config, 0o600)
        print(f"postbote demo: POP3 server on 127.0.0.1:{server.port} with {len(server.uids())} messages; "
              f"config {config}", file=sys.stderr)
        status = poll_config(config)
        left = len(server.uids())
    delivered = sorted((target / "new").glob("*")) if (target / "new").is_dir() else []
    print(f"postbote demo: {len(delivered)} message(s) delivered to the Maildir {target} "
          f"({left} left on the server); exit status {status}")
    for path in delivered[:10]:
        print(f"  {path}")
    return status
