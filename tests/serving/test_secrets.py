"""Credentials never leave the process: not in health, logs, the banner or error messages."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from agent.app import Agent
from agent.bus.embedded_server import Credentials, RunningServer
from agent.cli import main as cli
from agent.config import ConfigError, Settings, load_settings, redact_url
from tests.builders import make_settings
from tests.processes import nats_server

PASSWORD = "pw-Zq8-never-shown"
TOKEN = "tok-Xr4-never-shown"
API_KEY = "key-Lm2-never-shown"
HTTP_KEY = "http-key-Vb7-never-shown"


@pytest.fixture(scope="module")
def password_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    # a real nats-server that asks for credentials
    store = tmp_path_factory.mktemp("nats-pw")
    with nats_server("--jetstream", "--store_dir", str(store), "--user", "alice", "--pass", PASSWORD) as port:
        yield port


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    store = tmp_path_factory.mktemp("nats-token")
    with nats_server("--jetstream", "--store_dir", str(store), "--auth", TOKEN) as port:
        yield port


def test_redact_url_hides_passwords_and_tokens() -> None:
    assert redact_url(f"nats://alice:{PASSWORD}@h:4222") == "nats://alice:***@h:4222"
    assert redact_url(f"nats://{TOKEN}@h") == "nats://***@h"
    assert redact_url(f"nats://a:{PASSWORD}@h1, tls://{TOKEN}@h2") == "nats://a:***@h1, tls://***@h2"
    assert redact_url("nats://h:4222") == "nats://h:4222"
    assert redact_url(f"could not reach https://u:{PASSWORD}@q:6333/x?y") == "could not reach https://u:***@q:6333/x?y"


def test_settings_repr_hides_credentials(tmp_path: Path) -> None:
    settings = Settings(
        nats_url=f"nats://alice:{PASSWORD}@h",
        qdrant_url=f"https://u:{PASSWORD}@q",
        qdrant_api_key=API_KEY,
        api_keys=[HTTP_KEY, HTTP_KEY + "2"],
        plugins={"summariser": {"api_token": TOKEN}},
    )
    shown = repr(settings) + str(settings) + settings.shown("api_keys")
    assert PASSWORD not in shown and API_KEY not in shown and TOKEN not in shown and HTTP_KEY not in shown
    assert "nats://alice:***@h" in shown and "api_keys='***'" in shown


def test_the_embedded_servers_password_is_not_in_its_repr(tmp_path: Path) -> None:
    credentials = Credentials("recsys-agent", PASSWORD)
    url = credentials.url("nats://127.0.0.1:4222")
    assert url == f"nats://recsys-agent:{PASSWORD}@127.0.0.1:4222"
    server = RunningServer(url, "nats://127.0.0.1:4222", 4222, 1, tmp_path / "credentials.json")
    assert PASSWORD not in repr(credentials) + repr(server)


@pytest.mark.parametrize("keys", [f"{HTTP_KEY},short-Lm2", f"{HTTP_KEY},a key-Lm2 with spaces never shown"])
def test_a_refused_api_key_is_not_quoted(keys: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env={"RECSYS_API_KEYS": keys})
    message = str(caught.value)
    assert "api_keys" in message and "key 2 of 2" in message
    for key in keys.split(","):
        assert key not in message


@pytest.mark.parametrize(
    ("env", "overrides"),
    [
        ({}, {"nats_url": f"http://alice:{PASSWORD}@h"}),
        ({}, {"nats_url": f"nats://{PASSWORD}@h, ftp://{PASSWORD}@g"}),
        ({"RECSYS_QDRANT_URL": f"ftp://u:{PASSWORD}@q"}, {}),
    ],
)
def test_configuration_errors_hide_credentials(env: dict[str, str], overrides: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env=env, overrides=overrides)
    assert PASSWORD not in str(caught.value) and "***" in str(caught.value)


def test_a_key_of_the_wrong_type_is_not_quoted(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("qdrant_api_key = 918273645\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(config, env={})
    assert "918273645" not in str(caught.value) and "qdrant_api_key" in str(caught.value)


def test_the_command_line_prints_configuration_errors_without_credentials(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--nats-url", f"http://alice:{PASSWORD}@h"]) == 2
    captured = capsys.readouterr()
    assert "configuration error" in captured.err and "alice:***@h" in captured.err
    assert PASSWORD not in captured.out + captured.err


async def test_health_and_logs_hide_the_nats_password(
    password_server: int, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = f"nats://alice:{PASSWORD}@127.0.0.1:{password_server}"
    settings = make_settings(url, tmp_path, disabled_plugins="content", qdrant_api_key=API_KEY, api_keys=[HTTP_KEY])
    async with Agent(settings) as agent, aiohttp.ClientSession(agent.http_url) as http:
        response = await http.get("/healthz")
        text = await response.text()
        assert response.status == 200
        assert (await response.json())["nats_url"] == f"nats://alice:***@127.0.0.1:{password_server}"
        text += await (await http.get("/metrics")).text()
        # a key one typo away, refused, and the right one: neither is logged nor echoed
        for key, status in ((HTTP_KEY[:-1], 401), (HTTP_KEY, 200)):
            answer = await http.get("/v1/users/amy/recommendations", headers={"Authorization": f"Bearer {key}"})
            assert answer.status == status
            text += await answer.text() + str(answer.headers)
        logging.getLogger("test").info("settings in use: %r", settings)
    for secret in (PASSWORD, API_KEY, HTTP_KEY[:-1]):
        assert secret not in text
        assert secret not in caplog.text
    assert "agent ready: NATS nats://alice:***@" in caplog.text


async def test_banner_and_logs_of_a_run_hide_the_nats_token(token_server: int, tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent",
        "run",
        "--nats-url",
        f"nats://{TOKEN}@127.0.0.1:{token_server}",
        "--http-port",
        "0",
        "--log-level",
        "DEBUG",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={
            **os.environ,
            "RECSYS_DATA_DIR": str(tmp_path),
            "RECSYS_DISABLED_PLUGINS": "content",
            "RECSYS_LOAD_ENTRY_POINTS": "false",
            "RECSYS_QDRANT_API_KEY": API_KEY,
            "RECSYS_API_KEYS": HTTP_KEY,
        },
    )
    assert process.stdout is not None
    seen: list[str] = []
    async with asyncio.timeout(60):
        while not any("recsys-agent listening:" in line for line in seen):
            line = (await process.stdout.readline()).decode()
            assert line, "agent exited:\n" + "".join(seen)
            seen.append(line)
        process.send_signal(signal.SIGTERM)
        seen.append((await process.stdout.read()).decode())
        await process.wait()
    output = "".join(seen)
    assert process.returncode == 0, output
    assert f"listening: NATS nats://***@127.0.0.1:{token_server}" in output
    assert TOKEN not in output and API_KEY not in output and HTTP_KEY not in output
