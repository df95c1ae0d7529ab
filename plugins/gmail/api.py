"""The two Gmail API resources postbote uses -- ``users.messages.import`` and ``users.labels`` (list, create) --
over one kept-alive HTTPS connection per poll.

Why the standard library's `http.client` and no HTTP library: postbote needs one POST with a body streamed from the
spool at a known length, a PUT for the resumable upload, and two small JSON calls. `http.client` does exactly that
(``send`` per chunk, Content-Length up front, keep-alive), takes the `ssl.SSLContext` of the project's TLS policy
(`postbote.TLSPolicy`: system store or ``tls_ca_file``, host names checked, TLS 1.2 at least) like every other
connection postbote makes, and adds nothing to install. httpx would bring httpcore, h11, anyio, sniffio, idna and
certifi (a CA bundle of its own, not the system's that the rest of postbote trusts) onto a Raspberry Pi for one
endpoint; the Google client libraries bring far more. The OAuth2 code already talks HTTP with the standard library.

Uploads (the API's ``/upload`` URI): a message of at most `MULTIPART_LIMIT` octets goes in one ``multipart/related``
request (the JSON metadata with the label ids, then the ``message/rfc822`` part); a larger one by the resumable
protocol (a POST with the metadata opens an upload session, a PUT sends the bytes; after a 5xx or a broken connection
the session is asked how much arrived and the rest is sent), as the API's upload guide asks for large files. Either
way the body is streamed from the spooled message: its length is known (`postbote.Message.size`), the bytes are read
in chunks and never held whole. The simple upload (``uploadType=media``) is not used: it carries no metadata, so the
message would get no labels (not even INBOX).

Errors come back as `APIError` (an HTTP answer with Gmail's error body, read: status, reason, message, Retry-After),
`NotSent` (the connection broke before the request was whole: Gmail cannot have taken it) or `Unanswered` (the
connection broke after the whole request went out: Gmail may have taken it). Tokens: every request carries the
access token as a Bearer token; a 401 drops a cached token and the request is made once more with a fresh one.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import secrets
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from postbote import LengthChanged, TLSPolicy, checked_length, get_logger, redact

if TYPE_CHECKING:
    from postbote.plugins.signin.oauth2 import TokenSource

MULTIPART_LIMIT = 5 * 1024 * 1024  # the upload guide: simple and multipart uploads "for smaller files, 5 MB or less"
MAX_MESSAGE = 150 * 1024 * 1024  # users.messages.import: "the maximum size of the message is 150MB"
MAX_RESPONSE = 1 << 20  # Gmail's answers are small JSON documents; more is refused rather than read
MAX_RESUMES = 2  # a resumable upload asked "how much arrived?" and continued at most this often per message
MAX_RETRY_AFTER = 24 * 3600.0
WRITE_SIZE = 64 * 1024  # the spool's chunks are joined into writes of this size

log = get_logger("postbote.gmail")


@dataclass(frozen=True)
class Response:
    status: int
    headers: Mapping[str, str]  # names in lower case
    body: bytes

    def json(self) -> dict[str, Any]:
        try:
            value = json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    @property
    def error(self) -> dict[str, Any]:
        """Gmail's error object: ``{"code", "message", "status", "errors": [{"reason", "domain", "message"}]}``."""
        value = self.json().get("error")
        return value if isinstance(value, dict) else {}

    @property
    def reason(self) -> str:
        """The first ``errors[].reason`` (rateLimitExceeded, insufficientPermissions, invalidArgument, …)."""
        errors = self.error.get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            return printable(str(errors[0].get("reason", "")))[:80]
        return printable(str(self.error.get("status", "")))[:80]

    @property
    def message(self) -> str:
        text = self.error.get("message")
        if not isinstance(text, str) or not text:
            text = self.body[:200].decode("utf-8", "replace") if not self.error else ""
        return redact(printable(text))[:500]

    @property
    def retry_after(self) -> float | None:
        return retry_after(self.headers.get("retry-after"))

    def describe(self) -> str:
        detail = ": ".join(part for part in (self.reason, self.message) if part)
        return f"HTTP {self.status}" + (f" ({detail})" if detail else "")


