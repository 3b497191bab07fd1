"""Built-in collector checks beyond the wire schema."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from agent.context import AgentContext
from agent.hooks.specs import hookimpl
from agent.pipeline.catalog import Catalog
from agent.wire.contract import Event


@dataclass(frozen=True, slots=True)
class ValidationOptions:
    max_future_skew_s: float = 86_400.0
    rating_min: float = 0.0
    rating_max: float | None = None  # None: the agent's rating_max setting


class EventValidation:
    """Rejects events stamped too far in the future (a client with a broken clock would
    otherwise dominate every time-decayed statistic) and ratings outside the configured scale.

    Options (``[plugins.event_validation]``): ``max_future_skew_s`` (default 86400),
    ``rating_min`` (default 0) / ``rating_max`` (default: the ``rating_max`` setting, 10).
    """

    def __init__(self) -> None:
        self.max_future_skew_s = 86_400.0
        self.rating_min = 0.0
        self.rating_max = 10.0

    @hookimpl
    async def recsys_lifespan(self, ctx: AgentContext) -> AsyncIterator[None]:
        options = ctx.options("event_validation", ValidationOptions)
        self.max_future_skew_s = options.max_future_skew_s
        self.rating_min = options.rating_min
        # the agent's rating scale unless this plugin is told otherwise
        self.rating_max = ctx.settings.rating_max if options.rating_max is None else options.rating_max
        yield

    @hookimpl
    def recsys_validate_event(self, event: Event, catalog: Catalog) -> str | None:
        # against the time the stream stored it, when it came through one: the same verdict
        # live and on every rebuild
        now = event.received_at if event.received_at is not None else time.time()
        if event.ts > now + self.max_future_skew_s:
            return f"timestamp {event.ts:.0f} is more than {self.max_future_skew_s:.0f} s in the future"
        if event.type == "rate" and event.value is not None and not self.rating_min <= event.value <= self.rating_max:
            return f"rating {event.value} is outside [{self.rating_min}, {self.rating_max}]"
        return None
