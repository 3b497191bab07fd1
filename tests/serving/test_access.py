"""Access: API keys on the HTTP API, credentials on the embedded nats-server, and the
production NATS layout in deploy/nats, each checked against the real components."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import nats
import orjson
import pytest
from nats.aio.client import Client as NATS

from agent.app import Agent
from agent.bus.embedded_server import (
    CREDENTIALS_FILE,
    NatsServerError,
    client_url,
    embedded_nats_server,
    ensure_credentials,
    find_binary,
    read_credentials,
)
from agent.cli import main as cli
from agent.config import ConfigError, Settings
from tests.builders import REPO_ROOT, make_settings, offline_settings
from tests.processes import nats_server, start_agent, stop

KEY = "key-one-0123456789abcdef"
OTHER_KEY = "key-two-0123456789abcdef"
DEPLOY_CONF = REPO_ROOT / "deploy" / "nats" / "recsys.conf"
# the accounts' passwords, as deploy/README.md says to provide them
DEPLOY_ENV = {
    f"{name}_PASSWORD": f"pw-{name.lower()}-0123456789"
    for name in ("SHOP_AGENT", "SHOP_APP", "SHOP_OPS", "NEWS_AGENT", "NEWS_APP", "NEWS_OPS", "NATS_ADMIN")
}


# --- HTTP ---------------------------------------------------------------------------------


@pytest.fixture
async def keyed_agent(nats_url: str, tmp_path: Path) -> AsyncIterator[Agent]:
    settings = make_settings(nats_url, tmp_path, disabled_plugins="content", api_keys=f"{KEY},{OTHER_KEY}")
    async with Agent(settings) as agent:
        yield agent


async def test_v1_routes_need_a_key_and_health_and_metrics_do_not(keyed_agent: Agent) -> None:
    recs = "/v1/users/amy/recommendations"
    async with aiohttp.ClientSession(keyed_agent.http_url) as http:
        for headers in ({}, {"Authorization": f"Bearer {KEY}x"}, {"Authorization": f"Basic {KEY}"}):
            response = await http.get(recs, headers=headers)
            assert response.status == 401, headers
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            body = await response.json()
            assert set(body) == {"error"} and KEY not in body["error"]
        wrong = await http.get(recs, headers={"Authorization": f"Bearer {KEY}x"})
        assert 'error="invalid_token"' in wrong.headers["WWW-Authenticate"]

        # a refused event is not stored: the one sent with the key is the stream's first
        event = {"id": "e1", "type": "view", "user_id": "amy", "item_id": "m1"}
        assert (await http.post("/v1/events", json=event)).status == 401
        for key in (KEY, OTHER_KEY):
            assert (await http.get(recs, headers={"Authorization": f"Bearer {key}"})).status == 200
        stored = await http.post("/v1/events", json=event, headers={"Authorization": f"bearer {OTHER_KEY}"})
        assert stored.status == 202 and (await stored.json())["sequences"] == [1]

        for open_path in ("/healthz", "/metrics"):
            assert (await http.get(open_path)).status == 200
        # an unknown path tells nothing without a key
        assert (await http.get("/v1/nothing-here")).status == 401
        assert (await http.get("/v1/nothing-here", headers={"Authorization": f"Bearer {KEY}"})).status == 404


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_loopback_serves_without_keys(host: str) -> None:
    Settings(http_host=host).check_http_exposure()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "10.1.2.3", "recsys.example.com"])
def test_an_address_others_reach_needs_keys_or_insecure(host: str) -> None:
    with pytest.raises(ConfigError, match=r"RECSYS_API_KEYS.*--insecure"):
        Settings(http_host=host).check_http_exposure()
    Settings(http_host=host, api_keys=[KEY]).check_http_exposure()
    Settings(http_host=host, insecure=True).check_http_exposure()


def test_insecure_comes_from_the_flag_the_environment_or_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [n for n in os.environ if n.startswith("RECSYS_")]:
        monkeypatch.delenv(name)
    from agent.cli.settings_flags import settings_from_args

    parser = cli.build_parser({})
    assert settings_from_args(parser.parse_args(["run", "--insecure"])).insecure
    assert not settings_from_args(parser.parse_args(["run"])).insecure
    monkeypatch.setenv("RECSYS_INSECURE", "true")
    assert settings_from_args(parser.parse_args(["run"])).insecure


def test_run_refuses_a_public_address_without_keys_and_starts_nothing(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--http-host", "0.0.0.0", "--nats-port", "0", "--http-port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "RECSYS_DATA_DIR": str(tmp_path), "RECSYS_LOAD_ENTRY_POINTS": "false"},
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("recsys-agent: configuration error: config key 'http_host' is '0.0.0.0'")
    assert "RECSYS_API_KEYS" in result.stderr and "--insecure" in result.stderr
    assert not (tmp_path / "nats").exists()


# --- the embedded nats-server ---------------------------------------------------------------


async def _refused(url: str) -> None:
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=5)


async def test_the_embedded_server_asks_for_the_credentials_the_agent_made(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output: list[str] = []
    process, nats_url, http_url = await start_agent(
        "--data-dir",
        str(tmp_path),
        "--nats-port",
        "0",
        "--http-port",
        "0",
        "--log-level",
        "DEBUG",
        env={"RECSYS_DISABLED_PLUGINS": "content", "RECSYS_LOAD_ENTRY_POINTS": "false"},
        output=output,
    )
    credentials_file = tmp_path / "nats" / CREDENTIALS_FILE
    password = read_credentials(credentials_file).password
    try:
        assert nats_url.startswith("nats://127.0.0.1:")
        await _refused(nats_url)
        await _refused(nats_url.replace("nats://", "nats://recsys-agent:wrong@"))

        # what `recsys-agent nats-credentials` prints is what a client connects with
        printed = subprocess.run(
            [sys.executable, "-m", "agent", "nats-credentials", "--data-dir", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert printed.returncode == 0 and printed.stderr == ""
        assert printed.stdout == client_url(tmp_path) + "\n"
        assert printed.stdout == nats_url.replace("nats://", f"nats://recsys-agent:{password}@") + "\n"
        nc = await nats.connect(printed.stdout.strip())
        reply = await nc.request("recsys.recommend", orjson.dumps({"user_id": "amy", "k": 3}), timeout=10)
        assert orjson.loads(reply.data)["user_id"] == "amy"
        await nc.close()

        async with aiohttp.ClientSession(http_url) as http:
            health = await (await http.get("/healthz")).text()
            metrics = await (await http.get("/metrics")).text()
        assert orjson.loads(health)["nats_url"] == nats_url
    finally:
        await stop(process)
    assert process.returncode == 0
    await asyncio.sleep(0.2)  # the drain of the agent's output reads its last lines

    assert stat.S_IMODE(credentials_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(credentials_file.parent.stat().st_mode) == 0o700
    text = "".join(output)
    assert f"kept in {credentials_file}" in text
    assert f"recsys-agent nats-credentials --data-dir {tmp_path}" in text
    assert "nats-server: " in text, "the server's own log is relayed at DEBUG, and checked too"
    for shown in (text, health, metrics):
        assert password not in shown

    # stopped, the command names the configured port (the default), with the same password
    assert cli.main(["nats-credentials", "--data-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"nats://recsys-agent:{password}@127.0.0.1:4222\n"


async def test_catalog_import_publishes_to_the_embedded_server_with_its_credentials(tmp_path: Path) -> None:
    from agent.cli.catalog_import import publish_items
    from agent.wire.contract import parse_items

    settings = offline_settings(tmp_path)
    await publish_items(settings, parse_items([{"id": "m1", "title": "M1"}]))
    async with embedded_nats_server(tmp_path / "nats") as server:
        await _refused(server.address)
        nc = await nats.connect(server.url)
        assert (await nc.jetstream().stream_info(settings.catalog_stream_name)).state.messages == 1
        await nc.close()


def test_credentials_are_made_once_private_and_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = tmp_path / "nats"
    path = ensure_credentials(store)
    first = path.read_bytes()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(store.stat().st_mode) == 0o700
    assert len(read_credentials(path).password) >= 32

    # a later start keeps them; a file others could read is made private again, said loudly
    path.chmod(0o644)
    store.chmod(0o755)
    with caplog.at_level(logging.WARNING):
        assert ensure_credentials(store) == path
    assert path.read_bytes() == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(store.stat().st_mode) == 0o700
    assert "open to other users" in caplog.text
    assert read_credentials(path).password not in caplog.text

    # two data dirs never share a password
    assert read_credentials(ensure_credentials(tmp_path / "other")).password != read_credentials(path).password


def test_a_damaged_credentials_file_is_refused_with_what_to_do(tmp_path: Path) -> None:
    store = tmp_path / "nats"
    ensure_credentials(store).write_text("authorization { user: x }\n")
    with pytest.raises(NatsServerError, match="delete it"):
        ensure_credentials(store)


def test_nats_credentials_says_why_it_has_none(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["nats-credentials", "--data-dir", str(tmp_path)]) == 1
    assert "made at the agent's first start" in capsys.readouterr().err
    config = tmp_path / "agent.toml"
    config.write_text('nats_url = "nats://u:p4ss@nats.example.com:4222"\n')
    assert cli.main(["nats-credentials", "--config", str(config), "--data-dir", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "nats://u:***@nats.example.com:4222" in captured.err and "p4ss" not in captured.err + captured.out


# --- deploy/nats ------------------------------------------------------------------------------


def test_the_deploy_configuration_is_valid_for_nats_server() -> None:
    result = subprocess.run(
        [find_binary(), "-t", "-c", str(DEPLOY_CONF)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **DEPLOY_ENV},
    )
    assert result.returncode == 0, result.stderr
    assert "is valid" in result.stdout + result.stderr


@pytest.fixture
def deploy_server(tmp_path: Path) -> Iterator[int]:
    """nats-server on the deploy configuration, its store moved to ``tmp_path``; yields the port."""
    text = DEPLOY_CONF.read_text()
    assert text.count('store_dir: "/data"') == 1
    conf = tmp_path / "recsys.conf"
    conf.write_text(text.replace('store_dir: "/data"', f"store_dir: {str(tmp_path / 'store')!r}"))
    with nats_server(config=conf, env={**os.environ, **DEPLOY_ENV}) as port:
        yield port


class Violations:
    """The permission errors that the server reports to one client."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def record(self, exc: Exception) -> None:
        self.seen.append(str(exc))

    async def wait_for(self, fragment: str) -> None:
        for _ in range(250):
            if any(fragment.lower() in message.lower() for message in self.seen):
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"no error with {fragment!r} among {self.seen}")


