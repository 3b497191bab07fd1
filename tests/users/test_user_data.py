"""Users' requests about their data (forget, export, merge) over HTTP and NATS, as an app or an
operator would make them, against real agents on a real nats-server."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import aiohttp
import nats
import orjson

from agent.app import Agent
from agent.bus.disposition import USER_TOKENS_HEADER
from agent.bus.embedded_server import client_url
from agent.bus.ingest import ensure_streams
from agent.config import Settings
from agent.users.stored_records import StoredMessage, names_user, read_stored
from agent.wire.user_tokens import tokens_named, user_token
from tests.builders import Client, catalog, offline_settings

FORGOTTEN = "forget-me-5e1f0c"
KEPT = "keep-me-9a2b7d"
KEY = "a-test-api-key-of-some-length"


def view(user_id: str, item: int, event_id: str) -> dict[str, Any]:
    return {"id": event_id, "type": "view", "user_id": user_id, "item_id": f"item-{item}"}


async def _request(client: Client, name: str, body: dict[str, Any]) -> dict[str, Any]:
    reply = await client.nc.request(client.settings.subject("users", name), orjson.dumps(body), timeout=10)
    return orjson.loads(reply.data)  # type: ignore[no-any-return]


async def _wait_for_stored(client: Client, stream: str, messages: int) -> None:
    async with asyncio.timeout(10):
        while (await client.js.stream_info(stream)).state.messages != messages:
            await asyncio.sleep(0.02)


def _files_naming(root: Path, text: str) -> list[Path]:
    needle = text.encode()
    return [path for path in root.rglob("*") if path.is_file() and needle in path.read_bytes()]


async def test_forget_over_http_survives_a_restart_and_leaves_no_trace_in_the_data_dir(tmp_path: Path) -> None:
    """The whole promise: after a forget and a restart the user is a stranger, and no file the
    agent keeps (JetStream's store, Qdrant's, key-value snapshots) holds their id."""
    settings = offline_settings(tmp_path, nats_port=0, http_port=0, api_keys=[KEY])
    headers = {"Authorization": f"Bearer {KEY}"}
    async with Agent(settings) as agent:
        nc = await nats.connect(client_url(tmp_path))
        client = Client(nc, settings)
        await client.listen()
        await client.upsert(catalog(30))
        await client.wait_for(lambda: agent.pipeline.catalog.active_count() == 30)
        async with aiohttp.ClientSession(agent.http_url) as http:
            events = [view(FORGOTTEN, i, f"f-{i}") for i in range(3)] + [view(KEPT, i + 5, f"k-{i}") for i in range(3)]
            response = await http.post("/v1/events", json=events, headers=headers)
            assert response.status == 202, await response.text()
            # a refused message that names the user: its dead letter is theirs too
            await client.publish_event(
                b'{"type": "view", "user_id": "' + FORGOTTEN.encode() + b'"}',
                subject=client.event_subject("view", FORGOTTEN),
            )
            await client.wait_for(lambda: {"f-2", "k-2"} <= set(client.reflected_event_ids()) and client.dead_letters)
            # the refused event lives on as its dead letter only
            await _wait_for_stored(client, settings.stream_name, 6)

            assert (await http.delete(f"/v1/users/{FORGOTTEN}")).status == 401, "the forget needs a key too"
            response = await http.delete(f"/v1/users/{FORGOTTEN}", headers=headers)
            assert response.status == 200, await response.text()
            answer = await response.json()
            assert answer == {
                "forgotten": True,
                "user_id": FORGOTTEN,
                "erased": {"events": 3, "dead_letters": 1, "state": 1},
            }
            again = await (await http.delete(f"/v1/users/{FORGOTTEN}", headers=headers)).json()
            assert again["erased"] == {"events": 0, "dead_letters": 0, "state": 0}, "forgetting twice finds nothing"
        await nc.drain()
    assert agent.pipeline.users.get(FORGOTTEN) is None

    async with Agent(settings) as agent:
        assert agent.pipeline.users.get(FORGOTTEN) is None, "the restart did not bring the user back"
        assert agent.pipeline.users.get(KEPT) is not None, "the other user's history was rebuilt"
        async with aiohttp.ClientSession(agent.http_url) as http:
            recs = await (await http.get(f"/v1/users/{FORGOTTEN}/recommendations", headers=headers)).json()
            stranger = await (await http.get("/v1/users/never-seen/recommendations", headers=headers)).json()
            exported = await (await http.get(f"/v1/users/{FORGOTTEN}/export", headers=headers)).json()
    assert [i["item_id"] for i in recs["items"]] == [i["item_id"] for i in stranger["items"]], "a new user's list"
    assert exported["events"] == [] and exported["dead_letters"] == [] and not exported["held"]["in_memory"]

    assert _files_naming(tmp_path, KEPT), "the scan finds what is there"
    assert _files_naming(tmp_path, FORGOTTEN) == []


async def test_forget_over_nats_reaches_every_agent_and_the_service_is_discoverable(
    settings: Settings, client: Client
) -> None:
    settings.disabled_plugins = ["content"]
    # two replicas, each consuming every event (a consumer of its own): both hold the user
    replica = dataclasses.replace(settings, consumer_name=f"{settings.consumer_name}-b")
    async with Agent(settings) as first, Agent(replica) as second:
        await client.upsert(catalog(20))
        await client.wait_for(
            lambda: first.pipeline.catalog.active_count() == 20 == second.pipeline.catalog.active_count()
        )
        for i in range(40):
            await client.publish_event(view(f"user-{i % 4}", i % 20, f"e-{i}"))
        await client.wait_for(lambda: len(set(client.reflected_event_ids())) == 40)
        await client.wait_for(lambda: all(a.pipeline.users.get("user-1") is not None for a in (first, second)))

        # discovery: both agents answer $SRV.PING, and INFO names the endpoints
        pings = await _gather_replies(client, "$SRV.PING.recsys-agent")
        assert len(pings) == 2 and {p["name"] for p in pings} == {"recsys-agent"}
        info = orjson.loads((await client.nc.request("$SRV.INFO.recsys-agent", b"", timeout=5)).data)
        subjects = {endpoint["subject"] for endpoint in info["endpoints"]}
        assert {settings.subject(s) for s in ("recommend", "users.forget", "users.export", "users.merge")} <= subjects

        answer = await _request(client, "forget", {"user_id": "user-1"})
        assert answer["forgotten"] is True and answer["erased"]["events"] == 10
        await client.wait_for(lambda: all(a.pipeline.users.get("user-1") is None for a in (first, second)))
        info = await client.js.stream_info(
            settings.stream_name, subjects_filter=settings.subject("events", "*", "user-1")
        )
        assert not info.state.subjects, "nothing of the user is left in the stream"
        assert (await client.js.stream_info(settings.stream_name)).state.messages == 30, "the others' events stay"

        # refusals are answers, never silence
        bad = await _request(client, "forget", {"user": "x"})
        assert bad == {"error": "missing field 'user_id'"}
        reply = await client.nc.request(settings.subject("users", "forget"), b"not json", timeout=5)
        assert "invalid JSON" in orjson.loads(reply.data)["error"]
        assert reply.headers and reply.headers.get("Nats-Service-Error-Code") == "400"


async def _gather_replies(client: Client, subject: str) -> list[dict[str, Any]]:
    inbox = client.nc.new_inbox()
    replies: list[dict[str, Any]] = []

    async def on_reply(msg: Any) -> None:
        replies.append(orjson.loads(msg.data))

    sub = await client.nc.subscribe(inbox, cb=on_reply)
    await client.nc.publish(subject, b"", reply=inbox)
    await asyncio.sleep(0.5)
    await sub.unsubscribe()
    return replies


async def test_export_shows_stored_events_dead_letters_and_what_is_held(settings: Settings, client: Client) -> None:
    settings.disabled_plugins = ["content"]
    async with Agent(settings) as agent:
        await client.upsert(catalog(10))
        await client.wait_for(lambda: agent.pipeline.catalog.active_count() == 10)
        for i in range(3):
            await client.publish_event(view("ann@example.com", i, f"a-{i}"))
        await client.publish_event(view("bob", 5, "b-0"))
        # wire contract v1: refused, with the subject to use
        await client.publish_event(
            orjson.dumps(view("ann@example.com", 9, "a-v1")), subject=settings.subject("events", "view")
        )
        await client.wait_for(lambda: "a-2" in client.reflected_event_ids() and client.dead_letters)
        async with aiohttp.ClientSession(agent.http_url) as http:
            over_http = await (await http.get("/v1/users/ann@example.com/export")).json()
        over_nats = await _request(client, "export", {"user_id": "ann@example.com"})
    assert over_http == over_nats
    assert [e["event"]["id"] for e in over_http["events"]] == ["a-0", "a-1", "a-2"]
    assert all(e["subject"] == client.event_subject("view", "ann@example.com") for e in over_http["events"])
    [letter] = over_http["dead_letters"]
    assert "publish it on" in letter["dead_letter"]["reason"]
    held = over_http["held"]
    assert held["in_memory"] and held["event_count"] == 3
    assert [h["item_id"] for h in held["history"]] == ["item-0", "item-1", "item-2"]
    assert held["plugins"]["fusion"]["last_ranking"]["shown"], "the fusion's kept ranking is shown"
    assert "bob" not in orjson.dumps(over_http).decode(), "another user's data never appears"


async def test_merge_keeps_the_visitors_history_under_the_login_and_forgets_the_visitor(
    settings: Settings, client: Client
) -> None:
    settings.disabled_plugins = ["content"]
    async with Agent(settings) as agent:
        await client.upsert(catalog(10))
        await client.wait_for(lambda: agent.pipeline.catalog.active_count() == 10)
        await client.publish_event(view("visitor-77", 1, "v-1"))
        # a body may leave its type to its subject: the merge keeps it all the same
        await client.publish_event(
            {"user_id": "visitor-77", "item_id": "item-2"}, subject=client.event_subject("purchase", "visitor-77")
        )
        await client.publish_event(view("carol", 3, "c-1"))
        # every event reflected, counted by event (the visitor's two may share one push)
        await client.wait_for(lambda: "c-1" in (ids := client.reflected_event_ids()) and len(set(ids)) >= 3)
        async with aiohttp.ClientSession(agent.http_url) as http:
            response = await http.post("/v1/users/carol/merge", json={"from": "visitor-77"})
            assert response.status == 200, await response.text()
            answer = await response.json()
            assert (await http.post("/v1/users/carol/merge", json={"from": "carol"})).status == 400
            assert (await http.post("/v1/users/carol/merge", data=b"[]")).status == 400
        assert answer["merged"] is True and answer["events"] == 2 and answer["forgotten"]["events"] == 2
        await client.wait_for(lambda: (u := agent.pipeline.users.get("carol")) is not None and u.event_count == 3)
        merged = await _request(client, "export", {"user_id": "carol"})
        assert sorted(h["item_id"] for h in merged["held"]["history"]) == ["item-1", "item-2", "item-3"]
        assert agent.pipeline.users.get("visitor-77") is None
        visitor = await _request(client, "export", {"user_id": "visitor-77"})
        assert visitor["events"] == [] and not visitor["held"]["in_memory"]
        # the moved events name neither user in their ids: the visitor is gone from the stream
        stored = [m async for m in read_stored(client.js, settings.stream_name, settings.subject("events", ">"))]
        assert not any(b"visitor-77" in m.data or "visitor-77" in m.subject for m in stored)
        again = await _request(client, "merge", {"user_id": "carol", "from": "visitor-77"})
        assert again["events"] == 0, "a merge asked twice moves nothing twice"


async def test_events_stored_under_wire_contract_v1_stay_applied_and_can_be_forgotten(
    settings: Settings, client: Client
) -> None:
    settings.disabled_plugins = ["content"]
    # a stream written by an agent of wire contract v1
    await ensure_streams(client.js, settings)
    await client.upsert(catalog(10))
    for i in range(2):
        await client.js.publish(settings.subject("events", "view"), orjson.dumps(view("old-user", i, f"o-{i}")))
    async with Agent(settings) as agent:
        assert (user := agent.pipeline.users.get("old-user")) is not None and user.event_count == 2
        # from now on a v1 subject is refused, naming the v2 one
        await client.js.publish(settings.subject("events", "view"), orjson.dumps(view("old-user", 5, "o-new")))
        await client.wait_for(lambda: client.dead_letters)
        assert f"publish it on '{client.event_subject('view', 'old-user')}'" in client.dead_letters[0]["reason"]
        assert agent.pipeline.users.get("old-user").event_count == 2  # type: ignore[union-attr]
        answer = await _request(client, "forget", {"user_id": "old-user"})
    assert answer["erased"] == {"events": 2, "dead_letters": 1, "state": 1}
    assert (await client.js.stream_info(settings.stream_name)).state.messages == 0


def _letter(body: dict[str, Any], tags: str | None = None) -> StoredMessage:
    headers = {USER_TOKENS_HEADER: tags} if tags is not None else {}
    return StoredMessage("DLQ", 1, "recsys.dlq", orjson.dumps(body), None, headers)


def test_a_dead_letter_is_the_users_when_it_names_them_and_never_by_a_match_of_text() -> None:
    # tagged by the agent when it dead-letters: the tags decide
    assert names_user(_letter({"subject": "x"}, "bob,~YW5u"), "ann", "~YW5u", "recsys")
    assert not names_user(_letter({"payload": '{"user_id": "ann"}'}, "bob"), "ann", "ann", "recsys")
    # untagged (stored before tags): a v2 subject with their token, or an excerpt with their user_id
    assert names_user(_letter({"subject": "recsys.events.view.~YW5u"}), "ann", "~YW5u", "recsys")
    assert names_user(_letter({"subject": "recsys.dlq", "payload": '{"user_id": "ann"}'}), "ann", "ann", "recsys")
    # another user's refused event that merely mentions the same text is not theirs
    other = {"subject": "recsys.events.view.bob", "payload": '{"type": "view", "user_id": "bob", "item_id": "item-7"}'}
    assert not names_user(_letter(other), "item-7", "item-7", "recsys")
    assert not names_user(_letter(other), "view", "view", "recsys")
    assert not names_user(_letter({"subject": "recsys.events.view", "payload": "{}"}), "view", "view", "recsys")


def test_a_dead_letter_is_tagged_with_the_users_its_message_names() -> None:
    assert tokens_named("recsys", "recsys.events.view.bob", b'{"user_id": "ann@x"}') == ["bob", user_token("ann@x")]
    assert tokens_named("recsys", "recsys.events.view", b'{"user_id": "bob"}') == ["bob"]
    assert tokens_named("recsys", "recsys.events.foo.view.bob", b"not json") == []
