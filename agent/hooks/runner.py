"""Calling hooks under the agent's one async rule, with a timeout and isolation per plugin.

pluggy's own ``hook(...)`` stops at the first exception and cannot time out one
implementation, so the agent calls each implementation itself, in pluggy's order, in the
call mode and under the budget that the hook's spec declares (``agent/hooks/specs.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import pluggy

from agent.hooks.specs import CALL_SPECS, Budget, CallMode, CallSpec
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
    def __init__(
        self, pm: pluggy.PluginManager, metrics: Metrics, timeout_s: float, catalog_timeout_s: float | None = None
    ) -> None:
        self.pm = pm
        self.metrics = metrics
        self.timeout_s = timeout_s
        self.budgets = {Budget.STAGE: timeout_s, Budget.CATALOG: catalog_timeout_s or timeout_s}
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

    def implementations(self, hook_name: str) -> list[tuple[str, Any, tuple[str, ...]]]:
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

    def batch_plan(self, hook_name: str) -> list[tuple[str, Any, tuple[str, ...], bool]]:
        """Who takes part in batch hook ``hook_name``, in call order: (plugin, function, argnames,
        True for the batch form / False for the one-item form). A plugin implementing both is
        called in its batch form only."""
        key = f"{hook_name}:plan"
        cached = self._impls.get(key)
        if cached is not None:
            return cached  # type: ignore[return-value]
        spec = self.spec_of(hook_name)
        assert spec.per_item is not None, f"{hook_name} is no batch hook"
        registered = {name: index for index, (name, _) in enumerate(self.pm.list_name_plugin())}
        entries = []
        batch_plugins = set()
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            batch_plugins.add(impl.plugin_name)
            entries.append((impl, True))
        entries += [
            (impl, False)
            for impl in getattr(self.pm.hook, spec.per_item).get_hookimpls()
            if impl.plugin_name not in batch_plugins
        ]
        for impl, _ in entries:
            if impl.hookwrapper or impl.wrapper:
                raise TypeError(f"plugin {impl.plugin_name}: wrappers are not supported on {hook_name}")

        # pluggy's order: tryfirst ones, then the others, then trylast ones; within each group
        # the one registered last is called first
        def order(entry: tuple[Any, bool]) -> tuple[int, int]:
            impl = entry[0]
            return (0 if impl.tryfirst else 2 if impl.trylast else 1, -registered.get(impl.plugin_name, 0))

        plan = [
            (impl.plugin_name, impl.function, tuple(impl.argnames), is_batch)
            for impl, is_batch in sorted(entries, key=order)
        ]
        self._impls[key] = plan  # type: ignore[assignment]
        return plan

    def plugin_names(self, hook_name: str) -> list[str]:
        return [name for name, _, _ in self.implementations(hook_name)]

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
        awaitable it returned, for :meth:`_await_answer`). Never raises. Kept synchronous: most hooks
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

    async def _await_answer(
        self, hook_name: str, plugin: str, awaitable: Any, timeout_s: float | None
    ) -> tuple[int, Any]:
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

    def spec_of(self, hook_name: str) -> CallSpec:
        """How ``hook_name`` is called; a KeyError naming it when no spec declares it (a misspelt
        name at a call site fails where the caller is made, at start)."""
        spec = CALL_SPECS.get(hook_name)
        if spec is None or not hasattr(self.pm.hook, hook_name):
            raise KeyError(f"no hook specification {hook_name!r} with a call mode (agent/hooks/specs.py)")
        return spec

    def caller(self, hook_name: str) -> Callable[..., Awaitable[Any]]:
        """``call`` bound to one hook, checked now: call sites make theirs when they start."""
        self.spec_of(hook_name)
        return partial(self.call, hook_name)

    def batch_caller(self, hook_name: str) -> Callable[..., Awaitable[list[Any]]]:
        """``call_batch`` bound to one batch hook, checked now."""
        if self.spec_of(hook_name).per_item is None:
            raise KeyError(f"{hook_name!r} is no batch hook")
        return partial(self.call_batch, hook_name)

    async def call_batch(self, hook_name: str, **kwargs: Any) -> list[Any]:
        """Call batch hook ``hook_name`` as its spec declares, one answer per item of the batch:
        ALL gives each item's list of (plugin, answer); FIRST each item's first answer or None;
        CHAIN each item's value after every implementation. Plugins that implement only the
        one-item form are called once per item. A batch form's call is budgeted for the batch
        (the stage budget times its size); an answer that is not one per item is counted as a
        failure of that plugin and skipped."""
        spec = self.spec_of(hook_name)
        aligned = dict(spec.aligned)
        size = len(kwargs[next(iter(aligned))])
        shared = {name: value for name, value in kwargs.items() if name not in aligned}
        budget = self.budgets[spec.budget]
        # ALL: answers per item; FIRST: the answer or None; CHAIN: the current value
        if spec.mode is CallMode.ALL:
            results: list[Any] = [[] for _ in range(size)]
        elif spec.mode is CallMode.FIRST:
            results = [None] * size
        else:
            assert spec.chained is not None
            results = list(kwargs[spec.chained])
        for plugin, function, argnames, is_batch in self.batch_plan(hook_name):
            todo = range(size) if spec.mode is not CallMode.FIRST else [i for i in range(size) if results[i] is None]
            if not todo:
                break
            if is_batch:
                call_kwargs = dict(shared)
                for name in aligned:
                    source = results if name == spec.chained else kwargs[name]
                    call_kwargs[name] = [source[i] for i in todo]
                answers = await self._answer(hook_name, plugin, function, argnames, call_kwargs, budget * len(todo))
                if answers is None:
                    continue
                if not isinstance(answers, list) or len(answers) != len(todo):
                    self.metrics.plugin_failures.labels(plugin=plugin, hook=hook_name, kind="error").inc()
                    log.error("plugin %s answered %s with no list of one answer per item", plugin, hook_name)
                    continue
            else:
                answers = []
                for i in todo:
                    one = dict(shared)
                    for many, name in aligned.items():
                        one[name] = (results if many == spec.chained else kwargs[many])[i]
                    answers.append(await self._answer(spec.per_item or "", plugin, function, argnames, one, budget))
            for i, answer in zip(todo, answers):
                if answer is None:
                    continue
                if spec.mode is CallMode.ALL:
                    results[i].append((plugin, answer))
                else:
                    results[i] = answer
        return results

    async def _answer(
        self,
        hook_name: str,
        plugin: str,
        function: Any,
        argnames: tuple[str, ...],
        kwargs: dict[str, Any],
        budget: float,
    ) -> Any:
        """One implementation's answer, or None when it failed (counted and logged)."""
        state, result = self._call_one(hook_name, plugin, function, argnames, kwargs, budget)
        if state == PENDING:
            state, result = await self._await_answer(hook_name, plugin, result, budget)
        return result if state == DONE else None

    async def call(self, hook_name: str, **kwargs: Any) -> Any:
        """Call ``hook_name`` as its spec declares: ALL gives every non-None answer as (plugin,
        answer) in call order; FIRST the first non-None answer or None; CHAIN the value of the
        chained argument after every implementation (None keeps it)."""
        spec = self.spec_of(hook_name)
        budget = self.budgets[spec.budget]
        answers: list[tuple[str, Any]] = []
        for plugin, function, argnames in self.implementations(hook_name):
            # inline rather than through _answer: most hooks answer at once, and a coroutine
            # per implementation would cost more than many of them do
            state, result = self._call_one(hook_name, plugin, function, argnames, kwargs, budget)
            if state == PENDING:
                state, result = await self._await_answer(hook_name, plugin, result, budget)
            if state != DONE or result is None:
                continue
            if spec.mode is CallMode.FIRST:
                return result
            if spec.mode is CallMode.CHAIN:
                kwargs[spec.chained or ""] = result
            else:
                answers.append((plugin, result))
        if spec.mode is CallMode.FIRST:
            return None
        if spec.mode is CallMode.CHAIN:
            return kwargs[spec.chained or ""]
        return answers