async def _connect(port: int, user: str, errors: Violations | None = None) -> NATS:
    password = DEPLOY_ENV[f"{user.upper().replace('-', '_')}_PASSWORD"]
    options: dict[str, Any] = {"error_cb": errors.record} if errors else {}
    return await nats.connect(f"nats://{user}:{password}@127.0.0.1:{port}", **options)


async def test_the_deploy_layout_lets_each_role_do_its_part_and_no_more(deploy_server: int, tmp_path: Path) -> None:
    port = deploy_server
    await _refused(f"nats://127.0.0.1:{port}")
    password = DEPLOY_ENV["SHOP_AGENT_PASSWORD"]
    settings = offline_settings(
        tmp_path / "agent",
        nats_url=f"nats://shop-agent:{password}@127.0.0.1:{port}",
        http_port=0,
        disabled_plugins="content",
    )
    app_errors, ops_errors = Violations(), Violations()
    # the agent with the agent's rights: streams, rebuild, consumers, KV, replies, pushes
    async with Agent(settings) as agent:
        app = await _connect(port, "shop-app", app_errors)
        ops = await _connect(port, "shop-ops", ops_errors)
        other_app = await _connect(port, "news-app")
        pushes: list[dict[str, Any]] = []
        others_pushes: list[bytes] = []
        dead_letters: list[dict[str, Any]] = []

        async def on_push(msg: Any) -> None:
            pushes.append(orjson.loads(msg.data))

        async def on_others_push(msg: Any) -> None:
            others_pushes.append(msg.data)

        async def on_dead_letter(msg: Any) -> None:
            dead_letters.append(orjson.loads(msg.data))

        await app.subscribe("recsys.recs.*", cb=on_push)
        await other_app.subscribe("recsys.recs.*", cb=on_others_push)
        await ops.subscribe("recsys.dlq", cb=on_dead_letter)
        for client in (app, ops, other_app):
            await client.flush()

        # the app: catalog, events into the stream (acknowledged), a request, pushes
        js = app.jetstream()
        await js.publish(
            "recsys.catalog.upsert", orjson.dumps([{"id": "m1", "title": "M1"}, {"id": "m2", "title": "M2"}])
        )
        async with asyncio.timeout(10):
            while agent.pipeline.catalog.active_count() < 2:
                await asyncio.sleep(0.02)
        await js.publish(
            "recsys.events.view.amy", orjson.dumps({"id": "e1", "type": "view", "user_id": "amy", "item_id": "m1"})
        )
        async with asyncio.timeout(10):
            while not pushes:
                await asyncio.sleep(0.02)
        assert pushes[0]["user_id"] == "amy" and pushes[0]["event_id"] == "e1"
        reply = await app.request("recsys.recommend", orjson.dumps({"user_id": "amy"}), timeout=10)
        assert orjson.loads(reply.data)["user_id"] == "amy"

        # ... and not the operators' part, nor the JetStream API
        await app.subscribe("recsys.dlq")
        await app_errors.wait_for('Subscription to "recsys.dlq"')
        await app.publish("$JS.API.STREAM.PURGE.RECSYS_EVENTS", b"")
        await app_errors.wait_for('Publish to "$JS.API.STREAM.PURGE.RECSYS_EVENTS"')
        # ... nor make agents drop a user's state: only agents tell each other of a forget
        await app.publish("recsys.agents.forget", b'{"user_id": "amy"}')
        await app_errors.wait_for('Publish to "recsys.agents.forget"')

        # the operator: dead letters as they come and stored, the streams' state
        await js.publish("recsys.events.view.amy", b"not json")
        async with asyncio.timeout(10):
            while not dead_letters:
                await asyncio.sleep(0.02)
        ops_js = ops.jetstream()
        # the refused event lives on as its dead letter only (the agent erased it from the stream)
        async with asyncio.timeout(10):
            while (await ops_js.stream_info("RECSYS_EVENTS")).state.messages != 1:
                await asyncio.sleep(0.02)
        stored = await ops_js.get_msg("RECSYS_EVENTS_DLQ", 1)
        assert orjson.loads(stored.data or b"{}")["subject"] == "recsys.events.view.amy"
        # ... who reads, and writes nothing
        await ops.publish("recsys.events.view.amy", b"{}")
        await ops_errors.wait_for('Publish to "recsys.events.view.amy"')

        # another app's account never sees this one's pushes
        await asyncio.sleep(0.2)
        assert others_pushes == []
        for client in (app, ops, other_app):
            await client.close()

    # the agent saved what it learned (the fusion weights) in its key-value bucket at its stop
    from plugins.fusion import SNAPSHOT_KEY

    agent_nc = await _connect(port, "shop-agent")
    bucket = await agent_nc.jetstream().key_value(f"{settings.stream_name}_STATE")
    assert (await bucket.get(SNAPSHOT_KEY)).value
    await agent_nc.close()
