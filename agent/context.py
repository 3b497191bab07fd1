"""What a plugin can reach while the agent runs (given to ``recsys_lifespan``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.catalog import Catalog
from agent.config import Settings
from agent.metrics import Metrics
from agent.state import UserStore

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS
    from nats.js import JetStreamContext


@dataclass(slots=True)
class AgentContext:
    settings: Settings
    catalog: Catalog
    users: UserStore
    metrics: Metrics
    # None when the pipeline runs without a bus (replay, unit tests)
    nc: NATS | None = None
    js: JetStreamContext | None = None

    def options(self, plugin_name: str) -> dict[str, Any]:
        return self.settings.plugin_options(plugin_name)
