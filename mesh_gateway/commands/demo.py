"""`mesh-gateway demo`: bootstrap the CA and run a small mesh on loopback — the gateway, a demo mTLS upstream (`web`),
and two services behind sidecars (orders calls inventory through its sidecar; see mesh_gateway/demo/mesh.py)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509

from mesh_gateway import config as cfg
from mesh_gateway.identity.ca import CAError, cert_pem, init_ca, key_pem, load_ca, new_key
from mesh_gateway.identity.files import write_atomic
from mesh_gateway.model import SpiffeId

if TYPE_CHECKING:
    from mesh_gateway.app import Gateway
    from mesh_gateway.demo.mesh import DemoMesh
    from mesh_gateway.demo.upstream import RunningUpstream

TRUST_DOMAIN = "mesh.local"
CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/demo-client"
UPSTREAM_ID = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/web"
DEMO_POLICIES = Path(__file__).resolve().parent.parent / "demo" / "policies"
log = logging.getLogger("mesh_gateway.demo")


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "demo", help="bootstrap a CA in --dir and run the gateway, a demo mTLS upstream and a demo mesh")
    parser.add_argument("--dir", type=Path, default=Path("certs"), help="CA directory (created if absent)")
    parser.add_argument("--listen", default="127.0.0.1:8443", help="gateway TLS listener")
    parser.add_argument("--upstream-port", type=int, default=9001)
    parser.add_argument("--admin", default="127.0.0.1:9901")
    parser.add_argument("--mesh-ports", type=int, default=9100, metavar="BASE",
                        help="the demo mesh uses ports BASE+1 … BASE+32 on 127.0.0.1 (0: any free ports)")
    parser.add_argument("--otlp", metavar="URL|auto|off", default="auto",
                        help="export traces over OTLP/gRPC to URL, e.g. http://127.0.0.1:4317 (Jaeger); "
                             "auto (default): there if a collector listens on 127.0.0.1:4317, else off")
    parser.set_defaults(handler=handle)


def ensure_ca(directory: Path) -> None:
    if not (directory / "bundle.pem").exists():
        init_ca(directory, TRUST_DOMAIN)
        print(f"created a CA for {TRUST_DOMAIN} in {directory}/")


def ensure_client_cert(directory: Path) -> tuple[Path, Path]:
    cert_path, key_path = directory / "client.pem", directory / "client.key"
    if cert_path.exists() and key_path.exists():
        leaf = x509.load_pem_x509_certificate(cert_path.read_bytes())
        if leaf.not_valid_after_utc > dt.datetime.now(dt.UTC) + dt.timedelta(hours=1):
            return cert_path, key_path
    ca = load_ca(directory)
    key = new_key()
    leaf = ca.issue(key.public_key(), SpiffeId.parse(CLIENT_ID), 24 * 3600)
    write_atomic(key_path, key_pem(key), private=True)
    write_atomic(cert_path, cert_pem(leaf) + cert_pem(ca.intermediate))
    return cert_path, key_path


def demo_config(directory: Path, listen: str, upstream_port: int, admin: str, mesh: DemoMesh | None = None,
                otlp: str | None = None) -> cfg.GatewayConfig:
    """The demo gateway: `web` on `/`, and with a running `mesh` also `/orders/` and `/items` through sidecars."""
    from mesh_gateway.demo.mesh import gateway_catalog, gateway_routes, tracing_settings

    return cfg.parse({
        "trust_domain": TRUST_DOMAIN,
        "listeners": [{"name": "public", "address": listen, "tls": {"client_auth": "optional"}}],
        "identity": {"ca_dir": str(directory), "spiffe_id": f"spiffe://{TRUST_DOMAIN}/ns/default/sa/gateway",
                     "ttl": "1h", "dns": ["localhost", "127.0.0.1"]},
        "catalog": {"static": {"web": [{"address": "127.0.0.1", "port": upstream_port, "spiffe_id": UPSTREAM_ID}],
                               **(gateway_catalog(mesh) if mesh else {})}},
        "routes": [*(gateway_routes() if mesh else []),
                   {"name": "web", "match": {"path_prefix": "/"}, "service": "web", "timeout_s": 15}],
        "admin": {"address": admin},
        "telemetry": {"service_name": "mesh-gateway", "tracing": tracing_settings(otlp)},
        "authz": {"policies": str(DEMO_POLICIES)},
    })


@contextlib.asynccontextmanager
async def demo_mesh(directory: Path, *, upstream_port: int, mesh_base_port: int, otlp: str | None = None
                    ) -> AsyncIterator[tuple[RunningUpstream, DemoMesh]]:
    """What the demo gateway fronts, serving when entered: the web upstream and the orders/inventory mesh."""
    from mesh_gateway.demo.mesh import MeshPorts, start_mesh
    from mesh_gateway.demo.upstream import start_upstream

    ca = load_ca(directory)
    upstream = await start_upstream("web", ca.issue_credentials(SpiffeId.parse(UPSTREAM_ID), 24 * 3600,
                                                                ["localhost"]), port=upstream_port)
    try:
        mesh = await start_mesh(directory, MeshPorts(mesh_base_port), otlp)
        try:
            yield upstream, mesh
        finally:
            await mesh.close()
    finally:
        await upstream.close()


LOCAL_COLLECTOR = ("127.0.0.1", 4317)


def resolve_otlp(choice: str, collector: tuple[str, int] = LOCAL_COLLECTOR) -> str | None:
    """`auto`: export to a collector on the default OTLP/gRPC port when one is listening, so that a newcomer running
    Jaeger next to `make run` sees traces without a flag; nothing listening → tracing off, no export errors."""
    if choice == "off":
        return None
    if choice != "auto":
        return choice
    try:
        socket.create_connection(collector, timeout=0.2).close()
    except OSError:
        return None
    return f"http://{collector[0]}:{collector[1]}"


def instructions(gateway: Gateway, mesh: DemoMesh, directory: Path, cert: Path, key: Path,
                 otlp: str | None = None) -> str:
    host, port = gateway.addresses["public"]
    host = "localhost" if host in ("127.0.0.1", "0.0.0.0") else host
    admin_host, admin_port = gateway.addresses["admin"]
    curl = f"curl --cacert {directory}/bundle.pem --cert {cert} --key {key} https://{host}:{port}"
    return (
        f"\nmesh-gateway is up. Try:\n\n"
        f"  {curl}/hello\n"
        f"      the gateway in front of an mTLS upstream (web)\n"
        f"  {curl}/orders/apple\n"
        f"      allowed: gateway → orders' sidecar → orders → its sidecar → inventory's sidecar → inventory\n"
        f"  {curl}/items\n"
        f"      denied (403) by inventory's sidecar: only orders may call inventory\n\n"
        f"Where to look:\n"
        f"  this log   one decision line per policy check (\"route\":\"inbound\" is a sidecar's; the denied one has "
        f"\"result\":\"deny\") and one access line per request, with its trace_id\n"
        f"  gateway    http://{admin_host}:{admin_port}/readyz  /metrics  /certs  /policies\n"
        f"  sidecars   {mesh.admin_url('orders')}/certs (orders' SVID, from the CA API with a join token) and "
        f"{mesh.admin_url('inventory')}/readyz\n"
        + (f"  traces     exported to {otlp}: in Jaeger (UI :16686) one trace per request spans the gateway and "
           f"both sidecars\n" if otlp else
           "  traces     start a Jaeger (OTLP on 127.0.0.1:4317, UI :16686) before the demo and it exports to it: "
           "one trace per request across the gateway and both sidecars\n")
        + "Stop: Ctrl-C\n")


def handle(args: argparse.Namespace) -> int:
    from mesh_gateway.app import Gateway
    from mesh_gateway.process import StartupError, configure_logging, new_event_loop, run_until_signalled

    configure_logging()
    directory: Path = args.dir
    try:
        ensure_ca(directory)
        cert_path, key_path = ensure_client_cert(directory)
    except (CAError, OSError) as exc:
        print(f"error: {exc}")
        return 2

    otlp = resolve_otlp(args.otlp)

    async def main() -> int:
        try:
            async with demo_mesh(directory, upstream_port=args.upstream_port, mesh_base_port=args.mesh_ports,
                                 otlp=otlp) as (upstream, mesh):
                gateway = Gateway(demo_config(directory, args.listen, upstream.port, args.admin, mesh, otlp))
                return await run_until_signalled(gateway, on_started=lambda: print(
                    instructions(gateway, mesh, directory, cert_path, key_path, otlp), flush=True))
        except (StartupError, CAError, OSError) as exc:
            log.error("cannot start: %s", exc)
            return 1

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main())
