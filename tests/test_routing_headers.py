"""Table tests for the pure steps: route matching and header hygiene."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh_gateway.errors import NotFound
from mesh_gateway.headers import sanitise_inbound, strip_hop_by_hop, upstream_request_headers
from mesh_gateway.model import Endpoint, PeerCert, RequestInfo, Route, RouteMatch, RouteTable, SpiffeId
from mesh_gateway.routing import compile_routes, normalise_host


def info(path: str = "/", host: str = "example.com", method: str = "GET",
         headers: tuple[tuple[str, str], ...] = ()) -> RequestInfo:
    return RequestInfo(method=method, path=path, query="", host=host, scheme="https", headers=headers,
                       client_address="10.0.0.9", client_port=5555, request_id="rid")


TABLE = compile_routes(RouteTable((
    Route("exact-health", RouteMatch(path_kind="exact", path="/healthz"), "a"),
    Route("api-post", RouteMatch(host="api.example.com", path="/v1/", methods=frozenset({"POST"})), "b"),
    Route("wild", RouteMatch(host="*.example.com", path="/v1/"), "c"),
    Route("regex", RouteMatch(path_kind="regex", path=r"/users/\d+"), "d"),
    Route("canary", RouteMatch(path="/app", headers=(("x-canary", "1"),)), "e"),
    Route("app", RouteMatch(path="/app"), "f"),
)))


@pytest.mark.parametrize(("given_", "expected"), [
    (info("/healthz"), "exact-health"),
    (info("/healthz/x", host="other.org"), NotFound),
    (info("/v1/items", host="api.example.com", method="POST"), "api-post"),
    (info("/v1/items", host="API.example.com:8443", method="POST"), "api-post"),
    (info("/v1/items", host="api.example.com", method="GET"), "wild"),
    (info("/v1/items", host="example.com"), NotFound),
    (info("/users/42"), "regex"),
    (info("/users/42/edit"), NotFound),
    (info("/app/x", headers=(("x-canary", "1"),)), "canary"),
    (info("/app/x", headers=(("x-canary", "0"),)), "app"),
])
def test_first_matching_route_wins(given_: RequestInfo, expected: object) -> None:
    if expected is NotFound:
        with pytest.raises(NotFound):
            TABLE.match(given_)
    else:
        assert TABLE.match(given_).name == expected


@pytest.mark.parametrize(("given_", "expected"), [
    ("Example.COM:443", "example.com"), ("example.com.", "example.com"), ("[::1]:8443", "[::1]"), ("", ""),
])
def test_normalise_host(given_: str, expected: str) -> None:
    assert normalise_host(given_) == expected


def test_connection_listed_and_hop_by_hop_headers_are_dropped() -> None:
    headers = [("connection", "close, x-private"), ("x-private", "1"), ("keep-alive", "5"),
               ("transfer-encoding", "chunked"), ("upgrade", "h2c"), ("x-app", "kept")]
    assert strip_hop_by_hop(headers) == [("x-app", "kept")]


def test_spoofable_identity_headers_are_dropped() -> None:
    headers = [("x-forwarded-client-cert", "URI=spiffe://x/admin"), ("x-spiffe-id", "a"), ("forwarded", "for=1"),
               ("authorization", "Bearer t")]
    assert sanitise_inbound(headers) == [("authorization", "Bearer t")]


def test_upstream_headers_carry_gateway_built_identity_and_forwarding() -> None:
    gateway = SpiffeId.parse("spiffe://mesh.local/gw")
    client = SpiffeId.parse("spiffe://mesh.local/client")
    request = RequestInfo(method="GET", path="/", query="", host="h", scheme="https",
                          headers=(("x-forwarded-for", "1.2.3.4"), ("x-request-id", "keep-me")),
                          client_address="10.0.0.9", client_port=1, request_id="new", peer=PeerCert(client))
    out = dict(upstream_request_headers(request, gateway, add=(("X-Added", "1"),), remove=("x-request-id",)))
    assert out["x-forwarded-client-cert"] == "By=spiffe://mesh.local/gw;URI=spiffe://mesh.local/client"
    assert out["x-forwarded-for"] == "1.2.3.4, 10.0.0.9"
    assert out["x-forwarded-proto"] == "https"
    assert out["x-added"] == "1"
    assert out["x-request-id"] == "new"


@given(st.lists(st.tuples(st.sampled_from(["connection", "x-a", "te", "x-b", "upgrade"]),
                          st.text(alphabet="abcx-, ", max_size=12)), max_size=8))
def test_stripping_is_idempotent_and_never_keeps_hop_by_hop(headers: list[tuple[str, str]]) -> None:
    once = strip_hop_by_hop(headers)
    assert strip_hop_by_hop(once) == once
    assert not {name for name, _ in once} & {"connection", "te", "upgrade"}


@given(st.text(max_size=40))
def test_spiffe_parse_never_raises_anything_but_value_error(text: str) -> None:
    try:
        parsed = SpiffeId.parse(text)
    except ValueError:
        return
    assert str(parsed) == text


def _step_by_step(info: RequestInfo, gateway: SpiffeId, add: tuple[tuple[str, str], ...],
                  remove: tuple[str, ...]) -> list[tuple[str, str]]:
    """The rules of upstream_request_headers applied one at a time (it does them in one pass)."""
    removed = {name.lower() for name in remove} | {"content-length", "host", "x-forwarded-for", "x-request-id"}
    out = [(n, v) for n, v in sanitise_inbound(info.headers) if n not in removed]
    forwarded_for = info.header("x-forwarded-for")
    out += [("x-forwarded-for", f"{forwarded_for}, {info.client_address}" if forwarded_for else info.client_address),
            ("x-forwarded-proto", info.scheme), ("x-forwarded-host", info.host), ("x-request-id", info.request_id)]
    if info.peer_spiffe_id is not None:
        out.append(("x-forwarded-client-cert", f"By={gateway};URI={info.peer_spiffe_id}"))
    replaced = {n.lower() for n, _ in add}
    return [(n, v) for n, v in out if n not in replaced] + [(n.lower(), v) for n, v in add]


_NAMES = st.sampled_from(["connection", "x-a", "te", "x-b", "host", "content-length", "x-forwarded-for",
                          "x-request-id", "x-spiffe-id", "forwarded", "x-forwarded-proto", "keep-alive"])


@given(st.lists(st.tuples(_NAMES, st.text(alphabet="abx-, ", max_size=12)), max_size=8),
       st.lists(st.tuples(st.sampled_from(["X-A", "x-b", "X-Request-Id"]), st.text(max_size=3)), max_size=2),
       st.lists(st.sampled_from(["X-A", "te", "x-b"]), max_size=2), st.booleans())
def test_upstream_headers_in_one_pass_follow_the_rules_step_by_step(
        headers: list[tuple[str, str]], add: list[tuple[str, str]], remove: list[str], with_peer: bool) -> None:
    gateway = SpiffeId.parse("spiffe://mesh.local/gw")
    peer = PeerCert(SpiffeId.parse("spiffe://mesh.local/client")) if with_peer else None
    info = RequestInfo(method="GET", path="/", query="", host="h", scheme="https", headers=tuple(headers),
                       client_address="10.0.0.9", client_port=1, request_id="rid", peer=peer)
    assert upstream_request_headers(info, gateway, add=tuple(add), remove=tuple(remove)) == \
        _step_by_step(info, gateway, tuple(add), tuple(remove))


@pytest.mark.parametrize(("address", "key"), [("10.0.0.1", "10.0.0.1:8443"), ("::1", "[::1]:8443"),
                                              ("web.internal", "web.internal:8443")])
def test_endpoint_key_is_its_url_authority_and_not_part_of_its_identity(address: str, key: str) -> None:
    endpoint = Endpoint(address, 8443, tls="plain")
    assert endpoint.key == endpoint.authority == key
    same = Endpoint(address, 8443, tls="plain")
    assert endpoint == same and hash(endpoint) == hash(same)
