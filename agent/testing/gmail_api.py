"""A local stand-in for the two Gmail API resources postbote uses: ``users.messages.import`` and ``users.labels``.

No test can reach Google, so this HTTPS server implements their documented contract -- written from the public API
reference and upload guide -- and refuses what the real API would refuse, so that a test fails when postbote sends a
wrong request:

* ``Authorization: Bearer TOKEN`` on every request, the token checked by the test's ``token_user`` (e.g. against
  the fake OAuth2 provider's access tokens): a missing or unknown one gets Gmail's 401 body; a token without the
  scope a method needs (``granted_scopes``) gets the 403 ``insufficientPermissions`` body;
* ``POST /upload/gmail/v1/users/{userId}/messages/import`` with ``uploadType=multipart`` (a ``multipart/related``
  body: the JSON metadata, then one ``message/rfc822`` part; a message part above `MULTIPART_LIMIT` is refused, as
  the guide sends larger files the resumable way) or ``uploadType=resumable`` (``X-Upload-Content-Type`` and
  ``X-Upload-Content-Length``, JSON metadata; answered with a ``Location``), then ``PUT`` of the bytes to that
  address, ``Content-Range: bytes */N`` asking how much arrived (308 with ``Range``), ``Content-Range: bytes
  K-L/N`` resuming; ``uploadType=media`` is refused here (it would carry no labels);
* the import's query parameters (``internalDateSource`` ``dateHeader|receivedTime``, ``neverMarkSpam``,
  ``processForCalendar``, ``deleted`` ``true|false``), unknown ones refused; ``labelIds`` must name labels that exist;
  every message over 150 MB refused; a Content-Length that does not match the body refused;
* ``GET`` and ``POST /gmail/v1/users/{userId}/labels``: the system labels and the created ones; creating a name
  that exists (case-insensitively) is Gmail's 409.

Refusals get Gmail's error body (``{"error": {"code", "message", "errors": [{"domain", "reason", "message"}],
"status"}}``) and are listed in ``refused``, which a test asserts empty. Imported messages are written to
``spool_dir`` (a 40 MB message is never held in memory) and listed in ``imported``.

The fault script (``faults``, consumed in order by the requests they match): an answer with any status, reason
and Retry-After (a 429 storm, a 503); a 503 after reading part of an upload's body (``after_bytes``), the
connection then closed; storing the message and then dropping the connection unanswered (``store`` with ``drop``:
the answer lost); a 200, which only takes its turn (a schedule: the first import fails, the second goes
through, the third fails). ``fired`` lists the faults played. ``race_label(name)`` makes another client create a
label just before postbote's create reaches the server; ``hold(kind, parties)`` answers the next ``parties``
requests of a kind only once all of them arrived (two clients that both list the labels before either creates one).
``rtt`` delays every answer (the bench's 20 ms); ``after_answer`` is called once an answer is written (a kill test
kills postbote there: between Gmail's 200 and postbote's record of it).
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import shutil
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from postbote.testing.https import StandInHTTPServer

MULTIPART_LIMIT = 5 * 1024 * 1024
MAX_MESSAGE = 150 * 1024 * 1024
MAX_METADATA = 64 * 1024
INSERT_SCOPES = frozenset({"https://www.googleapis.com/auth/gmail.insert",
                           "https://www.googleapis.com/auth/gmail.modify", "https://mail.google.com/"})
LABEL_SCOPES = frozenset({"https://www.googleapis.com/auth/gmail.labels",
                          "https://www.googleapis.com/auth/gmail.modify", "https://mail.google.com/"})
ALL_SCOPES = INSERT_SCOPES | LABEL_SCOPES
SYSTEM_LABELS = ("INBOX", "UNREAD", "STARRED", "IMPORTANT", "SPAM", "TRASH", "SENT", "DRAFT", "CATEGORY_PERSONAL",
                 "CATEGORY_SOCIAL", "CATEGORY_PROMOTIONS", "CATEGORY_UPDATES", "CATEGORY_FORUMS")
IMPORT_PARAMS = {"internalDateSource": ("dateHeader", "receivedTime"), "neverMarkSpam": ("true", "false"),
                 "processForCalendar": ("true", "false"), "deleted": ("true", "false")}
STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                409: "ALREADY_EXISTS", 411: "LENGTH_REQUIRED", 413: "FAILED_PRECONDITION", 429: "RESOURCE_EXHAUSTED",
                500: "INTERNAL", 503: "UNAVAILABLE"}
_IMPORT_PATH = re.compile(r"/upload/gmail/v1/users/([^/]+)/messages/import")
_LABELS_PATH = re.compile(r"/gmail/v1/users/([^/]+)/labels")
_BOUNDARY = re.compile(r'multipart/related;\s*boundary="?([^";]+)"?$', re.IGNORECASE)


@dataclass
class Fault:
    """A scripted answer for the next ``times`` requests of kind ``on``: ``import`` (a multipart POST or a
    resumable upload's PUT of bytes), ``upload`` (only the PUT), ``open`` (the resumable POST), ``labels.list``,
    ``labels.create``."""

    on: str
    status: int = 503
    reason: str = "backendError"
    message: str = "The service is currently unavailable."
    retry_after: str | None = None
    times: int = 1
    after_bytes: int | None = None  # read this much of the body, answer, close the connection
    store: bool = False  # import the message first: Gmail has it, whatever the answer
    drop: bool = False  # close the connection without an answer
    then: Callable[[], None] | None = None  # run after the body was read (and stored), before the answer

    @property
    def passes(self) -> bool:
        """A scripted success: the request is served as usual (a schedule's "this one goes through")."""
        return self.status == 200 and not (self.store or self.drop or self.then) and self.after_bytes is None


@dataclass
class Imported:
    id: str
    path: Path
    label_ids: list[str]
    params: dict[str, str]
    upload_type: str

    def data(self) -> bytes:
        return self.path.read_bytes()


@dataclass
class _Session:
    user: str
    metadata: dict[str, Any]
    params: dict[str, str]
    size: int
    path: Path
    received: int = 0
    done: Imported | None = None


@dataclass
class Logged:
    method: str
    kind: str
    status: int
    user_id: str = ""  # the userId in the request's path: "me" or the mailbox's address
    message_id: str = ""  # the id of the imported message the answer names (a 200 to an import)


class _Answer(Exception):
    """Ends a request with this answer (refusals and faults)."""

    def __init__(self, status: int, message: str, reason: str, *, headers: Mapping[str, str] | None = None,
                 refusal: bool = True, close: bool = False) -> None:
        super().__init__(message)
        self.status, self.message, self.reason = status, message, reason
        self.headers = dict(headers or {})
        self.refusal, self.close = refusal, close


def error_body(status: int, message: str, reason: str) -> dict[str, Any]:
    return {"error": {"code": status, "message": message,
                      "errors": [{"message": message, "domain": "global", "reason": reason}],
                      "status": STATUS_NAMES.get(status, "UNKNOWN")}}


def split_multipart(body: bytes, boundary: bytes) -> tuple[bytes, bytes]:
    """The JSON metadata and the message of a ``multipart/related`` import body; `_Answer` (a 400) when the body is
    not exactly two parts, ``application/json`` then ``message/rfc822``, between the delimiters."""
    delimiter = b"--" + boundary
    if not body.startswith(delimiter + b"\r\n") or not body.endswith(b"\r\n" + delimiter + b"--\r\n"):
        raise _Answer(400, "malformed multipart body (delimiters)", "badRequest")
    inner = body[len(delimiter) + 2: -(len(delimiter) + 6)]
    parts = inner.split(b"\r\n" + delimiter + b"\r\n")
    if len(parts) != 2:
        raise _Answer(400, f"a multipart import has 2 parts, not {len(parts)}", "badRequest")
    (json_head, json_data), (message_head, message) = (_part(part) for part in parts)
    if not json_head.lower().startswith(b"content-type: application/json"):
        raise _Answer(400, "the first part must be the application/json metadata", "badRequest")
    if message_head.lower() != b"content-type: message/rfc822":
        raise _Answer(400, "the second part must be message/rfc822", "badRequest")
    return json_data, message


def _part(part: bytes) -> tuple[bytes, bytes]:
    head, separator, data = part.partition(b"\r\n\r\n")
    if not separator:
        raise _Answer(400, "malformed multipart part (no blank line after its header)", "badRequest")
    return head, data


@dataclass
class GmailAPIServer:
    """The fake API on https://127.0.0.1:PORT (``context``: the server's certificate, e.g. the test PKI's)."""

    context: ssl.SSLContext
    spool_dir: Path
    token_user: Callable[[str], str | None]  # access token -> the user it is for (None: invalid or expired)
    address: str = "me@example.org"
    rtt: float = 0.0
    granted_scopes: frozenset[str] = ALL_SCOPES
    faults: list[Fault] = field(default_factory=list)
    imported: list[Imported] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    fired: list[Fault] = field(default_factory=list)  # the faults played so far
    log: list[Logged] = field(default_factory=list)
    labels: dict[str, dict[str, Any]] = field(default_factory=dict)
    after_answer: Callable[[Logged], None] | None = None  # called once an answer is written (a kill test's moment)
    _sessions: dict[str, _Session] = field(default_factory=dict)
    _races: set[str] = field(default_factory=set)
    _holds: dict[str, tuple[threading.Barrier, list[int]]] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock)

    def __post_init__(self) -> None:
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        for name in SYSTEM_LABELS:
            self.labels[name] = {"id": name, "name": name, "type": "system"}
        self._server = StandInHTTPServer(("127.0.0.1", 0), self._handler_class(), self.context)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> GmailAPIServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> GmailAPIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- steering and reading

    def add_label(self, name: str) -> str:
        with self._lock:
            label_id = f"Label_{len(self.labels) + 1}"
            self.labels[label_id] = {"id": label_id, "name": name, "type": "user",
                                     "labelListVisibility": "labelShow", "messageListVisibility": "show"}
            return label_id

    def race_label(self, name: str) -> None:
        """Another client creates ``name`` just before postbote's create of it arrives."""
        with self._lock:
            self._races.add(name.casefold())

    def hold(self, kind: str, parties: int, timeout: float = 20.0) -> None:
        """Answer the next ``parties`` requests of ``kind`` (e.g. ``labels.list``) only once all of them have arrived,
        or after ``timeout`` (`held_together` then says False): clients racing each other, made to."""
        with self._lock:
            self._holds[kind] = (threading.Barrier(parties, timeout=timeout), [0])

    def held_together(self, kind: str) -> bool:
        """Whether the requests ``hold`` held for ``kind`` all arrived and went on together."""
        with self._lock:
            barrier, _ = self._holds[kind]
            return not barrier.broken

    def _wait_held(self, kind: str) -> None:
        with self._lock:
            held = self._holds.get(kind)
            if held is None or held[1][0] >= held[0].parties:
                return
            held[1][0] += 1
        with contextlib.suppress(threading.BrokenBarrierError):
            held[0].wait()

    def label_names(self, imported: Imported) -> list[str]:
        return [self.labels[label_id]["name"] for label_id in imported.label_ids]

    def requests(self, kind: str) -> int:
        return sum(1 for entry in self.log if entry.kind == kind)

    # ---- HTTP

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                # the header and the body of an answer go in two writes: without this, Nagle holds the second
                # until the client's delayed ACK (40 ms), which Google's front ends never make a client wait
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                api._serve(self)

            def do_POST(self) -> None:  # noqa: N802
                api._serve(self)

            def do_PUT(self) -> None:  # noqa: N802
                api._serve(self)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return

        return Handler

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        parts = urllib.parse.urlsplit(handler.path)
        query = {key: values[-1] for key, values in urllib.parse.parse_qs(parts.query, keep_blank_values=True).items()}
        kind = self._kind(handler.command, parts.path, query)
        path_match = _IMPORT_PATH.fullmatch(parts.path) or _LABELS_PATH.fullmatch(parts.path)
        user_id = urllib.parse.unquote(path_match.group(1)) if path_match else ""
        self._wait_held(kind)
        try:
            status, body, headers = self._route(handler, kind, parts.path, query)
        except _Answer as answer:
            if answer.refusal:
                with self._lock:
                    self.refused.append(f"{handler.command} {parts.path} {kind}: {answer.status} {answer}")
            if answer.status == 0:  # a dropped connection: no answer at all
                self._log(Logged(handler.command, kind, 0, user_id))
                handler.close_connection = True
                with contextlib.suppress(OSError):
                    handler.connection.shutdown(2)
                return
            status, body, headers = answer.status, error_body(answer.status, answer.message, answer.reason), \
                answer.headers
            if answer.close:
                headers["Connection"] = "close"
                handler.close_connection = True
        message_id = str(body.get("id", "")) if body is not None and kind in ("import", "upload") else ""
        entry = Logged(handler.command, kind, status, user_id, message_id)
        self._log(entry)
        if self.rtt:
            time.sleep(self.rtt)
        data = json.dumps(body).encode() if body is not None else b""
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.send_header("Content-Type", "application/json; charset=UTF-8")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
        handler.wfile.flush()
        if self.after_answer is not None:
            self.after_answer(entry)

    def _log(self, entry: Logged) -> None:
        with self._lock:
            self.log.append(entry)

    @staticmethod
    def _kind(method: str, path: str, query: Mapping[str, str]) -> str:
        if _LABELS_PATH.fullmatch(path):
            return "labels.list" if method == "GET" else "labels.create"
        if _IMPORT_PATH.fullmatch(path):
            if method == "PUT":
                return "upload"
            return "open" if query.get("uploadType") == "resumable" else "import"
        return "unknown"

    def _route(self, handler: BaseHTTPRequestHandler, kind: str, path: str,
               query: dict[str, str]) -> tuple[int, dict[str, Any] | None, dict[str, str]]:
        if kind == "unknown":
            self._drain(handler)
            raise _Answer(404, f"Not found: {handler.command} {path}", "notFound")
        user = self._user(handler, kind, path)
        if kind == "labels.list":
            return self._labels_list(handler, query)
        if kind == "labels.create":
            return self._labels_create(handler, query)
        if kind == "upload":
            return self._upload(handler, query, user)
        self._check_params(query, uploads=True)
        if kind == "open":
            return self._open(handler, query, user)
        return self._multipart(handler, query, user)

    # ---- checks every request passes

    def _user(self, handler: BaseHTTPRequestHandler, kind: str, path: str) -> str:
        authorization = handler.headers.get("Authorization", "")
        token = authorization[7:] if authorization.startswith("Bearer ") else ""
        user = self.token_user(token) if token else None
        if user is None:
            self._drain(handler)
            raise _Answer(401, "Request had invalid authentication credentials. Expected OAuth 2 access token, "
                               "login cookie or other valid authentication credential.", "authError",
                          headers={"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/"'},
                          refusal=False)
        needed = LABEL_SCOPES if kind.startswith("labels") else INSERT_SCOPES
        if not needed & self.granted_scopes:
            self._drain(handler)
            raise _Answer(403, "Request had insufficient authentication scopes.", "insufficientPermissions",
                          refusal=False)
        match = (_LABELS_PATH if kind.startswith("labels") else _IMPORT_PATH).fullmatch(path)
        assert match is not None
        if urllib.parse.unquote(match.group(1)) not in ("me", self.address):
            self._drain(handler)
            raise _Answer(403, "Delegation denied for " + self.address, "forbidden")
        return user

    def _check_params(self, query: Mapping[str, str], *, uploads: bool) -> None:
        for key, value in query.items():
            if key == "uploadType" and uploads:
                if value not in ("multipart", "resumable"):
                    raise _Answer(400, f"uploadType={value} is not what postbote may use here (media carries no "
                                       "labelIds)", "badRequest")
                continue
            if key in ("alt", "prettyPrint", "fields"):
                continue
            if key not in IMPORT_PARAMS or not uploads:
                raise _Answer(400, f"Invalid JSON payload received. Unknown name \"{key}\": Cannot bind query "
                                   "parameter.", "invalidArgument")
            if value not in IMPORT_PARAMS[key]:
                raise _Answer(400, f"Invalid value at '{key}' ({value})", "invalidArgument")

    def _length(self, handler: BaseHTTPRequestHandler) -> int:
        if handler.headers.get("Transfer-Encoding"):
            raise _Answer(400, "Transfer-Encoding is not what postbote sends", "badRequest", close=True)
        value = handler.headers.get("Content-Length")
        if value is None or not value.isdigit():
            raise _Answer(411, "Length Required", "lengthRequired", close=True)
        return int(value)

    def _drain(self, handler: BaseHTTPRequestHandler) -> None:
        """Read and forget a request's body (keeps the connection in step for the answer)."""
        value = handler.headers.get("Content-Length")
        left = int(value) if value and value.isdigit() else 0
        while left > 0:
            chunk = handler.rfile.read(min(left, 1 << 16))
            if not chunk:
                break
            left -= len(chunk)

    def _metadata(self, data: bytes) -> dict[str, Any]:
        try:
            value = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise _Answer(400, "Invalid JSON payload received.", "parseError") from None
        if not isinstance(value, dict) or set(value) - {"labelIds", "threadId"}:
            raise _Answer(400, f"Invalid JSON payload received. Unexpected fields {sorted(value)}", "invalidArgument")
        label_ids = value.get("labelIds", [])
        if not isinstance(label_ids, list) or not all(isinstance(item, str) for item in label_ids):
            raise _Answer(400, "Invalid value at 'message.label_ids'", "invalidArgument")
        with self._lock:
            for label_id in label_ids:
                if label_id not in self.labels or label_id in ("SENT", "DRAFT"):
                    raise _Answer(400, f"Invalid label: {label_id}", "invalidArgument", refusal=False)
        return value

    def _fault(self, kind: str) -> Fault | None:
        """The fault for this request, if one is scripted; a scripted 200 (`Fault.passes`) only takes its turn."""
        with self._lock:
            for fault in self.faults:
                if fault.times > 0 and (fault.on == kind or (fault.on == "import" and kind == "upload")):
                    fault.times -= 1
                    if fault.passes:
                        return None
                    self.fired.append(fault)
                    return fault
        return None

    def _fault_answer(self, fault: Fault) -> _Answer:
        if fault.then is not None:
            fault.then()
        headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
        status = 0 if fault.drop else fault.status
        return _Answer(status, fault.message, fault.reason, headers=headers, refusal=False,
                       close=fault.after_bytes is not None)

    # ---- labels

    def _labels_list(self, handler: BaseHTTPRequestHandler,
                     query: Mapping[str, str]) -> tuple[int, dict[str, Any], dict[str, str]]:
        self._drain(handler)
        self._check_params(query, uploads=False)
        fault = self._fault("labels.list")
        if fault is not None:
            raise self._fault_answer(fault)
        with self._lock:
            return 200, {"labels": list(self.labels.values())}, {}

    def _labels_create(self, handler: BaseHTTPRequestHandler,
                       query: Mapping[str, str]) -> tuple[int, dict[str, Any], dict[str, str]]:
        self._check_params(query, uploads=False)
        length = self._length(handler)
        if length > MAX_METADATA or not handler.headers.get("Content-Type", "").startswith("application/json"):
            self._drain(handler)
            raise _Answer(400, "expected a JSON Label resource", "badRequest")
        try:
            body = json.loads(handler.rfile.read(length).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise _Answer(400, "Invalid JSON payload received.", "parseError") from None
        name = body.get("name") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name.strip():
            raise _Answer(400, "Invalid label name", "invalidArgument")
        fault = self._fault("labels.create")
        if fault is not None:
            raise self._fault_answer(fault)
        with self._lock:
            if name.casefold() in self._races:
                self._races.discard(name.casefold())
                self.add_label(name)
            if any(str(label["name"]).casefold() == name.casefold() for label in self.labels.values()):
                raise _Answer(409, "Label name exists or conflicts", "conflict", refusal=False)
            label_id = self.add_label(name)
            return 200, self.labels[label_id], {}

    # ---- imports

    def _store(self, user: str, source: Path | bytes, metadata: Mapping[str, Any], params: Mapping[str, str],
               upload_type: str) -> Imported:
        with self._lock:
            message_id = f"{0x18c0000000000000 + len(self.imported) + 1:x}"
            path = self.spool_dir / f"{message_id}.eml"
            if isinstance(source, Path):
                shutil.move(source, path)
            else:
                path.write_bytes(source)
            imported = Imported(message_id, path, list(metadata.get("labelIds", [])),
                                {k: v for k, v in params.items() if k in IMPORT_PARAMS}, upload_type)
            self.imported.append(imported)
            return imported

    @staticmethod
    def _resource(imported: Imported) -> dict[str, Any]:
        return {"id": imported.id, "threadId": imported.id, "labelIds": imported.label_ids}

    def _multipart(self, handler: BaseHTTPRequestHandler, query: Mapping[str, str],
                   user: str) -> tuple[int, dict[str, Any], dict[str, str]]:
        length = self._length(handler)
        match = _BOUNDARY.match(handler.headers.get("Content-Type", ""))
        if match is None:
            self._drain(handler)
            raise _Answer(400, "multipart upload needs Content-Type: multipart/related with a boundary", "badRequest")
        if length > MULTIPART_LIMIT + MAX_METADATA:
            self._drain(handler)
            raise _Answer(400, f"a multipart upload of {length} octets: above 5 MB the upload guide asks for "
                               "uploadType=resumable", "badRequest")
        body = handler.rfile.read(length)
        if len(body) != length:
            raise _Answer(400, "the body is shorter than its Content-Length", "badRequest", close=True)
        metadata, message = self._parts(body, match.group(1).encode())
        if len(message) > MULTIPART_LIMIT:
            raise _Answer(400, "a message part above 5 MB must go by uploadType=resumable", "badRequest")
        fault = self._fault("import")
        if fault is not None:
            if fault.store:
                self._store(user, message, metadata, query, "multipart")
            raise self._fault_answer(fault)
        return 200, self._resource(self._store(user, message, metadata, query, "multipart")), {}

    def _parts(self, body: bytes, boundary: bytes) -> tuple[dict[str, Any], bytes]:
        """The two parts of a multipart/related body: JSON metadata, then the message/rfc822 bytes."""
        metadata, message = split_multipart(body, boundary)
        if not message:
            raise _Answer(400, "Recipient address required", "invalidArgument", refusal=False)
        return self._metadata(metadata), message

    def _open(self, handler: BaseHTTPRequestHandler, query: Mapping[str, str],
              user: str) -> tuple[int, dict[str, Any] | None, dict[str, str]]:
        length = self._length(handler)
        if length > MAX_METADATA:
            self._drain(handler)
            raise _Answer(400, "metadata too large", "badRequest")
        data = handler.rfile.read(length)
        if handler.headers.get("X-Upload-Content-Type", "").lower() != "message/rfc822":
            raise _Answer(400, "X-Upload-Content-Type must be message/rfc822", "badRequest")
        size_text = handler.headers.get("X-Upload-Content-Length", "")
        if not size_text.isdigit():
            raise _Answer(400, "X-Upload-Content-Length is required", "badRequest")
        size = int(size_text)
        if size > MAX_MESSAGE:
            raise _Answer(413, "Request Entity Too Large", "uploadTooLarge")
        if length and not handler.headers.get("Content-Type", "").startswith("application/json"):
            raise _Answer(400, "the metadata must be application/json", "badRequest")
        metadata = self._metadata(data) if length else {}
        fault = self._fault("open")
        if fault is not None:
            raise self._fault_answer(fault)
        upload_id = secrets.token_urlsafe(16)
        with self._lock:
            self._sessions[upload_id] = _Session(user, metadata, dict(query), size,
                                                 self.spool_dir / f".upload-{upload_id}")
        location = (f"{self.base_url}{handler.path.split('?')[0]}?"
                    + urllib.parse.urlencode({**query, "upload_id": upload_id}))
        return 200, None, {"Location": location}

    def _upload(self, handler: BaseHTTPRequestHandler, query: Mapping[str, str],
                user: str) -> tuple[int, dict[str, Any] | None, dict[str, str]]:
        length = self._length(handler)
        with self._lock:
            session = self._sessions.get(query.get("upload_id", ""))
        if session is None or query.get("uploadType") != "resumable":
            self._drain(handler)
            raise _Answer(404, "No such upload session", "notFound")
        if session.done is not None:
            self._drain(handler)
            return 200, self._resource(session.done), {}
        content_range = handler.headers.get("Content-Range")
        if content_range == f"bytes */{session.size}":
            if length:
                raise _Answer(400, "a status query has no body", "badRequest", close=True)
            if session.received == 0:
                return 308, None, {}
            return 308, None, {"Range": f"bytes=0-{session.received - 1}"}
        start = 0
        if content_range is not None:
            match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", content_range)
            if match is None or int(match.group(3)) != session.size or int(match.group(2)) != session.size - 1:
                self._drain(handler)
                raise _Answer(400, f"bad Content-Range {content_range!r}", "badRequest")
            start = int(match.group(1))
        if start != session.received or length != session.size - start:
            self._drain(handler)
            raise _Answer(400, f"the upload resumes at {start} with {length} octets; the session has "
                               f"{session.received} of {session.size}", "badRequest")
        fault = self._fault("upload")
        limit = fault.after_bytes if fault is not None and fault.after_bytes is not None else length
        with open(session.path, "ab") as spool:
            left = min(length, limit)
            while left > 0:
                chunk = handler.rfile.read(min(left, 1 << 16))
                if not chunk:
                    break
                spool.write(chunk)
                left -= len(chunk)
                session.received += len(chunk)
        if fault is not None:
            if fault.store and fault.after_bytes is None:
                session.done = self._store(user, session.path, session.metadata, session.params, "resumable")
            raise self._fault_answer(fault)
        if session.received != session.size:
            raise _Answer(400, "the body is shorter than its Content-Length", "badRequest", close=True)
        session.done = self._store(user, session.path, session.metadata, session.params, "resumable")
        return 200, self._resource(session.done), {}
