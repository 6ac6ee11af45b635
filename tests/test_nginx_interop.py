"""Interop with nginx, a non-Python TLS stack, as the mTLS upstream behind the gateway."""

from __future__ import annotations

import aiohttp
import pytest

from tests.nginx import NGINX, nginx_mtls_upstream
from tests.support import CLIENT_ID, GATEWAY_ID, WEB_ID, client_ssl, gateway_config, issue, running, url

pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (CI installs it: apt-get install nginx)")


async def test_request_through_gateway_to_nginx_requiring_client_cert(ca, ca_dir, tmp_path, client_creds):
    async with nginx_mtls_upstream(tmp_path / "nginx", issue(ca, WEB_ID)) as port:
        config = gateway_config(ca_dir, {"web": [{"address": "127.0.0.1", "port": port, "spiffe_id": WEB_ID}]})
        async with running(config) as gw, aiohttp.ClientSession() as client:
            for _ in range(3):  # keep-alive reuse of the verified upstream connection
                async with client.get(url(gw, "/"), ssl=client_ssl(ca.bundle_pem, client_creds)) as resp:
                    assert resp.status == 200
                    assert resp.headers["x-upstream"] == "nginx"
                    body = await resp.text()
    assert "verify=SUCCESS" in body
    assert f"xfcc=By={GATEWAY_ID};URI={CLIENT_ID}" in body


async def test_nginx_with_another_spiffe_id_gets_502(ca, ca_dir, tmp_path, client_creds):
    impostor = issue(ca, "spiffe://mesh.local/ns/default/sa/not-web")
    async with nginx_mtls_upstream(tmp_path / "nginx", impostor) as port:
        config = gateway_config(ca_dir, {"web": [{"address": "127.0.0.1", "port": port, "spiffe_id": WEB_ID}]})
        async with running(config) as gw, aiohttp.ClientSession() as client:
            async with client.get(url(gw, "/"), ssl=client_ssl(ca.bundle_pem, client_creds)) as resp:
                assert resp.status == 502
                assert "x-upstream" not in resp.headers
