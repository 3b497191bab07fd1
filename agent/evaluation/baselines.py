"""Reference recommenders for ``recsys-agent replay``, independent of the plugins on purpose.

They answer "is the pipeline better than something trivial?", so they share nothing with the
stages they judge: each keeps its own numpy state indexed by the replay's item index (catalog
order) and learns only from the events the replay hands it.

The replay asks a baseline for a dense score vector over all catalog items, then ranks the true
item with :func:`rank_of`: higher score first, ties in catalog order. Most items share a score
(zero, or one rating), so the tie rule is fixed for reproducibility; on MovieTweetings 100K
catalog order, reverse order, pessimistic and expected-random ties give the same NDCG@10 to
three decimals.

:class:`BaselineEvaluator` runs them over a replayed stream. The replay tells it, event by event,
whether the pipeline applied and evaluated the event, so both sides judge exactly the same
events; :class:`BaselineProcess` runs the evaluator in a second process, fed in chunks, so the
baselines cost the pipeline's event loop nothing on a machine with two cores.
"""

from __future__ import annotations

import math
import multiprocessing
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass
from multiprocessing.connection import Connection

import numpy as np

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
        partners = [i for i in self._window_items(user_id) if i != item]
        if partners:
            self.cooccurrence[partners, item] += 1.0
            self.cooccurrence[item, partners] += 1.0
        self.counts[item] += 1.0
        self.inverse_norm[item] = 1.0 / math.sqrt(self.counts[item])
        recent = self.recent.get(user_id)
        if recent is None:
            recent = self.recent[user_id] = deque(maxlen=self.window)
        recent.append(item)


BASELINES: tuple[str, ...] = (Popularity.name, DecayedPopularity.name, ItemKNN.name)


def make_baselines(
    names: list[str] | tuple[str, ...],
    n_items: int,
    *,
    half_life_s: float = 7 * DAY_S,
    knn_window: int = 10,
    knn_similarity: str = "cosine",
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


@dataclass(slots=True)
class StreamArrays:
    """The replayed events, reduced to what the baselines need (cheap to send to a process)."""

    users: np.ndarray  # int64 user codes
    items: np.ndarray  # int64 item numbers; >= n_items for items outside the catalog
    ts: np.ndarray  # float64
    negative: np.ndarray  # bool: dislike or skip


@dataclass(slots=True)
class BaselineResults:
    # per baseline, the rank of the true item at each evaluated event (0: miss or beyond k)
    ranks: dict[str, np.ndarray]
    busy_s: float


class BaselineEvaluator:
    """Feeds the stream to every baseline, event by event, and records the true item's rank.

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
        )
        n_events = len(stream.users)
        self.ranks = {b.name: np.zeros(n_events, dtype=np.int32) for b in self.baselines}
        self.evaluated = 0
        self.history: dict[int, set[int]] = {}
        self.position = 0
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
        """Process the next ``len(verdicts)`` events; each byte is SKIPPED, APPLIED or EVALUATED."""
        started = time.perf_counter()
        n_items, k = self.config.n_items, self.config.k
        for verdict in verdicts:
            i = self.position
            self.position += 1
            if verdict == SKIPPED:
                continue
            user, item, ts = self._users[i], self._items[i], self._ts[i]
            history = self.history.get(user)
            if verdict == EVALUATED:
                if item < n_items and history is not None:
                    seen = np.fromiter((n for n in history if n < n_items), dtype=np.int64)
                    for baseline in self.baselines:
                        scores = baseline.scores(user, ts)
                        if baseline.shared_monotone and self._surely_missed(
                            baseline, scores, scores[item], k + len(seen)
                        ):
                            self.shortcut_misses += 1
                            continue
                        rank = rank_of(scores, item, seen, k)
                        self.ranks[baseline.name][self.evaluated] = rank if rank <= k else 0
                self.evaluated += 1
            if item < n_items and not self._negative[i]:
                for baseline in self.baselines:
                    baseline.observe(user, item, ts)
                self._observed += 1
                if self._observed % self.TOP_REFRESH == 0:
                    self._tops.clear()
            if history is None:
                history = self.history[user] = set()
            history.add(item)
        self.busy_s += time.perf_counter() - started

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
        return BaselineResults({name: ranks[: self.evaluated] for name, ranks in self.ranks.items()}, self.busy_s)


class InlineBaselines:
    """The evaluator in this process: simplest, and what tests and profiles use."""

    def __init__(self, config: BaselineConfig, stream: StreamArrays) -> None:
        self.evaluator = BaselineEvaluator(config, stream)

    def push(self, verdict: int) -> None:
        self.evaluator.feed(bytes((verdict,)))

    def finish(self) -> BaselineResults:
        return self.evaluator.results()

    def close(self) -> None:
        return None


def _worker(connection: Connection, config: BaselineConfig, stream: StreamArrays) -> None:
    """Body of the baseline process: chunks of verdicts in, results out at the empty chunk."""
    try:
        evaluator = BaselineEvaluator(config, stream)
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
