"""How each tool is told to fetch one mailbox (or, for postbote, many) into a Maildir or to an SMTP sink.

The peers' command lines follow ``../shared/field-notes.md`` ("Running the peers for a benchmark"):

* fetchmail -- an rc file (it reads passwords only from there or ``~/.netrc``); Maildir through the
  ``safecat`` MDA, one process per message; SMTP natively, one session per poll.
* mpop -- everything on the command line; ``--delivery=maildir`` or ``--delivery=mda`` with msmtp
  (mpop has no SMTP client), one msmtp process and SMTP session per message.
* getmail6 -- an rc file; ``Maildir`` destination, or ``MDA_external`` running msmtp per message.
* postbote -- a YAML config; ``postbote poll`` (all accounts) or ``postbote poll ACCOUNT``.

Every tool gets a fresh state directory per run, so each run fetches everything; every tool deletes what
it delivered (``delete``/``nokeep``/``--keep=off``) and fetches all messages.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from bench.corpus import RECIPIENT
from bench.environment import RunUser, find_binary


@dataclass(frozen=True)
class Mailbox:
    """One POP3 account on the benchmark's Dovecot (possibly behind the delaying relay)."""

    name: str
    user: str
    password: str
    host: str
    port: int


@dataclass(frozen=True)
class Target:
    kind: Literal["maildir", "smtp"]
    maildir: Path | None = None
    smtp_port: int | None = None
    recipient: str = RECIPIENT


@dataclass(frozen=True)
class Job:
    mailboxes: tuple[Mailbox, ...]
    target: Target
    workdir: Path
    one_by_one: bool = False  # postbote only: `postbote poll ACCOUNT` for each account, in sequence
    max_parallel: int | None = None


@dataclass(frozen=True)
class Runtime:
    """What the tools need from the environment."""

    user: RunUser
    postbote_python: Path
    postbote_code: Path

    def env(self) -> dict[str, str]:
        return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(self.user.home), "USER": self.user.name,
                "LOGNAME": self.user.name, "LANG": "C.UTF-8", "TZ": "UTC"}


class Tool:
    name = ""
    binaries: Sequence[str] = ()
    smtp_helper = ""  # shown in the label when the tool needs msmtp to speak SMTP

    def label(self, target: Target) -> str:
        return f"{self.name}+{self.smtp_helper}" if target.kind == "smtp" and self.smtp_helper else self.name

    def missing(self, target: Target) -> str | None:
        """Why the tool cannot run against ``target`` (a binary is not installed), or None."""
        needed = [*self.binaries, *([self.smtp_helper] if target.kind == "smtp" and self.smtp_helper else [])]
        absent = [name for name in needed if find_binary(name) is None]
        return f"not installed: {', '.join(absent)}" if absent else None

    def commands(self, job: Job, runtime: Runtime) -> list[list[str]]:
        raise NotImplementedError

    def env(self, runtime: Runtime) -> dict[str, str]:
        return runtime.env()


def _single(job: Job) -> Mailbox:
    if len(job.mailboxes) != 1 or job.one_by_one:
        raise ValueError("this tool is run against one mailbox")
    return job.mailboxes[0]


