"""The slow-path scheduler's own logic, with a scripted LLM function (the real model is exercised
in test_llm_integration.py): coalescing, bounds, fairness, retries, the breaker, and the
summariser plugin inside a pipeline, where a real HTTP server that answers too late times out."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from agent.config import ConfigError
from agent.hooks.manager import get_plugin_manager
from agent.llm.chat_client import LLMOutputError, LLMRejected, LLMUnavailable
from agent.llm.circuit_breaker import BreakerState, CircuitBreaker
from agent.llm.profiles import PROFILE_KEY, profile_text
from agent.llm.prompts import HistoryEntry
from agent.llm.scheduler import BUSY_PAUSE_S, SummaryScheduler
from agent.llm.summarisers import heuristic_fields
from agent.llm.summary_metrics import SummaryMetrics
from agent.llm.summary_options import SummaryOptions
from agent.pipeline.pipeline import Pipeline
from agent.wire.contract import Event, Item
from tests.builders import offline_settings
from tests.llm.fakes import Users
from tests.llm.llm_server import serving

ANSWER = {"interests": ["space opera"], "avoid": [], "summary": "Likes space opera."}


class ScriptedLLM:
    """Answers after ``delay`` seconds, or raises the next scripted error."""

    def __init__(self, delay: float = 0.0, errors: list[Exception] | None = None) -> None:
        self.delay = delay
        self.errors = list(errors or [])
        self.calls = 0
        self.concurrent = 0
        self.max_concurrent = 0
        self.release: asyncio.Event | None = None

    async def __call__(self, entries: list[HistoryEntry]) -> dict[str, Any]:
        self.calls += 1
        self.concurrent += 1
        self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            if self.release is not None:
                await self.release.wait()
            await asyncio.sleep(self.delay)
            if self.errors:
                raise self.errors.pop(0)
            return dict(ANSWER)
        finally:
            self.concurrent -= 1


def options(**overrides: Any) -> SummaryOptions:
    values: dict[str, Any] = {"refresh_after_events": 2, "refresh_after_s": 60.0, "backoff_s": 0.001, **overrides}
    return SummaryOptions.parse(values)


async def until(predicate: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


async def test_events_of_a_user_coalesce_into_one_summary_and_a_rerun() -> None:
    users, llm = Users(), ScriptedLLM()
    llm.release = asyncio.Event()
    scheduler = SummaryScheduler(options(max_concurrency=2), users, llm)
    async with scheduler.running_tasks():
        scheduler.note_event("ann", users.add_events("ann", 2))
        await until(lambda: llm.calls == 1)
        for _ in range(20):  # while her summary is in flight
            scheduler.note_event("ann", users.add_events("ann"))
        assert scheduler.stats()["pending"] == 0, "an in-flight user is never queued a second time"
        llm.release.set()
        await until(lambda: len(users.stored) >= 3 and scheduler.stats()["in_flight"] == 0)
    sources = [p["source"] for _, p in users.stored]
    # heuristic first profile at once, the LLM's, then one rerun for the 20 events that came during it
    assert sources == ["heuristic", "llm", "llm"]
    assert llm.calls == 2 and llm.max_concurrent == 1
    assert users.stored[-1][1]["based_on_events"] == 22
    assert scheduler.counts["coalesced"] >= 19


async def test_pending_is_bounded_and_every_user_is_served_in_order() -> None:
    users, llm = Users(), ScriptedLLM(delay=0.01)
    scheduler = SummaryScheduler(options(max_concurrency=2, max_pending_users=5), users, llm)
    peak = 0
    async with scheduler.running_tasks():
        for i in range(60):
            scheduler.note_event(f"u{i:02}", users.add_events(f"u{i:02}", 2))
            peak = max(peak, scheduler.stats()["pending"])
        while any(
            PROFILE_KEY not in u.extras or u.extras[PROFILE_KEY]["source"] != "llm" for u in users.users.values()
        ):
            peak = max(peak, scheduler.stats()["pending"])
            await asyncio.sleep(0.002)
    assert peak <= 5
    assert llm.max_concurrent <= 2
    llm_order = [uid for uid, p in users.stored if p["source"] == "llm"]
    assert sorted(llm_order) == [f"u{i:02}" for i in range(60)]
    # first due, first served (two workers may swap neighbours)
    assert all(abs(position - int(uid[1:])) <= 2 for position, uid in enumerate(llm_order))


async def test_a_flooding_user_does_not_starve_quiet_users() -> None:
    users, llm = Users(), ScriptedLLM(delay=0.01)
    scheduler = SummaryScheduler(options(max_concurrency=1, max_pending_users=2), users, llm)

    def llm_order() -> list[str]:
        return [uid for uid, p in users.stored if p["source"] == "llm"]

    async with scheduler.running_tasks():
        scheduler.note_event("flood", users.add_events("flood", 5))
        for i in range(10):
            scheduler.note_event(f"quiet{i}", users.add_events(f"quiet{i}", 2))
        # the flooding user keeps sending events faster than summaries are written
        while not all(f"quiet{i}" in llm_order() for i in range(10)):
            scheduler.note_event("flood", users.add_events("flood", 5))
            await asyncio.sleep(0.001)
    order = llm_order()
    last_quiet = max(order.index(f"quiet{i}") for i in range(10))
    assert [uid for uid in order[: last_quiet + 1] if uid.startswith("quiet")] == [f"quiet{i}" for i in range(10)]
    # served in due order: the flooding user is summarised once, then waits its turn behind them
    assert order[: last_quiet + 1].count("flood") <= 2
    assert scheduler.counts["coalesced"] > 10


async def test_users_get_a_first_heuristic_profile_at_once_while_the_llm_is_saturated() -> None:
    users, llm = Users(), ScriptedLLM()
    llm.release = asyncio.Event()  # the LLM never answers during this test
    scheduler = SummaryScheduler(options(max_concurrency=1, max_pending_users=2), users, llm)
    async with scheduler.running_tasks():
        for i in range(200):
            scheduler.note_event(f"new{i}", users.add_events(f"new{i}"), has_profile=False)
        await until(lambda: all(PROFILE_KEY in u.extras for u in users.users.values()), timeout=2)
        assert llm.calls <= 1 and scheduler.stats()["pending"] <= 2
        assert all(u.extras[PROFILE_KEY]["source"] == "heuristic" for u in users.users.values())
        # a stop-gap profile does not count as a summary: the LLM still owes one at N events
        assert users.unsummarised("new7") == 1
        llm.release.set()


async def test_without_an_llm_the_first_heuristic_profile_counts_and_refreshes_follow_the_events() -> None:
    users = Users()
    scheduler = SummaryScheduler(options(refresh_after_events=3), users, None)
    async with scheduler.running_tasks():
        scheduler.note_event("ann", users.add_events("ann"), has_profile=False)
        await until(lambda: len(users.stored) == 1)
        # the heuristic is the summariser: its first profile covers the event, nothing is owed
        assert users.unsummarised("ann") == 0 and scheduler.stats()["waiting"] == 0
        for _ in range(3):
            scheduler.note_event("ann", users.add_events("ann"))
        await until(lambda: len(users.stored) == 2 and scheduler.idle)
    assert [p["based_on_events"] for _, p in users.stored] == [1, 4]
    assert scheduler.counts["summaries_heuristic"] == 2


async def test_profiles_give_way_while_events_wait_to_be_applied_and_never_starve() -> None:
    users, backlog = Users(), [500]
    scheduler = SummaryScheduler(options(), users, None, backlog=lambda: backlog[0])
    async with scheduler.running_tasks():
        for i in range(100):
            scheduler.note_event(f"u{i}", users.add_events(f"u{i}"), has_profile=False)
        await asyncio.sleep(0.1)
        # one first profile per pause while the backlog lasts: some, not all
        assert 1 <= len(users.stored) <= 0.1 / BUSY_PAUSE_S + 2
        backlog[0] = 0
        await until(lambda: len(users.stored) == 100)


async def test_a_user_with_few_events_is_summarised_after_the_time_window() -> None:
    users, llm = Users(), ScriptedLLM()
    scheduler = SummaryScheduler(options(refresh_after_events=10, refresh_after_s=0.1), users, llm)
    async with scheduler.running_tasks():
        scheduler.note_event("bea", users.add_events("bea"))
        await asyncio.sleep(0.03)
        assert not users.stored, "not due yet: 1 event of 10, 0.03 s of 0.1"
        await until(lambda: any(p["source"] == "llm" for _, p in users.stored), timeout=3)


async def test_retries_with_backoff_then_success_closes_nothing() -> None:
    users = Users()
    llm = ScriptedLLM(errors=[LLMUnavailable("refused"), LLMUnavailable("reset")])
    scheduler = SummaryScheduler(options(max_retries=2, breaker_failures=5), users, llm, rng=random.Random(1))
    users.add_events("cy", 2)
    profile = await scheduler.summarise_user("cy")
    assert profile is not None and profile["source"] == "llm" and llm.calls == 3
    assert scheduler.breaker.state is BreakerState.CLOSED and scheduler.counts["llm_unavailable"] == 2


async def test_bad_output_falls_back_to_the_heuristic_without_useless_retries() -> None:
    users = Users()
    users.add_events("dee", 3)
    for error in (LLMOutputError("truncated"), LLMRejected("HTTP 400")):
        llm = ScriptedLLM(errors=[error])
        scheduler = SummaryScheduler(options(max_retries=3), users, llm)
        profile = await scheduler.summarise_user("dee")
        assert profile is not None and profile["source"] == "heuristic"
        assert llm.calls == 1, f"{type(error).__name__} is not retried"


async def test_breaker_opens_serves_heuristics_then_recovers_after_a_trial() -> None:
    now = [0.0]
    users = Users()
    llm = ScriptedLLM(errors=[LLMUnavailable("down")] * 3)
    registry = CollectorRegistry()  # what a scrape reads
    scheduler = SummaryScheduler(
        options(max_retries=0, breaker_failures=3, breaker_reset_s=30.0),
        users,
        llm,
        clock=lambda: now[0],
        metrics=SummaryMetrics(registry),
    )
    for i in range(6):
        users.add_events(f"e{i}", 2)
        profile = await scheduler.summarise_user(f"e{i}")
        assert profile is not None and profile["source"] == "heuristic"
    assert llm.calls == 3, "after 3 failures the breaker stops calling the LLM"
    assert scheduler.breaker.state is BreakerState.OPEN
    assert registry.get_sample_value("recsys_summary_breaker_open") == 1
    now[0] = 31.0
    profile = await scheduler.summarise_user("e0")
    assert profile is not None and profile["source"] == "llm" and llm.calls == 4
    assert scheduler.breaker.state is BreakerState.CLOSED
    assert registry.get_sample_value("recsys_summary_breaker_open") == 0


def test_half_open_breaker_lets_exactly_one_trial_through() -> None:
    now = [0.0]
    breaker = CircuitBreaker(threshold=1, reset_s=10, clock=lambda: now[0])
    breaker.failure()
    assert not breaker.allow()
    now[0] = 10.0
    assert breaker.allow() and not breaker.allow()
    breaker.failure()
    assert breaker.state is BreakerState.OPEN and not breaker.allow()
    now[0] = 20.0
    assert breaker.allow()
    breaker.abandon()
    assert breaker.allow(), "a cancelled trial does not wedge the breaker"


async def test_a_user_forgotten_while_summarised_gets_no_profile_back() -> None:
    users, llm = Users(), ScriptedLLM()
    llm.release = asyncio.Event()
    scheduler = SummaryScheduler(options(), users, llm)
    users.add_events("gus", 2)
    users.users["gus"].extras[PROFILE_KEY] = {"based_on_events": 0}  # no interim heuristic
    task = asyncio.create_task(scheduler.summarise_user("gus"))
    await until(lambda: llm.calls == 1)
    del users.users["gus"]
    scheduler.forget("gus")
    users.add_events("gus", 1)  # the same id comes back as a new user
    llm.release.set()
    await task
    assert PROFILE_KEY not in users.users["gus"].extras and not users.stored


async def test_a_user_forgotten_between_retries_is_not_sent_again() -> None:
    users = Users()
    llm = ScriptedLLM(errors=[LLMUnavailable("down"), LLMUnavailable("down"), LLMUnavailable("down")])
    scheduler = SummaryScheduler(options(backoff_s=0.05, max_retries=3), users, llm)
    users.add_events("hal", 2)
    users.users["hal"].extras[PROFILE_KEY] = {"based_on_events": 0}
    task = asyncio.create_task(scheduler.summarise_user("hal"))
    await until(lambda: llm.calls == 1)
    del users.users["hal"]  # forgotten during the backoff
    scheduler.forget("hal")
    await task
    assert llm.calls == 1, "the history of a forgotten user left for the LLM again"
    assert not users.stored


async def test_tracking_is_capped() -> None:
    users = Users()
    scheduler = SummaryScheduler(options(max_tracked_users=3, refresh_after_events=100), users, None)
    for i in range(10):
        scheduler.note_event(f"t{i}", users.add_events(f"t{i}"))
    assert scheduler.stats()["waiting"] == 3 and scheduler.counts["dropped"] == 7


def test_heuristic_profile_from_categories_terms_and_skips() -> None:
    entries = [
        HistoryEntry("Star Wars (1977)", ("Sci-Fi", "Adventure"), "view"),
        HistoryEntry("Notting Hill (1999)", ("Romance", "Comedy"), "skip"),
        HistoryEntry("Star Trek (2009)", ("Sci-Fi",), "purchase"),
        HistoryEntry("Love Actually (2003)", ("Romance",), "dislike"),
        HistoryEntry("Alien (1979)", ("Horror", "Sci-Fi"), "like"),
    ]
    fields = heuristic_fields(entries)
    assert set(fields) == {"interests", "avoid", "summary"}
    assert fields["interests"][0] == "Sci-Fi" and "star" in fields["interests"]
    assert fields["avoid"] == ["Romance", "Comedy"]
    assert "Sci-Fi" in fields["summary"] and "skip" in fields["summary"]
    assert heuristic_fields([HistoryEntry("Heat (1995)", (), "view")])["summary"].startswith(
        "Recently engaged with Heat"
    )
    assert "Sci-Fi" in profile_text({"summary": "Likes films", "interests": ["Sci-Fi"]})


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"dialect": "vllm"}, "option 'dialect' must be one of openai_json_schema, json_object_schema"),
        ({"base_url": "localhost:8000"}, "option 'base_url' must be empty or start with http"),
        ({"base_url": "http://x/v1"}, "option 'model' is required"),
        ({"timeout_s": 0}, "option 'timeout_s' must be positive"),
        ({"max_concurrency": "2"}, "option 'max_concurrency' must be an integer"),
        ({"send_categories": "yes"}, r"option 'send_categories' must be a boolean \(true or false\), got 'yes'"),
        ({"refresh_after_event": 3}, "has no option 'refresh_after_event'"),
    ],
)
def test_bad_options_are_refused_naming_the_option(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SummaryOptions.parse(raw)


def test_api_key_comes_from_the_named_environment_variable() -> None:
    opts = SummaryOptions.parse({"api_key_env": "LLM_KEY"})
    assert opts.api_key({"LLM_KEY": "s3cret"}) == "s3cret"
    with pytest.raises(ConfigError, match="names LLM_KEY, which is not set"):
        opts.api_key({})


# ---- the plugin in a pipeline (no LLM configured: the heuristic summariser)


async def pipeline_with_summariser(**plugin_options: Any) -> Pipeline:
    # Content retrieval (embeddings) is left out: these tests are about the summariser alone.
    settings = offline_settings(disabled_plugins="content")
    settings.plugins = {"summariser": {"refresh_after_events": 2, "refresh_after_s": 60.0, **plugin_options}}
    return Pipeline(settings, get_plugin_manager(settings))


async def add_films(pipeline: Pipeline) -> None:
    genres = ["Sci-Fi", "Drama", "Comedy"]
    await pipeline.upsert_items([Item(id=f"m{i}", title=f"Film {i}", categories=(genres[i % 3],)) for i in range(30)])


async def test_profile_reaches_recommendations_and_explains_items() -> None:
    pipeline = await pipeline_with_summariser()
    plugin = pipeline.pm.get_plugin("summariser")
    async with pipeline.running():
        await add_films(pipeline)
        now = plugin.clock()
        for i in range(30):  # other users make every film popular, so there are candidates
            await pipeline.apply_event(Event(type="view", user_id=f"crowd{i % 4}", ts=now, id=f"c{i}", item_id=f"m{i}"))
        for i, item in enumerate(["m0", "m3", "m6"]):
            await pipeline.apply_event(Event(type="view", user_id="ivy", ts=now, id=f"v{i}", item_id=item))
        await until(lambda: pipeline.users.get("ivy").extras.get(PROFILE_KEY) is not None)  # type: ignore[union-attr]
        recs = await pipeline.recommend("ivy", 10)
    assert recs.profile is not None and recs.profile["source"] == "heuristic"
    assert recs.profile["interests"][0] == "Sci-Fi" and recs.profile["based_on_events"] >= 2
    assert set(recs.profile) == {"interests", "avoid", "summary", "source", "generated_at", "based_on_events"}
    sci_fi = [item for item in recs.items if int(item.item_id[1:]) % 3 == 0]
    assert sci_fi and all("matches your interest in Sci-Fi" in item.reasons for item in sci_fi)


async def test_old_events_from_the_rebuild_wake_no_summary_and_apply_returns_at_once() -> None:
    pipeline = await pipeline_with_summariser(max_event_age_s=600.0)
    plugin = pipeline.pm.get_plugin("summariser")
    async with pipeline.running():
        await add_films(pipeline)
        old = plugin.clock() - 3_600
        for i in range(10):
            await pipeline.apply_event(Event(type="view", user_id="old", ts=old + i, id=f"o{i}", item_id=f"m{i}"))
        assert plugin.scheduler.stats()["pending"] == 0 and plugin.scheduler.stats()["urgent"] == 0
        await asyncio.sleep(0.05)
        assert PROFILE_KEY not in pipeline.users.get("old").extras  # type: ignore[union-attr]
        # the first live event catches up on all of them
        await pipeline.apply_event(Event(type="view", user_id="old", ts=plugin.clock(), id="live", item_id="m20"))
        await until(lambda: PROFILE_KEY in pipeline.users.get("old").extras)  # type: ignore[union-attr]
    assert pipeline.users.get("old").extras[PROFILE_KEY]["based_on_events"] == 11  # type: ignore[union-attr,index]


@pytest.mark.timeout(60)
async def test_a_user_whose_items_are_unknown_does_not_hold_the_event_loop() -> None:
    # Events may arrive before their item: there is nothing to summarise yet, and the
    # scheduler must neither spin on the user (the event loop froze) nor lose them later.
    pipeline = await pipeline_with_summariser()
    plugin = pipeline.pm.get_plugin("summariser")
    async with pipeline.running():
        now = plugin.clock()
        for i in range(6):
            await pipeline.apply_event(Event(type="view", user_id="eve", ts=now, id=f"e{i}", item_id="not-yet"))
        ticks = 0
        for _ in range(20):
            await asyncio.sleep(0.005)
            ticks += 1
        assert ticks == 20 and plugin.scheduler.stats()["pending"] == 0
        assert PROFILE_KEY not in pipeline.users.get("eve").extras  # type: ignore[union-attr]
        # once the item is known, the user's next event brings the summary
        await add_films(pipeline)
        await pipeline.apply_event(Event(type="view", user_id="eve", ts=now, id="e-known", item_id="m0"))
        await until(lambda: PROFILE_KEY in pipeline.users.get("eve").extras)  # type: ignore[union-attr]


async def test_forgetting_a_user_drops_the_profile() -> None:
    pipeline = await pipeline_with_summariser()
    plugin = pipeline.pm.get_plugin("summariser")
    async with pipeline.running():
        await add_films(pipeline)
        for i in range(2):
            await pipeline.apply_event(
                Event(type="view", user_id="joe", ts=plugin.clock(), id=f"j{i}", item_id=f"m{i}")
            )
        await until(lambda: PROFILE_KEY in pipeline.users.get("joe").extras)  # type: ignore[union-attr]
        await pipeline.forget_user("joe")
        recs = await pipeline.recommend("joe")
    assert recs.profile is None


async def test_bad_plugin_options_stop_the_start_with_the_option_named() -> None:
    pipeline = await pipeline_with_summariser(max_retries=-1)
    with pytest.raises(ConfigError, match=r"\[plugins.summariser\] option 'max_retries'"):
        async with pipeline.running():
            pass  # entering is the test: the bad option must stop the start


async def test_an_llm_answering_too_late_times_out_retries_and_the_heuristic_stands_in() -> None:
    # A real server that holds every completion until it shuts down: only the chat client's
    # timeout (the plugin's timeout_s) ends each call.
    released = asyncio.Event()

    async def answer_too_late(request: web.Request) -> web.Response:
        await released.wait()
        return web.json_response({})

    async def release(app: web.Application) -> None:
        released.set()  # else the server's shutdown waits for the held handlers

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer_too_late)
    app.on_shutdown.append(release)
    async with serving(app) as url:
        pipeline = await pipeline_with_summariser(base_url=f"{url}/v1", model="m", timeout_s=0.2, max_retries=1)
        plugin = pipeline.pm.get_plugin("summariser")
        async with pipeline.running():
            await add_films(pipeline)
            for i in range(2):
                await pipeline.apply_event(
                    Event(type="view", user_id="kim", ts=plugin.clock(), id=f"k{i}", item_id=f"m{i}")
                )
            await until(lambda: plugin.scheduler.counts["summaries_heuristic"] == 2)
            counts = plugin.scheduler.counts.copy()
        profile = pipeline.users.get("kim").extras[PROFILE_KEY]  # type: ignore[union-attr]
    assert counts["llm_timeout"] == 2 and counts["llm_ok"] == 0, "a timeout is retried, then given up"
    # the stop-gap first profile, then the final one once the LLM gave up
    assert profile["source"] == "heuristic" and profile["based_on_events"] == 2
