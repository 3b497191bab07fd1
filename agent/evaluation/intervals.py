"""Paired bootstrap confidence intervals for a replay's NDCG and for the pipeline's ratio to the
best baseline.

The unit resampled is the user, not the evaluated event: one user's events are not independent
(a heavy user's taste weighs on hundreds of them), so resampling events would give intervals
that are too narrow. Each resample draws users with replacement and weighs every system's
events with the same draw (paired): the noise that the systems share (which users happen to be
in the data) cancels in the ratio, which is what a comparison of two systems on one stream
needs.

The bar in each resample is the best baseline *of that resample*: when two baselines are close,
which one is best is itself uncertain, and taking the maximum keeps that uncertainty in the
ratio's interval instead of fixing the winner from the full sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

RESAMPLES = 1_000
CONFIDENCE = 0.95
# resamples drawn at once: a (chunk x users) matrix of weights
_CHUNK = 100


@dataclass(frozen=True, slots=True)
class Interval:
    value: float
    low: float
    high: float

    def to_dict(self) -> dict[str, float | None]:
        return {"value": _finite(self.value), "low": _finite(self.low), "high": _finite(self.high)}


@dataclass(frozen=True, slots=True)
class BootstrapResult:
    """NDCG of every system and the pipeline's ratio to the best baseline, each with an interval."""

    resamples: int
    confidence: float
    users: int
    ndcg: dict[str, Interval]
    # the baseline with the best NDCG on the full sample (None without baselines)
    best_baseline: str | None
    ratio: Interval | None

    def to_dict(self) -> dict[str, object]:
        return {
            "method": "paired bootstrap over users (the same resample for every system), percentile interval; "
            "the ratio's bar is the best baseline of each resample",
            "resamples": self.resamples,
            "confidence": self.confidence,
            "users": self.users,
            "ndcg": {name: interval.to_dict() for name, interval in self.ndcg.items()},
            "best_baseline": self.best_baseline,
            "ratio_to_best_baseline": self.ratio.to_dict() if self.ratio is not None else None,
        }


def _finite(value: float) -> float | None:
    # JSON has no infinity or NaN: a ratio over a zero baseline is "no figure", not a number
    return float(value) if math.isfinite(value) else None


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), np.inf)


def paired_bootstrap(
    pipeline: np.ndarray,
    baselines: dict[str, np.ndarray],
    users: np.ndarray,
    *,
    pipeline_name: str = "pipeline",
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> BootstrapResult:
    """Intervals for the mean NDCG of ``pipeline`` and of each baseline, and for the ratio of the
    pipeline's mean to the best baseline's mean, resampling ``users`` (one code per evaluated
    event, aligned with every NDCG array). ``seed`` makes the intervals reproducible."""
    if resamples < 1:
        raise ValueError("resamples must be at least 1")
    if not 0.0 < confidence < 1.0:
        raise ValueError("confidence must be in (0, 1)")
    n_events = len(users)
    for name, values in {pipeline_name: pipeline, **baselines}.items():
        if len(values) != n_events:
            raise ValueError(f"{name}: {len(values)} scores for {n_events} evaluated events")
    names = [pipeline_name, *baselines]
    if n_events == 0:
        nothing = Interval(0.0, 0.0, 0.0)
        return BootstrapResult(resamples, confidence, 0, {name: nothing for name in names}, None, None)
    # Per user: the NDCG summed over their events, for each system, and their event count. A
    # resample's mean is then (weights @ sums) / (weights @ counts), with weights = how many
    # times each user was drawn.
    codes, index = np.unique(users, return_inverse=True)
    n_users = len(codes)
    sums = np.stack(
        [
            np.bincount(index, weights=np.asarray(values, dtype=np.float64), minlength=n_users)
            for values in (pipeline, *baselines.values())
        ]
    )
    counts = np.bincount(index, minlength=n_users).astype(np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty((len(names), resamples))
    for start in range(0, resamples, _CHUNK):
        size = min(_CHUNK, resamples - start)
        # row r: how many times resample r drew each user (n_users draws with replacement)
        draws = rng.integers(0, n_users, size=(size, n_users)) + (np.arange(size) * n_users)[:, None]
        weights = np.bincount(draws.ravel(), minlength=size * n_users).reshape(size, n_users).astype(np.float64)
        # every resample holds at least one user, so at least one event
        means[:, start : start + size] = (sums @ weights.T) / (weights @ counts)
    point = sums.sum(axis=1) / counts.sum()
    tail = (1.0 - confidence) / 2.0

    def interval(value: float, draws: np.ndarray) -> Interval:
        # draws over a baseline that scored 0 are infinite: interpolating between two is NaN
        with np.errstate(invalid="ignore"):
            low, high = np.quantile(draws, [tail, 1.0 - tail])
        return Interval(float(value), float(low), float(high))

    ndcg = {name: interval(point[i], means[i]) for i, name in enumerate(names)}
    if not baselines:
        return BootstrapResult(resamples, confidence, n_users, ndcg, None, None)
    best = 1 + int(np.argmax(point[1:]))
    ratio_value = float(_ratio(point[:1], point[best : best + 1])[0])
    ratio = interval(ratio_value, _ratio(means[0], means[1:].max(axis=0)))
    return BootstrapResult(resamples, confidence, n_users, ndcg, names[best], ratio)
