"""Publishes each user's fresh recommendations on ``<prefix>.recs.<user_token>``."""

from __future__ import annotations

from collections.abc import AsyncIterator

from agent.context import AgentContext
from agent.hooks.specs import hookimpl
from agent.wire.contract import Recommendations


class NatsPublisher:
    def __init__(self) -> None:
        self.ctx: AgentContext | None = None

    @hookimpl
    async def recsys_lifespan(self, ctx: AgentContext) -> AsyncIterator[None]:
        self.ctx = ctx
        try:
            yield
        finally:
            self.ctx = None

    @hookimpl
    async def recsys_publish(self, recommendations: Recommendations, user_token: str) -> None:
        ctx = self.ctx
        if ctx is None or ctx.nc is None:
            return
        # Core NATS publish: pushes are ephemeral notifications, the state behind them is durable.
        await ctx.nc.publish(ctx.settings.subject("recs", user_token), recommendations.to_json())
