"""`mesh-gateway policy test [DIR]` and `mesh-gateway policy eval --input FILE [--query Q] [DIR]`.

`test` works like `opa test`: every rule named `test_*` in every loaded package (including `*_test.rego`) is
evaluated; true passes, anything else fails; one line per test, a summary, exit 1 when any test fails or errors.
`eval` evaluates a decision query for an input document exactly as the gateway would and prints the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mesh_gateway.authz.decision import DecisionError, parse_decision
from mesh_gateway.authz.input_shape import ref_parts
from mesh_gateway.authz.policyset import PolicyError, read
from mesh_gateway.authz.rego import EngineError, compile_source, short_error
from mesh_gateway.config import normalise_query

EXIT_FAILED = 1
EXIT_UNUSABLE = 2


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser("policy", help="test and evaluate Rego policies")
    commands = parser.add_subparsers(dest="policy_command", required=True, metavar="SUBCOMMAND")
    test = commands.add_parser("test", help="run every test_* rule (like `opa test`)")
    test.add_argument("directory", nargs="?", type=Path, default=Path("policies"))
    test.add_argument("--v0-compatible", action="store_true", help="parse policies as Rego v0")
    test.add_argument("-v", "--verbose", action="store_true", help="also list passing tests")
    test.set_defaults(handler=handle_test)
    evaluate = commands.add_parser("eval", help="evaluate the decision for one input document")
    evaluate.add_argument("directory", nargs="?", type=Path, default=Path("policies"))
    evaluate.add_argument("--input", type=Path, required=True, help="JSON file holding the input document")
    evaluate.add_argument("--query", default="data.envoy.authz.allow", help="decision rule (default %(default)s)")
    evaluate.add_argument("--v0-compatible", action="store_true", help="parse policies as Rego v0")
    evaluate.set_defaults(handler=handle_eval)


def discover_tests(engine: Any) -> list[tuple[str, str]]:
    """(file, data.pkg.test_name) for every test rule, in file order, each once."""
    found: dict[str, str] = {}
    for module in json.loads(engine.get_ast_as_json()):
        package = "data." + ".".join(ref_parts(module["ast"]["package"]["refr"]))
        for rule in module["ast"]["rules"]:
            head = rule.get("Spec", {}).get("head", {})
            ref = head.get("Compr", {}).get("refr", {})
            name = ref.get("Var", {}).get("value", "")
            if name.startswith("test_"):
                found.setdefault(f"{package}.{name}", module["source"]["file"])
    return [(file, rule) for rule, file in found.items()]


def handle_test(args: argparse.Namespace) -> int:
    try:
        source = read(args.directory)
        engine = compile_source(source, rego_v0=args.v0_compatible, include_tests=True, validate=False)
    except PolicyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    tests = discover_tests(engine)
    if not tests:
        print(f"no tests found in {args.directory}", file=sys.stderr)
        return EXIT_FAILED
    passed = 0
    current_file = ""
    for file, rule in tests:
        started = time.perf_counter()
        try:
            outcome = "PASS" if engine.eval_rule(rule) is True else "FAIL"
            detail = ""
        except RuntimeError as exc:
            outcome, detail = "ERROR", short_error(exc)
        took = (time.perf_counter() - started) * 1000
        passed += outcome == "PASS"
        if outcome != "PASS" or args.verbose:
            if file != current_file:
                print(f"{file}:")
                current_file = file
            print(f"{rule}: {outcome} ({took:.1f}ms){' ' + detail if detail else ''}")
    print("-" * 80)
    failed = len(tests) - passed
    print(f"PASS: {passed}/{len(tests)}" + (f"\nFAIL: {failed}/{len(tests)}" if failed else ""))
    return 0 if failed == 0 else EXIT_FAILED


def _jsonable(value: Any) -> Any:
    if isinstance(value, set | frozenset):
        return sorted(value, key=json.dumps)
    raise TypeError(f"not JSON: {type(value).__name__}")


def handle_eval(args: argparse.Namespace) -> int:
    try:
        query = normalise_query(args.query)
        document = json.loads(args.input.read_text())
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    try:
        engine = compile_source(read(args.directory), rego_v0=args.v0_compatible)
    except PolicyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    out: dict[str, Any] = {"query": query}
    try:
        engine.set_input(document)
        value = engine.eval_rule(query)
        out["result"] = value
        decision = parse_decision(value)
        out["decision"] = {k: v for k, v in asdict(decision).items()
                           if k not in ("decision_id", "policy_revision", "engine", "dry_run")}
        status = 0
    except (RuntimeError, EngineError, DecisionError) as exc:
        out["error"] = short_error(exc) if isinstance(exc, RuntimeError) else str(exc)
        status = EXIT_FAILED
    print(json.dumps(out, indent=2, default=_jsonable))
    return status
