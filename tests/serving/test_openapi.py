"""/openapi.json against the agent that serves it: every route described, and real answers of
every route (and the websocket's messages) checked against their schemas. Also /readyz and
/metrics, whose answers the description names."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client import CONTENT_TYPE_LATEST

from agent.app import Agent
from agent.config import Settings
from agent.serving.openapi import served_description
from agent.serving.socket_tokens import TokenSigner
from tests.builders import Client, catalog, make_settings

KEY = "key-one-0123456789abcdef"
SECRET = "s" * 40
AUTH = {"Authorization": f"Bearer {KEY}"}

# the JSON Schema keywords the checker below applies, and those that only describe: a
# description that used any other would be checked by nobody
CHECKED = {"$ref", "type", "properties", "required", "additionalProperties", "items", "anyOf", "enum", "const"}
CHECKED |= {"minimum", "maximum", "minLength", "maxLength", "pattern"}
DESCRIBING = {"description", "default", "format"}


# --- a JSON Schema checker for the keywords above -----------------------------------------------


def _resolve(root: dict[str, Any], ref: str) -> dict[str, Any]:
    assert ref.startswith("#/"), ref
    node: Any = root
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def _has_type(value: Any, kind: str) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return {
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
        "string": isinstance(value, str),
        "boolean": isinstance(value, bool),
        "integer": number and float(value).is_integer(),
        "number": number,
        "null": value is None,
    }[kind]


def problems(schema: dict[str, Any], value: Any, root: dict[str, Any], where: str = "$") -> list[str]:
    """Where ``value`` breaks ``schema``; empty when it conforms."""
    unknown = set(schema) - CHECKED - DESCRIBING
    assert not unknown, f"{where}: the description uses keywords nobody checks: {unknown}"
    if "$ref" in schema:
        return problems(_resolve(root, schema["$ref"]), value, root, where)
    found: list[str] = []
    if "anyOf" in schema and all(problems(option, value, root, where) for option in schema["anyOf"]):
        found.append(f"{where}: matches none of {len(schema['anyOf'])} alternatives")
    if "const" in schema and value != schema["const"]:
        found.append(f"{where}: {value!r} is not {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        found.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if "type" in schema and not _has_type(value, schema["type"]):
        return [*found, f"{where}: {type(value).__name__} is not {schema['type']}"]
    if isinstance(value, dict):
        found += [f"{where}: lacks {key!r}" for key in schema.get("required", []) if key not in value]
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, inner in value.items():
            if key in properties:
                found += problems(properties[key], inner, root, f"{where}.{key}")
            elif extra is False:
                found.append(f"{where}: {key!r} is not described")
            elif isinstance(extra, dict):
                found += problems(extra, inner, root, f"{where}.{key}")
    if isinstance(value, list) and "items" in schema:
        for index, inner in enumerate(value):
            found += problems(schema["items"], inner, root, f"{where}[{index}]")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", len(value)):
            found.append(f"{where}: length {len(value)} is out of bounds")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            found.append(f"{where}: {value!r} does not match {schema['pattern']}")
    if _has_type(value, "number"):
        if value < schema.get("minimum", value) or value > schema.get("maximum", value):
            found.append(f"{where}: {value} is out of bounds")
    return found


def test_the_checker_finds_what_breaks_a_schema() -> None:
    root = {"components": {"schemas": {"N": {"type": "integer", "minimum": 1}}}}
    schema = {
        "type": "object",
        "required": ["a"],
        "properties": {"a": {"$ref": "#/components/schemas/N"}, "b": {"type": "array", "items": {"enum": ["x"]}}},
        "additionalProperties": False,
    }
    assert problems(schema, {"a": 2, "b": ["x"]}, root) == []
    assert problems(schema, {"a": 0}, root) == ["$.a: 0 is out of bounds"]
    assert problems(schema, {"a": True}, root) == ["$.a: bool is not integer"]
    assert problems(schema, {"b": ["y"], "c": 1}, root) == [
        "$: lacks 'a'",
        "$.b[0]: 'y' is not one of ['x']",
        "$: 'c' is not described",
    ]
    assert problems({"anyOf": [{"type": "string"}, {"type": "null"}]}, 3, root)
    with pytest.raises(AssertionError, match="nobody checks"):
        problems({"oneOf": []}, 1, root)


# --- the agent and its description -------------------------------------------------------------


@pytest.fixture
def settings(nats_url: str, tmp_path: Path) -> Settings:
    return make_settings(nats_url, tmp_path, disabled_plugins="content", api_keys=KEY, token_secret=SECRET, demo="true")


@pytest.fixture
async def agent(settings: Settings, client: Client) -> AsyncIterator[Agent]:
    async with Agent(settings) as running:
        await client.upsert(catalog(12))
        await client.wait_for(lambda: running.pipeline.catalog.active_count() == 12)
        yield running


@pytest.fixture
async def spec(agent: Agent) -> dict[str, Any]:
    async with aiohttp.ClientSession(agent.http_url) as http:
        response = await http.get("/openapi.json")
        assert response.status == 200, "the description is open: it tells nothing about users"
        return await response.json()


def test_every_route_is_described(spec: dict[str, Any]) -> None:
    # the description lists exactly the routes the agent serves (see served_description)
    assert spec["openapi"].startswith("3.1")
    undescribed = [
        f"{method.upper()} {path}"
        for path, operations in spec["paths"].items()
        for method, operation in operations.items()
        if operation.get("x-undescribed")
    ]
    assert undescribed == []
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            assert operation["summary"] and operation["responses"], (method, path)
            for status in operation["responses"]:
                assert re.fullmatch(r"[1-5]\d\d", status), (method, path, status)
    assert "/v1/demo/tokens" in spec["paths"], "in demo mode"


def test_outside_demo_mode_the_demo_route_is_not_described(settings: Settings) -> None:
    served = {("get", "/v1/ws"), ("get", "/plugin/thing")}
    document = served_description(dataclasses.replace(settings, demo=False), served)
    assert set(document["paths"]) == {"/v1/ws", "/plugin/thing"}
    assert document["paths"]["/plugin/thing"]["get"]["x-undescribed"] is True


class Checker:
    """Checks answers against the description and records which (method, path, status) were seen."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.seen: set[tuple[str, str, str]] = set()

    async def check(self, method: str, path: str, response: aiohttp.ClientResponse) -> Any:
        operation = self.spec["paths"][path][method]
        status = str(response.status)
        assert status in operation["responses"], f"{method.upper()} {path} answered {status}, not described"
        self.seen.add((method, path, status))
        described = operation["responses"][status].get("content", {})
        body = await response.read()
        if not described:
            return body
        media = response.headers["Content-Type"]
        matching = [kind for kind in described if media.split(";")[0].strip() == kind.split(";")[0].strip()]
        assert matching, f"{method.upper()} {path} {status}: {media} is not one of {list(described)}"
        for kind in matching:
            # a described parameter (Prometheus's version) must be in the real content type
            for parameter in kind.split(";")[1:]:
                assert parameter.strip() in media, (path, media)
        if media.startswith("application/json"):
            value = orjson.loads(body)
            found = problems(described[matching[0]]["schema"], value, self.spec)
            assert not found, f"{method.upper()} {path} {status}: {found}"
            return value
        return body.decode()

    def message(self, kind: str, value: Any) -> None:
        schema = self.spec["paths"]["/v1/ws"]["get"]["x-websocket"][kind]["schema"]
        found = problems(schema, value, self.spec)
        assert not found, f"websocket {kind}: {found}"


