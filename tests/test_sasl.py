"""SASL mechanisms and the safe choice of one: RFC test vectors, property tests, choose_mechanism's rules."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from postbote.credentials import Secret
from postbote.plugins.signin.sasl import (
    AUTH_CHOICES,
    CLEARTEXT_MECHANISMS,
    SASL_NAMES,
    CramMD5,
    Login,
    MechanismChoiceError,
    OAuthBearer,
    Plain,
    SASLError,
    Scram,
    XOAuth2,
    _prepared,
    choose_mechanism,
    escape_saslname,
    make_mechanism,
    parse_attributes,
    saslprep,
    strict_b64decode,
    unescape_saslname,
)

# --- RFC test vectors -----------------------------------------------------------------------------------------------


def test_scram_sha1_rfc5802_vector() -> None:
    scram = Scram("SCRAM-SHA-1", "user", Secret("pencil"), nonce="fyko+d2lbbFgONRv9qkxdawL")
    assert scram.initial_response() == b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL"
    final = scram.respond(b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096")
    assert final == b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts="
    assert scram.respond(b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ=") == b""
    scram.complete()


def test_scram_sha256_rfc7677_vector() -> None:
    scram = Scram("SCRAM-SHA-256", "user", Secret("pencil"), nonce="rOprNGfwEbeRWgbNEkqO")
    assert scram.initial_response() == b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    final = scram.respond(b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
    assert final == (b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                     b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    assert scram.respond(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=") == b""
    scram.complete()


def test_cram_md5_rfc2195_vector() -> None:
    mechanism = CramMD5("tim", Secret("tanstaaftanstaaf"))
    assert mechanism.initial_response() is None
    answer = mechanism.respond(b"<1896.697170952@postoffice.reston.mci.net>")
    assert answer == b"tim b913a602c7eda7a495b4e6e7334d3890"


def test_oauthbearer_rfc7628_format() -> None:
    mechanism = OAuthBearer("user@example.com", Secret("vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg=="),
                            "server.example.com", 143)
    assert mechanism.initial_response() == (b"n,a=user@example.com,\x01host=server.example.com\x01port=143\x01"
                                            b"auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01")
    # On failure the server sends a JSON status and the client must answer with a lone ^A (RFC 7628 3.2.3).
    assert mechanism.respond(b'{"status":"invalid_token","scope":"pop"}') == b"\x01"
    assert mechanism.error == {"status": "invalid_token", "scope": "pop"}


def test_xoauth2_format_and_error_challenge() -> None:
    mechanism = XOAuth2("someuser@example.com", Secret("ya29.vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg"))
    assert mechanism.initial_response() == (b"user=someuser@example.com\x01auth=Bearer "
                                            b"ya29.vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg\x01\x01")
    assert mechanism.respond(b'{"status":"401","schemes":"bearer"}') == b""
    assert mechanism.error == {"status": "401", "schemes": "bearer"}
    assert XOAuth2("u", Secret("t")).respond(b"not json") == b""


def test_plain_and_login() -> None:
    assert Plain("tim", Secret("tanstaaf")).initial_response() == b"\0tim\0tanstaaf"
    assert Plain("tim", Secret("x"), authzid="admin").initial_response() == b"admin\0tim\0x"
    login = Login("tim", Secret("tanstaaf"))
    assert login.initial_response() is None
    assert login.respond(b"Username:") == b"tim"
    assert login.respond(b"Password:") == b"tanstaaf"
    with pytest.raises(SASLError):
        login.respond(b"Again:")
    blank = Login("tim", Secret("tanstaaf"))
    assert [blank.respond(b""), blank.respond(b"")] == [b"tim", b"tanstaaf"]


def test_make_mechanism_names() -> None:
    for choice, name in SASL_NAMES.items():
        assert make_mechanism(choice, "u", Secret("p")).name == name
    with pytest.raises(ValueError):
        make_mechanism("user", "u", Secret("p"))


def test_mechanisms_do_not_show_their_secrets() -> None:
    for choice in SASL_NAMES:
        mechanism = make_mechanism(choice, "u", Secret("hunter2-secret"))
        assert "hunter2" not in repr(mechanism) and "hunter2" not in str(vars(mechanism))


# --- SCRAM: the server must prove itself ----------------------------------------------------------------------------

def _rfc7677() -> Scram:
    scram = Scram("SCRAM-SHA-256", "user", Secret("pencil"), nonce="rOprNGfwEbeRWgbNEkqO")
    scram.initial_response()
    scram.respond(b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
    return scram


def test_wrong_server_signature_is_an_error() -> None:
    scram = _rfc7677()
    forged = base64.b64encode(b"\0" * 32)
    with pytest.raises(SASLError, match="signature is wrong"):
        scram.respond(b"v=" + forged)
    with pytest.raises(SASLError):
        scram.complete()


def test_missing_server_final_is_an_error() -> None:
    with pytest.raises(SASLError, match="without proving"):
        _rfc7677().complete()


def test_server_error_attribute() -> None:
    with pytest.raises(SASLError, match="invalid-proof"):
        _rfc7677().respond(b"e=invalid-proof")


@pytest.mark.parametrize("server_first, message", [
    (b"r=otherNonce123,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", "nonce"),
    (b"r=rOprNGfwEbeRWgbNEkqO,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", "nonce"),  # not extended
    (b"r=rOprNGfwEbeRWgbNEkqOxyz,s=***,i=4096", "base64"),
    (b"r=rOprNGfwEbeRWgbNEkqOxyz,s=W22Z aJ0SNY7soEsUEjb6gQ==,i=4096", "base64"),
    (b"r=rOprNGfwEbeRWgbNEkqOxyz,s=,i=4096", "salt"),
    (b"r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=1", "iteration"),
    (b"r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=99999999999", "iteration"),
    (b"r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=x", "number"),
    (b"m=ext,r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", "extension"),
    (b"s=W22ZaJ0SNY7soEsUEjb6gQ==,r=rOprNGfwEbeRWgbNEkqOxyz,i=4096", "order"),
    (b"garbage", "malformed"),
    (b"r=\xff\xfe", "UTF-8"),
])
def test_malformed_server_first(server_first: bytes, message: str) -> None:
    scram = Scram("SCRAM-SHA-256", "user", Secret("pencil"), nonce="rOprNGfwEbeRWgbNEkqO")
    scram.initial_response()
    with pytest.raises(SASLError, match=message):
        scram.respond(server_first)


def test_scram_escapes_username_and_authzid() -> None:
    scram = Scram("SCRAM-SHA-1", "a,b=c", Secret("p"), authzid="x=y,z", nonce="abc")
    assert scram.initial_response() == b"n,a=x=3Dy=2Cz,n=a=2Cb=3Dc,r=abc"


# --- a SCRAM server written independently of the client, for round trips ---------------------------------------------

def _server_round_trip(hash_name: str, username: str, password: str, salt: bytes, *,
                       server_password: str | None = None) -> tuple[Scram, bytes, bool]:
    """Run the client against a minimal server: the client, the server's final message, whether the proof held."""
    digest = {"SCRAM-SHA-1": "sha1", "SCRAM-SHA-256": "sha256"}[hash_name]
    client = Scram(hash_name, username, Secret(password))
    first = client.initial_response().decode()
    gs2, _, bare = first.partition(",,")
    assert gs2 == "n"
    attributes = dict(part.split("=", 1) for part in bare.split(","))
    assert unescape_saslname(attributes["n"]) == _prepared(username)
    nonce = attributes["r"] + "SERVERnonce"
    server_first = f"r={nonce},s={base64.b64encode(salt).decode()},i=4096"
    final = client.respond(server_first.encode()).decode()
    without_proof, _, proof = final.rpartition(",p=")
    assert without_proof == f"c=biws,r={nonce}"
    auth_message = f"{bare},{server_first},{without_proof}".encode()
    secret = _prepared(server_password if server_password is not None else password).encode()
    salted = hashlib.pbkdf2_hmac(digest, secret, salt, 4096)
    stored_key = hashlib.new(digest, hmac.new(salted, b"Client Key", digest).digest()).digest()
    client_signature = hmac.new(stored_key, auth_message, digest).digest()
    claimed_key = bytes(a ^ b for a, b in zip(base64.b64decode(proof), client_signature, strict=True))
    proof_ok = hashlib.new(digest, claimed_key).digest() == stored_key
    signature = hmac.new(hmac.new(salted, b"Server Key", digest).digest(), auth_message, digest).digest()
    return client, b"v=" + base64.b64encode(signature), proof_ok


