"""Per-service circuit limits: at most max_concurrent requests in flight, at most max_pending waiting for a slot.

Past both, a request is refused at once with 503 (errors.Overloaded): a struggling service gets less load, and
callers get a fast answer instead of a queue that only grows.
"""

from __future__ import annotations

import asyncio
from collections import deque

from mesh_gateway.config import Resilience
from mesh_gateway.errors import Overloaded


class Circuit:
    __slots__ = ("active", "max_concurrent", "max_pending", "service", "waiters")

    def __init__(self, service: str, max_concurrent: int | None, max_pending: int) -> None:
        self.service = service
        self.max_concurrent = max_concurrent
        self.max_pending = max_pending
        self.active = 0
        self.waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self, timeout_s: float) -> None:
        if self.max_concurrent is None or (self.active < self.max_concurrent and not self.waiters):
            self.active += 1
            return
        if len(self.waiters) >= self.max_pending:
            raise Overloaded(f"{self.service}: {self.active} in flight and {len(self.waiters)} pending")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout_s):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed over just as we gave up: pass it on
            if isinstance(exc, TimeoutError):
                raise Overloaded(f"{self.service}: no free slot within {timeout_s}s") from None
            raise
        finally:
            if waiter in self.waiters:
                self.waiters.remove(waiter)

    def release(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot moves to the waiter; `active` is unchanged
                return
        self.active -= 1


class Circuits:
    def __init__(self, settings: Resilience) -> None:
        self._settings = settings
        self._circuits: dict[str, Circuit] = {}

    def get(self, service: str) -> Circuit:
        circuit = self._circuits.get(service)
        if circuit is None:
            limits = self._settings.services.get(service)
            circuit = Circuit(service, limits.max_concurrent if limits else None, limits.max_pending if limits else 0)
            self._circuits[service] = circuit
        return circuit

    def view(self, service: str) -> dict[str, int | None]:
        circuit = self._circuits.get(service)
        limits = self._settings.services.get(service)
        return {"active": circuit.active if circuit else 0, "pending": len(circuit.waiters) if circuit else 0,
                "max_concurrent": limits.max_concurrent if limits else None,
                "max_pending": limits.max_pending if limits else 0}
