"""SASL mechanisms for POP3 AUTH (RFC 5034) and the choice of a safe one.

Each mechanism class is driven by a client's ``authenticate`` (`postbote.plugins.pop3.client.POP3Client`'s) through
the `SASLMechanism` protocol: ``initial_response()`` gives the client-first data (or None for server-first
mechanisms) and ``respond(challenge)`` answers each server challenge. After the server said +OK,
`Mechanism.complete` checks that the exchange really finished: SCRAM refuses a session whose server never proved
that it knows the password (RFC 5802 ServerSignature).

`choose_mechanism` implements ``auth: auto``: the strongest mechanism the server offers that is safe on this
connection. It never picks APOP, and never one that sends a reusable secret (a password or a bearer token) over an
unencrypted connection unless the admin explicitly configured ``tls: none``.

Secrets are held as `postbote.Secret` and revealed only while building the bytes that go on the wire;
no error message here contains a secret.

Every login goes through `choose_mechanism`, so this module is loaded by every poll; what only the challenge-response
mechanisms need (``hmac``, ``secrets``, the SASLprep tables) is imported when they run.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable, Sequence

from postbote import AccountError, Secret
from postbote.plugins.signin.settings import AUTH_CHOICES, TOKEN_MECHANISMS, AuthChoice

# --- mechanism names ------------------------------------------------------------------------------------------------

# AUTH_CHOICES (what ``auth:`` may say) and TOKEN_MECHANISMS are the settings': reading a config loads no SASL code.
PASSWORD_MECHANISMS = frozenset(AUTH_CHOICES) - TOKEN_MECHANISMS - {AuthChoice.AUTO.value}
# Mechanisms that put a reusable secret (password or bearer token) on the wire as it is.
CLEARTEXT_MECHANISMS = frozenset({"user", "plain", "login", "xoauth2", "oauthbearer"})
SASL_NAMES = {"plain": "PLAIN", "login": "LOGIN", "cram-md5": "CRAM-MD5", "scram-sha-1": "SCRAM-SHA-1",
              "scram-sha-256": "SCRAM-SHA-256", "xoauth2": "XOAUTH2", "oauthbearer": "OAUTHBEARER"}
# auth: auto, strongest first. CRAM-MD5 keeps the password off the wire but is weak (MD5, server stores plaintext).
AUTO_CHALLENGE_ORDER = ("scram-sha-256", "scram-sha-1", "cram-md5")
AUTO_CLEARTEXT_ORDER = ("plain", "login")
AUTO_TOKEN_ORDER = ("oauthbearer", "xoauth2")

SCRAM_MIN_ITERATIONS = 4096  # RFC 5802 section 5.1 / RFC 7677: at least 4096
SCRAM_MAX_ITERATIONS = 10_000_000  # a hostile server must not make us burn minutes of CPU


class SASLError(AccountError):
    """A SASL exchange went wrong on the client side: a malformed challenge or a server that failed to prove itself."""


class MechanismChoiceError(AccountError):
    """No mechanism fits what is configured, what the server offers and what is safe on this connection."""


# --- helpers: saslname escaping, SASLprep, attribute parsing --------------------------------------------------------

def escape_saslname(name: str) -> str:
    """RFC 5802 saslname: ``=`` becomes ``=3D`` and ``,`` becomes ``=2C`` (also used for the GS2 authzid)."""
    return name.replace("=", "=3D").replace(",", "=2C")


def unescape_saslname(value: str) -> str:
    """Inverse of `escape_saslname`; any other ``=`` sequence is malformed."""
    out: list[str] = []
    index = 0
    while index < len(value):
        char = value[index]
        if char == ",":
            raise ValueError("unescaped ',' in saslname")
        if char != "=":
            out.append(char)
            index += 1
            continue
        code = value[index + 1:index + 3]
        if code == "3D":
            out.append("=")
        elif code == "2C":
            out.append(",")
        else:
            raise ValueError("bad '=' escape in saslname")
        index += 3
    return "".join(out)


def saslprep(text: str) -> str:
    """RFC 4013 SASLprep for stored strings; raises ValueError on prohibited or badly mixed bidirectional text."""
    import stringprep
    import unicodedata

    prohibited = (stringprep.in_table_c12, stringprep.in_table_c21, stringprep.in_table_c22, stringprep.in_table_c3,
                  stringprep.in_table_c4, stringprep.in_table_c5, stringprep.in_table_c6, stringprep.in_table_c7,
                  stringprep.in_table_c8, stringprep.in_table_c9, stringprep.in_table_a1)
    mapped = "".join(" " if stringprep.in_table_c12(ch) else ch for ch in text if not stringprep.in_table_b1(ch))
    prepared = unicodedata.normalize("NFKC", mapped)
    for char in prepared:
        if any(table(char) for table in prohibited):
            raise ValueError(f"prohibited character U+{ord(char):04X}")
    if any(stringprep.in_table_d1(ch) for ch in prepared):
        if any(stringprep.in_table_d2(ch) for ch in prepared):
            raise ValueError("mixes right-to-left and left-to-right text")
        if not (stringprep.in_table_d1(prepared[0]) and stringprep.in_table_d1(prepared[-1])):
            raise ValueError("right-to-left text must start and end with a right-to-left character")
    return prepared


def _prepared(text: str) -> str:
    """SASLprep'd text, or the text as it is when SASLprep refuses it (servers such as Dovecot do not prep)."""
    try:
        return saslprep(text) or text
    except ValueError:
        return text


