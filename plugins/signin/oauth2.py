"""OAuth2 access tokens for XOAUTH2 / OAUTHBEARER: from a command, or refreshed by postbote itself.

`TokenCommand` runs an argv (no shell) that prints an access token. `OAuth2Refresher` keeps the access token in a
cache file in the state directory until shortly before it expires, then trades the refresh token for a new one at
the provider's token endpoint (RFC 6749 section 6) and stores a rotated refresh token atomically with mode 0600.
A revoked or expired refresh token (``invalid_grant``) becomes a `CredentialError` telling the admin to run
``postbote auth ACCOUNT``, which performs the one-time authorization: the device code flow (RFC 8628) where the
provider supports it for mail scopes, else the loopback redirect flow with PKCE (RFC 8252, RFC 7636).

Only the standard library talks HTTP here (urllib over TLS, certificates verified). Every token is a
`postbote.Secret`; error messages carry the provider's error code and description with any secret that
might be echoed in them cut out, never a token. Token files readable or writable by group or others are refused.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
import stat
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from postbote import (
    AccountError,
    CredentialError,
    Secret,
    TLSPolicy,
    fsync_directory,
    get_logger,
    register_secret,
)
from postbote import redact as redact_registered
from postbote.plugins.signin.oauth2_settings import (  # apart: the config reads them without any HTTP code
    OAUTH2_KEYS,
    PRESETS,
    OAuth2Settings,
    Preset,
    oauth2_from_section,
    oauth2_settings,
    require_https,
)

if TYPE_CHECKING:
    # Imported where they are used: a poll with a cached access token needs no HTTP, and only ``postbote auth``
    # runs a web server or a browser.
    import queue
    import ssl
    import urllib.error
    from http.server import HTTPServer

__all__ = ["OAUTH2_KEYS", "PRESETS", "OAuth2Settings", "Preset", "oauth2_from_section", "oauth2_settings",
           "require_https"]  # and everything defined below

log = get_logger("postbote.oauth2")

TOKEN_COMMAND_TIMEOUT = 30.0
HTTP_TIMEOUT = 30.0
REFRESH_MARGIN = 300.0  # refresh this long before the access token expires
DEFAULT_EXPIRES_IN = 600.0  # when the provider does not say (expires_in is only RECOMMENDED)
MAX_RESPONSE = 1 << 20
MAX_SECRET_FILE = 1 << 16
LOOPBACK_TIMEOUT = 300.0
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


class TokenSource(Protocol):
    """Where an account's OAuth2 access token comes from."""

    def token(self) -> Secret:
        """A currently valid access token."""

    def invalidate(self) -> bool:
        """Forget a cached token after the server refused it; True when a retry may get a different one."""

    def describe(self) -> str:
        """What ``postbote check`` shows: the source, never the token."""


def https_context(settings: OAuth2Settings) -> ssl.SSLContext:
    """Certificates and host names verified (system store, or ``ca_file``), TLS 1.2 at least."""
    return TLSPolicy(ca_file=str(settings.ca_file) if settings.ca_file else None).context()


# --- secret files ---------------------------------------------------------------------------------------------------

