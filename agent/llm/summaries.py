"""The slow path: interest profiles written by an LLM (or a heuristic), refreshed off the hot path.

Contract with the rest of the agent (the profile dict)
------------------------------------------------------
The latest profile of a user lives in ``user.extras["profile"]`` (``UserState.extras``) and is
what ``recsys_profile`` returns, so it travels in ``Recommendations.profile`` (pushes, request/
reply and ``GET /v1/users/{id}/recommendations``)::

    {"interests": [str, ...],   # up to 6 short phrases (genres, themes), best first
     "avoid": [str, ...],       # up to 4 phrases the user skipped or disliked
     "summary": str,            # one or two sentences, never naming the user
     "source": "llm" | "heuristic",
     "generated_at": float,     # epoch seconds when it was written
     "based_on_events": int}    # the user's event count (UserState.event_count) it reflects

A retrieval source that wants the profile as a query vector embeds
``summary + ". " + "; ".join(interests)`` (``profile_text``) with the same sentence-transformers
model as the items; it must treat the dict as read-only and expect it to be replaced, not
mutated, by each refresh (so reading it needs no lock and a reader never sees half of one).

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
decides whether it closes again. The fast path only ever reads ``user.extras["profile"]``;
nothing here is awaited by it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import re
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any, Protocol, get_type_hints

from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client import Counter as PromCounter

from agent.config import ConfigError, coerce_option
from agent.llm.chat_client import (
    MAX_AVOID,
    MAX_INTERESTS,
    PROFILE_SCHEMA,
    ChatClient,
    Dialect,
    LLMError,
    validate_profile,
)
from agent.llm.prompts import REDACTED, HistoryEntry, build_messages
from agent.serving.metrics import EventCounter

log = logging.getLogger(__name__)

PROFILE_KEY = "profile"
MAX_BACKOFF_S = 10.0
FIRST_LANE_BATCH = 64
# While events wait to be applied, the slow path writes one profile per pause (per worker): a
# burst is ingested first, and the users' refreshes coalesce meanwhile instead of being
# written again and again, yet profiles never starve under a sustained load.
BUSY_PAUSE_S = 0.01


# --------------------------------------------------------------------------- options


@dataclass(slots=True)
class SummaryOptions:
    """``[plugins.summariser]`` options; see the README section on the LLM for each one."""

    base_url: str = ""
    model: str = ""
    dialect: str = Dialect.OPENAI_JSON_SCHEMA.value
    api_key_env: str = ""
    refresh_after_events: int = 5
    refresh_after_s: float = 300.0
    max_event_age_s: float = 600.0
    max_concurrency: int = 2
    max_pending_users: int = 1_000
    max_tracked_users: int = 1_000_000
    timeout_s: float = 10.0
    max_retries: int = 2
    backoff_s: float = 0.5
    breaker_failures: int = 5
    breaker_reset_s: float = 30.0
    history_items: int = 20
    send_categories: bool = True
    max_tokens: int = 320
    temperature: float = 0.0
    explain: bool = True

    @classmethod
    def parse(cls, raw: Mapping[str, Any], section: str = "plugins.summariser") -> SummaryOptions:
        """Typed, range-checked options; an unknown or bad option raises ConfigError naming it."""
        known = {f.name for f in fields(cls)}
        kinds = get_type_hints(cls)
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if key not in known:
                raise ConfigError(f"[{section}] has no option '{key}' (known: {', '.join(sorted(known))})")
            # Plugin options come from TOML only, typed already: "2" is not read as an integer.
            values[key] = coerce_option(f"[{section}] option '{key}'", kinds[key], value, parse_strings=False)
        options = cls(**values)
        options._check(section)
        return options

    def _check(self, section: str) -> None:
        checks: list[tuple[str, bool, str]] = [
            (
                "dialect",
                self.dialect in {d.value for d in Dialect},
                f"must be one of {', '.join(d.value for d in Dialect)}",
            ),
            (
                "base_url",
                not self.base_url or self.base_url.startswith(("http://", "https://")),
                "must be empty or start with http:// or https://",
            ),
            (
                "model",
                not self.base_url or bool(self.model),
                "is required when 'base_url' is set (the name the server serves)",
            ),
            ("refresh_after_events", self.refresh_after_events >= 1, "must be at least 1"),
            ("refresh_after_s", self.refresh_after_s > 0, "must be positive"),
            ("max_event_age_s", self.max_event_age_s >= 0, "must not be negative (0: no limit)"),
            ("max_concurrency", 1 <= self.max_concurrency <= 256, "must be between 1 and 256"),
            ("max_pending_users", self.max_pending_users >= 1, "must be at least 1"),
            ("max_tracked_users", self.max_tracked_users >= 1, "must be at least 1"),
            ("timeout_s", self.timeout_s > 0, "must be positive"),
            ("max_retries", 0 <= self.max_retries <= 10, "must be between 0 and 10"),
            ("backoff_s", self.backoff_s >= 0, "must not be negative"),
            ("breaker_failures", self.breaker_failures >= 1, "must be at least 1"),
            ("breaker_reset_s", self.breaker_reset_s > 0, "must be positive"),
            ("history_items", 1 <= self.history_items <= 200, "must be between 1 and 200"),
            ("max_tokens", 16 <= self.max_tokens <= 8192, "must be between 16 and 8192"),
            ("temperature", 0 <= self.temperature <= 2, "must be between 0 and 2"),
        ]
        for key, ok, reason in checks:
            if not ok:
                raise ConfigError(f"[{section}] option '{key}' {reason} (got {getattr(self, key)!r})")

    def api_key(self, environ: Mapping[str, str], section: str = "plugins.summariser") -> str | None:
        """The key from the environment variable named by ``api_key_env`` (keys never sit in config)."""
        if not self.api_key_env:
            return None
        key = environ.get(self.api_key_env)
        if not key:
            raise ConfigError(f"[{section}] option 'api_key_env' names {self.api_key_env}, which is not set or empty")
        return key


# --------------------------------------------------------------------------- profiles


def make_profile(
    fields_: Mapping[str, Any], *, source: str, generated_at: float, based_on_events: int
) -> dict[str, Any]:
    return {
        "interests": list(fields_["interests"]),
        "avoid": list(fields_["avoid"]),
        "summary": str(fields_["summary"]),
        "source": source,
        "generated_at": generated_at,
        "based_on_events": based_on_events,
    }


def profile_text(profile: Mapping[str, Any]) -> str:
    """The text a retrieval source embeds for a profile (see the module docstring)."""
    interests = "; ".join(str(i) for i in profile.get("interests") or [])
    summary = str(profile.get("summary") or "")
    return f"{summary}. {interests}".strip(". ") if interests else summary


# How much one interaction says about a liking; dislike and skip count against a category.
_POSITIVE = {"view": 1.0, "click": 1.0, "rate": 1.5, "like": 2.0, "add_to_cart": 2.0, "purchase": 3.0, "other": 0.5}
_STOPWORDS = frozenset(
    "the a an and or of in on at to for from with by as is it its into over under about after before "
    "part vol volume chapter episode season edition collection movie film show series new old my your "
    "his her their our this that these those ii iii iv de la le les el los das der die und".split()
    + [REDACTED.strip("[]")]
)
_WORD = re.compile(r"[^\W\d_][\w'-]{2,}")


@functools.lru_cache(maxsize=65_536)
def _title_terms(title: str) -> frozenset[str]:
    # cached: the same titles recur in user after user's history
    title = re.sub(r"\(\d{4}\)", " ", title)
    return frozenset({w.lower().strip("'-") for w in _WORD.findall(title)} - _STOPWORDS)


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def heuristic_fields(entries: list[HistoryEntry]) -> dict[str, Any]:
    """A profile without an LLM: categories weighted by event type and recency, plus title words
    that recur across several items. Same shape as the LLM's answer; deterministic."""
    liked: Counter[str] = Counter()
    disliked: Counter[str] = Counter()
    terms: Counter[str] = Counter()
    display: dict[str, str] = {}
    n = len(entries)
    for position, entry in enumerate(entries):
        recency = 0.5 + 0.5 * (position + 1) / n
        for category in entry.categories:
            display.setdefault(category.lower(), category)
            if entry.negative:
                disliked[category.lower()] += recency
            else:
                liked[category.lower()] += _POSITIVE.get(entry.event, 1.0) * recency
        if not entry.negative:
            terms.update(_title_terms(entry.title))
    categories = [c for c, _ in sorted(liked.items(), key=lambda kv: (-kv[1], kv[0]))][:4]
    recurring = [t for t, count in sorted(terms.items(), key=lambda kv: (-kv[1], kv[0])) if count >= 2]
    recurring = [t for t in recurring if t not in categories][: max(0, MAX_INTERESTS - len(categories))][:3]
    interests = [display[c] for c in categories] + recurring
    avoid = [
        display[c] for c, score in sorted(disliked.items(), key=lambda kv: (-kv[1], kv[0])) if score > liked.get(c, 0.0)
    ][:MAX_AVOID]

    parts: list[str] = []
    if categories:
        parts.append(f"Mostly engages with {_join([display[c] for c in categories[:3]])} lately")
    else:
        positives = [e.title for e in entries if not e.negative][-3:]
        if positives:
            parts.append(f"Recently engaged with {_join(positives)}")
    if recurring:
        parts.append(f"recurring themes: {_join(recurring)}")
    sentence = "; ".join(parts) + "." if parts else ""
    if avoid:
        sentence += f" Tends to skip {_join(avoid)}."
    summary = sentence.strip() or "Not enough activity yet to describe a taste."
    return {"interests": interests, "avoid": avoid, "summary": summary}


