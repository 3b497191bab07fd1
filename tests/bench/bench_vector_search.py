"""Benchmark: nearest-item search over the catalog's vectors, three ways, with recall.

    python tests/bench/bench_vector_search.py --qdrant-path DATA_DIR/qdrant

Reads every vector from a Qdrant store made by the agent (``catalog import`` or a replay), then
times one query at a time with (a) qdrant-client's local mode, (b) an exact numpy scan of the
full vectors, (c) the agent's in-memory search (projected scan + exact rescoring), single BLAS
thread as in the agent, and reports the recall of (c) against (a).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from agent.vectors.item_vectors import ItemVectors
from agent.vectors.qdrant_store import VectorStore


def timed(function, repeats: int) -> float:  # type: ignore[no-untyped-def]
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        samples.append(time.perf_counter() - started)
    return 1000 * statistics.median(samples)


def main(args: argparse.Namespace) -> None:
    # local mode locks its directory: work on a copy so a running agent is not disturbed
    copy = Path(tempfile.mkdtemp()) / "qdrant"
    shutil.copytree(args.qdrant_path, copy)
    store = VectorStore(args.collection, args.dim, path=copy)
    ids, matrix = [], []
    for item_id, _, vector in store.scan():
        ids.append(item_id)
        matrix.append(vector)
    vectors_np = np.stack(matrix)
    n = len(ids)
    print(f"{n} vectors of {vectors_np.shape[1]} dimensions")
    rng = np.random.default_rng(0)
    # queries like the agent's: a user's taste is a mix of a few items
    queries = []
    for _ in range(args.queries):
        mix = vectors_np[rng.choice(n, 5, replace=False)].sum(axis=0)
        queries.append((mix / np.linalg.norm(mix)).astype(np.float32))
    k = 50
    index = ItemVectors(vectors_np.shape[1])
    index.set(list(range(n)), vectors_np, ["-"] * n)
    allowed = np.ones(n, dtype=bool)
    with threadpool_limits(1, user_api="blas"):
        index.refit()
        qdrant_ms = timed(lambda: store.search(queries[0], k), 20)
        exact_ms = timed(lambda: vectors_np @ queries[0], 200)
        ours_ms = timed(lambda: index.search(queries[0], k, allowed), 200)
    recalls = []
    position = {item_id: i for i, item_id in enumerate(ids)}
    for query in queries[:20]:
        truth = {position[item_id] for item_id, _ in store.search(query, k)}
        found = set(index.search(query, k, allowed)[0].tolist())
        recalls.append(len(truth & found) / k)
    print(f"qdrant-client local mode: {qdrant_ms:.2f} ms per query (median)")
    print(f"numpy exact scan, 1 thread: {exact_ms:.2f} ms per query (scores only, before top-k)")
    print(
        f"agent in-memory search (64-d projection + exact rescoring): {ours_ms:.2f} ms per query; "
        f"recall@{k} vs Qdrant {statistics.mean(recalls):.3f}"
    )
    store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--qdrant-path", required=True)
    parser.add_argument("--collection", default="recsys_items")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=50)
    main(parser.parse_args())
