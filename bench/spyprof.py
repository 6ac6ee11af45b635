"""py-spy profiles of the gateway under wrk, summarised as the top self-time and inclusive-time functions.

py-spy samples from outside the process (`--nonblocking`: the target is never paused), so the profiled run costs the
gateway nothing but is still kept apart from the measured rounds.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

# Start-up frames under which everything runs: they would fill the inclusive column with ~100 % rows.
_ROOTS = ("<frozen runpy>", "mesh_gateway/__main__.py", "mesh_gateway/cli.py:main", "commands/run.py:handle",
          "mesh_gateway/app.py:serve", "mesh_gateway/process.py:run_until_signalled", "runners.py:Runner.run",
          "mesh_gateway/workers.py", "process.py:",
          "spawn.py:", "<string>:<module>")
_LINE = re.compile(r"^(.*) (\d+)$")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def py_spy(python: str) -> str | None:
    beside = Path(python).parent / "py-spy"  # installed into the gateway's venv: pip install py-spy
    return str(beside) if beside.exists() else shutil.which("py-spy")


def start(exe: str, pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--subprocesses", "--nonblocking", "--rate", "250",
                             "--duration", str(max(1, round(seconds))), "--format", "raw", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _name(frame: str) -> str:
    """`handle (mesh_gateway/pipeline.py:170)` → `mesh_gateway/pipeline.py:handle`: one row per function."""
    found = _FRAME.match(frame.strip())
    if not found:
        return frame.strip()
    path = found.group("file")
    short = "/".join(path.split("/")[-2:]) if "site-packages" in path or "mesh_gateway" in path else path.split("/")[-1]
    return f"{short}:{found.group('func')}"


def summarise(raw: Path, top: int = 20) -> str:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        found = _LINE.match(line)
        if not found:
            continue
        count = int(found.group(2))
        frames = [_name(f) for f in found.group(1).split(";") if f and not f.startswith("process ")
                  and not f.startswith("thread ")]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for name in set(frames):
            if not name.startswith(_ROOTS):
                inclusive[name] += count
    if not total:
        return "(no samples)"
    rows = ["| self % | function | | incl. % | function |", "|---:|---|---|---:|---|"]
    for (s_name, s_count), (i_name, i_count) in zip(own.most_common(top), inclusive.most_common(top), strict=False):
        rows.append(f"| {100 * s_count / total:.1f} | `{s_name}` | | {100 * i_count / total:.1f} | `{i_name}` |")
    return f"{total} samples\n\n" + "\n".join(rows)
