"""Reading a policy directory into one immutable `PolicySource`, with OPA's loader rules.

- every `*.rego` file, recursively (hidden files and directories skipped); `*_test.rego` files are tests: the
  gateway does not serve them, `mesh-gateway policy test` runs them;
- every `*.json` file and every `data.yaml` / `data.yml`, placed at the data path of its directory, as OPA does
  (`policies/roles/data.json` → `data.roles`; a file at the top → `data`). Two files giving one key → error.

The revision is a hash over every file name and content, so it names the whole set.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

MAX_FILE_BYTES = 8 * 1024 * 1024
MAX_FILES = 2000
DATA_YAML = frozenset({"data.yaml", "data.yml"})


class PolicyError(Exception):
    """The policy set cannot be used; the message names the file (and line, when the engine gives one)."""


@dataclass(frozen=True, slots=True)
class PolicySource:
    root: str
    revision: str
    modules: tuple[tuple[str, str], ...]
    """(path relative to root, Rego text), sorted; test files excluded unless asked for."""
    tests: tuple[tuple[str, str], ...]
    data: tuple[tuple[tuple[str, ...], Any], ...]
    """(data path, document) per data file."""


def _wanted(path: Path) -> bool:
    return path.suffix in (".rego", ".json") or path.name in DATA_YAML


def list_files(root: Path) -> list[Path]:
    """The files that make up the set, sorted (skips hidden entries)."""
    found: list[Path] = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.is_file() and _wanted(path):
            found.append(path)
            if len(found) > MAX_FILES:
                raise PolicyError(f"{root}: more than {MAX_FILES} policy and data files")
    return found


def signature(root: Path) -> tuple[tuple[str, int, int], ...]:
    """Cheap change detector for the watcher: names, sizes and mtimes. Missing directory → empty."""
    try:
        out = []
        for path in list_files(root):
            stat = path.stat()
            out.append((str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns))
        return tuple(out)
    except (OSError, PolicyError):
        return (("<unreadable>", 0, 0),)


def _data_document(relative: Path, raw: bytes) -> Any:
    try:
        if relative.suffix == ".json":
            return json.loads(raw)
        return yaml.safe_load(raw)
    except (ValueError, yaml.YAMLError) as exc:
        raise PolicyError(f"{relative}: invalid data file: {exc}") from None


def read(root: Path) -> PolicySource:
    """Read and hash the whole set. Raises PolicyError for an unreadable directory or file."""
    if not root.is_dir():
        raise PolicyError(f"{root}: policy directory does not exist")
    digest = hashlib.sha256()
    modules: list[tuple[str, str]] = []
    tests: list[tuple[str, str]] = []
    data: list[tuple[tuple[str, ...], Any]] = []
    try:
        files = list_files(root)
        for path in files:
            relative = path.relative_to(root)
            raw = path.read_bytes()
            if len(raw) > MAX_FILE_BYTES:
                raise PolicyError(f"{relative}: larger than {MAX_FILE_BYTES} bytes")
            digest.update(str(relative).encode() + b"\0" + raw + b"\0")
            if path.suffix == ".rego":
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise PolicyError(f"{relative}: not UTF-8") from None
                (tests if path.name.endswith("_test.rego") else modules).append((str(relative), text))
            else:
                document = _data_document(relative, raw)
                data_path = tuple(relative.parent.parts)
                if not data_path and not isinstance(document, dict):
                    raise PolicyError(f"{relative}: a data file at the top must hold an object")
                data.append((data_path, document))
    except OSError as exc:
        raise PolicyError(f"{root}: cannot read: {exc}") from None
    if not modules and not tests:
        raise PolicyError(f"{root}: no .rego files")
    return PolicySource(str(root), digest.hexdigest()[:16], tuple(modules), tuple(tests), tuple(data))


def nest(path: tuple[str, ...], document: Any) -> dict[str, Any]:
    """`("a", "b"), doc` → `{"a": {"b": doc}}`; the root path gives the document itself."""
    for key in reversed(path):
        document = {key: document}
    if not isinstance(document, dict):
        raise PolicyError("data document must be an object")
    return document
