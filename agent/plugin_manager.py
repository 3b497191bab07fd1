"""Building the plugin manager: built-in stages first, then third-party entry points."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable
from importlib.metadata import entry_points
from typing import Any

import pluggy

from agent import hookspecs
from agent.config import Settings

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "recsys_agent"

# name -> "module:attribute"; built-ins are ordinary plugins, registered like third-party ones.
# Registration order matters: pluggy calls later registrations first, so the rerank chain
# below runs filters (registered last) before the exclusion safety net.
BUILTIN_PLUGINS: dict[str, str] = {
    "event_validation": "plugins.validation:EventValidation",
    "trending": "plugins.trending:Trending",
    "content": "plugins.content:ContentRetrieval",
    "item_to_item": "plugins.item_to_item:ItemToItem",
    "freshness": "plugins.freshness:Freshness",
    "fusion": "plugins.fusion:LearnedFusion",
    "exclude_seen": "plugins.rerankers:ExcludeSeen",
    "diversity": "plugins.rerankers:Diversity",
    "cross_encoder": "plugins.cross_encoder:CrossEncoderReranker",
    "nats_publisher": "plugins.nats_publisher:NatsPublisher",
    "summariser": "plugins.summariser:Summariser",
}


def _instantiate(target: Any) -> Any:
    # A class is instantiated with no arguments; settings reach it through recsys_lifespan.
    return target() if isinstance(target, type) else target


def _load(spec: str) -> Any:
    module_name, _, attribute = spec.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attribute) if attribute else module


def get_plugin_manager(settings: Settings, extra: Iterable[tuple[str, Any]] = ()) -> pluggy.PluginManager:
    """A fresh plugin manager with the built-ins, entry-point plugins and ``extra`` (name, plugin).

    Plugins named in ``settings.disabled_plugins`` are blocked, whatever their origin.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in settings.disabled_plugins:
        pm.set_blocked(name)
    for name, spec in BUILTIN_PLUGINS.items():
        if not pm.is_blocked(name):
            pm.register(_instantiate(_load(spec)), name=name)
    if settings.load_entry_points:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if pm.is_blocked(ep.name) or pm.has_plugin(ep.name):
                continue
            try:
                pm.register(_instantiate(ep.load()), name=ep.name)
            except Exception as exc:
                # A broken third-party package must not stop the agent; it is named in the log.
                log.error("plugin entry point %s (%s) failed to load: %s", ep.name, ep.value, exc)
    for name, plugin in extra:
        if not pm.is_blocked(name):
            pm.register(_instantiate(plugin), name=name)
    pm.check_pending()
    return pm
