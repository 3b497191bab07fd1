"""The recommendation pipeline: apply events and compute recommendations through the hooks.

It knows nothing about NATS or HTTP, so the live agent and ``recsys-agent replay`` run exactly
the same stages.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import pluggy

from agent.config import Settings
from agent.context import AgentContext
from agent.hooks.runner import HookRunner
from agent.pipeline.catalog import Catalog
from agent.pipeline.taste_signals import event_signal
from agent.pipeline.user_state import Deduplicator, Interaction, UserState, UserStore
from agent.pipeline.values import Candidates, Query, Scored
from agent.serving.metrics import Metrics
from agent.users.jsonable import jsonable
from agent.wire.contract import Event, InvalidMessage, Item, Recommendations, RecommendedItem

log = logging.getLogger(__name__)

# Sources are asked for this many times k so that rerankers (diversity, filters) have room.
CANDIDATE_FACTOR = 3


class ApplyOutcome(Enum):
    APPLIED = "applied"
    # the same stream message again: already applied, but still owed its ack and push
    REDELIVERY = "redelivery"
    # another message with an event id already applied: counted once, no push
    DUPLICATE = "duplicate"
    # stored before its user was forgotten (and erased since): never applied, no push
    FORGOTTEN = "forgotten"


# users forgotten lately, whose erased events may still be in hand somewhere (fetched, not
# applied yet): that many are remembered, and only for that
MAX_FORGOTTEN = 10_000


# A person reads two reasons at most; the weaker sources' would only cost time to compute.
MAX_REASONS = 2


def _explain(ranked: list[Scored], lists: list[Candidates]) -> None:
    """Reasons for the final items only, strongest source first (sources may compute them lazily)."""
    by_source: dict[str, Candidates] = {}
    for cands in lists:
        by_source.setdefault(cands.source, cands)
    for entry in ranked:
        for source in entry.sources:
            if len(entry.reasons) >= MAX_REASONS:
                break
            cands = by_source.get(source)
            reason = cands.reason_for(entry.slot) if cands is not None else ""
            if reason and reason not in entry.reasons:
                entry.reasons.append(reason)


def as_lifespan(plugin: str, answer: object) -> AbstractAsyncContextManager[object]:
    """A lifespan hook's answer as an async context manager: an async generator (the form the
    spec asks for) is wrapped; an async context manager is taken as it is."""
    if isinstance(answer, AsyncGenerator):
        # the standard library's semantics for setup, teardown and exceptions, for a
        # generator object instead of a generator function
        return asynccontextmanager(lambda: answer)()
    if isinstance(answer, AbstractAsyncContextManager):
        return answer
    raise TypeError(f"plugin {plugin}: recsys_lifespan must be an async generator, not {type(answer).__name__}")


@dataclass(slots=True)
class _Wave:
    """Accepted events to hand to the apply hooks together: no user twice."""

    events: list[Event] = field(default_factory=list)
    users: list[UserState] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    signals: list[float] = field(default_factory=list)
    user_ids: set[str] = field(default_factory=set)

    def add(self, event: Event, user: UserState, slot: int, signal: float) -> None:
        self.events.append(event)
        self.users.append(user)
        self.slots.append(slot)
        self.signals.append(signal)
        self.user_ids.add(user.user_id)


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        pm: pluggy.PluginManager,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.pm = pm
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.catalog = Catalog()
        self.users = UserStore(settings.history_length, settings.max_users)
        self.dedup = Deduplicator(settings.dedup_capacity)
        self.hooks = HookRunner(pm, self.metrics, settings.stage_timeout_ms / 1000, settings.catalog_timeout_s)
        # made here, so that a misspelt hook name fails the start
        self._background_done = self.hooks.caller("recsys_settle")
        self._validate = self.hooks.caller("recsys_validate_event")
        self._enrich = self.hooks.caller("recsys_enrich_event")
        self._apply = self.hooks.batch_caller("recsys_apply_events")
        self._upserted = self.hooks.caller("recsys_catalog_upsert")
        self._deleted = self.hooks.caller("recsys_catalog_delete")
        self._candidates = self.hooks.batch_caller("recsys_candidates_batch")
        self._fuse = self.hooks.batch_caller("recsys_fuse_batch")
        self._rerank = self.hooks.batch_caller("recsys_rerank_batch")
        self._profile = self.hooks.caller("recsys_profile")
        self._forget = self.hooks.caller("recsys_forget_user")
        self._export = self.hooks.caller("recsys_export_user")
        # user id -> the last stream sequence when they were forgotten
        self._forgotten: OrderedDict[str, int] = OrderedDict()
        self.context = AgentContext(
            settings=settings, catalog=self.catalog, users=self.users, metrics=self.metrics, clock=lambda: self.clock()
        )

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Pipeline]:
        """Enter every plugin's lifespan (in call order) and exit them in reverse."""
        async with AsyncExitStack() as stack:
            for plugin, manager in await self._lifespans():
                log.debug("starting plugin %s", plugin)
                await stack.enter_async_context(manager)
            yield self

    async def _lifespans(self) -> list[tuple[str, AbstractAsyncContextManager[object]]]:
        # Lifespans are entered directly (not through the isolating runner) so that a plugin
        # that cannot start stops the agent instead of leaving it half-configured.
        managers = []
        for plugin, function, argnames in self.hooks.implementations("recsys_lifespan"):
            answer = function(**{name: self.context for name in argnames})
            if answer is not None:
                managers.append((plugin, as_lifespan(plugin, answer)))
        return managers

    async def settle(self) -> list[str]:
        """Wait for the plugins' background work; returns the failures they report, each naming
        its plugin (see ``recsys_settle``)."""
        answers = await self._background_done()
        # only a text reports a failure (see the spec); other results of an awaitable are not one
        return [f"{answer} (plugin {plugin})" for plugin, answer in answers if isinstance(answer, str)]

    async def validate(self, event: Event) -> None:
        """Raise InvalidMessage with the first reason a validation hook gives; what the HTTP API
        runs before it stores an event, so that it refuses at once what the consumer would
        dead-letter."""
        for plugin, reason in await self._validate(event=event, catalog=self.catalog):
            raise InvalidMessage(f"{reason} (plugin {plugin})")

    def event_key(self, event: Event, seq: int) -> str:
        return f"id:{event.id}" if event.id is not None else f"seq:{seq}"

    async def apply_event(self, event: Event, seq: int = 0) -> ApplyOutcome:
        """Validate (hooks), deduplicate and apply one parsed event.

        Raises InvalidMessage when a validation hook rejects the event. ``seq`` is the stream
        sequence of the message that carried it (0 when there is no stream).
        """
        (outcome,) = await self.apply_events([(event, seq)])
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def apply_events(self, batch: list[tuple[Event, int]]) -> list[ApplyOutcome | Exception]:
        """Validate, deduplicate and apply a batch of parsed events, in order: one outcome per
        event, or the exception that kept it from being applied (InvalidMessage when a
        validation hook rejected it).

        The apply hooks are called once per wave: the longest run of events in which no user
        appears twice, so that every plugin sees each user's state exactly as it would one
        event at a time.
        """
        started = time.perf_counter()
        outcomes: list[ApplyOutcome | Exception] = []
        wave = _Wave()
        for event, seq in batch:
            try:
                prepared = await self._prepare(event, seq)
            except Exception as exc:
                outcomes.append(exc)
                continue
            if isinstance(prepared, ApplyOutcome):
                outcomes.append(prepared)
                continue
            if prepared.user_id in wave.user_ids:
                await self._apply_wave(wave)
                wave = _Wave()
            self._record(prepared, wave)
            outcomes.append(ApplyOutcome.APPLIED)
        await self._apply_wave(wave)
        applied = outcomes.count(ApplyOutcome.APPLIED)
        if applied:
            self.metrics.events_applied.inc(applied)
            self.metrics.apply_seconds.observe((time.perf_counter() - started) / applied)
        return outcomes

    async def _prepare(self, event: Event, seq: int) -> Event | ApplyOutcome:
        """The event to apply after validation, deduplication and enrichment, or the outcome
        that says why nothing is to be applied; raises what keeps it from being applied."""
        await self.validate(event)
        if seq and self._forgotten and self._was_erased(event.user_id, seq):
            return ApplyOutcome.FORGOTTEN
        key = self.event_key(event, seq)
        verdict = self.dedup.check(key, seq)
        if verdict == "duplicate":
            self.metrics.events_duplicate.inc()
            return ApplyOutcome.DUPLICATE
        if verdict == "redelivery":
            self.metrics.events_redelivered.inc()
            return ApplyOutcome.REDELIVERY
        try:
            enriched = await self._enrich(event=event, catalog=self.catalog)
            if not isinstance(enriched, Event) or enriched.item_id is None:
                raise TypeError(f"an enrich hook returned {type(enriched).__name__} without an item, not an event")
        except BaseException:
            # Nothing applied yet: the redelivery that the disposition rule asks for must
            # apply it, not take it for one already applied.
            self.dedup.discard(key)
            raise
        return enriched

    def _record(self, event: Event, wave: _Wave) -> None:
        """The core's own state change for one event, before any plugin sees it."""
        assert event.item_id is not None
        slot = self.catalog.ensure_slot(event.item_id)
        user = self.users.get_or_create(event.user_id)
        signal = event_signal(event.type, event.value, self.settings.rating_max)
        user.recent.append(Interaction(slot=slot, type=event.type, ts=event.ts, signal=signal, value=event.value))
        user.seen.add(slot)
        user.event_count += 1
        user.last_ts = max(user.last_ts, event.ts)
        wave.add(event, user, slot, signal)

    async def _apply_wave(self, wave: _Wave) -> None:
        if wave.events:
            await self._apply(
                events=wave.events, users=wave.users, slots=wave.slots, signals=wave.signals, catalog=self.catalog
            )

    async def upsert_items(self, items: list[Item], ts: float | None = None) -> None:
        """Add or replace items; ``ts``: when they entered the catalog (default: now, by the
        pipeline's clock)."""
        if not items:
            return
        slots, changed = [], []
        for item in items:
            slot, was_changed = self.catalog.upsert(item)
            slots.append(slot)
            changed.append(was_changed)
        await self._upserted(items=items, slots=slots, changed=changed, ts=self.clock() if ts is None else ts)
        self.metrics.catalog_upserts.inc(len(items))
        self.metrics.items.set(self.catalog.active_count())

    async def delete_item(self, item_id: str) -> bool:
        slot = self.catalog.delete(item_id)
        if slot is None:
            return False
        await self._deleted(item_id=item_id, slot=slot)
        self.metrics.catalog_deletes.inc()
        self.metrics.items.set(self.catalog.active_count())
        return True

    def make_query(
        self,
        user_id: str,
        k: int,
        *,
        categories: tuple[str, ...] = (),
        exclude: tuple[str, ...] = (),
        event: Event | None = None,
    ) -> Query:
        user = self.users.get(user_id)
        if user is None:
            # Unknown users are not stored by a read: a query must not grow memory.
            user = UserState(user_id=user_id, recent=deque(maxlen=self.settings.history_length))
        # The user's own set serves as is; a copy only when the request excludes more.
        excluded = user.seen
        extra = {slot for slot in map(self.catalog.slot, exclude) if slot is not None}
        if extra:
            excluded = excluded | extra
        return Query(
            user=user,
            k=k,
            now=self.clock(),
            catalog=self.catalog,
            n_candidates=max(k * CANDIDATE_FACTOR, 30),
            exclude=excluded,
            categories=categories,
            event=event,
        )

    async def rank(self, query: Query) -> list[Scored]:
        """Candidates from every source, fused, reranked, cut to ``query.k``."""
        return (await self.rank_batch([query]))[0]

    async def rank_batch(self, queries: list[Query]) -> list[list[Scored]]:
        """``rank`` for several queries of distinct users at once: each stage is called once for
        the batch (plugins of the one-query form once per query)."""
        if not queries:
            return []
        lists: list[list[Candidates]] = [[] for _ in queries]
        for i, answers in enumerate(await self._candidates(queries=queries)):
            for plugin, answer in answers:
                for cands in [answer] if isinstance(answer, Candidates) else answer:
                    if isinstance(cands, Candidates):
                        cands.plugin = plugin
                        lists[i].append(cands)
        fused = [found or [] for found in await self._fuse(queries=queries, candidates=lists)]
        ranked = await self._rerank(queries=queries, ranked=fused)
        finals = []
        for query, found, candidates in zip(queries, ranked, lists):
            final = list(found)[: query.k]
            _explain(final, candidates)
            finals.append(final)
        return finals

    async def recommend(
        self,
        user_id: str,
        k: int | None = None,
        *,
        categories: tuple[str, ...] = (),
        exclude: tuple[str, ...] = (),
        event_ids: list[str] | None = None,
    ) -> Recommendations:
        query = self.make_query(user_id, k or self.settings.default_k, categories=categories, exclude=exclude)
        return (await self.recommend_batch([query], [event_ids]))[0]

    async def recommend_batch(
        self, queries: list[Query], event_ids: list[list[str] | None] | None = None
    ) -> list[Recommendations]:
        """Recommendations for several queries of distinct users, ranked in one batch;
        ``event_ids[i]``: the events that query ``i``'s push reflects."""
        started = time.perf_counter()
        ranked = await self.rank_batch(queries)
        generated_at = time.time()
        out = []
        for i, (query, found) in enumerate(zip(queries, ranked)):
            profile = await self._profile(user=query.user)
            items = [RecommendedItem(item_id=self.catalog.ids[s.slot], score=s.score, reasons=s.reasons) for s in found]
            recs = Recommendations(user_id=query.user.user_id, items=items, generated_at=generated_at, profile=profile)
            ids = event_ids[i] if event_ids is not None else None
            if ids:
                recs.event_id = ids[-1]
                recs.event_ids = list(ids)
            out.append(recs)
        elapsed = (time.perf_counter() - started) / len(queries) if queries else 0.0
        for _ in queries:
            self.metrics.recommend_seconds.observe(elapsed)
        return out

    def _was_erased(self, user_id: str, seq: int) -> bool:
        return seq <= self._forgotten.get(user_id, 0)

    async def forget_user(self, user_id: str, up_to_seq: int = 0) -> bool:
        """Drop everything held about the user, the plugins' part included (recsys_forget_user);
        whether the agent held them. An event of theirs stored at or before ``up_to_seq`` (all
        erased by then) is never applied after this, even if it was already fetched."""
        if up_to_seq:
            self._forgotten[user_id] = max(up_to_seq, self._forgotten.get(user_id, 0))
            self._forgotten.move_to_end(user_id)
            if len(self._forgotten) > MAX_FORGOTTEN:
                self._forgotten.popitem(last=False)
        known = self.users.forget(user_id)
        await self._forget(user_id=user_id)
        return known

    async def export_user(self, user_id: str) -> dict[str, Any]:
        """What the agent holds about the user in memory, as JSON-ready data."""
        user = self.users.get(user_id)
        held: dict[str, Any] = {"in_memory": user is not None}
        if user is not None:
            held["event_count"] = user.event_count
            held["last_ts"] = user.last_ts
            held["history"] = [
                {"item_id": self.catalog.ids[i.slot], "type": i.type, "ts": i.ts, "value": i.value} for i in user.recent
            ]
            held["seen_items"] = sorted(self.catalog.ids[slot] for slot in user.seen)
            held["profile"] = await self._profile(user=user)
            held["extras"] = {key.name: jsonable(value) for key, value in user.extras.items()}
        plugins = {
            name: data
            for name, data in await self.hooks.call("recsys_export_user", user_id=user_id, catalog=self.catalog)
            if data
        }
        if plugins:
            held["plugins"] = plugins
        return held
