"""Benchmark: prequential replay speed and quality on the dev sets, per tie protocol and batch size.

    python -m tests.bench.bench_replay --batch 1,32 --ties basket,order

Runs ``recsys-agent replay`` once per dataset, tie protocol and batch size, each in its own
process, and prints two tables from their JSON reports. Speed: events/s (the event loop:
ranking, applying, the harness and waiting for the baselines; the catalog load is timed apart),
the mean batch in steps the stream allowed (a user's second step ends a batch), and where the time went.
Quality: the pipeline's NDCG@10 with its 95 % interval, every baseline's, and the pipeline's
ratio to the best of them with its paired bootstrap interval. Item vectors are cached in each
dataset's data dir, so only the first run embeds. Arguments after ``--`` go to every replay
(``-- --sample-users 0.1 --limit 5000``, ``-- --shuffle-ties 1``).
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


def run_replay(items: str, events: str, data_dir: str, batch: int, ties: str, extra: list[str]) -> tuple[dict, float]:
    """The JSON report of one replay, and its wall time (load and catalog included)."""
    with tempfile.TemporaryDirectory(prefix="bench-replay-") as scratch:
        report = Path(scratch) / "report.json"
        command = [sys.executable, "-m", "agent", "replay", "--items", items, "--events", events]
        command += ["--data-dir", data_dir, "--batch", str(batch), "--ties", ties, "--report", str(report)]
        command += ["--no-progress", *extra]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"replay failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return orjson.loads(report.read_bytes()), time.perf_counter() - started


def _interval(figures: dict | None, digits: int) -> str:
    if figures is None or figures["value"] is None:
        return "n/a"
    low, high = (f"{figures[end]:.{digits}f}" if figures[end] is not None else "n/a" for end in ("low", "high"))
    return f"{figures['value']:.{digits}f} [{low}, {high}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", default="1,32", help="batch sizes, comma-separated (default 1,32)")
    parser.add_argument("--ties", default="basket", help="tie protocols, comma-separated (default basket)")
    parser.add_argument(
        "--dataset",
        action="append",
        metavar="NAME=ITEMS,EVENTS,DATA_DIR",
        help="a dataset to replay (repeatable; default: the two dev sets)",
    )
    parser.add_argument("extra", nargs="*", help="after --: arguments for every replay")
    args = parser.parse_args()
    sizes = [int(size) for size in args.batch.split(",")]
    protocols = [ties for ties in args.ties.split(",") if ties]
    print(describe(), flush=True)
    speed = [
        "| dataset | ties | batch | mean batch | events | evaluated | events/s | rank / apply / other s |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    quality = [
        "| dataset | ties | batch | pipeline NDCG@10 [95 %] | baselines NDCG@10 | best | ratio [95 %] |",
        "|---|---|---:|---|---|---|---|",
    ]
    for spec in args.dataset or DEV_SETS:
        name, _, paths = spec.partition("=")
        items, events, data_dir = paths.split(",")
        for ties in protocols:
            for size in sizes:
                report, _ = run_replay(items, events, data_dir, size, ties, args.extra)
                times = report["time_s"]
                other = times["replay"] - times["pipeline_rank"] - times["pipeline_apply"]
                k = report["k"]
                speed.append(
                    f"| {name} | {ties} | {report['batch']} | {report['mean_batch']:.1f} | {report['events']:,} | "
                    f"{report['evaluated']:,} | {report['events_per_s']:,.0f} | "
                    f"{times['pipeline_rank']:.1f} / {times['pipeline_apply']:.1f} / {other:.1f} |"
                )
                intervals = report.get("intervals") or {"ndcg": {}}
                baselines = ", ".join(
                    f"{baseline} {figures[f'ndcg@{k}']:.4f}" for baseline, figures in report["baselines"].items()
                )
                quality.append(
                    f"| {name} | {ties} | {report['batch']} | {_interval(intervals['ndcg'].get('pipeline'), 4)} | "
                    f"{baselines} | {report['best_baseline']} | {_interval(report['ratio_to_best_baseline'], 3)} |"
                )
                print(speed[-1], flush=True)
    print("\n".join(speed))
    print()
    print("\n".join(quality))
    print(describe())


if __name__ == "__main__":
    main()
