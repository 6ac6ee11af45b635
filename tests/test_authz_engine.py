"""The embedded regorus engine: loading rules, validation, hot reload, threading; and the `policy` CLI."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from mesh_gateway.authz.policyset import PolicyError, read
from mesh_gateway.authz.rego import EmbeddedEngine, EngineError
from mesh_gateway.cli import main

SHIPPED = Path(__file__).resolve().parent.parent / "policies"
CLIENT = "spiffe://mesh.local/ns/default/sa/client"


def request(principal: str = CLIENT, method: str = "GET", path: tuple[str, ...] = ("api",)) -> dict[str, object]:
    return {"attributes": {"source": {"principal": principal}, "request": {"http": {"method": method, "headers": {}}}},
            "parsed_path": list(path)}


@pytest.fixture
def policies(tmp_path: Path) -> Path:
    target = tmp_path / "policies"
    shutil.copytree(SHIPPED, target)
    return target


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


async def test_shipped_policy_loads_and_decides(policies):
    engine = EmbeddedEngine(policies, probe_queries=("data.envoy.authz.allow",))
    state = engine.load()
    assert len(state.revision) == 16 and state.files == 2  # authz.rego + data.json; tests are not served
    assert engine.evaluate_sync("data.envoy.authz.allow", request()) is True
    assert engine.evaluate_sync("data.envoy.authz.allow", request(method="DELETE")) is False
    assert engine.evaluate_sync("data.envoy.authz.result", request())["headers"] == {"x-authz-principal": CLIENT}


def test_revision_names_the_whole_set(policies):
    first = read(policies).revision
    assert read(policies).revision == first
    write(policies / "extra" / "data.json", '{"x": 1}')
    assert read(policies).revision != first


async def test_data_files_land_at_their_directory_path(tmp_path):
    write(tmp_path / "p.rego", "package p\n\nimport rego.v1\n\nv := [data.top, data.teams.a, data.teams.b.c]\n")
    write(tmp_path / "data.json", '{"top": 1}')
    write(tmp_path / "teams" / "data.yaml", "a: 2\n")
    write(tmp_path / "teams" / "b" / "whatever.json", '{"c": 3}')
    write(tmp_path / ".hidden" / "data.json", '{"top": 99}')
    engine = EmbeddedEngine(tmp_path)
    engine.load()
    assert engine.evaluate_sync("data.p.v", {}) == [1, 2, 3]


@pytest.mark.parametrize(("files", "message"), [
    ({"p.rego": "package p\n\nallow if {"}, "p.rego"),
    ({"p.rego": "package p\n\nallow if { unknown_function(1) }"}, "unknown_function"),
    ({"p.rego": "package p\n\nallow if { input.x == y }"}, "`y` is unsafe"),
    ({"p.rego": "package p\n\nallow := 1\n\nallow := 2\n"}, "conflict"),
    ({"p.rego": "package p\n\nallow := true", "data.json": '{"a": 1}', "x/data.json": "[1"}, "x/data.json"),
    ({"p.rego": "package p\n\nallow := true", "a.json": '{"k": 1}', "b.json": '{"k": 2}'}, "data"),
    ({"p.rego": "package other\n\nallow := true"}, "rule path"),
    ({"readme.txt": "no policies"}, "no .rego files"),
])
async def test_broken_sets_are_rejected_with_the_reason(tmp_path, files, message):
    for name, text in files.items():
        write(tmp_path / name, text)
    engine = EmbeddedEngine(tmp_path, probe_queries=("data.p.allow",))
    with pytest.raises(PolicyError, match=message):
        engine.load()


async def test_reload_swaps_valid_sets_and_rejects_broken_ones_whole(policies):
    engine = EmbeddedEngine(policies, probe_queries=("data.envoy.authz.allow",))
    first = engine.load().revision
    data = json.loads((policies / "data.json").read_text())
    data["mesh"]["grants"].append({"principal": CLIENT, "methods": ["DELETE"], "prefixes": ["/api"]})
    (policies / "data.json").write_text(json.dumps(data))
    assert await engine.reload() is True
    second = engine.revision
    assert second != first
    assert engine.evaluate_sync("data.envoy.authz.allow", request(method="DELETE")) is True
    # A broken module next to a valid data change: nothing of the new set is taken.
    data["mesh"]["grants"] = []
    (policies / "data.json").write_text(json.dumps(data))
    write(policies / "broken.rego", "package envoy.authz\n\nallow if { nope( }\n")
    assert await engine.reload() is False
    state = engine.state.get()
    assert state.revision == second and "broken.rego" in state.last_error
    assert engine.evaluate_sync("data.envoy.authz.allow", request(method="DELETE")) is True
    (policies / "broken.rego").unlink()
    assert await engine.reload() is True
    assert engine.state.get().last_error == ""
    assert engine.evaluate_sync("data.envoy.authz.allow", request()) is False  # grants are now empty


async def test_watcher_picks_up_a_change_without_being_asked(policies):
    engine = EmbeddedEngine(policies, poll_s=0.05)
    first = engine.load().revision
    task = asyncio.get_running_loop().create_task(engine.watch())
    try:
        write(policies / "extra" / "data.json", '{"flag": true}')
        write(policies / "more.rego", "package more\n\nflag := data.extra.flag\n")

        def flag() -> object:
            try:
                return engine.evaluate_sync("data.more.flag", {})
            except EngineError:
                return None  # the watcher has not seen more.rego yet

        deadline = time.monotonic() + 5
        while flag() is not True and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert flag() is True
        assert engine.revision != first
    finally:
        task.cancel()


async def test_engine_refuses_foreign_threads_instead_of_panicking(policies):
    engine = EmbeddedEngine(policies)
    engine.load()
    errors: list[BaseException] = []

    def use() -> None:
        try:
            engine.evaluate_sync("data.envoy.authz.allow", request())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=use)
    thread.start()
    thread.join(10)
    assert len(errors) == 1 and isinstance(errors[0], EngineError)
    assert engine.evaluate_sync("data.envoy.authz.allow", request()) is True  # still usable on its own thread


async def test_runtime_errors_become_engine_errors(tmp_path):
    write(tmp_path / "p.rego", "package p\n\nimport rego.v1\n\nallow if { 1 / input.zero > 0 }\n")
    engine = EmbeddedEngine(tmp_path)
    engine.load()
    with pytest.raises(EngineError):
        engine.evaluate_sync("data.p.allow", {"zero": 0})


V0_POLICY = "package p\n\ndefault allow = false\n\nallow { input.method == \"GET\" }\n"


async def test_rego_v0_policies_need_v0_mode(tmp_path):
    write(tmp_path / "p.rego", V0_POLICY)
    with pytest.raises(PolicyError):
        EmbeddedEngine(tmp_path).load()
    engine = EmbeddedEngine(tmp_path, rego_v0=True)
    engine.load()
    assert engine.evaluate_sync("data.p.allow", {"method": "GET"}) is True


def test_policy_test_runs_the_shipped_tests(capsys):
    assert main(["policy", "test", str(SHIPPED), "-v"]) == 0
    out = capsys.readouterr().out
    assert "data.envoy.authz_test.test_admin_with_admin_token: PASS" in out
    assert out.rstrip().endswith("PASS: 16/16")


def test_policy_test_fails_on_a_failing_or_erroring_test(tmp_path, capsys):
    write(tmp_path / "p.rego", "package p\n\nimport rego.v1\n\nallow if input.ok\n")
    write(tmp_path / "p_test.rego", "package p_test\n\nimport rego.v1\n\nimport data.p\n\n"
          "test_ok if p.allow with input as {\"ok\": true}\n\n"
          "test_wrong if p.allow with input as {\"ok\": false}\n\n"
          "test_error if { 1 / 0 }\n")
    assert main(["policy", "test", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "data.p_test.test_wrong: FAIL" in out
    assert "data.p_test.test_error: ERROR" in out
    assert "test_ok" not in out  # passing tests are listed only with -v
    assert "PASS: 1/3" in out and "FAIL: 2/3" in out


def test_policy_eval_prints_the_decision(tmp_path, capsys):
    document = tmp_path / "input.json"
    document.write_text(json.dumps(request(method="DELETE")))
    assert main(["policy", "eval", "--input", str(document), "--query", "envoy/authz/result", str(SHIPPED)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["query"] == "data.envoy.authz.result"
    assert out["decision"]["allowed"] is False and out["decision"]["http_status"] == 403
    document.write_text(json.dumps({"attributes": {}}))
    assert main(["policy", "eval", "--input", str(document), "--query", "envoy.authz.missing", str(SHIPPED)]) == 1
    assert "error" in json.loads(capsys.readouterr().out)
