"""Websockets (/v1/ws) and user tokens, against a real agent on a real nats-server, driven as a
browser or an app would: aiohttp's websocket client, a raw TCP socket for a client that stops
reading, and ``recsys-agent token``."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from agent.app import Agent
from agent.config import ConfigError, Settings
from agent.serving.socket_tokens import SECRET_FILE, TokenRefused, TokenSigner, token_secret
from agent.serving.websockets.hub import TOKEN_EXPIRED, TOO_SLOW
from agent.serving.websockets.outbox import Outbox
from agent.wire.contract import Event, event_subject
from agent.wire.user_tokens import user_token
from tests.builders import Client, catalog, make_settings, offline_settings

KEY = "key-one-0123456789abcdef"
SECRET = "s" * 40


def lean(nats_url: str, data_dir: Path, **overrides: Any) -> Settings:
    # no embedding model: these tests are about sockets, and trending gives every user a list
    return make_settings(nats_url, data_dir, disabled_plugins="content", token_secret=SECRET, **overrides)


@pytest.fixture
def settings(nats_url: str, tmp_path: Path) -> Settings:
    return lean(nats_url, tmp_path)


@pytest.fixture
async def agent(settings: Settings, client: Client) -> AsyncIterator[Agent]:
    async with Agent(settings) as running:
        await client.upsert(catalog(30))
        await client.wait_for(lambda: running.pipeline.catalog.active_count() == 30)
        # popular items, so that every user's list has something in it
        for i in range(6):
            await client.publish_event({"id": f"pop-{i}", "type": "view", "user_id": f"crowd-{i}", "item_id": "item-1"})
        await client.wait_for(lambda: running.metrics.value("recsys_events_applied_total") == 6)
        yield running


def token(user_id: str, ttl_s: int = 600, secret: str = SECRET) -> str:
    return TokenSigner(secret).mint(user_id, ttl_s)[0]


class Socket:
    """One client socket and every message it received, in order."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.messages: list[dict[str, Any]] = []
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                self.messages.append(orjson.loads(msg.data))

    @property
    def pushes(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if "items" in m]

    def reflected(self) -> list[str]:
        return [i for p in self.pushes for i in p.get("event_ids") or []]

    async def wait_for(self, predicate: Any, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.01)

    async def send(self, body: Any) -> None:
        await self.ws.send_str(orjson.dumps(body).decode())

    async def close(self) -> None:
        await self.ws.close()
        await self._reader


async def open_socket(http: aiohttp.ClientSession, user_id: str, **kwargs: Any) -> Socket:
    ws = await http.ws_connect("/v1/ws", params={"token": token(user_id)}, **kwargs)
    return Socket(ws)


async def stream_messages(client: Client, settings: Settings) -> list[tuple[str, dict[str, Any]]]:
    """(subject, body) of every message in the event stream."""
    info = await client.js.stream_info(settings.stream_name)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await client.js.get_msg(settings.stream_name, seq)
        out.append((msg.subject, orjson.loads(msg.data)))
    return out


# --- tokens ---------------------------------------------------------------------------------


def test_a_token_names_its_user_and_expiry_and_is_refused_when_changed() -> None:
    signer = TokenSigner(SECRET)
    minted, expires = signer.mint("bob@example.com", 60, now=1_000_000)
    version, user, expiry, signature = minted.split(".")
    assert version == "v1" and expiry == str(expires) == "1000060"
    assert base64.urlsafe_b64decode(user + "=" * (-len(user) % 4)).decode() == "bob@example.com"
    assert signer.verify(minted, now=1_000_059).user_id == "bob@example.com"
    with pytest.raises(TokenRefused, match="expired"):
        signer.verify(minted, now=1_000_060)
    other_user = base64.urlsafe_b64encode(b"alice").decode().rstrip("=")
    for forged in (
        f"{version}.{other_user}.{expiry}.{signature}",
        f"{version}.{user}.{int(expiry) + 9999}.{signature}",
        token("bob@example.com", secret="t" * 40),
    ):
        with pytest.raises(TokenRefused, match="signature"):
            signer.verify(forged, now=1_000_000)
    for malformed in ("", "v1", "v2.a.1.b", "v1.a.b.c.d", "no dots at all"):
        with pytest.raises(TokenRefused, match="not a user token"):
            signer.verify(malformed)


