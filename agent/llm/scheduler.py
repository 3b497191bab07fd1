"""The slow path's scheduler: when each user's profile is refreshed, by which worker, and what
happens when the LLM fails (retries, the circuit breaker, the heuristic in its place).

Scheduling
----------
``SummaryScheduler`` keeps, per user, at most one entry in exactly one of four places:

- ``waiting``: has new events, not due yet (ordered by the time of the first new event);
- ``urgent``: has ``refresh_after_events`` new events, waiting for room in ``pending``;
- ``pending``: at most ``max_pending_users``, served oldest first by ``max_concurrency`` workers;
- ``in flight``: being summarised; new events only mark it, and on completion it is re-checked.

A user becomes due after ``refresh_after_events`` new events or ``refresh_after_s`` seconds after
its first new event, whichever is first. Room in ``pending`` goes to whoever became due first
(merging ``waiting`` and ``urgent`` by due time), so a very active user cannot starve a quiet
one, and a user is never queued twice (coalescing). ``waiting`` + ``urgent`` together are capped
(``max_tracked_users``); beyond that a user is tracked again at its next event. While events
wait to be applied (``AgentContext.backlog``), each lane writes one profile per short pause, so a
burst is ingested first and refreshes coalesce meanwhile. Memory is
therefore bounded by the number of users, never by the number of events.

Each LLM call runs under ``timeout_s``, the chat client's HTTP timeout (an ``LLMTimeout``).
Retryable failures (connection, 5xx, timeout) are retried ``max_retries`` times with exponential
backoff and jitter. ``breaker_failures`` consecutive failures open a circuit breaker: for
``breaker_reset_s`` no call is made and the heuristic summariser answers; then one trial call
decides whether it closes again. The fast path only ever reads ``user.extras[PROFILE]``;
nothing here is awaited by it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from agent.llm.chat_client import LLMError
from agent.llm.circuit_breaker import BreakerState, CircuitBreaker
from agent.llm.profiles import make_profile
from agent.llm.prompts import HistoryEntry
from agent.llm.summarisers import LLMFunction, heuristic_fields
from agent.llm.summary_metrics import SummaryMetrics
from agent.llm.summary_options import SummaryOptions

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 10.0
FIRST_LANE_BATCH = 64
# While events wait to be applied, the slow path writes one profile per pause (per worker): a
# burst is ingested first, and the users' refreshes coalesce meanwhile instead of being
# written again and again, yet profiles never starve under a sustained load.
BUSY_PAUSE_S = 0.01


@dataclass(slots=True)
class HistorySnapshot:
    """What a summary is computed from, taken when a worker starts on the user."""

    entries: list[HistoryEntry]
    event_count: int
    has_profile: bool
    # identity of the user's state when the snapshot was taken: a result is stored only if the
    # user still has that state (not forgotten, not evicted and re-created meanwhile)
    owner: object


class ProfileSource(Protocol):
    def snapshot(self, user_id: str) -> HistorySnapshot | None: ...

    def unsummarised(self, user_id: str) -> int: ...

    def store(self, user_id: str, snapshot: HistorySnapshot, profile: dict[str, Any], *, final: bool) -> None:
        """Keep ``profile``; ``final`` is False for a stop-gap heuristic profile, which must not
        count as having summarised the user's events (the LLM still owes its profile)."""
        ...


class _BreakerOpen(LLMError):
    kind = "breaker_open"


class _Forgotten(LLMError):
    kind = "forgotten"


