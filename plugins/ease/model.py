"""Fitting the item-to-item regression on the window, and scoring users with it.

EASE (Steck, "Embarrassingly Shallow Autoencoders for Sparse Data", WWW 2019): with X the
binary user x item matrix of the window, the item weights B minimise
``||X - X B||^2 + lambda ||B||^2`` with a zero diagonal (no item explains itself), whose
closed form is

    P = (X^T X + lambda I)^-1,   B_ij = -P_ij / P_jj,   B_jj = 0

A user's score of item j is the sum of B_ij over the items i the user engaged with: no user
is stored, so a user's newest events count at once and a user the model never saw is served.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.pipeline.window_models import FitJob
from plugins.ease.options import EaseOptions


@dataclass(frozen=True, slots=True)
class Version:
    """One fit's weights; served whole, never modified."""

    number: int
    # modelled x modelled float32, zero diagonal: row i holds what item i says of every other
    weights: np.ndarray
    # the catalog slots modelled, ascending: row i of ``weights`` is slot modelled[i]
    modelled: np.ndarray
    # catalog slot -> row of ``weights`` (-1: not modelled); as long as the catalog at the fit;
    # only modelled items are proposed
    column: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.column)

    def columns_of(self, slots: np.ndarray) -> np.ndarray:
        """Rows of ``weights`` for catalog slots (-1 for those it does not model)."""
        found = np.full(len(slots), -1, dtype=np.int64)
        inside = slots < self.size
        found[inside] = self.column[slots[inside]]
        return found


def fit(job: FitJob, options: EaseOptions) -> Version:
    """The closed form on the job's events, in float32 with BLAS held to one thread: a fit
    takes one core and leaves the other to the hot path."""
    import scipy.sparse
    from threadpoolctl import threadpool_limits

    started = time.perf_counter()
    cpu_started = time.thread_time()
    codes, users = np.unique(job.users, return_inverse=True)
    # binary: a (user, item) pair engaged once or ten times is one
    pairs = np.unique(users.astype(np.int64) * job.n_items + job.slots)
    pair_users, pair_slots = np.divmod(pairs, job.n_items)
    engaged = np.bincount(pair_slots, minlength=job.n_items)
    # the most engaged items, at most max_items of them (ties to the lower slot)
    chosen = np.argsort(-engaged, kind="stable")[: options.max_items]
    modelled = np.sort(chosen[engaged[chosen] > 0])
    column = np.full(job.n_items, -1, dtype=np.int64)
    column[modelled] = np.arange(len(modelled))
    keep = column[pair_slots] >= 0
    matrix = scipy.sparse.csr_matrix(
        (np.ones(int(keep.sum()), dtype=np.float32), (pair_users[keep], column[pair_slots[keep]])),
        shape=(len(codes), len(modelled)),
    )
    with threadpool_limits(limits=1, user_api="blas"):
        gram = (matrix.T @ matrix).toarray().astype(np.float32)
        penalty = options.regularization * float(np.diag(gram).mean())
        gram[np.diag_indices_from(gram)] += penalty
        # numpy's inverse, not scipy's Cholesky (potrf and potri, a third of the arithmetic):
        # scipy's LAPACK wrappers hold the GIL for the whole call, which froze the event loop
        # for seconds at 4,000 items, where numpy's releases it (tests/bench/bench_fits.py)
        weights = np.linalg.inv(gram)
    del gram
    weights /= -np.diag(weights)[None, :]
    weights[np.diag_indices_from(weights)] = 0.0
    return Version(
        number=job.number,
        weights=np.ascontiguousarray(weights, dtype=np.float32),
        modelled=modelled,
        column=column,
        info={
            "events_seen": job.events_seen,
            "window_events": len(job.users),
            "users": len(codes),
            "items": len(modelled),
            "regularization": round(penalty, 3),
            "fit_s": round(time.perf_counter() - started, 3),
            "fit_cpu_s": round(time.thread_time() - cpu_started, 3),
        },
    )


def history_of(interactions: Any, version: Version, recency: float) -> tuple[np.ndarray, np.ndarray]:
    """(rows of ``weights``, weights) of the distinct items of the user's positive interactions
    that the version models; with ``recency`` < 1 an item weighs recency per newer positive
    interaction after its latest one."""
    slots = [interaction.slot for interaction in interactions if interaction.signal > 0]
    if not slots:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
    # newest first: np.unique keeps each item's first position, its latest interaction
    newest_first = np.asarray(slots[::-1], dtype=np.int64)
    unique, first = np.unique(newest_first, return_index=True)
    rows = version.columns_of(unique)
    keep = rows >= 0
    weights = (recency ** first[keep]).astype(np.float32) if recency < 1.0 else np.ones(int(keep.sum()), np.float32)
    return rows[keep], weights
