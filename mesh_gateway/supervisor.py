"""One supervisor for background tasks: a task that crashes stops the process with a clear error."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("mesh_gateway.supervisor")


class Supervisor:
    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.failed = asyncio.Event()
        self.failure: str | None = None

    def start(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        async def guarded() -> None:
            try:
                await run()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failure = f"background task {name!r} crashed: {type(exc).__name__}: {exc}"
                log.exception("background task %s crashed; stopping", name)
                self.failed.set()

        self._tasks[name] = asyncio.get_running_loop().create_task(guarded(), name=name)

    async def stop(self, timeout_s: float = 5.0) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)
        self._tasks.clear()