class SummaryScheduler:
    def __init__(
        self,
        options: SummaryOptions,
        source: ProfileSource,
        llm: LLMFunction | None,
        *,
        metrics: SummaryMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        backlog: Callable[[], int] = lambda: 0,
    ) -> None:
        self.options = options
        # events delivered to the agent and not applied yet (AgentContext.backlog)
        self.backlog = backlog
        self.source = source
        self.llm = llm
        self.metrics = metrics or SummaryMetrics(CollectorRegistry())
        self.clock = clock
        self.wall_clock = wall_clock
        self.rng = rng or random.Random()
        self.breaker = CircuitBreaker(options.breaker_failures, options.breaker_reset_s, clock)
        self._waiting: OrderedDict[str, float] = OrderedDict()  # user -> first new event (clock)
        self._urgent: OrderedDict[str, float] = OrderedDict()  # user -> when it became due
        self._pending: OrderedDict[str, float] = OrderedDict()  # user -> when it became due
        self._in_flight: set[str] = set()
        # users with no profile at all: the fast lane gives them a heuristic one within
        # milliseconds, whatever the LLM queue looks like
        self._first: OrderedDict[str, None] = OrderedDict()
        self._first_ready = asyncio.Event()
        self._ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.counts: Counter[str] = Counter()
        self._export_gauges()

    # ---- called from the hot path: O(1), never awaits

    @property
    def running(self) -> bool:
        return bool(self._tasks)

    def note_event(self, user_id: str, new_events: int, has_profile: bool = True) -> None:
        """A user has ``new_events`` events its profile does not reflect yet."""
        if not has_profile and user_id not in self._first:
            if len(self._first) < self.options.max_tracked_users:
                self._first[user_id] = None
                self._first_ready.set()
        if user_id in self._pending or user_id in self._in_flight or user_id in self._urgent:
            self._count("coalesced")
            return
        now = self.clock()
        if new_events >= self.options.refresh_after_events:
            self._waiting.pop(user_id, None)
            if self._track(self._urgent, user_id, now):
                self._count("due")
        elif user_id in self._waiting:
            self._count("coalesced")
        elif self._track(self._waiting, user_id, now):
            self._count("tracked")
        self._refill(now)

    def forget(self, user_id: str) -> None:
        for queue in (self._waiting, self._urgent, self._pending, self._first):
            queue.pop(user_id, None)
        # An in-flight summary of this user finishes, but ProfileSource.store refuses it because
        # the user's state is gone (HistorySnapshot.owner).

    @property
    def idle(self) -> bool:
        """Nothing due, queued or being written (users merely waiting for their window don't count)."""
        return not (self._urgent or self._pending or self._in_flight)

    async def wait_idle(self, poll_s: float = 0.01) -> None:
        """Wait until :attr:`idle`; a replay uses it to let summaries catch up with the events."""
        while not self.idle:
            await asyncio.sleep(poll_s)

    def stats(self) -> dict[str, Any]:
        return {
            "waiting": len(self._waiting),
            "urgent": len(self._urgent),
            "pending": len(self._pending),
            "in_flight": len(self._in_flight),
            "breaker": self.breaker.state.value,
            **self.counts,
        }

    def _track(self, queue: OrderedDict[str, float], user_id: str, now: float) -> bool:
        if len(self._waiting) + len(self._urgent) >= self.options.max_tracked_users:
            self._count("dropped")
            return False
        queue[user_id] = now
        return True

    def _count(self, outcome: str) -> None:
        self.counts[outcome] += 1
        self.metrics.requests.inc(label=outcome)

    def _refill(self, now: float) -> None:
        """Move due users into ``pending`` while there is room, earliest due first."""
        moved = False
        horizon = self.options.refresh_after_s
        while len(self._pending) < self.options.max_pending_users:
            waiting_due = urgent_due = None
            if self._waiting:
                user, since = next(iter(self._waiting.items()))
                if now - since >= horizon:
                    waiting_due = (since + horizon, user)
            if self._urgent:
                user, became_due = next(iter(self._urgent.items()))
                urgent_due = (became_due, user)
            if waiting_due is None and urgent_due is None:
                break
            if urgent_due is None or (waiting_due is not None and waiting_due[0] <= urgent_due[0]):
                assert waiting_due is not None
                due_at, user = waiting_due
                del self._waiting[user]
            else:
                due_at, user = urgent_due
                del self._urgent[user]
            self._pending[user] = due_at
            moved = True
        if moved:
            self._ready.set()

    def _export_gauges(self) -> None:
        # read when metrics are scraped: the hot path (note_event) sets nothing
        self.metrics.pending.set_function(lambda: len(self._pending))
        self.metrics.tracked.set_function(lambda: len(self._waiting) + len(self._urgent))
        self.metrics.in_flight.set_function(lambda: len(self._in_flight))
        self.metrics.breaker_open.set_function(lambda: 1 if self.breaker.state is BreakerState.OPEN else 0)

    # ---- the slow path

    @asynccontextmanager
    async def running_tasks(self) -> AsyncIterator[SummaryScheduler]:
        """Workers and the timer sweep run inside this block; leaving it cancels them."""
        self._tasks = [
            asyncio.create_task(self._worker(), name=f"summary-worker-{i}") for i in range(self.options.max_concurrency)
        ]
        self._tasks.append(asyncio.create_task(self._sweeper(), name="summary-sweeper"))
        self._tasks.append(asyncio.create_task(self._first_lane(), name="summary-first-profiles"))
        try:
            yield self
        finally:
            tasks, self._tasks = self._tasks, []
            for task in tasks:
                task.cancel()
            for task in tasks:
                with suppress(asyncio.CancelledError):
                    await task

    async def _sweeper(self) -> None:
        # Users due by time (not by count) are found here; the tick is a fraction of the window.
        tick = min(1.0, max(0.02, self.options.refresh_after_s / 4))
        while True:
            await asyncio.sleep(tick)
            self._refill(self.clock())

    async def _first_lane(self) -> None:
        # Heuristic first profiles, a few users at a time so the event loop stays responsive.
        while True:
            await self._first_ready.wait()
            self._first_ready.clear()
            while self._first:
                busy = self.backlog() > 0
                for _ in range(1 if busy else min(FIRST_LANE_BATCH, len(self._first))):
                    user_id, _ = self._first.popitem(last=False)
                    snapshot = self.source.snapshot(user_id)
                    if snapshot is not None and snapshot.entries and not snapshot.has_profile:
                        # With an LLM it is a stop-gap until the LLM's profile; without one the
                        # heuristic is the summariser, and this profile covers the user's events
                        # as well as any refresh would (one write less per new user).
                        final = self.llm is None
                        self._store(user_id, snapshot, heuristic_fields(snapshot.entries), "heuristic", final=final)
                        if final and not self.source.unsummarised(user_id):
                            # covered: a refresh queued meanwhile would write the same again
                            for queue in (self._waiting, self._urgent, self._pending):
                                queue.pop(user_id, None)
                await asyncio.sleep(BUSY_PAUSE_S if busy else 0)

    async def _worker(self) -> None:
        while True:
            while not self._pending:
                self._ready.clear()
                await self._ready.wait()
            if self.backlog():
                await asyncio.sleep(BUSY_PAUSE_S)
                if not self._pending:
                    continue
            user_id, due_at = self._pending.popitem(last=False)
            self._in_flight.add(user_id)
            self.metrics.wait_seconds.observe(max(0.0, self.clock() - due_at))
            self._refill(self.clock())
            profile = None
            try:
                profile = await self.summarise_user(user_id)
            except Exception:
                # A bug must not kill a worker: the pool would shrink silently.
                log.exception("summary worker failed")
            finally:
                self._in_flight.discard(user_id)
                self._after(user_id, summarised=profile is not None)
            # Without an LLM a summary never awaits: yield, so that a queue of users cannot
            # hold the event loop.
            await asyncio.sleep(0)

    def _after(self, user_id: str, *, summarised: bool) -> None:
        """Re-check a user whose summary just finished: events may have arrived meanwhile.

        A user with nothing to summarise (none of their items in the catalog) or whose summary
        failed is not queued again here: that would retry at once, forever. Their next event
        brings them back."""
        remaining = self.source.unsummarised(user_id) if summarised else 0
        if remaining > 0:
            now = self.clock()
            if remaining >= self.options.refresh_after_events:
                self._track(self._urgent, user_id, now)
            else:
                self._track(self._waiting, user_id, now)
        self._refill(self.clock())

    async def summarise_user(self, user_id: str) -> dict[str, Any] | None:
        """Write and store one user's profile now; returns it (None when there is nothing to do)."""
        snapshot = self.source.snapshot(user_id)
        if snapshot is None or not snapshot.entries:
            return None
        fields_: dict[str, Any] | None = None
        if self.llm is not None and self.breaker.allow():
            if not snapshot.has_profile:
                # A first profile at once from the heuristic, so the fast path has something
                # while the LLM thinks; the LLM's answer replaces it.
                self._store(user_id, snapshot, heuristic_fields(snapshot.entries), "heuristic", final=False)
            try:
                fields_ = await self._ask_llm(snapshot.entries, lambda: self._still_held(user_id, snapshot))
            except LLMError as exc:
                # The message names the failure, never the prompt or the user.
                log.warning("LLM summary failed (%s): %s; using the heuristic profile", exc.kind, exc)
        if fields_ is None:
            return self._store(user_id, snapshot, heuristic_fields(snapshot.entries), "heuristic", final=True)
        return self._store(user_id, snapshot, fields_, "llm", final=True)

    def _store(
        self, user_id: str, snapshot: HistorySnapshot, fields_: dict[str, Any], source: str, *, final: bool
    ) -> dict[str, Any]:
        profile = make_profile(
            fields_, source=source, generated_at=self.wall_clock(), based_on_events=snapshot.event_count
        )
        self.source.store(user_id, snapshot, profile, final=final)
        self.metrics.summaries.labels(source=source).inc()
        self.counts[f"summaries_{source}"] += 1
        return profile

    def _still_held(self, user_id: str, snapshot: HistorySnapshot) -> bool:
        current = self.source.snapshot(user_id)
        return current is not None and current.owner is snapshot.owner

    async def _ask_llm(
        self, entries: list[HistoryEntry], still_held: Callable[[], bool] = lambda: True
    ) -> dict[str, Any]:
        """The LLM's fields, with retries and the breaker; the caller holds breaker.allow().
        ``still_held`` is asked before every retry: a user forgotten meanwhile is not sent again."""
        assert self.llm is not None
        attempts = 1 + self.options.max_retries
        for attempt in range(attempts):
            if attempt > 0 and not still_held():
                raise _Forgotten("the user was forgotten while the summary was retried")
            if attempt > 0 and not self.breaker.allow():
                raise _BreakerOpen("the circuit breaker opened while retrying")
            started = time.perf_counter()
            try:
                result = await self.llm(entries)
            except LLMError as exc:
                error: LLMError = exc
            except asyncio.CancelledError:
                self.breaker.abandon()
                raise
            except Exception as exc:
                log.exception("LLM summariser raised unexpectedly")
                error = LLMError(f"unexpected {exc.__class__.__name__}")
            else:
                self.breaker.success()
                self.metrics.llm_seconds.observe(time.perf_counter() - started)
                self.counts["llm_ok"] += 1
                return result
            self.metrics.llm_errors.labels(kind=error.kind).inc()
            self.counts[f"llm_{error.kind}"] += 1
            # Every unusable answer counts: a server that only returns garbage is as useless
            # as one that is down, and the breaker then saves its time and ours.
            self.breaker.failure()
            if not error.retryable or attempt == attempts - 1:
                raise error
            await asyncio.sleep(self._backoff(attempt))
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int) -> float:
        # Exponential, capped, with jitter so that workers failing together do not retry together.
        delay = min(MAX_BACKOFF_S, self.options.backoff_s * (2**attempt))
        return delay * (0.5 + 0.5 * self.rng.random())
