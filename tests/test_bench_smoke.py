"""`bench/run.py --smoke` starts nginx, the gateway and wrk, and prints the side-by-side table.

No timing is asserted (machines are shared and noisy); the test proves the harness runs end to end, that every
target answered 200 through the real TLS → mTLS path, and that it leaves no process behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    not (shutil.which("wrk") and shutil.which("nginx", path=os.environ.get("PATH", "") + ":/usr/sbin")),
    reason="wrk and nginx are needed for the benchmark smoke test",
)


def _group_members(pgid: int) -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                raw = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(raw[raw.rindex(")") + 2:].split()[2]) == pgid:
                found.append(entry)
    return found


@pytest.mark.timeout(60)
def test_smoke_run_prints_a_table_for_all_three_targets_and_cleans_up() -> None:
    proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "run.py"), "--smoke", "--variants", "tls"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=50)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    assert proc.returncode == 0, err
    rows = [line for line in out.splitlines() if line.startswith("| TLS edge + mTLS upstream |")]
    targets = [row.split("|")[2].strip() for row in rows]
    assert targets[:3] == ["direct", "nginx", "gateway"]
    for row in rows[:3]:
        assert row.split("|")[-2].strip() == "0", f"requests failed: {row}"
    summary = rows[3]
    assert summary.split("|")[2].strip().endswith("x")  # gateway/nginx ratio printed
    # Every nginx and gateway process was started in the runner's session tree and must be gone.
    assert _group_members(proc.pid) == []
