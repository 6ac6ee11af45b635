"""The input document and path normalisation: Envoy AttributeContext shape, field by field, and bypass attempts."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh_gateway.authz.input import build_input, parse_body
from mesh_gateway.model import BodyPrefix, PeerCert, RequestInfo, Route, RouteMatch, SpiffeId
from mesh_gateway.paths import UnsafePath, normalise_path

CLIENT = SpiffeId.parse("spiffe://mesh.local/ns/default/sa/client")
GATEWAY = SpiffeId.parse("spiffe://mesh.local/ns/default/sa/gateway")
ROUTE = Route(name="api", match=RouteMatch(), service="web")


def info(path: str = "/api/orders/7", query: str = "", **kw: object) -> RequestInfo:
    values: dict[str, object] = dict(
        method="GET", path=path, query=query, host="gw.mesh.local:8443", scheme="https",
        headers=(("user-agent", "curl/8"), ("accept", "a/b"), ("accept", "c/d"), ("cookie", "a=1"), ("cookie", "b=2")),
        client_address="10.0.0.7", client_port=40000, request_id="req-1", local_address="10.0.0.1",
        local_port=8443, peer=PeerCert(CLIENT, b"\x30\x03\x02\x01\x01"), sni="gw.mesh.local", content_length=None)
    values.update(kw)
    return RequestInfo(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(("raw", "path", "segments"), [
    ("/", "/", ()),
    ("/api/orders", "/api/orders", ("api", "orders")),
    ("/api/orders/", "/api/orders/", ("api", "orders")),
    ("/api/%2e%2e/admin", "/admin", ("admin",)),
    ("/api/%2E%2E/admin", "/admin", ("admin",)),
    ("/api/.%2e/admin", "/admin", ("admin",)),
    ("/api/../../../admin", "/admin", ("admin",)),
    ("//admin", "/admin", ("admin",)),
    ("/api//v1///orders", "/api/v1/orders", ("api", "v1", "orders")),
    ("/./api/./orders", "/api/orders", ("api", "orders")),
    ("/admin;jsessionid=1", "/admin", ("admin",)),
    ("/api/..;/admin", "/admin", ("admin",)),
    ("/api;x=1/orders;y=2", "/api/orders", ("api", "orders")),
    ("/%61dmin", "/admin", ("admin",)),
    ("/ADMIN", "/ADMIN", ("ADMIN",)),
    ("/files/a%20b", "/files/a%20b", ("files", "a b")),
    ("/files/%3bx", "/files/%3Bx", ("files", ";x")),
    ("/api/orders/..", "/api/", ("api",)),
])
def test_normalise_path(raw, path, segments):
    result = normalise_path(raw)
    assert (result.path, result.segments) == (path, segments)


@pytest.mark.parametrize("raw", [
    "/api/..%2fadmin", "/api%2F..%2Fadmin", "/api\\..\\admin", "/api/%5c../admin", "/a%zz", "/a%2", "/a\x00b",
    "/a%00b", "relative", "",
])
def test_ambiguous_paths_are_refused(raw):
    with pytest.raises(UnsafePath):
        normalise_path(raw)


@given(st.lists(st.sampled_from(["a", "B", ".", "..", "", "%2e", "%2E%2e", "x;y", "%41", "c d"]), max_size=12))
def test_normalisation_is_idempotent_and_leaves_no_dot_segments(parts):
    raw = "/" + "/".join(parts).replace(" ", "%20")
    once = normalise_path(raw)
    assert normalise_path(once.path) == once
    assert "//" not in once.path
    assert all(segment not in (".", "..", "") for segment in once.segments)


def test_input_has_envoy_attribute_context_shape():
    document = build_input(info(query="lang=en&id=1&id=2&flag"), ROUTE, normalised=normalise_path("/api/orders/7"),
                           now=1_700_000_000.25, gateway_id=GATEWAY)
    attributes = document["attributes"]
    assert attributes["source"]["address"] == {"socketAddress": {"address": "10.0.0.7", "portValue": 40000}}
    assert attributes["source"]["principal"] == str(CLIENT)
    assert attributes["source"]["certificate"].startswith("-----BEGIN%20CERTIFICATE-----")
    assert attributes["destination"] == {"address": {"socketAddress": {"address": "10.0.0.1", "portValue": 8443}},
                                         "principal": str(GATEWAY)}
    http = attributes["request"]["http"]
    assert http["id"] == "req-1"
    assert http["method"] == "GET"
    assert http["path"] == "/api/orders/7?lang=en&id=1&id=2&flag"
    assert http["host"] == "gw.mesh.local:8443"
    assert http["scheme"] == "https"
    assert http["protocol"] == "HTTP/1.1"
    assert http["size"] == -1
    assert attributes["request"]["time"] == "2023-11-14T22:13:20.250000Z"
    assert attributes["tls_session"] == {"sni": "gw.mesh.local"}
    headers = http["headers"]
    assert headers[":method"] == "GET" and headers[":authority"] == "gw.mesh.local:8443"
    assert headers[":path"] == http["path"] and headers[":scheme"] == "https"
    assert headers["accept"] == "a/b,c/d"
    assert headers["cookie"] == "a=1; b=2"
    assert headers["x-request-id"] == "req-1"
    assert headers["x-forwarded-client-cert"].startswith(f"By={GATEWAY};Hash=")
    assert headers["x-forwarded-client-cert"].endswith(f";URI={CLIENT}")
    assert document["parsed_path"] == ["api", "orders", "7"]
    assert document["parsed_query"] == {"lang": ["en"], "id": ["1", "2"], "flag": [""]}
    assert document["version"] == {"encoding": "protojson", "ext_authz": "v3"}
    assert document["source_principal"] == str(CLIENT)
    assert document["route"] == {"name": "api", "service": "web"}
    assert "parsed_body" not in document and "truncated_body" not in document


def test_client_cannot_forge_identity_headers_in_input():
    forged = info(headers=(("x-forwarded-client-cert", "By=x;Hash=y;URI=spiffe://mesh.local/ns/ops/sa/console"),))
    document = build_input(forged, ROUTE, normalised=normalise_path("/"), now=0, gateway_id=GATEWAY)
    assert document["attributes"]["request"]["http"]["headers"]["x-forwarded-client-cert"].endswith(f"URI={CLIENT}")
    anonymous = info(peer=None, headers=(("x-forwarded-client-cert", "By=x;Hash=y;URI=spiffe://evil/x"),))
    document = build_input(anonymous, ROUTE, normalised=normalise_path("/"), now=0, gateway_id=GATEWAY)
    assert "x-forwarded-client-cert" not in document["attributes"]["request"]["http"]["headers"]
    assert "principal" not in document["attributes"]["source"]
    assert document["source_principal"] == ""


@pytest.mark.parametrize(("data", "truncated", "content_type", "parsed", "flag"), [
    (b'{"amount": 5}', False, "application/json", {"amount": 5}, False),
    (b'{"amount": 5}', False, "application/merge-patch+json; charset=utf-8", {"amount": 5}, False),
    (b'{"amount": ', True, "application/json", None, True),
    (b"not json", False, "application/json", None, False),
    (b"a=1", False, "application/x-www-form-urlencoded", None, False),
    (b"", False, "application/json", None, False),
])
def test_body_parsing(data, truncated, content_type, parsed, flag):
    assert parse_body(BodyPrefix(data, truncated), content_type) == (parsed, flag)


def test_body_fields_in_input():
    request = info(method="POST", headers=(("content-type", "application/json"),), content_length=13)
    document = build_input(request, ROUTE, normalised=normalise_path("/api/orders"), now=0,
                           body=BodyPrefix(b'{"amount": 5}', False))
    assert document["parsed_body"] == {"amount": 5}
    assert document["truncated_body"] is False
    assert document["attributes"]["request"]["http"]["body"] == '{"amount": 5}'
    assert document["attributes"]["request"]["http"]["size"] == 13


@given(st.lists(st.sampled_from(["a", "B", ".", "..", "...", ".x", "", "%2e", "%41", "%2f", "%zz", "x;y", "é", "\\",
                                 "\x00", "\x7f", "c d", "~"]), max_size=8), st.booleans())
def test_already_normal_paths_take_the_fast_path_with_the_same_result(parts, leading_slash):
    # normalise_path skips the work for a path with nothing to normalise; it must agree with the full algorithm.
    from mesh_gateway.paths import _normalise

    raw = ("/" if leading_slash else "") + "/".join(parts)
    try:
        expected = _normalise(raw)
    except UnsafePath:
        with pytest.raises(UnsafePath):
            normalise_path(raw)
        return
    assert normalise_path(raw) == expected


@given(st.lists(st.sampled_from(["a", "b", "=", "&", "&&", "x=1", "id=2", "%20", "+", "%zz", "é", ";", "==", ""]),
                max_size=10))
def test_parsed_query_is_parse_qs(parts):
    from urllib.parse import parse_qs

    from mesh_gateway.authz.input import parse_query

    query = "".join(parts)
    assert parse_query(query) == parse_qs(query, keep_blank_values=True)
    assert list(parse_query(query)) == list(parse_qs(query, keep_blank_values=True))  # key order too


@given(st.lists(st.tuples(st.sampled_from(["accept", "cookie", "connection", "te", "x-a", "x-spiffe-id", "forwarded",
                                           "x-forwarded-client-cert", "keep-alive", "upgrade", ":path", "host"]),
                          st.sampled_from(["1", "x-a", "close, x-a", "keep-alive", "X-A , te", ""])), max_size=8))
def test_input_headers_follow_sanitise_inbound(headers):
    # build_input applies headers.sanitise_inbound's rules inside its merge loop; it must keep agreeing with them.
    from mesh_gateway.authz.input import _headers
    from mesh_gateway.headers import sanitise_inbound

    expected = {":authority": "gw", ":method": "GET", ":path": "/p", ":scheme": "https"}
    for name, value in sanitise_inbound(headers):
        if name in expected and not name.startswith(":"):
            expected[name] += ("; " if name == "cookie" else ",") + value
        else:
            expected[name] = value
    expected["x-request-id"] = "r"
    request = info(headers=tuple(headers), host="gw")
    merged = _headers(request, "/p", {"x-request-id": "r"})
    assert list(merged.items()) == list(expected.items())
