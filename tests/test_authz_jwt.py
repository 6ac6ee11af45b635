"""io.jwt.* built-ins registered on regorus, checked against OPA's documented examples and OPA's semantics."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import warnings

import pytest
import regorus
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from joserfc import jwt as jose_jwt
from joserfc.errors import SecurityWarning
from joserfc.jwk import ECKey, RSAKey

from mesh_gateway.authz import jwt

# From OPA's policy reference, "Token Verification Examples".
ES256_TOKEN = ("eyJ0eXAiOiAiSldUIiwgImFsZyI6ICJFUzI1NiJ9.eyJuYmYiOiAxNDQ0NDc4NDAwLCAiaXNzIjogInh4eCJ9.lArczfN-pIL8oUU-"
               "7PU83u-zfXougXBZj6drFeKFsPEoVhy9WAyiZlRshYqjTSXdaw8yw2L-ovt4zTUZb2PWMg")
JWKS = json.dumps({"keys": [{"kty": "EC", "crv": "P-256", "x": "z8J91ghFy5o6f2xZ4g8LsLH7u2wEpT2ntj8loahnlsE",
                             "y": "7bdeXLH61KrGWRdh7ilnbcGQACxykaPKfmBccTHIOUo"}]})
CERT = """-----BEGIN CERTIFICATE-----
MIIBcDCCARagAwIBAgIJAMZmuGSIfvgzMAoGCCqGSM49BAMCMBMxETAPBgNVBAMM
CHdoYXRldmVyMB4XDTE4MDgxMDE0Mjg1NFoXDTE4MDkwOTE0Mjg1NFowEzERMA8G
A1UEAwwId2hhdGV2ZXIwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAATPwn3WCEXL
mjp/bFniDwuwsfu7bASlPae2PyWhqGeWwe23Xlyx+tSqxlkXYe4pZ23BkAAscpGj
yn5gXHExyDlKo1MwUTAdBgNVHQ4EFgQUElRjSoVgKjUqY5AXz2o74cLzzS8wHwYD
VR0jBBgwFoAUElRjSoVgKjUqY5AXz2o74cLzzS8wDwYDVR0TAQH/BAUwAwEB/zAK
BggqhkjOPQQDAgNIADBFAiEA4yQ/88ZrUX68c6kOe9G11u8NUaUzd8pLOtkKhniN
OHoCIHmNX37JOqTcTzGn2u9+c8NlnvZ0uDvsd1BmKPaUmjmm
-----END CERTIFICATE-----"""
HS256_ALICE = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJpc3MiOiJhbGljZSJ9."
               "OsFj3QHjXgAhTwL7FQ2xjvJwL8FTwnQ1d3x42SuImH8")
NOW_NS = 1_700_000_000 * 10**9


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def hs256_raw(header: str, payload: str, secret: bytes) -> str:
    """What OPA's io.jwt.encode_sign_raw produces for an HS256 JWK (the strings are used verbatim)."""
    signing_input = f"{b64(header.encode())}.{b64(payload.encode())}"
    return f"{signing_input}.{b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


def evaluate(expression: str) -> object:
    engine = regorus.Engine()
    jwt.register(engine, clock=lambda: NOW_NS)
    engine.add_policy("t.rego", f"package t\n\nes256_token := {json.dumps(ES256_TOKEN)}\njwks := {json.dumps(JWKS)}\n"
                                f"cert := {json.dumps(CERT)}\n\nx := {expression}\n")
    return engine.eval_rule("data.t.x")


def test_opa_example_verify_with_jwks_and_certificate():
    assert evaluate("io.jwt.verify_es256(es256_token, jwks)") is True
    assert evaluate("io.jwt.verify_es256(es256_token, cert)") is True
    assert evaluate("io.jwt.verify_rs256(es256_token, cert)") is False


def test_opa_example_decode_verify_one_step():
    expected = [True, {"alg": "ES256", "typ": "JWT"}, {"iss": "xxx", "nbf": 1444478400}]
    assert evaluate('io.jwt.decode_verify(es256_token, {"cert": jwks, "iss": "xxx"})') == expected
    assert evaluate('io.jwt.decode_verify(es256_token, {"cert": cert, "iss": "xxx"})') == expected
    assert evaluate('io.jwt.decode_verify(es256_token, {"cert": cert, "iss": "yyy"})') == [False, {}, {}]


def test_opa_example_decode():
    assert evaluate("io.jwt.decode(es256_token)") == [
        {"typ": "JWT", "alg": "ES256"}, {"nbf": 1444478400, "iss": "xxx"},
        "940adccdf37ea482fca1453eecf53cdeefb37d7a2e8170598fa76b15e285b0f128561cbd580ca266546c858aa34d25dd6b0f32c362fea2fb"
        "78cd35196f63d632"]
    assert evaluate(f'io.jwt.decode("{HS256_ALICE}")') == [
        {"alg": "HS256", "typ": "JWT"}, {"iss": "alice"},
        "3ac163dd01e35e00214f02fb150db18ef2702fc153c27435777c78d92b88987f"]


def test_opa_example_round_trip_hs256_with_plain_secret():
    token = hs256_raw('{"alg":"HS256","typ":"JWT"}', "{}", b"foo")
    assert evaluate(f'io.jwt.verify_hs256("{token}", "foo")') is True
    assert evaluate(f'io.jwt.decode_verify("{token}", {{"secret": "foo"}})') == [True, {"alg": "HS256", "typ": "JWT"},
                                                                                 {}]
    assert evaluate(f'io.jwt.verify_hs256("{token}", "bar")') is False


