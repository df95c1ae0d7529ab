"""Dovecot with every SASL mechanism postbote speaks, and a fake OAuth2 provider on loopback.

:class:`SaslDovecotServer` is a :class:`~tests.servers.dovecot.DovecotServer` whose configuration additionally

* offers ``plain login cram-md5 scram-sha-1 scram-sha-256 xoauth2 oauthbearer`` (and APOP),
* can store a user's password as SCRAM credentials (``{SCRAM-SHA-256}iter,salt,stored,server`` made by
  ``doveadm pw``) instead of ``{PLAIN}``, so SCRAM is tested against what Dovecot derives itself,
* has an ``oauth2`` passdb for XOAUTH2/OAUTHBEARER that checks tokens at the provider's introspection endpoint
  (``introspection_mode = post``, RFC 7662 style ``{"active": true, "username": ...}``).

:class:`FakeOAuthProvider` is an HTTPS server (the test PKI's certificate) with a token endpoint (refresh token,
authorization code with PKCE, device code grants), a device authorization endpoint and the introspection
endpoint. Tests steer it: issue and revoke refresh tokens, make access tokens expire, turn on rotation.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import shutil
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from postbote.testing.https import StandInHTTPServer

from tests.servers import LOOPBACK
from tests.servers.certs import TestPKI
from tests.servers.dovecot import DEFAULT_USERS, DovecotServer, _find_tool

SASL_MECHANISMS = "plain login cram-md5 scram-sha-1 scram-sha-256 xoauth2 oauthbearer apop"


# --- the fake OAuth2 provider ---------------------------------------------------------------------------------------

@dataclass
class _Grant:
    user: str
    client_id: str


@dataclass
class _DeviceGrant:
    user: str
    client_id: str
    polls_before_approval: int
    outcome: str = "approve"  # approve | deny


@dataclass
class ProviderState:
    clients: dict[str, str | None] = field(default_factory=dict)  # client_id -> secret (None: public client)
    refresh_tokens: dict[str, _Grant] = field(default_factory=dict)
    access_tokens: dict[str, tuple[str, float]] = field(default_factory=dict)  # token -> (user, expires at)
    codes: dict[str, tuple[_Grant, str, str]] = field(default_factory=dict)  # code -> grant, redirect_uri, challenge
    devices: dict[str, _DeviceGrant] = field(default_factory=dict)
    expires_in: int = 3600
    rotate: bool = False
    refresh_count: int = 0
    introspections: int = 0
    requests: list[str] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)  # every token and code handed out, to grep logs for


class FakeOAuthProvider:
    """Token, device and introspection endpoints on https://127.0.0.1:PORT/ (or http with ``pki=None``)."""

    def __init__(self, pki: TestPKI | None) -> None:
        self.state = ProviderState()
        self._lock = threading.Lock()
        self._server = StandInHTTPServer((LOOPBACK, 0), self._handler_class(),
                                      pki.server_context() if pki is not None else None)
        self.base_url = self._server.base_url
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    # lifecycle

    def start(self) -> FakeOAuthProvider:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeOAuthProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def token_url(self) -> str:
        return f"{self.base_url}/token"

    @property
    def device_url(self) -> str:
        return f"{self.base_url}/device"

    @property
    def introspection_url(self) -> str:
        return f"{self.base_url}/introspect"

    # steering

    def add_client(self, client_id: str, secret: str | None = None) -> None:
        with self._lock:
            self.state.clients[client_id] = secret

    def issue_refresh_token(self, user: str, client_id: str) -> str:
        token = "rt-" + secrets.token_urlsafe(24)
        with self._lock:
            self.state.refresh_tokens[token] = _Grant(user, client_id)
            self.state.issued.append(token)
        return token

    def issue_access_token(self, user: str, expires_in: int | None = None, size: int = 32) -> str:
        """A valid access token for ``user``; ``size`` random bytes (Microsoft's tokens are over 1000 characters)."""
        token = "at-" + secrets.token_urlsafe(size)
        with self._lock:
            self.state.access_tokens[token] = (user, time.time() + (expires_in or self.state.expires_in))
            self.state.issued.append(token)
        return token

    def revoke_refresh_tokens(self) -> None:
        with self._lock:
            self.state.refresh_tokens.clear()

    def revoke_access_tokens(self) -> None:
        with self._lock:
            self.state.access_tokens.clear()

    def issue_code(self, user: str, client_id: str, redirect_uri: str, challenge: str) -> str:
        code = "code-" + secrets.token_urlsafe(16)
        with self._lock:
            self.state.codes[code] = (_Grant(user, client_id), redirect_uri, challenge)
            self.state.issued.append(code)
        return code

    def approve_device(self, user: str, polls_before_approval: int = 1, outcome: str = "approve") -> None:
        """The next device authorization will be approved (or denied) after that many pending polls."""
        with self._lock:
            self.state.devices["next"] = _DeviceGrant(user, "", polls_before_approval, outcome)

    # HTTP

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                form = {k: v[0] for k, v in urllib.parse.parse_qs(self.rfile.read(length).decode()).items()}
                status, body = provider._dispatch(self.path, form, self.headers.get("Authorization"))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return

        return Handler

    def _dispatch(self, path: str, form: Mapping[str, str], authorization: str | None) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.state.requests.append(path)
            if path == "/token":
                return self._token(form)
            if path == "/device":
                return self._device(form)
            if path == "/introspect":
                return self._introspect(form)
        return 404, {"error": "not_found"}

    def _client_ok(self, form: Mapping[str, str]) -> bool:
        client_id = form.get("client_id", "")
        if client_id not in self.state.clients:
            return False
        expected = self.state.clients[client_id]
        return expected is None or form.get("client_secret") == expected

    def _new_tokens(self, grant: _Grant, refresh_token: str | None) -> dict[str, Any]:
        access = "at-" + secrets.token_urlsafe(32)
        self.state.access_tokens[access] = (grant.user, time.time() + self.state.expires_in)
        self.state.issued.append(access)
        body: dict[str, Any] = {"access_token": access, "token_type": "Bearer", "expires_in": self.state.expires_in}
        if refresh_token is None or self.state.rotate:
            if refresh_token is not None:
                del self.state.refresh_tokens[refresh_token]
            new = "rt-" + secrets.token_urlsafe(24)
            self.state.refresh_tokens[new] = grant
            self.state.issued.append(new)
            body["refresh_token"] = new
        return body

    def _token(self, form: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
        if not self._client_ok(form):
            return 401, {"error": "invalid_client", "error_description": "unknown client or wrong secret"}
        grant_type = form.get("grant_type")
        if grant_type == "refresh_token":
            self.state.refresh_count += 1
            grant = self.state.refresh_tokens.get(form.get("refresh_token", ""))
            if grant is None or grant.client_id != form["client_id"]:
                # Some providers echo the token in the description; postbote must cut it out.
                return 400, {"error": "invalid_grant",
                             "error_description": f"Token has been expired or revoked: {form.get('refresh_token')}"}
            return 200, self._new_tokens(grant, form["refresh_token"])
        if grant_type == "authorization_code":
            entry = self.state.codes.pop(form.get("code", ""), None)
            if entry is None:
                return 400, {"error": "invalid_grant", "error_description": "unknown code"}
            grant, redirect_uri, challenge = entry
            verifier = form.get("code_verifier", "")
            computed = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
            if redirect_uri != form.get("redirect_uri") or computed != challenge:
                return 400, {"error": "invalid_grant", "error_description": "PKCE or redirect_uri mismatch"}
            return 200, self._new_tokens(grant, None)
        if grant_type == "urn:ietf:params:oauth:grant-type:device_code":
            device = self.state.devices.get(form.get("device_code", ""))
            if device is None:
                return 400, {"error": "expired_token"}
            if device.polls_before_approval > 0:
                device.polls_before_approval -= 1
                return 400, {"error": "authorization_pending"}
            del self.state.devices[form["device_code"]]
            if device.outcome == "deny":
                return 400, {"error": "access_denied"}
            return 200, self._new_tokens(_Grant(device.user, device.client_id), None)
        return 400, {"error": "unsupported_grant_type"}

    def _device(self, form: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
        pending = self.state.devices.pop("next", None)
        if form.get("client_id") not in self.state.clients or pending is None:
            return 400, {"error": "invalid_client"}
        pending.client_id = form["client_id"]
        device_code = "dc-" + secrets.token_urlsafe(16)
        self.state.devices[device_code] = pending
        self.state.issued.append(device_code)
        return 200, {"device_code": device_code, "user_code": "WDJB-MJHT",
                     "verification_uri": f"{self.base_url}/device-login", "expires_in": 900, "interval": 1}

    def _introspect(self, form: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
        self.state.introspections += 1
        entry = self.state.access_tokens.get(form.get("token", ""))
        if entry is None or entry[1] < time.time():
            return 200, {"active": "false"}
        return 200, {"active": "true", "username": entry[0], "scope": "pop"}


# --- Dovecot with SASL ----------------------------------------------------------------------------------------------

def scram_credentials(scheme: str, password: str) -> str:
    """``{SCRAM-SHA-256}4096,salt,stored,server`` as Dovecot's own ``doveadm pw`` derives it."""
    doveadm = _find_tool("doveadm")
    if doveadm is None:
        raise RuntimeError("doveadm not found (apt-get install dovecot-core)")
    # -c /dev/null: independent of (and unaffected by) any system Dovecot configuration.
    done = subprocess.run([doveadm, "-c", "/dev/null", "pw", "-s", scheme, "-p", password], capture_output=True,
                          timeout=30,
                          check=True, stdin=subprocess.DEVNULL)
    stored = done.stdout.decode().strip()
    if not stored.startswith(f"{{{scheme}}}"):
        raise RuntimeError(f"doveadm pw -s {scheme} printed {stored!r}")
    return stored


class SaslDovecotServer(DovecotServer):
    """DovecotServer plus all SASL mechanisms, SCRAM-stored users and an oauth2 passdb (see the module doc)."""

    def __init__(self, *, pki: TestPKI | None, introspection_url: str | None = None,
                 ca_file: Path | None = None, tls: bool = True, users: Mapping[str, str] = DEFAULT_USERS,
                 stored: Mapping[str, str] | None = None) -> None:
        """``stored`` maps user names (also in ``users``) to the stored form of their password, such as
        ``scram_credentials("SCRAM-SHA-256", password)``; ``ca_file`` is the CA Dovecot trusts for introspection."""
        self._stored = dict(stored or {})
        self.introspection_url = introspection_url
        super().__init__(pki=pki, tls=tls, users=users)
        self.oauth2_config_file = self.root / "oauth2.conf"
        self.oauth2_ca_file: Path | None = None
        if ca_file is not None:
            # The auth process runs as an unprivileged user: give it a readable copy inside our 0755 root.
            self.oauth2_ca_file = self.root / "oauth2-ca.pem"
            shutil.copyfile(ca_file, self.oauth2_ca_file)
            self.oauth2_ca_file.chmod(0o644)

    def add_user(self, name: str, password: str) -> None:
        super().add_user(name, password)
        if self._stored:
            self._apply_stored()

    def _apply_stored(self) -> None:
        """Put the stored forms in place of ``{PLAIN}password`` in the passwd-file (field 2 of each line)."""
        lines = []
        for line in self.passwd_file.read_text().splitlines(keepends=True):
            user, _, rest = line.partition(":")
            if user in self._stored:
                rest = self._stored[user] + ":" + rest.partition(":")[2]
            lines.append(f"{user}:{rest}")
        staging = self.passwd_file.with_suffix(".stored")
        staging.write_text("".join(lines))
        staging.chmod(0o644)
        staging.replace(self.passwd_file)

    def render_config(self) -> str:
        return super().render_config() + "\n" + self._sasl_config()

    def _sasl_config(self) -> str:
        lines = ["# tests/servers/dovecot_sasl.py: every SASL mechanism postbote speaks",
                 f"auth_mechanisms = {SASL_MECHANISMS}"]
        if self.introspection_url:
            self._write_oauth2_config()
            lines += ["passdb {", "  driver = oauth2", "  mechanisms = xoauth2 oauthbearer",
                      f"  args = {self.oauth2_config_file}", "}"]
        return "\n".join(lines) + "\n"

    def _write_oauth2_config(self) -> None:
        settings = [
            "introspection_mode = post",
            f"introspection_url = {self.introspection_url}",
            "force_introspection = yes",
            "username_attribute = username",
            "active_attribute = active",
            "active_value = true",
        ]
        if self.oauth2_ca_file is not None:
            settings.append(f"tls_ca_cert_file = {self.oauth2_ca_file}")
        self.oauth2_config_file.write_text("\n".join(settings) + "\n")
        self.oauth2_config_file.chmod(0o644)
