"""OPA's `io.jwt.*` built-ins for regorus, which lacks them, implemented with joserfc and OPA's semantics.

Registered as engine extensions so OPA-Envoy JWT policies run unchanged:
- `io.jwt.decode(jwt)` → `[header, payload, signature_hex]` (nested `cty: JWT` tokens are unwrapped).
- `io.jwt.verify_{hs,rs,es,ps}{256,384,512}(jwt, key)` → boolean. `key` is the HMAC secret, or a PEM
  certificate, PEM public key, JWK or JWK set (as a JSON string).
- `io.jwt.decode_verify(jwt, constraints)` → `[valid, header, payload]`; constraints `cert`/`secret` (exactly one),
  `alg`, `iss`, `aud`, `time` (ns). Invalid in any way → `[false, {}, {}]`.

Where OPA raises a built-in error (a malformed token or key) OPA's default non-strict mode makes the expression
undefined. An extension cannot return "undefined", so: `decode` returns null (any destructuring of it fails, as in
OPA), `verify_*` return false and `decode_verify` returns `[false, {}, {}]`. None of them ever raises.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from joserfc import jws
from joserfc.jwk import ECKey, OctKey, RSAKey, import_key

ALGORITHMS = frozenset({f"{family}{bits}" for family in ("HS", "RS", "PS", "ES") for bits in (256, 384, 512)})
UNVERIFIED: list[Any] = [False, {}, {}]
Clock = Callable[[], int]
"""Wall-clock time in nanoseconds (OPA's `time.now_ns()`)."""


class _Invalid(Exception):
    """Internal: the token or key cannot be used; becomes false/undefined at the built-in boundary."""


@dataclass(frozen=True, slots=True)
class _Token:
    text: str
    header: dict[str, Any]
    payload_b64: str


@dataclass(frozen=True, slots=True)
class _Key:
    key: Any
    alg: str = ""
    kid: str = ""


def _b64decode(part: str) -> bytes:
    try:
        return base64.b64decode(part + "=" * (-len(part) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _Invalid(f"bad base64url: {exc}") from None


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise _Invalid(f"JWT {what} is not JSON") from None
    if not isinstance(value, dict):
        raise _Invalid(f"JWT {what} is not a JSON object")
    return value


def _split(token: Any) -> _Token:
    if not isinstance(token, str):
        raise _Invalid("JWT must be a string")
    parts = token.split(".")
    if len(parts) != 3:
        raise _Invalid(f"encoded JWT must have 3 sections, found {len(parts)}")
    return _Token(token, _json_object(_b64decode(parts[0]), "header"), parts[1])


def _import_public(public: Any) -> Any:
    if isinstance(public, ec.EllipticCurvePublicKey):
        return ECKey.import_key(public)
    if isinstance(public, rsa.RSAPublicKey):
        return RSAKey.import_key(public)
    raise _Invalid("unsupported public key type")


@lru_cache(maxsize=64)
def _keys(text: str) -> tuple[_Key, ...]:
    """A PEM certificate or public key, or a JWK / JWK set, as OPA's getKeysFromCertOrJWK reads them."""
    stripped = text.strip()
    try:
        if stripped.startswith("-----BEGIN CERTIFICATE-----"):
            return (_Key(_import_public(x509.load_pem_x509_certificate(stripped.encode()).public_key())),)
        if stripped.startswith("-----BEGIN PUBLIC KEY-----"):
            return (_Key(_import_public(load_pem_public_key(stripped.encode()))),)
        document = json.loads(stripped)
    except _Invalid:
        raise
    except ValueError as exc:
        raise _Invalid(f"cannot read key: {exc}") from None
    items = document.get("keys") if isinstance(document, dict) and "keys" in document else [document]
    if not isinstance(items, list):
        raise _Invalid("JWK set 'keys' must be a list")
    keys: list[_Key] = []
    for item in items:
        if not isinstance(item, dict):
            raise _Invalid("JWK must be an object")
        alg = item.get("alg", "")
        if alg and alg not in ALGORITHMS:
            continue  # OPA skips keys whose algorithm it does not support
        try:
            keys.append(_Key(import_key(item), str(alg), str(item.get("kid", ""))))
        except Exception as exc:  # joserfc reports bad key material with several exception types
            raise _Invalid(f"bad JWK: {exc}") from None
    return tuple(keys)


def _secret_key(secret: str) -> OctKey:
    raw = secret.encode()
    # Built directly: OctKey.import_key warns on secrets under 112 bits, which OPA accepts as given.
    return OctKey(raw, raw)


def _signature_ok(token: str, key: Any, alg: str) -> bool:
    try:
        jws.deserialize_compact(token, key, algorithms=[alg])
    except Exception:  # bad signature, wrong key type for alg, unknown crit header: all mean "not verified"
        return False
    return True


def _verify_with_keys(token: _Token, keys: tuple[_Key, ...], alg: str) -> bool:
    """OPA's order: a key whose kid matches the header's kid decides alone; otherwise any compatible key."""
    kid = token.header.get("kid")
    if isinstance(kid, str) and kid:
        for key in keys:
            if key.kid == kid:
                return _signature_ok(token.text, key.key, alg)
    return any(_signature_ok(token.text, key.key, alg) for key in keys if not key.alg or key.alg == alg)


def verify(token: Any, key: Any, alg: str) -> bool:
    """`io.jwt.verify_<alg>`: signature only, no claims."""
    try:
        parsed = _split(token)
        if not isinstance(key, str):
            return False
        if parsed.header.get("alg") != alg:
            return False
        if alg.startswith("HS"):
            return bool(key) and _signature_ok(parsed.text, _secret_key(key), alg)
        return _verify_with_keys(parsed, _keys(key), alg)
    except _Invalid:
        return False


def decode(token: Any) -> list[Any] | None:
    """`io.jwt.decode`: no verification at all."""
    try:
        parsed = _split(token)
        payload_raw = _b64decode(parsed.payload_b64)
        if parsed.header.get("cty") == "JWT":
            return decode(payload_raw.decode("utf-8", "replace").strip("\"'"))
        payload = _json_object(payload_raw, "payload")
        signature = _b64decode(token.split(".")[2])
    except _Invalid:
        return None
    return [parsed.header, payload, signature.hex()]


@dataclass(frozen=True, slots=True)
class _Constraints:
    keys: tuple[_Key, ...] | None
    secret: str
    alg: str
    iss: str
    aud: str
    time_ns: float


def _constraints(raw: Any, clock: Clock) -> _Constraints:
    if not isinstance(raw, dict):
        raise _Invalid("constraints must be an object")
    strings = {}
    for name in ("secret", "alg", "iss", "aud"):
        value = raw.get(name, "")
        if not isinstance(value, str):
            raise _Invalid(f"{name} constraint must be a string")
        strings[name] = value
    unknown = set(raw) - {"cert", "secret", "alg", "iss", "aud", "time"}
    if unknown:
        raise _Invalid(f"unknown token validation constraint: {sorted(unknown)[0]}")
    keys = None
    if "cert" in raw:
        if not isinstance(raw["cert"], str):
            raise _Invalid("cert constraint must be a string")
        keys = _keys(raw["cert"])
    when = raw.get("time", None)
    if when is None:
        when = clock()
    if isinstance(when, bool) or not isinstance(when, int | float) or when < 0:
        raise _Invalid("time constraint must be a non-negative number")
    if (keys is not None) == bool(strings["secret"]):
        raise _Invalid("exactly one of cert and secret is required")
    return _Constraints(keys, strings["secret"], strings["alg"], strings["iss"], strings["aud"], float(when))


def _audience_ok(aud: Any, wanted: str) -> bool:
    if isinstance(aud, str):
        return aud == wanted
    return isinstance(aud, list) and any(isinstance(a, str) and a == wanted for a in aud)


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Invalid(f"{name} value must be a number")
    return float(value)


def decode_verify(token: Any, raw_constraints: Any, clock: Clock = time.time_ns) -> list[Any]:
    """`io.jwt.decode_verify`, following OPA's builtinJWTDecodeVerify step by step."""
    try:
        constraints = _constraints(raw_constraints, clock)
        parsed = _split(token)
        while True:
            alg = parsed.header.get("alg")
            if not isinstance(alg, str) or alg not in ALGORITHMS:
                return UNVERIFIED
            if constraints.alg and constraints.alg != alg:
                return UNVERIFIED
            if constraints.keys is not None:
                ok = _verify_with_keys(parsed, constraints.keys, alg)
            else:
                ok = alg.startswith("HS") and _signature_ok(parsed.text, _secret_key(constraints.secret), alg)
            if not ok:
                return UNVERIFIED
            payload_raw = _b64decode(parsed.payload_b64)
            cty = parsed.header.get("cty")
            if isinstance(cty, str) and cty.upper() == "JWT":
                parsed = _split(payload_raw.decode("utf-8", "replace"))
                continue
            break
        payload = _json_object(payload_raw, "payload")
        if constraints.iss and payload.get("iss") != constraints.iss:
            return UNVERIFIED
        if "aud" in payload:
            if not _audience_ok(payload["aud"], constraints.aud):
                return UNVERIFIED
        elif constraints.aud:
            return UNVERIFIED
        now_s = constraints.time_ns / 1e9
        if "exp" in payload and now_s >= _number(payload["exp"], "exp"):
            return UNVERIFIED
        if "nbf" in payload and now_s < _number(payload["nbf"], "nbf"):
            return UNVERIFIED
    except _Invalid:
        return UNVERIFIED
    return [True, parsed.header, payload]


def _verifier(alg: str) -> Callable[[Any, Any], bool]:
    return lambda token, key: verify(token, key, alg)


def register(engine: Any, clock: Clock = time.time_ns) -> None:
    """Add the io.jwt.* built-ins to a regorus Engine (call on the engine's own thread)."""
    engine.add_extension("io.jwt.decode", 1, decode)
    engine.add_extension("io.jwt.decode_verify", 2, lambda token, c: decode_verify(token, c, clock))
    for alg in sorted(ALGORITHMS):
        engine.add_extension(f"io.jwt.verify_{alg.lower()}", 2, _verifier(alg))
