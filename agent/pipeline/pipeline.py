"""The recommendation pipeline: apply events and compute recommendations through the hooks.

It knows nothing about NATS or HTTP, so the live agent and ``recsys-agent replay`` run exactly
the same stages.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from enum import Enum

import pluggy

from agent.config import Settings
from agent.context import AgentContext
from agent.hooks.runner import HookRunner
from agent.pipeline.catalog import Catalog
from agent.pipeline.taste_signals import event_signal
from agent.pipeline.user_state import Deduplicator, Interaction, UserState, UserStore
from agent.pipeline.values import Candidates, Query, Scored
from agent.serving.metrics import Metrics
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
        self.hooks = HookRunner(pm, self.metrics, settings.stage_timeout_ms / 1000)
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

    async def _lifespans(self) -> list[tuple[str, object]]:
        # Lifespans are entered directly (not through call_all) so that a plugin that cannot
        # start stops the agent instead of leaving it half-configured.
        managers = []
        for plugin, function, argnames in self.hooks._implementations("recsys_lifespan"):
            manager = function(**{name: self.context for name in argnames})
            if manager is not None:
                managers.append((plugin, manager))
        return managers

    async def settle(self) -> list[str]:
        """Wait for the plugins' background work; returns the failures they report, each naming
        its plugin (see ``recsys_settle``)."""
        answers = await self.hooks.call_all("recsys_settle", timeout_s=self.settings.catalog_timeout_s)
        # only a text reports a failure (see the spec); other results of an awaitable are not one
        return [f"{answer} (plugin {plugin})" for plugin, answer in answers if isinstance(answer, str)]

    def event_key(self, event: Event, seq: int) -> str:
        return f"id:{event.id}" if event.id is not None else f"seq:{seq}"

    async def apply_event(self, event: Event, seq: int = 0) -> ApplyOutcome:
        """Validate (hooks), deduplicate and apply one parsed event.

        Raises InvalidMessage when a validation hook rejects the event. ``seq`` is the stream
        sequence of the message that carried it (0 when there is no stream).
        """
        started = time.perf_counter()
        for plugin, reason in await self.hooks.call_all("recsys_validate_event", event=event, catalog=self.catalog):
            raise InvalidMessage(f"{reason} (plugin {plugin})")
        key = self.event_key(event, seq)
        verdict = self.dedup.check(key, seq)
        if verdict == "duplicate":
            self.metrics.events_duplicate.inc()
            return ApplyOutcome.DUPLICATE
        if verdict == "redelivery":
            self.metrics.events_redelivered.inc()
            return ApplyOutcome.REDELIVERY
        try:
            enriched = await self.hooks.call_chain("recsys_enrich_event", "event", event=event, catalog=self.catalog)
            if not isinstance(enriched, Event) or enriched.item_id is None:
                raise TypeError(f"an enrich hook returned {type(enriched).__name__} without an item, not an event")
        except BaseException:
            # Nothing applied yet: the redelivery that the disposition rule asks for must
            # apply it, not take it for one already applied.
            self.dedup.discard(key)
            raise
        event = enriched
        slot = self.catalog.ensure_slot(event.item_id)
        user = self.users.get_or_create(event.user_id)
        signal = event_signal(event.type, event.value, self.settings.rating_max)
        user.recent.append(Interaction(slot=slot, type=event.type, ts=event.ts, signal=signal, value=event.value))
        user.seen.add(slot)
        user.event_count += 1
        user.last_ts = max(user.last_ts, event.ts)
        await self.hooks.call_all(
            "recsys_apply_event", event=event, user=user, slot=slot, signal=signal, catalog=self.catalog
        )
        self.metrics.events_applied.inc()
        self.metrics.apply_seconds.observe(time.perf_counter() - started)
        return ApplyOutcome.APPLIED

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
        await self.hooks.call_all(
            "recsys_catalog_upsert",
            items=items,
            slots=slots,
            changed=changed,
            ts=self.clock() if ts is None else ts,
            timeout_s=self.settings.catalog_timeout_s,
        )
        self.metrics.catalog_upserts.inc(len(items))
        self.metrics.items.set(self.catalog.active_count())

    async def delete_item(self, item_id: str) -> bool:
        slot = self.catalog.delete(item_id)
        if slot is None:
            return False
        await self.hooks.call_all("recsys_catalog_delete", item_id=item_id, slot=slot)
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
        lists: list[Candidates] = []
        for plugin, answer in await self.hooks.call_all("recsys_candidates", query=query):
            for cands in [answer] if isinstance(answer, Candidates) else answer:
                if isinstance(cands, Candidates):
                    cands.plugin = plugin
                    lists.append(cands)
        fused = await self.hooks.call_first("recsys_fuse", query=query, candidates=lists)
        if fused is None:
            fused = []
        ranked = await self.hooks.call_chain("recsys_rerank", "ranked", query=query, ranked=fused)
        final = list(ranked)[: query.k]
        _explain(final, lists)
        return final

    async def recommend(
        self,
        user_id: str,
        k: int | None = None,
        *,
        categories: tuple[str, ...] = (),
        exclude: tuple[str, ...] = (),
        event_ids: list[str] | None = None,
    ) -> Recommendations:
        started = time.perf_counter()
        query = self.make_query(user_id, k or self.settings.default_k, categories=categories, exclude=exclude)
        ranked = await self.rank(query)
        profile = await self.hooks.call_first("recsys_profile", user=query.user)
        items = [RecommendedItem(item_id=self.catalog.ids[s.slot], score=s.score, reasons=s.reasons) for s in ranked]
        recs = Recommendations(user_id=user_id, items=items, generated_at=time.time(), profile=profile)
        if event_ids:
            recs.event_id = event_ids[-1]
            recs.event_ids = list(event_ids)
        self.metrics.recommend_seconds.observe(time.perf_counter() - started)
        return recs

    async def forget_user(self, user_id: str) -> bool:
        known = self.users.forget(user_id)
        await self.hooks.call_all("recsys_forget_user", user_id=user_id)
        return known
