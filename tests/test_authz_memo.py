"""Decisions remembered by the input fields a policy reads: only for sets whose results depend on nothing else."""

from __future__ import annotations

import pytest
import regorus

from mesh_gateway.authz.input_shape import input_shape
from mesh_gateway.authz.memo import DecisionMemo, deterministic, freeze
from mesh_gateway.authz.rego import EmbeddedEngine
from tests.test_authz_input_shape import DOCUMENTS, REPO


def verdict(policy: str) -> bool:
    engine = regorus.Engine()
    engine.add_policy("p.rego", policy)
    ast = engine.get_ast_as_json()
    return deterministic(ast, input_shape(ast))


@pytest.mark.parametrize("body", [
    'allow if startswith(input.attributes.request.http.path, "/api")',
    'allow if { f(input.attributes.source.principal) }\nf(p) if endswith(lower(p), "/client")',
    'allow if { some g in data.grants; g == input.attributes.source.principal }',
])
def test_sets_that_depend_only_on_their_input_are_memoised(body):
    assert verdict(f"package p\nimport rego.v1\n{body}\n")


@pytest.mark.parametrize("body", [
    "allow if time.now_ns() > 0",  # the clock
    'allow if { [_, p, _] := io.jwt.decode_verify(input.attributes.request.http.headers.authorization, {}); p }',
    "allow if rand.intn(\"x\", 10) > 5",
    'allow if { print("x"); input.parsed_path }',
    # Fields that differ on every request: nothing would ever hit.
    "allow if input.attributes.request.time",
    'allow if input.attributes.request.http.headers["x"] == "y"',
    "allow if count(input.attributes.request.http.headers) > 0",
    "allow if { x := input; x }",
])
def test_sets_with_anything_else_in_their_results_are_not(body):
    assert not verdict(f"package p\nimport rego.v1\n{body}\n")


def test_the_shipped_policy_verifies_jwts_against_the_clock_so_it_is_not_memoised():
    engine = EmbeddedEngine(REPO / "policies")
    engine.load()
    assert engine.state.get().memo is None


def test_keys_tell_rego_values_apart_that_python_would_not():
    assert freeze({"a": True}) != freeze({"a": 1})
    assert freeze({"a": [1, 2]}) != freeze({"a": [2, 1]})
    assert freeze({"a": 1, "b": 2}) == freeze({"b": 2, "a": 1})  # objects are unordered


def test_inputs_with_long_text_are_not_remembered():
    assert freeze({"parsed_path": ["x" * 2000]}) is None
    assert freeze({"parsed_path": ["x" * 200]}) is not None


def test_the_memo_is_bounded_and_forgets_the_least_recently_used():
    memo = DecisionMemo(max_entries=2)
    memo.put(("q", 1), True)
    memo.put(("q", 2), False)
    assert memo.get(("q", 1)) == (True, True)
    memo.put(("q", 3), True)
    assert memo.get(("q", 2)) == (False, None) and len(memo) == 2


async def test_remembered_results_are_the_engines_and_a_reload_forgets_them(tmp_path):
    policy = tmp_path / "p.rego"
    policy.write_text('package p\nimport rego.v1\ndefault allow := false\n'
                      'allow if input.attributes.request.http.method == "GET"\n')
    engine = EmbeddedEngine(tmp_path, probe_queries=("data.p.allow",))
    engine.load()
    memo = engine.state.get().memo
    assert memo is not None
    fresh = {doc["attributes"]["request"]["http"]["method"]: doc for doc in DOCUMENTS}
    assert {"GET", "POST"} <= set(fresh)
    for _ in range(2):  # the second round is answered from the memo
        for method, doc in fresh.items():
            assert engine.evaluate_sync("data.p.allow", doc) is (method == "GET")
    assert len(memo) == len(fresh)

    policy.write_text('package p\nimport rego.v1\ndefault allow := false\n'
                      'allow if input.attributes.request.http.method == "POST"\n')
    assert await engine.reload()
    for method, doc in fresh.items():
        assert engine.evaluate_sync("data.p.allow", doc) is (method == "POST")