async def test_real_answers_of_every_route_match_the_description(
    agent: Agent, spec: dict[str, Any], settings: Settings, client: Client
) -> None:
    checker = Checker(spec)
    check = checker.check
    event = {"id": "o1", "type": "view", "user_id": "amy", "item_id": "item-1"}
    async with aiohttp.ClientSession(agent.http_url) as http:
        await check("post", "/v1/events", await http.post("/v1/events", json=event, headers=AUTH))
        await check("post", "/v1/events", await http.post("/v1/events", json=[event, event], headers=AUTH))
        await check("post", "/v1/events", await http.post("/v1/events", json={"type": "nope"}, headers=AUTH))
        await check("post", "/v1/events", await http.post("/v1/events", data=b"{", headers=AUTH))
        await check("post", "/v1/events", await http.post("/v1/events", json=event))
        big = {**event, "context": {"x": "y" * settings.max_payload_bytes}}
        await check("post", "/v1/events", await http.post("/v1/events", json=big, headers=AUTH))
        await client.wait_for(lambda: agent.metrics.value("recsys_events_applied_total") >= 1)

        recs = "/v1/users/{user_id}/recommendations"
        await check("get", recs, await http.get("/v1/users/amy/recommendations", headers=AUTH))
        await check("get", recs, await http.get("/v1/users/amy/recommendations?k=0", headers=AUTH))
        await check("get", recs, await http.get("/v1/users/amy/recommendations"))

        for method, path, url, body in (
            ("get", "/v1/users/{user_id}/export", "/v1/users/amy/export", None),
            ("post", "/v1/users/{user_id}/merge", "/v1/users/amy/merge", {"from": "visitor-1"}),
            ("post", "/v1/users/{user_id}/merge", "/v1/users/amy/merge", {"to": "x"}),
            ("delete", "/v1/users/{user_id}", "/v1/users/amy", None),
        ):
            if method in spec["paths"].get(path, {}):
                await check(method, path, await http.request(method, url, json=body, headers=AUTH))

        minted = await check("post", "/v1/tokens", await http.post("/v1/tokens", json={"user_id": "amy"}, headers=AUTH))
        await check("post", "/v1/tokens", await http.post("/v1/tokens", json={"user_id": 5}, headers=AUTH))
        await check("post", "/v1/tokens", await http.post("/v1/tokens", json={"user_id": "amy"}))

        user_token = minted["token"]
        items = "/v1/items"
        await check("get", items, await http.get(items, params={"q": "item 1"}, headers=AUTH))
        await check("get", items, await http.get(items, params={"ids": "item-2,nope", "token": user_token}))
        await check("get", items, await http.get(items, params={"limit": "0"}, headers=AUTH))
        await check("get", items, await http.get(items))

        demo = "/v1/demo/tokens"
        await check("post", demo, await http.post(demo, json={"user_id": "demo-ada"}))
        await check("post", demo, await http.post(demo, json={"user_id": "amy"}))
        await check("post", demo, await http.post(demo, json={"user_id": "demo-ada", "ttl_s": 99}))

        await check("get", "/v1/ws", await http.get("/v1/ws"))
        await check("get", "/v1/ws", await http.get("/v1/ws", params={"token": user_token}))
        expired = TokenSigner(SECRET).mint("amy", 1, now=time.time() - 5)[0]
        await check("get", "/v1/ws", await http.get("/v1/ws", params={"token": expired}))
        ws = await http.ws_connect("/v1/ws", params={"token": user_token}, origin=agent.http_url)
        checker.seen.add(("get", "/v1/ws", "101"))
        sent = [
            {"id": "w1", "type": "like", "item_id": "item-3"},
            [{"type": "view", "item_id": "item-4", "user_id": "amy"}],
            {"type": "view", "item_id": "item-4", "user_id": "bob"},
        ]
        for message in sent:
            checker.message("client_messages", message)
            await ws.send_str(orjson.dumps(message).decode())
        await ws.send_str("[]")
        received: list[dict[str, Any]] = []

        def kinds() -> set[str]:
            return {next(k for k in ("items", "sequences", "refused", "error") if k in m) for m in received}

        # a push, two acknowledgements, a refusal, an error (for the empty array), and the push of w1
        while kinds() != {"items", "sequences", "refused", "error"} or not any(
            "w1" in m.get("event_ids", []) for m in received
        ):
            received.append(orjson.loads((await ws.receive(timeout=10)).data))
        await ws.close()
        for message in received:
            checker.message("server_messages", message)

        for path in ("/", "/page/app.js", "/page/page.css", "/healthz", "/readyz", "/metrics", "/openapi.json"):
            await check("get", path, await http.get(path))

        # not ready: one of its streams is gone
        await client.js.delete_stream(settings.catalog_stream_name)
        ready = await check("get", "/readyz", await http.get("/readyz"))
        assert ready["ready"] is False and settings.catalog_stream_name in ready["waiting_for"]["streams"]

    expected = (
        {("post", "/v1/events", s) for s in ("202", "400", "401", "413")}
        | {("get", "/v1/users/{user_id}/recommendations", s) for s in ("200", "400", "401")}
        | {("post", "/v1/tokens", s) for s in ("200", "400", "401")}
        | {("get", "/v1/items", s) for s in ("200", "400", "401")}
        | {("post", "/v1/demo/tokens", s) for s in ("200", "400", "403")}
        | {("get", "/v1/ws", s) for s in ("101", "401")}
        | {("get", "/readyz", "200"), ("get", "/readyz", "503")}
    )
    assert expected <= checker.seen, expected - checker.seen
    # and every route of the description was answered at least once
    every = {(method, path) for path, operations in spec["paths"].items() for method in operations}
    assert every == {(method, path) for method, path, _ in checker.seen}


