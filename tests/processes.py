"""The real processes the tests start: a nats-server, and the agent as ``recsys-agent run``."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agent.bus.embedded_server import find_binary
from agent.config import Settings

NATS_LISTENING = re.compile(r"Listening for client connections on [^:]+:(\d+)")
AGENT_LISTENING = re.compile(r"listening: NATS (\S+)\s+HTTP (\S+)")


# --- nats-server ---------------------------------------------------------------------------


@contextmanager
def nats_server(*args: str, config: Path | None = None, env: dict[str, str] | None = None) -> Iterator[int]:
    """A real nats-server on 127.0.0.1 and a free port, with ``config`` (``-c``) and the further
    command-line ``args``; yields its port once it is ready, and stops it after."""
    command = [find_binary()]
    if config is not None:
        command += ["-c", str(config)]
    command += ["--addr", "127.0.0.1", "--port", "-1", *args]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stderr is not None
        port, lines = None, []
        for line in process.stderr:
            lines.append(line)
            match = NATS_LISTENING.search(line)
            if match:
                port = int(match.group(1))
            if "Server is ready" in line:
                break
        assert port is not None, "nats-server did not start:\n" + "".join(lines)
        # keep draining the server's log so its pipe never fills
        threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()  # type: ignore[union-attr]
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


# --- recsys-agent run ----------------------------------------------------------------------


async def start_agent(
    *args: str,
    env: dict[str, str] | None = None,
    output: list[str] | None = None,
    log_path: Path | None = None,
    ready_timeout_s: float = 60.0,
) -> tuple[asyncio.subprocess.Process, str, str]:
    """Run ``recsys-agent run ARGS`` until its banner; the process, its NATS and HTTP URLs.

    The NATS URL is the banner's, without credentials: on the embedded server (no
    ``--nats-url``) a client connects with ``client_url(data_dir)`` from
    ``agent.bus.embedded_server``. ``output``: a list that receives every line the agent
    writes, before the banner and after; ``log_path``: a file that receives what it writes
    after the banner (a long run's output, kept out of memory). Either way the pipe is read,
    so the agent never stalls on a full one.
    """
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent",
        "run",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    assert process.stdout is not None
    seen = [] if output is None else output
    async with asyncio.timeout(ready_timeout_s):
        while True:
            line = (await process.stdout.readline()).decode()
            if not line:
                raise AssertionError("agent exited:\n" + "".join(seen))
            seen.append(line)
            match = AGENT_LISTENING.search(line)
            if match:
                break

    async def drain() -> None:
        log = log_path.open("a", encoding="utf-8") if log_path is not None else None
        async for line in process.stdout:  # type: ignore[union-attr]
            if output is not None:
                output.append(line.decode())
            if log is not None:
                log.write(line.decode(errors="replace"))
        if log is not None:
            log.close()

    asyncio.get_running_loop().create_task(drain())
    return process, match.group(1), match.group(2)


async def run_to_exit(*args: str, env: dict[str, str] | None = None, timeout_s: float = 60.0) -> tuple[int, str, str]:
    """Run ``recsys-agent run ARGS`` that is expected to stop by itself (a refused start): its
    exit status, standard output and standard error."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent",
        "run",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    async with asyncio.timeout(timeout_s):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(errors="replace"), err.decode(errors="replace")


async def stop(process: asyncio.subprocess.Process, sig: int = signal.SIGTERM) -> float:
    """Send ``sig`` and wait (15 s at most) for the agent to exit; the seconds it took."""
    started = time.perf_counter()
    process.send_signal(sig)
    async with asyncio.timeout(15):
        await process.wait()
    return time.perf_counter() - started


def env_for(settings: Settings) -> dict[str, str]:
    """The environment that gives ``recsys-agent run`` these settings' bus, ports and data dir."""
    return {
        "RECSYS_NATS_URL": settings.nats_url,
        "RECSYS_SUBJECT_PREFIX": settings.subject_prefix,
        "RECSYS_STREAM_NAME": settings.stream_name,
        "RECSYS_CATALOG_STREAM_NAME": settings.catalog_stream_name,
        "RECSYS_CONSUMER_NAME": settings.consumer_name,
        "RECSYS_HTTP_PORT": "0",
        "RECSYS_DATA_DIR": str(settings.data_dir),
        "RECSYS_LOAD_ENTRY_POINTS": "false",
    }
