"""What the benchmark runs: the PKI, the nginx upstream, the nginx proxy and the gateway config for each variant.

nginx and the gateway do the identical job: a TLS listener that asks for (but, because wrk cannot present one,
does not require) a client certificate, verified against the mesh bundle; a keep-alive pool to an nginx upstream
that requires a client certificate; the proxy presents an SVID from our CA and verifies the upstream against the
bundle. The "direct" target is the same upstream content on a listener that does not ask for a client cert.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRUST_DOMAIN = "bench.local"
SMALL_BODY = "hello from the upstream\n"
BIG_BODY_BYTES = 16 * 1024


@dataclass(frozen=True)
class Pki:
    ca_dir: Path
    bundle: Path
    upstream: tuple[Path, Path]
    nginx_client: tuple[Path, Path]
    edge: tuple[Path, Path]

    @property
    def gateway_id(self) -> str:
        return f"spiffe://{TRUST_DOMAIN}/gateway"

    @property
    def upstream_id(self) -> str:
        return f"spiffe://{TRUST_DOMAIN}/upstream"


def build_pki(root: Path, python: str, repo: Path) -> Pki:
    """Through our own CLI, so the benchmark also exercises `ca init` / `ca issue`."""
    ca_dir = root / "ca"
    env = {**os.environ, "PYTHONPATH": str(repo)}

    def cli(*args: str) -> None:
        result = subprocess.run([python, "-m", "mesh_gateway", "ca", *args], env=env, capture_output=True,
                                text=True, timeout=60, check=False)
        if result.returncode != 0:
            sys.exit(f"mesh_gateway ca {args[0]} failed:\n{result.stderr}")

    cli("init", "--dir", str(ca_dir), "--trust-domain", TRUST_DOMAIN)
    pairs = {}
    for name in ("upstream", "nginx-proxy", "edge"):
        out = root / name
        cli("issue", "--dir", str(ca_dir), "--spiffe-id", f"spiffe://{TRUST_DOMAIN}/{name}", "--dns", "localhost",
            "--dns", "127.0.0.1", "--ttl", "24h", "--out", str(out))
        pairs[name] = (out.with_name(name + ".pem"), out.with_name(name + ".key"))
    return Pki(ca_dir, ca_dir / "bundle.pem", pairs["upstream"], pairs["nginx-proxy"], pairs["edge"])


def _nginx_common(root: Path, name: str, workers: int) -> str:
    tmp = root / f"{name}-tmp"
    tmp.mkdir(exist_ok=True)
    # As root, nginx workers would switch to "nobody" and lose access to the 0700 temp dir.
    user = "user root;\n" if os.geteuid() == 0 else ""
    temps = "".join(f"  {kind}_temp_path {tmp / kind};\n" for kind in ("client_body", "proxy", "fastcgi",
                                                                         "uwsgi", "scgi"))
    return (f"{user}worker_processes {workers};\npid {root / name}.pid;\nerror_log {root / name}-error.log warn;\n"
            f"events {{ worker_connections 4096; }}\n"
            f"http {{\n  access_log off;\n  default_type text/plain;\n{temps}"
            f"  keepalive_requests 10000000;\n  keepalive_timeout 120s;\n")


@dataclass(frozen=True)
class UpstreamPorts:
    mtls: int
    tls: int
    plain: int


def upstream_conf(root: Path, pki: Pki, ports: UpstreamPorts, workers: int) -> Path:
    www = root / "www"
    www.mkdir(exist_ok=True)
    (www / "16k").write_bytes(b"x" * (BIG_BODY_BYTES - 1) + b"\n")
    cert, key = pki.upstream
    locations = (f'    location = / {{ return 200 "{SMALL_BODY.strip()}\\n"; }}\n'
                 f"    location = /16k {{ root {www}; try_files /16k =404; }}\n"
                 "    location = /v1/traces { client_max_body_size 64m; return 200; }  # OTLP/HTTP sink\n")
    tls = f"    ssl_certificate {cert};\n    ssl_certificate_key {key};\n"
    conf = (_nginx_common(root, "upstream", workers)
            + f"  server {{\n    listen 127.0.0.1:{ports.mtls} ssl;\n{tls}"
            f"    ssl_verify_client on;\n    ssl_client_certificate {pki.bundle};\n    ssl_verify_depth 3;\n"
            f"{locations}  }}\n"
            f"  server {{\n    listen 127.0.0.1:{ports.tls} ssl;\n{tls}{locations}  }}\n"
            f"  server {{\n    listen 127.0.0.1:{ports.plain};\n{locations}  }}\n}}\n")
    path = root / "upstream.conf"
    path.write_text(conf)
    return path


def proxy_conf(root: Path, pki: Pki, port: int, upstream: UpstreamPorts, *, tls: bool, workers: int) -> Path:
    """nginx doing the gateway's job: TLS edge (client cert requested), mTLS to the upstream with keep-alive."""
    cert, key = pki.edge
    client_cert, client_key = pki.nginx_client
    if tls:
        listen = (f"    listen 127.0.0.1:{port} ssl;\n    ssl_certificate {cert};\n    ssl_certificate_key {key};\n"
                  f"    ssl_verify_client optional;\n    ssl_client_certificate {pki.bundle};\n"
                  f"    ssl_verify_depth 3;\n")
        upstream_block = f"  upstream up {{ server 127.0.0.1:{upstream.mtls}; keepalive 64; " \
                         f"keepalive_requests 10000000; }}\n"
        proxy = ("      proxy_pass https://up;\n"
                 f"      proxy_ssl_certificate {client_cert};\n      proxy_ssl_certificate_key {client_key};\n"
                 f"      proxy_ssl_trusted_certificate {pki.bundle};\n      proxy_ssl_verify on;\n"
                 "      proxy_ssl_verify_depth 3;\n      proxy_ssl_name localhost;\n"
                 "      proxy_ssl_session_reuse on;\n")
    else:
        listen = f"    listen 127.0.0.1:{port};\n"
        upstream_block = f"  upstream up {{ server 127.0.0.1:{upstream.plain}; keepalive 64; " \
                         f"keepalive_requests 10000000; }}\n"
        proxy = "      proxy_pass http://up;\n"
    # Like the gateway's JSON access log: one line per request, buffered.
    access_log = f"  access_log {root / f'proxy-{port}-access.log'} combined buffer=64k flush=1s;\n"
    conf = (_nginx_common(root, f"proxy-{port}", workers).replace("  access_log off;\n", access_log) + upstream_block
            + f"  server {{\n{listen}    location / {{\n{proxy}"
            "      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }\n  }\n}\n")
    path = root / f"proxy-{port}.conf"
    path.write_text(conf)
    return path


