"""parse_decision(value) -> Decision, strictly, with OPA-Envoy's rules. Pure.

Accepted forms: a boolean, or an object whose `allowed` is a boolean, with optional `headers`,
`response_headers_to_add`, `request_headers_to_remove`, `http_status` and `body`. Anything else (undefined,
null, `"yes"`, a number, a missing `allowed`, a malformed header) is an error: the caller fails closed.
"""

from __future__ import annotations

import re
from typing import Any

from mesh_gateway.model import Decision, Headers

# RFC 9110 token for names; values must not carry CR, LF or NUL (header injection).
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_BAD_VALUE = re.compile(r"[\r\n\x00]")
_MAX_HEADERS = 64
_MAX_BODY_CHARS = 64 * 1024


class DecisionError(ValueError):
    """The policy's answer is not a decision; the request is refused as if the engine had failed."""


def _header_list(value: Any, key: str) -> Headers:
    """`{"name": "v"}` or `{"name": ["v1", "v2"]}` (OPA-Envoy allows both) → ordered (name, value) pairs."""
    if not isinstance(value, dict):
        raise DecisionError(f"{key} must be an object of header names to strings")
    pairs: list[tuple[str, str]] = []
    for name, raw in value.items():
        if not isinstance(name, str) or not _TOKEN.match(name):
            raise DecisionError(f"{key}: invalid header name {name!r}")
        values = raw if isinstance(raw, list) else [raw]
        for item in values:
            if not isinstance(item, str) or _BAD_VALUE.search(item):
                raise DecisionError(f"{key}[{name}]: header value must be a string without CR/LF")
            pairs.append((name.lower(), item))
    if len(pairs) > _MAX_HEADERS:
        raise DecisionError(f"{key}: more than {_MAX_HEADERS} headers")
    return tuple(pairs)


def parse_decision(value: Any, *, decision_id: str = "", policy_revision: str = "", engine: str = "") -> Decision:
    """The Decision for the policy's answer `value`, stamped with the given id, revision and engine."""
    if isinstance(value, bool):
        return Decision(allowed=value, decision_id=decision_id, policy_revision=policy_revision, engine=engine)
    if not isinstance(value, dict):
        raise DecisionError(f"decision must be a boolean or an object, got {type(value).__name__}")
    allowed = value.get("allowed")
    if not isinstance(allowed, bool):
        raise DecisionError("decision object needs a boolean 'allowed'")
    status = value.get("http_status")
    if status is not None:
        if isinstance(status, bool) or not isinstance(status, int | float) or status != int(status):
            raise DecisionError("http_status must be an integer")
        status = int(status)
        if not 200 <= status <= 599:
            raise DecisionError("http_status must be between 200 and 599")
    body = value.get("body")
    if body is not None and not isinstance(body, str):
        raise DecisionError("body must be a string")
    if body is not None and len(body) > _MAX_BODY_CHARS:
        raise DecisionError("body is too long")
    remove = value.get("request_headers_to_remove", [])
    if not isinstance(remove, list) or not all(isinstance(n, str) and _TOKEN.match(n) for n in remove):
        raise DecisionError("request_headers_to_remove must be a list of header names")
    return Decision(
        allowed=allowed,
        http_status=status,
        body=body,
        headers=_header_list(value.get("headers", {}), "headers"),
        response_headers_to_add=_header_list(value.get("response_headers_to_add", {}), "response_headers_to_add"),
        request_headers_to_remove=tuple(n.lower() for n in remove),
        decision_id=decision_id,
        policy_revision=policy_revision,
        engine=engine,
    )

