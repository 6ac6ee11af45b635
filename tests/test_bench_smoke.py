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


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                found.append(cmdline)
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
    rows = [line for line in out.splitlines() if line.startswith("| TLS+mTLS |")]
    targets = [row.split("|")[2].strip() for row in rows]
    assert targets[:3] == ["direct", "nginx", "gateway"]
    for row in rows[:3]:
        assert row.split("|")[-2].strip() == "0", f"requests failed: {row}"
    summary = rows[3]
    assert summary.split("|")[2].strip().endswith("x")  # gateway/nginx ratio printed
    # nginx masters and the gateway carry the run's work dir in their command line; none may outlive the run.
    workdir = next(line.split(": ", 1)[1] for line in err.splitlines() if line.startswith("work dir: "))
    assert _processes_mentioning(workdir) == []
    assert not Path(workdir).exists()
