"""ID (RFC 2971) after login (issue 13): a server that offers ID is told postbote's name and version and nothing
else; a server that does not offer it is sent none; a server that refuses it (NO or BAD) still gets its session.
Against the scriptable IMAP server of `postbote.testing.imapserver`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from postbote import Secret, __version__
from postbote.plugins.imap.client import IMAPClient
from postbote.plugins.imap.login import open_session
from postbote.plugins.imap.settings import ConnectionSettings, TLSMode
from postbote.plugins.signin.passwords import PasswordKind, PasswordSource
from postbote.plugins.signin.settings import AuthChoice, Credentials
from postbote.testing.imapserver import DEFAULT_CAPABILITIES, Action, Faults, IMAPServer

from tests.harness import RecordingLog

WITH_ID = (*DEFAULT_CAPABILITIES, "ID")
SERVER_ID = '* ID ("name" "fake IMAP" "version" "1")\r\n{tag} OK ID completed'


def session(server: IMAPServer) -> IMAPClient:
    password = PasswordSource(PasswordKind.INLINE, inline=Secret("demo"))
    conn = ConnectionSettings(host=server.host, port=server.port, tls=TLSMode.NONE, username="demo",
                              auth=AuthChoice.AUTO, credentials=Credentials(password=password))
    return open_session(conn, account="work", state_dir=None, timeout=5, deadline=None, log=RecordingLog())


def id_commands(server: IMAPServer) -> list[str]:
    return [command for command in server.commands if command.split(" ", 1)[0] == "ID"]


@pytest.fixture
def offering_id() -> Iterator[IMAPServer]:
    with IMAPServer(capabilities=WITH_ID, faults=Faults().on("ID", action=Action.reply(SERVER_ID))) as server:
        yield server


def test_a_server_that_offers_id_is_told_postbotes_name_and_version_only(offering_id: IMAPServer) -> None:
    client = session(offering_id)
    client.logout()

    assert id_commands(offering_id) == [f'ID ("name" "postbote" "version" "{__version__}")']
    assert offering_id.commands.index(id_commands(offering_id)[0]) > offering_id.commands.index("AUTHENTICATE")
    assert "demo" not in id_commands(offering_id)[0]  # nothing of the user
    assert offering_id.errors == []


def test_a_server_that_does_not_offer_id_is_sent_none() -> None:
    with IMAPServer() as server:
        assert "ID" not in server.capabilities
        client = session(server)
        client.select("INBOX")
        client.logout()
        assert id_commands(server) == []
        assert server.errors == []


@pytest.mark.parametrize("answer", [Action.no(text="ID not allowed"), Action.bad("unknown command")],
                         ids=["NO", "BAD"])
def test_a_refused_id_does_not_stop_the_session(answer: Action) -> None:
    server = IMAPServer(capabilities=WITH_ID, faults=Faults().on("ID", action=answer))
    server.add_message("INBOX", b"Subject: still fetched\r\n\r\nbody\r\n")
    with server:
        client = session(server)
        selected = client.select("INBOX")
        client.logout()
        assert len(id_commands(server)) == 1
        assert selected.exists == 1
        assert server.errors == []
