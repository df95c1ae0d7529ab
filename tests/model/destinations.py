"""The seven destination kinds of the model, each able to fail on a schedule, and what each has received.

A schedule is per poll: the i-th delivery attempt to that destination in the poll gets the i-th `Outcome`
(attempts past the schedule succeed). Where the real destination can be told to fail, it is: the SMTP and LMTP
servers (`FaultySMTP`: 451, 550, or the connection dropped after the data), the MDA (a shell script that exits 75
or 1, or kills itself, as its schedule file says) and IMAP: a real Dovecot, one folder of its one user per
destination, behind an `AppendProxy` that answers the i-th APPEND with ``NO [OVERQUOTA]`` or ``NO`` itself, or cuts
the connection halfway through its literal, so that Dovecot never holds a message postbote was told it refused;
and Gmail: `GmailAPIServer`, the stand-in for the Gmail API, one per destination, whose i-th import answers 503
(Retry-After 0), 400, or is read whole and left unanswered (not stored, as for the others), as its schedule says
(after a 503 postbote defers the rest of the poll for that mailbox, so later entries may never be reached).
Dovecot starts with the first IMAP destination and serves the whole test session (`stop_shared_servers`).
A Maildir or an mbox cannot be made to refuse one message on demand when the tests run as root, so their refusals
come from the model plugin (`runner.ModelPlugin`), which answers ``deliver_message`` for that destination before the
real plugin does.
"""

from __future__ import annotations

import enum
import itertools
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from postbote.plugins.mbox import mboxrd_messages
from postbote.testing.gmail_api import Fault as GmailFault
from postbote.testing.gmail_api import GmailAPIServer

from tests.harness import MaildirTarget
from tests.model.imap_proxy import AppendProxy, Cut, Fault, Refuse
from tests.servers.certs import TestPKI, make_test_pki
from tests.servers.dovecot import DovecotServer, dovecot_binary
from tests.servers.faulty_smtp import DROP, FaultySMTP

RECIPIENT = "me@example.org"


class Kind(enum.Enum):
    MAILDIR = "maildir"
    MBOX = "mbox"
    MDA = "mda"
    SMTP = "smtp"
    LMTP = "lmtp"
    IMAP = "imap"
    GMAIL = "gmail"

    @property
    def refused_by_plugin(self) -> bool:
        """Whether the model plugin, not the destination itself, plays its refusals."""
        return self in (Kind.MAILDIR, Kind.MBOX)


class Outcome(enum.Enum):
    OK = "ok"
    TEMPORARY = "temporary"  # 451 / exit 75
    PERMANENT = "permanent"  # 550 / exit 1
    CRASH = "crash"          # SMTP/LMTP: connection dropped after the data; MDA: killed by a signal


SMTP_REPLIES: dict[Outcome, Any] = {Outcome.TEMPORARY: "451 4.3.0 model: try again later",
                                    Outcome.PERMANENT: "550 5.7.1 model: refused", Outcome.CRASH: DROP}
IMAP_FAULTS: dict[Outcome, Fault] = {Outcome.TEMPORARY: Refuse("NO [OVERQUOTA] model: mailbox full"),
                                     Outcome.PERMANENT: Refuse("NO model: refused"), Outcome.CRASH: Cut()}
IMAP_USER = "model"
GMAIL_TOKEN = "model-access-token"
GMAIL_FAULTS: dict[Outcome, Callable[[], GmailFault]] = {
    Outcome.OK: lambda: GmailFault("import", status=200),
    Outcome.TEMPORARY: lambda: GmailFault("import", status=503, retry_after="0"),
    Outcome.PERMANENT: lambda: GmailFault("import", status=400, reason="invalidArgument", message="model: refused"),
    Outcome.CRASH: lambda: GmailFault("import", drop=True),  # read whole, then cut: in doubt, never stored
}


class _SharedPKI:
    """A certificate for the Gmail stand-ins, made once per test session."""

    pki: TestPKI | None = None

    @classmethod
    def get(cls) -> TestPKI:
        if cls.pki is None:
            cls.pki = make_test_pki(Path(tempfile.mkdtemp(prefix="postbote-model-pki-")))
        return cls.pki