@dataclass(frozen=True)
class Features:
    """Optional gateway features a variant turns on; each maps to a GatewayConfig section (see FEATURE_KEYS)."""

    tls: bool = True
    authz: bool = False
    trace_ratio: float | None = None
    workers: int = 1
    http1_server: str = "h1"
    extra: dict[str, Any] = field(default_factory=dict)


# The GatewayConfig field each optional feature needs; a variant whose field is missing is skipped.
FEATURE_KEYS = {"authz": "authz", "tracing": "telemetry", "workers": "workers"}

ALLOW_POLICY = """package mesh.authz

default allow := false

# The benchmark's clients present no certificate (wrk cannot), so the rule keys on what they do send.
allow if {
    input.attributes.request.http.method == "GET"
    startswith(input.attributes.request.http.path, "/")
}
"""


def gateway_config(root: Path, pki: Pki, port: int, admin_port: int, upstream: UpstreamPorts,
                   features: Features) -> dict[str, Any]:
    endpoint: dict[str, Any]
    listener: dict[str, Any] = {"name": "edge", "address": f"127.0.0.1:{port}"}
    if features.http1_server != "h1":
        listener["server"] = features.http1_server
    if features.tls:
        listener["tls"] = {"client_auth": "optional"}
        endpoint = {"address": "127.0.0.1", "port": upstream.mtls, "spiffe_id": pki.upstream_id, "tls": "mtls"}
    else:
        endpoint = {"address": "127.0.0.1", "port": upstream.plain, "tls": "plain"}
    config: dict[str, Any] = {
        "trust_domain": TRUST_DOMAIN,
        "listeners": [listener],
        "identity": {"ca_dir": str(pki.ca_dir), "spiffe_id": pki.gateway_id, "ttl": "24h",
                     "dns": ["localhost", "127.0.0.1"]},
        "catalog": {"static": {"echo": [endpoint]}},
        "routes": [{"name": "all", "match": {"path_prefix": "/"}, "service": "echo"}],
        "admin": {"address": f"127.0.0.1:{admin_port}"},
    }
    if features.authz:
        policies = root / "policies"
        policies.mkdir(exist_ok=True)
        (policies / "allow.rego").write_text(ALLOW_POLICY)
        config["authz"] = {"engine": "embedded", "policies": str(policies), "query": "data.mesh.authz.allow"}
    # The gateway's defaults stay on in every variant (JSON access log, buffered, and metrics); the log goes to a
    # file as nginx's does. Spans are exported over OTLP/HTTP to the upstream nginx, which answers 200.
    telemetry: dict[str, Any] = {"access_log": {"path": str(root / "gateway-access.log")}}
    if features.trace_ratio is not None:
        telemetry["tracing"] = {"exporter": "otlp_http", "sampling_ratio": features.trace_ratio,
                                "endpoint": f"http://127.0.0.1:{upstream.plain}/v1/traces"}
    config["telemetry"] = telemetry
    if features.workers != 1:
        config["workers"] = features.workers
    config.update(features.extra)
    return config
