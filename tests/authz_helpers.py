"""Shared by the authz tests: a copy of the shipped policies keyed to a fresh JWT signing key, request builders."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from joserfc import jwt as jose_jwt
from joserfc.jwk import ECKey

from mesh_gateway.model import PeerCert, RequestInfo, SpiffeId
from mesh_gateway.pipeline import NoSpan

SHIPPED = Path(__file__).resolve().parent.parent / "policies"
CLIENT_ID = "spiffe://mesh.local/ns/default/sa/client"
CONSOLE_ID = "spiffe://mesh.local/ns/ops/sa/console"
ISSUER, AUDIENCE = "https://idp.mesh.local", "mesh-gateway"


@dataclass
class Policies:
    path: Path
    key: ECKey

    def token(self, roles: list[str], *, expires_in_s: float = 3600, issuer: str = ISSUER) -> str:
        claims = {"iss": issuer, "aud": AUDIENCE, "sub": "alice", "roles": roles,
                  "exp": int(time.time() + expires_in_s)}
        return jose_jwt.encode({"alg": "ES256", "kid": "mesh-demo-1"}, claims, self.key)


def shipped_policies(tmp_path: Path) -> Policies:
    """The shipped policy set, with data.mesh.jwt trusting a key the test holds."""
    target = tmp_path / "policies"
    shutil.copytree(SHIPPED, target)
    key = ECKey.generate_key("P-256", parameters={"kid": "mesh-demo-1"})
    data = json.loads((target / "data.json").read_text())
    public = key.as_dict(private=False)
    data["mesh"]["jwt"]["jwks"] = {"keys": [{**public, "alg": "ES256", "use": "sig"}]}
    (target / "data.json").write_text(json.dumps(data))
    return Policies(target, key)


def request_info(path: str = "/api/orders", *, method: str = "GET", query: str = "",
                 principal: str | None = CLIENT_ID, headers: tuple[tuple[str, str], ...] = ()) -> RequestInfo:
    peer = PeerCert(SpiffeId.parse(principal), None) if principal else None
    return RequestInfo(method=method, path=path, query=query, host="gw.mesh.local", scheme="https",
                       headers=headers, client_address="127.0.0.1", client_port=50000, request_id="rid",
                       peer=peer)


class FixedSpan(NoSpan):
    """A span with known ids, standing in for the ingress span the tracer would start."""

    def __init__(self, trace_id: str, span_id: str) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
