"""Request-path normalisation: one unambiguous path for routing, policy and the upstream. Pure.

A policy that allows `/api` and protects `/admin` must not be fooled by another spelling of `/admin`
(`/api/%2e%2e/admin`, `//admin`, `/admin;x=1`). The edge normalises every request path once, before routing, and
that normalised path is what routes match, what policies see and what the upstream receives (as Envoy does with
`normalize_path` and `merge_slashes`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset("0123456789abcdefABCDEF")
# Encoded separators: a backend that decodes them before resolving dot segments would route
# `/public/..%2Fadmin` to /admin while the policy saw a single segment, so such paths never reach a policy.
_AMBIGUOUS_ESCAPES = frozenset({"2F", "5C"})
# Anything normalise_path would decode, strip, merge, resolve or refuse: an escape, a `;param`, a backslash or
# control character, an empty segment, a `.` or `..` segment. A path without any is already normal.
_NEEDS_WORK = re.compile(r"[%;\\\x00-\x1f\x7f]|//|/\.\.?(?:/|$)")


class UnsafePath(ValueError):
    """The request path cannot be given one unambiguous meaning; the request is refused (400)."""


@dataclass(frozen=True, slots=True)
class NormalisedPath:
    path: str
    """Normalised, still percent-encoded for reserved characters; begins with '/'."""
    segments: tuple[str, ...]
    """Fully percent-decoded segments of `path`, without `;params` (what `input.parsed_path` holds)."""


def _decode_unreserved(path: str) -> str:
    """RFC 3986 §6.2.2.2: %XX of an unreserved character means that character; hex of other escapes upper-cased."""
    out: list[str] = []
    i = 0
    while i < len(path):
        char = path[i]
        if char == "%":
            escape = path[i + 1 : i + 3]
            if len(escape) != 2 or not set(escape) <= _HEX:
                raise UnsafePath(f"malformed percent-escape in path at offset {i}")
            escape = escape.upper()
            if escape in _AMBIGUOUS_ESCAPES:
                raise UnsafePath("encoded '/' or '\\' in path")
            decoded = chr(int(escape, 16))
            out.append(decoded if decoded in _UNRESERVED else "%" + escape)
            i += 3
            continue
        out.append(char)
        i += 1
    return "".join(out)


def normalise_path(raw: str) -> NormalisedPath:
    """The path a policy author means, whatever encoding tricks the client used.

    Steps, in order: reject `\\`, NUL, control characters and encoded `/` or `\\`; decode escapes of unreserved
    characters (`%2e` → `.`, `%41` → `A`); drop `;params` from every segment (servlet containers ignore them);
    merge repeated slashes; resolve `.` and `..` (never above the root). Case is preserved (paths are
    case-sensitive), so write allow-lists, not deny-lists. `raw` is the path without its query string.
    """
    if raw.startswith("/") and _NEEDS_WORK.search(raw) is None:
        # The common case, and every path the edge already normalised (the authorizer looks again): nothing to do.
        return NormalisedPath(raw, tuple(segment for segment in raw.split("/") if segment))
    return _normalise(raw)


def _normalise(raw: str) -> NormalisedPath:
    if not raw.startswith("/"):
        raise UnsafePath("path must start with '/'")
    if "\\" in raw or any(ord(c) < 0x20 or ord(c) == 0x7F for c in raw):
        raise UnsafePath("backslash or control character in path")
    decoded = _decode_unreserved(raw)
    stack: list[str] = []
    for segment in decoded.split("/"):
        segment = segment.split(";", 1)[0]
        if segment in ("", "."):
            continue
        if segment == "..":
            if stack:
                stack.pop()
            continue
        stack.append(segment)
    trailing = decoded.endswith("/") or decoded.rsplit("/", 1)[-1].split(";", 1)[0] in (".", "..")
    path = "/" + "/".join(stack) + ("/" if stack and trailing else "")
    segments = tuple(unquote(s) for s in stack)
    if any("\x00" in s for s in segments):
        raise UnsafePath("encoded NUL in path")
    return NormalisedPath(path, segments)


