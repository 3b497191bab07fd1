"""Benchmark: event -> push latency over real NATS at several rates, ingest rate, memory per
user, and memory under a flood of new users.

    python -m tests.bench.bench_latency --items out/mt/items.jsonl --events out/mt/events.jsonl \\
        --rates 250,500,1000,2000 --seconds 60

One agent process on its embedded defaults (its own nats-server and local Qdrant in
``--data-dir``, every built-in plugin registered), with a catalog of the first ``--catalog``
items of the dev set, embedded beforehand by ``recsys-agent catalog import`` (vectors cached in
the data dir across runs; the streams are emptied first). Phases:

1. Warm-up: ``--warmup`` events published at once, so that users have history and the
   co-occurrence and trending stages have state.
2. Latency curve: for each of ``--rates``, events published at that rate for ``--seconds``
   (open loop: the send schedule does not wait for the agent). Each event is the next event of a
   user drawn at random from ``--users`` dev-set users (each user's own events in their order,
   cycled), and a subscription times every push; a coalesced push counts for every event it
   lists. Per rate: p50/p90/p99/max event -> push, whether every event was reflected, agent CPU
   per event and per push, and the push and apply batch sizes the agent saw (its
   ``recsys_push_batch_size`` and ``recsys_apply_batch_size`` histograms, read before and after).
3. Ingest: ``--ingest`` events for ``--ingest-users`` new users published as fast as the client
   can; events/s until the last event of every user is reflected in a push, and RSS before and
   after (memory per user).
4. Flood: a second agent with ``max_users = --flood-max-users`` (set in an agent config file)
   takes ``--flood-users`` new users in ``--flood-rounds`` rounds; RSS after each round should
   stay flat once the cap is reached.

Figures are medians and percentiles; the machine (and its load average, which shows whether
something else used the cores meanwhile) is printed first and last. The publishing client
shares the machine with the agent: its own CPU is printed too.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import nats
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from prometheus_client.parser import text_string_to_metric_families

from agent.bus.embedded_server import client_url
from agent.wire.contract import Event, event_subject
from tests.bench.machine import children, cpu_seconds, describe, load_average, percentile, rss_kib
from tests.processes import start_agent as run_agent

PREFIX = "recsys"
HISTOGRAMS = ("recsys_push_batch_size", "recsys_apply_batch_size")


# -- the agent process -------------------------------------------------------------------------


@dataclass
class Histogram:
    """One reading of a Prometheus histogram: cumulative counts by upper bound, sum of values."""

    buckets: dict[float, float] = field(default_factory=dict)
    total: float = 0.0


@dataclass
class Agent:
    process: asyncio.subprocess.Process
    nats_url: str
    http_url: str
    http: aiohttp.ClientSession

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu(self) -> tuple[float, float]:
        """CPU seconds of the agent's Python process and of its nats-server (a child)."""
        return cpu_seconds(self.pid), sum(cpu_seconds(child) for child in children(self.pid))

    async def health(self) -> dict[str, Any]:
        async with self.http.get(f"{self.http_url}/healthz") as response:
            return await response.json()

    async def histograms(self) -> dict[str, Histogram]:
        """The batch-size histograms as they stand."""
        async with self.http.get(f"{self.http_url}/metrics") as response:
            text = await response.text()
        found = {name: Histogram() for name in HISTOGRAMS}
        for family in text_string_to_metric_families(text):
            if family.name in found:
                for sample in family.samples:
                    if sample.name.endswith("_bucket"):
                        found[family.name].buckets[float(sample.labels["le"])] = sample.value
                    elif sample.name.endswith("_sum"):
                        found[family.name].total = sample.value
        return found

    async def push_backlog(self) -> float:
        async with self.http.get(f"{self.http_url}/metrics") as response:
            text = await response.text()
        match = re.search(r"^recsys_push_backlog (\S+)$", text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0


async def start_agent(data_dir: Path, config: Path | None, http: aiohttp.ClientSession) -> Agent:
    flags = ["--data-dir", str(data_dir), "--nats-port", "0", "--http-port", "0", "--log-level", "WARNING"]
    if config is not None:
        flags += ["--config", str(config)]
    process, _, http_url = await run_agent(*flags, log_path=data_dir / "agent.log", ready_timeout_s=120.0)
    # the printed URL has no credentials; the embedded server asks for them
    return Agent(process, client_url(data_dir), http_url, http)


async def stop_agent(agent: Agent) -> None:
    agent.process.terminate()
    async with asyncio.timeout(30):
        await agent.process.wait()


def import_catalog(items: list[dict[str, Any]], data_dir: Path) -> float:
    """Empty the streams and import the catalog (vectors found in the data dir's Qdrant are
    reused, so only the first run embeds). Returns the seconds it took."""
    # Every agent starts from empty streams (a restart would first replay the earlier runs'
    # events); Qdrant is kept.
    shutil.rmtree(data_dir / "nats", ignore_errors=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    subset = data_dir / "items.jsonl"
    subset.write_bytes(b"\n".join(orjson.dumps(i) for i in items) + b"\n")
    started = time.perf_counter()
    command = [sys.executable, "-m", "agent", "catalog", "import", str(subset), "--data-dir", str(data_dir)]
    subprocess.run([*command, "--log-level", "WARNING"], check=True)
    return time.perf_counter() - started


async def wait_ready(agent: Agent, n_items: int, vectors: bool) -> float:
    started = time.perf_counter()
    while True:
        state = await agent.health()
        # a configuration without the content plugin has no vectors to wait for
        if state["items"] >= n_items and (not vectors or state["item_vectors"] >= n_items):
            return time.perf_counter() - started
        await asyncio.sleep(0.5)


# -- the client ----------------------------------------------------------------------------------


@dataclass
class Pushes:
    """Every push seen: when each event id was first reflected."""

    received: dict[str, float] = field(default_factory=dict)
    count: int = 0

    async def on_push(self, msg: Msg) -> None:
        now = time.perf_counter()
        self.count += 1
        body = orjson.loads(msg.data)
        for event_id in body.get("event_ids") or [body.get("event_id")]:
            self.received.setdefault(event_id, now)

    async def wait_for(self, ids: list[str], timeout: float) -> bool:
        """Until every event of ``ids`` is reflected (True), or ``timeout`` seconds (False)."""
        deadline = time.perf_counter() + timeout
        # only the missing ones are looked at again: the client shares the agent's cores
        missing = [i for i in ids if i not in self.received]
        while missing and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
            missing = [i for i in missing if i not in self.received]
        return not missing


class Population:
    """Dev-set users whose events are replayed under new ids: each draw is the next event of
    one user (their own events in their order, cycled)."""

    def __init__(self, events: list[dict[str, Any]], catalog: set[str], users: int, seed: int) -> None:
        by_user: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for event in events:
            if event.get("item_id") in catalog:
                by_user[event["user_id"]].append(event)
        # the most active users: every user then has history to rank from
        ranked = sorted(by_user, key=lambda u: (-len(by_user[u]), u))[:users]
        if len(ranked) < users:
            raise SystemExit(f"the dev set has only {len(ranked)} users with events on the catalog")
        self.sequences = [by_user[u] for u in ranked]
        self.next = [0] * len(ranked)
        self.rng = random.Random(seed)

    def event_of(self, user: int) -> dict[str, Any]:
        sequence = self.sequences[user]
        event = sequence[self.next[user] % len(sequence)]
        self.next[user] += 1
        return event

    def draw(self) -> tuple[int, dict[str, Any]]:
        user = self.rng.randrange(len(self.sequences))
        return user, self.event_of(user)


def message(event_id: str, user_id: str, source: dict[str, Any]) -> tuple[str, bytes]:
    """(subject, body) of a dev-set event under a new id and user; no ts: the stream's time."""
    body: dict[str, Any] = {"id": event_id, "type": source["type"], "user_id": user_id, "item_id": source["item_id"]}
    if source.get("value") is not None:
        body["value"] = source["value"]
    subject = event_subject(PREFIX, Event(type=source["type"], user_id=user_id, ts=0.0, item_id=source["item_id"]))
    return subject, orjson.dumps(body)


async def publish_all(nc: NATS, messages: list[tuple[str, str, bytes]], sent: dict[str, float] | None = None) -> float:
    """Publish as fast as the client can; returns the seconds it took."""
    started = time.perf_counter()
    for n, (event_id, subject, body) in enumerate(messages):
        if sent is not None:
            sent[event_id] = time.perf_counter()
        await nc.publish(subject, body)
        if n % 1_000 == 999:
            # lets the client's buffer drain, so that a fast loop cannot outgrow it
            await nc.flush()
    await nc.flush()
    return time.perf_counter() - started


def batch_sizes(before: Histogram, after: Histogram) -> str:
    """The batches observed between two readings of a histogram: mean size, share per size range."""
    count = after.buckets.get(float("inf"), 0.0) - before.buckets.get(float("inf"), 0.0)
    if count <= 0:
        return "none"
    parts = []
    low, below = 1, 0.0
    for bound in sorted(after.buckets):
        cumulative = after.buckets[bound] - before.buckets.get(bound, 0.0)
        if cumulative > below:
            label = f">{low - 1}" if bound == float("inf") else str(low) if low >= bound else f"{low}-{bound:g}"
            parts.append(f"{label}: {100 * (cumulative - below) / count:.0f}%")
        below = cumulative
        low = int(bound) + 1 if bound != float("inf") else low
    mean = (after.total - before.total) / count
    return f"{count:.0f} batches, mean {mean:.1f}; sizes " + ", ".join(parts)


# -- the phases ----------------------------------------------------------------------------------


async def latency_at(
    agent: Agent, nc: NATS, pushes: Pushes, population: Population, run: str, rate: float, seconds: float, wait_s: float
) -> None:
    total = int(rate * seconds)
    # encoded beforehand: the send loop must cost the shared cores as little as possible
    messages = []
    users = set()
    for n in range(total):
        user, source = population.draw()
        users.add(user)
        messages.append((f"lat-{run}-{rate:g}-{n}", *message(f"lat-{run}-{rate:g}-{n}", f"pop-{run}-{user}", source)))
    histograms_before = await agent.histograms()
    agent_cpu, nats_cpu = agent.cpu()
    client_cpu = time.process_time()
    pushes_before = pushes.count
    load = load_average()
    sent: dict[str, float] = {}
    start = time.perf_counter()
    for n, (event_id, subject, body) in enumerate(messages):
        delay = start + n / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        sent[event_id] = time.perf_counter()
        await nc.publish(subject, body)
    send_s = time.perf_counter() - start
    all_reflected = await pushes.wait_for(list(sent), wait_s)
    # CPU is counted until the last push: an agent that falls behind works on after the sends
    window_s = time.perf_counter() - start
    agent_used = agent.cpu()[0] - agent_cpu
    nats_used = agent.cpu()[1] - nats_cpu
    client_used = time.process_time() - client_cpu
    n_pushes = pushes.count - pushes_before
    histograms_after = await agent.histograms()
    latencies = [1000 * (pushes.received[e] - t) for e, t in sent.items() if e in pushes.received]
    reflected = len(latencies)
    if not latencies:
        print(f"rate {rate:g}/s: no event was reflected within {wait_s:.0f} s")
        return
    print(
        f"rate {rate:g}/s for {send_s:.1f} s ({total} events from {len(users)} users, sent at {total / send_s:.0f}/s; "
        f"load average {load:.2f}): event -> push p50 {statistics.median(latencies):.1f} ms, "
        f"p90 {percentile(latencies, 0.9):.1f} ms, p99 {percentile(latencies, 0.99):.1f} ms, max {max(latencies):.0f} ms; "
        f"every event reflected: {all_reflected} ({reflected}/{total}, {n_pushes} pushes)"
    )
    print(
        f"  CPU: agent {1000 * agent_used / total:.2f} ms per event, {1000 * agent_used / max(n_pushes, 1):.2f} ms per push "
        f"({100 * agent_used / window_s:.0f}% of a core over {window_s:.1f} s); nats-server {1000 * nats_used / total:.2f} ms per event; "
        f"client {1000 * client_used / total:.2f} ms per event"
    )
    for name in HISTOGRAMS:
        print(f"  {name}: {batch_sizes(histograms_before[name], histograms_after[name])}")
    # when the slowest events were sent: one stall (a start-up task, a collection) and a
    # saturated agent look alike in a percentile, not in time
    slowest = sorted((pushes.received[e] - t, t - start) for e, t in sent.items() if e in pushes.received)[-3:]
    print("  slowest sent at " + ", ".join(f"{at:.1f} s ({1000 * lag:.0f} ms)" for lag, at in reversed(slowest)))


async def drained(agent: Agent, timeout: float) -> None:
    """Until the agent owes no push (so that RSS is read in a steady state)."""
    deadline = time.perf_counter() + timeout
    while await agent.push_backlog() > 0 and time.perf_counter() < deadline:
        await asyncio.sleep(0.1)


async def new_users(
    agent: Agent,
    nc: NATS,
    pushes: Pushes,
    population: Population,
    tag: str,
    users: int,
    per_user: int,
    wait_s: float,
) -> tuple[float, float, bool, int]:
    """``users`` new users with ``per_user`` events each (interleaved), published at once.
    Returns (events/s until every user's last event is reflected, publish s, all reflected,
    events applied)."""
    messages = []
    for n in range(users * per_user):
        user = n % users
        event_id = f"{tag}-{n}"
        source = population.event_of(user % len(population.sequences))
        messages.append((event_id, *message(event_id, f"{tag}-user-{user}", source)))
    last = [event_id for event_id, _, _ in messages[-users:]]
    before = (await agent.health())["events_applied"]
    start = time.perf_counter()
    publish_s = await publish_all(nc, messages)
    reflected = await pushes.wait_for(last, wait_s)
    done = max((pushes.received.get(i, 0.0) for i in last), default=start)
    applied = (await agent.health())["events_applied"] - before
    return len(messages) / max(done - start, 1e-9), publish_s, reflected, applied


async def main(args: argparse.Namespace) -> None:
    rates = [float(rate) for rate in args.rates.split(",")]
    print(describe(), flush=True)
    items = [orjson.loads(line) for line in open(args.items, encoding="utf-8")][: args.catalog]
    data_dir = Path(args.data_dir)
    print(f"catalog import of {len(items)} items: {import_catalog(items, data_dir):.1f} s", flush=True)
    population = Population(
        [orjson.loads(line) for line in open(args.events, encoding="utf-8")],
        {item["id"] for item in items},
        args.users,
        args.seed,
    )
    # Ids unique to this run: an id seen before is a duplicate, which gets no push.
    run = os.urandom(3).hex()
    async with aiohttp.ClientSession() as http:
        agent = await start_agent(data_dir, args.config, http)
        try:
            ready_s = await wait_ready(agent, len(items), not args.no_vectors)
            state = await agent.health()
            print(
                f"agent ready in {ready_s:.1f} s: {state['items']} items, {state['item_vectors']} vectors", flush=True
            )
            nc = await nats.connect(agent.nats_url)
            pushes = Pushes()
            await nc.subscribe(f"{PREFIX}.recs.>", cb=pushes.on_push, pending_msgs_limit=0, pending_bytes_limit=0)
            await nc.flush()

            warmup = []
            for n in range(args.warmup):
                user, source = population.draw()
                warmup.append((f"warm-{run}-{n}", *message(f"warm-{run}-{n}", f"pop-{run}-{user}", source)))
            started = time.perf_counter()
            await publish_all(nc, warmup)
            warm_ok = await pushes.wait_for([e for e, _, _ in warmup], args.wait)
            print(
                f"warm-up: {len(warmup)} events for {len(population.sequences)} users in "
                f"{time.perf_counter() - started:.1f} s (all reflected: {warm_ok})",
                flush=True,
            )
            await drained(agent, args.wait)

            for rate in rates:
                await latency_at(agent, nc, pushes, population, run, rate, args.seconds, args.wait)
                await drained(agent, args.wait)
                sys.stdout.flush()

            rss_before = rss_kib(agent.pid)
            users_before = (await agent.health())["users"]
            per_user = args.ingest // args.ingest_users
            rate, publish_s, reflected, applied = await new_users(
                agent, nc, pushes, population, f"ing-{run}", args.ingest_users, per_user, args.wait
            )
            await drained(agent, args.wait)
            rss_after = rss_kib(agent.pid)
            users_after = (await agent.health())["users"]
            print(
                f"ingest: {args.ingest_users * per_user} events for {args.ingest_users} new users, published in "
                f"{publish_s:.1f} s; {rate:.0f} events/s until the last event of every user was reflected "
                f"(all reflected: {reflected}; applied {applied})"
            )
            print(
                f"memory: RSS {rss_before / 1024:.0f} -> {rss_after / 1024:.0f} MiB for {users_after - users_before} "
                f"new users: {(rss_after - rss_before) * 1024 / max(users_after - users_before, 1):.0f} bytes per user "
                f"(history of {per_user} events; the deduplicator's {per_user} ids each included)",
                flush=True,
            )
            await nc.close()
        finally:
            await stop_agent(agent)

        if args.flood_users:
            await flood(args, http, items, population, run)
    print(describe())


async def flood(
    args: argparse.Namespace, http: aiohttp.ClientSession, items: list[dict[str, Any]], population: Population, run: str
) -> None:
    """A second agent, capped at ``--flood-max-users``, taking new users round after round."""
    data_dir = Path(args.data_dir)
    config = data_dir / "flood.toml"
    # the deduplicator's keys would grow memory with every event, whatever the user cap
    config.write_text(f"max_users = {args.flood_max_users}\ndedup_capacity = 1000\n", encoding="utf-8")
    import_s = import_catalog(items, data_dir)
    agent = await start_agent(data_dir, config, http)
    try:
        await wait_ready(agent, len(items), not args.no_vectors)
        nc = await nats.connect(agent.nats_url)
        pushes = Pushes()
        await nc.subscribe(f"{PREFIX}.recs.>", cb=pushes.on_push, pending_msgs_limit=0, pending_bytes_limit=0)
        await nc.flush()
        per_round = args.flood_users // args.flood_rounds
        print(
            f"flood: agent with max_users = {args.flood_max_users} (catalog import {import_s:.1f} s); "
            f"{args.flood_rounds} rounds of {per_round} new users, {args.flood_events} events each"
        )
        samples = [rss_kib(agent.pid)]
        print(f"  start: RSS {samples[0] / 1024:.1f} MiB", flush=True)
        for round_number in range(1, args.flood_rounds + 1):
            rate, _, reflected, applied = await new_users(
                agent, nc, pushes, population, f"flood-{run}-{round_number}", per_round, args.flood_events, args.wait
            )
            await drained(agent, args.wait)
            samples.append(rss_kib(agent.pid))
            state = await agent.health()
            grown = (samples[-1] - samples[-2]) * 1024 / per_round
            print(
                f"  after {round_number * per_round} new users: RSS {samples[-1] / 1024:.1f} MiB "
                f"({grown:+.0f} bytes per user of this round), {state['users']} users held; "
                f"{rate:.0f} events/s (all reflected: {reflected}, applied {applied})",
                flush=True,
            )
            pushes.received.clear()
        await nc.close()
    finally:
        await stop_agent(agent)
    # From the first round on the user store is full: what still grows is kept per user
    # elsewhere (a plugin's own table has its own bound). The last half of the rounds says
    # whether it has levelled off.
    half = max(1, args.flood_rounds // 2)
    grown = (samples[-1] - samples[-1 - half]) * 1024
    print(
        f"flood: RSS {samples[1] / 1024:.1f} MiB after the first round, {samples[-1] / 1024:.1f} MiB at the end; "
        f"the last {half * per_round} users grew it by {grown / (half * per_round):.0f} bytes per user"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", required=True)
    parser.add_argument("--events", required=True)
    parser.add_argument("--catalog", type=int, default=10_000, help="catalog size (first N items)")
    parser.add_argument("--rates", default="250,500,1000,2000", help="events/s, comma-separated")
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds at each rate")
    parser.add_argument("--users", type=int, default=5_000, help="dev-set users the rates draw from")
    parser.add_argument("--warmup", type=int, default=10_000, help="events before the first rate")
    parser.add_argument("--ingest", type=int, default=50_000)
    parser.add_argument("--ingest-users", type=int, default=5_000)
    parser.add_argument("--flood-users", type=int, default=100_000, help="0: no flood phase")
    parser.add_argument("--flood-rounds", type=int, default=5)
    parser.add_argument("--flood-events", type=int, default=2, help="events per flood user")
    parser.add_argument("--flood-max-users", type=int, default=2_000)
    parser.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the pushes after a phase")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--data-dir", default="out/bench-latency")
    parser.add_argument(
        "--config", type=Path, default=None, help="agent configuration file (e.g. some stages disabled)"
    )
    parser.add_argument("--no-vectors", action="store_true", help="do not wait for item vectors (content disabled)")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(main(parser.parse_args()))
