"""The Gmail API stand-in refuses what the real API would refuse, so that a wrong request from postbote fails a
test: checked here with the standard library's `http.client`, an independent client, request by request."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from postbote.testing.gmail_api import GmailAPIServer

from tests.servers.certs import TestPKI

pytestmark = pytest.mark.usefixtures("time_limit")

TOKEN = "good-token"
IMPORT = "/upload/gmail/v1/users/me/messages/import"
MESSAGE = b"Subject: hi\r\n\r\nhello\r\n"


@pytest.fixture
def gmail(pki: TestPKI, tmp_path: Path) -> Iterator[GmailAPIServer]:
    with GmailAPIServer(pki.server_context(), tmp_path / "gmail", lambda token: "me" if token == TOKEN else None) \
            as server:
        yield server


def request(gmail: GmailAPIServer, pki: TestPKI, method: str, path: str, body: bytes = b"",
            headers: dict[str, str] | None = None, token: str = TOKEN) -> tuple[int, dict[str, str], dict]:
    connection = http.client.HTTPSConnection("127.0.0.1", int(gmail.base_url.rsplit(":", 1)[1]),
                                             context=pki.client_context(), timeout=10)
    try:
        connection.request(method, path, body=body, headers={"Authorization": f"Bearer {token}", **(headers or {})})
        response = connection.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(data) if data else {}
    finally:
        connection.close()


def multipart(metadata: dict, message: bytes, boundary: str = "b0undary") -> tuple[bytes, dict[str, str]]:
    body = (f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{json.dumps(metadata)}\r\n"
            f"--{boundary}\r\nContent-Type: message/rfc822\r\n\r\n").encode() + message + \
        f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f'multipart/related; boundary="{boundary}"'}


def test_a_well_formed_multipart_import_is_stored_with_its_labels_and_answered_with_an_id(
        gmail: GmailAPIServer, pki: TestPKI) -> None:
    body, headers = multipart({"labelIds": ["INBOX"]}, MESSAGE)
    status, _, answer = request(gmail, pki, "POST", f"{IMPORT}?uploadType=multipart&internalDateSource=dateHeader",
                                body, headers)
    assert status == 200 and answer["id"] == gmail.imported[0].id
    assert gmail.imported[0].data() == MESSAGE and gmail.imported[0].label_ids == ["INBOX"]
    assert gmail.refused == []


@pytest.mark.parametrize(("query", "metadata", "expected"), [
    ("uploadType=media", {"labelIds": ["INBOX"]}, "uploadType=media"),
    ("uploadType=multipart&internalDateSource=date_header", {}, "Invalid value at 'internalDateSource'"),
    ("uploadType=multipart&labelIds=INBOX", {}, 'Unknown name "labelIds"'),
    ("uploadType=multipart", {"labelIds": ["INBOX"], "raw": "x"}, "Unexpected fields"),
])
def test_a_request_gmail_would_refuse_is_refused_with_gmails_error_body(
        gmail: GmailAPIServer, pki: TestPKI, query: str, metadata: dict, expected: str) -> None:
    body, headers = multipart(metadata, MESSAGE)
    status, _, answer = request(gmail, pki, "POST", f"{IMPORT}?{query}", body, headers)
    assert status == 400 and expected in answer["error"]["message"]
    assert answer["error"]["errors"][0]["reason"] and answer["error"]["status"] == "INVALID_ARGUMENT"
    assert gmail.imported == [] and len(gmail.refused) == 1


def test_a_multipart_body_above_5_mb_and_a_broken_multipart_body_are_refused(gmail: GmailAPIServer,
                                                                             pki: TestPKI) -> None:
    big, headers = multipart({}, b"Subject: big\r\n\r\n" + b"x" * (6 * 1024 * 1024))
    assert request(gmail, pki, "POST", f"{IMPORT}?uploadType=multipart", big, headers)[0] == 400
    body, headers = multipart({}, MESSAGE)
    assert request(gmail, pki, "POST", f"{IMPORT}?uploadType=multipart", body[:-4], headers)[0] == 400
    assert gmail.imported == [] and len(gmail.refused) == 2


def test_a_missing_or_unknown_token_gets_gmails_401_and_a_label_that_does_not_exist_a_400(
        gmail: GmailAPIServer, pki: TestPKI) -> None:
    body, headers = multipart({"labelIds": ["INBOX"]}, MESSAGE)
    status, answer_headers, answer = request(gmail, pki, "POST", f"{IMPORT}?uploadType=multipart", body, headers,
                                             token="expired")
    assert status == 401 and answer["error"]["status"] == "UNAUTHENTICATED"
    assert answer_headers["www-authenticate"].startswith("Bearer")
    body, headers = multipart({"labelIds": ["Label_99"]}, MESSAGE)
    status, _, answer = request(gmail, pki, "POST", f"{IMPORT}?uploadType=multipart", body, headers)
    assert status == 400 and answer["error"]["message"] == "Invalid label: Label_99"


def test_a_resumable_upload_opens_a_session_takes_the_bytes_in_two_parts_and_says_how_much_arrived(
        gmail: GmailAPIServer, pki: TestPKI) -> None:
    status, headers, _ = request(gmail, pki, "POST", f"{IMPORT}?uploadType=resumable",
                                 json.dumps({"labelIds": ["INBOX"]}).encode(),
                                 {"Content-Type": "application/json; charset=UTF-8",
                                  "X-Upload-Content-Type": "message/rfc822",
                                  "X-Upload-Content-Length": str(len(MESSAGE))})
    assert status == 200
    session = headers["location"].removeprefix(gmail.base_url)
    assert request(gmail, pki, "PUT", session, b"", {"Content-Range": f"bytes */{len(MESSAGE)}"})[0] == 308
    # a PUT whose length is not the rest of the message is refused; the right one completes the import
    assert request(gmail, pki, "PUT", session, MESSAGE[:5])[0] == 400
    status, _, answer = request(gmail, pki, "PUT", session, MESSAGE)
    assert status == 200 and gmail.imported[0].data() == MESSAGE and gmail.imported[0].upload_type == "resumable"
    assert len(gmail.refused) == 1


def test_creating_a_label_that_exists_is_gmails_409(gmail: GmailAPIServer, pki: TestPKI) -> None:
    path = "/gmail/v1/users/me/labels"
    headers = {"Content-Type": "application/json"}
    assert request(gmail, pki, "POST", path, json.dumps({"name": "Old ISP"}).encode(), headers)[0] == 200
    status, _, answer = request(gmail, pki, "POST", path, json.dumps({"name": "old isp"}).encode(), headers)
    assert status == 409 and answer["error"]["message"] == "Label name exists or conflicts"
    assert [label["name"] for label in request(gmail, pki, "GET", path)[2]["labels"]].count("Old ISP") == 1