def _write_private(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def _msmtp_argv(target: Target, sender: str) -> list[str]:
    return [find_binary("msmtp") or "msmtp", "--host=127.0.0.1", f"--port={target.smtp_port}", "--tls=off",
            "--auth=off", f"--from={sender}", "--", target.recipient]


class Postbote(Tool):
    name = "postbote"

    def commands(self, job: Job, runtime: Runtime) -> list[list[str]]:
        config = _write_private(job.workdir / "postbote.yaml", self.config(job))
        base = [str(runtime.postbote_python), "-m", "postbote", "-c", str(config), "poll"]
        if job.one_by_one:
            return [[*base, mailbox.name] for mailbox in job.mailboxes]
        return [base]

    def env(self, runtime: Runtime) -> dict[str, str]:
        return {**runtime.env(), "PYTHONPATH": str(runtime.postbote_code)}

    @staticmethod
    def config(job: Job) -> str:
        """The YAML config (written as JSON, a subset of YAML, so no quoting questions arise)."""
        if job.target.kind == "maildir":
            deliver: dict[str, object] = {"maildir": str(job.target.maildir)}
        else:
            deliver = {"smtp": {"host": "127.0.0.1", "port": job.target.smtp_port,
                                "recipients": [job.target.recipient]}}
        config: dict[str, object] = {
            "state_dir": str(job.workdir / "state"),
            "log": {"level": "warning", "format": "json"},
            "defaults": {"tls": "none", "timeout": "300s", "deliver": deliver},
            "accounts": [{"name": m.name, "host": m.host, "port": m.port, "username": m.user,
                          "password": m.password} for m in job.mailboxes],
        }
        if job.max_parallel is not None:
            config["max_parallel"] = job.max_parallel
        return json.dumps(config, indent=2) + "\n"


class Fetchmail(Tool):
    name = "fetchmail"
    binaries = ("fetchmail", "safecat")

    def commands(self, job: Job, runtime: Runtime) -> list[list[str]]:
        mailbox = _single(job)
        target = job.target
        if target.kind == "maildir":
            assert target.maildir is not None
            destination = (f'mda "{find_binary("safecat")} {target.maildir / "tmp"} {target.maildir / "new"}"')
        else:
            destination = f'smtphost "127.0.0.1/{target.smtp_port}" smtpname "{target.recipient}"'
        rc = _write_private(job.workdir / "fetchmailrc", (
            f"poll {mailbox.host} protocol pop3 port {mailbox.port} auth password timeout 300\n"
            f'  user "{mailbox.user}" password "{mailbox.password}"\n'
            f"  sslproto '' fetchall nokeep {destination}\n"))
        return [[find_binary("fetchmail") or "fetchmail", "-d0", "-s", "--nosyslog", "-f", str(rc),
                 "-i", str(job.workdir / ".fetchids"), "--pidfile", str(job.workdir / "fetchmail.pid")]]


class Mpop(Tool):
    name = "mpop"
    binaries = ("mpop",)
    smtp_helper = "msmtp"

    def commands(self, job: Job, runtime: Runtime) -> list[list[str]]:
        mailbox = _single(job)
        target = job.target
        if target.kind == "maildir":
            delivery = f"maildir,{target.maildir}"
        else:
            delivery = "mda," + " ".join(_msmtp_argv(target, "%F"))
        return [[find_binary("mpop") or "mpop", "-q", f"--host={mailbox.host}", f"--port={mailbox.port}",
                 "--tls=off", "--auth=user", f"--user={mailbox.user}", f"--passwordeval=echo {mailbox.password}",
                 "--only-new=off", "--keep=off", "--timeout=300", f"--uidls-file={job.workdir / 'uidls'}",
                 f"--delivery={delivery}"]]


class Getmail(Tool):
    name = "getmail6"
    binaries = ("getmail",)
    smtp_helper = "msmtp"

    def commands(self, job: Job, runtime: Runtime) -> list[list[str]]:
        mailbox = _single(job)
        target = job.target
        if target.kind == "maildir":
            destination = f"type = Maildir\npath = {target.maildir}/\n"
        else:
            msmtp, *arguments = _msmtp_argv(target, "%(sender)")
            destination = (f"type = MDA_external\npath = {msmtp}\n"
                           f"arguments = ({', '.join(json.dumps(a) for a in arguments)},)\n")
        _write_private(job.workdir / "getmailrc", (
            "[retriever]\ntype = SimplePOP3Retriever\n"
            f"server = {mailbox.host}\nport = {mailbox.port}\nusername = {mailbox.user}\n"
            f"password = {mailbox.password}\ntimeout = 20\n\n"
            f"[destination]\n{destination}\n"
            "[options]\nread_all = false\ndelete = true\nverbose = 0\n"))
        return [[find_binary("getmail") or "getmail", "-q", f"--getmaildir={job.workdir}", "--rcfile=getmailrc"]]


TOOLS: dict[str, Tool] = {tool.name: tool for tool in (Postbote(), Fetchmail(), Mpop(), Getmail())}