def parse_attributes(message: bytes, what: str) -> list[tuple[str, str]]:
    """``a=value,b=value`` (RFC 5802 section 5) as a list of (letter, value); raises SASLError when malformed."""
    try:
        text = message.decode("utf-8")
    except UnicodeDecodeError:
        raise SASLError(f"{what}: not UTF-8") from None
    attributes: list[tuple[str, str]] = []
    for part in text.split(","):
        if len(part) < 2 or part[1] != "=" or not ("a" <= part[0] <= "z" or "A" <= part[0] <= "Z"):
            raise SASLError(f"{what}: malformed attribute {part[:20]!r}")
        attributes.append((part[0], part[2:]))
    return attributes


def strict_b64decode(value: str, what: str) -> bytes:
    """Canonical base64 with padding and nothing else, as SCRAM requires; raises SASLError otherwise."""
    try:
        decoded = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise SASLError(f"{what}: invalid base64") from None
    if base64.b64encode(decoded).decode("ascii") != value:
        raise SASLError(f"{what}: invalid base64 (not in canonical form)")
    return decoded


def _printable_nonce(value: str) -> bool:
    return bool(value) and all("\x21" <= ch <= "\x7e" and ch != "," for ch in value)


# --- mechanisms -----------------------------------------------------------------------------------------------------

class Mechanism:
    """Common base: a mechanism whose exchange is over once the server says +OK."""

    name = ""

    def initial_response(self) -> bytes | None:
        return None

    def respond(self, challenge: bytes) -> bytes:
        raise SASLError(f"AUTH {self.name}: the server sent an unexpected challenge")

    def complete(self) -> None:
        """Called after the server's +OK; raises when the exchange did not really finish."""


class Plain(Mechanism):
    """RFC 4616: ``authzid NUL authcid NUL password`` in one go."""

    name = "PLAIN"

    def __init__(self, username: str, password: Secret, authzid: str = "") -> None:
        self._username = username
        self._password = password
        self._authzid = authzid

    def initial_response(self) -> bytes:
        return f"{self._authzid}\0{self._username}\0{self._password.reveal()}".encode()


class Login(Mechanism):
    """The obsolete LOGIN mechanism: the server asks for the user name, then for the password."""

    name = "LOGIN"

    def __init__(self, username: str, password: Secret) -> None:
        self._username = username
        self._password = password
        self._answered = 0

    def respond(self, challenge: bytes) -> bytes:
        prompt = challenge.lower()
        wants_password = b"pass" in prompt or (self._answered >= 1 and b"user" not in prompt)
        if self._answered >= 2:
            raise SASLError("AUTH LOGIN: the server asked for more than a user name and a password")
        self._answered += 1
        if wants_password:
            return self._password.reveal().encode("utf-8")
        return self._username.encode("utf-8")


