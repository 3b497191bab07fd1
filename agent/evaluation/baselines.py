"""Reference recommenders for ``recsys-agent replay``, independent of the plugins on purpose.

They answer "is the pipeline better than something trivial?", so they share nothing with the
stages they judge: each keeps its own numpy state indexed by the replay's item index (catalog
order) and learns only from the events the replay hands it.

The replay asks a baseline for a dense score vector over all catalog items, once per step (a
user's basket, or one event), then ranks each of the step's true items with :func:`rank_of`:
higher score first, ties in catalog order. Most items share a score
(zero, or one rating), so the tie rule is fixed for reproducibility; on MovieTweetings 100K
catalog order, reverse order, pessimistic and expected-random ties give the same NDCG@10 to
three decimals.

:class:`BaselineEvaluator` runs them over a replayed stream. The replay tells it, event by event,
whether the pipeline applied and evaluated the event, so both sides judge exactly the same
events with the same steps; :class:`BaselineProcess` runs the evaluator in a second process, fed in chunks, so the
baselines cost the pipeline's event loop nothing on a machine with two cores.
"""

from __future__ import annotations

import importlib.util
import math
import multiprocessing
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

# Events that say nothing positive about an item teach the baselines nothing.
NEGATIVE_TYPES: frozenset[str] = frozenset({"dislike", "skip"})
DAY_S = 86_400.0


def rank_of(scores: np.ndarray, target: int, excluded: np.ndarray, k: int | None = None) -> int:
    """1-based rank of ``target`` among all items except ``excluded`` (which must not hold it).

    Ranking is by score, highest first, ties in index order. It counts the items ranked ahead
    instead of sorting. With ``k``, any rank beyond k may be reported as k + 1: one pass over
    the catalog then settles most misses.
    """
    value = scores[target]
    if k is not None:
        # At most len(excluded) of the strictly better items are excluded.
        if int(np.count_nonzero(scores > value)) - len(excluded) >= k:
            return k + 1
    # Ahead: a higher score anywhere, or an equal one earlier in catalog order.
    ahead = int(np.count_nonzero(scores[:target] >= value)) + int(np.count_nonzero(scores[target + 1 :] > value))
    if len(excluded):
        others = scores[excluded]
        ahead -= int(np.count_nonzero(others > value)) + int(np.count_nonzero((others == value) & (excluded < target)))
    return ahead + 1


class Baseline(ABC):
    name: str
    # True when scores() is the same for every user and no score ever decreases while
    # ``scale_generation`` stays the same: a stale list of the top scores then still proves
    # a miss (see BaselineEvaluator).
    shared_monotone: bool = False
    scale_generation: int = 0

    def __init__(self, n_items: int) -> None:
        self.n_items = n_items

    @abstractmethod
    def scores(self, user_id: Hashable, now: float) -> np.ndarray:
        """Scores of every item for ``user_id`` at time ``now`` (read-only; do not keep)."""

    @abstractmethod
    def observe(self, user_id: Hashable, item: int, ts: float) -> None:
        """Learn one positive interaction, after it was evaluated."""

    def observe_step(self, user_id: Hashable, items: list[int], ts: float) -> None:
        """Learn the positive interactions of one step (one user, one instant: a basket), after
        they were evaluated. The order of ``items`` is the stream's, which inside a basket is
        no user's choice: a baseline whose learning depends on the order overrides this."""
        for item in items:
            self.observe(user_id, item, ts)


class Popularity(Baseline):
    """Number of interactions each item had so far."""

    name = "popularity"
    shared_monotone = True

    def __init__(self, n_items: int) -> None:
        super().__init__(n_items)
        self.counts = np.zeros(n_items)

    def scores(self, user_id: Hashable, now: float) -> np.ndarray:
        return self.counts

    def observe(self, user_id: Hashable, item: int, ts: float) -> None:
        self.counts[item] += 1.0