usernames = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), min_size=1,
                    max_size=20)


@settings(max_examples=40, deadline=None)
@given(username=usernames | st.sampled_from(["a,b", "=", "==2C", "x=3D", ",,", "us=er,name"]),
       password=st.text(min_size=1, max_size=20), salt=st.binary(min_size=1, max_size=32),
       hash_name=st.sampled_from(["SCRAM-SHA-1", "SCRAM-SHA-256"]))
def test_scram_round_trip(username: str, password: str, salt: bytes, hash_name: str) -> None:
    client, server_final, proof_ok = _server_round_trip(hash_name, username, password, salt)
    assert proof_ok
    assert client.respond(server_final) == b""
    client.complete()


@settings(max_examples=10, deadline=None)
@given(password=st.text(min_size=1, max_size=10))
def test_scram_server_with_another_password_fails_verification(password: str) -> None:
    client, server_final, proof_ok = _server_round_trip("SCRAM-SHA-256", "u", password, b"salt",
                                                        server_password=password + "x")
    assert not proof_ok
    with pytest.raises(SASLError):
        client.respond(server_final)


# --- escaping, attributes, base64 -----------------------------------------------------------------------------------

@given(st.text())
def test_saslname_escaping_round_trips(name: str) -> None:
    escaped = escape_saslname(name)
    assert "," not in escaped
    assert unescape_saslname(escaped) == name
    index = escaped.find("=")
    while index != -1:
        assert escaped[index:index + 3] in ("=2C", "=3D")
        index = escaped.find("=", index + 1)