class CramMD5(Mechanism):
    """RFC 2195: the answer is the user name and HMAC-MD5(password, challenge) in hex."""

    name = "CRAM-MD5"

    def __init__(self, username: str, password: Secret) -> None:
        self._username = username
        self._password = password
        self._answered = False

    def respond(self, challenge: bytes) -> bytes:
        import hmac

        if self._answered or not challenge:
            raise SASLError("AUTH CRAM-MD5: the server sent no usable challenge")
        self._answered = True
        digest = hmac.new(self._password.reveal().encode("utf-8"), challenge, hashlib.md5).hexdigest()
        return f"{self._username} {digest}".encode()


class Scram(Mechanism):
    """SCRAM-SHA-1 (RFC 5802) and SCRAM-SHA-256 (RFC 7677) without channel binding, server signature verified."""

    HASHES = {"SCRAM-SHA-1": "sha1", "SCRAM-SHA-256": "sha256"}

    def __init__(self, name: str, username: str, password: Secret, *, authzid: str = "",
                 nonce: str | None = None) -> None:
        import secrets

        if name not in self.HASHES:
            raise ValueError(f"unknown SCRAM variant {name}")
        self.name = name
        self._hash = self.HASHES[name]
        self._username = username
        self._password = password
        self._gs2_header = f"n,{'a=' + escape_saslname(authzid) if authzid else ''},"
        self._nonce = nonce or secrets.token_urlsafe(24)
        if not _printable_nonce(self._nonce):
            raise ValueError("a SCRAM nonce must be printable ASCII without ','")
        self._client_first_bare = f"n={escape_saslname(_prepared(username))},r={self._nonce}"
        self._expected_server_signature: bytes | None = None
        self._state = "new"

    def initial_response(self) -> bytes:
        self._state = "client-first sent"
        return (self._gs2_header + self._client_first_bare).encode("utf-8")

    def respond(self, challenge: bytes) -> bytes:
        if self._state == "client-first sent":
            self._state = "client-final sent"
            return self._client_final(challenge)
        if self._state == "client-final sent":
            self._verify_server_final(challenge)
            self._state = "verified"
            return b""
        raise SASLError(f"AUTH {self.name}: the server sent a challenge after the exchange was over")

    def complete(self) -> None:
        if self._state != "verified":
            raise SASLError(f"AUTH {self.name}: the server accepted the login without proving that it knows the "
                            "password (no SCRAM server signature); refusing the session")

    def _client_final(self, server_first: bytes) -> bytes:
        nonce, salt, iterations = self._parse_server_first(server_first)
        without_proof = f"c={base64.b64encode(self._gs2_header.encode('utf-8')).decode('ascii')},r={nonce}"
        auth_message = f"{self._client_first_bare},{server_first.decode('utf-8')},{without_proof}".encode()
        password = _prepared(self._password.reveal()).encode("utf-8")
        salted = hashlib.pbkdf2_hmac(self._hash, password, salt, iterations)
        client_key = self._hmac(salted, b"Client Key")
        stored_key = hashlib.new(self._hash, client_key).digest()
        signature = self._hmac(stored_key, auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        self._expected_server_signature = self._hmac(self._hmac(salted, b"Server Key"), auth_message)
        return f"{without_proof},p={base64.b64encode(proof).decode('ascii')}".encode()

    def _parse_server_first(self, message: bytes) -> tuple[str, bytes, int]:
        what = f"AUTH {self.name} server-first-message"
        attributes = parse_attributes(message, what)
        if attributes and attributes[0][0] == "m":
            raise SASLError(f"{what}: the server requires an unsupported SCRAM extension")
        if len(attributes) < 3 or [key for key, _ in attributes[:3]] != ["r", "s", "i"]:
            raise SASLError(f"{what}: expected r=, s= and i= in that order")
        nonce, salt_text, iterations_text = (value for _, value in attributes[:3])
        if not nonce.startswith(self._nonce) or len(nonce) <= len(self._nonce) or not _printable_nonce(nonce):
            raise SASLError(f"{what}: the server nonce does not extend ours")
        salt = strict_b64decode(salt_text, f"{what} salt")
        if not salt:
            raise SASLError(f"{what}: empty salt")
        if not iterations_text.isdigit() or not iterations_text.isascii():
            raise SASLError(f"{what}: the iteration count is not a number")
        iterations = int(iterations_text)
        if not SCRAM_MIN_ITERATIONS <= iterations <= SCRAM_MAX_ITERATIONS:
            raise SASLError(f"{what}: iteration count {iterations} is outside {SCRAM_MIN_ITERATIONS}.."
                            f"{SCRAM_MAX_ITERATIONS}; refusing (too few make the exchange easy to crack)")
        return nonce, salt, iterations

    def _verify_server_final(self, message: bytes) -> None:
        import hmac

        what = f"AUTH {self.name} server-final-message"
        attributes = parse_attributes(message, what)
        key, value = attributes[0]
        if key == "e":
            raise SASLError(f"AUTH {self.name}: the server reported an error: {value[:100]}")
        if key != "v" or self._expected_server_signature is None:
            raise SASLError(f"{what}: expected v=")
        signature = strict_b64decode(value, f"{what} signature")
        if not hmac.compare_digest(signature, self._expected_server_signature):
            raise SASLError(f"AUTH {self.name}: the server's signature is wrong: it does not know the password, so "
                            "it may be an impostor; refusing the session")

    def _hmac(self, key: bytes, message: bytes) -> bytes:
        import hmac

        return hmac.new(key, message, self._hash).digest()


class XOAuth2(Mechanism):
    """Google's and Microsoft's XOAUTH2: ``user=U^Aauth=Bearer T^A^A``; a JSON error challenge is answered empty."""

    name = "XOAUTH2"

    def __init__(self, username: str, token: Secret) -> None:
        self._username = username
        self._token = token
        self.error: dict[str, object] | None = None

    def initial_response(self) -> bytes:
        return f"user={self._username}\x01auth=Bearer {self._token.reveal()}\x01\x01".encode()

    def respond(self, challenge: bytes) -> bytes:
        self.error = parse_oauth_error(challenge)
        return b""


class OAuthBearer(Mechanism):
    """RFC 7628 OAUTHBEARER; on failure the server sends a JSON error challenge that must be answered with ``^A``."""

    name = "OAUTHBEARER"

    def __init__(self, username: str, token: Secret, host: str = "", port: int | None = None) -> None:
        self._username = username
        self._token = token
        self._host = host
        self._port = port
        self.error: dict[str, object] | None = None

    def initial_response(self) -> bytes:
        fields = [f"n,a={escape_saslname(self._username)},"]
        if self._host:
            fields.append(f"host={self._host}")
        if self._port is not None:
            fields.append(f"port={self._port}")
        fields.append(f"auth=Bearer {self._token.reveal()}")
        return ("\x01".join(fields) + "\x01\x01").encode("utf-8")

    def respond(self, challenge: bytes) -> bytes:
        self.error = parse_oauth_error(challenge)
        return b"\x01"


def parse_oauth_error(challenge: bytes) -> dict[str, object]:
    """The JSON status a server sends when it refuses a bearer token (RFC 7628 section 3.2.2), or {} if unreadable."""
    try:
        value = json.loads(challenge.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def make_mechanism(choice: str, username: str, secret: Secret, *, host: str = "",
                   port: int | None = None) -> Mechanism:
    """The mechanism object for an ``auth:`` choice (a SASL one: not user or apop)."""
    if choice == "plain":
        return Plain(username, secret)
    if choice == "login":
        return Login(username, secret)
    if choice == "cram-md5":
        return CramMD5(username, secret)
    if choice in ("scram-sha-1", "scram-sha-256"):
        return Scram(SASL_NAMES[choice], username, secret)
    if choice == "xoauth2":
        return XOAuth2(username, secret)
    if choice == "oauthbearer":
        return OAuthBearer(username, secret, host, port)
    raise ValueError(f"{choice} is not a SASL mechanism")


# --- choosing -------------------------------------------------------------------------------------------------------

def choose_mechanism(auth_setting: str, server_mechanisms: Iterable[str], connection_encrypted: bool,
                     has_password: bool, has_oauth: bool, *, explicit_cleartext_ok: bool = False,
                     offers_user: bool = True) -> str:
    """The ``auth:`` choice to use with this server on this connection (one of `AUTH_CHOICES` minus ``auto``).

    ``server_mechanisms`` are the names from CAPA SASL; ``explicit_cleartext_ok`` is true when the admin configured
    ``tls: none`` on purpose, which allows sending a password or token unencrypted (the caller warns).
    ``offers_user`` is false when the server's CAPA lists no USER. Raises `MechanismChoiceError` naming what to do.
    """
    offered = {name.upper() for name in server_mechanisms}
    cleartext_allowed = connection_encrypted or explicit_cleartext_ok
    if auth_setting == "auto":
        return _choose_auto(offered, cleartext_allowed, has_password, has_oauth, offers_user)
    return _check_explicit(auth_setting, offered, cleartext_allowed, has_password, has_oauth)


def _check_explicit(setting: str, offered: set[str], cleartext_allowed: bool, has_password: bool,
                    has_oauth: bool) -> str:
    if setting not in AUTH_CHOICES:
        raise MechanismChoiceError(f"auth: {setting} is unknown; expected one of {', '.join(AUTH_CHOICES)}")
    if setting in PASSWORD_MECHANISMS and not has_password:
        raise MechanismChoiceError(f"auth: {setting} needs a password (password, password_file, password_command "
                                   "or password_env)")
    if setting in TOKEN_MECHANISMS and not has_oauth:
        raise MechanismChoiceError(f"auth: {setting} needs an OAuth2 access token (token_command or oauth2)")
    sasl_name = SASL_NAMES.get(setting)
    if sasl_name and offered and sasl_name not in offered:
        raise MechanismChoiceError(f"auth: {setting}: the server does not offer {sasl_name} (it offers "
                                   f"{_listing(offered)}); choose one of those or auth: auto")
    if setting in CLEARTEXT_MECHANISMS and not cleartext_allowed:
        raise MechanismChoiceError(f"auth: {setting} would send the {_secret_word(setting)} unencrypted; use "
                                   "tls: implicit or tls: starttls (or set tls: none to accept that)")
    return setting


def _choose_auto(offered: set[str], cleartext_allowed: bool, has_password: bool, has_oauth: bool,
                 offers_user: bool) -> str:
    if has_oauth:
        return _auto_token(offered, cleartext_allowed)
    if not has_password:
        raise MechanismChoiceError("no credentials configured: give a password source, token_command or oauth2")
    for choice in AUTO_CHALLENGE_ORDER:
        if SASL_NAMES[choice] in offered:
            return choice
    candidates = [c for c in AUTO_CLEARTEXT_ORDER if SASL_NAMES[c] in offered] + (["user"] if offers_user else [])
    if not candidates:
        raise MechanismChoiceError(f"the server offers no login method postbote can use with a password (it offers "
                                   f"{_listing(offered)}, and no USER)")
    if not cleartext_allowed:
        raise MechanismChoiceError("on this unencrypted connection the server offers only login methods that send "
                                   "the password in the clear; use tls: implicit or tls: starttls (or set tls: none "
                                   "to accept that)")
    return candidates[0]


def _auto_token(offered: set[str], cleartext_allowed: bool) -> str:
    choices = [c for c in AUTO_TOKEN_ORDER if SASL_NAMES[c] in offered]
    if not offered:
        choices = ["xoauth2"]  # no CAPA SASL list: try what Google and Microsoft speak
    if not choices:
        raise MechanismChoiceError(f"the server does not offer OAUTHBEARER or XOAUTH2 (it offers "
                                   f"{_listing(offered)}), so an OAuth2 token cannot be used; use a password instead")
    if not cleartext_allowed:
        raise MechanismChoiceError("an OAuth2 access token would cross this unencrypted connection in the clear; use "
                                   "tls: implicit or tls: starttls (or set tls: none to accept that)")
    return choices[0]


def sends_secret_in_clear(choice: str) -> bool:
    return choice in CLEARTEXT_MECHANISMS


def _secret_word(choice: str) -> str:
    return "access token" if choice in TOKEN_MECHANISMS else "password"


def _listing(offered: Sequence[str] | set[str]) -> str:
    return ", ".join(sorted(offered)) or "no SASL mechanisms"
