"""Benchmark: the sequence model's cost per list (batch 1 and 32), its training round, and what a
round in the background costs the hot path, in process (no NATS).

    python -m tests.bench.bench_sequence --items ../shared/data/online-retail/items.jsonl \
        --events ../shared/data/online-retail/events.jsonl --data-dir out/bench-sequence

A pipeline with every built-in plugin loads the catalog (item vectors cached in ``--data-dir``),
applies ``--warmup`` events (the sequence model trains two rounds on them in its worker, timed:
the first starts the worker), then
takes the next event of each of the next ``--measure`` distinct users seen in the warm-up (users
with a history, whom the source answers), in batches of N:

1. the sequence source alone (``recsys_candidates_batch``): wall ms per list, median of batches;
2. the whole ranking (``rank_batch``) with the source on and off, same state and queries: what
   the source adds to a list, fusion's share of the extra candidates included;
3. the whole ranking at batch 32 while a training round runs in the worker process (at the
   worker's ``--nice``), against the same ranking idle: what training takes from the hot path.

Compare runs made back to back on a quiet machine (the load average is printed).
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
from agent.evaluation.events import load_events
from agent.evaluation.replay import load_catalog
from agent.hooks.manager import get_plugin_manager
from agent.pipeline.pipeline import Pipeline
from agent.pipeline.values import Query
from plugins.sequence import SequenceSource
from tests.bench.bench_stages import one_per_user
from tests.bench.machine import describe


def per_list_ms(timings: list[tuple[float, int]]) -> tuple[float, float]:
    """(median over batches, mean) of wall ms per list, from (seconds, lists) per batch."""
    per = [1000 * seconds / lists for seconds, lists in timings]
    return statistics.median(per), 1000 * sum(s for s, _ in timings) / max(sum(n for _, n in timings), 1)


async def main(args: argparse.Namespace) -> None:
    items = read_items(Path(args.items))
    events = load_events(Path(args.events))
    warmup = events[: args.warmup]
    # users with a history: the lists the source answers (a new user costs it nothing)
    known = {event.user_id for event in warmup}
    measured = one_per_user([event for event in events[args.warmup :] if event.user_id in known], args.measure)
    settings = load_settings(
        None,
        overrides={
            "data_dir": args.data_dir,
            "log_level": "WARNING",
            "disabled_plugins": ["cross_encoder", "nats_publisher", "summariser"],
            "plugins": {"sequence": {"enabled": True, "every_events": 10**9, "nice": args.nice}},
        },
    )
    print(describe())
    pipeline = Pipeline(settings, get_plugin_manager(settings))
    now = 0.0
    pipeline.clock = lambda: now
    async with pipeline.running():
        await load_catalog(pipeline, items, progress=False)
        plugin = pipeline.pm.get_plugin("sequence")
        assert isinstance(plugin, SequenceSource) and plugin.enabled, "the sequence plugin did not start"
        for start in range(0, len(warmup), 256):
            batch = warmup[start : start + 256]
            now = batch[-1].ts
            await pipeline.apply_events([(event, start + i + 1) for i, event in enumerate(batch)])
        started = time.perf_counter()
        plugin.start_round()
        await pipeline.settle()
        round_s = time.perf_counter() - started
        assert plugin.latest is not None, "no round was trained"
        now += round_s + 1.0
        info = plugin.latest.info
        print(
            f"{len(items)} items; warm-up {len(warmup)} events; one training round (first: starts the worker) "
            f"{round_s:.1f} s wall, worker {info['training_s']} s wall / {info['training_cpu_s']} s CPU, "
            f"{info['steps']} steps on {info['examples']} windows of {info['window_events']} events, "
            f"{info['items']} items with an id row"
        )
        started = time.perf_counter()
        plugin.start_round()
        await pipeline.settle()
        print(f"second round (worker running): {time.perf_counter() - started:.1f} s wall")
        now += 1_000.0

        def queries(batch: list) -> list[Query]:
            return [pipeline.make_query(event.user_id, settings.default_k) for event in batch]

        for size in [int(s) for s in args.batch.split(",")]:
            batches = [measured[i : i + size] for i in range(0, len(measured), size)]
            alone: list[tuple[float, int]] = []
            on: list[tuple[float, int]] = []
            off: list[tuple[float, int]] = []
            for batch in batches:
                asked = queries(batch)
                started = time.perf_counter()
                plugin.recsys_candidates_batch(asked)
                alone.append((time.perf_counter() - started, len(asked)))
                for enabled, into in ((True, on), (False, off)):
                    plugin.enabled = enabled
                    asked = queries(batch)
                    started = time.perf_counter()
                    await pipeline.rank_batch(asked)
                    into.append((time.perf_counter() - started, len(asked)))
                plugin.enabled = True
            (a, a_mean), (n, n_mean), (f, f_mean) = per_list_ms(alone), per_list_ms(on), per_list_ms(off)
            print(
                f"batch {size}: sequence source {a:.3f} ms per list (mean {a_mean:.3f}); whole ranking "
                f"{n:.3f} ms with it, {f:.3f} without: +{n - f:.3f} ms per list (means {n_mean:.3f} / {f_mean:.3f})"
            )
        # a round in the background while the hot path ranks
        batches = [measured[i : i + 32] for i in range(0, len(measured), 32)]
        idle: list[tuple[float, int]] = []
        for batch in batches:
            asked = queries(batch)
            started = time.perf_counter()
            await pipeline.rank_batch(asked)
            idle.append((time.perf_counter() - started, len(asked)))
        plugin.start_round()
        busy: list[tuple[float, int]] = []
        rounds = 0
        while plugin._round is not None and not plugin._round.done():
            for batch in batches:
                asked = queries(batch)
                started = time.perf_counter()
                await pipeline.rank_batch(asked)
                busy.append((time.perf_counter() - started, len(asked)))
                await asyncio.sleep(0)
            rounds += 1
        (i_med, _), (b_med, _) = per_list_ms(idle), per_list_ms(busy)
        worst_idle = max(1000 * s / n for s, n in idle)
        worst_busy = max(1000 * s / n for s, n in busy) if busy else 0.0
        print(
            f"batch 32 while a round trains in the worker (nice {args.nice}): {b_med:.3f} ms per list "
            f"(worst batch {worst_busy:.3f}) vs idle {i_med:.3f} (worst {worst_idle:.3f}); "
            f"{len(busy)} batches during the round"
        )
    print(describe())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", required=True)
    parser.add_argument("--events", required=True)
    parser.add_argument("--warmup", type=int, default=30_000)
    parser.add_argument("--measure", type=int, default=1_024)
    parser.add_argument("--batch", default="1,32", help="batch sizes, comma-separated (default 1,32)")
    parser.add_argument("--nice", type=int, default=10, help="the training worker's niceness (default 10)")
    parser.add_argument("--data-dir", default="out/bench-sequence")
    with limit_blas_threads():
        asyncio.run(main(parser.parse_args()))
