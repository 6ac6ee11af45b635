"""`await_until`: `async with asyncio.timeout_at(when): return await call`, at a fraction of the cost.

Every forwarded request runs under one such deadline. Counted with callgrind on CPython 3.11 + uvloop, one
`async with asyncio.timeout_at(...)` costs ≈ 27k instructions (8k of them the timer; the rest the Timeout object, its
state enum, coroutine frames for __aenter__/__aexit__, `current_task()`), more than a tenth of a whole forward
(bench/micro/upstream.py); this does the same with one small object and the timer in ≈ 13k.

The rules are asyncio.timeout's: the timer cancels the task; when the call then unwinds with CancelledError and that
cancellation is the only one pending, it becomes TimeoutError; if the task was also cancelled from outside (the
client went away), the CancelledError goes on. The timer's cancel request is withdrawn (`Task.uncancel`) however the
call ends, so structured concurrency above (TaskGroup, asyncio.timeout) sees a consistent count.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class _Expiry:
    __slots__ = ("fired", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.fired = False

    def fire(self) -> None:
        self.fired = True
        self.task.cancel()


async def await_until(loop: asyncio.AbstractEventLoop, when: float, call: Coroutine[Any, Any, T]) -> T:
    """Await `call`, raising TimeoutError if it has not finished by `when` (loop time)."""
    task = asyncio.current_task(loop)
    if task is None:
        call.close()
        raise RuntimeError("await_until must run inside a task")
    cancelling = task.cancelling()
    expiry = _Expiry(task)
    handle = loop.call_at(when, expiry.fire)
    try:
        result = await call
    except BaseException as exc:
        handle.cancel()
        if expiry.fired and task.uncancel() <= cancelling and type(exc) is asyncio.CancelledError:
            raise TimeoutError from exc
        raise
    handle.cancel()
    if expiry.fired:  # the call swallowed the cancellation and finished anyway: withdraw our request
        task.uncancel()
    return result
