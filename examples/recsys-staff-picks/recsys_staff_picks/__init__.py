"""Editors' picks as a candidate source: items whose ``attributes.staff_pick`` is true.

Install beside the agent (``pip install ./examples/recsys-staff-picks``) and restart it; the
fusion learns how much the picks are worth from what users do next. Settings come from the
agent's TOML file, ``[plugins.staff_picks] reason = "..."``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np

from agent import AgentContext, Candidates, Item, Query, hookimpl


@dataclass(frozen=True)
class StaffPicksOptions:
    """``[plugins.staff_picks]`` in the agent's TOML file; an unknown key stops the start."""

    reason: str = "picked by our editors"


class StaffPicks:
    def __init__(self) -> None:
        self.picks: set[int] = set()
        self.reason = "picked by our editors"

    @hookimpl
    async def recsys_lifespan(self, ctx: AgentContext) -> AsyncIterator[None]:
        # setup before the yield, teardown (none here) after it
        self.reason = ctx.options("staff_picks", StaffPicksOptions).reason
        yield

    @hookimpl
    def recsys_catalog_upsert(self, items: list[Item], slots: list[int]) -> None:
        for item, slot in zip(items, slots, strict=True):
            if item.attributes.get("staff_pick") is True:
                self.picks.add(slot)
            else:
                self.picks.discard(slot)

    @hookimpl
    def recsys_catalog_delete(self, slot: int) -> None:
        self.picks.discard(slot)

    @hookimpl
    def recsys_candidates(self, query: Query) -> Candidates | None:
        allowed = query.allowed()
        slots = np.array(sorted(s for s in self.picks if s < len(allowed) and allowed[s]), dtype=np.int64)
        if len(slots) == 0:
            return None
        return Candidates(
            source="staff_picks",
            slots=slots[: query.n_candidates],
            scores=np.ones(min(len(slots), query.n_candidates)),
            reasons=self.reason,
            score_of=lambda wanted: np.isin(wanted, slots).astype(float),
        )