# --------------------------------------------------------------------------- circuit breaker


class BreakerState(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Closed -> (``threshold`` consecutive failures) -> open -> (``reset_s``) -> half-open: one
    trial call; its success closes the breaker, its failure opens it again."""

    def __init__(self, threshold: int, reset_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self.reset_s = reset_s
        self.clock = clock
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self._trial = False

    def allow(self) -> bool:
        """May a call be made now? In half-open state only one caller gets True."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN and self.clock() - self.opened_at >= self.reset_s:
            self.state = BreakerState.HALF_OPEN
            self._trial = False
        if self.state is BreakerState.HALF_OPEN and not self._trial:
            self._trial = True
            return True
        return False

    def success(self) -> None:
        self.state = BreakerState.CLOSED
        self.failures = 0
        self._trial = False

    def failure(self) -> None:
        self.failures += 1
        if self.state is BreakerState.HALF_OPEN or self.failures >= self.threshold:
            if self.state is not BreakerState.OPEN:
                log.warning(
                    "LLM circuit breaker open after %d failures: heuristic summaries for %.0f s",
                    self.failures,
                    self.reset_s,
                )
            self.state = BreakerState.OPEN
            self.opened_at = self.clock()
        self._trial = False

    def abandon(self) -> None:
        """A call was cancelled before it could tell success from failure (shutdown)."""
        self._trial = False


# --------------------------------------------------------------------------- metrics


class SummaryMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.summaries = PromCounter("recsys_summaries", "Profiles written, by source", ["source"], registry=r)
        self.llm_errors = PromCounter(
            "recsys_summary_llm_errors", "LLM calls that gave no usable profile", ["kind"], registry=r
        )
        # one per event: a plain count, exported when scraped
        self.requests = EventCounter(
            "recsys_summary_requests", "Refresh requests, by what became of them", r, label="outcome"
        )
        self.pending = Gauge("recsys_summary_pending", "Users waiting for a summary worker", registry=r)
        self.tracked = Gauge("recsys_summary_tracked", "Users with events not summarised yet", registry=r)
        self.in_flight = Gauge("recsys_summary_in_flight", "Summaries being written", registry=r)
        self.breaker_open = Gauge("recsys_summary_breaker_open", "1 while the LLM circuit breaker is open", registry=r)
        self.llm_seconds = Histogram(
            "recsys_summary_llm_seconds",
            "Latency of successful LLM calls",
            buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32),
            registry=r,
        )
        self.wait_seconds = Histogram(
            "recsys_summary_wait_seconds",
            "From becoming due to a worker starting the summary",
            buckets=(0.01, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 300),
            registry=r,
        )


