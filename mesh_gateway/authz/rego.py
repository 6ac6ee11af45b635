"""The embedded Rego engine (regorus) with hot reload of the policy directory.

Threading: a regorus `Engine` may only be used by the thread that created it; from any other thread it raises
`PanicException` (a BaseException). So engines are built *and* used on the event-loop thread: the watcher reads
files in a worker thread, then compiles the new set on the loop (milliseconds), and `evaluate` runs inline on
the loop (about 10 to 25 µs). `evaluate` refuses to touch an engine from a foreign thread rather than panicking.

Hot reload: a polling watcher (every `poll_s`, default 0.25 s, so changes land within 1 s) compares names,
sizes and mtimes; on change the whole set is read, compiled and validated. A set that fails is rejected whole:
the previous engine keeps serving and the error is published on the state Watch for the admin `/policies` view.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import regorus

from mesh_gateway.authz import jwt
from mesh_gateway.authz.input_shape import Shape, input_shape, prune
from mesh_gateway.authz.memo import DecisionMemo, deterministic, freeze
from mesh_gateway.authz.policyset import PolicyError, PolicySource, nest, read, signature
from mesh_gateway.watch import Watch

log = logging.getLogger("mesh_gateway.authz")

POLL_S = 0.25
READ_TIMEOUT_S = 10.0


class EngineError(Exception):
    """Evaluation failed (runtime error, panic, wrong thread); the caller fails closed."""


def short_error(exc: BaseException) -> str:
    """regorus messages carry a source excerpt; keep the location and the final error line."""
    # A Rust backtrace is appended when RUST_BACKTRACE is set in the environment; it never helps a policy author.
    text = str(exc).split("Stack backtrace:", 1)[0]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    location = next((line[4:] for line in lines if line.startswith("-->")), "")
    last = next((line for line in reversed(lines) if line.startswith("error:")), lines[-1] if lines else "")
    return f"{location}: {last}" if location else last


def _is_panic(exc: BaseException) -> bool:
    # pyo3's PanicException is not importable by name; it is the only BaseException regorus raises.
    return type(exc).__name__ == "PanicException"


def compile_source(source: PolicySource, *, rego_v0: bool = False, include_tests: bool = False,
                   clock: jwt.Clock = time.time_ns, probe_queries: tuple[str, ...] = (), validate: bool = True) -> Any:
    """Build a regorus Engine for `source` on the calling thread, and validate it.

    regorus parses on `add_policy` but reports unsafe variables, unknown functions and rule conflicts only when
    rules are evaluated, so the whole `data` document is evaluated once with no input, and each probe query (the
    configured decision rules) must name a rule the set defines.
    """
    engine = regorus.Engine()
    engine.set_rego_v0(rego_v0)
    jwt.register(engine, clock)
    modules = source.modules + (source.tests if include_tests else ())
    try:
        for path, text in modules:
            try:
                engine.add_policy(path, text)
            except RuntimeError as exc:
                raise PolicyError(f"{path}: {short_error(exc)}") from None
        for data_path, document in source.data:
            try:
                engine.add_data(nest(data_path, document))
            except RuntimeError as exc:
                raise PolicyError(f"data at {'.'.join(('data', *data_path))}: {short_error(exc)}") from None
        try:
            if validate:
                engine.eval_query("data")
            for query in probe_queries:
                engine.eval_rule(query)  # raises when the set does not define the rule at all
        except RuntimeError as exc:
            raise PolicyError(short_error(exc)) from None
    except BaseException as exc:
        if _is_panic(exc):
            raise PolicyError(f"policy engine panicked: {exc}") from None
        raise
    return engine


@dataclass(frozen=True, slots=True)
class PolicyState:
    """What the request path and the admin view read. `engine` is bound to the loop thread."""

    root: str
    revision: str = ""
    loaded_at: float = 0.0
    files: int = 0
    last_error: str = ""
    last_error_at: float = 0.0
    engine: Any = None
    input_shape: Shape | None = None
    """The parts of the input the set can read (authz/input_shape.py); None: all of it."""
    memo: DecisionMemo | None = None
    """Results by pruned input, for a set whose results depend on nothing else (authz/memo.py)."""


class EmbeddedEngine:
    name = "embedded"

    def __init__(self, root: Path, *, rego_v0: bool = False, probe_queries: tuple[str, ...] = (),
                 poll_s: float = POLL_S, wall: Callable[[], float] = time.time,
                 jwt_clock: jwt.Clock = time.time_ns, memoise: bool = True) -> None:
        self.root = root
        self._rego_v0 = rego_v0
        self._probes = probe_queries
        self._poll_s = poll_s
        self._wall = wall
        self._jwt_clock = jwt_clock
        self._memoise = memoise
        self._thread = 0
        self._signature: tuple[tuple[str, int, int], ...] = ()
        self.state: Watch[PolicyState] = Watch(PolicyState(str(root)))

    @property
    def revision(self) -> str:
        return self.state.get().revision

    def load(self) -> PolicyState:
        """Initial synchronous load on the thread that will evaluate (the loop thread). Raises PolicyError."""
        self._signature = signature(self.root)
        source = read(self.root)
        return self._install(source)

    def _install(self, source: PolicySource) -> PolicyState:
        engine = compile_source(source, rego_v0=self._rego_v0, clock=self._jwt_clock, probe_queries=self._probes)
        self._thread = threading.get_ident()
        ast = engine.get_ast_as_json()
        shape = input_shape(ast)
        state = PolicyState(source.root, source.revision, self._wall(), len(source.modules) + len(source.data),
                            engine=engine, input_shape=shape,
                            memo=DecisionMemo() if self._memoise and deterministic(ast, shape) else None)
        self.state.publish(state)
        log.info("policy set %s loaded from %s (%d files)", source.revision, source.root, state.files)
        return state

    async def reload(self) -> bool:
        """Re-read and swap in the set if it changed. True when a new revision serves; errors are published."""
        loop = asyncio.get_running_loop()
        try:
            source = await asyncio.wait_for(loop.run_in_executor(None, read, self.root), READ_TIMEOUT_S)
            if source.revision == self.state.get().revision:
                return False
            self._install(source)
            return True
        except Exception as exc:
            # Whatever a policy file contains, the watcher must keep running and the old set keep serving.
            message = str(exc) if isinstance(exc, PolicyError) else (
                "reading the policy directory timed out" if isinstance(exc, TimeoutError)
                else f"{type(exc).__name__}: {exc}")
            current = self.state.get()
            self.state.publish(PolicyState(current.root, current.revision, current.loaded_at, current.files,
                                           message, self._wall(), current.engine, current.input_shape,
                                           current.memo))
            log.error("policy set rejected, revision %s keeps serving: %s", current.revision or "(none)", message)
            return False

    async def watch(self) -> None:
        """Background task: poll the directory and reload on change. Runs until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._poll_s)
            try:
                current = await asyncio.wait_for(loop.run_in_executor(None, signature, self.root), READ_TIMEOUT_S)
            except TimeoutError:
                continue
            if current != self._signature:
                self._signature = current
                await self.reload()

    def evaluate_sync(self, query: str, document: dict[str, Any]) -> Any:
        """The query's value for `document` as input; None when undefined. Raises EngineError."""
        state = self.state.get()
        engine = state.engine
        if engine is None:
            raise EngineError("no policy set loaded")
        if threading.get_ident() != self._thread:
            raise EngineError("policy engine used from a foreign thread")
        shape = state.input_shape
        # Only what the policies can read: converting the whole document into regorus costs twice as much.
        given = document if shape is None else prune(document, shape)
        memo = state.memo
        key = None
        if memo is not None:
            frozen = freeze(given)
            if frozen is not None:  # None: too much text to remember
                key = (query, frozen)
                hit, value = memo.get(key)
                if hit:
                    return value
        try:
            engine.set_input(given)
            value = engine.eval_rule(query)
        except RuntimeError as exc:
            raise EngineError(short_error(exc)) from None
        except BaseException as exc:
            if _is_panic(exc):
                raise EngineError(f"policy engine panicked: {short_error(exc)}") from None
            raise
        if memo is not None and key is not None:
            memo.put(key, value)
        return value

    async def evaluate(self, query: str, document: dict[str, Any]) -> tuple[Any, str]:
        return self.evaluate_sync(query, document), ""

    async def close(self) -> None:
        return None