def test_malformed_tokens_never_raise():
    assert evaluate('io.jwt.decode("abc")') is None
    assert evaluate('[p | [_, p, _] := io.jwt.decode("a.b.c")]') == []
    assert evaluate('io.jwt.verify_es256("abc", jwks)') is False
    assert evaluate('io.jwt.decode_verify("abc", {"cert": jwks})') == [False, {}, {}]
    assert evaluate('io.jwt.verify_es256(es256_token, "not a key")') is False


@pytest.fixture(scope="module")
def ec_key() -> ECKey:
    return ECKey.generate_key("P-256", parameters={"kid": "k1"})


def sign(key: object, claims: dict[str, object], alg: str, **header: object) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SecurityWarning)
        return jose_jwt.encode({"alg": alg, **header}, claims, key, algorithms=[alg])  # type: ignore[arg-type]


def pem(key: ECKey | RSAKey) -> str:
    return key.as_pem(private=False).decode()


@pytest.mark.parametrize(("claims", "constraints", "valid"), [
    ({"iss": "idp"}, {"iss": "idp"}, True),
    ({"iss": "idp"}, {"iss": "other"}, False),
    ({}, {"iss": "idp"}, False),
    ({"aud": "gw"}, {"aud": "gw"}, True),
    ({"aud": ["x", "gw"]}, {"aud": "gw"}, True),
    ({"aud": "gw"}, {}, False),
    ({}, {"aud": "gw"}, False),
    ({"exp": 1_700_000_001}, {}, True),
    ({"exp": 1_700_000_000}, {}, False),
    ({"exp": 1_600_000_000}, {"time": 1_500_000_000 * 10**9}, True),
    ({"nbf": 1_700_000_100}, {}, False),
    ({"nbf": 1_699_999_000}, {}, True),
    ({"exp": "tomorrow"}, {}, False),
    ({}, {"alg": "ES256"}, True),
    ({}, {"alg": "RS256"}, False),
    ({}, {"bogus": 1}, False),
    ({}, {"secret": "s"}, False),
    ({}, {"time": -1}, False),
])
def test_decode_verify_constraints(ec_key, claims, constraints, valid):
    token = sign(ec_key, claims, "ES256")
    result = jwt.decode_verify(token, {"cert": pem(ec_key), **constraints}, clock=lambda: NOW_NS)
    assert result[0] is valid
    assert result[2] == (claims if valid else {})


def test_decode_verify_needs_exactly_one_key():
    token = hs256_raw('{"alg":"HS256"}', "{}", b"s")
    assert jwt.decode_verify(token, {})[0] is False
    assert jwt.decode_verify(token, {"secret": "s"})[0] is True
    assert jwt.decode_verify(token, {"secret": ""})[0] is False


@pytest.mark.parametrize("alg", ["RS256", "PS256", "RS512", "PS384"])
def test_rsa_families(alg):
    key = RSAKey.generate_key(2048)
    token = sign(key, {"sub": "x"}, alg)
    assert jwt.verify(token, pem(key), alg) is True
    assert jwt.decode_verify(token, {"cert": pem(key)})[0] is True
    other = RSAKey.generate_key(2048)
    assert jwt.verify(token, pem(other), alg) is False


def test_jwks_kid_selects_the_key(ec_key):
    other = ECKey.generate_key("P-256", parameters={"kid": "k2"})
    keys = json.dumps({"keys": [other.as_dict(private=False), ec_key.as_dict(private=False)]})
    assert jwt.verify(sign(ec_key, {}, "ES256", kid="k1"), keys, "ES256") is True
    # OPA: a kid that matches decides alone, even if another key in the set would verify.
    assert jwt.verify(sign(ec_key, {}, "ES256", kid="k2"), keys, "ES256") is False
    assert jwt.verify(sign(ec_key, {}, "ES256"), keys, "ES256") is True


def test_algorithm_confusion_is_rejected():
    """An HS256 token 'signed' with the RSA public key PEM as secret must not verify against that key."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = private.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
    forged = hs256_raw('{"alg":"HS256"}', '{"sub":"admin"}', public_pem.encode())
    assert jwt.decode_verify(forged, {"cert": public_pem})[0] is False
    assert jwt.verify(forged, public_pem, "RS256") is False


def test_tampered_payload_fails(ec_key):
    header, _, signature = sign(ec_key, {"role": "viewer"}, "ES256").split(".")
    forged = f"{header}.{b64(json.dumps({'role': 'admin'}).encode())}.{signature}"
    assert jwt.verify(forged, pem(ec_key), "ES256") is False
    assert jwt.decode_verify(forged, {"cert": pem(ec_key)}) == [False, {}, {}]


def test_nested_token_is_unwrapped(ec_key):
    inner = sign(ec_key, {"sub": "inner"}, "ES256")
    # The payload of the outer (HS256) token is the inner token itself.
    head = b64(json.dumps({"alg": "HS256", "cty": "JWT"}).encode())
    signing_input = f"{head}.{b64(inner.encode())}"
    nested = f"{signing_input}.{b64(hmac.new(b'0123456789abcdef', signing_input.encode(), hashlib.sha256).digest())}"
    assert jwt.decode(nested)[1] == {"sub": "inner"}  # type: ignore[index]
    # decode_verify checks each layer with the same constraints; the outer HS256 layer fails a cert.
    assert jwt.decode_verify(nested, {"cert": pem(ec_key)})[0] is False
