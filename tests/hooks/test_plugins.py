"""The plugin system: ordering, the async rule, failing and slow plugins."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.app import Agent
from agent.config import Settings, load_settings
from agent.hooks import specs as hookspecs
from agent.hooks.manager import BUILTIN_PLUGINS, get_plugin_manager
from agent.hooks.specs import hookimpl
from agent.pipeline import push_scheduler as pushes
from agent.pipeline.pipeline import ApplyOutcome
from agent.pipeline.values import Candidates, Query, Scored
from agent.wire.contract import Event
from tests.builders import Client, catalog, event, offline_settings, running_pipeline


def recorder(name: str, log: list[str], **marks: bool) -> object:
    class Recorder:
        @hookimpl(**marks)
        def recsys_rerank(self, query: Query, ranked: list[Scored]) -> None:
            log.append(name)

    return Recorder()


async def test_rerank_chain_follows_pluggy_order_and_tryfirst(tmp_path: Path) -> None:
    calls: list[str] = []
    async with running_pipeline(
        tmp_path,
        ("first_registered", recorder("first_registered", calls)),
        ("second_registered", recorder("second_registered", calls)),
        ("eager", recorder("eager", calls, tryfirst=True)),
    ) as pipeline:
        await pipeline.recommend("u1")
    assert calls == ["eager", "second_registered", "first_registered"]
    names = pipeline.hooks.plugin_names("recsys_rerank")
    # the exclusion safety net runs after every reranker that may reorder or drop; only the
    # summariser's explanations, which change no order, come after it (on the final list)
    assert names[-2:] == ["exclude_seen", "summariser"]


class BoostSource:
    """A third-party candidate source that always proposes item-29 first."""

    @hookimpl
    def recsys_candidates(self, query: Query) -> Candidates:
        return Candidates(
            source="boost", slots=np.array([query.catalog.slot("item-29")]), scores=np.array([1.0]), reasons="boosted"
        )


async def test_third_party_source_is_fused_with_its_reason(tmp_path: Path) -> None:
    # a configured weight puts the third-party source ahead of the built-in ones
    async with running_pipeline(
        tmp_path, ("boost", BoostSource()), plugins={"fusion": {"weights": {"boost": 10.0}}}
    ) as pipeline:
        await pipeline.apply_event(event(1, item="item-3"))
        recs = await pipeline.recommend("u1", 5)
    top = recs.items[0]
    assert top.item_id == "item-29" and "boosted" in top.reasons


class Broken:
    @hookimpl
    def recsys_apply_event(self, event: Event) -> None:
        raise RuntimeError("boom")

    @hookimpl
    def recsys_candidates(self, query: Query) -> None:
        raise RuntimeError("boom")


class Slow:
    @hookimpl
    async def recsys_candidates(self, query: Query) -> None:
        await asyncio.sleep(30)

    @hookimpl
    async def recsys_publish(self, recommendations: Any, user_token: str) -> None:
        await asyncio.sleep(30)


async def test_failing_plugin_is_counted_and_the_event_still_applies(tmp_path: Path) -> None:
    async with running_pipeline(tmp_path, ("broken", Broken())) as pipeline:
        assert await pipeline.apply_event(event(1)) is ApplyOutcome.APPLIED
        recs = await pipeline.recommend("u1")
    assert len(recs.items) == 10
    metrics = pipeline.metrics
    assert metrics.value("recsys_plugin_failures_total", plugin="broken", hook="recsys_apply_event", kind="error") == 1
    assert metrics.value("recsys_plugin_failures_total", plugin="broken", hook="recsys_candidates", kind="error") == 1


async def test_an_event_that_failed_to_apply_is_applied_by_its_redelivery(tmp_path: Path) -> None:
    class Flaky:
        """Enrichment that hands back garbage once (a passing fault), then works."""

        def __init__(self) -> None:
            self.calls = 0

        @hookimpl
        def recsys_enrich_event(self, event: Event) -> Event | str:
            self.calls += 1
            return "garbage" if self.calls == 1 else event

    async with running_pipeline(tmp_path, ("flaky", Flaky())) as pipeline:
        with pytest.raises(TypeError, match="enrich hook"):
            await pipeline.apply_event(event(1), seq=7)
        # the same stream message, redelivered as the disposition rule asked
        assert await pipeline.apply_event(event(1), seq=7) is ApplyOutcome.APPLIED
        assert pipeline.users.get("u1").event_count == 1  # type: ignore[union-attr]
        assert await pipeline.apply_event(event(1), seq=7) is ApplyOutcome.REDELIVERY


async def test_a_stop_reports_the_pushes_it_could_not_send(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class SlowPublisher:
        @hookimpl
        def recsys_publish(self) -> Any:
            return asyncio.sleep(0.1)

    monkeypatch.setattr(pushes, "FLUSH_TIMEOUT_S", 0.05)
    async with running_pipeline(tmp_path, ("slow_publisher", SlowPublisher())) as pipeline:
        async with pushes.PushScheduler(pipeline).running() as scheduler:
            for i in range(5):
                await pipeline.apply_event(event(i, user=f"u{i}"))
                scheduler.schedule(f"u{i}", f"e{i}")
    # the five were ranked in one batch; the stop came while the first was being published
    assert "stopping with 5 owed pushes unsent" in caplog.text


async def test_slow_async_plugin_is_cut_off_at_the_stage_timeout(tmp_path: Path) -> None:
    async with running_pipeline(tmp_path, ("slow", Slow()), stage_timeout_ms=50) as pipeline:
        await pipeline.apply_event(event(1))
        started = time.perf_counter()
        recs = await pipeline.recommend("u1")
        elapsed = time.perf_counter() - started
    assert len(recs.items) == 10 and elapsed < 5
    assert (
        pipeline.metrics.value("recsys_plugin_failures_total", plugin="slow", hook="recsys_candidates", kind="timeout")
        == 1
    )


async def test_broken_and_slow_plugins_over_nats_do_not_stop_pushes(settings: Settings, client: Client) -> None:
    settings.stage_timeout_ms = 100
    async with Agent(settings, [("broken", Broken()), ("slow", Slow())]) as agent:
        await client.upsert(catalog(20))
        await client.wait_for(lambda: agent.pipeline.catalog.active_count() == 20)
        for i in range(5):
            await client.publish_event({"id": f"s{i}", "type": "view", "user_id": "zed", "item_id": f"item-{i}"})
        await client.wait_for(lambda: "s4" in client.reflected_event_ids())
        assert agent.metrics.value("recsys_events_applied_total") == 5
    assert all(len(p["items"]) == 10 for p in client.pushes)


class Rejector:
    @hookimpl
    def recsys_validate_event(self, event: Event) -> str | None:
        return "no bots" if event.user_id.startswith("bot") else None


async def test_validation_hook_rejects_with_its_reason(settings: Settings, client: Client) -> None:
    async with Agent(settings, [("rejector", Rejector())]) as agent:
        await client.publish_event({"type": "view", "user_id": "bot-7", "item_id": "i"})
        await client.publish_event({"id": "h", "type": "view", "user_id": "human", "item_id": "i"})
        await client.wait_for(lambda: client.dead_letters and "h" in client.reflected_event_ids())
        assert agent.metrics.value("recsys_events_applied_total") == 1
    assert client.dead_letters[0]["reason"] == "no bots (plugin rejector)"


async def test_disabled_builtin_is_not_registered() -> None:
    settings = offline_settings(disabled_plugins="trending")
    pm = get_plugin_manager(settings)
    assert not pm.has_plugin("trending") and pm.has_plugin("fusion")


def test_builtins_are_registered_under_their_names() -> None:
    pm = get_plugin_manager(offline_settings())
    assert {name for name, _ in pm.list_name_plugin()} >= set(BUILTIN_PLUGINS)


def test_every_hook_is_documented_with_its_semantics() -> None:
    specs = [name for name in dir(hookspecs) if name.startswith("recsys_")]
    assert len(specs) >= 12
    for name in specs:
        doc = getattr(hookspecs, name).__doc__ or ""
        assert len(doc.split()) >= 12, f"{name} needs a docstring that states its semantics"
        assert any(word in doc for word in ("All implementations", "first answer wins", "a chain", "(a chain)")), name


def test_entry_point_plugins_load_and_a_broken_one_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    dist = tmp_path / "thirdparty-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[recsys_agent]\ngood = thirdparty_plugin:Plugin\nbad = thirdparty_missing:Plugin\n"
        "misspelt = thirdparty_plugin:Misspelt\n"
    )
    (tmp_path / "thirdparty_plugin.py").write_text(
        "from agent import hookimpl\n"
        "class Plugin:\n"
        "    @hookimpl\n"
        "    def recsys_forget_user(self, user_id):\n"
        "        return None\n"
        "class Misspelt:\n"
        "    @hookimpl\n"
        "    def recsys_candidate(self, query):\n"
        "        return None\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with caplog.at_level(logging.WARNING):
        pm = get_plugin_manager(
            load_settings(env={}, overrides={"disabled_plugins": ["contnet"], "plugins": {"summarizer": {}}})
        )
    assert pm.has_plugin("good") and not pm.has_plugin("bad") and not pm.has_plugin("misspelt")
    assert pm.has_plugin("content"), "a misspelt name disables nothing"
    assert "misspelt" in caplog.text and "recsys_candidate" in caplog.text
    assert (
        "disabled_plugins names 'contnet'" in caplog.text and "[plugins.summarizer] configures no plugin" in caplog.text
    )


class Settling:
    """Background work that reports its outcome through recsys_settle."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer

    @hookimpl
    def recsys_settle(self) -> Any:
        async def done() -> Any:
            await asyncio.sleep(0)
            return self.answer

        return done()


async def test_settle_reports_only_texts_as_failures(tmp_path: Path) -> None:
    async with running_pipeline(
        tmp_path,
        ("gathered", Settling([None, None])),  # what asyncio.gather of two tasks gives
        ("broken", Settling("its model did not load")),
        disabled_plugins=["content"],
    ) as pipeline:
        assert await pipeline.settle() == ["its model did not load (plugin broken)"]
