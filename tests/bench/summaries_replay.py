"""Prequential replay (``agent/evaluation/replay.py``) with interest summaries off, heuristic, or from the LLM.

    python -m tests.bench.summaries_replay --modes off,heuristic --sample-users 0.1 --limit 10000
    python -m tests.bench.summaries_replay --modes off,heuristic,llm --sample-users 0.02 --limit 600

The replay is the lead's harness, unchanged; the only addition is a plugin that, after each
event, waits until the summariser has written every profile that event made due. A live agent
never waits (profiles arrive seconds later); the replay waits so that "summaries on" measures
what the summaries are worth, not how far a CPU-bound small model lags behind a replay running
at thousands of events per second. The LLM is SmolLM2-135M on CPU: expect its profiles to be
weak, and read the figures as a check of the plumbing and of the size of the effect.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.config import load_settings
from agent.evaluation.datasets import read_movietweetings, stream_order_key
from agent.evaluation.events import select_events
from agent.evaluation.replay import ReplayOptions, replay
from agent.hooks.manager import get_plugin_manager
from agent.hooks.specs import hookimpl
from agent.pipeline.pipeline import Pipeline
from agent.pipeline.user_state import UserState
from tests.bench.llm_summaries import DATA
from tests.llm.llm_server import MODEL_ALIAS, llama_server


class WaitForSummaries:
    """Registered last in the apply chain: returns an awaitable while summaries are due."""

    def __init__(self) -> None:
        self.pipeline: Pipeline | None = None
        self.waited_s = 0.0

    @hookimpl(trylast=True)
    def recsys_apply_event(self, user: UserState) -> Any:
        assert self.pipeline is not None
        summariser = self.pipeline.pm.get_plugin("summariser")
        scheduler = getattr(summariser, "scheduler", None)
        if scheduler is None or scheduler.idle:
            return None
        return self._wait(scheduler)

    async def _wait(self, scheduler: Any) -> None:
        started = time.perf_counter()
        await scheduler.wait_idle(0.002)
        self.waited_s += time.perf_counter() - started


async def run_mode(
    mode: str, items: list[Any], events: list[Any], data_dir: Path, base_url: str | None, refresh: int
) -> dict[str, Any]:
    disabled = ["summariser"] if mode == "off" else []
    settings = load_settings(
        env={},
        overrides={
            "load_entry_points": False,
            "data_dir": str(data_dir),
            "disabled_plugins": ",".join(disabled),
            # the waiting plugin may hold an event for as long as the LLM takes
            "stage_timeout_ms": 600_000.0,
            "log_level": "WARNING",
        },
    )
    # Count-based refreshes only: the time window runs on the wall clock, and a replay that waits
    # for summaries would otherwise see every user's window expire while it waits.
    options: dict[str, Any] = {
        "refresh_after_events": refresh,
        "refresh_after_s": 1e9,
        "history_items": 10,
        "max_concurrency": 1,
    }
    if mode == "llm":
        options.update(base_url=base_url, model=MODEL_ALIAS, dialect="json_object_schema", timeout_s=120.0)
    settings.plugins = {"summariser": options}
    waiter = WaitForSummaries()
    pipeline = Pipeline(settings, get_plugin_manager(settings, [("wait_for_summaries", waiter)]))
    waiter.pipeline = pipeline
    async with pipeline.running():
        # one event at a time: each event is ranked after the summaries the previous one made due
        one_at_a_time = ReplayOptions(baselines=("popularity",), progress=False, batch=1)
        result = await replay(pipeline, items, events, one_at_a_time)
        summariser = pipeline.pm.get_plugin("summariser")
        stats = summariser.scheduler.stats() if summariser is not None and summariser.scheduler else {}
    report = result.report()
    report["summaries"] = {k: v for k, v in stats.items() if k.startswith(("summaries_", "llm_"))}
    report["waited_for_summaries_s"] = round(waiter.waited_s, 1)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="off,heuristic")
    parser.add_argument("--sample-users", type=float, default=0.1)
    parser.add_argument("--limit", type=int, default=10_000)
    parser.add_argument("--refresh-after-events", type=int, default=5)
    parser.add_argument(
        "--data-dir", type=Path, help="keep item embeddings here between runs (default: a temporary folder)"
    )
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    dataset = read_movietweetings(DATA)
    events = select_events(
        sorted(dataset.events, key=stream_order_key), sample_users=args.sample_users, limit=args.limit
    )
    print(
        f"{len(events)} events of {len({e.user_id for e in events})} users, {len(dataset.items)} items; "
        f"refresh_after_events {args.refresh_after_events}"
    )
    with tempfile.TemporaryDirectory() as scratch, contextlib.ExitStack() as stack:
        server = stack.enter_context(llama_server(Path(scratch))) if "llm" in modes else None
        data_dir = args.data_dir or Path(scratch) / "data"
        # One event loop for every mode: the shared embedder is bound to the loop it started on.
        asyncio.run(
            run_modes(
                modes, dataset.items, events, data_dir, server.base_url if server else None, args.refresh_after_events
            )
        )


async def run_modes(
    modes: list[str], items: list[Any], events: list[Any], data_dir: Path, base_url: str | None, refresh: int
) -> None:
    for mode in modes:
        started = time.perf_counter()
        # one data dir for every mode: item embeddings are computed once and reused
        report = await run_mode(mode, items, events, data_dir, base_url, refresh)
        metrics = report["metrics"]
        profile_hits = report["sources"].get("profile", {}).get("hits", 0)
        print(
            f"{mode:9}: evaluated {report['evaluated']}, hit_rate@10 {metrics['hit_rate@10']:.4f}, "
            f"ndcg@10 {metrics['ndcg@10']:.4f}; popularity {report['baselines']['popularity']['hit_rate@10']:.4f}; "
            f"hits with the profile source {profile_hits}; summaries {report['summaries']}; "
            f"waited {report['waited_for_summaries_s']} s; {time.perf_counter() - started:.0f} s; "
            "load average %.1f" % os.getloadavg()[0],
            flush=True,
        )


if __name__ == "__main__":
    main()
