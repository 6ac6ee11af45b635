"""ResilientForwarder's timeouts with a scripted inner forwarder: the route's overall timeout answers 504 and is never
retried nor counted against the endpoint; a per-try timeout counts against the endpoint and moves on to another."""

from __future__ import annotations

import asyncio

import pytest

from mesh_gateway.config import Resilience
from mesh_gateway.errors import UpstreamTimeout
from mesh_gateway.model import Catalog, Endpoint, EndpointSet, RequestInfo, Response, Route, RouteMatch, RoutePolicy
from mesh_gateway.pipeline import Exchange, UpstreamRequest
from mesh_gateway.upstream.balancing import HealthAwarePicker
from mesh_gateway.upstream.circuit import Circuits
from mesh_gateway.upstream.outlier import OutlierDetector
from mesh_gateway.upstream.retry import ResilientForwarder
from mesh_gateway.watch import Watch

SLOW = Endpoint("127.0.0.1", 1001, tls="plain")
FAST = Endpoint("127.0.0.1", 1002, tls="plain")


class Scripted:
    """Answers 200 at once, except from endpoints listed in `hang`, which never answer."""

    def __init__(self, hang: set[str]) -> None:
        self.hang = hang
        self.calls: list[str] = []

    async def forward(self, request: UpstreamRequest, endpoint: Endpoint, route: Route,
                      exchange: Exchange) -> Response:
        self.calls.append(endpoint.key)
        if endpoint.key in self.hang:
            await asyncio.Event().wait()
        return Response(200, [], b"ok", endpoint.key)


def setup(hang: set[str], *, timeout_s: float, per_try_timeout_s: float | None,
          retries: int = 1) -> tuple[ResilientForwarder, Scripted, OutlierDetector, Route]:
    settings = Resilience(retry_backoff_s=0.001)
    outlier = OutlierDetector(settings.outlier)
    catalog = Watch(Catalog({"web": EndpointSet("web", (SLOW, FAST))}))
    inner = Scripted(hang)
    forwarder = ResilientForwarder(inner, picker=HealthAwarePicker(settings, outlier), outlier=outlier,
                                   circuits=Circuits(settings), catalog=catalog, settings=settings)
    policy = RoutePolicy(timeout_s=timeout_s, per_try_timeout_s=per_try_timeout_s, retries=retries)
    return forwarder, inner, outlier, Route("web", RouteMatch(), "web", policy)


async def call(forwarder: ResilientForwarder, route: Route) -> tuple[Response, Exchange]:
    info = RequestInfo(method="GET", path="/", query="", host="web", scheme="https", headers=(),
                       client_address="127.0.0.1", client_port=1, request_id="r")
    exchange = Exchange(info=info)
    request = UpstreamRequest(method="GET", target="/", headers=[], body=None, host="web")
    return await forwarder.forward(request, SLOW, route, exchange), exchange


async def test_route_timeout_is_a_504_not_retried_and_not_counted_against_the_endpoint():
    forwarder, inner, outlier, route = setup({SLOW.key, FAST.key}, timeout_s=0.05, per_try_timeout_s=None)
    with pytest.raises(UpstreamTimeout, match=r"web: no response within 0\.05s") as caught:
        await call(forwarder, route)
    assert caught.value.status == 504
    assert inner.calls == [SLOW.key]
    assert outlier.view("web", SLOW).consecutive_failures == 0


async def test_per_try_timeout_counts_against_the_endpoint_and_retries_elsewhere():
    forwarder, inner, outlier, route = setup({SLOW.key}, timeout_s=5, per_try_timeout_s=0.05)
    response, exchange = await call(forwarder, route)
    assert (response.status, response.upstream_endpoint, exchange.retries) == (200, FAST.key, 1)
    assert inner.calls == [SLOW.key, FAST.key]
    assert outlier.view("web", SLOW).consecutive_failures == 1


async def test_per_try_timeout_on_the_last_try_is_a_504():
    forwarder, _, outlier, route = setup({SLOW.key}, timeout_s=5, per_try_timeout_s=0.05, retries=0)
    with pytest.raises(UpstreamTimeout, match="per-try timeout"):
        await call(forwarder, route)
    assert outlier.view("web", SLOW).consecutive_failures == 1


async def test_route_timeout_ends_a_retry_whose_per_try_limit_is_longer():
    # The first try ends at 0.4 s (its own limit), the second would run to 0.8 s but the route's deadline is 0.6 s.
    forwarder, inner, outlier, route = setup({SLOW.key, FAST.key}, timeout_s=0.6, per_try_timeout_s=0.4)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(UpstreamTimeout, match=r"web: no response within 0\.6s"):
        await call(forwarder, route)
    assert loop.time() - started < 2
    assert inner.calls == [SLOW.key, FAST.key]
    # The first try hit its own limit; the second was cut by the route's deadline, which is not the endpoint's fault.
    assert outlier.view("web", SLOW).consecutive_failures == 1
    assert outlier.view("web", FAST).consecutive_failures == 0
