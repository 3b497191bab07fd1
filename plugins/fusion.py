"""Fusion of the candidate sources by a linear ranker learned online from what users do next.

Every candidate proposed by any source is described by one feature per source: where it stands
among the candidates by that source's score (a z-score, so sources with incomparable scales
mix fairly, taken on a log scale for count-like scores, whose heavy tail would otherwise swamp
a linear ranker; a source that cannot score an item it did not propose falls back to the
item's rank gain in its list), plus one for how many sources proposed it. The fused score is a
weighted sum of those features.

Learning is pairwise, as in online learning to rank: when the user's next positive event
arrives, the item they chose should have outscored the items that were ranked above it; the
weights take one logistic gradient step towards that, using the features the items had at the
time of the ranking. Which source predicts best differs between data sets and between new and
long-standing users, so weights are kept per history-length segment, and redundant sources
(two popularity horizons that agree) are learned away rather than double-counted.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass

import numpy as np

from agent.bus.kv_snapshots import Snapshots
from agent.context import AgentContext
from agent.hooks.specs import hookimpl
from agent.pipeline.user_state import UserState, UserStore
from agent.pipeline.values import Candidates, Query, Scored, sorted_unique, top_slots

log = logging.getLogger(__name__)

SEGMENTS = ((2, "new"), (6, "short"), (21, "medium"))
LEARNING_RATE = 0.05
L2 = 1e-4
RANDOM_NEGATIVES = 20
MAX_PENDING = 20_000
SNAPSHOT_KEY = "fusion.weights"
SAVE_EVERY_S = 10.0
Z_MIN, Z_MAX = -3.0, 10.0
TINY = float(np.finfo(np.float64).tiny)
# A feature beside the sources: how many of them proposed the item. Its weight starts at zero
# and moves only as far as agreement predicts the user's next item on this stream.
AGREEMENT = "agreement"


def segment_of(event_count: int) -> str:
    for bound, name in SEGMENTS:
        if event_count < bound:
            return name
    return "long"


def gain(rank: int) -> float:
    """NDCG gain of one relevant item at 1-based ``rank``."""
    return 1.0 / math.log2(rank + 1)


@dataclass(slots=True)
class Ranking:
    """What one ranking keeps until the user's next event (about 10 KB for 300 candidates).

    The chosen item teaches something only if it was among the candidates: an item no source
    proposed cannot be promoted by any weighting of those sources.
    """

    segment: str
    sources: list[str]
    union: np.ndarray  # sorted candidate slots
    features: np.ndarray  # float32, one row per union slot
    shown: np.ndarray  # positions in ``union`` of the top of the fused list


class LearnedFusion:
    """Options (``[plugins.fusion]``): ``learning_rate``, ``weights`` (initial weights by source
    name; they still learn), ``max_pending_rankings`` (users whose last ranking is kept for
    feedback; default 20000)."""

    def __init__(self) -> None:
        self.learning_rate = LEARNING_RATE
        self.initial: dict[str, float] = {}
        # segment -> source -> weight
        self.weights: dict[str, dict[str, float]] = {}
        self.feedbacks = 0
        # user id -> their latest ranking, least recently ranked first; bounded
        self.pending: OrderedDict[str, Ranking] = OrderedDict()
        self.max_pending = MAX_PENDING
        self._rng = np.random.default_rng(0)
        self._uniform_pool = np.empty(0)
        self._uniform_at = 0
        self._users: UserStore | None = None

    @hookimpl
    def recsys_lifespan(self, ctx: AgentContext) -> AsyncIterator[None]:
        return self._configure(ctx)

    @asynccontextmanager
    async def _configure(self, ctx: AgentContext) -> AsyncIterator[None]:
        options = ctx.options("fusion")
        self.learning_rate = float(options.get("learning_rate", LEARNING_RATE))
        self.initial = {str(k): float(v) for k, v in options.get("weights", {}).items()}
        self.max_pending = int(options.get("max_pending_rankings", MAX_PENDING))
        if not 0 < self.learning_rate <= 1 or self.max_pending < 1:
            raise ValueError("[plugins.fusion] learning_rate must be in (0, 1] and max_pending_rankings at least 1")
        ctx.extras["fusion_weights"] = self.weights
        self._users = ctx.users
        snapshots = Snapshots(ctx.js, f"{ctx.settings.stream_name}_STATE") if ctx.js is not None else None
        if snapshots is not None:
            saved = await snapshots.load(SNAPSHOT_KEY)
            if isinstance(saved, dict):
                for segment, table in saved.items():
                    if isinstance(table, dict):
                        # a weight that is not a finite number (NaN is saved as null) is
                        # learned again rather than failing the start
                        self.weights[str(segment)] = {
                            str(k): float(v)
                            for k, v in table.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                        }
        saver = asyncio.create_task(self._save_periodically(snapshots)) if snapshots is not None else None
        try:
            yield
        finally:
            if saver is not None and snapshots is not None:
                saver.cancel()
                with suppress(asyncio.CancelledError):
                    await saver
                with suppress(Exception):
                    await snapshots.save(SNAPSHOT_KEY, self.weights)

    async def _save_periodically(self, snapshots: Snapshots) -> None:
        saved_at = self.feedbacks
        while True:
            await asyncio.sleep(SAVE_EVERY_S)
            if self.feedbacks != saved_at:
                try:
                    await snapshots.save(SNAPSHOT_KEY, self.weights)
                    saved_at = self.feedbacks
                except Exception as exc:
                    log.warning("could not save the fusion weights: %s", exc)

    def _weights(self, segment: str, sources: list[str], plugins: list[str] | None = None) -> np.ndarray:
        table = self.weights.setdefault(segment, {})
        for position, source in enumerate(sources):
            if source not in table:
                # Before any feedback each plugin gets one vote, shared among its sources, so
                # a plugin with three popularity horizons does not outvote the others 3 to 1.
                share = plugins.count(plugins[position]) if plugins and plugins[position] else 1
                table[source] = self.initial.get(source, 0.0 if source == AGREEMENT else 1.0 / share)
        return np.array([table[s] for s in sources])

    @staticmethod
    def _raw_scores(cands: Candidates, slots: np.ndarray) -> np.ndarray:
        if cands.score_of is not None:
            return cands.score_of(slots)
        # without score_of, an item's standing in this source is its rank gain (0 if absent)
        ranks = {slot: rank for rank, slot in enumerate(cands.slots.tolist(), start=1)}
        return np.array([gain(ranks[s]) if s in ranks else 0.0 for s in slots.tolist()])

    @staticmethod
    def _log_scale(raw: np.ndarray, rows: list[int]) -> None:
        """Puts the given rows, scores of count-like sources (``Candidates.counts``: popularity,
        co-occurrence) and the agreement count, on a log scale in place:
        ``log(1 + score / mean positive score)``.

        Such scores are heavy-tailed: on a linear scale a few blockbusters take the whole
        spread, every other candidate gets nearly the same z-score, and a linear ranker can
        no longer tell them apart by that source. The transform is close to linear below
        the row's mean and logarithmic above it: it keeps the order and the head's lead but
        compresses the tail, and dividing by the mean keeps it free of the source's units.
        Which rows are counts is the source's to say, not guessed from one list's values: a
        source's features must mean the same from one list to the next. ``raw`` holds 0
        where a source cannot score a candidate."""
        if not rows:
            return
        counts = np.maximum(raw[rows], 0.0)
        # an all-zero row stays 0
        mean = counts.sum(axis=1) / np.maximum((counts > 0).sum(axis=1), 1)
        # in single precision, where numpy's log is vectorised (log1p is not, in either): a
        # feature needs no more digits
        scaled = (counts / np.maximum(mean, TINY)[:, None]).astype(np.float32)
        scaled += 1.0
        raw[rows] = np.log(scaled, out=scaled)

    @classmethod
    def _standardised(cls, raw: np.ndarray, counts: list[int]) -> np.ndarray:
        """Row-wise (one row per source) z-scores over the candidates, with the ``counts`` rows
        on a log scale first (``_log_scale``): scale-free, yet a clear favourite keeps its lead
        (a percentile would flatten that). A candidate a source cannot score (NaN or
        infinite) gets the floor. Overwrites ``raw`` (a float array)."""
        known = np.isfinite(raw)
        complete = bool(known.all())
        if not complete:
            raw = np.where(known, raw, 0.0)
        cls._log_scale(raw, counts)
        if not complete:
            counts_known = np.maximum(known.sum(axis=1, keepdims=True), 1)
            mean = raw.sum(axis=1, keepdims=True) / counts_known
            deviation = np.where(known, raw - mean, 0.0)
        else:
            mean = raw.mean(axis=1, keepdims=True)
            deviation = raw - mean
        spread = np.sqrt(
            np.einsum("ij,ij->i", deviation, deviation)[:, None] / (raw.shape[1] if complete else counts_known)
        )
        z = deviation / np.where(spread > 0, spread, np.inf)
        if not complete:
            z[~known] = Z_MIN
        return np.clip(z, Z_MIN, Z_MAX, out=z)

    @hookimpl(trylast=True)
    def recsys_fuse(self, query: Query, candidates: list[Candidates]) -> list[Scored]:
        candidates = [c for c in candidates if len(c.slots)]
        if not candidates:
            return []
        segment = segment_of(query.user.event_count)
        sources = [c.source for c in candidates]
        names = [*sources, AGREEMENT]
        weights = self._weights(segment, names, [c.plugin for c in candidates] + [AGREEMENT])
        union = sorted_unique(np.concatenate([c.slots for c in candidates]))
        # member[i, j]: source i proposed union item j
        member = np.zeros((len(candidates), len(union)), dtype=bool)
        # one row per source, and a last one for how many sources agree on the item; rows
        # keep the statistics on contiguous memory
        raw = np.empty((len(names), len(union)))
        for row, c in enumerate(candidates):
            raw[row] = self._raw_scores(c, union)
            member[row, np.searchsorted(union, c.slots)] = True
        raw[-1] = member.sum(axis=0)
        # the agreement row (last) counts sources: a count too
        count_rows = [row for row, c in enumerate(candidates) if c.counts] + [len(candidates)]
        features = self._standardised(raw, count_rows)
        top, scores = top_slots(weights @ features, query.n_candidates)
        top_slots_ = union[top]
        # which source proposed each top item, strongest contribution first (for reasons)
        proposed = member[:, top]
        strength = np.where(proposed, features[:-1, top] * weights[:-1, None], -np.inf)
        # each item's proposing sources, strongest first: sorted by strength, the proposers
        # lead every column, so one gather and a slice per item give them
        order = np.argsort(-strength, axis=0, kind="stable").T
        by_strength = np.array(sources, dtype=object)[order].tolist()
        counts = proposed.sum(axis=0).tolist()
        ranked = [
            Scored(slot, score, [], names_[:count])
            for slot, score, names_, count in zip(
                top_slots_.tolist(), scores.tolist(), by_strength, counts, strict=True
            )
        ]
        # Only rankings of users the agent holds are remembered: a read for an unknown user
        # must not grow memory, and a user forgotten while an asynchronous source was awaited
        # must not come back here.
        if query.user.event_count and (self._users is None or self._users.get(query.user.user_id) is query.user):
            # negatives: the list the user was shown (its first k) and passed over, and a sample
            # of the rest of the candidates
            sample = (self._uniforms() * len(union)).astype(np.int64)
            shown = sorted_unique(np.concatenate([top[: query.k], sample]))
            self._remember(query.user.user_id, Ranking(segment, names, union, features.T.astype(np.float32), shown))
        return ranked

    def _uniforms(self) -> np.ndarray:
        # drawn a few thousand at a time: one generator call per ranking costs more than the rest
        if self._uniform_at + RANDOM_NEGATIVES > len(self._uniform_pool):
            self._uniform_pool = self._rng.random(64 * RANDOM_NEGATIVES)
            self._uniform_at = 0
        self._uniform_at += RANDOM_NEGATIVES
        return self._uniform_pool[self._uniform_at - RANDOM_NEGATIVES : self._uniform_at]

    def _remember(self, user_id: str, ranking: Ranking) -> None:
        self.pending[user_id] = ranking
        self.pending.move_to_end(user_id)
        if len(self.pending) > self.max_pending:
            self.pending.popitem(last=False)

    @hookimpl(tryfirst=True)
    def recsys_apply_event(self, user: UserState, slot: int, signal: float) -> None:
        # tryfirst: the chosen item's features must be read before the sources learn from it
        ranking = self.pending.pop(user.user_id, None)
        if ranking is None or signal <= 0:
            return
        position = int(np.searchsorted(ranking.union, slot))
        if position >= len(ranking.union) or ranking.union[position] != slot:
            return
        positive = ranking.features[position].astype(np.float64)
        negatives = ranking.features[ranking.shown[ranking.shown != position]].astype(np.float64)
        if len(negatives) == 0:
            return
        weights = self._weights(ranking.segment, ranking.sources)
        differences = positive[None, :] - negatives
        margins = differences @ weights
        # logistic pairwise loss: pairs already ordered well barely move the weights
        pull = 1.0 / (1.0 + np.exp(np.clip(margins, -30, 30)))
        step = self.learning_rate * (pull @ differences) / len(negatives) - self.learning_rate * L2 * weights
        updated = weights + step
        table = self.weights[ranking.segment]
        for source, value in zip(ranking.sources, updated.tolist(), strict=True):
            table[source] = value
        self.feedbacks += 1

    @hookimpl
    def recsys_forget_user(self, user_id: str) -> None:
        self.pending.pop(user_id, None)
