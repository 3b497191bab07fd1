"""The test harness's report of a model server that died (a build for another CPU dies on its
first completion with SIGSEGV or SIGILL; the tests must say so, not "Server disconnected")."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from tests.llm.llm_server import LlamaServer


def _ended(code: str) -> subprocess.Popen[bytes]:
    process = subprocess.Popen([sys.executable, "-c", code])
    process.wait(timeout=30)
    return process


def test_a_server_killed_by_a_signal_is_reported_with_the_signal_and_its_log(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text("load_tensors: CPU_REPACK model buffer size\nggml_compute_forward: general protection\n")
    server = LlamaServer(
        _ended(f"import os; os.kill(os.getpid(), {int(signal.SIGSEGV)})"), "http://127.0.0.1:1/v1", log
    )
    report = server.death_report()
    assert report is not None
    assert "killed by SIGSEGV" in report and "general protection" in report


def test_an_exit_status_is_reported_and_a_running_or_deliberately_killed_server_is_not(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text("")
    assert "exited with status 3" in (LlamaServer(_ended("raise SystemExit(3)"), "", log).death_report() or "")
    running = LlamaServer(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]), "", log)
    assert running.death_report() is None
    running.kill()
    assert running.death_report() is None, "a test that kills the server on purpose is not a crash"
