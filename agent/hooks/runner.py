"""Calling hooks under the agent's one async rule, with a timeout and isolation per plugin.

pluggy's own ``hook(...)`` stops at the first exception and cannot time out one
implementation, so the agent calls each implementation itself, in pluggy's order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Any

import pluggy

from agent.serving.metrics import Metrics

log = logging.getLogger(__name__)


# Answers per type to "is it awaitable?": what inspect.isawaitable answers for coroutines,
# tasks and futures, but asked once per type. Both isawaitable's ABC check and a failing
# hasattr (an exception inside) cost more than many hooks do.
_AWAITABLE_TYPES: dict[type, bool] = {}
MAX_CACHED_TYPES = 256


def _awaitable(value: Any) -> bool:
    if value is None:  # what most hooks return
        return False
    kind = type(value)
    answer = _AWAITABLE_TYPES.get(kind)
    if answer is None:
        answer = hasattr(kind, "__await__")
        # hooks return a handful of types; a plugin that makes classes on the fly (mocks)
        # must not grow the table without bound
        if len(_AWAITABLE_TYPES) < MAX_CACHED_TYPES:
            _AWAITABLE_TYPES[kind] = answer
    return answer


# What _call_one made of an implementation's call
FAILED, DONE, PENDING = 0, 1, 2


class HookRunner:
    def __init__(self, pm: pluggy.PluginManager, metrics: Metrics, timeout_s: float) -> None:
        self.pm = pm
        self.metrics = metrics
        self.timeout_s = timeout_s
        self._impls: dict[str, list[tuple[str, Any, tuple[str, ...]]]] = {}
        # (hook, plugin) -> [calls, seconds]; None unless a benchmark asks (see time_stages)
        self.stage_times: dict[tuple[str, str], list[float]] | None = None

    def time_stages(self) -> dict[tuple[str, str], list[float]]:
        """Start accumulating calls and seconds per (hook, plugin); returns the live table."""
        self.stage_times = {}
        return self.stage_times

    def refresh(self) -> None:
        """Forget the cached implementation lists; call after registering or removing plugins."""
        self._impls.clear()

    def _implementations(self, hook_name: str) -> list[tuple[str, Any, tuple[str, ...]]]:
        impls = self._impls.get(hook_name)
        if impls is None:
            caller = getattr(self.pm.hook, hook_name)
            impls = []
            # get_hookimpls() lists in registration order; pluggy calls in reverse.
            for impl in reversed(caller.get_hookimpls()):
                if impl.hookwrapper or impl.wrapper:
                    raise TypeError(f"plugin {impl.plugin_name}: wrappers are not supported on {hook_name}")
                impls.append((impl.plugin_name, impl.function, tuple(impl.argnames)))
            self._impls[hook_name] = impls
        return impls

    def plugin_names(self, hook_name: str) -> list[str]:
        return [name for name, _, _ in self._implementations(hook_name)]

    def _call_one(
        self,
        hook_name: str,
        plugin: str,
        function: Any,
        argnames: tuple[str, ...],
        kwargs: dict[str, Any],
        timeout_s: float | None = None,
    ) -> tuple[int, Any]:
        """Run one implementation; returns (FAILED, None), (DONE, result) or (PENDING, the
        awaitable it returned, for :meth:`_settle`). Never raises. Kept synchronous: most hooks
        answer at once, and a coroutine per call would cost more than many of them do."""
        start = time.perf_counter()
        try:
            result = function(*[kwargs[name] for name in argnames])
        except Exception:
            self.metrics.plugin_failures.labels(plugin=plugin, hook=hook_name, kind="error").inc()
            log.exception("plugin %s failed in %s", plugin, hook_name)
            return FAILED, None
        if _awaitable(result):
            return PENDING, result
        elapsed = time.perf_counter() - start
        # the common case, in time and not timed for a benchmark, costs no further call
        if self.stage_times is not None or elapsed > (timeout_s or self.timeout_s):
            self._finished(hook_name, plugin, elapsed, timeout_s)
        return DONE, result

    async def _settle(self, hook_name: str, plugin: str, awaitable: Any, timeout_s: float | None) -> tuple[int, Any]:
        """Await an implementation's awaitable under its budget: (DONE, result) or (FAILED, None);
        never raises except on cancellation."""
        budget = timeout_s or self.timeout_s
        start = time.perf_counter()
        try:
            async with asyncio.timeout(budget):
                result = await awaitable
        except TimeoutError:
            self.metrics.plugin_failures.labels(plugin=plugin, hook=hook_name, kind="timeout").inc()
            log.warning("plugin %s timed out in %s after %.0f ms", plugin, hook_name, budget * 1000)
            return FAILED, None
        except Exception:
            self.metrics.plugin_failures.labels(plugin=plugin, hook=hook_name, kind="error").inc()
            log.exception("plugin %s failed in %s", plugin, hook_name)
            return FAILED, None
        self._finished(hook_name, plugin, time.perf_counter() - start, timeout_s)
        return DONE, result

    def _finished(self, hook_name: str, plugin: str, elapsed: float, timeout_s: float | None) -> None:
        if self.stage_times is not None:
            entry = self.stage_times.setdefault((hook_name, plugin), [0, 0.0])
            entry[0] += 1
            entry[1] += elapsed
        budget = timeout_s or self.timeout_s
        if elapsed > budget:
            # A synchronous implementation cannot be interrupted; it is reported so that the
            # operator can move it off the hot path or make it asynchronous.
            self.metrics.plugin_failures.labels(plugin=plugin, hook=hook_name, kind="slow").inc()
            log.warning(
                "plugin %s took %.0f ms in %s (budget %.0f ms)", plugin, elapsed * 1000, hook_name, budget * 1000
            )

    def _each(self, hook_name: str) -> Iterator[tuple[str, Any, tuple[str, ...]]]:
        return iter(self._implementations(hook_name))

    async def call_all(self, hook_name: str, timeout_s: float | None = None, **kwargs: Any) -> list[tuple[str, Any]]:
        """Every implementation's non-None answer, as (plugin name, result), in call order."""
        results = []
        for plugin, function, argnames in self._each(hook_name):
            state, result = self._call_one(hook_name, plugin, function, argnames, kwargs, timeout_s)
            if state == PENDING:
                state, result = await self._settle(hook_name, plugin, result, timeout_s)
            if state == DONE and result is not None:
                results.append((plugin, result))
        return results

    async def call_first(self, hook_name: str, **kwargs: Any) -> Any:
        """The first non-None answer in call order, or None."""
        for plugin, function, argnames in self._each(hook_name):
            state, result = self._call_one(hook_name, plugin, function, argnames, kwargs)
            if state == PENDING:
                state, result = await self._settle(hook_name, plugin, result, None)
            if state == DONE and result is not None:
                return result
        return None

    async def call_chain(self, hook_name: str, chained: str, **kwargs: Any) -> Any:
        """Thread ``kwargs[chained]`` through every implementation; None keeps the value."""
        for plugin, function, argnames in self._each(hook_name):
            state, result = self._call_one(hook_name, plugin, function, argnames, kwargs)
            if state == PENDING:
                state, result = await self._settle(hook_name, plugin, result, None)
            if state == DONE and result is not None:
                kwargs[chained] = result
        return kwargs[chained]