class DecayedPopularity(Baseline):
    """Interactions weighted by 2 ** (-age / half_life): yesterday's hits count more.

    Every score decays by the same factor between two instants, so the order at time ``now``
    is the order of sum(2 ** ((t_i - ref) / half_life)) for any fixed reference ``ref``: an
    update is O(1) and a query needs no sweep. The reference moves forward before the weights
    can overflow.
    """

    name = "decayed_popularity"
    shared_monotone = True

    def __init__(self, n_items: int, half_life_s: float = 7 * DAY_S) -> None:
        super().__init__(n_items)
        if half_life_s <= 0:
            raise ValueError("half_life_s must be positive")
        self.rate = math.log(2) / half_life_s
        self.weights = np.zeros(n_items)
        self.reference_ts: float | None = None

    def scores(self, user_id: Hashable, now: float) -> np.ndarray:
        return self.weights

    def observe(self, user_id: Hashable, item: int, ts: float) -> None:
        if self.reference_ts is None:
            self.reference_ts = ts
        exponent = (ts - self.reference_ts) * self.rate
        if exponent > 50.0:
            self.weights *= math.exp(-exponent)
            self.reference_ts = ts
            self.scale_generation += 1
            exponent = 0.0
        self.weights[item] += math.exp(exponent)


class ItemKNN(Baseline):
    """Online item-to-item co-occurrence within each user's recent items.

    An interaction with j pairs j with each of the user's previous ``window`` items, in both
    directions, so C[i, j] counts how often i and j were close together in some user's stream.
    A basket (a step of several items) pairs each of its items with the window before it and
    with every other item of the basket, and then enters the window in catalog order, so what
    is learned does not depend on the order of the basket's lines.
    score(j) = sum over the user's last ``window`` items i of sim(i, j), where sim is C[i, j]
    (``count``) or C[i, j] / sqrt(n_i * n_j) (``cosine``, the textbook item-kNN: it stops the
    most popular items from being everyone's neighbour); n counts each item's interactions.

    C is a dense float32 matrix: exact for counts below 2**24, and a query is one small
    matrix-vector product.
    """

    name = "item_knn"
    SIMILARITIES = ("cosine", "count")
    # A dense matrix larger than this is refused rather than swapping the machine to death.
    MAX_MATRIX_BYTES = 4 * 1024**3

    @classmethod
    def check_size(cls, n_items: int) -> None:
        """Raise ValueError when the matrix for ``n_items`` would exceed MAX_MATRIX_BYTES."""
        needed = n_items * n_items * 4
        if needed > cls.MAX_MATRIX_BYTES:
            raise ValueError(
                f"item_knn needs a {needed / 1024**3:.1f} GiB co-occurrence matrix for {n_items} items "
                f"(limit {cls.MAX_MATRIX_BYTES / 1024**3:.0f} GiB); leave item_knn out of the baselines"
            )

    def __init__(self, n_items: int, window: int = 10, similarity: str = "cosine") -> None:
        super().__init__(n_items)
        if window < 1:
            raise ValueError("window must be at least 1")
        if similarity not in self.SIMILARITIES:
            raise ValueError(f"similarity must be one of {', '.join(self.SIMILARITIES)}, got {similarity!r}")
        self.check_size(n_items)
        self.window = window
        self.cosine = similarity == "cosine"
        # np.zeros maps pages lazily: rows of items nobody interacts with cost no memory.
        self.cooccurrence = np.zeros((n_items, n_items), dtype=np.float32)
        # 1 / sqrt(n_i), with n_i floored at 1 so unseen items (all-zero columns) stay at 0
        self.inverse_norm = np.ones(n_items, dtype=np.float32)
        self.counts = np.zeros(n_items)
        self.recent: dict[Hashable, deque[int]] = {}
        self._zeros = np.zeros(n_items, dtype=np.float32)

    def _window_items(self, user_id: Hashable) -> list[int]:
        recent = self.recent.get(user_id)
        # An item twice in the window (a repeated interaction) counts once.
        return list(dict.fromkeys(recent)) if recent else []

    def scores(self, user_id: Hashable, now: float) -> np.ndarray:
        items = self._window_items(user_id)
        if not items:
            return self._zeros
        rows = self.cooccurrence[items]
        if not self.cosine:
            return rows.sum(axis=0)
        scores = self.inverse_norm[items] @ rows
        scores *= self.inverse_norm
        return scores

    def observe(self, user_id: Hashable, item: int, ts: float) -> None:
        self.observe_step(user_id, [item], ts)

    def observe_step(self, user_id: Hashable, items: list[int], ts: float) -> None:
        window = self._window_items(user_id)
        # catalog order: the same pairs and the same window whatever order the lines came in
        ordered = sorted(items) if len(items) > 1 else items
        for index, item in enumerate(ordered):
            partners = [i for i in dict.fromkeys(window + ordered[:index]) if i != item]
            if partners:
                self.cooccurrence[partners, item] += 1.0
                self.cooccurrence[item, partners] += 1.0
            self.counts[item] += 1.0
            self.inverse_norm[item] = 1.0 / math.sqrt(self.counts[item])
        recent = self.recent.get(user_id)
        if recent is None:
            recent = self.recent[user_id] = deque(maxlen=self.window)
        recent.extend(ordered)


