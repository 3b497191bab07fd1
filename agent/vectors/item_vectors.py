"""An in-memory, slot-indexed copy of the item vectors held in Qdrant, and search over it.

Measured on the 2-core dev machine (10.5k items): a query through qdrant-client's local mode
costs about 13 ms; a full float32 scan of 384-d vectors about 1.7 ms; a scan of a 64-d
projection about 0.12 ms. Search therefore scans the projection onto the catalog's top
principal directions and rescores the best few hundred exactly with the full vectors. The copy
is rebuilt from Qdrant at start, so Qdrant stays the store of record.

Search answers many query vectors at once (a batch of users): one matrix product scans the
projection for all of them, and a row's answer never depends on the other rows, bit for bit
(see :meth:`ItemVectors.search_rows`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from agent.pipeline.catalog import grow

REDUCED_DIMS = 64
# float32 holds every whole number up to 2**24 exactly
EXACT_INTEGERS = 1 << 24
# below this many query rows the scan is one matrix-vector product per row: BLAS's matrix
# product packs the whole projected catalog first, which only pays off for several rows
SCAN_PRODUCT_FROM = 6
# rows scanned by one matrix product: at most this many scores (see search_rows)
SCAN_CELLS = 1 << 20
# rows whose scan is masked, selected from and rescored together (see search_rows)
SEARCH_BLOCK = 16
# top_per_row selects from a sample of every SAMPLE_STRIDE-th column first in rows of at least
# SAMPLE_FROM times the number it selects
SAMPLE_STRIDE = 8
SAMPLE_FROM = 16
# ...except in a batch of so few scores that its dozen array calls cost more than reading every
# column (one row of a few thousand: 14 against 28 us at 4,000 columns on the AMD EPYC machine)
FULL_SELECTION_CELLS = 12_000
# exact rescoring of this many times the requested count keeps the projection's error harmless
RESCORE_FACTOR = 4
# the projection is refitted once the catalog has grown by this factor since the last fit
REFIT_GROWTH = 2.0
FIT_SAMPLE = 8_192


class ItemVectors:
    """Vectors by slot, with a projection for fast approximate scans.

    Thread rule: every method runs on the event loop's thread except :meth:`fit_projection`,
    which only reads and may run in a worker thread; :meth:`install_projection` then adopts its
    result on the loop's thread, redoing the rows that changed meanwhile.
    """

    def __init__(self, dim: int, reduced_dims: int = REDUCED_DIMS) -> None:
        self.dim = dim
        self.reduced_dims = reduced_dims if reduced_dims < dim else 0
        self._matrix = np.zeros((1024, dim), dtype=np.float32)
        self._present = np.zeros(1024, dtype=bool)
        self._basis: np.ndarray | None = None
        self._reduced = np.zeros((1024, max(self.reduced_dims, 1)), dtype=np.float32)
        # The projection on a grid of whole numbers, one column per slot, which is what the scan
        # multiplies: with coordinates of at most ``_level`` (a unit vector's projected
        # coordinates lie in [-1, 1]) every product and partial sum of a scan is a whole number
        # within 2**24, which float32 holds exactly. The scan's scores are therefore the same
        # in any order of summation: for one query row or many, whichever product BLAS picks.
        # The grid's step (1/511 for 64 dims) is far below the projection's own error, and the
        # shortlist is rescored exactly anyway.
        self._level = math.isqrt(EXACT_INTEGERS // max(self.reduced_dims, 1)) - 1
        self._grid = np.zeros((max(self.reduced_dims, 1), 1024), dtype=np.float32)
        self._fitted_on = 0
        # slots set or removed since the current fit started (their reduced rows are redone);
        # recorded only while a fit runs
        self._changed: list[int] = []
        self._fitting = False
        self.count = 0
        self.hashes: dict[int, str] = {}

    def _ensure(self, size: int) -> None:
        self._matrix = grow(self._matrix, size)
        self._present = grow(self._present, size, fill=False)
        self._reduced = grow(self._reduced, size)
        if self._grid.shape[1] < size:
            self._grid = np.ascontiguousarray(grow(self._grid.T, size).T)

    def _on_grid(self, reduced: np.ndarray) -> np.ndarray:
        """Projected item rows as grid columns (see ``_grid``); a broken vector (NaN) scores 0."""
        on_grid = np.rint(np.clip(np.nan_to_num(reduced.T), -1.0, 1.0) * self._level)
        return np.ascontiguousarray(on_grid, dtype=np.float32)

    def set(self, slots: list[int], vectors: np.ndarray, hashes: list[str]) -> None:
        if not slots:
            return
        self._ensure(max(slots) + 1)
        self.count += int((~self._present[slots]).sum())
        self._matrix[slots] = vectors
        self._present[slots] = True
        for slot, content_hash in zip(slots, hashes, strict=True):
            self.hashes[slot] = content_hash
        if self._basis is not None:
            reduced = vectors @ self._basis
            self._reduced[slots] = reduced
            self._grid[:, slots] = self._on_grid(reduced)
        if self._fitting:
            self._changed.extend(slots)

    def remove(self, slot: int) -> None:
        if self.has(slot):
            self._present[slot] = False
            self._matrix[slot] = 0.0
            self._reduced[slot] = 0.0
            self._grid[:, slot] = 0.0
            self.count -= 1
            if self._fitting:
                self._changed.append(slot)
        self.hashes.pop(slot, None)

    def has(self, slot: int) -> bool:
        return slot < len(self._present) and bool(self._present[slot])

    def get(self, slot: int) -> np.ndarray | None:
        return self._matrix[slot] if self.has(slot) else None

    def rows(self, slots: np.ndarray) -> np.ndarray:
        return self._matrix[slots]

    def present(self, size: int) -> np.ndarray:
        self._ensure(size)
        return self._present[:size]

    def scorer(self, query: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        """A function from slots to their (approximate, once projected) cosine with ``query``.

        For scoring a few hundred known candidates: the projected rows are a sixth of the full
        ones, and gathering rows, not arithmetic, is what costs here."""
        basis, reduced, matrix = self._basis, self._reduced, self._matrix
        if basis is None:
            full = np.asarray(query, dtype=np.float32)
            return lambda slots: matrix[slots] @ full
        projected = np.asarray(query, dtype=np.float32) @ basis
        return lambda slots: reduced[slots] @ projected

    @property
    def capacity(self) -> int:
        return len(self._matrix)

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        """(slots with a vector, their vectors for similarity: projected when a projection is
        fitted, else full); copies, so a worker thread may use them while the loop writes."""
        slots = np.flatnonzero(self._present)
        source = self._reduced if self._basis is not None else self._matrix
        return slots, source[slots]

    def needs_projection(self) -> bool:
        """Whether the catalog is big enough for a projection and has grown since the last fit."""
        if not self.reduced_dims or self.count < 4 * self.reduced_dims:
            return False
        return self._basis is None or self.count >= self._fitted_on * REFIT_GROWTH

    def fit_projection(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Compute (basis, reduced rows, their grid, count); reads only, so it may run in a
        worker thread. Call :meth:`start_fit` on the loop's thread first."""
        matrix, present = self._matrix, self._present
        slots = np.flatnonzero(present)
        rng = np.random.default_rng(0)
        sample = slots if len(slots) <= FIT_SAMPLE else rng.choice(slots, FIT_SAMPLE, replace=False)
        # Uncentred SVD: the top right-singular vectors preserve dot products best.
        _, _, vt = np.linalg.svd(matrix[sample], full_matrices=False)
        basis = np.ascontiguousarray(vt[: self.reduced_dims].T, dtype=np.float32)
        reduced = np.zeros((len(matrix), self.reduced_dims), dtype=np.float32)
        reduced[slots] = matrix[slots] @ basis
        return basis, reduced, self._on_grid(reduced), len(slots)

    def refit(self) -> None:
        """Fit and install a projection now, on the calling thread."""
        self.start_fit()
        self.install_projection(self.fit_projection())

    def start_fit(self) -> None:
        self._changed = []
        self._fitting = True

    def cancel_fit(self) -> None:
        self._changed = []
        self._fitting = False

    def install_projection(self, fitted: tuple[np.ndarray, np.ndarray, np.ndarray, int]) -> None:
        basis, reduced, on_grid, count = fitted
        reduced = grow(reduced, len(self._matrix))
        on_grid = np.ascontiguousarray(grow(on_grid.T, len(self._matrix)).T)
        if self._changed:
            changed = np.unique(np.array(self._changed, dtype=np.int64))
            reduced[changed] = self._matrix[changed] @ basis
            on_grid[:, changed] = self._on_grid(reduced[changed])
        self._basis, self._reduced, self._grid, self._fitted_on = basis, reduced, on_grid, count
        self._changed = []
        self._fitting = False

    def search(self, query: np.ndarray, n: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` best slots by cosine (vectors are normalised) among ``allowed``, best first."""
        return self.search_rows(np.asarray(query, dtype=np.float32)[None, :], n, allowed)[0]

    def search_many(
        self, queries: list[np.ndarray], n: int, allowed: np.ndarray
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """:meth:`search` for several queries sharing one mask."""
        return self.search_rows(np.array(queries, dtype=np.float32), n, allowed) if queries else []

    def search_rows(self, queries: np.ndarray, n: int, allowed: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """:meth:`search` for each row of ``queries`` (rows x dim), among the slots that its row
        of ``allowed`` lets through (rows x slots; or one mask for every row).

        One scan of the projection for all rows, then exact rescoring of each row's shortlist
        (an exact scan until a projection is fitted). A row's answer depends on that row and
        its mask alone, bit for bit, so a batch of users gets what each user would get alone:
        the scan is exact arithmetic (see ``_grid``), ties go to the lower slot
        (:func:`top_per_row`), and the floating-point products run row by row in shapes that
        do not depend on the batch.
        """
        queries = np.asarray(queries, dtype=np.float32)
        if not np.isfinite(queries).all():
            queries = np.nan_to_num(queries, nan=0.0, posinf=0.0, neginf=0.0)  # as a query pointing nowhere
        rows, size = len(queries), allowed.shape[-1]
        self._ensure(size)
        n = min(n, size)
        if rows == 0 or n <= 0:
            return [(np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)) for _ in range(rows)]
        allowed = np.broadcast_to(allowed, (rows, size))
        present = self._present[:size]
        found: list[tuple[np.ndarray, np.ndarray]] = []
        # The scan's matrix product copies (packs) the whole projected catalog at every call:
        # it takes as many rows at once as SCAN_CELLS scores allow. The rest (masks, selection,
        # rescoring) goes a block of rows at a time, whose arrays stay in the CPU's cache.
        chunk = max(SEARCH_BLOCK, SCAN_CELLS // size)
        for start in range(0, rows, chunk):
            stop = min(rows, start + chunk)
            approx = None if self._basis is None else self._scan(queries[start:stop], size)
            for first in range(start, stop, SEARCH_BLOCK):
                block = slice(first, min(stop, first + SEARCH_BLOCK))
                scanned = None if approx is None else approx[first - start : block.stop - start]
                found += self._search_block(queries[block], n, ~(allowed[block] & present), scanned)
        return found

    def _search_block(
        self, queries: np.ndarray, n: int, blocked: np.ndarray, approx: np.ndarray | None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """:meth:`search_rows` for a few rows: ``blocked``, the slots each row may not have;
        ``approx``, the rows' scan (None before a projection is fitted)."""
        size = blocked.shape[1]
        # (rows, dim, 1): numpy multiplies each row on its own by this operand (a matrix-vector
        # product per row), never as one matrix product whose rounding depends on the batch
        columns = queries[:, :, None]
        if approx is None:
            scores = np.matmul(self._matrix[:size], columns)[:, :, 0]
            np.copyto(scores, -np.inf, where=blocked)
            shortlist = top_per_row(scores, n)
            scores = np.take_along_axis(scores, shortlist, axis=1)
        else:
            np.copyto(approx, -np.inf, where=blocked)
            shortlist = top_per_row(approx, min(n * RESCORE_FACTOR, size))
            scores = np.matmul(np.take(self._matrix, shortlist, axis=0), columns)[:, :, 0]
            # a shortlist holds slots not allowed only where too few are allowed
            scores[np.take_along_axis(blocked, shortlist, axis=1)] = -np.inf
        # best first; a shortlist is in slot order, so the stable sort sends ties to the lower slot
        order = np.argsort(-scores, axis=1, kind="stable")[:, :n]
        best = np.take_along_axis(shortlist, order, axis=1)
        scores = np.take_along_axis(scores, order, axis=1)
        if np.isfinite(scores).all():
            return list(zip(best, scores, strict=True))
        # too few allowed slots for some rows: those not allowed sort last
        return [
            (row_slots[keep], row_scores[keep])
            for row_slots, row_scores, keep in zip(best, scores, np.isfinite(scores), strict=True)
        ]

    def _scan(self, queries: np.ndarray, size: int) -> np.ndarray:
        """Approximate scores (rows x slots) of every slot for each query row, on the grid."""
        assert self._basis is not None
        projected = np.matmul(queries[:, None, :], self._basis)[:, 0, :]
        # each row scaled to the grid on its own: a positive factor per row keeps its order
        peak = np.abs(projected).max(axis=1, keepdims=True)
        scale = np.divide(self._level, peak, out=np.zeros_like(peak), where=peak > 0)
        on_grid = np.clip(np.rint(projected * scale), -self._level, self._level)
        grid = self._grid[:, :size]
        if len(on_grid) < SCAN_PRODUCT_FROM:
            return np.stack([row @ grid for row in on_grid])
        return on_grid @ grid


def top_per_row(scores: np.ndarray, m: int) -> np.ndarray:
    """Columns of the ``m`` highest values in each row of ``scores`` (rows x width), in column
    order; of equal values the lower columns first.

    What a row gets depends on its values alone: not on the other rows, nor on how a selection
    algorithm happens to break ties (``argpartition``'s choice among equal values may change
    with the array it is given).
    """
    rows, width = scores.shape
    m = min(m, width)
    if m <= 0:
        return np.empty((rows, 0), dtype=np.int64)
    if m == width:
        return np.broadcast_to(np.arange(width), (rows, width)).copy()
    if width < SAMPLE_FROM * m or rows * width <= FULL_SELECTION_CELLS:
        return _top_columns(scores, m)
    # Selecting in a whole row of a big catalog costs more than everything else in a search.
    # A value that a sample of the row's columns reaches about 2m / SAMPLE_STRIDE times is
    # reached by about 2m columns of the row: the m highest are among those, so only those
    # are selected from. A row where fewer than m reach it (unlikely) keeps every column.
    sample = scores[:, ::SAMPLE_STRIDE]
    rank = min(sample.shape[1], 2 * m // SAMPLE_STRIDE + 4)
    floor = np.partition(sample, sample.shape[1] - rank, axis=1)[:, sample.shape[1] - rank, None]
    reached = scores >= floor
    flat, starts = _flat_nonzero(reached)
    short = np.diff(starts) < m
    if short.any():
        reached[short] = True
        flat, starts = _flat_nonzero(reached)
    counts = np.diff(starts)
    # the reaching columns of each row, in column order, padded (to the right) with the
    # lowest value, which the selection below takes only after every column of the row
    row = flat // width
    place = np.arange(len(flat)) - starts[row]
    columns = np.zeros((rows, int(counts.max())), dtype=np.int64)
    values = np.full(columns.shape, -np.inf, dtype=scores.dtype)
    columns[row, place] = flat - row * width
    values[row, place] = scores.ravel()[flat]
    if values.shape[1] == m:
        return columns
    return np.take_along_axis(columns, _top_columns(values, m), axis=1)


def top_allowed(
    scores: np.ndarray, masks: list[np.ndarray], rankable: np.ndarray, counts: list[int]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each row's best slots and scores, best first (ties to the lower slot): at most
    ``counts[row]`` of the slots that its mask (``Query.allowed``, which may be shorter or
    longer than a row) and ``rankable`` both let through. ``scores`` (rows x slots, a model's
    scores of every slot for a batch of users) is overwritten where blocked. One selection for
    the batch; a row's answer depends on that row alone."""
    size = scores.shape[1]
    for row, allowed in zip(scores, masks, strict=True):
        within = min(len(allowed), size)
        blocked = np.ones(size, dtype=bool)
        np.logical_not(allowed[:within] & rankable[:within], out=blocked[:within])
        np.copyto(row, -np.inf, where=blocked)
    columns = top_per_row(scores, max(counts))
    values = np.take_along_axis(scores, columns, axis=1)
    # a selection is in slot order, so the stable sort sends ties to the lower slot
    order = np.argsort(-values, axis=1, kind="stable")
    columns = np.take_along_axis(columns, order, axis=1)
    values = np.take_along_axis(values, order, axis=1)
    found = []
    for row_slots, row_scores, n in zip(columns, values, counts, strict=True):
        keep = np.isfinite(row_scores[:n])
        found.append((row_slots[:n][keep].astype(np.int64), row_scores[:n][keep]))
    return found


def _top_columns(scores: np.ndarray, m: int) -> np.ndarray:
    """:func:`top_per_row` by reading every column (0 < m < width)."""
    rows, width = scores.shape
    # each row's m-th highest value: a value, which no tie-break changes
    kth = np.partition(scores, width - m, axis=1)[:, width - m, None]
    above = scores > kth
    tied = scores == kth
    chosen = above | tied
    wanted = m - above.sum(axis=1)
    surplus = np.flatnonzero(tied.sum(axis=1) > wanted)
    if len(surplus):
        # more values equal to the m-th highest than places left: the lower columns take them
        ties = tied[surplus]
        chosen[surplus] = above[surplus] | (ties & (np.cumsum(ties, axis=1) <= wanted[surplus, None]))
    return (np.flatnonzero(chosen) % width).reshape(rows, m)


def _flat_nonzero(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(flat positions of the True entries of a 2-D mask, where each row starts among them):
    a 1-D ``flatnonzero`` costs a fifth of a 2-D ``nonzero``."""
    flat = np.flatnonzero(mask)
    return flat, np.searchsorted(flat, np.arange(len(mask) + 1) * mask.shape[1])
