"""Fitting implicit's ALS on the window, and folding users in at query time.

A fit gives item factors only: users are never stored. At query time each user's factors are
the closed-form least-squares solution of implicit-feedback ALS (Hu, Koren & Volinsky) given
the item factors, from the user's current history, so a user's newest events count at once
and a user the model never saw is served too:

    (Y^T C_u Y + reg I) x_u = Y^T C_u p_u,   Y^T C_u Y = Y^T Y + Y_u^T (C_u - I) Y_u

with c = alpha * r for the items the user engaged with (r: summed positive signal) and 1
elsewhere: what implicit's ``recalculate_user`` computes, solved here for a whole batch at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.pipeline.window_models import FitJob
from plugins.factors.options import FactorsOptions


@dataclass(frozen=True, slots=True)
class Version:
    """Item factors of one fit; served whole, never modified."""

    number: int
    # items x factors, float32; rows of items no event of the window named are zero
    item_factors: np.ndarray
    # Y^T Y, float64: the part of every user's system that does not depend on the user
    gram: np.ndarray
    # items the window named: only these are proposed (the others score 0 for everyone)
    rankable: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.rankable)


def fit(job: FitJob, options: FactorsOptions) -> Version:
    """Train a fresh model on the job's events (in a worker thread, or inline).

    implicit's CPU fit runs in native code with ``num_threads=1``; BLAS is held to one thread
    for the fit as implicit asks (its OpenBLAS pool otherwise fights the fit's own loop), so a
    fit takes one core and leaves the other to the hot path.
    """
    import scipy.sparse

    # implicit before the controller: a controller limits only BLAS libraries already loaded
    from implicit.als import AlternatingLeastSquares
    from threadpoolctl import ThreadpoolController

    started = time.perf_counter()
    cpu_started = time.thread_time()
    codes, rows = np.unique(job.users, return_inverse=True)
    # repeated (user, item) pairs are summed: the confidence grows with the engagement
    values = job.signals if options.confidence == "signal" else np.ones(len(job.signals))
    matrix = scipy.sparse.csr_matrix(
        (values.astype(np.float32), (rows, job.slots)), shape=(len(codes), job.n_items), dtype=np.float32
    )
    with ThreadpoolController().limit(limits=1, user_api="blas"):
        model = AlternatingLeastSquares(
            factors=options.factors,
            regularization=options.regularization,
            alpha=options.alpha,
            iterations=options.iterations,
            use_gpu=False,
            num_threads=1,
            random_state=options.seed + job.number,
        )
        model.fit(matrix, show_progress=False)
    items = np.ascontiguousarray(model.item_factors, dtype=np.float32)
    rankable = np.bincount(job.slots, minlength=job.n_items)[: job.n_items] > 0
    items[~rankable] = 0.0
    as64 = items.astype(np.float64)
    return Version(
        number=job.number,
        item_factors=items,
        gram=as64.T @ as64,
        rankable=rankable,
        info={
            "events_seen": job.events_seen,
            "window_events": len(job.users),
            "users": len(codes),
            "items": int(rankable.sum()),
            "fit_s": round(time.perf_counter() - started, 3),
            "fit_cpu_s": round(time.thread_time() - cpu_started, 3),
        },
    )


def fold_in(
    version: Version, histories: list[tuple[np.ndarray, np.ndarray]], regularization: float, alpha: float
) -> np.ndarray:
    """User factors (users x factors, float64) from (slots, weights) per user: one batched
    solve. A user with no item the version knows gets zeros."""
    factors = version.item_factors.shape[1]
    n = len(histories)
    systems = np.broadcast_to(version.gram + regularization * np.eye(factors), (n, factors, factors)).copy()
    targets = np.zeros((n, factors))
    for row, (slots, weights) in enumerate(histories):
        if not len(slots):
            continue
        rows = version.item_factors[slots].astype(np.float64)
        confidence = alpha * weights
        systems[row] += rows.T @ ((confidence - 1.0)[:, None] * rows)
        targets[row] = confidence @ rows
    return np.linalg.solve(systems, targets[:, :, None])[:, :, 0]


def history_of(
    interactions: Any, version: Version, recency: float, count: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(slots, summed weights) of the positive interactions the version can read (each weighs
    its signal, or 1 with ``count``); with ``recency`` < 1 each is weighed down by recency
    per newer positive interaction."""
    slots: list[int] = []
    weights: list[float] = []
    rankable, size = version.rankable, version.size
    for interaction in interactions:
        if interaction.signal > 0:
            slots.append(interaction.slot)
            weights.append(1.0 if count else interaction.signal)
    if not slots:
        return np.empty(0, dtype=np.int64), np.empty(0)
    found = np.asarray(slots, dtype=np.int64)
    signal = np.asarray(weights, dtype=np.float64)
    if recency < 1.0:
        # the newest interaction is the last of ``recent``
        signal = signal * recency ** np.arange(len(found) - 1, -1, -1, dtype=np.float64)
    keep = found < size
    keep[keep] = rankable[found[keep]]
    found, signal = found[keep], signal[keep]
    if not len(found):
        return found, signal
    unique, inverse = np.unique(found, return_inverse=True)
    return unique, np.bincount(inverse, weights=signal)