class _SharedDovecot:
    """The model's Dovecot: started with the first IMAP destination, stopped by `stop_shared_servers`."""

    server: DovecotServer | None = None
    folders = itertools.count(1)

    @classmethod
    def get(cls) -> DovecotServer:
        if cls.server is None:
            server = DovecotServer(tls=False, users={IMAP_USER: "model-secret"})
            server.start()
            cls.server = server
        return cls.server


def imap_available() -> bool:
    """Whether IMAP destinations can be drawn: Dovecot is installed (CI installs it)."""
    return dovecot_binary() is not None


def stop_shared_servers() -> None:
    if _SharedDovecot.server is not None:
        _SharedDovecot.server.stop()
        _SharedDovecot.server = None

# The MDA: appends its input to a new file, which it keeps only when its schedule says the delivery succeeds.
MDA_SCRIPT = """#!/bin/sh
here=$(dirname "$0")
n=$(( $(cat "$here/count") + 1 ))
echo $n > "$here/count"
outcome=$(sed -n "${n}p" "$here/schedule")
cat > "$here/incoming.$n" || exit 75
case "$outcome" in
  temporary) rm -f "$here/incoming.$n"; exit 75 ;;
  permanent) rm -f "$here/incoming.$n"; echo "model: refused" >&2; exit 1 ;;
  crash) rm -f "$here/incoming.$n"; kill -9 $$ ;;
esac
mv "$here/incoming.$n" "$here/copies/$$.$n"
exit 0
"""