# ALS retraining cadence: on the dev sets (~100k events) 13 fits, 0.5 s each on average. The
# model is implicit's defaults but for 32 factors instead of 100: as good or better on both dev
# sets (NDCG@10 0.0229 against 0.0226 at 64 on Online Retail, 0.019 against 0.014 on a third of
# MovieTweetings) at a third of the cost; alpha 10 or regularisation 0.1 changed no ranking of
# the baselines
ALS_EVERY = 10_000
ALS_FACTORS = 32


class ALS(Baseline):
    """implicit's ``AlternatingLeastSquares`` (Hu, Koren & Volinsky's implicit-feedback matrix
    factorisation, the collaborative filter most users of a Python stack would reach for), as
    it is used online: retrained from scratch on every positive interaction seen so far each
    ``every`` of them (more often at the start, see FIRST_FIT; never inside a basket), and at
    query time the user's factors are recomputed from the user's
    current history (``recalculate_user``, the fold-in ``recommend(..., recalculate_user=True)``
    does), so users and interactions newer than the model count.

    The confidence of a (user, item) pair is the number of its interactions. Scores are the
    dot products of the folded-in user factors with every item's factors: the full ranking
    ``recommend`` would cut at N, with the user's seen items left to the protocol's exclusion
    (what ``filter_already_liked_items`` does). Before the first fit every score is 0.

    ``threads`` bounds both implicit's own threads and BLAS during a fit: the baselines run
    beside the pipeline, and oversubscribed cores would slow both.
    """

    name = "als"
    ITERATIONS = 15
    REGULARIZATION = 0.01
    ALPHA = 1.0
    # the first fit, after this many interactions; until ``every`` is reached the interval
    # doubles (fits at 1,000, 2,000, 4,000, ...), so that the start of a stream is not scored
    # by no model at all for ``every`` events
    FIRST_FIT = 1_000

    def __init__(self, n_items: int, every: int = ALS_EVERY, factors: int = ALS_FACTORS, threads: int = 1) -> None:
        super().__init__(n_items)
        if every < 1:
            raise ValueError("the ALS retraining interval must be at least 1 event")
        if factors < 1:
            raise ValueError("the number of ALS factors must be at least 1")
        # implicit (an optional dependency) is imported before the controller is made: a
        # controller limits only the BLAS libraries loaded when it was made, and implicit brings scipy's
        from implicit.als import AlternatingLeastSquares
        from threadpoolctl import ThreadpoolController

        self._model_class = AlternatingLeastSquares
        self.every = every
        self.factors = factors
        self.threads = threads
        self._blas = ThreadpoolController()
        # user -> {item: interactions}: the fold-in's input and the training matrix's rows
        self.interactions: dict[Hashable, dict[int, int]] = {}
        self._rows: dict[Hashable, int] = {}
        self._observed = 0
        self._next_fit = min(every, self.FIRST_FIT)
        self.fits = 0
        self.fit_s = 0.0
        self.model: Any = None
        self.item_factors: np.ndarray | None = None
        self._zeros = np.zeros(n_items, dtype=np.float32)

    def scores(self, user_id: Hashable, now: float) -> np.ndarray:
        history = self.interactions.get(user_id)
        if self.model is None or self.item_factors is None or not history:
            return self._zeros
        import scipy.sparse

        items = np.fromiter(history.keys(), dtype=np.int32, count=len(history))
        counts = np.fromiter(history.values(), dtype=np.float32, count=len(history))
        row = scipy.sparse.csr_matrix((counts, items, np.array([0, len(items)])), shape=(1, self.n_items))
        factors = self.model.recalculate_user(0, row)
        return self.item_factors @ np.asarray(factors, dtype=np.float32).reshape(-1)

    def observe(self, user_id: Hashable, item: int, ts: float) -> None:
        self.observe_step(user_id, [item], ts)

    def observe_step(self, user_id: Hashable, items: list[int], ts: float) -> None:
        history = self.interactions.get(user_id)
        if history is None:
            history = self.interactions[user_id] = {}
            self._rows[user_id] = len(self._rows)
        for item in items:
            history[item] = history.get(item, 0) + 1
        self._observed += len(items)
        # after the whole basket: a fit never holds part of one
        if self._observed >= self._next_fit:
            self.fit()

    def fit(self) -> None:
        """Train a fresh model on every interaction observed so far."""
        import scipy.sparse

        started = time.perf_counter()
        rows, cols, values = [], [], []
        for user, history in self.interactions.items():
            row = self._rows[user]
            for item, count in history.items():
                rows.append(row)
                cols.append(item)
                values.append(count)
        matrix = scipy.sparse.csr_matrix(
            (np.array(values, dtype=np.float32), (np.array(rows), np.array(cols))),
            shape=(len(self._rows), self.n_items),
        )
        # the model checks BLAS's threads when it is made: made within the limit, it finds it
        with self._blas.limit(limits=self.threads, user_api="blas"):
            model = self._model_class(
                factors=self.factors,
                regularization=self.REGULARIZATION,
                alpha=self.ALPHA,
                iterations=self.ITERATIONS,
                num_threads=self.threads,
                random_state=self.fits,
            )
            model.fit(matrix, show_progress=False)
        self.model = model
        self.item_factors = np.ascontiguousarray(model.item_factors, dtype=np.float32)
        self._next_fit = self._observed + min(self.every, max(self.FIRST_FIT, self._observed))
        self.fits += 1
        self.fit_s += time.perf_counter() - started


