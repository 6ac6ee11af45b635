"""Child `mesh-gateway` processes for end-to-end tests: output collected, waited on by pattern, stopped by signal."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 30.0


class Process:
    """A child `mesh-gateway` process whose output is collected, so a test can wait for a line and show the log."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self.proc = proc
        self.lines: list[str] = []
        self._grew = asyncio.Event()
        self._readers = [asyncio.ensure_future(self._read(s)) for s in (proc.stdout, proc.stderr) if s]

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.lines.append(line.decode(errors="replace").rstrip())
            self._grew.set()

    async def wait_for(self, pattern: str) -> re.Match[str]:
        regex = re.compile(pattern)
        async with asyncio.timeout(START_TIMEOUT_S):
            while True:
                for line in self.lines:
                    if found := regex.search(line):
                        return found
                if self.proc.returncode is not None:
                    raise AssertionError(f"{self.name} exited {self.proc.returncode}:\n" + "\n".join(self.lines))
                self._grew.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._grew.wait(), 0.5)

    async def exited(self) -> int:
        """The exit code of a process expected to stop on its own (bounded), with all its output read."""
        async with asyncio.timeout(START_TIMEOUT_S):
            code = await self.proc.wait()
            await asyncio.gather(*self._readers)
        return code

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        try:
            async with asyncio.timeout(10):
                code = await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            code = await self.proc.wait()
        for reader in self._readers:
            reader.cancel()
        return code


async def spawn(name: str, *args: str, pass_fds: tuple[int, ...] = (), env: dict[str, str] | None = None) -> Process:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RUST_BACKTRACE": "0", **(env or {})}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mesh_gateway", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env, pass_fds=pass_fds)
    return Process(name, proc)
