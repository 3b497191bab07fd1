"""Benchmark: catalog embedding through the agent against the raw model's batch encode rate.

    python tests/bench/bench_embedding.py --items out/items.jsonl --count 2000

(a) ``SentenceTransformer.encode`` on the item texts in one call, the raw rate; (b) the same
items through the content plugin (item text, content hash, batched encode, Qdrant upsert, the
in-memory copy), in a fresh data dir, model already loaded. Runs alternate, medians reported.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import orjson

from agent.config import load_settings
from agent.hooks.manager import get_plugin_manager
from agent.pipeline.pipeline import Pipeline
from agent.vectors.embeddings import item_text, shared_embedder
from agent.wire.contract import parse_item


async def through_agent(items: list, data_dir: Path) -> float:  # type: ignore[type-arg]
    settings = load_settings(env={}, overrides={"data_dir": str(data_dir), "load_entry_points": False})
    pipeline = Pipeline(settings, get_plugin_manager(settings))
    async with pipeline.running():
        await pipeline.settle()  # model loaded, store open
        started = time.perf_counter()
        await pipeline.upsert_items(items)
        await pipeline.settle()
        return time.perf_counter() - started


def main(args: argparse.Namespace) -> None:
    items = [parse_item(orjson.loads(line)) for line in open(args.items, encoding="utf-8")][: args.count]
    texts = [item_text(item) for item in items]
    embedder = shared_embedder()
    embedder.encode(texts[:64])  # warm up
    raw, agent = [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        embedder.encode(texts)
        raw.append(len(items) / (time.perf_counter() - started))
        agent.append(len(items) / asyncio.run(through_agent(items, Path(tempfile.mkdtemp()))))
    r, a = statistics.median(raw), statistics.median(agent)
    print(
        f"{len(items)} items, {args.repeats} alternating runs: raw encode {r:.1f} items/s, "
        f"through the agent {a:.1f} items/s, ratio {a / r:.3f}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", required=True)
    parser.add_argument("--count", type=int, default=2_000)
    parser.add_argument("--repeats", type=int, default=3)
    main(parser.parse_args())
