"""Exact decision memo for the embedded engine: the same pruned input, under the same policy revision, gets the
value regorus gave last time, without evaluating again.

Exact, not approximate: the key is every value the policy set can read (authz/input_shape.py), so only a set
whose result depends on nothing else may use it. `deterministic` checks that from the AST: every function the
set calls is its own (a rule, or `data...`) or a built-in on the list below, whose result depends only on its
arguments. A clock (`time.now_ns`, `io.jwt.decode_verify`, which checks `exp`), randomness, the network or
`print` anywhere in the set turns the memo off, and so does a shape that keeps a per-request-unique field (the
request's time or id, the whole header map), where it would never hit. Errors are never remembered.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

from mesh_gateway.authz.input_shape import Shape, ref_parts

# Built-ins whose result is a function of their arguments alone (OPA's names; regorus implements these).
PURE_BUILTINS = frozenset({
    "abs", "all", "any", "array.concat", "array.reverse", "array.slice", "base64.decode", "base64.encode",
    "base64.is_valid", "base64url.decode", "base64url.encode", "base64url.encode_no_pad", "ceil", "concat",
    "contains", "count", "endswith", "floor", "format_int", "glob.match", "glob.quote_meta", "hex.decode",
    "hex.encode", "indexof", "indexof_n", "intersection", "io.jwt.decode", "io.jwt.verify_es256",
    "io.jwt.verify_es384", "io.jwt.verify_es512", "io.jwt.verify_hs256", "io.jwt.verify_hs384",
    "io.jwt.verify_hs512", "io.jwt.verify_ps256", "io.jwt.verify_ps384", "io.jwt.verify_ps512",
    "io.jwt.verify_rs256", "io.jwt.verify_rs384", "io.jwt.verify_rs512", "is_array", "is_boolean", "is_null",
    "is_number", "is_object", "is_set", "is_string", "json.is_valid", "json.marshal", "json.unmarshal", "lower",
    "max", "min", "net.cidr_contains", "net.cidr_intersects", "numbers.range", "object.filter", "object.get",
    "object.keys", "object.remove", "object.subset", "object.union", "object.union_n", "product", "regex.find_n",
    "regex.is_valid", "regex.match", "regex.split", "replace", "round", "semver.compare", "semver.is_valid", "sort",
    "split", "sprintf", "startswith", "strings.any_prefix_match", "strings.any_suffix_match", "strings.count",
    "strings.replace_n", "strings.reverse", "substring", "sum", "to_number", "trim", "trim_left", "trim_prefix",
    "trim_right", "trim_space", "trim_suffix", "type_name", "union", "units.parse", "units.parse_bytes", "upper",
    "urlquery.decode", "urlquery.encode", "walk",
})
# Input fields that differ on every request: a memo keyed on them would only grow.
_UNIQUE = (("attributes", "request", "time"), ("attributes", "request", "http", "id"),
           ("attributes", "request", "http", "headers"))
MAX_ENTRIES = 4096
MAX_KEY_CHARS = 1024


def deterministic(ast_json: str, shape: Shape | None) -> bool:
    """Whether decisions of the set can be memoised by the pruned input (see the module docstring)."""
    if shape is None or any(_keeps(shape, path) for path in _UNIQUE):
        return False
    try:
        modules = json.loads(ast_json)
        own: set[str] = set()
        calls: set[str] = set()
        for module in modules:
            ast = module["ast"]
            aliases = {_dotted(item["refr"]).split(".")[-1] for item in ast.get("imports") or []}
            package = _dotted(ast["package"]["refr"])
            for rule in ast.get("rules") or []:
                head = rule.get("Spec", {}).get("head", {})
                for form in head.values():
                    if isinstance(form, dict) and "refr" in form:
                        name = _dotted(form["refr"])
                        own.update({name, f"{package}.{name}", f"data.{package}.{name}"})
            _calls(ast.get("rules") or [], calls)
            own.update(aliases)
    except (KeyError, TypeError, ValueError, AttributeError):
        return False
    return all(name in PURE_BUILTINS or name in own or name.startswith("data.") or name.split(".")[0] in own
               for name in calls)


class DecisionMemo:
    """Bounded, least-recently-used; one per policy revision (a reload starts an empty one)."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self._entries: OrderedDict[tuple[str, Any], Any] = OrderedDict()
        self._max = max_entries

    def get(self, key: tuple[str, Any]) -> tuple[bool, Any]:
        try:
            value = self._entries[key]
        except KeyError:
            return False, None
        self._entries.move_to_end(key)
        return True, value

    def put(self, key: tuple[str, Any], value: Any) -> None:
        self._entries[key] = value
        if len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


def freeze(value: Any, budget: int = MAX_KEY_CHARS) -> Any:
    """A hashable key equal only for equal Rego values — types are kept apart (Python's True == 1 is not Rego's) —
    or None when the value holds more than `budget` characters of text: a client sending long unique paths must
    not be able to fill memory with keys (the memo holds at most MAX_ENTRIES keys of MAX_KEY_CHARS)."""
    left = [budget]
    key = _freeze(value, left)
    return key if left[0] >= 0 else None


def _freeze(value: Any, left: list[int]) -> Any:
    if isinstance(value, dict):
        left[0] -= len(value)
        return ("o", tuple(sorted((key, _freeze(item, left)) for key, item in value.items())))
    if isinstance(value, list):
        left[0] -= len(value)
        return ("a", tuple(_freeze(item, left) for item in value))
    if isinstance(value, str):
        left[0] -= len(value)
    return (type(value).__name__, value)


def _keeps(shape: Shape, path: tuple[str, ...]) -> bool:
    node: Shape | None = shape
    for key in path:
        if node is None:
            return True
        if key not in node:
            return False
        node = node[key]
    return True


def _dotted(node: Any) -> str:
    return ".".join(ref_parts(node))


def _calls(node: Any, out: set[str]) -> None:
    if isinstance(node, list):
        for item in node:
            _calls(item, out)
    elif isinstance(node, dict):
        call = node.get("Call") if len(node) == 1 else None
        if isinstance(call, dict):
            try:
                out.add(_dotted(call["fcn"]))
            except ValueError:
                out.add("<computed>")  # never on the list: no memo
        for value in node.values():
            _calls(value, out)
