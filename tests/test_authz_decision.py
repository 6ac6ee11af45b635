"""Strict decision parsing, as OPA-Envoy does it: anything but a boolean or a well-formed object is an error."""

from __future__ import annotations

import pytest

from mesh_gateway.authz.decision import DecisionError, parse_decision
from mesh_gateway.model import Decision


@pytest.mark.parametrize(("value", "expected"), [
    (True, Decision(allowed=True)),
    (False, Decision(allowed=False)),
    ({"allowed": True}, Decision(allowed=True)),
    ({"allowed": False, "http_status": 401, "body": "login first",
      "response_headers_to_add": {"WWW-Authenticate": "Bearer"}},
     Decision(allowed=False, http_status=401, body="login first", response_headers_to_add=(("www-authenticate",
                                                                                            "Bearer"),))),
    ({"allowed": True, "headers": {"x-user": "alice", "x-groups": ["a", "b"]},
      "request_headers_to_remove": ["Authorization"]},
     Decision(allowed=True, headers=(("x-user", "alice"), ("x-groups", "a"), ("x-groups", "b")),
              request_headers_to_remove=("authorization",))),
    ({"allowed": False, "http_status": 429.0}, Decision(allowed=False, http_status=429)),
    ({"allowed": True, "dynamic_metadata": {"k": "v"}}, Decision(allowed=True)),
])
def test_valid_decisions(value, expected):
    assert parse_decision(value) == expected


@pytest.mark.parametrize("value", [
    None, "yes", "true", 1, 0, [], [True], {},
    {"allowed": "yes"}, {"allowed": 1}, {"allowed": None}, {"headers": {"x": "y"}},
    {"allowed": False, "http_status": "403"}, {"allowed": False, "http_status": True},
    {"allowed": False, "http_status": 99}, {"allowed": False, "http_status": 600},
    {"allowed": False, "http_status": 4.5},
    {"allowed": True, "headers": {"x-bad": "a\r\nset-cookie: x"}}, {"allowed": True, "headers": {"bad name": "v"}},
    {"allowed": True, "headers": {"x": 5}}, {"allowed": True, "headers": ["x", "y"]},
    {"allowed": True, "request_headers_to_remove": "authorization"}, {"allowed": False, "body": {"a": 1}},
])
def test_malformed_decisions_are_errors(value):
    with pytest.raises(DecisionError):
        parse_decision(value)