class APIError(Exception):
    """Gmail answered with a status other than success."""

    def __init__(self, response: Response, what: str) -> None:
        super().__init__(f"{what}: {response.describe()}")
        self.response = response


class NotSent(Exception):
    """The connection failed before the request was whole: Gmail cannot have acted on it."""


class CannotConnect(NotSent):
    """No connection to the API could be made (unreachable, TLS refused): no later request of the poll would fare
    better."""


class Unanswered(Exception):
    """The connection failed after the whole request went out and before the answer: Gmail may have acted on it."""


def printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else " " for ch in text)


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After field (delta-seconds or an HTTP date), bounded to a day; None when unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return min(max(0.0, when.timestamp() - time.time()), MAX_RETRY_AFTER)


@dataclass(frozen=True)
class Upload:
    """One message to import: its length, and its bytes from a given offset on (for a resumed upload)."""

    size: int
    chunks: Callable[[], Iterable[bytes]]
    metadata: Mapping[str, Any]  # the Message resource's fields sent along: {"labelIds": [...]}
    params: Mapping[str, str]  # internalDateSource, neverMarkSpam, processForCalendar


def skip(chunks: Iterable[bytes], offset: int) -> Iterator[bytes]:
    """``chunks`` without their first ``offset`` octets."""
    for chunk in chunks:
        if offset >= len(chunk):
            offset -= len(chunk)
            continue
        yield chunk[offset:] if offset else chunk
        offset = 0


@dataclass(frozen=True)
class MultipartBody:
    """A ``multipart/related`` upload: the JSON metadata, then the message as ``message/rfc822``, streamed."""

    upload: Upload
    boundary: str

    @property
    def head(self) -> bytes:
        return (f"--{self.boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n"
                f"{json.dumps(dict(self.upload.metadata))}\r\n"
                f"--{self.boundary}\r\nContent-Type: message/rfc822\r\n\r\n").encode()

    @property
    def tail(self) -> bytes:
        return f"\r\n--{self.boundary}--\r\n".encode("ascii")

    @property
    def content_type(self) -> str:
        return f'multipart/related; boundary="{self.boundary}"'

    @property
    def length(self) -> int:
        return len(self.head) + self.upload.size + len(self.tail)

    def chunks(self) -> Iterator[bytes]:
        yield self.head
        yield from checked_length(self.upload.chunks(), self.upload.size)
        yield self.tail


