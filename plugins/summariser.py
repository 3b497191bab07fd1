"""Built-in interest summariser: an LLM (or a heuristic) profile per user, on the slow path.

Hot-path hooks only read or mark memory: ``recsys_apply_event`` tells the scheduler how many
events a user's profile is behind (O(1)), ``recsys_profile`` returns the stored dict, and
``recsys_rerank`` adds a reason to items that match the profile's interests. The LLM is called
by the scheduler's workers (``agent/llm/scheduler.py``), never from a hook.

Options: ``[plugins.summariser]``, see ``SummaryOptions`` and the README. With no ``base_url``
the heuristic summariser writes every profile, so the embedded default needs no model.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from agent.context import AgentContext
from agent.hooks.specs import hookimpl
from agent.llm.chat_client import ChatClient, Dialect, LLMError
from agent.llm.profiles import PROFILE_KEY
from agent.llm.prompts import history_from_user
from agent.llm.scheduler import HistorySnapshot, SummaryScheduler
from agent.llm.summarisers import llm_summariser
from agent.llm.summary_metrics import SummaryMetrics
from agent.llm.summary_options import SummaryOptions
from agent.pipeline.catalog import Catalog
from agent.pipeline.extras import Key
from agent.pipeline.user_state import UserState, UserStore
from agent.pipeline.values import Query, Scored
from agent.wire.contract import Event

log = logging.getLogger(__name__)

NAME = "summariser"
# how many of the user's events the latest profile covers
COVERED: Key[int] = Key("summariser.covered")
_NON_WORD = re.compile(r"[^\w-]+")


class Summariser:
    def __init__(self) -> None:
        self.options = SummaryOptions()
        self.scheduler: SummaryScheduler | None = None
        self.users: UserStore | None = None
        self.catalog: Catalog | None = None
        self.client: ChatClient | None = None
        # judges event ages; the pipeline's clock once started
        self.clock: Callable[[], float] = time.time

    # ---- lifespan

    @hookimpl
    def recsys_lifespan(self, ctx: AgentContext) -> AsyncIterator[None]:
        return self._run(ctx)

    @asynccontextmanager
    async def _run(self, ctx: AgentContext) -> AsyncIterator[None]:
        raw = dict(ctx.options(NAME))
        # The scheduler never tracks more users than the agent keeps.
        raw.setdefault("max_tracked_users", ctx.settings.max_users)
        options = SummaryOptions.parse(raw)
        api_key = options.api_key(os.environ)
        self.options, self.users, self.catalog = options, ctx.users, ctx.catalog
        # The pipeline's clock: wall time live, event time in a replay (where every event is
        # "fresh" and may wake a summary).
        self.clock = ctx.clock
        async with AsyncExitStack() as stack:
            llm = None
            if options.base_url:
                self.client = await stack.enter_async_context(
                    ChatClient(
                        options.base_url,
                        options.model,
                        dialect=Dialect(options.dialect),
                        api_key=api_key,
                        timeout_s=options.timeout_s,
                        max_tokens=options.max_tokens,
                        temperature=options.temperature,
                        max_connections=options.max_concurrency,
                    )
                )
                llm = llm_summariser(self.client, send_categories=options.send_categories)
                await self._probe(self.client)
            else:
                log.info("summariser: no LLM configured (base_url empty): heuristic profiles")
            scheduler = SummaryScheduler(
                options, self, llm, metrics=SummaryMetrics(ctx.metrics.registry), backlog=lambda: ctx.backlog()
            )
            async with scheduler.running_tasks():
                self.scheduler = scheduler
                try:
                    yield
                finally:
                    self.scheduler = None
                    self.client = None

    async def _probe(self, client: ChatClient) -> None:
        # Reachability is reported, not required: the agent must start while the LLM is down and
        # fall back to heuristic profiles until it comes back.
        try:
            models = await client.probe()
        except LLMError as exc:
            log.warning(
                "summariser: LLM at %s not reachable at start (%s); heuristic profiles until it is", client.url, exc
            )
            return
        if models and client.model not in models:
            log.warning(
                "summariser: the server lists %s, not model %r: requests may be refused", models[:5], client.model
            )
        else:
            log.info("summariser: LLM at %s, model %s, dialect %s", client.url, client.model, client.dialect.value)

    # ---- ProfileSource, for the scheduler

    def snapshot(self, user_id: str) -> HistorySnapshot | None:
        if self.users is None or self.catalog is None:
            return None
        user = self.users.get(user_id)
        if user is None:
            return None
        entries = history_from_user(user, self.catalog, self.options.history_items)
        return HistorySnapshot(
            entries=entries, event_count=user.event_count, has_profile=PROFILE_KEY in user.extras, owner=user
        )

    def unsummarised(self, user_id: str) -> int:
        user = self.users.get(user_id) if self.users is not None else None
        return _unsummarised(user) if user is not None else 0

    def store(self, user_id: str, snapshot: HistorySnapshot, profile: dict[str, Any], *, final: bool) -> None:
        user = self.users.get(user_id) if self.users is not None else None
        if user is None or user is not snapshot.owner:
            return  # forgotten or evicted while the summary was written
        if final:
            user.extras[COVERED] = max(_covered(user), snapshot.event_count)
        current = user.extras.get(PROFILE_KEY)
        if isinstance(current, dict) and current.get("based_on_events", -1) > profile["based_on_events"]:
            return  # never replace a newer profile with an older one
        # Replaced, never mutated: readers hold a consistent dict without locks.
        user.extras[PROFILE_KEY] = profile

    # ---- hooks

    @hookimpl
    def recsys_apply_event(self, event: Event, user: UserState, slot: int, catalog: Catalog) -> None:
        self.recsys_apply_events([event], [user])

    @hookimpl
    def recsys_apply_events(self, events: list[Event], users: list[UserState]) -> None:
        scheduler = self.scheduler
        if scheduler is None or not scheduler.running:
            return
        max_age = self.options.max_event_age_s
        # one reading of the clock for the batch: its events arrived together
        now = self.clock() if max_age else 0.0
        for event, user in zip(events, users):
            if max_age and now - event.ts > max_age:
                # Old events (the state rebuild at start, backfills) are counted in the user's
                # state but wake no summary: a restart must not send every known user to the LLM.
                continue
            scheduler.note_event(user.user_id, _unsummarised(user), PROFILE_KEY in user.extras)

    @hookimpl
    def recsys_profile(self, user: UserState) -> dict[str, Any] | None:
        profile = user.extras.get(PROFILE_KEY)
        return profile if isinstance(profile, dict) else None

    @hookimpl(trylast=True)
    def recsys_rerank(self, query: Query, ranked: list[Scored]) -> list[Scored] | None:
        """Explains items whose categories the profile names as interests ("matches your interest
        in Sci-Fi"); never reorders or drops anything. It runs after the reordering rerankers
        and explains only the top ``k``: the rest of the list is cut."""
        return self.recsys_rerank_batch([query], [ranked])

    @hookimpl(trylast=True)
    def recsys_rerank_batch(self, queries: list[Query], ranked: list[list[Scored]]) -> None:
        """``recsys_rerank`` for every query of a batch: the lists are annotated in place, so
        every one is kept as it is (None)."""
        if not self.options.explain:
            return None
        # Categories repeat across candidates (genres, departments) and across the users of a
        # batch: each is matched once per set of interests.
        verdicts_by_interests: dict[tuple[str, ...], dict[str, str | None]] = {}
        for query, entries in zip(queries, ranked):
            profile = query.user.extras.get(PROFILE_KEY)
            if not isinstance(profile, dict) or not profile.get("interests"):
                continue
            labels = tuple(str(i) for i in profile["interests"])
            verdicts = verdicts_by_interests.get(labels)
            if verdicts is None:
                verdicts = verdicts_by_interests[labels] = {}
            _explain(query, entries, labels, verdicts)
        return None

    @hookimpl
    def recsys_forget_user(self, user_id: str) -> None:
        # The profile itself lives in the user's extras, which the core drops with the user.
        if self.scheduler is not None:
            self.scheduler.forget(user_id)


def _explain(query: Query, ranked: list[Scored], labels: tuple[str, ...], verdicts: dict[str, str | None]) -> None:
    """Adds to each of the top ``query.k`` entries the reason of its first category that matches
    an interest; ``verdicts`` remembers each category's reason (None: no match) for ``labels``."""
    interests: list[tuple[str, str]] | None = None
    catalog = query.catalog
    for entry in ranked[: query.k]:
        item = catalog.item(entry.slot)
        if item is None:
            continue
        for category in item.categories:
            reason = verdicts.get(category, "")
            if reason == "":
                if interests is None:
                    interests = [(label, f" {_words(label)} ") for label in labels]
                reason = verdicts[category] = _interest_reason(category, interests)
            if reason is not None:
                # the entries are this request's own (fusion made them): annotated in place
                if reason not in entry.reasons:
                    entry.reasons.append(reason)
                break


@functools.lru_cache(maxsize=4096)
def _words(text: str) -> str:
    return " ".join(_NON_WORD.sub(" ", text.lower()).split())


def _interest_reason(category: str, interests: list[tuple[str, str]]) -> str | None:
    # An LLM writes "sci-fi thrillers" where the catalog says "Sci-Fi": a category matches an
    # interest that contains it as whole words. Plain string tests: this runs on every request.
    needle = f" {_words(category)} "
    if needle.strip():
        for label, padded in interests:
            if needle in padded:
                return f"matches your interest in {label}"
    return None


def _covered(user: UserState) -> int:
    # How many of the user's events a scheduled summary (LLM, or the heuristic standing in for
    # it) has covered; kept apart from the profile because a stop-gap first profile covers none.
    covered = user.extras.get(COVERED, 0)
    return covered if isinstance(covered, int) else 0


def _unsummarised(user: UserState) -> int:
    return max(0, user.event_count - _covered(user))
