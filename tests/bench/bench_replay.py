"""Benchmark: prequential replay speed (and quality) on the dev sets, one event at a time and in
batches.

    python -m tests.bench.bench_replay --batch 1,32

Runs ``recsys-agent replay`` once per dataset and batch size, each in its own process, and
prints one row per run from its JSON report: events/s (the event loop: ranking, applying, the
harness and waiting for the baselines; the catalog load is timed apart), the mean batch the
stream allowed (a user's second event ends a batch), the pipeline's hit rate and NDCG, and where
the time went. Item vectors are cached in each dataset's data dir, so only the first run embeds.
Arguments after ``--`` go to every replay (``-- --sample-users 0.1 --limit 5000``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

from tests.bench.machine import describe

# name=items,events,data dir (relative to the repository root)
DEV_SETS = (
    "movietweetings=out/mt/items.jsonl,out/mt/events.jsonl,out/bench-stages",
    "online-retail=../shared/data/online-retail/items.jsonl,../shared/data/online-retail/events.jsonl,out/bench-retail",
)


def run_replay(items: str, events: str, data_dir: str, batch: int, extra: list[str]) -> tuple[dict, float]:
    """The JSON report of one replay, and its wall time (load and catalog included)."""
    with tempfile.TemporaryDirectory(prefix="bench-replay-") as scratch:
        report = Path(scratch) / "report.json"
        command = [sys.executable, "-m", "agent", "replay", "--items", items, "--events", events]
        command += ["--data-dir", data_dir, "--batch", str(batch), "--report", str(report), "--no-progress", *extra]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"replay failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return orjson.loads(report.read_bytes()), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", default="1,32", help="batch sizes, comma-separated (default 1,32)")
    parser.add_argument(
        "--dataset",
        action="append",
        metavar="NAME=ITEMS,EVENTS,DATA_DIR",
        help="a dataset to replay (repeatable; default: the two dev sets)",
    )
    parser.add_argument("extra", nargs="*", help="after --: arguments for every replay")
    args = parser.parse_args()
    sizes = [int(size) for size in args.batch.split(",")]
    print(describe(), flush=True)
    print(
        "| dataset | batch | mean batch | events | evaluated | events/s | hit rate@10 | NDCG@10 | rank / apply / other s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for spec in args.dataset or DEV_SETS:
        name, _, paths = spec.partition("=")
        items, events, data_dir = paths.split(",")
        for size in sizes:
            report, _ = run_replay(items, events, data_dir, size, args.extra)
            times = report["time_s"]
            other = times["replay"] - times["pipeline_rank"] - times["pipeline_apply"]
            k = report["k"]
            print(
                f"| {name} | {report['batch']} | {report['mean_batch']:.1f} | {report['events']:,} | "
                f"{report['evaluated']:,} | {report['events_per_s']:,.0f} | {report['metrics'][f'hit_rate@{k}']:.4f} | "
                f"{report['metrics'][f'ndcg@{k}']:.4f} | "
                f"{times['pipeline_rank']:.1f} / {times['pipeline_apply']:.1f} / {other:.1f} |",
                flush=True,
            )
    print(describe())


if __name__ == "__main__":
    main()
