"""The input document is byte-for-byte what it was before the request-path optimisations (memoised peer
certificate encodings, the normalise_path fast path): same keys, same order, same values, for a spread of requests.

tests/data/authz_input_golden.json was written by the original build_input (regenerate only for an intended
change: `python -m tests.test_authz_input_golden`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mesh_gateway.authz.input import build_input
from mesh_gateway.model import BodyPrefix, PeerCert, RequestInfo, Route, RouteMatch, SpiffeId
from mesh_gateway.paths import normalise_path

GOLDEN = Path(__file__).resolve().parent / "data" / "authz_input_golden.json"
CLIENT = SpiffeId.parse("spiffe://mesh.local/ns/default/sa/client")
OTHER = SpiffeId.parse("spiffe://mesh.local/ns/ops/sa/console")
GATEWAY = SpiffeId.parse("spiffe://mesh.local/ns/default/sa/gateway")
ROUTE = Route(name="api", match=RouteMatch(), service="web")
# Two DER blobs standing in for client certificates: one longer than a PEM line, one short.
DER_LONG = bytes(range(256)) * 3 + b"\x00\xff"
DER_SHORT = b"\x30\x03\x02\x01\x01"
HEADERS = (("host", "gw.mesh.local:8443"), ("user-agent", "curl/8"), ("accept", "a/b"), ("accept", "c/d"),
           ("cookie", "a=1"), ("cookie", "b=2"), ("authorization", "Bearer x.y.z"), ("connection", "keep-alive"),
           ("x-forwarded-client-cert", "By=forged"), ("x-spiffe-id", "spiffe://forged/x"),
           ("content-type", "application/json"))


def _info(**changes: Any) -> RequestInfo:
    values: dict[str, Any] = dict(
        method="GET", path="/api/orders/7", query="", host="gw.mesh.local:8443", scheme="https", headers=HEADERS,
        client_address="10.0.0.7", client_port=40000, request_id="req-1", local_address="10.0.0.1",
        local_port=8443, peer=PeerCert(CLIENT, DER_LONG), sni="gw.mesh.local", content_length=None)
    values.update(changes)
    return RequestInfo(**values)


# name → (RequestInfo, raw path to normalise, gateway id, body prefix)
CASES: dict[str, tuple[RequestInfo, str, SpiffeId | None, BodyPrefix | None]] = {
    "mtls-get": (_info(), "/api/orders/7", GATEWAY, None),
    "query": (_info(query="lang=en&id=1&id=2&flag&e=%20x+y"), "/api/orders/7", GATEWAY, None),
    "short-cert-other-peer": (_info(peer=PeerCert(OTHER, DER_SHORT)), "/admin/", GATEWAY, None),
    "peer-without-cert": (_info(peer=PeerCert(CLIENT, None)), "/", GATEWAY, None),
    "no-peer": (_info(peer=None, sni=None), "/api/%2e%2e/admin;x=1", GATEWAY, None),
    "no-gateway-id": (_info(), "/files/a%20b/%3bx", None, None),
    "plain-http": (_info(scheme="http", peer=None, sni=None, local_address="", local_port=0, protocol="HTTP/1.0",
                         headers=(("accept", "*/*"),)), "//a//b/./c/..", None, None),
    "post-json-body": (_info(method="POST", content_length=13), "/api/orders", GATEWAY,
                       BodyPrefix(b'{"amount": 5}', False)),
    "truncated-body": (_info(method="PUT", content_length=99), "/api/orders", GATEWAY,
                       BodyPrefix(b'{"amount": ', True)),
    "connection-listed": (_info(headers=(("x-secret", "1"), ("te", "trailers"), ("connection", "close, X-Secret"),
                                         ("x-spiffe-foo", "f"), ("forwarded", "for=x"), ("accept", "*/*"),
                                         ("x-secret", "2"), ("proxy-authorization", "Basic x"))),
                          "/api", GATEWAY, None),
    "unicode-path": (_info(path="/caf%C3%A9/\u00e9"), "/caf%C3%A9/\u00e9", GATEWAY, None),
}


def built(name: str) -> dict[str, Any]:
    info, raw, gateway_id, body = CASES[name]
    return build_input(info, ROUTE, normalised=normalise_path(raw), now=1_700_000_000.25, gateway_id=gateway_id,
                       body=body)


def document(name: str) -> str:
    return json.dumps(built(name))  # insertion order kept: key order is part of "byte-identical"


@pytest.mark.parametrize("name", sorted(CASES))
def test_input_document_is_unchanged(name: str) -> None:
    golden = json.loads(GOLDEN.read_text())
    assert document(name) == golden[name]


def test_repeated_requests_on_one_connection_get_identical_documents() -> None:
    # The per-certificate encodings are memoised: the second request must see exactly what the first did.
    assert document("mtls-get") == document("mtls-get") == json.loads(GOLDEN.read_text())["mtls-get"]


if __name__ == "__main__":
    GOLDEN.write_text(json.dumps({name: document(name) for name in sorted(CASES)}, indent=1) + "\n")


ECHO_POLICY = """package echo

import rego.v1

fields := {
    "certificate": object.get(input.attributes.source, "certificate", null),
    "principal": object.get(input.attributes.source, "principal", null),
    "xfcc": object.get(input.attributes.request.http.headers, "x-forwarded-client-cert", null),
    "headers": input.attributes.request.http.headers,
    "time": input.attributes.request.time,
    "parsed_path": input.parsed_path,
    "parsed_query": input.parsed_query,
    "source_principal": input.source_principal,
}
"""


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_policy_reads_the_same_values_as_before(name: str, tmp_path: Path) -> None:
    from mesh_gateway.authz.rego import EmbeddedEngine

    (tmp_path / "echo.rego").write_text(ECHO_POLICY)
    engine = EmbeddedEngine(tmp_path)
    engine.load()
    seen = engine.evaluate_sync("data.echo.fields", built(name))  # the dict, as the authorizer passes it
    before = json.loads(json.loads(GOLDEN.read_text())[name])
    attributes = before["attributes"]
    http = attributes["request"]["http"]
    assert seen == {
        "certificate": attributes["source"].get("certificate"), "principal": attributes["source"].get("principal"),
        "xfcc": http["headers"].get("x-forwarded-client-cert"), "headers": http["headers"],
        "time": attributes["request"]["time"], "parsed_path": before["parsed_path"],
        "parsed_query": before["parsed_query"], "source_principal": before["source_principal"],
    }