@dataclass
class Destination:
    """One configured destination of a case; `index` is its position in the account's ``deliver`` list."""

    kind: Kind
    index: int
    directory: Path
    server: FaultySMTP | None = None
    proxy: AppendProxy | None = None
    folder: str = ""
    gmail: GmailAPIServer | None = None

    @classmethod
    def create(cls, kind: Kind, index: int, directory: Path) -> Destination:
        directory.mkdir(parents=True, exist_ok=True)
        destination = cls(kind, index, directory)
        if kind is Kind.MDA:
            (directory / "copies").mkdir()
            (directory / "count").write_text("0\n")
            (directory / "schedule").write_text("")
            script = directory / "deliver.sh"
            script.write_text(MDA_SCRIPT)
            script.chmod(0o755)
        elif kind in (Kind.SMTP, Kind.LMTP):
            destination.server = FaultySMTP(lmtp=kind is Kind.LMTP).start()
        elif kind is Kind.IMAP:
            dovecot = _SharedDovecot.get()
            destination.proxy = AppendProxy((dovecot.host, dovecot.imap_port))
            destination.folder = f"model{next(_SharedDovecot.folders)}"  # created by the first APPEND (TRYCREATE)
        elif kind is Kind.GMAIL:
            destination.gmail = GmailAPIServer(_SharedPKI.get().server_context(), directory / "gmail",
                                               lambda token: "model" if token == GMAIL_TOKEN else None).start()
        return destination

    @property
    def label(self) -> str:
        return f"{self.kind.value}#{self.index}"

    def config(self) -> dict[str, Any]:
        """The entry for the account's ``deliver`` list."""
        if self.kind is Kind.MAILDIR:
            return {"maildir": str(self.directory / "Maildir")}
        if self.kind is Kind.MBOX:
            return {"mbox": str(self.directory / "mbox")}
        if self.kind is Kind.MDA:
            return {"mda": {"command": [str(self.directory / "deliver.sh")], "timeout": "10s"}}
        if self.kind is Kind.IMAP:
            assert self.proxy is not None
            return {"imap": {"host": self.proxy.host, "port": self.proxy.port, "tls": "none", "username": IMAP_USER,
                             "password": _SharedDovecot.get().password(IMAP_USER), "folder": self.folder,
                             "timeout": "2s"}}
        if self.kind is Kind.GMAIL:
            assert self.gmail is not None
            return {"gmail": {"api_url": self.gmail.base_url, "tls_ca_file": str(_SharedPKI.get().ca_file),
                              "token_command": ["/bin/echo", GMAIL_TOKEN], "timeout": "2s", "rate_limit": 1000}}
        assert self.server is not None
        return {self.kind.value: {"host": self.server.host, "port": self.server.port, "recipients": [RECIPIENT],
                                  "timeout": "2s"}}

    def schedule(self, outcomes: tuple[Outcome, ...]) -> None:
        """Make the next poll's attempts fail as ``outcomes`` says (plugin-played kinds: see `runner.ModelPlugin`)."""
        if self.kind is Kind.MDA:
            (self.directory / "count").write_text("0\n")
            (self.directory / "schedule").write_text("".join(f"{o.value}\n" for o in outcomes))
        elif self.gmail is not None:
            self.gmail.faults[:] = [GMAIL_FAULTS[outcome]() for outcome in outcomes]
        elif self.proxy is not None:
            self.proxy.reset({attempt: IMAP_FAULTS[outcome] for attempt, outcome in enumerate(outcomes, start=1)
                              if outcome is not Outcome.OK})
        elif self.server is not None:
            self.server.clear_rules()
            for attempt, outcome in enumerate(outcomes, start=1):
                if outcome is not Outcome.OK:
                    self.server.on("END", SMTP_REPLIES[outcome], nth=attempt)

    def attempts_in_last_poll(self) -> int | None:
        """Delivery attempts the destination saw since `schedule` (None: only the model plugin knows)."""
        if self.kind is Kind.MDA:
            return int((self.directory / "count").read_text())
        return None

    def copies(self) -> list[bytes]:
        """Every copy the destination durably holds, as stored."""
        if self.kind is Kind.MAILDIR:
            return MaildirTarget(self.directory / "Maildir").delivered()
        if self.kind is Kind.MBOX:
            path = self.directory / "mbox"
            return mboxrd_messages(path.read_bytes()) if path.exists() and path.stat().st_size else []
        if self.kind is Kind.MDA:
            return [file.read_bytes() for file in sorted((self.directory / "copies").iterdir())]
        if self.gmail is not None:  # as postbote sent them, the Received: field on top
            return [imported.data() for imported in self.gmail.imported]
        if self.kind is Kind.IMAP:  # Dovecot's Maildir++ folder, read from disk: LF line ends, bytes as sent
            return MaildirTarget(_SharedDovecot.get().maildir(IMAP_USER) / f".{self.folder}").delivered()
        assert self.server is not None
        return self.server.copies_for(RECIPIENT)

    def stray_partial_files(self) -> int:
        """MDA inputs cut short by a killed postbote (the MDA saw end of input), left unaccepted here."""
        if self.kind is not Kind.MDA:
            return 0
        return len([name for name in os.listdir(self.directory) if name.startswith("incoming.")])

    def answers_lost(self) -> int:
        """Messages the SMTP/LMTP server read whole and then dropped the connection instead of answering: deliveries
        in doubt, which postbote counts like a crash mid-delivery (two of them hold the message)."""
        if self.proxy is not None:  # an APPEND cut after postbote sent it whole is in doubt to postbote too
            return sum(1 for _, fault in self.proxy.fired if isinstance(fault, Cut))
        if self.gmail is not None:  # stored, then the connection dropped: in doubt
            return sum(1 for fault in self.gmail.fired if fault.drop)
        if self.server is None:
            return 0
        return sum(1 for received in self.server.received if received.replies is None)

    def refusals_fired(self) -> int:
        """Faults the SMTP/LMTP server or the APPEND proxy has played so far."""
        if self.proxy is not None:
            return len(self.proxy.fired)
        if self.gmail is not None:
            return len(self.gmail.fired)
        return len(self.server.fired) if self.server is not None else 0

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        if self.proxy is not None:
            self.proxy.stop()
        if self.gmail is not None:
            self.gmail.stop()
            assert self.gmail.refused == [], f"postbote sent requests Gmail would refuse: {self.gmail.refused}"
