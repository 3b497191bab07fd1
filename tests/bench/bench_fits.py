"""Benchmark: what a window-fitted source's refit costs, and whether it leaves the event loop free.

    python -m tests.bench.bench_fits --events out/mt/events.jsonl --window 100000

A fit runs in a worker thread while the event loop serves; the loop keeps serving only if the
fit's native code releases the GIL. For each source (``ease``; ``factors`` where implicit is
installed) this fits the latest ``--window`` positive events of the file in a worker thread,
as the agent does, while a coroutine on the loop sleeps 1 ms at a time, and prints the fit's
wall time and thread CPU, and the loop's longest gap between two of its wake-ups (a few ms
when the fit lets it run; the fit's length when it holds the GIL).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from agent.cli.main import limit_blas_threads
from agent.evaluation.events import load_events
from agent.pipeline.taste_signals import event_signal
from agent.pipeline.window_models import FitJob
from agent.threads import in_daemon_thread
from tests.bench.machine import describe

TICK_S = 0.001


def window_of(path: Path, size: int, rating_max: float) -> FitJob:
    """The latest ``size`` positive events of the file as one fit's input."""
    users: dict[str, int] = {}
    items: dict[str, int] = {}
    rows: list[tuple[int, int, float]] = []
    for event in load_events(path):
        signal = event_signal(event.type, event.value, rating_max)
        if signal > 0 and event.item_id is not None:
            rows.append(
                (users.setdefault(event.user_id, len(users)), items.setdefault(event.item_id, len(items)), signal)
            )
    rows = rows[-size:]
    user, slot, signal = (np.array(column) for column in zip(*rows, strict=True))
    return FitJob(1, user, slot, signal.astype(np.float32), len(items), len(rows))


async def measure(fit: Callable[[], Any]) -> tuple[float, float, list[float]]:
    """(wall s, thread CPU s, the loop's gaps in ms) of one fit in a worker thread."""
    cpu: list[float] = []

    def timed() -> Any:
        started = time.thread_time()
        try:
            return fit()
        finally:
            cpu.append(time.thread_time() - started)

    started = time.perf_counter()
    task = asyncio.ensure_future(in_daemon_thread(timed))
    gaps: list[float] = []
    last = time.perf_counter()
    while not task.done():
        await asyncio.sleep(TICK_S)
        now = time.perf_counter()
        gaps.append(1000 * (now - last))
        last = now
    await task
    return time.perf_counter() - started, cpu[0], gaps


def fitters(job: FitJob) -> dict[str, Callable[[], Any]]:
    from plugins.ease.model import fit as fit_ease
    from plugins.ease.options import EaseOptions

    found: dict[str, Callable[[], Any]] = {"ease": lambda: fit_ease(job, EaseOptions())}
    try:
        from plugins.factors.model import fit as fit_factors
        from plugins.factors.options import FactorsOptions

        found["factors"] = lambda: fit_factors(job, FactorsOptions(enabled=True))
    except ImportError as exc:
        print(f"factors: not measured ({exc})")
    return found


async def main(args: argparse.Namespace) -> None:
    job = window_of(Path(args.events), args.window, args.rating_max)
    print(describe())
    print(f"window: {len(job.users)} positive events, {len(set(job.users.tolist()))} users, {job.n_items} items")
    for name, fit in fitters(job).items():
        for run in range(1, args.repeat + 1):
            wall, cpu, gaps = await measure(fit)
            print(
                f"{name} fit {run}: wall {wall:.2f} s, thread CPU {cpu:.2f} s; event loop gaps: "
                f"median {statistics.median(gaps):.1f} ms, max {max(gaps):.1f} ms "
                f"({sum(gap > 20 for gap in gaps)} over 20 ms)"
            )
    print(describe())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", required=True)
    parser.add_argument("--window", type=int, default=200_000, help="latest positive events fitted")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--rating-max", type=float, default=10.0)
    # as in the agent's process
    with limit_blas_threads():
        asyncio.run(main(parser.parse_args()))
