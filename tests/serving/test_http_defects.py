"""The HTTP API and the agent's start and stop, as a client and a newcomer meet them."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from pathlib import Path

import aiohttp
import orjson
import pytest
from nats.js import api

from agent.app import Agent
from agent.bus.ingest import ensure_streams
from agent.config import Settings
from tests.builders import Client
from tests.processes import run_to_exit


async def _stored(client: Client, settings: Settings) -> int:
    return (await client.js.stream_info(settings.stream_name)).state.messages


def _deep_event(depth: int) -> bytes:
    # written by hand: orjson itself refuses to write JSON this deep
    context = b'{"a":' * (depth - 1) + b"{}" + b"}" * (depth - 1)
    return b'{"type": "view", "user_id": "deep", "item_id": "i", "context": ' + context + b"}"


@pytest.fixture
def lean(settings: Settings) -> Settings:
    # the embedding model is not what these tests are about, and loading it costs seconds
    settings.disabled_plugins = ["content"]
    return settings


async def test_events_the_validation_plugins_refuse_get_400_and_nothing_is_stored(
    lean: Settings, client: Client
) -> None:
    async with Agent(lean) as agent, aiohttp.ClientSession(agent.http_url) as http:
        ok = {"type": "view", "user_id": "val", "item_id": "i1"}
        too_high = {"type": "rate", "user_id": "val", "item_id": "i2", "value": 11}
        ahead = {"type": "view", "user_id": "val", "item_id": "i3", "ts": time.time() + 10 * 86_400}
        before = await _stored(client, lean)

        response = await http.post("/v1/events", json=too_high)
        body = await response.json()
        assert response.status == 400 and "rating 11" in body["error"] and "event_validation" in body["error"]

        response = await http.post("/v1/events", json=[ok, too_high, ok, ahead])
        body = await response.json()
        assert response.status == 400, body
        assert body["error"].startswith("event 1: rating 11")
        assert [entry["index"] for entry in body["refused"]] == [1, 3]
        assert "in the future" in body["refused"][1]["reason"]
        assert await _stored(client, lean) == before, "nothing of a refused batch is stored"

        response = await http.post("/v1/events", json=[ok, ok])
        assert response.status == 202
        assert await _stored(client, lean) == before + 2
    assert client.dead_letters == []


async def test_a_context_nested_300_deep_is_a_400_naming_the_depth(lean: Settings, client: Client) -> None:
    async with Agent(lean) as agent, aiohttp.ClientSession(agent.http_url) as http:
        before = await _stored(client, lean)
        event = _deep_event(300)
        response = await http.post("/v1/events", data=event)
        assert response.status == 400
        assert re.search(r"deep|depth", (await response.json())["error"])
        response = await http.post(
            "/v1/events", data=b'[{"type": "view", "user_id": "deep", "item_id": "i"}, ' + event + b"]"
        )
        body = await response.json()
        assert response.status == 400 and body["error"].startswith("event 1: ")
        assert await _stored(client, lean) == before


async def test_a_large_batch_is_stored_in_request_order_with_each_sequence(lean: Settings, client: Client) -> None:
    n = 3_000
    events = [{"id": f"big-{i}", "type": "view", "user_id": f"u{i % 30}", "item_id": f"i{i % 97}"} for i in range(n)]
    async with Agent(lean) as agent, aiohttp.ClientSession(agent.http_url) as http:
        response = await http.post("/v1/events", json=events)
        body = await response.json()
        assert response.status == 202 and body["accepted"] == n
        sequences = body["sequences"]
        assert len(sequences) == n and sequences == sorted(set(sequences)), "one sequence per event, in order"
        # each sequence is that event's message
        for index in (0, 1_234, n - 1):
            stored = await client.js.get_msg(lean.stream_name, sequences[index])
            assert orjson.loads(stored.data)["id"] == f"big-{index}"
        await client.wait_for(lambda: agent.metrics.value("recsys_events_applied_total") == n, timeout=60)
        # the same ids again: JetStream's window answers with the first sequences
        response = await http.post("/v1/events", json=events[:5])
        body = await response.json()
        assert response.status == 202 and body["duplicates"] == [0, 1, 2, 3, 4]
        assert body["sequences"] == sequences[:5]


async def test_a_partial_failure_names_exactly_what_was_stored(lean: Settings, client: Client) -> None:
    await ensure_streams(client.js, lean)
    info = await client.js.stream_info(lean.stream_name)
    config = info.config
    # the stream is full (an operator's limit, new messages refused) after two more
    config.max_msgs, config.discard = info.state.messages + 2, api.DiscardPolicy.NEW
    await client.js.update_stream(config)
    batch = [{"id": f"p-{i}", "type": "view", "user_id": "pat", "item_id": f"item-{i}"} for i in range(6)]
    async with Agent(lean) as agent, aiohttp.ClientSession(agent.http_url) as http:
        response = await http.post("/v1/events", json=batch)
        body = await response.json()
        assert response.status == 503 and "event stream unavailable" in body["error"]
        assert body["accepted"] == 2 and body["stored"] == [0, 1] and body["not_stored"] == [2, 3, 4, 5]
        assert len(body["sequences"]) == 2
        await client.wait_for(lambda: "p-1" in client.reflected_event_ids())
        assert agent.pipeline.users.get("pat").event_count == 2  # type: ignore[union-attr]


async def test_start_names_the_plugins_and_a_clean_stop_does_not_warn(
    lean: Settings, client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with Agent(lean):
        pass  # a start and a clean stop are the test
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("plugins: ")]
    assert "validate=event_validation" in line and "publish=nats_publisher" in line
    assert "content" not in line, "a disabled plugin is not listed"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == []


async def test_health_counts_are_integers_and_errors_are_json(settings: Settings, client: Client) -> None:
    settings.disabled_plugins = ["content"]
    settings.max_payload_bytes = 256  # so that a body over the request limit (100 events' worth) is small
    async with Agent(settings) as agent, aiohttp.ClientSession(agent.http_url) as http:
        response = await http.post("/v1/events", json={"id": "h", "type": "view", "user_id": "hal", "item_id": "i"})
        assert response.status == 202
        await client.wait_for(lambda: agent.metrics.value("recsys_events_applied_total") == 1)
        health = await (await http.get("/healthz")).json()
        assert type(health["events_applied"]) is int and health["events_applied"] == 1
        assert type(health["item_vectors"]) is int and type(health["users"]) is int

        response = await http.post("/v1/events", data=b"x" * 30_000)
        assert response.status == 413 and response.content_type == "application/json"
        assert "exceeded" in (await response.json())["error"]
        response = await http.get("/no/such/route")
        assert response.status == 404 and "error" in await response.json()


async def test_a_9000_byte_url_is_a_400_without_a_traceback(
    lean: Settings, client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with Agent(lean) as agent:
        host, port = agent.http_url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /v1/users/" + b"u" * 9_000 + b"/recommendations HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        status_line = await reader.readline()
        writer.close()
        health = await asyncio.open_connection(host, int(port))  # still serving
        health[1].close()
    assert re.match(rb"HTTP/1\.[01] (400|414) ", status_line), status_line
    assert not [r for r in caplog.records if r.exc_info], "no traceback in the log"
    assert "Traceback" not in caplog.text


def _occupied_port() -> socket.socket:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    return holder


@pytest.mark.parametrize("flag", ["--nats-port", "--http-port"])
async def test_a_taken_port_is_one_line_naming_its_flag(tmp_path: Path, flag: str) -> None:
    holder = _occupied_port()
    port = holder.getsockname()[1]
    ports = {"--nats-port": "0", "--http-port": "0", flag: str(port)}
    try:
        returncode, out, err = await run_to_exit(
            "--data-dir",
            str(tmp_path),
            *[part for pair in ports.items() for part in pair],
            env={"RECSYS_DISABLED_PLUGINS": "content", "RECSYS_LOAD_ENTRY_POINTS": "false"},
        )
    finally:
        holder.close()
    assert returncode == 1
    lines = (out + err).splitlines()
    expected = f"recsys-agent run: port {port} is in use (choose another with {flag})"
    assert lines[-1] == expected, lines
    assert not [line for line in lines if "Traceback" in line or "[INF]" in line or "WARNING" in line], lines
    if flag == "--nats-port":
        assert lines == [expected]
