"""Watch[T]: the latest immutable snapshot, swapped whole. The only channel from background tasks to requests."""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

T = TypeVar("T")


class Watch(Generic[T]):
    __slots__ = ("_event", "_value", "_version")

    def __init__(self, initial: T) -> None:
        self._value = initial
        self._version = 0
        self._event: asyncio.Event | None = None

    def get(self) -> T:
        return self._value

    @property
    def version(self) -> int:
        return self._version

    def publish(self, value: T) -> bool:
        """Swap in `value`; equal values are dropped so watchers only wake on real change."""
        if value == self._value:
            return False
        self._value = value
        self._version += 1
        if self._event is not None:
            self._event.set()
            self._event = None
        return True

    async def changed(self, since: int, timeout_s: float) -> bool:
        """Wait until the version moves past `since`; False when `timeout_s` passed first."""
        if self._version != since:
            return True
        if self._event is None:
            self._event = asyncio.Event()
        event = self._event
        try:
            await asyncio.wait_for(event.wait(), timeout_s)
        except TimeoutError:
            return self._version != since
        return True
