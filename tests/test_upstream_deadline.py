"""await_until behaves as `async with asyncio.timeout_at(when)` does, on asyncio's loop and on uvloop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from mesh_gateway.upstream.deadline import await_until

Runner = Callable[[float, Coroutine[Any, Any, str]], Coroutine[Any, Any, str]]


async def stdlib(when: float, call: Coroutine[Any, Any, str]) -> str:
    async with asyncio.timeout_at(when):
        return await call


async def ours(when: float, call: Coroutine[Any, Any, str]) -> str:
    return await await_until(asyncio.get_running_loop(), when, call)


async def quick() -> str:
    await asyncio.sleep(0)
    return "done"


async def never() -> str:
    await asyncio.Event().wait()
    return "unreachable"


async def swallows_the_cancel() -> str:
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.Event().wait()
    return "swallowed"


async def cancelled_again_while_unwinding() -> str:
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()  # the client went away just as the deadline passed
        await asyncio.sleep(0)
    return "unreachable"


async def scenario(run: Runner, name: str) -> tuple[str, int]:
    """The outcome (result or exception name) and the task's pending cancel requests afterwards."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    calls: dict[str, Callable[[], Coroutine[Any, Any, str]]] = {
        "in time": quick, "too late": never, "swallowed": swallows_the_cancel,
        "cancelled twice": cancelled_again_while_unwinding}
    when = loop.time() + (5 if name == "in time" else 0.02)
    try:
        outcome = await run(when, calls[name]())
    except (TimeoutError, asyncio.CancelledError) as exc:
        outcome = type(exc).__name__
    return outcome, task.cancelling()


async def cancelled_from_outside(run: Runner) -> str:
    inner = asyncio.create_task(run(asyncio.get_running_loop().time() + 5, never()))
    await asyncio.sleep(0.01)
    inner.cancel()
    try:
        await inner
    except asyncio.CancelledError:
        return "CancelledError"
    return "not cancelled"


@pytest.mark.parametrize("use_uvloop", [False, True])
@pytest.mark.parametrize("name", ["in time", "too late", "swallowed", "cancelled twice"])
def test_await_until_matches_asyncio_timeout_at(name: str, use_uvloop: bool) -> None:
    run_loop = uvloop.run if use_uvloop else asyncio.run
    expected = run_loop(scenario(stdlib, name))
    assert run_loop(scenario(ours, name)) == expected
    assert expected == {"in time": ("done", 0), "too late": ("TimeoutError", 0), "swallowed": ("swallowed", 0),
                        "cancelled twice": ("CancelledError", 1)}[name]


@pytest.mark.parametrize("use_uvloop", [False, True])
def test_a_cancel_from_outside_is_not_turned_into_a_timeout(use_uvloop: bool) -> None:
    run_loop = uvloop.run if use_uvloop else asyncio.run
    assert run_loop(cancelled_from_outside(ours)) == run_loop(cancelled_from_outside(stdlib)) == "CancelledError"
