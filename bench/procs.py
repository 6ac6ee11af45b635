"""Child processes for the benchmark: started in their own process group, always cleaned up, sampled via /proc.

Every process the runner starts goes through `Supervisor.start`, which puts it in a new session (so its whole
tree — nginx master + workers, gateway + worker processes — can be signalled as one group) and registers it for
cleanup. Cleanup runs from `close()` (try/finally in the runner), from atexit, and from SIGINT/SIGTERM/SIGHUP
handlers, so an interrupted run never leaves listeners behind.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    pass


class Supervisor:
    def __init__(self) -> None:
        self._procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []
        atexit.register(self.close)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # SystemExit unwinds through the runner's finally blocks, which call close().
        raise SystemExit(128 + signum)

    def start(self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, env=env, cwd=cwd)
        self._procs.append((name, proc, log))
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
        """SIGTERM the process group, wait (bounded), then SIGKILL whatever is left of the group."""
        self._procs = [p for p in self._procs if p[1] is not proc]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout_s)
        # Workers forked by the leader share its group; kill stragglers even if the leader already exited.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5.0)

    def check_alive(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is not None:
            name, log = next(((n, lg) for n, p, lg in self._procs if p is proc), ("process", None))
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise BenchError(f"{name} exited with status {proc.returncode}:\n{tail}")

    def close(self) -> None:
        while self._procs:
            self.stop(self._procs[-1][1], timeout_s=5.0)


def group_pids(pgid: int) -> list[int]:
    """All live processes in a process group (the leader and any forked workers)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = _stat_fields(int(entry))
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:  # fields after "pid (comm)": state, ppid, pgrp, ...
            pids.append(int(entry))
    return pids


def _stat_fields(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2:].split()


@dataclass(frozen=True)
class Usage:
    cpu_s: float
    """utime + stime summed over the group's processes."""
    peak_rss_kib: int
    """VmHWM summed over the group's processes (each process's own peak)."""


def group_usage(pgid: int) -> Usage:
    cpu_ticks = 0
    hwm = 0
    for pid in group_pids(pgid):
        try:
            fields = _stat_fields(pid)
            cpu_ticks += int(fields[11]) + int(fields[12])  # utime, stime
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    hwm += int(line.split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process exited between listing and reading
    return Usage(cpu_ticks / _TICKS_PER_S, hwm)


def free_port() -> int:
    """A port the kernel considers free right now (a small race with other users is accepted for a benchmark)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(condition: Callable[[], bool], deadline_s: float, what: str,
               alive: Callable[[], None] | None = None) -> None:
    """Poll `condition` until true or the deadline passes (then BenchError naming `what`)."""
    end = time.monotonic() + deadline_s
    last: Exception | None = None
    while time.monotonic() < end:
        if alive is not None:
            alive()
        try:
            if condition():
                return
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise BenchError(f"timed out after {deadline_s:.0f}s waiting for {what}" + (f" ({last})" if last else ""))
