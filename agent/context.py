"""What a plugin can reach while the agent runs (given to ``recsys_lifespan``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent.config import Settings
from agent.hooks.options import OptionsT, parse_options
from agent.pipeline.catalog import Catalog
from agent.pipeline.extras import Extras
from agent.pipeline.user_state import UserStore
from agent.serving.metrics import Metrics

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
    # the pipeline's clock: wall time live, event time in replay
    clock: Callable[[], float] = time.time
    # objects plugins share with each other, e.g. "item_vectors" from the content source
    extras: Extras = field(default_factory=Extras)
    # events delivered to this agent and not applied yet; background work (profile refreshes)
    # gives way while there are any, so that a burst is ingested first. Read it at each use:
    # the live agent sets it once its consumer runs.
    backlog: Callable[[], int] = lambda: 0

    def options(self, plugin_name: str, declared: type[OptionsT] | None = None) -> Any:
        """The plugin's ``[plugins.<plugin_name>]`` table parsed into its options dataclass
        (``agent/hooks/options.py``): unknown keys and wrong types stop the start."""
        raw = self.settings.plugin_options(plugin_name)
        return raw if declared is None else parse_options(declared, raw, plugin_name)