@pytest.mark.parametrize("bad", ["a,b", "a=", "a=2", "a=41", "=3d"])
def test_unescape_rejects_malformed(bad: str) -> None:
    with pytest.raises(ValueError):
        unescape_saslname(bad)


attribute_values = st.text(alphabet=st.characters(blacklist_characters=",", blacklist_categories=("Cs",)))


@given(st.lists(st.tuples(st.sampled_from("abcdefghijklmnopqrstuvwxyzABCZ"), attribute_values), min_size=1))
def test_attribute_parsing_round_trips(attributes: list[tuple[str, str]]) -> None:
    message = ",".join(f"{key}={value}" for key, value in attributes).encode()
    assert parse_attributes(message, "test") == attributes


@given(st.binary())
def test_base64_round_trips(data: bytes) -> None:
    assert strict_b64decode(base64.b64encode(data).decode(), "test") == data


@given(st.text(alphabet="ABCDabcd0123+/=*- \n", min_size=1))
def test_base64_is_strict(text: str) -> None:
    try:
        decoded = strict_b64decode(text, "test")
    except SASLError:
        return
    assert base64.b64encode(decoded).decode() == text


# --- SASLprep (RFC 4013 section 3 examples) -------------------------------------------------------------------------

@pytest.mark.parametrize("given_text, expected", [
    ("I\u00adX", "IX"), ("user", "user"), ("USER", "USER"), ("\u00aa", "a"), ("\u2168", "IX"),
    ("a\u00a0b", "a b"),
])
def test_saslprep_examples(given_text: str, expected: str) -> None:
    assert saslprep(given_text) == expected


@pytest.mark.parametrize("bad", ["\u0007", "\u0627\u0031", "a\ufffeb"])
def test_saslprep_prohibits(bad: str) -> None:
    with pytest.raises(ValueError):
        saslprep(bad)


def test_prepared_falls_back_to_the_raw_string() -> None:
    assert _prepared("\u0007bell") == "\u0007bell"


# --- choose_mechanism -----------------------------------------------------------------------------------------------

ALL_SASL = ["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256", "XOAUTH2", "OAUTHBEARER"]


