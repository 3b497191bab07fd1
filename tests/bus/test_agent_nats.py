"""The agent driven over a real nats-server and its HTTP API, as a client would."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import orjson
import pytest
from nats.js import api

from agent.app import Agent
from agent.bus.ingest import ensure_streams
from agent.config import Settings
from agent.hooks.specs import hookimpl
from agent.wire.contract import Event
from agent.wire.user_tokens import user_token
from tests.builders import Client, catalog, make_settings


async def _applied(agent: Agent) -> float:
    return agent.metrics.value("recsys_events_applied_total")


async def test_event_gets_push_with_its_event_id_and_trending_items(settings: Settings, client: Client) -> None:
    async with Agent(settings) as agent:
        await client.upsert(catalog(20))
        await client.wait_for(lambda: agent.pipeline.catalog.active_count() == 20)
        for i, item in enumerate(["item-1", "item-1", "item-2"]):
            await client.publish_event({"id": f"pop-{i}", "type": "view", "user_id": f"other-{i}", "item_id": item})
        await client.publish_event({"id": "e1", "type": "click", "user_id": "alice", "item_id": "item-1"})
        await client.wait_for(lambda: "e1" in client.reflected_event_ids())
    push = next(p for p in client.pushes if p.get("event_id") == "e1")
    assert push["user_id"] == "alice"
    ids = [entry["item_id"] for entry in push["items"]]
    assert "item-1" not in ids, "an item the user interacted with is never recommended back"
    assert ids[0] == "item-2", "the most popular unseen item comes first"
    assert all(entry["reasons"] for entry in push["items"])
    assert len(ids) == settings.default_k


async def test_push_subject_uses_the_user_token(settings: Settings, client: Client) -> None:
    odd_user = "bob@example.com"
    got: list[bytes] = []

    async def on_msg(msg) -> None:  # type: ignore[no-untyped-def]
        got.append(msg.data)

    await client.nc.subscribe(settings.subject("recs", user_token(odd_user)), cb=on_msg)
    async with Agent(settings) as agent:
        await client.upsert(catalog(5))
        await client.publish_event({"id": "x1", "type": "view", "user_id": odd_user, "item_id": "item-0"})
        await client.wait_for(lambda: len(got) == 1)
        assert await _applied(agent) == 1
    assert orjson.loads(got[0])["user_id"] == odd_user


async def test_request_reply_and_http_api(settings: Settings, client: Client) -> None:
    async with Agent(settings) as agent:
        await client.upsert(catalog(30))
        await client.wait_for(lambda: agent.pipeline.catalog.active_count() == 30)
        async with aiohttp.ClientSession(agent.http_url) as http:
            response = await http.post(
                "/v1/events", json={"id": "h1", "type": "purchase", "user_id": "carol", "item_id": "item-3"}
            )
            assert response.status == 202, await response.text()
            await client.wait_for(lambda: "h1" in client.reflected_event_ids())

            response = await http.get("/v1/users/carol/recommendations", params={"k": "5"})
            body = await response.json()
            assert response.status == 200 and len(body["items"]) == 5
            assert "item-3" not in [entry["item_id"] for entry in body["items"]]

            response = await http.get("/v1/users/carol/recommendations", params={"k": "many"})
            assert response.status == 400 and "k must be" in (await response.json())["error"]

            response = await http.post("/v1/events", data=b"{not json")
            assert response.status == 400 and "invalid JSON" in (await response.json())["error"]
            response = await http.post("/v1/events", json={"type": "teleport", "user_id": "u", "item_id": "i"})
            assert response.status == 400 and "unknown event type" in (await response.json())["error"]

            health = await (await http.get("/healthz")).json()
            assert health["status"] == "ok" and health["events_applied"] == 1
            metrics = await (await http.get("/metrics")).text()
            assert "recsys_events_applied_total 1.0" in metrics

        reply = await client.nc.request(
            settings.subject("recommend"), orjson.dumps({"user_id": "carol", "k": 3}), timeout=5
        )
        body = orjson.loads(reply.data)
        assert body["user_id"] == "carol" and len(body["items"]) == 3
        reply = await client.nc.request(settings.subject("recommend"), b'{"k": 3}', timeout=5)
        assert "missing field 'user_id'" in orjson.loads(reply.data)["error"]


async def test_a_batch_the_stream_refuses_halfway_says_what_was_stored(settings: Settings, client: Client) -> None:
    settings.disabled_plugins = ["content"]
    async with Agent(settings) as agent:
        async with aiohttp.ClientSession(agent.http_url) as http:
            batch = [{"type": "view", "user_id": "dora", "item_id": f"item-{i}"} for i in range(3)]
            big = {"type": "view", "user_id": "dora", "item_id": "x", "context": {"pad": "y" * 70_000}}
            response = await http.post("/v1/events", json=[*batch, big])
            assert response.status == 413
            # the stream is full (an operator's limit, new messages refused) after one more
            info = await client.js.stream_info(settings.stream_name)
            config = info.config
            config.max_msgs, config.discard = info.state.messages + 1, api.DiscardPolicy.NEW
            await client.js.update_stream(config)
            response = await http.post("/v1/events", json=batch)
            body = await response.json()
            assert response.status == 503 and "event stream unavailable" in body["error"]
            assert body["accepted"] == 1 and len(body["sequences"]) == 1
        await client.wait_for(lambda: agent.pipeline.users.get("dora") is not None)
        assert agent.pipeline.users.get("dora").event_count == 1, "nothing of the refused batch was stored"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("payload", "subject_type", "reason"),
    [
        (b"{oops", "view", "invalid JSON"),
        (b"[1, 2]", "view", "must be a JSON object"),
        (b'{"type": "view", "item_id": "i"}', "view", "missing field 'user_id'"),
        (b'{"type": "view", "user_id": 7, "item_id": "i"}', "view", "'user_id' must be a string"),
        (b'{"type": "zap", "user_id": "u", "item_id": "i"}', "zap", "unknown event type"),
        (b'{"type": "rate", "user_id": "u", "item_id": "i"}', "rate", "needs a numeric 'value'"),
        (b'{"type": "view", "user_id": "u", "item_id": "i", "ts": "yesterday"}', "view", "RFC 3339"),
        # the shape of a date, but no such day: dead-lettered with its reason, not retried
        (b'{"type": "view", "user_id": "u", "item_id": "i", "ts": "2024-02-30T00:00:00Z"}', "view", "not a valid date"),
        (b'{"type": "click", "user_id": "u", "item_id": "i"}', "view", "events.click.u'"),
        (
            b'{"type": "view", "user_id": "u", "item_id": "i", "context": {"pad": "' + b"x" * 70_000 + b'"}}',
            "view",
            "exceeds the limit",
        ),
    ],
)
async def test_bad_event_goes_to_dlq_with_reason(
    settings: Settings, client: Client, payload: bytes, subject_type: str, reason: str
) -> None:
    async with Agent(settings) as agent:
        await client.publish_event(payload, subject=client.event_subject(subject_type, "u"))
        await client.publish_event({"id": "ok", "type": "view", "user_id": "u", "item_id": "i"})
        await client.wait_for(lambda: client.dead_letters and "ok" in client.reflected_event_ids())
        assert await _applied(agent) == 1
    [letter] = client.dead_letters
    assert reason in letter["reason"], letter
    assert letter["subject"] == client.event_subject(subject_type, "u")


async def test_duplicate_event_id_counts_once(settings: Settings, client: Client) -> None:
    async with Agent(settings) as agent:
        event = {"id": "dup", "type": "view", "user_id": "dave", "item_id": "item-1"}
        for _ in range(3):
            await client.publish_event(event)
        await client.publish_event({"id": "last", "type": "view", "user_id": "dave", "item_id": "item-2"})
        await client.wait_for(lambda: "last" in client.reflected_event_ids())
        assert await _applied(agent) == 2
        assert agent.metrics.value("recsys_events_duplicate_total") == 2
        assert agent.pipeline.users.get("dave").event_count == 2  # type: ignore[union-attr]
    assert client.reflected_event_ids().count("dup") == 1


async def test_bad_catalog_messages_are_dead_lettered(settings: Settings, client: Client) -> None:
    async with Agent(settings) as agent:
        await client.upsert(b'{"id": "no-title"}')
        await client.upsert([{"id": "a", "title": "A"}, {"id": "b", "title": 5}])
        await client.js.publish(settings.subject("catalog", "delete"), b'{"nope": 1}')
        await client.upsert({"id": "good", "title": "Good"})
        await client.wait_for(lambda: len(client.dead_letters) == 3 and "good" in agent.pipeline.catalog)
        assert "a" not in agent.pipeline.catalog, "one bad item rejects its whole batch"
        await client.js.publish(settings.subject("catalog", "delete"), b'{"id": "good"}')
        await client.wait_for(lambda: "good" not in agent.pipeline.catalog)
    reasons = " | ".join(letter["reason"] for letter in client.dead_letters)
    assert "missing field 'title'" in reasons and "item 1: field 'title' must be a string" in reasons
    assert "a delete needs" in reasons


async def test_thousand_events_exactly_once_and_hundred_malformed(settings: Settings, client: Client) -> None:
    async with Agent(settings) as agent:
        await client.upsert(catalog(200))
        for i in range(1000):
            await client.publish_event(
                {"id": f"ev-{i}", "type": "view", "user_id": f"user-{i % 50}", "item_id": f"item-{(i * 7) % 200}"}
            )
            if i % 10 == 0:
                bad = b'{"type": "view", "user_id": ' + str(i).encode() + b"}"
                await client.publish_event(bad, subject=client.event_subject("view", str(i)))
        await client.wait_for(
            lambda: len(set(client.reflected_event_ids())) == 1000 and len(client.dead_letters) == 100, timeout=60
        )
        assert await _applied(agent) == 1000
        assert agent.metrics.value("recsys_pushed_events_total") == 1000
        assert agent.metrics.value("recsys_dead_letters_total", source="events") == 100
        # still serving
        reply = await client.nc.request(settings.subject("recommend"), b'{"user_id": "user-1"}', timeout=5)
        assert len(orjson.loads(reply.data)["items"]) == 10
    ids = client.reflected_event_ids()
    assert len(ids) == 1000 and set(ids) == {f"ev-{i}" for i in range(1000)}
    assert all("reason" in letter and letter["payload"] for letter in client.dead_letters)


async def test_a_burst_is_a_backlog_until_applied(settings: Settings, client: Client) -> None:
    # fewer deliveries in flight than events: the stream holds the rest of the burst for a while
    settings.max_ack_pending = 64
    async with Agent(settings) as agent:
        await client.upsert(catalog(50))
        await client.wait_for(lambda: agent.pipeline.catalog.active_count() == 50)
        backlog = agent.pipeline.context.backlog
        assert backlog() == 0
        for i in range(2000):  # core publishes: the client does not wait for the stream
            body = {"id": f"b-{i}", "type": "view", "user_id": f"user-{i % 100}", "item_id": f"item-{i % 50}"}
            await client.nc.publish(client.event_subject("view", body["user_id"]), orjson.dumps(body))
        seen: list[int] = []

        async def applied() -> bool:
            seen.append(backlog())
            return await _applied(agent) == 2000

        async with asyncio.timeout(60):
            while not await applied():
                await asyncio.sleep(0.005)
    # what profile writing gives way to: seen while the burst lasted, and none once applied
    assert max(seen) > 0 and seen[-1] == 0


async def test_restart_applies_events_published_while_down_and_keeps_state(settings: Settings, client: Client) -> None:
    async with Agent(settings) as agent:
        await client.upsert(catalog(10))
        await client.publish_event({"id": "before", "type": "view", "user_id": "erin", "item_id": "item-1"})
        await client.wait_for(lambda: "before" in client.reflected_event_ids())
    # the agent is down: these wait in the stream
    for i in range(5):
        await client.publish_event({"id": f"down-{i}", "type": "view", "user_id": "erin", "item_id": f"item-{i + 2}"})
    async with Agent(settings) as agent:
        await client.wait_for(lambda: {f"down-{i}" for i in range(5)} <= set(client.reflected_event_ids()))
        user = agent.pipeline.users.get("erin")
        assert user is not None and user.event_count == 6, "state before the restart was rebuilt"
        assert agent.metrics.value("recsys_events_applied_total") == 6
        recs = await agent.pipeline.recommend("erin")
        shown = {entry.item_id for entry in recs.items}
        assert shown.isdisjoint({f"item-{i}" for i in range(1, 7)})
    assert client.reflected_event_ids().count("before") == 1


async def test_events_stored_before_the_first_start_are_applied_once(settings: Settings, client: Client) -> None:
    # `catalog import` creates the streams, so clients may publish before the agent's consumer
    # exists; a new consumer must start after what the rebuild applied, not apply it again.
    settings.dedup_capacity = 10  # fewer keys than events: the deduplicator cannot hide it
    settings.disabled_plugins = ["content"]
    await ensure_streams(client.js, settings)
    await client.upsert(catalog(5))
    for i in range(30):
        await client.publish_event({"type": "view", "user_id": "early", "item_id": f"item-{i % 5}"})
    async with Agent(settings) as agent:
        await client.publish_event({"id": "live", "type": "view", "user_id": "early", "item_id": "item-0"})
        await client.wait_for(lambda: "live" in client.reflected_event_ids())
        assert agent.pipeline.users.get("early").event_count == 31  # type: ignore[union-attr]
        assert await _applied(agent) == 31 and agent.metrics.value("recsys_catalog_upserts_total") == 5


async def test_a_rebuild_judges_events_as_they_were_judged_on_arrival(settings: Settings, client: Client) -> None:
    settings.disabled_plugins = ["content"]
    settings.plugins = {"event_validation": {"max_future_skew_s": 1.0}}
    async with Agent(settings) as agent:
        await client.upsert(catalog(3))
        ahead = time.time() + 2.5
        await client.publish_event({"id": "early", "type": "view", "user_id": "fay", "item_id": "item-0", "ts": ahead})
        await client.wait_for(lambda: client.dead_letters)
        assert "in the future" in client.dead_letters[0]["reason"]
    await asyncio.sleep(max(0.0, ahead - time.time()))
    # by the clock of this restart the event is no longer ahead; by its arrival it was
    async with Agent(settings) as agent:
        assert agent.pipeline.users.get("fay") is None


async def test_a_cluster_is_reached_through_comma_separated_urls(
    settings: Settings, client: Client, nats_url: str
) -> None:
    # one server of the "cluster" is down: the agent connects to another
    settings.nats_url = f"nats://127.0.0.1:1, {nats_url}"
    settings.disabled_plugins = ["content"]
    async with Agent(settings):
        await client.upsert(catalog(3))
        await client.publish_event({"id": "c1", "type": "view", "user_id": "gil", "item_id": "item-0"})
        await client.wait_for(lambda: "c1" in client.reflected_event_ids())


async def test_a_start_keeps_what_an_operator_set_on_the_streams(settings: Settings, client: Client) -> None:
    await ensure_streams(client.js, settings)
    info = await client.js.stream_info(settings.stream_name)
    config = info.config
    config.max_msgs, config.description = 123_456, "edited by an operator"
    await client.js.update_stream(config)
    settings.stream_max_age_s = 3_600.0
    await ensure_streams(client.js, settings)  # as every agent start does
    config = (await client.js.stream_info(settings.stream_name)).config
    assert (config.max_msgs, config.description) == (123_456, "edited by an operator")
    assert config.max_age == 3_600.0, "what the settings decide is applied"


async def test_a_message_that_cannot_be_applied_does_not_stop_later_starts(settings: Settings, client: Client) -> None:
    class Breaks:
        """A plugin whose enrichment is broken for one user: a bug that retries cannot cure."""

        @hookimpl
        def recsys_enrich_event(self, event: Event) -> Event | str:
            return "not an event" if event.user_id == "cursed" else event

    settings.disabled_plugins = ["content"]
    settings.max_deliver = 2
    async with Agent(settings, extra_plugins=[("breaks", Breaks())]) as agent:
        await client.upsert(catalog(3))
        await client.publish_event({"id": "bad", "type": "view", "user_id": "cursed", "item_id": "item-0"})
        await client.publish_event({"id": "ok", "type": "view", "user_id": "fine", "item_id": "item-1"})
        await client.wait_for(lambda: client.dead_letters and "ok" in client.reflected_event_ids())
        assert "failed" in client.dead_letters[0]["reason"]
    async with Agent(settings, extra_plugins=[("breaks", Breaks())]) as agent:
        assert agent.pipeline.users.get("fine").event_count == 1  # type: ignore[union-attr]
        assert agent.pipeline.users.get("cursed") is None


async def test_items_added_before_a_restart_are_not_new_again_after_it(settings: Settings, client: Client) -> None:
    settings.plugins = {"freshness": {"window_s": 6.0}}
    # content retrieval is not what this is about, and loading its model would age the new item
    settings.disabled_plugins = ["content"]

    def fresh_ids(agent: Agent) -> set[str]:
        freshness = agent.pipeline.pm.get_plugin("freshness")
        found = freshness.recsys_candidates(query=agent.pipeline.make_query("newcomer", 10))
        return {agent.pipeline.catalog.ids[s] for s in found.slots.tolist()} if found is not None else set()

    async with Agent(settings) as agent:
        await client.upsert(catalog(3))
        await client.wait_for(lambda: agent.pipeline.catalog.active_count() == 3)
        assert fresh_ids(agent) == {"item-0", "item-1", "item-2"}
    await asyncio.sleep(7.0)  # older than the window now
    await client.upsert({"id": "late", "title": "Late arrival"})
    async with Agent(settings) as agent:
        await client.wait_for(lambda: agent.pipeline.catalog.active_count() == 4)
        # the rebuild dates every item by the stream, not by the restart
        assert fresh_ids(agent) == {"late"}


async def test_catalog_survives_restart(settings: Settings, client: Client) -> None:
    async with Agent(settings) as agent:
        await client.upsert(catalog(7))
        await client.wait_for(lambda: agent.pipeline.catalog.active_count() == 7)
    async with Agent(settings) as agent:
        assert agent.pipeline.catalog.active_count() == 7


async def test_two_prefixes_do_not_mix(nats_url: str, tmp_path: Path, client: Client, settings: Settings) -> None:
    other = make_settings(nats_url, tmp_path / "other")
    async with Agent(settings), Agent(other) as second:
        await client.publish_event({"id": "mine", "type": "view", "user_id": "f", "item_id": "i"})
        await client.wait_for(lambda: "mine" in client.reflected_event_ids())
        await asyncio.sleep(0.1)
        assert second.metrics.value("recsys_events_applied_total") == 0


async def test_agents_that_share_the_work_start_side_by_side_and_each_hold_the_whole_catalog(
    settings: Settings, client: Client
) -> None:
    """Two agents of one deployment (the same settings): the events' consumer is shared, each
    event applied by one of them; every catalog change reaches both; a bad catalog message is
    one dead letter, not one per agent."""
    settings.disabled_plugins = ["content"]
    async with Agent(settings) as first, Agent(settings) as second:
        await client.upsert(catalog(20))
        await client.upsert(b'{"id": "no-title"}')
        agents = (first, second)
        await client.wait_for(lambda: all(a.pipeline.catalog.active_count() == 20 for a in agents))
        for i in range(200):
            await client.publish_event({"id": f"s-{i}", "type": "view", "user_id": f"u-{i % 20}", "item_id": "item-1"})
        await client.wait_for(lambda: len(set(client.reflected_event_ids())) == 200, timeout=30)
        assert sum([await _applied(a) for a in agents]) == 200, "each event applied once, by one agent"
        await asyncio.sleep(0.5)
        stored = await client.js.stream_info(settings.dlq_stream_name)
    assert stored.state.messages == 1, "the bad item is one dead letter"
