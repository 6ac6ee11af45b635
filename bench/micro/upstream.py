"""Micro-benchmark: CPU µs per upstream forward (headers → ResilientForwarder.forward → response headers).

    python bench/micro/upstream.py [--iterations 20000] [--repeats 5]

The forwarder is the one app.py builds (a real `Gateway` from a parsed config: ResilientForwarder around
H1Forwarder, outlier detection, circuits, metrics on), on uvloop, forwarding small keep-alive GETs over mTLS
(SVID from our own CA, the upstream's SPIFFE ID checked) to an nginx upstream that requires a client certificate.
nginx is a separate process, so the CPU counted (`time.process_time()` of this process) is the forwarder's own:
request headers, the resilience layer, the pool, the request write incl. TLS encryption, reading and parsing the
response incl. TLS decryption. Printed: the best of `--repeats` runs of `--iterations` forwards after a warm-up,
in total and its user part (the rest is the kernel's: send, recv, epoll).

On a shared machine these times move by ±15 % between runs. For an A/B of a change, count instructions instead
(steady to 0.2 %): run under `valgrind --tool=callgrind --callgrind-out-file=/dev/null` with `--warmup 200
--repeats 1` and `--iterations 500`, then 2500; (Ir2 - Ir1) / 2000 is the user-space instructions per forward.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import uvloop  # noqa: E402

from mesh_gateway import config as cfg  # noqa: E402
from mesh_gateway import headers as hdrs  # noqa: E402
from mesh_gateway.app import Gateway  # noqa: E402
from mesh_gateway.identity.ca import init_ca  # noqa: E402
from mesh_gateway.model import RequestInfo, SpiffeId  # noqa: E402
from mesh_gateway.pipeline import Exchange, Forwarder, UpstreamRequest  # noqa: E402

TRUST_DOMAIN = "bench.local"
GATEWAY_ID = f"spiffe://{TRUST_DOMAIN}/gateway"
UPSTREAM_ID = f"spiffe://{TRUST_DOMAIN}/upstream"
BODY = "hello from the upstream"

NGINX_CONF = """
{user}worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 256; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 120s;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {dir}/upstream.pem;
    ssl_certificate_key {dir}/upstream.key;
    ssl_client_certificate {dir}/bundle.pem;
    ssl_verify_client on;
    ssl_verify_depth 3;
    location = / {{ default_type text/plain; return 200 "{body}\\n"; }}
  }}
}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_nginx(root: Path) -> tuple[subprocess.Popen[bytes], int]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    ca = init_ca(root / "ca", TRUST_DOMAIN)
    upstream = ca.issue_credentials(SpiffeId.parse(UPSTREAM_ID), 3600, ("localhost", "127.0.0.1"))
    (root / "upstream.pem").write_bytes(upstream.cert_chain_pem)
    (root / "upstream.key").write_bytes(upstream.key_pem)
    (root / "upstream.key").chmod(0o600)
    (root / "bundle.pem").write_bytes(upstream.bundle_pem)
    port = free_port()
    user = "user root;\n" if os.geteuid() == 0 else ""
    (root / "nginx.conf").write_text(NGINX_CONF.format(user=user, dir=root, port=port, body=BODY))
    process = subprocess.Popen([nginx, "-p", str(root), "-c", str(root / "nginx.conf"), "-g", "daemon off;"])
    deadline = time.monotonic() + 15
    while True:
        if process.poll() is not None:
            sys.exit("nginx exited at start-up")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, port
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                sys.exit("nginx did not start listening")
            time.sleep(0.02)


def gateway(root: Path, port: int) -> Gateway:
    config = cfg.parse({
        "trust_domain": TRUST_DOMAIN,
        "listeners": [{"name": "public", "address": "127.0.0.1:0", "tls": {"client_auth": "optional"}}],
        "identity": {"ca_dir": str(root / "ca"), "spiffe_id": GATEWAY_ID, "dns": ["localhost", "127.0.0.1"]},
        "catalog": {"static": {"web": [{"address": "127.0.0.1", "port": port, "spiffe_id": UPSTREAM_ID}]}},
        "routes": [{"name": "web", "match": {"path_prefix": "/"}, "service": "web"}],
        "admin": {"address": "127.0.0.1:0"},
    })
    return Gateway(config)


REQUEST_HEADERS = (("host", "127.0.0.1:8443"), ("user-agent", "wrk"), ("accept", "*/*"),
                   ("x-request-id", "b3c1e1d2a4f54c0e9d1c2b3a4f5e6d7c"))


async def run(root: Path, port: int, iterations: int, repeats: int, warmup: int) -> None:
    logging.disable(logging.WARNING)  # "authorization is off": not this path
    gw = gateway(root, port)
    forwarder: Forwarder = gw.pipeline._forwarder  # the ResilientForwarder app.py built
    catalog = gw.catalog.get()
    route = gw.file_routes.routes[0]
    gateway_id = SpiffeId.parse(GATEWAY_ID)
    info = RequestInfo(method="GET", path="/", query="", host="127.0.0.1:8443", scheme="https",
                       headers=REQUEST_HEADERS, client_address="127.0.0.1", client_port=50000,
                       request_id="b3c1e1d2a4f54c0e9d1c2b3a4f5e6d7c", listener="public")

    async def once() -> None:
        exchange = Exchange(info=info)
        endpoint = gw.picker.pick(route, catalog, exchange)
        request = UpstreamRequest(method=info.method, target=info.target,
                                  headers=hdrs.upstream_request_headers(info, gateway_id), body=None, host=info.host)
        response = await forwarder.forward(request, endpoint, route, exchange)
        response.headers = hdrs.downstream_response_headers(response.headers)
        assert response.status == 200 and isinstance(response.body, bytes), response

    for _ in range(warmup):  # the connection, TLS session, caches
        await once()
    best = best_user = float("inf")
    for _ in range(repeats):
        start, user = time.process_time(), os.times().user
        for _ in range(iterations):
            await once()
        best = min(best, (time.process_time() - start) / iterations * 1e6)
        best_user = min(best_user, (os.times().user - user) / iterations * 1e6)
    print(f"upstream forward: {best:.1f} CPU µs per call, {best_user:.1f} of it user "
          f"(best of {repeats} runs of {iterations})")
    await gw.forwarder.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="micro-upstream-") as tmp:
        process, port = start_nginx(Path(tmp))
        try:
            uvloop.run(run(Path(tmp), port, args.iterations, args.repeats, args.warmup))
        finally:
            process.terminate()
            process.wait(timeout=10)


if __name__ == "__main__":
    main()
