"""recsys-agent: a real-time, LLM-assisted recommendation agent on NATS with pluggy stages.

What a plugin author needs is importable from here::

    from agent import hookimpl, Query, Candidates, Scored, Event, Item, AgentContext
"""

from agent.context import AgentContext
from agent.hooks.specs import hookimpl
from agent.pipeline.values import Candidates, Query, Scored
from agent.wire.contract import Event, Item, Recommendations

__all__ = ["AgentContext", "Candidates", "Event", "Item", "Query", "Recommendations", "Scored", "hookimpl"]
