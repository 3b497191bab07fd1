"""Fusion of candidate lists by weighted reciprocal rank."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from agent.context import AgentContext
from agent.hookspecs import hookimpl
from agent.ranking import Candidates, Query, Scored

# Rank offset from the reciprocal rank fusion literature: it damps the head of each list so
# that one source's first item does not drown every other source.
RRF_OFFSET = 60.0


class ReciprocalRankFusion:
    """score(item) = sum over sources of weight(source) / (RRF_OFFSET + rank).

    Rank-based, so sources with incomparable score scales mix fairly. Options
    (``[plugins.rrf_fusion]``): ``weights`` (source name -> weight, default 1.0 each).
    """

    def __init__(self) -> None:
        self.weights: dict[str, float] = {}

    @hookimpl
    def recsys_lifespan(self, ctx: AgentContext) -> AsyncIterator[None]:
        return self._configure(ctx)

    @asynccontextmanager
    async def _configure(self, ctx: AgentContext) -> AsyncIterator[None]:
        self.weights = {str(k): float(v) for k, v in ctx.options("rrf_fusion").get("weights", {}).items()}
        yield

    @hookimpl(trylast=True)
    def recsys_fuse(self, query: Query, candidates: list[Candidates]) -> list[Scored]:
        merged: dict[int, Scored] = {}
        for cands in candidates:
            weight = self.weights.get(cands.source, 1.0)
            if weight <= 0:
                continue
            for rank, slot in enumerate(cands.slots.tolist()):
                contribution = weight / (RRF_OFFSET + rank + 1)
                entry = merged.get(slot)
                if entry is None:
                    entry = merged[slot] = Scored(slot=slot, score=0.0)
                entry.score += contribution
                entry.sources.append(cands.source)
                reason = cands.reason(rank)
                if reason and reason not in entry.reasons:
                    entry.reasons.append(reason)
        ranked = sorted(merged.values(), key=lambda s: s.score, reverse=True)
        return ranked[: query.n_candidates]
