"""nginx as a real, non-Python mTLS peer for interop tests."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

from mesh_gateway.model import Credentials

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)

UPSTREAM_CONF = """
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {dir}/server.pem;
    ssl_certificate_key {dir}/server.key;
    ssl_client_certificate {dir}/bundle.pem;
    ssl_verify_client on;
    ssl_verify_depth 3;
    location / {{
      default_type text/plain;
      add_header x-upstream nginx;
      return 200 "verify=$ssl_client_verify xfcc=$http_x_forwarded_client_cert\\n";
    }}
  }}
}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def nginx_mtls_upstream(directory: Path, server: Credentials) -> AsyncIterator[int]:
    """nginx on a loopback port requiring a client cert that chains to `server.bundle_pem`."""
    assert NGINX is not None
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "server.pem").write_bytes(server.cert_chain_pem)
    (directory / "server.key").write_bytes(server.key_pem)
    (directory / "server.key").chmod(0o600)
    (directory / "bundle.pem").write_bytes(server.bundle_pem)
    port = free_port()
    (directory / "nginx.conf").write_text(UPSTREAM_CONF.format(dir=directory, port=port))
    process = subprocess.Popen([NGINX, "-p", str(directory), "-c", str(directory / "nginx.conf"),
                                "-g", "daemon off;"], stderr=subprocess.PIPE)
    try:
        async with asyncio.timeout(15):
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"nginx exited: {process.stderr.read().decode() if process.stderr else ''}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except ConnectionRefusedError:
                    await asyncio.sleep(0.02)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
