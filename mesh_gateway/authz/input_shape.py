"""Which parts of the input document a policy set can read, from its AST, so the embedded engine is handed only those.

Handing regorus the whole OPA-Envoy document costs ~15 µs per decision (`set_input` converts every node); the
two fields a typical policy reads, ~6 µs. The analysis is conservative: every place `input` (or an alias made by
`import input...`) occurs is found by walking the whole AST, and each occurrence keeps the subtree at the longest
*static* path in front of it — `input.a.b`, `input["a"].b`; a computed index (`input.a[k]`, `input.a[0]`) keeps
all of `a`. Any bare `input` (`x := input`, `with input as`, `walk(input)`, `object.get(input, ...)`) keeps the
whole document, and so does an AST this module does not understand. A policy can therefore never observe a
difference: every value it can reach is the value the full document has there.
"""

from __future__ import annotations

import json
from typing import Any

Shape = dict[str, "Shape | None"]
"""A tree of kept keys; None under a key keeps that key's whole subtree."""

_LITERAL_KEYS = ("String", "RawString")


class _Unknown(Exception):
    """The AST has a form the analysis does not follow: keep the whole input."""


def input_shape(ast_json: str) -> Shape | None:
    """The shape of the input the policy set (regorus `get_ast_as_json`) can read; None: the whole document."""
    try:
        modules = json.loads(ast_json)
        paths: list[tuple[str, ...]] = []
        for module in modules:
            ast = module["ast"]
            source = module["source"]["contents"]
            aliases = _aliases(ast.get("imports") or [], source)
            for rule in ast.get("rules") or []:
                if not _collect(rule, aliases, paths):
                    return None
    except (_Unknown, KeyError, TypeError, ValueError, IndexError):
        return None
    shape: Shape = {}
    for path in sorted(paths, key=len):
        _add(shape, path)
    return shape


def prune(document: dict[str, Any], shape: Shape) -> dict[str, Any]:
    """The part of `document` the shape keeps (absent keys stay absent)."""
    out: dict[str, Any] = {}
    for key, below in shape.items():
        if key in document:
            value = document[key]
            out[key] = prune(value, below) if below is not None and isinstance(value, dict) else value
    return out


def _aliases(imports: list[Any], source: str) -> dict[str, tuple[str, ...]]:
    """Names bound to parts of the input by `import input...` (`as` names read back from the source text)."""
    aliases: dict[str, tuple[str, ...]] = {"input": ()}
    for item in imports:
        try:
            root, *path = ref_parts(item["refr"])
        except ValueError:
            raise _Unknown from None
        if root != "input":
            continue
        alias = item.get("as")
        name = source[alias["start"]:alias["end"]] if alias else (path[-1] if path else "input")
        aliases[name] = tuple(path)
    return aliases


def ref_parts(node: Any) -> tuple[str, ...]:
    """A dotted reference in regorus' AST (a `Var` under `RefDot`s: `input.a.b`, `data.pkg`, a package name) as
    its parts. ValueError for anything else (brackets, calls)."""
    fields: list[str] = []
    while isinstance(node, dict) and len(node) == 1 and "RefDot" in node:
        field = node["RefDot"]["field"]
        name = field[1] if isinstance(field, list) else field
        if not isinstance(name, str):
            raise ValueError("not a dotted reference")
        fields.append(name)
        node = node["RefDot"]["refr"]
    if not (isinstance(node, dict) and len(node) == 1 and "Var" in node):
        raise ValueError("not a dotted reference")
    return (node["Var"]["value"], *reversed(fields))


def _collect(node: Any, aliases: dict[str, tuple[str, ...]], paths: list[tuple[str, ...]]) -> bool:
    """Add the input paths `node` reads; False when it reads the whole input."""
    if isinstance(node, list):
        return all(_collect(item, aliases, paths) for item in node)
    if not isinstance(node, dict):
        return True
    if len(node) == 1:
        (kind, body), = node.items()
        if kind == "Var" and isinstance(body, dict):
            name = body.get("value")
            if name in aliases:
                if not aliases[name]:
                    return False  # the whole input, used as a value
                paths.append(aliases[name])
            return True
        if kind in ("RefDot", "RefBrack"):
            return _collect_ref(node, aliases, paths)
    return all(_collect(value, aliases, paths) for key, value in node.items() if key != "span")


def _collect_ref(node: Any, aliases: dict[str, tuple[str, ...]], paths: list[tuple[str, ...]]) -> bool:
    steps: list[tuple[str, Any]] = []  # outermost first: ("field", name) or ("index", node)
    current = node
    while isinstance(current, dict) and len(current) == 1 and next(iter(current)) in ("RefDot", "RefBrack"):
        kind, body = next(iter(current.items()))
        if kind == "RefDot":
            field = body["field"]
            name = field[1] if isinstance(field, list) else field
            if not isinstance(name, str):
                raise _Unknown
            steps.append(("field", name))
        else:
            index = body["index"]
            literal = next((index[k]["value"] for k in _LITERAL_KEYS if isinstance(index, dict) and k in index), None)
            steps.append(("field", literal) if isinstance(literal, str) else ("index", index))
        current = body["refr"]
    # Computed indexes may themselves read the input.
    if not all(_collect(step, aliases, paths) for kind, step in steps if kind == "index"):
        return False
    root = current
    if not (isinstance(root, dict) and len(root) == 1 and "Var" in root):
        return _collect(root, aliases, paths)  # e.g. a call's result indexed: walk the call
    name = root["Var"].get("value")
    if name not in aliases:
        return True
    path = list(aliases[name])
    for kind, step in reversed(steps):  # innermost first
        if kind != "field":
            break
        path.append(step)
    if not path:
        return False
    paths.append(tuple(path))
    return True


def _add(shape: Shape, path: tuple[str, ...]) -> None:
    node: Shape = shape
    for i, key in enumerate(path):
        last = i == len(path) - 1
        if key in node and node[key] is None:
            return  # an ancestor is kept whole already
        if last:
            node[key] = None
            return
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        node = child