def read_secret_file(path: Path, what: str) -> Secret:
    """The first line of a token or client-secret file; refused when group or others may read or write it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise CredentialError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise CredentialError(f"{what} {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as handle:
        mode = os.fstat(handle.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise CredentialError(f"{what} {path} is not a regular file")
        if mode & 0o077:
            raise CredentialError(f"{what} {path} is accessible by other users (mode {stat.S_IMODE(mode):04o}); "
                                  f"run: chmod 600 {path}")
        first_line = handle.readline(MAX_SECRET_FILE)
    value = first_line.rstrip(b"\r\n").decode("utf-8", "replace").strip()
    if not value:
        raise CredentialError(f"{what} {path} is empty")
    return Secret(value)


def write_secret_file(path: Path, content: str) -> None:
    """Replace ``path`` atomically with ``content``: a 0600 temporary file in the same directory, fsync, rename."""
    import tempfile

    directory = path.parent
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(content.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    with contextlib.suppress(OSError):  # the new content is in place; making its name durable is a courtesy
        fsync_directory(directory)


# --- token command --------------------------------------------------------------------------------------------------

class TokenCommand:
    """An argv, run without a shell and without the secret environment variables (`child_environment`), whose
    first line of output is the access token."""

    def __init__(self, argv: tuple[str, ...] | list[str], *, timeout: float = TOKEN_COMMAND_TIMEOUT) -> None:
        if not argv:
            raise ValueError("token_command needs a program")
        self.argv = tuple(argv)
        self.timeout = timeout

    def describe(self) -> str:
        return f"token_command {self.argv[0]} (+{len(self.argv) - 1} args)"

    def invalidate(self) -> bool:
        return False

    def token(self) -> Secret:
        from postbote.plugins.signin.passwords import first_output_line

        token = first_output_line("token_command", self.argv, timeout=self.timeout).decode("utf-8", "replace").strip()
        if not token:
            raise CredentialError(f"token_command: {self.argv[0]} printed nothing")
        return Secret(token)


# --- token endpoint -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenResponse:
    access_token: Secret
    expires_in: float
    refresh_token: Secret | None = None


class TokenEndpointError(AccountError):
    """The token endpoint answered with an OAuth2 error (RFC 6749 section 5.2)."""

    def __init__(self, message: str, *, status: int, error: str, description: str) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.description = description


def redact(text: str, hidden: list[str | Secret | None]) -> str:
    """``text`` with every occurrence of the hidden values and of every registered secret replaced, and control
    characters dropped."""
    for value in hidden:
        raw = value.reveal() if isinstance(value, Secret) else value
        if raw and len(raw) >= 4:
            text = text.replace(raw, "********")
    text = redact_registered(text)
    return "".join(ch if ch.isprintable() else " " for ch in text)


def post_form(url: str, fields: Mapping[str, str], *, context: ssl.SSLContext, timeout: float = HTTP_TIMEOUT,
              hidden: list[str | Secret | None] | None = None) -> dict[str, Any]:
    """POST ``fields`` form-encoded and return the JSON object answered; OAuth2 errors raise TokenEndpointError."""
    import ssl
    import urllib.error
    import urllib.request

    hidden = [*(hidden or []), *fields.values()]
    request = urllib.request.Request(url, data=urllib.parse.urlencode(fields).encode("ascii"), method="POST",
                                     headers={"Content-Type": "application/x-www-form-urlencoded",
                                              "Accept": "application/json", "User-Agent": "postbote"})
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:  # noqa: S310 - https only
            return _json_object(response.read(MAX_RESPONSE + 1), url)
    except urllib.error.HTTPError as exc:
        raise _endpoint_error(url, exc, hidden) from None
    except urllib.error.URLError as exc:
        reason = exc.reason.reason if isinstance(exc.reason, ssl.SSLError) else exc.reason
        raise AccountError(f"cannot reach the OAuth2 endpoint {url}: {redact(str(reason), hidden)}") from None
    except TimeoutError:
        raise AccountError(f"the OAuth2 endpoint {url} did not answer within {timeout:g} s") from None
    except OSError as exc:
        raise AccountError(f"talking to the OAuth2 endpoint {url} failed: {exc.strerror or exc}") from None


def _json_object(body: bytes, url: str) -> dict[str, Any]:
    if len(body) > MAX_RESPONSE:
        raise AccountError(f"the OAuth2 endpoint {url} sent more than {MAX_RESPONSE} bytes")
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise AccountError(f"the OAuth2 endpoint {url} did not answer with JSON") from None
    if not isinstance(value, dict):
        raise AccountError(f"the OAuth2 endpoint {url} did not answer with a JSON object")
    return value


def _endpoint_error(url: str, exc: urllib.error.HTTPError, hidden: list[str | Secret | None]) -> AccountError:
    try:
        body = json.loads(exc.read(MAX_RESPONSE).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, OSError):
        body = {}
    body = body if isinstance(body, dict) else {}
    error = redact(str(body.get("error", "")), hidden)[:60]
    description = redact(str(body.get("error_description", "")), hidden)[:300]
    detail = f"{error}: {description}" if description else error or "no OAuth2 error code"
    return TokenEndpointError(f"the OAuth2 endpoint {url} answered HTTP {exc.code} ({detail})", status=exc.code,
                              error=error, description=description)


def parse_token_response(body: dict[str, Any], url: str) -> TokenResponse:
    access = body.get("access_token")
    if not isinstance(access, str) or not access:
        raise AccountError(f"the OAuth2 endpoint {url} answered without an access_token")
    token_type = body.get("token_type", "Bearer")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise AccountError(f"the OAuth2 endpoint {url} issued a {str(token_type)[:20]!r} token, not a Bearer token")
    refresh = body.get("refresh_token")
    return TokenResponse(access_token=Secret(access), expires_in=_expires_in(body.get("expires_in")),
                         refresh_token=Secret(refresh) if isinstance(refresh, str) and refresh else None)


def _expires_in(value: Any) -> float:
    return _positive_number(value, DEFAULT_EXPIRES_IN)


def _positive_number(value: Any, default: float) -> float:
    """A positive number of seconds from JSON (some providers send "3599" as a string), else ``default``."""
    if isinstance(value, bool):
        return default
    if isinstance(value, (int, float)) and value > 0:
        return float(value)
    if isinstance(value, str) and value.strip().isdigit() and int(value) > 0:
        return float(value)
    return default


# --- refresher ------------------------------------------------------------------------------------------------------

class OAuth2Refresher:
    """Access tokens from a refresh token, cached in ``cache_dir`` (0600) until shortly before they expire."""

    def __init__(self, settings: OAuth2Settings, *, account: str, cache_dir: Path | None,
                 clock: Callable[[], float] = time.time, timeout: float = HTTP_TIMEOUT) -> None:
        self.settings = settings
        self.account = account
        self.cache_file = cache_dir / f"{account}.json" if cache_dir is not None else None
        self.clock = clock
        self.timeout = timeout
        self._lock = threading.Lock()
        self._last_from_cache = False

    def describe(self) -> str:
        return f"oauth2 {self.settings.provider or self.settings.token_url} (refresh token in " \
               f"{self.settings.refresh_token_file})"

    def context(self) -> ssl.SSLContext:
        return https_context(self.settings)

    def token(self) -> Secret:
        with self._lock:
            refresh_token = self._refresh_token()
            cached = self._cached(refresh_token)
            self._last_from_cache = cached is not None
            if cached is not None:
                return cached
            response = self._refresh(refresh_token)
            self.store(response, previous=refresh_token)
            return response.access_token

    def invalidate(self) -> bool:
        """Drop the cached access token; True when the refused token came from the cache (a refresh may help)."""
        with self._lock:
            if self.cache_file is not None:
                try:
                    self.cache_file.unlink()
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    log.warning("oauth2.cache_not_removed", path=str(self.cache_file), error=exc.strerror)
            from_cache, self._last_from_cache = self._last_from_cache, False
            return from_cache

    def store(self, response: TokenResponse, *, previous: Secret | None = None) -> None:
        """Keep a token response: a new (rotated) refresh token atomically in its file, the access token cached."""
        refresh_token = previous
        if response.refresh_token is not None and response.refresh_token != previous:
            try:
                write_secret_file(self.settings.refresh_token_file, response.refresh_token.reveal() + "\n")
                refresh_token = response.refresh_token
                log.info("oauth2.refresh_token_stored", path=str(self.settings.refresh_token_file))
            except OSError as exc:
                if previous is None:
                    raise CredentialError(f"cannot write the refresh token to {self.settings.refresh_token_file}: "
                                          f"{exc.strerror or exc}") from None
                log.warning("oauth2.refresh_token_not_stored", path=str(self.settings.refresh_token_file),
                            error=exc.strerror or str(exc))
        if refresh_token is not None:
            self._write_cache(response, refresh_token)

    def _refresh_token(self) -> Secret:
        path = self.settings.refresh_token_file
        if not path.exists():
            raise CredentialError(f"no OAuth2 refresh token yet ({path} does not exist); run: postbote auth "
                                  f"{self.account}")
        return read_secret_file(path, "refresh_token_file")

    def _client_secret(self) -> Secret | None:
        path = self.settings.client_secret_file
        return read_secret_file(path, "client_secret_file") if path is not None else None

    def _refresh(self, refresh_token: Secret) -> TokenResponse:
        client_secret = self._client_secret()
        fields = {"grant_type": "refresh_token", "refresh_token": refresh_token.reveal(),
                  "client_id": self.settings.client_id, "scope": self.settings.scope}
        if client_secret is not None:
            fields["client_secret"] = client_secret.reveal()
        try:
            body = post_form(self.settings.token_url, fields, context=self.context(), timeout=self.timeout)
        except TokenEndpointError as exc:
            raise self._explain(exc) from None
        response = parse_token_response(body, self.settings.token_url)
        log.info("oauth2.token_refreshed", expires_in=int(response.expires_in),
                 rotated=response.refresh_token is not None and response.refresh_token != refresh_token)
        return response

    def _explain(self, exc: TokenEndpointError) -> AccountError | CredentialError:
        detail = f" ({exc.error}: {exc.description})" if exc.description else f" ({exc.error})"
        if exc.error == "invalid_grant":
            return CredentialError(f"the OAuth2 refresh token was refused{detail}: it was revoked, expired or issued "
                                   f"for another client; run: postbote auth {self.account}")
        if exc.error in ("invalid_client", "unauthorized_client"):
            return CredentialError(f"the token endpoint refused the OAuth client{detail}; check oauth2.client_id and "
                                   "oauth2.client_secret_file")
        if exc.error == "invalid_scope":
            return CredentialError(f"the token endpoint refused the scope {self.settings.scope!r}{detail}; check "
                                   f"oauth2.scope, then run: postbote auth {self.account}")
        return exc

    def _fingerprint(self, refresh_token: Secret) -> str:
        material = "\0".join((self.settings.token_url, self.settings.client_id, self.settings.scope,
                              refresh_token.reveal()))
        return hashlib.sha256(material.encode("utf-8")).hexdigest()[:32]

    def _cached(self, refresh_token: Secret) -> Secret | None:
        """The cached access token when it belongs to this refresh token and is not about to expire."""
        if self.cache_file is None:
            return None
        try:
            with open(self.cache_file, "rb") as handle:
                if os.fstat(handle.fileno()).st_mode & 0o077:
                    return None  # rewritten 0600 after the refresh
                data = json.loads(handle.read(MAX_SECRET_FILE).decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("key") != self._fingerprint(refresh_token):
            return None
        token, refresh_at = data.get("access_token"), data.get("refresh_at")
        if not isinstance(token, str) or not token or not isinstance(refresh_at, (int, float)):
            return None
        return Secret(token) if self.clock() < refresh_at else None

    def _write_cache(self, response: TokenResponse, refresh_token: Secret) -> None:
        if self.cache_file is None:
            return
        margin = min(REFRESH_MARGIN, response.expires_in / 4)
        now = self.clock()
        data = {"key": self._fingerprint(refresh_token), "access_token": response.access_token.reveal(),
                "expires_at": now + response.expires_in, "refresh_at": now + response.expires_in - margin}
        try:
            write_secret_file(self.cache_file, json.dumps(data))
        except OSError as exc:
            log.warning("oauth2.cache_not_written", path=str(self.cache_file), error=exc.strerror or str(exc))



# --- one-time authorization: device code flow -----------------------------------------------------------------------

def device_flow(settings: OAuth2Settings, out: TextIO, *, account: str,
                sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
                timeout: float = HTTP_TIMEOUT) -> TokenResponse:
    """RFC 8628: show the user a code and a URL, then poll the token endpoint until they have approved."""
    if not settings.device_url:
        raise CredentialError("this provider has no device_url; postbote auth uses the loopback flow instead")
    context = https_context(settings)
    client_secret = read_secret_file(settings.client_secret_file, "client_secret_file") \
        if settings.client_secret_file else None
    body = post_form(settings.device_url, {"client_id": settings.client_id, "scope": settings.scope},
                     context=context, timeout=timeout, hidden=[client_secret])
    device_code, user_code, uri = body.get("device_code"), body.get("user_code"), \
        body.get("verification_uri") or body.get("verification_url")
    if not all(isinstance(value, str) and value for value in (device_code, user_code, uri)):
        raise AccountError(f"the device endpoint {settings.device_url} answered without device_code, user_code "
                           "and verification_uri")
    assert isinstance(device_code, str)
    register_secret(device_code)  # whoever has it (and the client id) gets the tokens once the user approves
    interval = _positive_number(body.get("interval"), 5.0)
    deadline = clock() + _positive_number(body.get("expires_in"), 900.0)
    print(f"To let postbote read the mail of {account}, open\n\n    {uri}\n\nand enter the code\n\n    {user_code}\n",
          file=out, flush=True)
    fields = {"grant_type": DEVICE_GRANT, "device_code": device_code, "client_id": settings.client_id}
    if client_secret is not None:
        fields["client_secret"] = client_secret.reveal()
    while clock() < deadline:
        sleep(interval)
        try:
            return parse_token_response(post_form(settings.token_url, fields, context=context, timeout=timeout),
                                        settings.token_url)
        except TokenEndpointError as exc:
            if exc.error == "authorization_pending":
                continue
            if exc.error == "slow_down":
                interval += 5
                continue
            if exc.error == "access_denied":
                raise CredentialError("the authorization was declined in the browser; run postbote auth again "
                                      "and approve it") from None
            if exc.error == "expired_token":
                break
            raise
    raise CredentialError("the code expired before it was entered; run postbote auth again")


# --- one-time authorization: loopback redirect flow -----------------------------------------------------------------

@dataclass(frozen=True)
class _Redirect:
    code: str | None
    error: str | None


def pkce_pair() -> tuple[str, str]:
    """A PKCE code verifier and its S256 challenge (RFC 7636)."""
    verifier = secrets.token_urlsafe(64)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).rstrip(b"=")
    return verifier, challenge.decode("ascii")


def authorization_url(settings: OAuth2Settings, *, redirect_uri: str, state: str, challenge: str) -> str:
    if not settings.authorize_url:
        raise CredentialError("no authorize_url (and no device_url): postbote auth cannot run an authorization flow "
                              "for this provider; set oauth2.authorize_url")
    params = {"response_type": "code", "client_id": settings.client_id, "redirect_uri": redirect_uri,
              "scope": settings.scope, "state": state, "code_challenge": challenge, "code_challenge_method": "S256",
              **(settings.authorize_params or {})}
    separator = "&" if urllib.parse.urlsplit(settings.authorize_url).query else "?"
    return settings.authorize_url + separator + urllib.parse.urlencode(params, quote_via=urllib.parse.quote)


def _parse_redirect(query: str, state: str) -> _Redirect | None:
    """The code or error from a redirect's query string; None when it is not the redirect we wait for."""
    params = urllib.parse.parse_qs(query)
    if params.get("state", [None])[0] != state:
        return None
    error = params.get("error", [None])[0]
    if error:
        description = params.get("error_description", [""])[0]
        return _Redirect(None, f"{error}: {description}"[:300] if description else error)
    code = params.get("code", [None])[0]
    return _Redirect(code, None) if code else None


