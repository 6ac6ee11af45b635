"""`workers: N`: N gateway processes accepting on the same listeners through SO_REUSEPORT.

Each worker is the complete single-process gateway (`app.serve`): its own event loop, TLS contexts, authz engine,
upstream pools and background tasks (identity rotation, discovery). Nothing is shared, so nothing needs locking
and the Rego engine stays on the thread that made it. Duplicated background work is small: each worker issues its
own SVID from the CA directory and runs its own discovery watch (N blocking queries instead of one).

The kernel spreads new connections across the workers' listening sockets. Only worker 0 serves the admin port,
so /readyz and /metrics describe worker 0 (a single address cannot be shared without mixing answers).

The parent only supervises. SIGTERM/SIGINT → SIGTERM to every worker, each of which stops accepting and drains its
own in-flight requests within drain_timeout_s. A worker that exits on its own is treated like a crashed background
task: the others are drained and the parent exits 1, so the service manager restarts the whole set cleanly.
Workers are started with the "spawn" method (a fresh interpreter, no inherited threads or loops) and ask the
kernel for SIGTERM if the parent dies, so no worker outlives a killed parent.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
from collections.abc import Sequence
from types import FrameType

from mesh_gateway import config as cfg

log = logging.getLogger("mesh_gateway.workers")

_PR_SET_PDEATHSIG = 1
_POLL_S = 0.2
_KILL_GRACE_S = 10.0


def worker_count(setting: int | str) -> int:
    if setting == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    return int(setting)


def _die_with_parent(parent_pid: int) -> None:
    """Linux only; elsewhere a worker of a SIGKILLed parent keeps serving until stopped by hand."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _worker_main(config: cfg.GatewayConfig, index: int, parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    from mesh_gateway.app import serve

    sys.exit(serve(config, reuse_port=True, with_admin=index == 0))


class _Stop:
    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True


def serve_workers(config: cfg.GatewayConfig) -> int:
    from mesh_gateway.process import configure_logging

    configure_logging()
    count = worker_count(config.workers)
    stop = _Stop()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_worker_main, args=(config, index, os.getpid()),
                               name=f"mesh-gateway-worker-{index}") for index in range(count)]
    try:
        for worker in workers:
            worker.start()
        log.info("started %d workers: pids %s", count, ", ".join(str(w.pid) for w in workers))
        failed = _supervise(workers, stop)
        return _shutdown(workers, config.drain_timeout_s, failed)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _supervise(workers: Sequence[multiprocessing.process.BaseProcess], stop: _Stop) -> bool:
    """Wait until a stop is requested (→ False) or a worker exits on its own (→ True)."""
    sentinels = {w.sentinel: w for w in workers}
    while not stop.requested:
        ready = multiprocessing.connection.wait(list(sentinels), timeout=_POLL_S)
        if ready:
            worker = sentinels[ready[0]]  # type: ignore[index]
            worker.join(timeout=1.0)
            log.error("%s (pid %s) exited with status %s; stopping the other workers", worker.name, worker.pid,
                      worker.exitcode)
            return True
    return False


def _shutdown(workers: Sequence[multiprocessing.process.BaseProcess], drain_timeout_s: float, failed: bool) -> int:
    log.info("stopping %d workers: each drains for up to %ss", len(workers), drain_timeout_s)
    for worker in workers:
        if worker.is_alive() and worker.pid is not None:
            os.kill(worker.pid, signal.SIGTERM)
    deadline = time.monotonic() + drain_timeout_s + _KILL_GRACE_S
    for worker in workers:
        worker.join(timeout=max(0.0, deadline - time.monotonic()))
        if worker.is_alive():
            log.error("%s (pid %s) did not stop within the drain timeout; killing it", worker.name, worker.pid)
            worker.kill()
            worker.join(timeout=5.0)
    clean = all(w.exitcode == 0 for w in workers)
    return 1 if failed or not clean else 0
