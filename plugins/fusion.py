"""Fusion of the candidate sources by a linear ranker learned online from what users do next.

Every candidate proposed by any source is described by one feature per source: where it stands
among the candidates by that source's score (a percentile, so sources with incomparable scales
mix fairly; a source that cannot score an item it did not propose falls back to the item's
rank gain in its list). The fused score is a weighted sum of those features.

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
from collections.abc import AsyncIterator
from collections import OrderedDict
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass

import numpy as np

from agent.context import AgentContext
from agent.hookspecs import hookimpl
from agent.models import Event
from agent.ranking import Candidates, Query, Scored, top_slots
from agent.signals import event_signal
from agent.snapshots import Snapshots
from agent.state import UserState

log = logging.getLogger(__name__)

SEGMENTS = ((2, "new"), (6, "short"), (21, "medium"))
LEARNING_RATE = 0.05
L2 = 1e-4
HARD_NEGATIVES = 5
RANDOM_NEGATIVES = 20
MAX_PENDING = 20_000
SNAPSHOT_KEY = "fusion.weights"
SAVE_EVERY_S = 10.0
Z_MIN, Z_MAX = -3.0, 10.0


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
        self.rating_max = 10.0
        # user id -> their latest ranking, least recently ranked first; bounded
        self.pending: OrderedDict[str, Ranking] = OrderedDict()
        self.max_pending = MAX_PENDING
        self._rng = np.random.default_rng(0)

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
        self.rating_max = ctx.settings.rating_max
        ctx.extras["fusion_weights"] = self.weights
        snapshots = Snapshots(ctx.js, f"{ctx.settings.stream_name}_STATE") if ctx.js is not None else None
        if snapshots is not None:
            saved = await snapshots.load(SNAPSHOT_KEY)
            if isinstance(saved, dict):
                for segment, table in saved.items():
                    if isinstance(table, dict):
                        self.weights[str(segment)] = {str(k): float(v) for k, v in table.items()}
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
                table[source] = self.initial.get(source, 1.0 / share)
        return np.array([table[s] for s in sources])

    @staticmethod
    def _raw_scores(cands: Candidates, slots: np.ndarray) -> np.ndarray:
        if cands.score_of is not None:
            raw = np.asarray(cands.score_of(slots), dtype=np.float64)
            raw[np.isnan(raw)] = -np.inf
            return raw
        # without score_of, an item's standing in this source is its rank gain (0 if absent)
        ranks = {slot: rank for rank, slot in enumerate(cands.slots.tolist(), start=1)}
        return np.array([gain(ranks[s]) if s in ranks else 0.0 for s in slots.tolist()])

    @staticmethod
    def _standardised(raw: np.ndarray) -> np.ndarray:
        """z-scores over the candidates: scale-free, yet a clear favourite keeps its lead
        (popularity is heavy-tailed; a percentile would flatten that)."""
        known = np.isfinite(raw)
        if known.all():
            mean = raw.mean()
            spread = np.sqrt(np.dot(raw - mean, raw - mean) / len(raw))
            if spread <= 0:
                return np.zeros(len(raw))
            return np.clip((raw - mean) / spread, Z_MIN, Z_MAX)
        if not known.any():
            return np.zeros(len(raw))
        values = raw[known]
        spread = values.std()
        z = np.full(len(raw), Z_MIN)
        z[known] = (values - values.mean()) / spread if spread > 0 else 0.0
        return np.clip(z, Z_MIN, Z_MAX)

    @hookimpl(trylast=True)
    def recsys_fuse(self, query: Query, candidates: list[Candidates]) -> list[Scored]:
        candidates = [c for c in candidates if len(c.slots)]
        if not candidates:
            return []
        segment = segment_of(query.user.event_count)
        sources = [c.source for c in candidates]
        weights = self._weights(segment, sources, [c.plugin for c in candidates])
        union = np.unique(np.concatenate([c.slots for c in candidates]))
        features = np.stack([self._standardised(self._raw_scores(c, union)) for c in candidates], axis=1)
        top, scores = top_slots(features @ weights, query.n_candidates)
        top_slots_ = union[top]
        # which source proposed each top item, strongest contribution first (for reasons)
        mark = np.zeros(query.catalog.size, dtype=bool)
        proposed = np.empty((len(top_slots_), len(candidates)), dtype=bool)
        for column, c in enumerate(candidates):
            mark[c.slots] = True
            proposed[:, column] = mark[top_slots_]
            mark[c.slots] = False
        strength = np.where(proposed, features[top] * weights, -np.inf)
        order = np.argsort(-strength, axis=1, kind="stable")
        ranked = []
        for row, (slot, score) in enumerate(zip(top_slots_.tolist(), scores.tolist(), strict=True)):
            ranked.append(Scored(slot=slot, score=score, sources=[sources[i] for i in order[row] if proposed[row, i]]))
        # Only rankings of known users are remembered: a read for a user the agent does not
        # hold must not grow memory.
        if query.user.event_count:
            # negatives: the top the user passed over, and a sample of the rest of the candidates
            sample = self._rng.choice(len(union), size=min(RANDOM_NEGATIVES, len(union)), replace=False)
            shown = np.unique(np.concatenate([top[:HARD_NEGATIVES], sample]))
            self._remember(query.user.user_id, Ranking(segment, sources, union, features.astype(np.float32), shown))
        return ranked

    def _remember(self, user_id: str, ranking: Ranking) -> None:
        self.pending[user_id] = ranking
        self.pending.move_to_end(user_id)
        if len(self.pending) > self.max_pending:
            self.pending.popitem(last=False)

    @hookimpl(tryfirst=True)
    def recsys_apply_event(self, event: Event, user: UserState, slot: int) -> None:
        # tryfirst: the chosen item's features must be read before the sources learn from it
        ranking = self.pending.pop(user.user_id, None)
        if ranking is None or event_signal(event.type, event.value, self.rating_max) <= 0:
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
