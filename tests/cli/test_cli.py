"""The ``recsys-agent run`` process: embedded defaults, signals, restart under load."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import nats
import orjson
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from agent.bus.embedded_server import client_url
from agent.cli import main as cli
from agent.config import Settings
from agent.evaluation import replay
from agent.evaluation.report import ReplayResult
from tests.builders import Client
from tests.processes import env_for, run_to_exit, start_agent, stop


async def test_run_with_embedded_defaults_serves_and_stops_its_nats_server(tmp_path: Path) -> None:
    process, nats_url, http_url = await start_agent("--data-dir", str(tmp_path), "--nats-port", "0", "--http-port", "0")
    try:
        async with aiohttp.ClientSession() as http:
            health = await (await http.get(f"{http_url}/healthz")).json()
            assert health["status"] == "ok" and health["nats_url"] == nats_url
        # the embedded server asks for the credentials the agent made in its data dir
        nc = await nats.connect(client_url(tmp_path))
        got = asyncio.Event()

        async def on_push(msg: object) -> None:
            got.set()

        await nc.subscribe("recsys.recs.amy", cb=on_push)
        await nc.jetstream().publish(
            "recsys.catalog.upsert", orjson.dumps([{"id": "m1", "title": "M1"}, {"id": "m2", "title": "M2"}])
        )
        await nc.jetstream().publish(
            "recsys.events.view.amy", orjson.dumps({"id": "a1", "type": "view", "user_id": "amy", "item_id": "m1"})
        )
        async with asyncio.timeout(10):
            await got.wait()
        await nc.close()
    finally:
        elapsed = await stop(process, signal.SIGINT)
    assert process.returncode == 0 and elapsed < 5
    assert (tmp_path / "nats" / "jetstream").is_dir()
    host, port = nats_url.removeprefix("nats://").rsplit(":", 1)
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(host, int(port))


async def test_sigterm_under_load_exits_fast_and_loses_nothing(settings: Settings, client: Client) -> None:
    env = env_for(settings)
    process, _, _ = await start_agent(env=env)
    await client.upsert([{"id": f"item-{i}", "title": f"Item {i}"} for i in range(100)])
    total = 3000
    ids = [f"load-{i}" for i in range(total)]
    for i, event_id in enumerate(ids[: total // 2]):
        await client.publish_event(
            {"id": event_id, "type": "view", "user_id": f"u{i % 40}", "item_id": f"item-{i % 100}"}
        )
    # the signal lands while events are still flowing in
    publisher = asyncio.create_task(_publish_rest(client, ids, total // 2))
    await asyncio.sleep(0.05)
    elapsed = await stop(process)
    await publisher
    assert process.returncode == 0 and elapsed < 5, f"took {elapsed:.2f} s"

    process, _, http_url = await start_agent(env=env)
    try:
        await client.wait_for(lambda: set(client.reflected_event_ids()) >= set(ids), timeout=60)
        info = await client.js.consumer_info(settings.stream_name, settings.consumer_name)
        assert info.num_pending == 0 and info.num_ack_pending == 0
        async with aiohttp.ClientSession() as http:
            health = await (await http.get(f"{http_url}/healthz")).json()
        assert health["users"] == 40
    finally:
        await stop(process)


async def _publish_rest(client: Client, ids: list[str], start: int) -> None:
    for i in range(start, len(ids)):
        await client.publish_event(
            {"id": ids[i], "type": "view", "user_id": f"u{i % 40}", "item_id": f"item-{i % 100}"}
        )


async def test_a_killed_agent_takes_its_nats_server_with_it(tmp_path: Path) -> None:
    process, nats_url, _ = await start_agent("--data-dir", str(tmp_path), "--nats-port", "0", "--http-port", "0")
    process.kill()  # SIGKILL: no drain, no cleanup of its own
    await process.wait()
    host, port = nats_url.removeprefix("nats://").rsplit(":", 1)
    async with asyncio.timeout(10):
        while True:
            try:
                _, writer = await asyncio.open_connection(host, int(port))
            except ConnectionRefusedError:
                break  # the server is gone: its port is free for the next start
            except ConnectionResetError:
                pass  # accepted while it was dying: look again
            else:
                writer.close()
            await asyncio.sleep(0.1)


async def test_a_second_agent_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    process, _, _ = await start_agent("--data-dir", str(tmp_path), "--nats-port", "0", "--http-port", "0")
    try:
        returncode, _, err = await run_to_exit("--data-dir", str(tmp_path), "--nats-port", "0", "--http-port", "0")
        assert returncode == 1 and "in use by another agent's nats-server" in err
    finally:
        await stop(process)
    assert process.returncode == 0


def test_bad_configuration_is_a_clear_error(tmp_path: Path) -> None:
    import subprocess

    result = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--http-port", "seventy"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "RECSYS_DATA_DIR": str(tmp_path)},
    )
    assert result.returncode == 2
    assert "config key 'http_port' (from command line) must be an integer" in result.stderr


def test_a_command_that_cannot_work_says_why_in_one_line(tmp_path: Path) -> None:
    import subprocess

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--data-dir", str(not_a_dir), "--nats-port", "0", "--http-port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "recsys-agent run: NotADirectoryError" in result.stderr


async def test_a_signal_while_the_bus_is_unreachable_stops_the_start(tmp_path: Path) -> None:
    # nothing listens on port 1: the agent retries the first connection until told to stop
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent",
        "run",
        "--nats-url",
        "nats://127.0.0.1:1",
        "--http-port",
        "0",
        "--data-dir",
        str(tmp_path),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await asyncio.sleep(3.0)
        assert process.returncode is None, "still trying to connect"
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            await process.wait()
    finally:
        if process.returncode is None:  # a failed test leaves no agent behind
            process.kill()
            await process.wait()
    assert process.returncode == 0


def blas_threads() -> set[int]:
    return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}


def test_commands_run_with_one_blas_thread_and_restore_the_limit_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [n for n in os.environ if n.startswith("RECSYS_")]:
        monkeypatch.delenv(name)
    seen: dict[str, set[int]] = {}

    async def serving(settings: Settings) -> None:
        seen["run"] = blas_threads()

    real_replay = replay.replay

    async def replaying(*args: Any, **kwargs: Any) -> ReplayResult:
        seen["replay"] = blas_threads()
        return await real_replay(*args, **kwargs)

    monkeypatch.setattr(cli, "serve", serving)
    monkeypatch.setattr(replay, "replay", replaying)
    # without the content plugin: the limit must not depend on the plugin that used to set it
    config = tmp_path / "replay.toml"
    config.write_text('disabled_plugins = ["content"]\nload_entry_points = false\n')
    items, events = tmp_path / "items.jsonl", tmp_path / "events.jsonl"
    items.write_bytes(b'{"id": "A", "title": "A"}\n{"id": "B", "title": "B"}\n')
    events.write_bytes(
        b'{"type": "view", "user_id": "1", "item_id": "A", "ts": 1}\n'
        b'{"type": "view", "user_id": "1", "item_id": "B", "ts": 2}\n'
    )
    # two threads beforehand, so that one inside is the command's doing on any machine
    with threadpool_limits(2, user_api="blas"):
        assert cli.main(["run", "--config", str(config), "--data-dir", str(tmp_path / "agent")]) == 0
        assert (
            cli.main(
                [
                    "replay",
                    "--items",
                    str(items),
                    "--events",
                    str(events),
                    "--config",
                    str(config),
                    "--inline-baselines",
                    # not ALS: implicit loads scipy's own BLAS during the command, left at its
                    # default thread count, which depends on the machine
                    "--baselines",
                    "popularity,decayed_popularity,item_knn",
                    "--no-progress",
                ]
            )
            == 0
        )
        assert blas_threads() == {2}
    assert seen == {"run": {1}, "replay": {1}}
