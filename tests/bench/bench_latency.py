"""Benchmark: event -> push latency over real NATS, ingest rate and memory per user.

    python -m tests.bench.bench_latency --items out/items.jsonl --events out/events.jsonl

Runs the agent as its own process on its embedded defaults (a data dir of its own), with the
catalog embedded beforehand by ``recsys-agent catalog import`` (cached in the data dir across
runs; the streams are emptied first). A nats.py client publishes events at a fixed rate (open loop: the send schedule does not
wait for the agent) and a second subscription times every push; a coalesced push counts for
every event it reflects. Prints medians and percentiles; the machine is shared, so compare runs
made back to back.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import nats
import orjson

from tests.test_cli import start_agent


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def health(http: aiohttp.ClientSession, url: str) -> dict:
    async with http.get(f"{url}/healthz") as response:
        return await response.json()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main(args: argparse.Namespace) -> None:
    items = [orjson.loads(line) for line in open(args.items, encoding="utf-8")][: args.catalog]
    data_dir = Path(args.data_dir)
    # Every run starts from empty streams (a restart would first replay the earlier runs'
    # events); Qdrant is kept, so the import finds the vectors and embeds nothing again.
    shutil.rmtree(data_dir / "nats", ignore_errors=True)
    subset = data_dir / "items.jsonl"
    data_dir.mkdir(parents=True, exist_ok=True)
    subset.write_bytes(b"\n".join(orjson.dumps(i) for i in items) + b"\n")
    started = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "agent",
            "catalog",
            "import",
            str(subset),
            "--data-dir",
            str(data_dir),
            "--log-level",
            "WARNING",
        ],
        check=True,
    )
    print(f"catalog import of {len(items)} items: {time.perf_counter() - started:.1f} s")
    events = [orjson.loads(line) for line in open(args.events, encoding="utf-8")]

    config = ["--config", args.config] if args.config else []
    process, nats_url, http_url = await start_agent(
        "--data-dir", str(data_dir), "--nats-port", "0", "--http-port", "0", "--log-level", "WARNING", *config
    )
    try:
        async with aiohttp.ClientSession() as http:
            started = time.perf_counter()
            while True:
                state = await health(http, http_url)
                # a configuration without the content plugin has no vectors to wait for
                if state["items"] >= len(items) and (args.no_vectors or state["item_vectors"] >= len(items)):
                    break
                await asyncio.sleep(0.5)
            print(f"agent ready with {state['items']} items and vectors in {time.perf_counter() - started:.1f} s")
            nc = await nats.connect(nats_url)
            sent: dict[str, float] = {}
            received: dict[str, float] = {}
            pushes = 0

            async def on_push(msg) -> None:  # type: ignore[no-untyped-def]
                nonlocal pushes
                now = time.perf_counter()
                pushes += 1
                body = orjson.loads(msg.data)
                for event_id in body.get("event_ids") or [body.get("event_id")]:
                    received.setdefault(event_id, now)

            await nc.subscribe("recsys.recs.>", cb=on_push)
            await nc.flush()

            # Ids unique to this run: the data dir (and its streams) persist between runs, and an
            # id seen before is a duplicate, which gets no push.
            run = os.urandom(4).hex()
            # latency at a fixed rate
            total = int(args.rate * args.seconds)
            cpu_before = cpu_seconds(process.pid)
            start = time.perf_counter()
            for n in range(total):
                source = events[n % len(events)]
                event_id = f"lat-{run}-{n}"
                body = {"id": event_id, "type": "view", "user_id": f"{source['user_id']}", "item_id": source["item_id"]}
                due = start + n / args.rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                sent[event_id] = time.perf_counter()
                await nc.publish("recsys.events.view", orjson.dumps(body))
            send_seconds = time.perf_counter() - start
            deadline = time.perf_counter() + 30
            while len(received.keys() & sent.keys()) < total and time.perf_counter() < deadline:
                await asyncio.sleep(0.05)
            cpu_used = cpu_seconds(process.pid) - cpu_before
            latencies = [1000 * (received[e] - sent[e]) for e in sent if e in received]
            # when the slowest events were sent: one stall (a start-up task, a collection) and a
            # saturated agent look alike in a percentile, not in time
            slowest = sorted((received[e] - sent[e], sent[e] - start) for e in sent if e in received)[-5:]
            print(
                "slowest events sent at "
                + ", ".join(f"{at:.2f} s ({1000 * lag:.0f} ms)" for lag, at in reversed(slowest))
            )
            print(
                f"latency at {args.rate:.0f} events/s for {send_seconds:.1f} s ({total} events, {pushes} pushes, "
                f"{len(latencies)} reflected): p50 {statistics.median(latencies):.2f} ms, "
                f"p90 {percentile(latencies, 0.9):.2f} ms, p99 {percentile(latencies, 0.99):.2f} ms, max {max(latencies):.1f} ms; "
                f"agent CPU {1000 * cpu_used / total:.2f} ms per event ({1000 * cpu_used / max(pushes, 1):.2f} ms per push)"
            )

            # ingest: as fast as the client can publish; pushes coalesce under this load
            before = (await health(http, http_url))["events_applied"]
            rss_before = rss_kib(process.pid)
            count = args.ingest
            pushes_before = pushes
            start = time.perf_counter()
            for n in range(count):
                body = {
                    "id": f"ing-{run}-{n}",
                    "type": "view",
                    "user_id": f"ingest-user-{n % args.users}",
                    "item_id": items[(n * 7919) % len(items)]["id"],
                }
                await nc.publish("recsys.events.view", orjson.dumps(body))
                if n % 1000 == 0:
                    await nc.flush()
            while (await health(http, http_url))["events_applied"] < before + count:
                await asyncio.sleep(0.05)
            elapsed = time.perf_counter() - start
            pushes_during = pushes - pushes_before
            rss_after = rss_kib(process.pid)
            last = {f"ing-{run}-{n}" for n in range(count - args.users, count)}
            deadline = time.perf_counter() + 30
            while not last <= received.keys() and time.perf_counter() < deadline:
                await asyncio.sleep(0.05)
            print(
                f"ingest: {count} events for {args.users} new users applied in {elapsed:.2f} s = {count / elapsed:.0f} events/s "
                f"({pushes_during} pushes meanwhile); last event of every user reflected in a push: {last <= received.keys()}"
            )
            print(
                f"memory: RSS {rss_before / 1024:.0f} -> {rss_after / 1024:.0f} MiB, "
                f"{(rss_after - rss_before) * 1024 / args.users:.0f} bytes per new user (history of {count // args.users} events)"
            )
            await nc.close()
    finally:
        process.terminate()
        await process.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", required=True)
    parser.add_argument("--events", required=True)
    parser.add_argument("--catalog", type=int, default=10_000, help="catalog size")
    parser.add_argument("--rate", type=float, default=1_000.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--ingest", type=int, default=20_000)
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--data-dir", default="out/bench-data")
    parser.add_argument("--config", default=None, help="agent configuration file (e.g. some stages disabled)")
    parser.add_argument("--no-vectors", action="store_true", help="do not wait for item vectors (content disabled)")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(main(parser.parse_args()))