BASELINES: tuple[str, ...] = (Popularity.name, DecayedPopularity.name, ItemKNN.name, ALS.name)


def check_baselines(names: list[str] | tuple[str, ...], n_items: int) -> None:
    """Raise ValueError for a baseline that cannot run here: unknown, too large, or a library
    that is not installed. Called before the catalog loads, so a refusal costs nothing."""
    unknown = [name for name in names if name not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {', '.join(unknown)}; known: {', '.join(BASELINES)}")
    if ItemKNN.name in names:
        ItemKNN.check_size(n_items)
    if ALS.name in names and importlib.util.find_spec("implicit") is None:
        raise ValueError(
            "the als baseline needs the implicit library (pip install 'recsys-agent[eval]'); "
            "or leave als out of the baselines"
        )


def make_baselines(
    names: list[str] | tuple[str, ...],
    n_items: int,
    *,
    half_life_s: float = 7 * DAY_S,
    knn_window: int = 10,
    knn_similarity: str = "cosine",
    als_every: int = ALS_EVERY,
    als_factors: int = ALS_FACTORS,
) -> list[Baseline]:
    """Build the named baselines (any of :data:`BASELINES`, in the order given)."""
    built: list[Baseline] = []
    for name in names:
        if name == Popularity.name:
            built.append(Popularity(n_items))
        elif name == DecayedPopularity.name:
            built.append(DecayedPopularity(n_items, half_life_s))
        elif name == ItemKNN.name:
            built.append(ItemKNN(n_items, knn_window, knn_similarity))
        elif name == ALS.name:
            built.append(ALS(n_items, als_every, als_factors))
        else:
            raise ValueError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")
    return built


# -- running the baselines over a replayed stream ----------------------------------------------

# What the replay says about each event, in stream order.
SKIPPED = 0  # not applied by the pipeline (refused, duplicate): the baselines never see it
APPLIED = 1  # applied, not evaluated
EVALUATED = 2  # evaluated (before being applied)


@dataclass(slots=True)
class BaselineConfig:
    names: tuple[str, ...]
    n_items: int
    k: int
    half_life_s: float = 7 * DAY_S
    knn_window: int = 10
    knn_similarity: str = "cosine"
    als_every: int = ALS_EVERY
    als_factors: int = ALS_FACTORS


@dataclass(slots=True)
class StreamArrays:
    """The replayed events, reduced to what the baselines need (cheap to send to a process)."""

    users: np.ndarray  # int64 user codes
    items: np.ndarray  # int64 item numbers; >= n_items for items outside the catalog
    ts: np.ndarray  # float64
    negative: np.ndarray  # bool: dislike or skip
    # int64 index of the first event of each step (one user's events ranked against one list);
    # None: every event is its own step
    step_starts: np.ndarray | None = None


@dataclass(slots=True)
class BaselineResults:
    # per baseline, the rank of the true item at each evaluated event (0: miss or beyond k)
    ranks: dict[str, np.ndarray]
    busy_s: float
    # per baseline that trains a model in batches (ALS): {"fits": n, "seconds": s}
    training: dict[str, dict[str, float]] = field(default_factory=dict)


class BaselineEvaluator:
    """Feeds the stream to every baseline, step by step, and records the true items' ranks.

    A step (``StreamArrays.step_starts``) is processed once the verdicts of all its events are
    known: each baseline scores the items once, for the step's user and time, every evaluated
    event of the step is ranked against those scores, then every applied event is observed.

    For a shared, monotone baseline (popularity) most misses are settled without a pass over
    the catalog: it keeps the top scores as they were at most ``TOP_REFRESH`` events ago. If
    the true item scores below the (k + seen)-th of those, at least k + seen items are still
    strictly ahead of it (scores only grew since), so at least k unseen ones are: a miss.
    """

    TOP_REFRESH = 256
    TOP_SIZE = 1_024

    def __init__(self, config: BaselineConfig, stream: StreamArrays) -> None:
        self.config = config
        self.stream = stream
        self.baselines = make_baselines(
            config.names,
            config.n_items,
            half_life_s=config.half_life_s,
            knn_window=config.knn_window,
            knn_similarity=config.knn_similarity,
            als_every=config.als_every,
            als_factors=config.als_factors,
        )
        n_events = len(stream.users)
        self.ranks = {b.name: np.zeros(n_events, dtype=np.int32) for b in self.baselines}
        self.evaluated = 0
        self.history: dict[int, set[int]] = {}
        # events processed so far (whole steps), and the verdicts of the events after them
        self.position = 0
        self._pending = bytearray()
        starts = stream.step_starts if stream.step_starts is not None else np.arange(n_events)
        # step j holds the events bounds[j] .. bounds[j + 1] - 1
        self._bounds = [*starts.tolist(), n_events]
        self._step = 0
        self.busy_s = 0.0
        self.shortcut_misses = 0
        # name -> (scale generation, top scores in descending order)
        self._tops: dict[str, tuple[int, np.ndarray]] = {}
        self._observed = 0
        # Plain Python lists: indexing a numpy array per event costs more than the lookup.
        self._users = stream.users.tolist()
        self._items = stream.items.tolist()
        self._ts = stream.ts.tolist()
        self._negative = stream.negative.tolist()

    def feed(self, verdicts: bytes) -> None:
        """Take the verdicts of the next ``len(verdicts)`` events (each byte SKIPPED, APPLIED or
        EVALUATED) and process every step whose verdicts are now all known."""
        started = time.perf_counter()
        self._pending += verdicts
        known = self.position + len(self._pending)
        bounds = self._bounds
        done = self.position
        while self._step + 1 < len(bounds) and bounds[self._step + 1] <= known:
            start, stop = bounds[self._step], bounds[self._step + 1]
            self._run_step(start, stop, self._pending[start - done : stop - done])
            self._step += 1
        processed = bounds[self._step] - done
        del self._pending[:processed]
        self.position += processed
        self.busy_s += time.perf_counter() - started

    def _run_step(self, start: int, stop: int, verdicts: bytearray) -> None:
        n_items, k = self.config.n_items, self.config.k
        user = self._users[start]
        history = self.history.get(user)
        # every baseline's scores for this step, computed at the first event that needs them
        step_scores: dict[str, np.ndarray] = {}
        seen: np.ndarray | None = None
        for i, verdict in enumerate(verdicts, start=start):
            if verdict != EVALUATED:
                continue
            item = self._items[i]
            if item < n_items and history is not None:
                if seen is None:
                    seen = np.fromiter((n for n in history if n < n_items), dtype=np.int64)
                for baseline in self.baselines:
                    scores = step_scores.get(baseline.name)
                    if scores is None:
                        scores = step_scores[baseline.name] = baseline.scores(user, self._ts[start])
                    if baseline.shared_monotone and self._surely_missed(baseline, scores, scores[item], k + len(seen)):
                        self.shortcut_misses += 1
                        continue
                    rank = rank_of(scores, item, seen, k)
                    self.ranks[baseline.name][self.evaluated] = rank if rank <= k else 0
            self.evaluated += 1
        learned: list[int] = []
        for i, verdict in enumerate(verdicts, start=start):
            if verdict == SKIPPED:
                continue
            item = self._items[i]
            if item < n_items and not self._negative[i]:
                learned.append(item)
            if history is None:
                history = self.history[user] = set()
            history.add(item)
        if learned:
            for baseline in self.baselines:
                baseline.observe_step(user, learned, self._ts[start])
            before = self._observed
            self._observed += len(learned)
            if self._observed // self.TOP_REFRESH != before // self.TOP_REFRESH:
                self._tops.clear()

    def _surely_missed(self, baseline: Baseline, scores: np.ndarray, value: float, ahead_needed: int) -> bool:
        """Whether at least ``ahead_needed`` items are known to score strictly above ``value``."""
        if ahead_needed > self.TOP_SIZE or ahead_needed > len(scores):
            return False
        top = self._tops.get(baseline.name)
        if top is None or top[0] != baseline.scale_generation:
            size = min(self.TOP_SIZE, len(scores))
            best = np.partition(scores, len(scores) - size)[len(scores) - size :]
            top = (baseline.scale_generation, np.sort(best)[::-1])
            self._tops[baseline.name] = top
        return bool(value < top[1][ahead_needed - 1])

    def results(self) -> BaselineResults:
        if self._pending or self.position != len(self._users):
            raise RuntimeError(
                f"the baselines processed {self.position} of {len(self._users)} events: a step is incomplete"
            )
        training = {
            b.name: {"fits": b.fits, "seconds": round(b.fit_s, 3)} for b in self.baselines if isinstance(b, ALS)
        }
        return BaselineResults(
            {name: ranks[: self.evaluated] for name, ranks in self.ranks.items()}, self.busy_s, training
        )


# BLAS threads for the baselines: they run beside the pipeline, one core each on two cores, and
# a threaded BLAS on a small matrix-vector product costs ten times a single thread (ALS scores
# on 10,000 items: 16 ms with two OpenBLAS threads on a busy machine, 1.2 ms with one)
BLAS_THREADS = 1


def _limit_blas() -> threadpool_limits:
    # made after the baselines are built: a limit reaches only the libraries loaded when it is
    # made, and a baseline may bring its own (implicit brings scipy's OpenBLAS)
    return threadpool_limits(limits=BLAS_THREADS, user_api="blas")


class InlineBaselines:
    """The evaluator in this process: simplest, and what tests and profiles use."""

    def __init__(self, config: BaselineConfig, stream: StreamArrays) -> None:
        self.evaluator = BaselineEvaluator(config, stream)
        self._limits = _limit_blas()

    def push(self, verdict: int) -> None:
        self.evaluator.feed(bytes((verdict,)))

    def finish(self) -> BaselineResults:
        return self.evaluator.results()

    def close(self) -> None:
        self._limits.restore_original_limits()


def _worker(connection: Connection, config: BaselineConfig, stream: StreamArrays) -> None:
    """Body of the baseline process: chunks of verdicts in, results out at the empty chunk."""
    try:
        evaluator = BaselineEvaluator(config, stream)
        with _limit_blas():
            connection.send(("ready", None))
            while True:
                chunk = connection.recv_bytes()
                if not chunk:
                    break
                evaluator.feed(chunk)
        connection.send(("done", evaluator.results()))
    except Exception as exc:  # reported to the parent, which raises it with the real cause
        connection.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        connection.close()


class BaselineProcess:
    """The evaluator in a spawned process, fed verdicts in chunks as the replay makes them.

    Spawned, not forked: the parent may hold threads (embedding models, Qdrant) that a fork
    would copy in an inconsistent state.
    """

    CHUNK = 1_024

    def __init__(self, config: BaselineConfig, stream: StreamArrays) -> None:
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(
            target=_worker, args=(child, config, stream), name="replay-baselines", daemon=True
        )
        self.process.start()
        child.close()
        self._pending = bytearray()
        self._receive("ready")

    def _receive(self, expected: str) -> object:
        try:
            kind, payload = self.connection.recv()
        except EOFError:
            raise RuntimeError(f"the baseline process died (exit code {self.process.exitcode})") from None
        if kind == "error":
            raise RuntimeError(f"the baseline process failed: {payload}")
        if kind != expected:
            raise RuntimeError(f"the baseline process answered {kind!r}, expected {expected!r}")
        return payload

    def push(self, verdict: int) -> None:
        self._pending.append(verdict)
        if len(self._pending) >= self.CHUNK:
            self.connection.send_bytes(self._pending)
            self._pending.clear()

    def finish(self) -> BaselineResults:
        if self._pending:
            self.connection.send_bytes(self._pending)
            self._pending.clear()
        self.connection.send_bytes(b"")
        results = self._receive("done")
        assert isinstance(results, BaselineResults)
        return results

    def close(self) -> None:
        self.connection.close()
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