def test_a_token_can_be_minted_in_another_language_from_the_documented_format() -> None:
    # what a backend without this package does: HMAC-SHA256 over "v1.<b64url user>.<expires>"
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).decode().rstrip("=")

    signed = f"v1.{b64('zoë'.encode())}.{int(time.time()) + 60}"
    made = f"{signed}.{b64(hmac.new(SECRET.encode(), signed.encode(), hashlib.sha256).digest())}"
    assert TokenSigner(SECRET).verify(made).user_id == "zoë"


def test_the_secret_is_generated_once_in_the_data_dir_and_a_short_one_is_refused(tmp_path: Path) -> None:
    settings = offline_settings(tmp_path)
    first = token_secret(settings)
    assert len(first) >= 32 and token_secret(settings) == first
    assert (tmp_path / SECRET_FILE).stat().st_mode & 0o777 == 0o600
    with pytest.raises(ConfigError, match="token_secret") as refused:
        offline_settings(tmp_path, token_secret="short-secret")
    assert "short-secret" not in str(refused.value)


def test_recsys_agent_token_prints_the_token_alone(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "agent", "token", "alice", "--ttl", "120", "--data-dir", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    printed = done.stdout
    assert printed.endswith("\n") and printed.count("\n") == 1
    verified = TokenSigner(token_secret(offline_settings(tmp_path))).verify(printed.strip())
    assert verified.user_id == "alice" and 110 <= verified.expires_at - time.time() <= 121
    refused = subprocess.run([*command[:-4], "--ttl", "0", "--data-dir", str(tmp_path)], capture_output=True, text=True)
    assert refused.returncode == 2 and refused.stdout == "" and "ttl_s" in refused.stderr


# --- refusals before the upgrade -----------------------------------------------------------


async def test_missing_forged_expired_and_malformed_tokens_get_401_with_a_reason(agent: Agent) -> None:
    expired = TokenSigner(SECRET).mint("alice", 1, now=time.time() - 10)[0]
    cases = {
        "needed": {},
        "signature": {"params": {"token": token("alice", secret="x" * 40)}},
        "expired": {"params": {"token": expired}},
        "not a user token": {"headers": {"Authorization": "Bearer not-a-token"}},
    }
    async with aiohttp.ClientSession(agent.http_url) as http:
        for reason, request in cases.items():
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect("/v1/ws", **request)
            assert refused.value.status == 401, reason
            # the same request as plain HTTP shows the body
            response = await http.get("/v1/ws", **request)
            assert response.status == 401 and response.content_type == "application/json"
            assert reason in (await response.json())["error"]
        # a Bearer header works as well as ?token=
        ws = await http.ws_connect("/v1/ws", headers={"Authorization": f"Bearer {token('alice')}"})
        assert orjson.loads((await ws.receive(timeout=10)).data)["user_id"] == "alice"
        await ws.close()
    assert agent.metrics.value("recsys_ws_refused_total", reason="token") == 8


async def test_origins_other_than_the_agents_own_and_the_allowed_are_refused(nats_url: str, tmp_path: Path) -> None:
    settings = lean(nats_url, tmp_path, ws_allowed_origins="https://shop.example")
    async with Agent(settings) as agent, aiohttp.ClientSession(agent.http_url) as http:
        params = {"token": token("alice")}
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect("/v1/ws", params=params, origin="https://evil.example")
        assert refused.value.status == 403
        # the allowed one, the agent's own pages, and a client that is no browser page
        for origin in ("https://shop.example", agent.http_url, None):
            ws = await http.ws_connect("/v1/ws", params=params, origin=origin)
            await ws.close()


async def test_sockets_past_ws_max_sockets_get_503(nats_url: str, tmp_path: Path) -> None:
    async with Agent(lean(nats_url, tmp_path, ws_max_sockets=2)) as agent:
        async with aiohttp.ClientSession(agent.http_url) as http:
            held = [await open_socket(http, f"u{i}") for i in range(2)]
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await open_socket(http, "u3")
            assert refused.value.status == 503
            await held[0].close()
            await held[1].wait_for(lambda: agent.metrics.value("recsys_ws_sockets") == 1)
            third = await open_socket(http, "u3")
            await third.close()
            await held[1].close()


async def test_post_v1_tokens_needs_the_api_key_and_checks_its_body(nats_url: str, tmp_path: Path) -> None:
    async with Agent(lean(nats_url, tmp_path, api_keys=KEY)) as agent, aiohttp.ClientSession(agent.http_url) as http:
        assert (await http.post("/v1/tokens", json={"user_id": "alice"})).status == 401
        keyed = {"Authorization": f"Bearer {KEY}"}
        answer = await http.post("/v1/tokens", json={"user_id": "alice", "ttl_s": 90}, headers=keyed)
        body = await answer.json()
        assert answer.status == 200 and answer.headers["Cache-Control"] == "no-store"
        assert body["user_id"] == "alice" and 80 <= body["expires_at"] - time.time() <= 91
        for bad, reason in (
            ({"user_id": ""}, "user_id"),
            ({"user_id": "a", "ttl_s": 0}, "ttl_s"),
            ({"user_id": "a", "ttl": 5}, "unknown field 'ttl'"),
            (["a"], "JSON object"),
        ):
            refused = await http.post("/v1/tokens", json=bad, headers=keyed)
            assert refused.status == 400 and reason in (await refused.json())["error"], bad
        # the socket takes the minted token without any API key
        ws = await http.ws_connect("/v1/ws", params={"token": body["token"]})
        assert orjson.loads((await ws.receive(timeout=10)).data)["user_id"] == "alice"
        await ws.close()


# --- after the upgrade ---------------------------------------------------------------------


async def test_a_socket_gets_the_current_list_then_its_users_pushes_only(agent: Agent, client: Client) -> None:
    async with aiohttp.ClientSession(agent.http_url) as http:
        alice = await open_socket(http, "alice")
        bob = await open_socket(http, "bob@example.com")
        await alice.wait_for(lambda: len(alice.pushes) == 1)
        await bob.wait_for(lambda: len(bob.pushes) == 1)
        first = alice.pushes[0]
        assert first["user_id"] == "alice" and first["items"][0]["item_id"] == "item-1"
        await client.publish_event({"id": "a1", "type": "click", "user_id": "alice", "item_id": "item-1"})
        await client.publish_event({"id": "b1", "type": "click", "user_id": "bob@example.com", "item_id": "item-2"})
        await alice.wait_for(lambda: "a1" in alice.reflected())
        await bob.wait_for(lambda: "b1" in bob.reflected())
        await client.publish_event({"id": "a2", "type": "click", "user_id": "alice", "item_id": "item-3"})
        await alice.wait_for(lambda: "a2" in alice.reflected())
        # bob's push of b1 was published before alice's a2: anything of alice's would be here by now
        assert all(p["user_id"] == "alice" for p in alice.pushes)
        assert all(p["user_id"] == "bob@example.com" for p in bob.pushes)
        assert "a1" not in bob.reflected() and "a2" not in bob.reflected() and "b1" not in alice.reflected()
        # each push is the NATS push, byte for byte the same JSON
        pushed = next(p for p in client.pushes if "a2" in (p.get("event_ids") or []))
        assert next(p for p in alice.pushes if "a2" in p.get("event_ids", [])) == pushed
        await alice.close()
        await bob.close()


async def test_a_push_made_by_any_agent_reaches_the_socket(agent: Agent, settings: Settings, client: Client) -> None:
    # another agent's push is a message on the user's subject: the socket holds no other source
    elsewhere = {"user_id": "bob@example.com", "items": [], "generated_at": 1.0, "event_ids": ["far-away"]}
    async with aiohttp.ClientSession(agent.http_url) as http:
        bob = await open_socket(http, "bob@example.com")
        await bob.wait_for(lambda: len(bob.pushes) == 1)
        await client.nc.publish(settings.subject("recs", user_token("bob@example.com")), orjson.dumps(elsewhere))
        await bob.wait_for(lambda: "far-away" in bob.reflected())
        assert bob.pushes[-1] == elsewhere
        await bob.close()


async def test_events_from_a_socket_are_stored_like_http_events(
    agent: Agent, settings: Settings, client: Client
) -> None:
    async with aiohttp.ClientSession(agent.http_url) as http:
        alice = await open_socket(http, "alice")
        before = len(await stream_messages(client, settings))
        await alice.send({"id": "s1", "type": "like", "item_id": "item-4"})
        await alice.send([{"id": "s2", "type": "view", "item_id": "item-5", "user_id": "alice"}])
        await alice.wait_for(lambda: {"s1", "s2"} <= set(alice.reflected()))
        acks = [m for m in alice.messages if "accepted" in m and "error" not in m]
        assert [a["accepted"] for a in acks] == [1, 1] and all(len(a["sequences"]) == 1 for a in acks)
        stored = (await stream_messages(client, settings))[before:]
        assert [body["id"] for _, body in stored] == ["s1", "s2"]
        for subject, body in stored:
            assert body["user_id"] == "alice"
            assert subject == event_subject(settings.subject_prefix, Event(type=body["type"], user_id="alice", ts=0.0))

        # what HTTP refuses, the socket refuses with the same reasons, and nothing is stored
        await alice.send({"id": "s3", "type": "teleport", "item_id": "item-5"})
        await alice.send("not an event")
        await alice.ws.send_str("{not json")
        await alice.ws.send_bytes(b"{}")
        await alice.wait_for(lambda: sum("error" in m for m in alice.messages) == 4)
        errors = [m for m in alice.messages if "error" in m]
        assert "type" in errors[0]["refused"][0]["reason"] and errors[0]["accepted"] == 0
        assert "invalid JSON" in errors[2]["error"] and "text frames" in errors[3]["error"]
        assert len(await stream_messages(client, settings)) == before + 2
        await alice.close()


async def test_an_event_naming_another_user_is_refused_and_never_stored(
    agent: Agent, settings: Settings, client: Client
) -> None:
    async with aiohttp.ClientSession(agent.http_url) as http:
        alice = await open_socket(http, "alice")
        before = len(await stream_messages(client, settings))
        mixed = [
            {"id": "ok", "type": "view", "item_id": "item-2"},
            {"id": "bad", "type": "view", "item_id": "item-2", "user_id": "bob"},
        ]
        await alice.send(mixed)
        await alice.wait_for(lambda: any("error" in m for m in alice.messages))
        refusal = next(m for m in alice.messages if "error" in m)
        assert refusal["refused"] == [
            {"index": 1, "reason": "the event names another user than the socket's token: never stored"}
        ]
        await asyncio.sleep(0.2)
        assert len(await stream_messages(client, settings)) == before, "a batch with a refused event stores nothing"
        assert agent.pipeline.users.get("bob") is None
        await alice.close()


async def test_many_sockets_of_one_user_share_one_subscription_and_each_gets_every_push(
    agent: Agent, client: Client
) -> None:
    async with aiohttp.ClientSession(agent.http_url) as http:
        sockets = [await open_socket(http, "alice") for _ in range(25)]
        assert agent.metrics.value("recsys_ws_sockets") == 25
        assert agent.metrics.value("recsys_ws_users") == 1
        await client.publish_event({"id": "m1", "type": "click", "user_id": "alice", "item_id": "item-7"})
        for s in sockets:
            await s.wait_for(lambda s=s: "m1" in s.reflected())
        for s in sockets[:24]:
            await s.close()
        last = sockets[24]
        await last.wait_for(lambda: agent.metrics.value("recsys_ws_sockets") == 1)
        assert agent.metrics.value("recsys_ws_users") == 1
        await client.publish_event({"id": "m2", "type": "click", "user_id": "alice", "item_id": "item-8"})
        await last.wait_for(lambda: "m2" in last.reflected())
        await last.close()
        await last.wait_for(lambda: agent.metrics.value("recsys_ws_sockets") == 0)
        assert agent.metrics.value("recsys_ws_users") == 0, "the last socket's close drops the subscription"


async def test_a_reconnecting_client_gets_the_list_that_reflects_what_it_missed(agent: Agent, client: Client) -> None:
    async with aiohttp.ClientSession(agent.http_url) as http:
        alice = await open_socket(http, "alice")
        await alice.send({"id": "r1", "type": "click", "item_id": "item-1"})
        await alice.wait_for(lambda: "r1" in alice.reflected())
        await alice.close()
        # while away: more of alice's events, applied by the agent
        await client.publish_event({"id": "r2", "type": "purchase", "user_id": "alice", "item_id": "item-2"})
        await client.wait_for(lambda: "r2" in client.reflected_event_ids())
        again = await open_socket(http, "alice")
        await again.wait_for(lambda: len(again.pushes) == 1)
        listed = [entry["item_id"] for entry in again.pushes[0]["items"]]
        assert listed and "item-1" not in listed and "item-2" not in listed, "what she acted on is not offered back"
        await again.send({"id": "r3", "type": "view", "item_id": "item-3"})
        await again.wait_for(lambda: "r3" in again.reflected())
        await again.close()


async def test_a_socket_is_closed_when_its_token_expires(agent: Agent) -> None:
    async with aiohttp.ClientSession(agent.http_url) as http:
        ws = await http.ws_connect("/v1/ws", params={"token": token("alice", ttl_s=2)})
        async with asyncio.timeout(10):
            messages = [message async for message in ws]  # read until the agent closes it
        assert messages, "the current list came first"
        assert ws.close_code == TOKEN_EXPIRED
    assert agent.metrics.value("recsys_ws_closed_total", reason="expired") == 1


async def test_sockets_are_closed_going_away_when_the_agent_stops(settings: Settings, client: Client) -> None:
    agent = Agent(settings)
    await agent.__aenter__()
    try:
        async with aiohttp.ClientSession(agent.http_url) as http:
            ws = await http.ws_connect("/v1/ws", params={"token": token("alice")})
            await ws.receive(timeout=10)
            stopping = asyncio.get_running_loop().create_task(agent.__aexit__(None, None, None))
            async with asyncio.timeout(10):
                remaining = [message async for message in ws]  # read until the agent closes it
            assert ws.close_code == 1001, remaining
            await stopping
    finally:
        if agent._stack is not None:
            await agent.__aexit__(None, None, None)


# --- backpressure --------------------------------------------------------------------------


async def test_a_newer_push_replaces_an_unsent_one_and_replies_are_bounded() -> None:
    outbox = Outbox(max_replies=2)
    assert outbox.put_push(b"list 1") is False
    assert outbox.put_push(b"list 2") is True
    assert outbox.put_reply(b"ack 1") and outbox.put_reply(b"ack 2")
    assert outbox.put_reply(b"ack 3") is False, "a client that never reads is not given more"
    assert [await outbox.next() for _ in range(3)] == [(b"ack 1", False), (b"ack 2", False), (b"list 2", True)]
    waiting = asyncio.ensure_future(outbox.next())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    outbox.put_push(b"list 3")
    assert await waiting == (b"list 3", True)
    assert (outbox.pushes_put, outbox.replaced) == (3, 1)


def _close_frame(data: bytes) -> bytes | None:
    """The payload of the close frame among the server's frames in ``data`` (unmasked, RFC 6455),
    or None when ``data`` does not hold one whole yet."""
    at = 0
    while at + 2 <= len(data):
        opcode, length, head = data[at] & 0x0F, data[at + 1] & 0x7F, 2
        if length == 126:
            length, head = int.from_bytes(data[at + 2 : at + 4], "big"), 4
        elif length == 127:
            length, head = int.from_bytes(data[at + 2 : at + 10], "big"), 10
        if at + head + length > len(data):
            return None
        if opcode == 0x8:
            return data[at + head : at + head + length]
        at += head + length
    return None


def _stalled_client(url: str, path: str) -> socket.socket:
    """A websocket client that completes the handshake and then never reads: a tiny receive
    buffer, so that the agent's sends back up at once."""
    host, port = url.removeprefix("http://").split(":")
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect((host, int(port)))
    key = base64.b64encode(b"0123456789abcdef").decode()
    raw.sendall(
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += raw.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return raw


async def test_a_stalled_client_is_closed_as_too_slow_while_others_keep_their_pushes(
    settings: Settings, client: Client
) -> None:
    # lists of 200 items (about 10 kB each): a few fill the stalled client's buffers
    settings = dataclasses.replace(settings, ws_send_timeout_s=1.0, default_k=200, max_k=200)
    async with Agent(settings) as agent, aiohttp.ClientSession(agent.http_url) as http:
        await client.upsert(catalog(400))
        await client.wait_for(lambda: agent.pipeline.catalog.active_count() == 400)
        for i in range(400):
            await client.publish_event({"type": "view", "user_id": f"crowd-{i % 7}", "item_id": f"item-{i}"})
        stalled = await asyncio.to_thread(_stalled_client, agent.http_url, f"/v1/ws?token={token('slow')}")
        healthy = await open_socket(http, "slow")
        try:
            n = 0
            async with asyncio.timeout(60):
                while not agent.metrics.value("recsys_ws_closed_total", reason="slow"):
                    n += 1
                    await client.publish_event({"id": f"p{n}", "type": "view", "user_id": "slow", "item_id": "item-1"})
                    await asyncio.sleep(0.02)
            # the stalled client, once it reads, finds the close frame with its code behind the data
            stalled.settimeout(5)
            data = b""
            while (close := _close_frame(data)) is None:
                chunk = await asyncio.to_thread(stalled.recv, 65536)
                assert chunk, "the connection ended without a close frame"
                data += chunk
            assert int.from_bytes(close[:2], "big") == TOO_SLOW and b"too slow" in close
            # while its sends were blocked, newer pushes replaced older ones instead of queueing
            assert agent.metrics.value("recsys_ws_pushes_replaced_total") >= 1
            # the reader that keeps up still gets the latest push of all
            await client.publish_event({"id": "last", "type": "view", "user_id": "slow", "item_id": "item-2"})
            await healthy.wait_for(lambda: "last" in healthy.reflected())
            await healthy.wait_for(lambda: agent.metrics.value("recsys_ws_sockets") == 1)
        finally:
            stalled.close()
            await healthy.close()


async def test_after_a_burst_of_events_the_last_push_reflects_the_last_event(agent: Agent, client: Client) -> None:
    async with aiohttp.ClientSession(agent.http_url) as http:
        alice = await open_socket(http, "alice")
        await alice.wait_for(lambda: len(alice.pushes) == 1)
        for i in range(200):
            await client.publish_event({"id": f"q{i}", "type": "view", "user_id": "alice", "item_id": f"item-{i % 30}"})
        await alice.wait_for(lambda: "q199" in alice.reflected(), timeout=30)
        assert alice.pushes[-1]["event_ids"][-1] == "q199"
        await alice.close()
