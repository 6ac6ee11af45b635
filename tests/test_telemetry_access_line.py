"""The hand-written access-log line is exactly what json.dumps of the record would write, for any input."""

from __future__ import annotations

import datetime as dt
import json
import random
from typing import Any

import pytest

from mesh_gateway.errors import UpstreamUnavailable
from mesh_gateway.model import Decision, Endpoint, PeerCert, RequestInfo, Route, RouteMatch, SpiffeId
from mesh_gateway.pipeline import Exchange
from mesh_gateway.stamps import UtcStamps
from mesh_gateway.telemetry.logs import access_line

HOSTILE = ['/x"\n{"status":1}', "\\", "\u2028\u2029", "é😀", "\x00\x1f\x7f", "</script>", "", "'"]


class Span:
    def __init__(self, trace_id: str, span_id: str) -> None:
        self.trace_id = trace_id
        self.span_id = span_id


def reference(exchange: Exchange, duration_s: float, stamp: str, include_query: bool) -> str:
    """The record as it was written before the hand-written line: a dict through json.dumps."""
    info = exchange.info
    record: dict[str, Any] = {
        "time": stamp, "request_id": info.request_id, "trace_id": exchange.span.trace_id or None,
        "span_id": exchange.span.span_id or None, "listener": info.listener, "client": info.client_address,
        "peer": str(info.peer_spiffe_id) if info.peer_spiffe_id else None, "method": info.method,
        "host": info.host, "path": info.path, "protocol": info.protocol,
        "route": exchange.route.name if exchange.route else None,
        "upstream": exchange.endpoint.key if exchange.endpoint else None, "status": exchange.status,
        "bytes_in": exchange.bytes_in, "bytes_out": exchange.bytes_out, "duration_ms": round(duration_s * 1000, 3),
        "decision_id": (exchange.decision.decision_id or None) if exchange.decision else None,
        "error": exchange.error.kind if exchange.error else None,
    }
    if include_query:
        record["query"] = info.query
    return json.dumps(record, separators=(",", ":"), ensure_ascii=True)


def exchanges() -> list[Exchange]:
    out = []
    for text in HOSTILE:
        info = RequestInfo(method="GET", path=text, query=text, host=text, scheme="https", headers=(),
                           client_address="::1", client_port=1, request_id=text, listener=text)
        out.append(Exchange(info, span=Span("", "")))
    info = RequestInfo(method="POST", path="/orders/7", query="a=1&b=%22", host="shop.example:8443",
                       scheme="https", headers=(), client_address="10.0.0.9", client_port=5000, request_id="req-1",
                       listener="public", peer=PeerCert(SpiffeId.parse("spiffe://mesh.local/sa/client")))
    out.append(Exchange(info, span=Span("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"),
                        route=Route('or"ders', RouteMatch(path="/orders"), "orders-svc"), status=502,
                        endpoint=Endpoint("fe80::1", 8443, SpiffeId.parse("spiffe://mesh.local/sa/orders")),
                        decision=Decision(allowed=True, decision_id="dec-9"), error=UpstreamUnavailable("down"),
                        bytes_in=10**12, bytes_out=3, retries=2))
    out.append(Exchange(info, decision=Decision(allowed=False)))  # a decision without an id: null, as before
    return out


@pytest.mark.parametrize("include_query", [False, True])
@pytest.mark.parametrize("duration_s", [0.0, 0.0123456, 1e-9, 12345.6789, 0.1 + 0.2])
def test_line_is_byte_for_byte_json_dumps_of_the_record(include_query: bool, duration_s: float):
    for exchange in exchanges():
        line = access_line(exchange, duration_s, stamp="2023-11-14T22:13:20.500Z", include_query=include_query)
        assert line == reference(exchange, duration_s, "2023-11-14T22:13:20.500Z", include_query)
        assert line.isascii() and "\n" not in line
        assert json.loads(line)["path"] == exchange.info.path


def test_stamps_match_datetime_isoformat_including_rounding_at_the_edges():
    stamps = UtcStamps()
    rng = random.Random(7)
    base = 1_700_000_000.0
    values = [base, base + 0.5, base + 0.9995, base + 0.9999995, base + 0.9999996, base + 0.0004999, 0.0,
              1_000_000.0004995, 4_102_444_799.9999999]
    values += [base + rng.random() * 86_400 * 3 for _ in range(20_000)]
    values += sorted(base + rng.random() * 5 for _ in range(2_000))  # many in the same second: the cached prefix
    for now in values:
        expected = dt.datetime.fromtimestamp(now, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        assert stamps(now) == expected, now