# --------------------------------------------------------------------------- scheduler


@dataclass(slots=True)
class Snapshot:
    """What a summary is computed from, taken when a worker starts on the user."""

    entries: list[HistoryEntry]
    event_count: int
    has_profile: bool
    # identity of the user's state when the snapshot was taken: a result is stored only if the
    # user still has that state (not forgotten, not evicted and re-created meanwhile)
    owner: object


class ProfileSource(Protocol):
    def snapshot(self, user_id: str) -> Snapshot | None: ...

    def unsummarised(self, user_id: str) -> int: ...

    def store(self, user_id: str, snapshot: Snapshot, profile: dict[str, Any], *, final: bool) -> None:
        """Keep ``profile``; ``final`` is False for a stop-gap heuristic profile, which must not
        count as having summarised the user's events (the LLM still owes its profile)."""
        ...


# Bounds its own time and reports a timeout as LLMTimeout (llm_summariser's ChatClient does, with
# ``timeout_s``): one timer per call, where the I/O is, so the scheduler adds none.
LLMFunction = Callable[[list[HistoryEntry]], Awaitable[dict[str, Any]]]


def llm_summariser(client: ChatClient, *, send_categories: bool) -> LLMFunction:
    """The LLM path: prompt from the entries, constrained completion, schema validation."""

    fields_sent = "title, event type" + (", categories" if send_categories else "")

    async def summarise(entries: list[HistoryEntry]) -> dict[str, Any]:
        # What leaves the process, described without any of it: how many items and which fields.
        log.debug("summary request: %d items (%s)", len(entries), fields_sent)
        completion = await client.complete_json(
            build_messages(entries, send_categories=send_categories), PROFILE_SCHEMA
        )
        return validate_profile(completion.data)

    return summarise


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
        # the user's state is gone (Snapshot.owner).

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
        self, user_id: str, snapshot: Snapshot, fields_: dict[str, Any], source: str, *, final: bool
    ) -> dict[str, Any]:
        profile = make_profile(
            fields_, source=source, generated_at=self.wall_clock(), based_on_events=snapshot.event_count
        )
        self.source.store(user_id, snapshot, profile, final=final)
        self.metrics.summaries.labels(source=source).inc()
        self.counts[f"summaries_{source}"] += 1
        return profile

    def _still_held(self, user_id: str, snapshot: Snapshot) -> bool:
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
