"""``recsys-agent replay``: the command line around :func:`agent.evaluation.replay.replay`."""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import orjson

from agent.cli.settings_flags import add_pipeline_flags, configure_logging, settings_from_args
from agent.config import ConfigError, Settings

# The loop is looked up on its own module at each call, so a stand-in set there (as a test
# does) is what the command runs.
from agent.evaluation import replay as replay_loop
from agent.evaluation.baselines import ALS_EVERY, ALS_FACTORS, BASELINES, DAY_S
from agent.evaluation.datasets import DatasetError, read_items
from agent.evaluation.events import load_events, select_events, shuffle_ties
from agent.evaluation.intervals import RESAMPLES
from agent.evaluation.profiling import profile_summary
from agent.evaluation.replay import TIES, TIES_BASKET, ReplayOptions
from agent.evaluation.report import ReplayResult, format_details, format_table, plot_report
from agent.hooks.manager import get_plugin_manager
from agent.pipeline.pipeline import Pipeline
from agent.wire.contract import Event, Item


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = "Prequential evaluation of the agent's pipeline on a recorded event stream, with baselines."
    parser.add_argument("--items", type=Path, required=True, help="items.jsonl (one Item per line)")
    parser.add_argument("--events", type=Path, required=True, help="events.jsonl (one Event per line, with ts)")
    parser.add_argument("--k", type=int, default=10, help="list length for hit rate and NDCG (default 10)")
    parser.add_argument("--report", type=Path, help="write the JSON report here")
    parser.add_argument("--plot", type=Path, help="write the PNG plot here (needs matplotlib: extra 'eval')")
    parser.add_argument("--limit", type=int, help="replay only the first N events (after --sample-users)")
    parser.add_argument(
        "--sample-users",
        type=float,
        metavar="FRACTION",
        help="replay only the events of this fraction of users (chosen by a hash of the id)",
    )
    parser.add_argument(
        "--baselines",
        default=",".join(BASELINES),
        help=f"comma-separated, from {', '.join(BASELINES)} (default all); empty for none",
    )
    parser.add_argument("--half-life-days", type=float, default=7.0, help="decayed popularity half-life (default 7)")
    parser.add_argument("--knn-window", type=int, default=10, help="item-kNN: recent items per user (default 10)")
    parser.add_argument(
        "--knn-similarity",
        choices=("cosine", "count"),
        default="cosine",
        help="item-kNN: cosine-normalised co-occurrence (default) or raw counts",
    )
    parser.add_argument(
        "--ties",
        choices=TIES,
        default=TIES_BASKET,
        help="basket (default): a user's events with one timestamp are one step, ranked once before any of "
        "them is applied and each scored against that list; order: one event per step, ties in replay order "
        "(the protocol before baskets, for comparison)",
    )
    parser.add_argument(
        "--shuffle-ties",
        type=int,
        metavar="SEED",
        help="put each user's events that share a timestamp in a random order (reproducible by SEED) before "
        "replaying: shows whether a figure depends on the order inside a basket",
    )
    parser.add_argument(
        "--als-every",
        type=int,
        default=ALS_EVERY,
        metavar="N",
        help=f"als baseline: retrain on everything seen so far every N positive events (default {ALS_EVERY:,})",
    )
    parser.add_argument(
        "--als-factors", type=int, default=ALS_FACTORS, help=f"als baseline: latent factors (default {ALS_FACTORS})"
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=RESAMPLES,
        metavar="N",
        help=f"resamples for the paired bootstrap intervals (default {RESAMPLES:,}; 0: no intervals)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=32,
        metavar="N",
        help="rank up to N consecutive steps of distinct users together before applying them, as the "
        "agent does under load (default 32; 1: one step at a time)",
    )
    parser.add_argument(
        "--inline-baselines",
        action="store_true",
        help="run the baselines in the event loop's process (default: a second process beside it)",
    )
    # Only the pipeline's settings: the replay runs in-process, with no NATS and no HTTP API.
    add_pipeline_flags(
        parser,
        log_level="WARNING",
        data_dir_help="plugin data directory (default: a temporary one; reuse one to keep item embeddings)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run the event loop under cProfile and print where the time goes (slows it down)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _options(args: argparse.Namespace) -> ReplayOptions:
    if args.k < 1:
        raise ValueError("--k must be at least 1")
    names = tuple(name.strip() for name in args.baselines.split(",") if name.strip())
    unknown = [name for name in names if name not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {', '.join(unknown)}; known: {', '.join(BASELINES)}")
    if args.half_life_days <= 0:
        raise ValueError("--half-life-days must be positive")
    if args.knn_window < 1:
        raise ValueError("--knn-window must be at least 1")
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be at least 1")
    if args.batch < 1:
        raise ValueError("--batch must be at least 1")
    if args.als_every < 1:
        raise ValueError("--als-every must be at least 1")
    if args.als_factors < 1:
        raise ValueError("--als-factors must be at least 1")
    if args.bootstrap < 0:
        raise ValueError("--bootstrap must not be negative")
    return ReplayOptions(
        k=args.k,
        baselines=names,
        half_life_s=args.half_life_days * DAY_S,
        knn_window=args.knn_window,
        knn_similarity=args.knn_similarity,
        baselines_process=not args.inline_baselines,
        progress=not args.no_progress,
        batch=args.batch,
        ties=args.ties,
        als_every=args.als_every,
        als_factors=args.als_factors,
        bootstrap=args.bootstrap,
    )


# built-in plugins that train models in the background: a replay makes them train inline
# (the event that triggers a round waits for it) unless the configuration says otherwise, so
# that a replay gets the same versions at the same events on every run
BACKGROUND_TRAINERS = ("factors", "ease", "sequence")


def inline_training(settings: Settings) -> Settings:
    plugins = {name: dict(table) for name, table in settings.plugins.items()}
    for name in BACKGROUND_TRAINERS:
        plugins.setdefault(name, {}).setdefault("training", "inline")
    return dataclasses.replace(settings, plugins=plugins)


async def _run_replay(
    settings: Settings, options: ReplayOptions, items: list[Item], events: list[Event], profiled: bool
) -> tuple[ReplayResult, cProfile.Profile | None]:
    settings = inline_training(settings)
    pipeline = Pipeline(settings, get_plugin_manager(settings))
    profile = cProfile.Profile() if profiled else None
    async with pipeline.running():
        result = await replay_loop.replay(pipeline, items, events, options, profiler=profile)
    return result, profile


def run_command(args: argparse.Namespace) -> int:
    try:
        options = _options(args)
        with tempfile.TemporaryDirectory(prefix="recsys-replay-") as scratch:
            # Not the data dir of the settings file or environment: that is the agent's, whose
            # local Qdrant store a running agent holds. A replay starts empty unless --data-dir.
            settings = settings_from_args(args, defaults={"data_dir": scratch})
            configure_logging(settings.log_level)
            started = time.perf_counter()
            items = read_items(args.items)
            events = load_events(args.events)
            if args.shuffle_ties is not None:
                events = shuffle_ties(events, args.shuffle_ties)
            events = select_events(events, sample_users=args.sample_users, limit=args.limit)
            load_s = time.perf_counter() - started
            print(f"loaded {len(items):,} items and {len(events):,} events in {load_s:.1f} s", file=sys.stderr)
            if not events:
                raise DatasetError(f"{args.events}: no events to replay")
            result, profile = asyncio.run(_run_replay(settings, options, items, events, args.profile))
    except (DatasetError, ValueError, ConfigError) as exc:
        print(f"recsys-agent replay: {exc}", file=sys.stderr)
        return 2
    result.timings_s["load"] = load_s
    report = result.report()
    if args.shuffle_ties is not None:
        report["shuffled_ties_seed"] = args.shuffle_ties
    print(f"catalog loaded in {result.timings_s['catalog']:.1f} s (not counted in events/s)")
    print(format_table(report))
    print(format_details(report))
    if result.first_rejection:
        print(f"first rejected event: {result.first_rejection}")
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY) + b"\n")
        print(f"report: {args.report}")
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot_report(result, args.plot)
        print(f"plot: {args.plot}")
    if profile is not None:
        print(profile_summary(profile))
    return 0