def _redirect_server(state: str, results: queue.Queue[_Redirect]) -> HTTPServer:
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            parts = urllib.parse.urlsplit(self.path)
            result = _parse_redirect(parts.query, state) if parts.path == "/" else None
            if result is None:
                self.send_error(404)
                return
            page = ("postbote: authorization received; you can close this window." if result.code
                    else "postbote: the authorization was not granted; see the terminal.")
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.end_headers()
            self.wfile.write(page.encode("utf-8"))
            results.put(result)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the request line holds the code
            return

    return HTTPServer(("127.0.0.1", 0), Handler)


def _read_pasted(paste_input: TextIO, state: str, results: queue.Queue[_Redirect]) -> None:
    """Accept the address the browser was sent to, pasted by the user (when the browser runs on another machine)."""
    for line in paste_input:
        pasted = line.strip()
        if not pasted:
            continue
        result = _parse_redirect(urllib.parse.urlsplit(pasted).query, state)
        if result is not None:
            results.put(result)
            return


def loopback_flow(settings: OAuth2Settings, out: TextIO, *, account: str, open_browser: bool = True,
                  paste_input: TextIO | None = None, wait: float = LOOPBACK_TIMEOUT,
                  timeout: float = HTTP_TIMEOUT) -> TokenResponse:
    """RFC 8252 loopback redirect with PKCE: the browser sends the code to a one-shot server on 127.0.0.1."""
    import queue

    verifier, challenge = pkce_pair()
    register_secret(verifier)
    state = secrets.token_urlsafe(24)
    results: queue.Queue[_Redirect] = queue.Queue()
    server = _redirect_server(state, results)
    redirect_uri = f"http://127.0.0.1:{server.server_address[1]}/"
    url = authorization_url(settings, redirect_uri=redirect_uri, state=state, challenge=challenge)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        print(f"To let postbote read the mail of {account}, open this address in a browser and sign in:\n\n    {url}\n",
              file=out, flush=True)
        if paste_input is not None:
            print("If the browser runs on another machine, paste the address it ends up on here.", file=out,
                  flush=True)
            threading.Thread(target=_read_pasted, args=(paste_input, state, results), daemon=True).start()
        if open_browser:
            _open_browser(url)
        try:
            result = results.get(timeout=wait)
        except queue.Empty:
            raise CredentialError(f"no authorization arrived within {wait:g} s; run postbote auth again") from None
    finally:
        server.shutdown()
        server.server_close()
    if result.error or not result.code:
        raise CredentialError(f"the authorization was not granted ({result.error}); run postbote auth again")
    return exchange_code(settings, code=result.code, redirect_uri=redirect_uri, verifier=verifier, timeout=timeout)


def _open_browser(url: str) -> None:
    """Open a graphical browser if there is a display; never a console browser that would take the terminal."""
    graphical = sys.platform in ("darwin", "win32") or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    if not graphical:
        return
    import webbrowser

    with contextlib.suppress(webbrowser.Error):
        webbrowser.open(url)


def exchange_code(settings: OAuth2Settings, *, code: str, redirect_uri: str, verifier: str,
                  timeout: float = HTTP_TIMEOUT) -> TokenResponse:
    """Trade an authorization code for tokens (RFC 6749 section 4.1.3 with the PKCE verifier)."""
    register_secret(code)
    context = https_context(settings)
    fields = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
              "client_id": settings.client_id, "code_verifier": verifier}
    if settings.client_secret_file is not None:
        fields["client_secret"] = read_secret_file(settings.client_secret_file, "client_secret_file").reveal()
    return parse_token_response(post_form(settings.token_url, fields, context=context, timeout=timeout),
                                settings.token_url)
