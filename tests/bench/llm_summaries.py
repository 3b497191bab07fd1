"""Slow-path figures against the real small model (SmolLM2-135M via llama-cpp-python's server).

    python -m tests.bench.llm_summaries throughput [--n 12] [--threads 2]
    python -m tests.bench.llm_summaries hooks [--events 1500]       (no server: the hooks' own cost)
    python -m tests.bench.llm_summaries overload [--seconds 30] [--rate 100] [--users 300]
    for m in off heuristic llm; do
        python -m tests.bench.llm_summaries hotpath --mode $m --data-dir /tmp/hot --events 1500 --rate 50
    done

Histories are real: MovieTweetings (shared/data/movietweetings-100k) titles and genres. The CPU
is shared (2 cores here, other jobs running), so every figure is a median over repeats and the
load average is printed with it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

from agent.config import load_settings
from agent.evaluation.datasets import read_movietweetings, stream_order_key
from agent.hooks.manager import get_plugin_manager
from agent.llm.chat_client import PROFILE_SCHEMA, ChatClient, Dialect, LLMError, validate_profile
from agent.llm.profiles import PROFILE_KEY
from agent.llm.prompts import HistoryEntry, build_messages
from agent.llm.scheduler import HistorySnapshot, SummaryScheduler
from agent.llm.summarisers import llm_summariser
from agent.llm.summary_metrics import SummaryMetrics
from agent.llm.summary_options import SummaryOptions
from agent.pipeline.pipeline import Pipeline
from agent.pipeline.user_state import Interaction, UserState
from agent.wire.contract import Event, Item
from tests.llm.llm_server import MODEL_ALIAS, llama_server

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "movietweetings-100k"
if not DATA.is_dir():
    DATA = Path("/work/shared/data/movietweetings-100k")


def load() -> tuple[dict[str, Item], list[Event]]:
    dataset = read_movietweetings(DATA)
    return {item.id: item for item in dataset.items}, sorted(dataset.events, key=stream_order_key)


def histories(items: dict[str, Item], events: list[Event], n: int, length: int) -> list[list[HistoryEntry]]:
    by_user: dict[str, list[HistoryEntry]] = {}
    for event in events:
        item = items.get(event.item_id or "")
        if item is not None:
            by_user.setdefault(event.user_id, []).append(HistoryEntry(item.title, item.categories[:4], "rate"))
    long_enough = [h[:length] for h in by_user.values() if len(h) >= length]
    random.Random(7).shuffle(long_enough)
    return long_enough[:n]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def load_avg() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


# --------------------------------------------------------------------------- throughput


async def throughput(base_url: str, n: int, length: int) -> None:
    items, events = load()
    cases = histories(items, events, n + 1, length)
    async with ChatClient(
        base_url, MODEL_ALIAS, dialect=Dialect.JSON_OBJECT_SCHEMA, timeout_s=300, max_tokens=320, max_connections=4
    ) as client:
        await client.complete_json(build_messages(cases[0]), PROFILE_SCHEMA)  # warm-up: model pages, prompt cache
        for concurrency in (1, 2):
            latencies: list[float] = []
            tokens: list[int] = []
            outcome: Counter[str] = Counter()
            semaphore = asyncio.Semaphore(concurrency)

            async def one(history: list[HistoryEntry]) -> None:
                async with semaphore:
                    started = time.perf_counter()
                    try:
                        completion = await client.complete_json(build_messages(history), PROFILE_SCHEMA)
                        validate_profile(completion.data)
                        outcome["valid"] += 1
                        tokens.append(completion.completion_tokens or 0)
                    except LLMError as exc:
                        outcome[exc.kind] += 1
                    latencies.append(time.perf_counter() - started)

            started = time.perf_counter()
            await asyncio.gather(*(one(h) for h in cases[1:]))
            wall = time.perf_counter() - started
            print(
                f"concurrency {concurrency}: {n} summaries of {length} items in {wall:.1f} s = {n / wall:.2f} summaries/s; "
                f"latency median {statistics.median(latencies):.2f} s, p90 {pct(latencies, 0.9):.2f} s; "
                f"completion tokens median {statistics.median(tokens) if tokens else 0:.0f}; outcomes {dict(outcome)}; {load_avg()}"
            )


# --------------------------------------------------------------------------- overload


class SyntheticUsers:
    """A ProfileSource over UserStates fed with MovieTweetings items."""

    def __init__(self, items: list[Item]) -> None:
        self.items = items
        self.users: dict[str, UserState] = {}
        self.summaries: Counter[str] = Counter()

    def add(self, user_id: str, slot: int) -> int:
        user = self.users.setdefault(user_id, UserState(user_id=user_id, recent=deque(maxlen=50)))
        user.recent.append(Interaction(slot=slot, type="view", ts=time.time(), signal=1.0))
        user.event_count += 1
        return self.unsummarised(user_id)

    def snapshot(self, user_id: str) -> HistorySnapshot | None:
        user = self.users.get(user_id)
        if user is None:
            return None
        entries = [
            HistoryEntry(self.items[i.slot].title, self.items[i.slot].categories[:4], i.type)
            for i in list(user.recent)[-8:]
        ]
        return HistorySnapshot(entries, user.event_count, PROFILE_KEY in user.extras, user)

    def unsummarised(self, user_id: str) -> int:
        user = self.users[user_id]
        return user.event_count - int(user.extras.get("covered", 0))  # type: ignore[call-overload]

    def store(self, user_id: str, snapshot: HistorySnapshot, profile: dict[str, Any], *, final: bool) -> None:
        if final:
            self.users[user_id].extras["covered"] = snapshot.event_count
        self.users[user_id].extras[PROFILE_KEY] = profile
        self.summaries[f"{user_id}:{profile['source']}"] += 1


async def overload(base_url: str, seconds: float, rate: float, n_users: int, pending: int) -> None:
    items, _ = load()
    catalog = list(items.values())
    source = SyntheticUsers(catalog)
    options = SummaryOptions.parse(
        {
            "max_concurrency": 2,
            "max_pending_users": pending,
            "refresh_after_events": 3,
            "refresh_after_s": 10.0,
            "timeout_s": 60.0,
            "max_tokens": 320,
        }
    )
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    rng = random.Random(3)
    # a few heavy users and a long tail, as real traffic has
    weights = [1.0 / (rank + 1) for rank in range(n_users)]
    samples: list[tuple[int, int]] = []
    async with ChatClient(
        base_url, MODEL_ALIAS, dialect=Dialect.JSON_OBJECT_SCHEMA, timeout_s=60, max_connections=2
    ) as client:
        scheduler = SummaryScheduler(
            options, source, llm_summariser(client, send_categories=True), metrics=SummaryMetrics(registry)
        )
        async with scheduler.running_tasks():
            started = time.perf_counter()
            sent = 0
            while (elapsed := time.perf_counter() - started) < seconds:
                due = int(elapsed * rate)
                while sent < due:
                    user = f"u{rng.choices(range(n_users), weights)[0]}"
                    new = source.add(user, rng.randrange(len(catalog)))
                    scheduler.note_event(user, new, PROFILE_KEY in source.users[user].extras)
                    sent += 1
                stats = scheduler.stats()
                samples.append((stats["pending"], stats["waiting"] + stats["urgent"]))
                await asyncio.sleep(0.02)
            final = scheduler.stats()
    llm_users = {key.split(":")[0] for key in source.summaries if key.endswith(":llm")}
    active = [u for u, state in source.users.items() if state.event_count >= options.refresh_after_events]
    behind = [source.unsummarised(u) for u in active]
    per_user = Counter(key.split(":")[0] for key in source.summaries)
    wait = {
        le: registry.get_sample_value("recsys_summary_wait_seconds_bucket", {"le": le}) or 0
        for le in ("1.0", "5.0", "10.0", "30.0", "60.0", "+Inf")
    }
    total_waits = wait["+Inf"] or 1
    print(
        f"{sent} events in {seconds:.0f} s ({rate:.0f}/s) from {len(source.users)} users; workers 2, max_pending_users {pending}; {load_avg()}"
    )
    print(
        f"summaries: llm {final.get('summaries_llm', 0)}, heuristic {final.get('summaries_heuristic', 0)} "
        f"({(final.get('summaries_llm', 0)) / seconds:.2f} LLM summaries/s)"
    )
    print(
        f"pending: max {max(p for p, _ in samples)} (bound {pending}); tracked users: max {max(t for _, t in samples)}; "
        f"requests coalesced {final.get('coalesced', 0)}, dropped {final.get('dropped', 0)}"
    )
    print("wait from due to start: " + ", ".join(f"<= {le} s: {100 * v / total_waits:.0f}%" for le, v in wait.items()))
    print(
        f"users with >= 3 events: {len(active)}; with an LLM profile: {len(llm_users & set(active))}; "
        f"with any profile: {sum(1 for u in active if per_user[u])}; max summaries for one user: {max(per_user.values(), default=0)}; "
        f"events not yet summarised per active user: median {statistics.median(behind) if behind else 0:.0f}, max {max(behind, default=0)}"
    )


# --------------------------------------------------------------------------- hot path


async def hotpath(
    base_url: str | None, n_events: int, n_items: int, rate: float, mode: str, without: list[str], data_dir: Path
) -> dict[str, float]:
    items_by_id, events = load()
    events = events[:n_events]
    wanted = {e.item_id for e in events}
    items = [items_by_id[i] for i in sorted(wanted) if i in items_by_id]
    items += [item for item in items_by_id.values() if item.id not in wanted][: max(0, n_items - len(items))]
    disabled = list(without) + (["summariser"] if mode == "off" else [])
    # one data dir for all modes: item embeddings are computed once
    settings = load_settings(
        env={},
        overrides={"load_entry_points": False, "disabled_plugins": ",".join(disabled), "data_dir": str(data_dir)},
    )
    if mode == "llm":
        settings.plugins = {
            "summariser": {
                "base_url": base_url,
                "model": MODEL_ALIAS,
                "dialect": "json_object_schema",
                "refresh_after_events": 5,
                "timeout_s": 60.0,
                "history_items": 8,
            }
        }
    pipeline = Pipeline(settings, get_plugin_manager(settings))
    apply_s: list[float] = []
    recommend_s: list[float] = []
    async with pipeline.running():
        await pipeline.upsert_items(items)
        now = time.time()
        paced_from = time.perf_counter()
        for i, event in enumerate(events):
            # live timestamps, so that events wake summaries as they would in production
            event = Event(
                type=event.type,
                user_id=event.user_id,
                ts=now + i * 0.001,
                id=f"b{i}",
                item_id=event.item_id,
                value=event.value,
            )
            started = time.perf_counter()
            await pipeline.apply_event(event)
            applied = time.perf_counter()
            await pipeline.recommend(event.user_id, 10)
            finished = time.perf_counter()
            apply_s.append(applied - started)
            recommend_s.append(finished - applied)
            # paced like live traffic; the slow path's tasks run in the gaps, as in the agent
            await asyncio.sleep(max(0.0, paced_from + (i + 1) / rate - time.perf_counter()))
        summariser = pipeline.pm.get_plugin("summariser") if mode != "off" else None
        stats = summariser.scheduler.stats() if summariser is not None and summariser.scheduler else {}
    result = {
        "apply_p50_ms": 1000 * pct(apply_s, 0.5),
        "apply_p99_ms": 1000 * pct(apply_s, 0.99),
        "recommend_p50_ms": 1000 * pct(recommend_s, 0.5),
        "recommend_p99_ms": 1000 * pct(recommend_s, 0.99),
    }
    print(
        f"summariser {mode:9}: "
        + ", ".join(f"{k} {v:.2f}" for k, v in result.items())
        + f"; summaries llm {stats.get('summaries_llm', 0)}, heuristic {stats.get('summaries_heuristic', 0)}; {load_avg()}"
    )
    return result


# --------------------------------------------------------------------------- the plugin's own hooks


async def hooks(n: int) -> None:
    """Cost of the summariser's hot-path hooks alone, outside any contention from other stages."""
    from agent.context import AgentContext
    from agent.pipeline.catalog import Catalog
    from agent.pipeline.user_state import UserStore
    from agent.pipeline.values import Query, Scored
    from agent.serving.metrics import Metrics
    from plugins.summariser import Summariser

    items, _ = load()
    catalog = Catalog()
    for item in list(items.values())[:2000]:
        catalog.upsert(item)
    settings = load_settings(env={}, overrides={"load_entry_points": False})
    settings.plugins = {"summariser": {"base_url": "http://127.0.0.1:9/v1", "model": "m", "refresh_after_events": 5}}
    users = UserStore(50, 1_000_000)
    ctx = AgentContext(settings=settings, catalog=catalog, users=users, metrics=Metrics())
    plugin = Summariser()
    async with plugin.recsys_lifespan(ctx):
        rng = random.Random(1)
        events = []
        for i in range(n):
            user = users.get_or_create(f"u{rng.randrange(5000)}")
            slot = rng.randrange(catalog.size)
            user.recent.append(Interaction(slot=slot, type="view", ts=time.time(), signal=1.0))
            user.event_count += 1
            events.append(
                (Event(type="view", user_id=user.user_id, ts=time.time(), item_id=catalog.ids[slot]), user, slot)
            )
        started = time.perf_counter()
        for event, user, slot in events:
            plugin.recsys_apply_event(event, user, slot, catalog)
        apply_us = (time.perf_counter() - started) / n * 1e6
        user = users.get_or_create("reader")
        genres = sorted({c for item in list(items.values())[:2000] for c in item.categories})
        user.extras[PROFILE_KEY] = {
            "interests": genres[:6],
            "avoid": [],
            "summary": "s",
            "source": "llm",
            "generated_at": 0.0,
            "based_on_events": 0,
        }
        ranked = [Scored(slot=s, score=1.0, reasons=["trending now"]) for s in range(50)]
        query = Query(user=user, k=10, now=time.time(), catalog=catalog, n_candidates=50, exclude=set())
        started = time.perf_counter()
        for _ in range(2000):
            plugin.recsys_rerank(query, ranked)
        rerank_us = (time.perf_counter() - started) / 2000 * 1e6
        stats = plugin.scheduler.stats() if plugin.scheduler else {}
    print(
        f"recsys_apply_event: {apply_us:.1f} us per event over {n} events of 5,000 users; "
        f"recsys_rerank (50 candidates, 6 interests): {rerank_us:.1f} us; scheduler {stats}; {load_avg()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["throughput", "overload", "hotpath", "hooks"])
    parser.add_argument("--n", type=int, default=12, help="throughput: summaries per concurrency level")
    parser.add_argument("--length", type=int, default=8, help="throughput: items per history")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads (1 copes best with a busy CPU)")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=100.0, help="overload: events per second")
    parser.add_argument("--users", type=int, default=300)
    parser.add_argument("--pending", type=int, default=16, help="overload: max_pending_users")
    parser.add_argument("--events", type=int, default=1500)
    parser.add_argument("--items", type=int, default=1500)
    parser.add_argument("--without", default="", help="hotpath: comma-separated plugins to leave out, e.g. content")
    parser.add_argument(
        "--mode",
        choices=["off", "heuristic", "llm"],
        default="llm",
        help="hotpath: summariser off, heuristic only, or with the LLM",
    )
    parser.add_argument("--data-dir", type=Path, help="hotpath: data dir kept between runs (item embeddings)")
    args = parser.parse_args()
    if args.what == "hooks":
        asyncio.run(hooks(args.events * 100))
        return
    with tempfile.TemporaryDirectory() as log_dir, llama_server(Path(log_dir), threads=args.threads) as server:
        if args.what == "throughput":
            asyncio.run(throughput(server.base_url, args.n, args.length))
        elif args.what == "overload":
            asyncio.run(overload(server.base_url, args.seconds, args.rate, args.users, args.pending))
        else:
            without = [w for w in args.without.split(",") if w]
            # One mode per process (the embedder and the vector store are per-process singletons);
            # a --data-dir shared between runs keeps the item embeddings.
            data_dir = args.data_dir or Path(log_dir) / "data"
            asyncio.run(hotpath(server.base_url, args.events, args.items, args.rate, args.mode, without, data_dir))


if __name__ == "__main__":
    main()