async def test_metrics_have_the_prometheus_content_type_and_process_metrics(agent: Agent) -> None:
    async with aiohttp.ClientSession(agent.http_url) as http:
        response = await http.get("/metrics")
        text = await response.text()
    # the version of the text format that prometheus_client writes (0.0.4, 1.0.0 from its 0.22)
    assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
    assert re.fullmatch(r"text/plain; version=\d+\.\d+\.\d+; charset=utf-8", CONTENT_TYPE_LATEST)
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds", "recsys_ws_sockets"):
        assert re.search(rf"^{name} \d", text, re.MULTILINE), name
    assert "python_gc_collections_total" in text


async def test_ready_once_the_catalog_has_its_vectors(nats_url: str, tmp_path: Path) -> None:
    # with content retrieval on, every catalog item needs its vector first
    settings = make_settings(nats_url, tmp_path, token_secret=SECRET)
    async with Agent(settings) as agent, aiohttp.ClientSession(agent.http_url) as http:
        nc = agent.pipeline.context.nc
        assert nc is not None
        await nc.jetstream().publish(settings.subject("catalog", "upsert"), orjson.dumps(catalog(40)))
        seen = []
        async with asyncio.timeout(120):
            while True:
                response = await http.get("/readyz")
                body = await response.json()
                seen.append((response.status, body))
                if response.status == 200:
                    break
        assert body == {"ready": True, "waiting_for": {}}
        assert agent.pipeline.catalog.active_count() == 40 == int(agent.metrics.value("recsys_item_vectors"))
        waiting = [b for status, b in seen if status == 503]
        assert all("catalog_vectors" in b["waiting_for"] for b in waiting)
