"""Benchmark: where one event's CPU goes, per hook and plugin, in process (no NATS).

    python -m tests.bench.bench_stages --items out/mt/items.jsonl --events out/mt/events.jsonl

Loads the catalog into a pipeline with the built-in plugins (item vectors cached in
``--data-dir`` across runs), applies ``--warmup`` events to build state, then for each of the
next ``--measure`` events asks for that user's recommendations and applies the event, as a push
would. ``--lists FILE`` writes every list, so two versions meant to agree can be diffed. Prints the median rank and apply times and the mean time per (hook, plugin), so a change
to one stage can be compared with a run made just before it on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

from agent.cli.main import limit_blas_threads
from agent.config import load_settings
from agent.evaluation.datasets import read_items
from agent.evaluation.replay import load_catalog, load_events
from agent.hooks.manager import get_plugin_manager
from agent.pipeline.pipeline import Pipeline


async def main(args: argparse.Namespace) -> None:
    items = read_items(Path(args.items))
    events = load_events(Path(args.events))[: args.warmup + args.measure]
    settings = load_settings(args.config, overrides={"data_dir": args.data_dir, "log_level": "WARNING"})
    pipeline = Pipeline(settings, get_plugin_manager(settings))
    now = 0.0
    pipeline.clock = lambda: now
    async with pipeline.running():
        await load_catalog(pipeline, items, progress=False)
        # stream sequences start at 1; they tell the deduplicator apart events without ids
        for seq, event in enumerate(events[: args.warmup], start=1):
            now = event.ts
            await pipeline.apply_event(event, seq)
        table = pipeline.hooks.time_stages()
        rank_ms, apply_ms = [], []
        lists: list[str] = []
        for seq, event in enumerate(events[args.warmup :], start=args.warmup + 1):
            now = event.ts
            started = time.perf_counter()
            recs = await pipeline.recommend(event.user_id, settings.default_k)
            middle = time.perf_counter()
            await pipeline.apply_event(event, seq)
            rank_ms.append(1000 * (middle - started))
            apply_ms.append(1000 * (time.perf_counter() - middle))
            if args.lists:
                lists.append(" ".join(f"{item.item_id}:{item.score:.6g}" for item in recs.items))
            # let background work (embedding, summaries) run as it would live
            await asyncio.sleep(0)
    if args.lists:
        Path(args.lists).write_text("\n".join(lists) + "\n", encoding="utf-8")
    count = len(rank_ms)
    print(
        f"{count} events after {args.warmup} of warm-up: recommend p50 {statistics.median(rank_ms):.3f} ms, "
        f"mean {statistics.fmean(rank_ms):.3f} ms; apply p50 {statistics.median(apply_ms):.3f} ms, mean {statistics.fmean(apply_ms):.3f} ms"
    )
    print("mean microseconds per event, by hook and plugin:")
    for (hook, plugin), (calls, seconds) in sorted(table.items(), key=lambda kv: -kv[1][1]):
        print(f"  {1e6 * seconds / count:9.1f}  {hook:24s} {plugin}  ({calls} calls)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", required=True)
    parser.add_argument("--events", required=True)
    parser.add_argument("--warmup", type=int, default=20_000)
    parser.add_argument("--measure", type=int, default=3_000)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--data-dir", default="out/bench-stages")
    parser.add_argument(
        "--lists", default=None, help="write every list (ids and scores) here, to diff two versions that should agree"
    )
    # as in the agent's process
    with limit_blas_threads():
        asyncio.run(main(parser.parse_args()))
