"""Micro-benchmark: CPU µs per authorization decision (MeteredAuthorizer.check → PolicyAuthorizer.check).

    python bench/micro/authz.py [--iterations 20000] [--repeats 5] [--cases bench-allow,shipped-deny,...]

The authorizer is built the way app.py builds it: a parsed GatewayConfig with an `authz:` section →
`authz.build.build` (embedded regorus engine, decision log, per-route caches) → `MeteredAuthorizer` with the
Prometheus metrics on. Each check gets a realistic RequestInfo as the HTTP edge makes it (TLS client with a
SPIFFE peer certificate issued by our CA, 8 headers, a query string) and a fresh Exchange, and is awaited on
uvloop. Policies: `bench` is the policy bench/run.py generates (bench/setups.py ALLOW_POLICY, query
data.mesh.authz.allow); `shipped` is the repo's policies/ set (data.envoy.authz.allow, grants by SPIFFE ID).
Each is run for an allowed and a denied request, with the decision log off and on (a file sink, /dev/null).
`--no-client-cert` drops the peer certificate, as for bench/run.py's wrk clients (the shipped policy then denies).
Printed: CPU µs per decision (`time.process_time()`), best of `--repeats` runs of `--iterations`, after a warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import uvloop  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives.serialization import Encoding  # noqa: E402
from setups import ALLOW_POLICY  # noqa: E402

from mesh_gateway import config as cfg  # noqa: E402
from mesh_gateway.authz import build as authz_build  # noqa: E402
from mesh_gateway.discovery.static import routes_from_config  # noqa: E402
from mesh_gateway.identity.ca import init_ca  # noqa: E402
from mesh_gateway.model import PeerCert, RequestInfo, Route, SpiffeId  # noqa: E402
from mesh_gateway.pipeline import Authorizer, Exchange  # noqa: E402
from mesh_gateway.telemetry.metrics import MeteredAuthorizer, Metrics  # noqa: E402

TRUST_DOMAIN = "mesh.local"
GATEWAY_ID = f"spiffe://{TRUST_DOMAIN}/ns/mesh/sa/gateway"
CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/client"
POLICIES = {"bench": ("data.mesh.authz.allow", None), "shipped": ("data.envoy.authz.allow", REPO / "policies")}
# (policy, allowed) → method; the bench policy allows GETs, the shipped one lets the client GET but not DELETE /api.
METHODS = {("bench", True): "GET", ("bench", False): "POST", ("shipped", True): "GET", ("shipped", False): "DELETE"}
CASES = tuple(f"{policy}-{verdict}-log-{log}" for policy in POLICIES for verdict in ("allow", "deny")
              for log in ("off", "on"))


@dataclass(frozen=True)
class Case:
    name: str
    policy: str
    allowed: bool
    decision_log: bool

    @classmethod
    def parse(cls, name: str) -> Case:
        policy, verdict, _, log = name.split("-")
        return cls(name, policy, verdict == "allow", log == "on")


def gateway_config(root: Path, case: Case) -> cfg.GatewayConfig:
    query, shipped = POLICIES[case.policy]
    policies = root / f"policies-{case.policy}"
    if not policies.exists():
        if shipped is not None:
            shutil.copytree(shipped, policies)
        else:
            policies.mkdir()
            (policies / "allow.rego").write_text(ALLOW_POLICY)
    return cfg.parse({
        "trust_domain": TRUST_DOMAIN,
        "listeners": [{"name": "edge", "address": "127.0.0.1:8443", "tls": {"client_auth": "optional"}}],
        "identity": {"ca_dir": str(root / "ca"), "spiffe_id": GATEWAY_ID},
        "catalog": {"static": {"echo": [{"address": "127.0.0.1", "port": 9443, "spiffe_id": GATEWAY_ID}]}},
        "routes": [{"name": "all", "match": {"path_prefix": "/"}, "service": "echo"}],
        "authz": {"engine": "embedded", "policies": str(policies), "query": query,
                  "decision_log": {"sink": "/dev/null" if case.decision_log else "off"}},
    })


def request_info(method: str, peer: PeerCert | None) -> RequestInfo:
    """What the HTTP edge builds for `GET /api/orders/42?limit=10&sort=desc` from a curl-like client."""
    headers = (
        ("host", "gw.mesh.local:8443"),
        ("user-agent", "curl/8.5.0"),
        ("accept", "application/json"),
        ("accept-encoding", "gzip, deflate"),
        ("x-request-id", "4bf92f3577b34da6a3ce929d0e0e4736"),
        ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ("authorization", "Bearer eyJhbGciOiJFUzI1NiJ9.e30.c2lnbmF0dXJl"),
        ("cookie", "session=abc123"),
    )
    return RequestInfo(method=method, path="/api/orders/42", query="limit=10&sort=desc", host="gw.mesh.local:8443",
                       scheme="https", headers=headers, client_address="127.0.0.1", client_port=51234,
                       request_id="4bf92f3577b34da6a3ce929d0e0e4736", listener="edge", local_address="127.0.0.1",
                       local_port=8443, peer=peer, sni="gw.mesh.local")


async def measure(authorizer: Authorizer, route: Route, info: RequestInfo, expect: bool, iterations: int,
                  repeats: int) -> float:
    for _ in range(max(1000, iterations // 10)):  # warm-up
        await authorizer.check(info, route, Exchange(info))
    decision = await authorizer.check(info, route, Exchange(info))
    if decision.allowed is not expect:
        raise SystemExit(f"expected allowed={expect}, got {decision}")
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        for _ in range(iterations):
            await authorizer.check(info, route, Exchange(info))
        best = min(best, (time.process_time() - started) / iterations * 1e6)
    return best


async def run(cases: list[Case], iterations: int, repeats: int, client_cert: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="authz-bench-") as tmp:
        root = Path(tmp)
        ca = init_ca(root / "ca", TRUST_DOMAIN)
        client = ca.issue_credentials(SpiffeId.parse(CLIENT_ID), 3600)
        # The DER the edge gets from ssl_object.getpeercert(binary_form=True).
        der = x509.load_pem_x509_certificate(client.cert_chain_pem).public_bytes(Encoding.DER)
        peer = PeerCert(SpiffeId.parse(CLIENT_ID), der) if client_cert else None
        gateway_id = SpiffeId.parse(GATEWAY_ID)
        print(f"{'case':<28} {'CPU µs/decision':>16}")
        for case in cases:
            config = gateway_config(root, case)
            built = authz_build.build(config, lambda: gateway_id)
            assert built is not None
            authorizer: Any = MeteredAuthorizer(built.authorizer, Metrics())
            route = routes_from_config(config).routes[0]
            info = request_info(METHODS[(case.policy, case.allowed)], peer)
            flusher = asyncio.create_task(built.authorizer.decision_log.run())
            try:
                # The shipped policy grants by SPIFFE ID: an anonymous client is denied.
                expect = case.allowed and (peer is not None or case.policy == "bench")
                micros = await measure(authorizer, route, info, expect, iterations, repeats)
            finally:
                flusher.cancel()
                await asyncio.gather(flusher, return_exceptions=True)
                await built.authorizer.close()
            print(f"{case.name:<28} {micros:>16.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from: {', '.join(CASES)}")
    parser.add_argument("--no-client-cert", action="store_true", help="an anonymous TLS client (no SPIFFE peer)")
    args = parser.parse_args()
    cases = [Case.parse(name) for name in args.cases.split(",")]
    unknown = [c.name for c in cases if c.name not in CASES]
    if unknown:
        parser.error(f"unknown case(s): {', '.join(unknown)}")
    uvloop.run(run(cases, args.iterations, args.repeats, not args.no_client_cert))


if __name__ == "__main__":
    main()
