"""One-time join tokens for bootstrapping a workload's first SVID.

`ca token create` and `ca serve` are different processes, so tokens live in `<ca dir>/join-tokens.json` (0600),
guarded by an flock. Only the SHA-256 of a token is stored: reading the file does not reveal a usable token.
A token binds one SPIFFE ID, expires, and is burned by the first successful signing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mesh_gateway.errors import Unauthenticated
from mesh_gateway.identity.files import write_atomic
from mesh_gateway.model import SpiffeId

log = logging.getLogger("mesh_gateway.identity")

TOKEN_FILE = "join-tokens.json"  # noqa: S105 - a file name, not a secret
MAX_TOKEN_TTL_S = 7 * 86400
# Used and expired entries are kept a while so a replay is logged as "used"/"expired", not "unknown".
_KEEP_AFTER_S = 86400
REFUSED = "join token is unknown, expired or already used"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class TokenGrant:
    spiffe_id: SpiffeId
    digest: str
    expires_at: float


class JoinTokenStore:
    def __init__(self, directory: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = directory / TOKEN_FILE
        self._lock_path = directory / f".{TOKEN_FILE}.lock"
        self.clock = clock

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, dict[str, object]]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            entries = self._read()
            before = json.dumps(entries, sort_keys=True)
            yield entries
            if json.dumps(entries, sort_keys=True) != before:
                write_atomic(self.path, json.dumps(entries, indent=2, sort_keys=True).encode(), private=True)
        finally:
            os.close(fd)  # closing releases the flock

    def _read(self) -> dict[str, dict[str, object]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise OSError(f"{self.path}: unreadable token store: {exc}") from None
        if not isinstance(data, dict):
            raise OSError(f"{self.path}: unreadable token store: expected an object")
        return data

    def create(self, spiffe_id: SpiffeId, ttl_s: float) -> str:
        """A new token for `spiffe_id`, valid `ttl_s` seconds. The plain token is returned once, never stored."""
        if not 0 < ttl_s <= MAX_TOKEN_TTL_S:
            raise ValueError(f"token TTL must be between 0 and {MAX_TOKEN_TTL_S // 86400} days")
        token = secrets.token_urlsafe(32)
        now = self.clock()
        with self._locked() as entries:
            self._expire(entries, now)
            entries[_digest(token)] = {"spiffe_id": str(spiffe_id), "expires_at": now + ttl_s, "used_at": None}
        return token

    def _expire(self, entries: dict[str, dict[str, object]], now: float) -> None:
        for digest in [d for d, e in entries.items() if float(str(e.get("expires_at", 0))) + _KEEP_AFTER_S < now]:
            del entries[digest]

    def _lookup(self, entries: dict[str, dict[str, object]], token: str, now: float) -> TokenGrant:
        wanted = _digest(token)
        # compare_digest over every entry: lookup time does not depend on how much of a digest matched.
        found = None
        for digest, entry in entries.items():
            if hmac.compare_digest(digest, wanted):
                found = (digest, entry)
        if found is None:
            log.warning("join token refused: unknown", extra={"event": "join_token_refused", "reason": "unknown"})
            raise Unauthenticated("unknown join token", public_message=REFUSED)
        digest, entry = found
        expires_at = float(str(entry["expires_at"]))
        reason = "already used" if entry.get("used_at") is not None else "expired" if now >= expires_at else ""
        if reason:
            log.warning("join token refused: %s", reason, extra={"event": "join_token_refused", "reason": reason,
                                                                   "spiffe_id": entry.get("spiffe_id")})
            raise Unauthenticated(f"join token {reason}", public_message=REFUSED)
        return TokenGrant(SpiffeId.parse(str(entry["spiffe_id"])), digest, expires_at)

    def check(self, token: str) -> TokenGrant:
        """The grant a valid token carries; Unauthenticated otherwise. Does not burn the token."""
        with self._locked() as entries:
            return self._lookup(entries, token, self.clock())

    def consume(self, token: str) -> TokenGrant:
        """Burn the token (atomically: of two racing callers exactly one wins)."""
        now = self.clock()
        with self._locked() as entries:
            grant = self._lookup(entries, token, now)
            entries[grant.digest]["used_at"] = now
            return grant
