"""The embedded engine is handed only the parts of the input its policies can read: decisions must not change."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import regorus

from mesh_gateway.authz.input_shape import input_shape, prune
from mesh_gateway.authz.rego import EmbeddedEngine, compile_source, read

REPO = Path(__file__).resolve().parent.parent
GOLDEN = json.loads((REPO / "tests/data/authz_input_golden.json").read_text())
DOCUMENTS = [json.loads(text) for text in GOLDEN.values()]


def shape_of(policy: str) -> Any:
    engine = regorus.Engine()
    engine.add_policy("p.rego", policy)
    return input_shape(engine.get_ast_as_json())


@pytest.mark.parametrize(("body", "expected"), [
    ('allow if input.attributes.request.http.method == "GET"',
     {"attributes": {"request": {"http": {"method": None}}}}),
    # A computed index keeps the whole object it indexes; literal brackets are fields.
    ('allow if { some k; input.attributes.request.http.headers[k] == "x" }',
     {"attributes": {"request": {"http": {"headers": None}}}}),
    ('allow if input.attributes.request.http.headers["x-user"] == "a"',
     {"attributes": {"request": {"http": {"headers": {"x-user": None}}}}}),
    ('allow if input.parsed_path[0] == "api"', {"parsed_path": None}),
    # The longest static path wins over its prefixes only when the prefix is never read on its own.
    ('allow if { input.attributes.source.principal; count(input.attributes.source) > 0 }',
     {"attributes": {"source": None}}),
])
def test_the_shape_keeps_every_path_the_policy_can_reach(body, expected):
    assert shape_of(f"package p\nimport rego.v1\n{body}\n") == expected


def test_imported_aliases_are_followed():
    policy = ("package p\nimport rego.v1\nimport input.attributes.request.http as req\nimport input.parsed_query\n"
              'allow if { req.method == "GET"; parsed_query.a[0] == "1" }\n')
    assert shape_of(policy) == {"attributes": {"request": {"http": {"method": None}}}, "parsed_query": {"a": None}}


@pytest.mark.parametrize("body", [
    "allow if { x := input; x.attributes }",
    'allow if object.get(input, ["attributes"], null) != null',
    "allow if { data.p.f with input as {} }\nf if true",
    "allow if { walk(input, [p, v]); v == 1 }",
    "allow if { some k; input[k] }",
])
def test_anything_that_reads_the_input_as_a_whole_keeps_all_of_it(body):
    assert shape_of(f"package p\nimport rego.v1\n{body}\n") is None


@pytest.mark.parametrize("policy_dir", ["policies", "mesh_gateway/demo/policies", "deploy/compose/policies"])
def test_shipped_policies_decide_the_same_on_the_pruned_input(policy_dir):
    engine = compile_source(read(REPO / policy_dir))  # as the gateway builds it: JWT built-ins, data, no tests
    shape = input_shape(engine.get_ast_as_json())
    assert shape is not None  # the shipped policies read a few fields: the pruning applies to them
    packages = {package.removeprefix("data.") for package in engine.get_packages()}
    for document in DOCUMENTS:
        decisions = []
        for given in (document, prune(document, shape)):
            engine.set_input(given)
            decisions.append({package: engine.eval_query(f"data.{package}") for package in packages})
        assert decisions[0] == decisions[1]


async def test_the_engine_prunes_with_the_shape_of_the_set_it_serves(tmp_path):
    policy = tmp_path / "p.rego"
    policy.write_text('package p\nimport rego.v1\nseen := input\nallow if input.version.ext_authz == "v3"\n')
    engine = EmbeddedEngine(tmp_path, probe_queries=("data.p.allow",))
    engine.load()
    assert engine.state.get().input_shape is None  # `seen := input` reads it all
    assert engine.evaluate_sync("data.p.seen", DOCUMENTS[0]) == DOCUMENTS[0]

    policy.write_text('package p\nimport rego.v1\nseen := input.version\nallow if input.version.ext_authz == "v3"\n')
    assert await engine.reload()
    assert engine.state.get().input_shape == {"version": None}
    assert engine.evaluate_sync("data.p.seen", DOCUMENTS[0]) == DOCUMENTS[0]["version"]
    assert engine.evaluate_sync("data.p.allow", DOCUMENTS[0]) is True