@dataclass
class GmailAPI:
    """The API for one mailbox (``user``: ``me`` or an address) over one kept-alive HTTPS connection."""

    base_url: str
    user: str
    tokens: TokenSource
    tls: TLSPolicy
    timeout: float
    connection: http.client.HTTPSConnection | None = None
    requests: int = 0
    _origin: tuple[str, str, int] = field(init=False)

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.base_url)
        self._origin = (parts.scheme, parts.hostname or "", parts.port or 443)
        self._prefix = parts.path.rstrip("/")

    # ---- the resources

    def list_labels(self) -> list[dict[str, Any]]:
        response = self.call("GET", f"/gmail/v1/users/{self.quoted_user}/labels", what="listing the labels")
        labels = response.json().get("labels")
        return [label for label in labels if isinstance(label, dict)] if isinstance(labels, list) else []

    def create_label(self, name: str) -> dict[str, Any]:
        body = json.dumps({"name": name, "labelListVisibility": "labelShow", "messageListVisibility": "show"})
        response = self.call("POST", f"/gmail/v1/users/{self.quoted_user}/labels", body=body.encode("utf-8"),
                             content_type="application/json; charset=UTF-8", what=f"creating the label {name!r}")
        return response.json()

    def import_message(self, upload: Upload) -> Response:
        """``users.messages.import`` of ``upload``: multipart up to `MULTIPART_LIMIT`, else resumable."""
        if upload.size <= MULTIPART_LIMIT:
            return self.import_multipart(upload)
        return self.import_resumable(upload)

    def import_multipart(self, upload: Upload) -> Response:
        body = MultipartBody(upload, "postbote-" + secrets.token_hex(16))  # 128 random bits: no message holds it
        return self.call("POST", self.import_path("multipart", upload.params), body=body.chunks,
                         length=body.length, content_type=body.content_type, what="importing the message")

    def import_resumable(self, upload: Upload) -> Response:
        try:
            opened = self.call("POST", self.import_path("resumable", upload.params),
                               body=json.dumps(dict(upload.metadata)).encode("utf-8"),
                               content_type="application/json; charset=UTF-8", what="opening the upload session",
                               extra={"X-Upload-Content-Type": "message/rfc822",
                                      "X-Upload-Content-Length": str(upload.size)})
        except Unanswered as exc:  # a session without its bytes imports nothing
            raise NotSent(str(exc)) from None
        session = self.same_origin(opened.headers.get("location", ""))
        offset, resumes = 0, 0
        while True:
            try:
                return self.call("PUT", session, body=rest(upload, offset), length=upload.size - offset,
                                 content_type="message/rfc822", what="uploading the message",
                                 extra=content_range(offset, upload.size))
            except (APIError, Unanswered, NotSent) as exc:
                if resumes >= MAX_RESUMES or (isinstance(exc, APIError) and exc.response.status < 500):
                    raise
                resumes += 1
                log.info("gmail.upload_interrupted", error=str(exc), action="asking the upload session how much "
                         "arrived, then sending the rest")
                status = self.upload_status(session, upload.size)
                if status.status in (200, 201):
                    return status  # it all arrived: the answer is the imported message
                offset = received(status)

    def upload_status(self, session: str, size: int) -> Response:
        """Ask an upload session how much arrived (an empty PUT with ``Content-Range: bytes */SIZE``): 200 or 201
        with the message when all of it did, 308 with a Range saying how much otherwise."""
        try:
            return self.call("PUT", session, body=b"", what="asking how much of the upload arrived",
                             extra={"Content-Range": f"bytes */{size}"}, accept=(200, 201, 308))
        except NotSent as exc:  # a request without a body cannot be half sent: say what it is to the caller
            raise Unanswered(str(exc)) from None

    # ---- paths

    @property
    def quoted_user(self) -> str:
        return urllib.parse.quote(self.user, safe="@")

    def import_path(self, upload_type: str, params: Mapping[str, str]) -> str:
        query = urllib.parse.urlencode({"uploadType": upload_type, **params})
        return f"/upload/gmail/v1/users/{self.quoted_user}/messages/import?{query}"

    def same_origin(self, location: str) -> str:
        """The upload session's address, as a path on this connection; a session elsewhere is refused (the access
        token goes along with every request)."""
        parts = urllib.parse.urlsplit(location)
        if (parts.scheme, parts.hostname or "", parts.port or 443) != self._origin or not parts.path:
            raise Unanswered(f"the upload session address {printable(location)[:200]!r} is not on {self.base_url}")
        return parts.path.removeprefix(self._prefix) + (f"?{parts.query}" if parts.query else "")

    # ---- HTTP

    def call(self, method: str, path: str, *, body: bytes | Callable[[], Iterable[bytes]] = b"",
             length: int | None = None, content_type: str | None = None, what: str,
             extra: Mapping[str, str] | None = None, accept: tuple[int, ...] = (200, 201)) -> Response:
        """One request with the access token; a 401 is answered by one more try with a fresh token. Returns the
        response when its status is in ``accept``, else raises `APIError`."""
        for attempt in (1, 2):
            token = self.tokens.token()
            headers = {"Authorization": f"Bearer {token.reveal()}", **(extra or {})}
            if content_type is not None:
                headers["Content-Type"] = content_type
            response = self.exchange(method, path, headers, body, length, what)
            if response.status == 401 and attempt == 1 and self.tokens.invalidate():
                log.info("gmail.token_refused", action="refreshing the access token and trying once more")
                continue
            if response.status not in accept:
                raise APIError(response, what)
            return response
        raise AssertionError("unreachable")

    def exchange(self, method: str, path: str, headers: Mapping[str, str],
                 body: bytes | Callable[[], Iterable[bytes]], length: int | None, what: str) -> Response:
        connection = self.connect()
        self.requests += 1
        writes = coalesced([body] if isinstance(body, bytes) else body())
        size = len(body) if isinstance(body, bytes) else length
        try:
            connection.putrequest(method, self._prefix + path, skip_accept_encoding=True)
            for name, value in {**headers, "Content-Length": str(size), "Accept": "application/json",
                                "User-Agent": "postbote"}.items():
                connection.putheader(name, value)
            connection.endheaders(next(writes, None))  # the header block and the first piece in one write
            for piece in writes:
                connection.send(piece)
        except (OSError, http.client.HTTPException, LengthChanged) as exc:
            early = self.early_answer()  # a server may answer (401, 413) and close before reading the body
            if early is not None:
                return early
            self.close()
            raise NotSent(f"{what}: {self.reason(exc)}") from None
        try:
            return self.read_response(connection)
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise Unanswered(f"{what}: the connection broke after the request was sent ({self.reason(exc)})") \
                from None

    def early_answer(self) -> Response | None:
        connection = self.connection
        if connection is None:
            return None
        try:
            response = self.read_response(connection)
        except (OSError, http.client.HTTPException, ValueError):
            return None
        self.close()  # the rest of the body was never sent: the connection is out of step
        return response

    def read_response(self, connection: http.client.HTTPSConnection) -> Response:
        answer = connection.getresponse()
        body = answer.read(MAX_RESPONSE + 1)
        if len(body) > MAX_RESPONSE:
            self.close()
            body = body[:MAX_RESPONSE]
        headers = {name.lower(): value for name, value in answer.getheaders()}
        if answer.will_close:
            self.close()
        return Response(answer.status, headers, body)

    def connect(self) -> http.client.HTTPSConnection:
        if self.connection is None:
            _, host, port = self._origin
            connection = http.client.HTTPSConnection(host, port, timeout=self.timeout, context=self.tls.context())
            try:
                connection.connect()
            except (OSError, http.client.HTTPException) as exc:
                connection.close()
                raise CannotConnect(f"cannot connect to {self.base_url}: {self.reason(exc)}") from None
            self.connection = connection
        return self.connection

    @staticmethod
    def reason(exc: BaseException) -> str:
        if isinstance(exc, TimeoutError):
            return "no answer within the timeout"
        text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return redact(printable(str(text)))[:300]

    def close(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.close()


def coalesced(chunks: Iterable[bytes], size: int = WRITE_SIZE) -> Iterator[bytes]:
    """``chunks`` joined into writes of about ``size`` octets (a small message: one write with its headers, not
    five TLS records); never more than ``size`` plus one chunk held."""
    pending = bytearray()
    for chunk in chunks:
        pending += chunk
        if len(pending) >= size:
            yield bytes(pending)
            pending.clear()
    if pending:
        yield bytes(pending)


def rest(upload: Upload, offset: int) -> Callable[[], Iterator[bytes]]:
    """The upload's bytes from ``offset`` on, checked against their announced length."""
    return lambda: checked_length(skip(upload.chunks(), offset), upload.size - offset)


def content_range(offset: int, size: int) -> dict[str, str]:
    """The header of a resumed upload's PUT (none for the first one)."""
    return {"Content-Range": f"bytes {offset}-{size - 1}/{size}"} if offset else {}


def received(status: Response) -> int:
    """How many octets a 308 says arrived (``Range: bytes=0-N``; no Range: none)."""
    value = status.headers.get("range", "")
    if value.startswith("bytes=0-") and value[8:].isdigit():
        return int(value[8:]) + 1
    return 0
