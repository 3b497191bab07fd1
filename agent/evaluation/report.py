"""What a replay measured and how it is shown: the result, its JSON report, the markdown table
and details printed by the command, and the plot."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.evaluation.intervals import BootstrapResult
from agent.evaluation.scoring import PIPELINE, Score


@dataclass
class ReplayResult:
    """What :func:`agent.evaluation.replay.replay` measured; :meth:`report` is its JSON form."""

    k: int
    events: int
    n_items: int
    pipeline: Score
    baselines: list[Score]
    counts: dict[str, int]
    source_hits: dict[str, int]
    rank_ms: np.ndarray
    apply_ms: np.ndarray
    latency_ms: np.ndarray
    timings_s: dict[str, float]
    plugins: list[str] = field(default_factory=list)
    first_rejection: str | None = None
    # what the fusion learned, by segment then source (empty without a learning fusion)
    fusion_weights: dict[str, dict[str, float]] = field(default_factory=dict)
    # the most steps ranked together and then applied together (1: one at a time), and how
    # many batches the stream made (a user's second step ends a batch early)
    batch: int = 1
    batches: int = 0
    # the tie protocol ("basket": a user's same-timestamp events are one step; "order": one
    # event, one step), how many steps the stream made and how many lists the pipeline ranked
    ties: str = "basket"
    steps: int = 0
    lists: int = 0
    intervals: BootstrapResult | None = None
    # per baseline that trains in batches (ALS): how often, and the seconds it took
    baseline_training: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def events_per_s(self) -> float:
        seconds = self.timings_s.get("replay", 0.0)
        return self.events / seconds if seconds > 0 else 0.0

    def report(self) -> dict[str, Any]:
        k = self.k
        hits = self.pipeline.hits
        intervals = self.intervals.to_dict() if self.intervals is not None else None
        return {
            "ties": self.ties,
            "events": self.events,
            "steps": self.steps,
            "lists": self.lists,
            "evaluated": self.pipeline.count,
            "k": k,
            "items": self.n_items,
            "metrics": self.pipeline.metrics(k),
            "baselines": {score.name: score.metrics(k) for score in self.baselines},
            "best_baseline": self.intervals.best_baseline if self.intervals is not None else _best(self.baselines, k),
            "ratio_to_best_baseline": intervals["ratio_to_best_baseline"] if intervals is not None else None,
            "intervals": intervals,
            "baseline_training": self.baseline_training,
            "sources": {
                name: {"share_of_hits": (count / hits if hits else 0.0), "hits": count}
                for name, count in sorted(self.source_hits.items())
            },
            "events_per_s": self.events_per_s,
            "batch": self.batch,
            # steps a batch (the unit of --batch), and events a step
            "mean_batch": round(self.steps / self.batches, 2) if self.batches else 0.0,
            "mean_step": round(self.events / self.steps, 2) if self.steps else 0.0,
            "latency_ms": _percentiles(self.latency_ms),
            "stage_latency_ms": {"rank": _percentiles(self.rank_ms), "apply": _percentiles(self.apply_ms)},
            "counts": dict(self.counts),
            "time_s": {name: round(value, 3) for name, value in self.timings_s.items()},
            "plugins": self.plugins,
            "fusion_weights": self.fusion_weights,
            "rules": {
                "order": "ts, then user, then item",
                "steps": TIE_RULES.get(self.ties, self.ties),
                "evaluated": "events of users with history before the step; not repeats (of earlier steps or "
                "of the same step), dislike or skip",
                "baseline_ties": "catalog order",
                "batch": "consecutive steps of distinct users ranked together, then applied together; "
                "baselines one step at a time",
            },
        }


TIE_RULES = {
    "basket": "a user's events with one timestamp are one step: one list ranked before any of them is applied, "
    "each scored against it, then all applied",
    "order": "every event is a step: ties in replay order, each ranked after the tied events before it were applied",
}


def _best(baselines: list[Score], k: int) -> str | None:
    if not baselines:
        return None
    return max(baselines, key=lambda score: score.metrics(k)[f"ndcg@{k}"]).name


def _percentiles(values_ms: np.ndarray) -> dict[str, float]:
    if len(values_ms) == 0:
        return {"p50": 0.0, "p99": 0.0, "mean": 0.0, "max": 0.0}
    p50, p99 = np.percentile(values_ms, [50, 99])
    return {"p50": float(p50), "p99": float(p99), "mean": float(values_ms.mean()), "max": float(values_ms.max())}


def format_table(report: dict[str, Any]) -> str:
    """The dev-set table (markdown): pipeline and baselines, hit rate and NDCG at k with its
    interval, the ratio to the best baseline with its interval, events/s."""
    k = report["k"]
    rows = [(PIPELINE, report["metrics"])] + list(report["baselines"].items())
    intervals = report.get("intervals")
    confidence = f"{100 * intervals['confidence']:.0f} %" if intervals else ""
    lines = [
        f"ties: {report['ties']} ({TIE_RULES.get(report['ties'], report['ties'])})",
        "",
        f"| system | hit rate@{k} | NDCG@{k} |" + (f" NDCG@{k} {confidence} interval |" if intervals else ""),
        "|---|---:|---:|" + ("---:|" if intervals else ""),
    ]
    for name, metrics in rows:
        line = f"| {name} | {metrics[f'hit_rate@{k}']:.4f} | {metrics[f'ndcg@{k}']:.4f} |"
        if intervals:
            line += f" {_span(intervals['ndcg'].get(name))} |"
        lines.append(line)
    lines.append("")
    ratio = report.get("ratio_to_best_baseline")
    if ratio is not None:
        lines.append(
            f"pipeline / best baseline ({report['best_baseline']}): {_figure(ratio['value'], 3)} "
            f"[{_span(ratio, 3)}] ({confidence} interval, paired bootstrap over {intervals['users']:,} users, "
            f"{intervals['resamples']:,} resamples)"
        )
    latency = report["latency_ms"]
    lines.append(
        f"{report['events']:,} events in {report['steps']:,} steps ({report['lists']:,} lists ranked), "
        f"{report['evaluated']:,} evaluated, {report['items']:,} items; "
        f"{report['events_per_s']:,.0f} events/s at batch {report['batch']} (mean {report['mean_batch']:.1f} steps); "
        f"latency (rank + apply) p50 {latency['p50']:.2f} ms, p99 {latency['p99']:.2f} ms"
    )
    if report["batch"] > 1:
        # a batch's time shared by its events: what an event costs, not how long one waited
        lines.append("(batched: an event's latency is its share of its batch's rank and apply time)")
    return "\n".join(lines)


def _figure(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _span(interval: dict[str, float | None] | None, digits: int = 4) -> str:
    if interval is None:
        return ""
    return f"{_figure(interval['low'], digits)} - {_figure(interval['high'], digits)}"


def format_details(report: dict[str, Any]) -> str:
    times = report["time_s"]
    replay_s = times.get("replay", 0.0) or 1.0
    parts = [
        f"{name} {times[name]:.1f} s ({100 * times[name] / replay_s:.0f}%)"
        for name in (
            "pipeline_rank",
            "pipeline_apply",
            "pipeline_background",
            "baselines",
            "baselines_wait",
            "harness",
        )
        if name in times
    ]
    lines = [
        f"time: load {times.get('load', 0.0):.1f} s, catalog {times.get('catalog', 0.0):.1f} s, "
        f"replay {times.get('replay', 0.0):.1f} s = " + ", ".join(parts)
    ]
    if "baselines_in_parallel" in times:
        lines.append(
            f"baselines ran in a second process: {times['baselines_in_parallel']:.1f} s of work beside the event loop"
        )
    for name, training in report.get("baseline_training", {}).items():
        lines.append(f"{name}: trained {training['fits']:.0f} times, {training['seconds']:.1f} s in all")
    if "bootstrap" in times:
        lines.append(f"bootstrap intervals: {times['bootstrap']:.1f} s (after the replay, not in events/s)")
    stages = report["stage_latency_ms"]
    lines.append(
        f"stage latency: rank p50 {stages['rank']['p50']:.2f} ms p99 {stages['rank']['p99']:.2f} ms; "
        f"apply p50 {stages['apply']['p50']:.3f} ms p99 {stages['apply']['p99']:.3f} ms"
    )
    if report["sources"]:
        lines.append(
            "share of hits: "
            + ", ".join(f"{name} {value['share_of_hits']:.2f}" for name, value in report["sources"].items())
        )
    for segment, table in report.get("fusion_weights", {}).items():
        lines.append(
            f"fusion weights ({segment}): "
            + ", ".join(f"{name} {value:.2f}" for name, value in sorted(table.items(), key=lambda kv: -kv[1]))
        )
    counts = report["counts"]
    lines.append(
        "not evaluated: "
        + ", ".join(
            f"{name} {counts[name]:,}"
            for name in ("no_history", "repeats", "negative_feedback", "rejected", "duplicates")
        )
    )
    return "\n".join(lines)


def _rolling(values: np.ndarray, window: int) -> np.ndarray:
    sums = np.cumsum(np.concatenate(([0.0], values.astype(np.float64))))
    return (sums[window:] - sums[:-window]) / window


def plot_report(result: ReplayResult, path: Path) -> None:
    """Rolling hit rate and NDCG over the stream for every system, and the latency histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = result.k
    scores = [result.pipeline, *result.baselines]
    evaluated = result.pipeline.count
    window = max(1, min(5_000, max(evaluated // 40, 200), evaluated))
    fig, axes = plt.subplots(3, 1, figsize=(11, 12), constrained_layout=True)
    for score in scores:
        ndcg = score.ndcg[: score.count]
        if score.count < window:
            continue
        x = np.arange(window, score.count + 1)
        style = {"linewidth": 2.2, "color": "black"} if score.name == PIPELINE else {"linewidth": 1.2}
        axes[0].plot(x, _rolling(ndcg > 0, window), label=score.name, **style)
        axes[1].plot(x, _rolling(ndcg, window), label=score.name, **style)
    for axis, metric in zip(axes[:2], (f"hit rate@{k}", f"NDCG@{k}")):
        axis.set_title(f"{metric}, rolling mean over {window:,} evaluated events")
        axis.set_xlabel("evaluated events (time order)")
        axis.set_ylabel(metric)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        axis.legend(loc="upper left")
    latency = result.latency_ms
    axis = axes[2]
    if len(latency):
        low, high = max(float(latency.min()), 1e-3), max(float(latency.max()), 1e-2)
        bins = np.logspace(math.log10(low), math.log10(high * 1.01), 60)
        axis.hist(latency, bins=bins, color="tab:gray")
        axis.set_xscale("log")
        for name, value, color in (
            ("p50", np.percentile(latency, 50), "tab:blue"),
            ("p99", np.percentile(latency, 99), "tab:red"),
        ):
            axis.axvline(value, color=color, linestyle="--", label=f"{name} {value:.2f} ms")
        axis.legend()
    axis.set_title(f"pipeline latency per evaluated event (rank + apply), {result.events_per_s:,.0f} events/s overall")
    axis.set_xlabel("ms (log scale)")
    axis.set_ylabel("events")
    fig.savefig(path, dpi=110)
    plt.close(fig)
