"""The plugin system's own rules: call modes read from the specs, start-time failure for a
misspelt hook, lifespans as async generators, and one options parser for every plugin."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from agent import hookimpl
from agent.config import ConfigError
from agent.hooks import specs
from agent.hooks.manager import get_plugin_manager
from agent.hooks.options import parse_options
from agent.hooks.runner import HookRunner
from agent.hooks.specs import CALL_SPECS, CallMode
from agent.pipeline.pipeline import Pipeline
from agent.serving.metrics import Metrics
from tests.builders import offline_settings


def bare_pipeline(*plugins: tuple[str, Any], **overrides: Any) -> Pipeline:
    # no built-in stage: what is tested is the runner, not the stages
    settings = offline_settings(**overrides)
    pm = get_plugin_manager(settings, extra=plugins)
    for name, _ in list(pm.list_name_plugin()):
        if name not in {n for n, _ in plugins}:
            pm.unregister(name=name)
    return Pipeline(settings, pm)


def test_every_spec_declares_its_call_mode_and_the_docstring_agrees() -> None:
    hooks = [name for name in dir(specs) if name.startswith("recsys_")]
    assert set(hooks) == set(CALL_SPECS), "every hook spec is declared with @spec(CallMode...)"
    words = {CallMode.ALL: "All implementations", CallMode.FIRST: "first answer wins", CallMode.CHAIN: "a chain"}
    for name in hooks:
        assert words[CALL_SPECS[name].mode] in (getattr(specs, name).__doc__ or ""), name


def test_a_misspelt_hook_name_at_a_call_site_fails_when_the_caller_is_made() -> None:
    runner = HookRunner(get_plugin_manager(offline_settings()), Metrics(), 1.0)
    with pytest.raises(KeyError, match="recsys_candidate"):
        runner.caller("recsys_candidate")


class Answers:
    def __init__(self, answer: Any) -> None:
        self.answer = answer

    @hookimpl
    def recsys_profile(self, user: Any) -> Any:
        return self.answer

    @hookimpl
    def recsys_rerank(self, query: Any, ranked: list[Any]) -> list[Any]:
        return [*ranked, self.answer]


async def test_first_mode_stops_at_the_first_answer_and_chain_threads_the_value() -> None:
    # pluggy calls later registrations first: "b" answers first, "a" never runs for FIRST
    pipeline = bare_pipeline(("a", Answers("from a")), ("b", Answers("from b")), ("c", Answers(None)))
    assert await pipeline.hooks.call("recsys_profile", user=None) == "from b"
    assert await pipeline.hooks.call("recsys_rerank", query=None, ranked=[]) == [None, "from b", "from a"]


class Lifecycle:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    @hookimpl
    async def recsys_lifespan(self, ctx: Any) -> AsyncIterator[None]:
        self.log.append("setup")
        try:
            yield
        finally:
            self.log.append("teardown")


async def test_a_lifespan_generator_sets_up_before_and_tears_down_after_even_on_error() -> None:
    log: list[str] = []
    with pytest.raises(RuntimeError, match="boom"):
        async with bare_pipeline(("life", Lifecycle(log))).running():
            assert log == ["setup"]
            raise RuntimeError("boom")
    assert log == ["setup", "teardown"]


class NotALifespan:
    @hookimpl
    def recsys_lifespan(self, ctx: Any) -> Any:
        return 42


async def test_a_lifespan_of_the_wrong_kind_stops_the_start_naming_the_plugin() -> None:
    with pytest.raises(TypeError, match="plugin odd: recsys_lifespan must be an async generator"):
        async with bare_pipeline(("odd", NotALifespan())).running():
            pass  # entering is the test


@dataclass(frozen=True)
class SampleOptions:
    depth: int = 3
    trade_off: float = field(default=0.5, metadata={"option": "lambda"})
    name: str | None = None

    def problems(self) -> list[tuple[str, str]]:
        return [("depth", "must be at least 1")] if self.depth < 1 else []


def test_options_are_typed_and_unknown_keys_bad_types_and_ranges_are_refused_by_name() -> None:
    assert parse_options(SampleOptions, {"depth": 5, "lambda": 1}, "sample") == SampleOptions(5, 1.0, None)
    with pytest.raises(ConfigError, match=r"\[plugins.sample\] has no option 'dept' \(options: depth, lambda, name\)"):
        parse_options(SampleOptions, {"dept": 5}, "sample")
    with pytest.raises(ConfigError, match=r"\[plugins.sample\] option 'depth' must be an integer, got '5'"):
        parse_options(SampleOptions, {"depth": "5"}, "sample")
    with pytest.raises(ConfigError, match=r"\[plugins.sample\] option 'depth' must be at least 1"):
        parse_options(SampleOptions, {"depth": 0}, "sample")


@pytest.mark.parametrize(
    ("plugin", "table"),
    [
        ("fusion", {"lerning_rate": 0.1}),
        ("diversity", {"lambda": 2.0}),
        ("item_to_item", {"window": "5"}),
        ("trending", {"half_lives_s": {"trending": -1}}),
        ("event_validation", {"max_skew": 1}),
        ("freshness", {"window_s": 0}),
        ("cross_encoder", {"modle": "x"}),
    ],
)
async def test_a_builtin_plugin_with_a_bad_option_stops_the_start_with_a_configuration_error(
    plugin: str, table: dict[str, Any]
) -> None:
    settings = offline_settings(disabled_plugins="content,summariser")
    settings.plugins = {plugin: table}
    with pytest.raises(ConfigError, match=rf"\[plugins.{plugin}\]"):
        async with Pipeline(settings, get_plugin_manager(settings)).running():
            pass  # entering is the test


def test_a_builtin_whose_extra_is_not_installed_says_which_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    # what a plain `pip install recsys-agent` (no [ml]) looks like to the importer
    import sys

    monkeypatch.setitem(sys.modules, "qdrant_client", None)
    for module in [m for m in sys.modules if m.startswith(("plugins.content", "agent.vectors"))]:
        monkeypatch.delitem(sys.modules, module)
    settings = offline_settings()
    with pytest.raises(ConfigError, match=r"content plugin needs qdrant_client.*pip install 'recsys-agent\[ml\]'"):
        get_plugin_manager(settings)
    settings = offline_settings(disabled_plugins="content")
    assert not get_plugin_manager(settings).has_plugin("content"), "without content the agent starts"
