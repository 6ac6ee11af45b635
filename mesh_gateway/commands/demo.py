"""`mesh-gateway demo`: bootstrap the CA, start a demo upstream that requires mTLS, and the gateway in front of it."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
from pathlib import Path
from typing import Any

from cryptography import x509

from mesh_gateway import config as cfg
from mesh_gateway.identity.ca import CAError, cert_pem, init_ca, key_pem, load_ca, new_key
from mesh_gateway.identity.files import write_atomic
from mesh_gateway.model import SpiffeId

TRUST_DOMAIN = "mesh.local"
CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/demo-client"
UPSTREAM_ID = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/web"
DEMO_POLICIES = Path(__file__).resolve().parent.parent / "demo" / "policies"
log = logging.getLogger("mesh_gateway.demo")


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "demo", help="bootstrap a CA in --dir and run the gateway in front of a demo mTLS upstream")
    parser.add_argument("--dir", type=Path, default=Path("certs"), help="CA directory (created if absent)")
    parser.add_argument("--listen", default="127.0.0.1:8443", help="gateway TLS listener")
    parser.add_argument("--upstream-port", type=int, default=9001)
    parser.add_argument("--admin", default="127.0.0.1:9901")
    parser.add_argument("--otlp", metavar="URL", default=None,
                        help="export traces over OTLP/gRPC, e.g. http://127.0.0.1:4317 (Jaeger); default: off")
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


def demo_config(directory: Path, listen: str, upstream_port: int, admin: str,
                otlp: str | None = None) -> cfg.GatewayConfig:
    tracing = {"exporter": "otlp_grpc", "endpoint": otlp, "sampling_ratio": 1.0} if otlp else {"exporter": "none"}
    return cfg.parse({
        "trust_domain": TRUST_DOMAIN,
        "listeners": [{"name": "public", "address": listen, "tls": {"client_auth": "optional"}}],
        "identity": {"ca_dir": str(directory), "spiffe_id": f"spiffe://{TRUST_DOMAIN}/ns/default/sa/gateway",
                     "ttl": "1h", "dns": ["localhost", "127.0.0.1"]},
        "catalog": {"static": {"web": [{"address": "127.0.0.1", "port": upstream_port, "spiffe_id": UPSTREAM_ID}]}},
        "routes": [{"name": "web", "match": {"path_prefix": "/"}, "service": "web", "timeout_s": 15}],
        "admin": {"address": admin},
        "telemetry": {"service_name": "mesh-gateway", "tracing": tracing},
        "authz": {"policies": str(DEMO_POLICIES)},
    })


def handle(args: argparse.Namespace) -> int:
    from mesh_gateway.app import Gateway, StartupError, configure_logging, new_event_loop, run_until_signalled
    from mesh_gateway.demo.upstream import start_upstream

    configure_logging()
    directory: Path = args.dir
    try:
        ensure_ca(directory)
        cert_path, key_path = ensure_client_cert(directory)
        ca = load_ca(directory)
    except (CAError, OSError) as exc:
        print(f"error: {exc}")
        return 2
    config = demo_config(directory, args.listen, args.upstream_port, args.admin, args.otlp)

    async def main() -> int:
        upstream = await start_upstream("web", ca.issue_credentials(SpiffeId.parse(UPSTREAM_ID), 24 * 3600,
                                                                    ["localhost"]), port=args.upstream_port)
        try:
            gateway = Gateway(config)
            host, port = cfg.split_host_port(args.listen)
            host = "localhost" if host in ("127.0.0.1", "0.0.0.0") else host
            loop = asyncio.get_running_loop()
            loop.call_later(0.2, print, (
                f"\nmesh-gateway is up. Try:\n\n  curl --cacert {directory}/bundle.pem --cert {cert_path} "
                f"--key {key_path} https://{host}:{port}/hello\n\n"
                f"Health: curl http://{args.admin}/readyz   Stop: Ctrl-C\n"))
            return await run_until_signalled(gateway)
        except StartupError as exc:
            log.error("cannot start: %s", exc)
            return 1
        finally:
            await upstream.close()

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main())