@pytest.mark.parametrize("offered, encrypted, expected", [
    (ALL_SASL, True, "scram-sha-256"),
    (ALL_SASL, False, "scram-sha-256"),
    (["PLAIN", "SCRAM-SHA-1"], False, "scram-sha-1"),
    (["PLAIN", "LOGIN", "CRAM-MD5"], False, "cram-md5"),
    (["PLAIN", "LOGIN"], True, "plain"),
    (["LOGIN"], True, "login"),
    ([], True, "user"),
])
def test_auto_with_a_password(offered: list[str], encrypted: bool, expected: str) -> None:
    assert choose_mechanism("auto", offered, encrypted, True, False) == expected


def test_auto_refuses_cleartext_on_an_unencrypted_connection() -> None:
    for offered in (["PLAIN", "LOGIN"], [], ["XOAUTH2"]):
        with pytest.raises(MechanismChoiceError, match="tls: implicit or tls: starttls"):
            choose_mechanism("auto", offered, False, True, offered == ["XOAUTH2"])


def test_auto_allows_cleartext_with_explicit_tls_none() -> None:
    assert choose_mechanism("auto", ["PLAIN"], False, True, False, explicit_cleartext_ok=True) == "plain"
    assert choose_mechanism("auto", [], False, True, False, explicit_cleartext_ok=True) == "user"
    assert choose_mechanism("auto", ["XOAUTH2"], False, False, True, explicit_cleartext_ok=True) == "xoauth2"


def test_auto_never_picks_apop() -> None:
    with pytest.raises(MechanismChoiceError):
        choose_mechanism("auto", [], True, True, False, offers_user=False)


def test_auto_with_a_token() -> None:
    assert choose_mechanism("auto", ALL_SASL, True, False, True) == "oauthbearer"
    assert choose_mechanism("auto", ["PLAIN", "XOAUTH2"], True, False, True) == "xoauth2"
    assert choose_mechanism("auto", [], True, False, True) == "xoauth2"
    with pytest.raises(MechanismChoiceError, match="does not offer OAUTHBEARER or XOAUTH2"):
        choose_mechanism("auto", ["PLAIN"], True, False, True)


def test_auto_without_credentials() -> None:
    with pytest.raises(MechanismChoiceError, match="no credentials"):
        choose_mechanism("auto", ALL_SASL, True, False, False)


def test_explicit_choices() -> None:
    assert choose_mechanism("cram-md5", ALL_SASL, False, True, False) == "cram-md5"
    assert choose_mechanism("apop", [], False, True, False) == "apop"
    assert choose_mechanism("plain", [], True, True, False) == "plain"  # no CAPA SASL list: just try
    with pytest.raises(MechanismChoiceError, match="does not offer SCRAM-SHA-256.*it offers PLAIN"):
        choose_mechanism("scram-sha-256", ["PLAIN"], True, True, False)
    with pytest.raises(MechanismChoiceError, match="needs a password"):
        choose_mechanism("plain", ALL_SASL, True, False, True)
    with pytest.raises(MechanismChoiceError, match="needs an OAuth2 access token"):
        choose_mechanism("xoauth2", ALL_SASL, True, True, False)
    with pytest.raises(MechanismChoiceError, match="send the password unencrypted"):
        choose_mechanism("user", [], False, True, False)
    with pytest.raises(MechanismChoiceError, match="send the access token unencrypted"):
        choose_mechanism("oauthbearer", ALL_SASL, False, False, True)
    with pytest.raises(MechanismChoiceError, match="unknown"):
        choose_mechanism("kerberos", ALL_SASL, True, True, False)


@given(setting=st.sampled_from(AUTH_CHOICES), offered=st.sets(st.sampled_from(ALL_SASL + ["APOP", "NTLM"])),
       encrypted=st.booleans(), has_password=st.booleans(), explicit=st.booleans(), offers_user=st.booleans())
def test_choice_is_always_safe(setting: str, offered: set[str], encrypted: bool, has_password: bool,
                               explicit: bool, offers_user: bool) -> None:
    try:
        choice = choose_mechanism(setting, offered, encrypted, has_password, not has_password,
                                  explicit_cleartext_ok=explicit, offers_user=offers_user)
    except MechanismChoiceError:
        return
    if not encrypted and not explicit:
        assert choice not in CLEARTEXT_MECHANISMS
    if setting == "auto":
        assert choice != "apop"
        assert choice == "user" or not offered or SASL_NAMES[choice] in offered
    else:
        assert choice == setting
