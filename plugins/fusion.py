"""Fusion of the candidate sources by a linear ranker learned online from what users do next.

Every candidate proposed by any source is described by one feature per source: where it stands
among the candidates by that source's score (a z-score, so sources with incomparable scales
mix fairly, taken on a log scale for count-like scores, whose heavy tail would otherwise swamp
a linear ranker; a source that cannot score an item it did not propose falls back to the
item's rank gain in its list), plus one for how many sources proposed it. The fused score is a
weighted sum of those features.

Learning is pairwise, as in online learning to rank: when a positive event of the user
arrives, the item they chose should have outscored the items that were ranked above it
(every item chosen before the user's next ranking teaches: the lines of a basket all came from
one list); the weights take one logistic gradient step towards that, using the features the
items had at the time of the ranking. Each weight's step is scaled by the root of its summed squared gradients
(AdaGrad): a feature whose gradients are small on this stream (a source that rarely proposes
the chosen item) still moves, and one whose gradients are large settles, so how fast each
weight learns follows the data rather than one rate set in advance. Which source predicts best
differs between data sets and between new and long-standing users, so weights are kept per
history-length segment, and redundant sources (two popularity horizons that agree) are learned
away rather than double-counted.

Which items to learn against also depends on the data. Two learners (each at two rates, see
below) take a step on every feedback: "shown" against the list the user was shown (and passed
over) plus a uniform sample of the other candidates, "sampled" against the uniform sample alone. Hard negatives from the
shown list sharpen the order among strong candidates where an unchosen item on the list was
a worse choice (ratings: MovieTweetings 0.1464 against 0.1396 with the sample alone), but
where users come back for what they were shown (shop baskets) they push down the source that
proposed it (Online Retail 0.0248 against 0.0270). So each segment serves the weights of the
learner whose weights would have placed the chosen items higher: both are judged on every
feedback by the NDCG gain of the chosen item's place among the candidates under their
weights of the moment (a decayed sum over about the last 500 feedbacks of the segment), and
a segment switches once another learner leads by ``SWITCH_MARGIN`` on enough evidence. The
judgement leans towards the learner that serves (users choose from the lists its weights
made), so a switch is conservative: it takes a lead the served learner's own advantage did not
cancel. How fast the weights should follow the feedback differs between data sets too, so
each of the two also learns at ``SLOW_SHARE`` of the rate, and all four are judged alike: on
shop baskets with less to learn from the slow ones serve (Online Retail's half of the
customers 0.0262 -> 0.0268, its later half 0.0278 -> 0.0285), on ratings the full rate keeps
serving (MovieTweetings 0.1461 -> 0.1460).

The hot path hands over batches (``recsys_fuse_batch``, ``recsys_apply_events``): a batch's
lists are fused in one set of array operations, and each query's numbers are exactly, to the
bit, those it gets alone: every statistic reduces one list's cells only, and sums add in an
order that does not depend on the batch. The one-item hooks are batches of one.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import suppress
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import numpy as np

from agent.bus.kv_snapshots import Snapshots
from agent.context import AgentContext
from agent.hooks.specs import hookimpl
from agent.pipeline.catalog import Catalog
from agent.pipeline.extras import FUSION_WEIGHTS
from agent.pipeline.user_state import UserState, UserStore
from agent.pipeline.values import Candidates, Query, Scored, sorted_unique
from agent.serving.metrics import Metrics

log = logging.getLogger(__name__)

SEGMENTS = ((2, "new"), (6, "short"), (21, "medium"))
LEARNING_RATE = 0.05
L2 = 1e-4
RANDOM_NEGATIVES = 20
MAX_PENDING = 20_000
SNAPSHOT_KEY = "fusion.weights"
# the AdaGrad sums beside the weights, under their own key: a snapshot of weights alone (saved
# before they existed) still loads, its weights then learning at the full rate again
SQUARES_KEY = "fusion.squares"
# keeps a step finite while a weight's summed squared gradients are still zero
EPSILON = 1e-8
SAVE_EVERY_S = 10.0
# The learners (see the module's docstring), by the Ranking field their negatives come from:
# "shown", the list the user was shown and a uniform sample of the other candidates (the
# first, whose snapshot keys are the ones saved before there were two); "sampled", the
# uniform sample alone.
# Each also learns at SLOW_SHARE of the rate (see the module's docstring): (name, the Ranking
# field of its negatives, its share of the learning rate).
SLOW_SHARE = 0.4
LEARNERS = (
    ("shown", "shown", 1.0),
    ("sampled", "sampled", 1.0),
    ("shown_slow", "shown", SLOW_SHARE),
    ("sampled_slow", "sampled", SLOW_SHARE),
)
FIRST_LEARNER = LEARNERS[0][0]
# the fields the learners take negatives from, each gathered once per call for its learners
NEGATIVE_FIELDS = tuple(dict.fromkeys(negatives for _, negatives, _ in LEARNERS))
# each learner's quality in a segment is a decayed sum of the gains its weights would have
# given the chosen items, over about the last 1 / QUALITY_DECAY feedbacks of the segment
QUALITY_DECAY = 0.002
# a segment serves another learner once that has this much more quality, with at least this
# much (decayed) evidence: a switch needs a lasting lead, not a lucky run. (At 0.02 no segment
# ever took a slow learner on either dev set: their leads are smaller than that.)
SWITCH_MARGIN = 0.005
SWITCH_EVIDENCE = 200.0
SELECTION_KEY = "fusion.selection"
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
    """What one ranking keeps until the user's next ranking or negative event (about 10 KB for
    300 candidates).

    Every positive event of the user until then teaches from it: the items of a basket, or of
    a burst of events that one push answers, were all chosen from the list the user had. A
    chosen item teaches something only if it was among the candidates: an item no source
    proposed cannot be promoted by any weighting of those sources. Items chosen before are
    no longer negatives of the next ones.
    """

    segment: str
    sources: list[str]
    union: np.ndarray  # sorted candidate slots
    features: np.ndarray  # float32, one row per feature (``sources``), one column per union slot
    # positions in ``union`` of the "shown" learner's negatives: the top of the fused list and
    # a uniform sample of the other candidates
    shown: np.ndarray
    # positions in ``union`` of the "sampled" learner's negatives: the uniform sample alone
    sampled: np.ndarray
    # positions in ``union`` of the list the user was shown, best first
    listed: np.ndarray
    # positions in ``union`` of the items chosen since the ranking, in order
    chosen: list[int] = field(default_factory=list)


@dataclass(slots=True)
class Learner:
    """One way of learning the weights: a weight table per segment, learned from pairs of the
    chosen item against the negatives in one field of the ranking (``LEARNERS``)."""

    negatives: str
    # the share of the learning rate its steps take
    rate_share: float = 1.0
    # segment -> feature -> weight
    weights: dict[str, dict[str, float]] = field(default_factory=dict)
    # segment -> feature -> sum of its squared gradients so far (AdaGrad)
    squares: dict[str, dict[str, float]] = field(default_factory=dict)
    # segment -> decayed sum of the NDCG gains these weights would have given the chosen
    # items among their candidates (every learner is scored on the same feedbacks)
    quality: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class FusionOptions:
    learning_rate: float = LEARNING_RATE
    weights: dict[str, float] = field(default_factory=dict)  # feature -> initial weight
    max_pending_rankings: int = MAX_PENDING

    def problems(self) -> list[tuple[str, str]]:
        return [
            (name, message)
            for name, bad, message in (
                ("learning_rate", not 0 < self.learning_rate <= 1, "must be in (0, 1]"),
                ("max_pending_rankings", self.max_pending_rankings < 1, "must be at least 1"),
            )
            if bad
        ]


class LearnedFusion:
    """Options (``[plugins.fusion]``): ``learning_rate``, ``weights`` (initial weights by source
    name; they still learn), ``max_pending_rankings`` (users whose last ranking is kept for
    feedback; default 20000)."""

    def __init__(self) -> None:
        self.learning_rate = LEARNING_RATE
        self.initial: dict[str, float] = {}
        self.learners = {name: Learner(negatives, share) for name, negatives, share in LEARNERS}
        # segment -> the learner whose weights it serves
        self.serving: dict[str, str] = {}
        # segment -> source -> weight: each segment's table of the learner it serves (the same
        # dict, so its steps show here at once)
        self.weights: dict[str, dict[str, float]] = {}
        # segment -> decayed count of feedbacks, the evidence behind the learners' quality
        self.evidence: dict[str, float] = {}
        self.feedbacks = 0
        # user id -> their latest ranking, least recently ranked first; bounded
        self.pending: OrderedDict[str, Ranking] = OrderedDict()
        self.max_pending = MAX_PENDING
        self._rng = np.random.default_rng(0)
        self._uniform_pool = np.empty(0)
        self._uniform_at = 0
        self._gain_table = np.empty(0)
        self._users: UserStore | None = None
        self._metrics: Metrics | None = None

    @hookimpl
    async def recsys_lifespan(self, ctx: AgentContext) -> AsyncIterator[None]:
        options = ctx.options("fusion", FusionOptions)
        self.learning_rate = options.learning_rate
        self.initial = dict(options.weights)
        # no more rankings than users held: an evicted user's ranking would teach nothing
        self.max_pending = min(options.max_pending_rankings, ctx.settings.max_users)
        ctx.extras[FUSION_WEIGHTS] = self.weights
        self._users = ctx.users
        self._metrics = ctx.metrics
        snapshots = Snapshots(ctx.js, f"{ctx.settings.stream_name}_STATE") if ctx.js is not None else None
        if snapshots is not None:
            await self._load(snapshots)
        saver = asyncio.create_task(self._save_periodically(snapshots)) if snapshots is not None else None
        try:
            yield
        finally:
            if saver is not None and snapshots is not None:
                saver.cancel()
                with suppress(asyncio.CancelledError):
                    await saver
                with suppress(Exception):
                    await self._save(snapshots)

    async def _save_periodically(self, snapshots: Snapshots) -> None:
        saved_at = self.feedbacks
        while True:
            await asyncio.sleep(SAVE_EVERY_S)
            if self.feedbacks != saved_at:
                try:
                    await self._save(snapshots)
                    saved_at = self.feedbacks
                except Exception as exc:
                    log.warning("could not save the fusion weights: %s", exc)

    @property
    def squares(self) -> dict[str, dict[str, float]]:
        """segment -> feature -> summed squared gradients of the weights each segment serves."""
        return {
            segment: self.learners[name].squares[segment]
            for segment, name in self.serving.items()
            if segment in self.learners[name].squares
        }

    async def _save(self, snapshots: Snapshots) -> None:
        for name, learner in self.learners.items():
            weights_key, squares_key = _keys(name)
            await snapshots.save(weights_key, learner.weights)
            await snapshots.save(squares_key, learner.squares)
        await snapshots.save(
            SELECTION_KEY,
            {
                "serving": self.serving,
                "evidence": self.evidence,
                "quality": {name: learner.quality for name, learner in self.learners.items()},
            },
        )

    async def _load(self, snapshots: Snapshots) -> None:
        # a snapshot from before there were two learners holds the first one's keys alone: the
        # other then learns from its initial weights
        for name, learner in self.learners.items():
            weights_key, squares_key = _keys(name)
            learner.weights.update(_tables(await snapshots.load(weights_key)))
            learner.squares.update(_tables(await snapshots.load(squares_key)))
        selection = await snapshots.load(SELECTION_KEY)
        if isinstance(selection, dict):
            serving = selection.get("serving")
            if isinstance(serving, dict):
                self.serving.update(
                    {str(k): v for k, v in serving.items() if isinstance(v, str) and v in self.learners}
                )
            self.evidence.update(_tables({"": selection.get("evidence")}).get("", {}))
            quality = _tables(selection.get("quality"))
            for name, learner in self.learners.items():
                learner.quality.update(quality.get(name, {}))
        # in the order the tables were saved, the first learner's first
        segments = dict.fromkeys(segment for learner in self.learners.values() for segment in learner.weights)
        for segment in segments:
            self._serve(segment, self.serving.get(segment, FIRST_LEARNER))

    def _serve(self, segment: str, name: str) -> None:
        self.serving[segment] = name
        self.weights[segment] = self.learners[name].weights.setdefault(segment, {})

    def _weight_list(self, segment: str, sources: list[str], plugins: list[str] | None = None) -> list[float]:
        if segment not in self.weights:
            self._serve(segment, self.serving.get(segment, FIRST_LEARNER))
        tables = [learner.weights.setdefault(segment, {}) for learner in self.learners.values()]
        for position, source in enumerate(sources):
            if any(source not in table for table in tables):
                # Before any feedback each plugin gets one vote, shared among its sources, so
                # a plugin with three popularity horizons does not outvote the others 3 to 1.
                share = plugins.count(plugins[position]) if plugins and plugins[position] else 1
                initial = self.initial.get(source, 0.0 if source == AGREEMENT else 1.0 / share)
                for table in tables:
                    table.setdefault(source, initial)
        table = self.weights[segment]
        return [table[s] for s in sources]

    def _weights(self, segment: str, sources: list[str], plugins: list[str] | None = None) -> np.ndarray:
        return np.array(self._weight_list(segment, sources, plugins))

    def _gains(self, count: int) -> np.ndarray:
        """``gain(1..count)``, kept between batches; from ``math.log2``, as one item's gain is."""
        if len(self._gain_table) < count:
            self._gain_table = np.array([gain(rank) for rank in range(1, max(count, 2 * len(self._gain_table)) + 1)])
        return self._gain_table

    @staticmethod
    def _log_scale(raw: np.ndarray, cells: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> None:
        """Puts the rows of the given cells, scores of count-like sources (``Candidates.counts``:
        popularity, co-occurrence) and the agreement count, on a log scale in place:
        ``log(1 + score / mean positive score)``.

        Such scores are heavy-tailed: on a linear scale a few blockbusters take the whole
        spread, every other candidate gets nearly the same z-score, and a linear ranker can
        no longer tell them apart by that source. The transform is close to linear below
        the row's mean and logarithmic above it: it keeps the order and the head's lead but
        compresses the tail, and dividing by the mean keeps it free of the source's units.
        Which rows are counts is the source's to say, not guessed from one list's values: a
        source's features must mean the same from one list to the next. ``raw`` holds 0
        where a source cannot score a candidate; ``cells`` masks the rows' cells, which lie
        one row after the other, from ``starts`` (in the masked cells) for ``lengths``."""
        if not len(starts):
            return
        counts = np.maximum(raw[cells], 0.0)
        # an all-zero row stays 0
        mean = np.add.reduceat(counts, starts) / np.maximum(np.add.reduceat(counts > 0, starts, dtype=np.int64), 1)
        # in single precision, where numpy's log is vectorised (log1p is not, in either): a
        # feature needs no more digits
        scaled = (counts / np.maximum(mean, TINY).repeat(lengths)).astype(np.float32)
        scaled += 1.0
        raw[cells] = np.log(scaled, out=scaled)

    @classmethod
    def _standardised_rows(cls, raw: np.ndarray, lengths: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Row-wise z-scores over each row's candidates, the rows lying one after the other in
        ``raw`` (``lengths`` cells each, none empty), with the rows that ``counts`` marks on a
        log scale first (``_log_scale``): scale-free, yet a clear favourite keeps its lead (a
        percentile would flatten that). A candidate a source cannot score (NaN or infinite)
        gets the floor. Overwrites ``raw`` (a float array).

        Every statistic is a ``reduceat`` over one row's cells, so a row's numbers do not
        depend on what other rows (other queries of a batch) lie beside it."""
        known = np.isfinite(raw)
        complete = bool(known.all())
        if not complete:
            raw = np.where(known, raw, 0.0)
        starts = lengths.cumsum() - lengths
        count_lengths = lengths[counts]
        cls._log_scale(raw, counts.repeat(lengths), count_lengths.cumsum() - count_lengths, count_lengths)
        known_counts = lengths if complete else np.maximum(np.add.reduceat(known, starts, dtype=np.int64), 1)
        deviation = raw - (np.add.reduceat(raw, starts) / known_counts).repeat(lengths)
        if not complete:
            deviation = np.where(known, deviation, 0.0)
        spread = np.sqrt(np.add.reduceat(deviation * deviation, starts) / known_counts)
        z = np.divide(deviation, np.where(spread > 0, spread, np.inf).repeat(lengths), out=deviation)
        if not complete:
            z[~known] = Z_MIN
        return np.clip(z, Z_MIN, Z_MAX, out=z)

    @classmethod
    def _standardised(cls, raw: np.ndarray, counts: list[int]) -> np.ndarray:
        """``_standardised_rows`` for one list: a (source, candidate) array, ``counts`` the
        rows of count-like sources. May overwrite ``raw``."""
        rows, width = raw.shape
        is_count = np.zeros(rows, dtype=bool)
        is_count[counts] = True
        flat = np.ascontiguousarray(raw, dtype=np.float64).ravel()
        return cls._standardised_rows(flat, np.full(rows, width), is_count).reshape(rows, width)

    @hookimpl(trylast=True)
    def recsys_fuse(self, query: Query, candidates: list[Candidates]) -> list[Scored] | None:
        """One query: a batch of one (the runner calls ``recsys_fuse_batch``)."""
        return self.recsys_fuse_batch([query], [candidates])[0]

    @hookimpl(trylast=True)
    def recsys_fuse_batch(self, queries: list[Query], candidates: list[list[Candidates]]) -> list[list[Scored] | None]:
        """Every query's lists fused at once, in a few numpy calls per batch rather than many per
        query and per source.

        The features of the whole batch lie in one array, row after row: one row per source of
        every query, then one per query for the agreement, each as long as the query's union
        of candidates. Statistics are reductions over one row's cells and fused scores are
        summed in row order, so each query's numbers are exactly those it gets alone.
        What stays per query is what cannot be shared: each source's ``score_of`` and the
        ``Scored`` entries."""
        answers: list[list[Scored] | None] = [[] for _ in queries]
        # a new ranking ends what the last one can teach, even one that keeps nothing (no
        # candidates, a failed source): the user has moved on from the old list
        for query in queries:
            self.pending.pop(query.user.user_id, None)
        kept = [
            (index, query, lists)
            for index, (query, found) in enumerate(zip(queries, candidates, strict=True))
            if (lists := [c for c in found if len(c.slots)])
        ]
        if not kept:
            return answers
        batch = len(kept)
        # the batch's sources, query after query: "flat" indexes them
        flat = [c for _, _, lists in kept for c in lists]
        per_query = np.array([len(lists) for _, _, lists in kept])
        source_query = np.arange(batch).repeat(per_query)

        # weights: looked up once per (segment, sources) layout of the batch
        segments = [segment_of(query.user.event_count) for _, query, _ in kept]
        names = [[c.source for c in lists] + [AGREEMENT] for _, _, lists in kept]
        layouts: dict[tuple[str, tuple[str, ...], tuple[str, ...]], list[float]] = {}
        source_weights: list[float] = []
        agreement_weights: list[float] = []
        for segment, sources, (_, _, lists) in zip(segments, names, kept):
            plugins = [c.plugin for c in lists] + [AGREEMENT]
            key = (segment, tuple(sources), tuple(plugins))
            weights = layouts.get(key)
            if weights is None:
                weights = layouts[key] = self._weight_list(segment, sources, plugins)
            source_weights += weights[:-1]
            agreement_weights.append(weights[-1])
        # one weight per feature row: every source of the batch, then each query's agreement
        weight_of_row = np.array(source_weights + agreement_weights)

        # Each query's union of candidates, all sorted at once under a key of (query, slot).
        # An entry is one slot of one source's list.
        lengths = np.array([len(c.slots) for c in flat])
        entry_slots = np.concatenate([c.slots for c in flat]).astype(np.int64, copy=False)
        entry_query = source_query.repeat(lengths)
        entry_source = np.arange(len(flat)).repeat(lengths)
        keys = entry_query * (int(entry_slots.max()) + 1) + entry_slots
        # a stable sort also tells where each entry went, which spares a search per entry;
        # equal keys keep the sources' order
        by_key = keys.argsort(kind="stable")
        ordered = keys[by_key]
        first = np.empty(len(keys), dtype=bool)
        first[0] = True
        np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
        entry_item = np.empty(len(keys), dtype=np.int64)  # the entry's place in the batch's unions
        entry_item[by_key] = first.cumsum() - 1
        union_slots = entry_slots[by_key[first]]
        union_query = entry_query[by_key[first]]
        sizes = np.bincount(union_query, minlength=batch)
        bounds = np.concatenate([[0], sizes.cumsum()])
        # proposals: one entry per (source, item), in that order; a source that lists an item
        # twice proposes it once
        once = first.copy()
        once[1:] |= entry_source[by_key[1:]] != entry_source[by_key[:-1]]
        proposals = by_key[once]
        agreement = np.bincount(entry_item[proposals], minlength=len(union_slots))

        # Raw scores, row after row: every source of the batch (query after query), then the
        # agreement of every query, which is the array of proposal counts as it is.
        pieces: list[np.ndarray] = []
        failed = []
        for q, ((lo, hi), (_, query, lists)) in enumerate(zip(pairwise(bounds.tolist()), kept, strict=True)):
            # a source that fails on one query fails that query alone, as it would alone
            try:
                pieces += self._source_scores(lists, union_slots[lo:hi])
            except Exception:
                log.exception("fusion: a source could not score the candidates of user %s", query.user.user_id)
                failed.append(q)
        if failed:
            return self._without(failed, kept, answers)
        row_lengths = np.concatenate((sizes[source_query], sizes))
        raw = np.concatenate([*pieces, agreement], dtype=np.float64)
        row_starts = row_lengths.cumsum() - row_lengths
        # a source's row is its place in the batch
        entry_cell = row_starts[: len(flat)].repeat(lengths) + entry_item - bounds[entry_query]
        unscored = np.array([c.score_of is None for c in flat])
        if unscored.any():
            # without score_of, an item's standing in a source is its rank gain (0 if absent)
            mask = unscored.repeat(lengths)
            rank = np.arange(len(keys)) - (lengths.cumsum() - lengths).repeat(lengths)
            raw[entry_cell[mask]] = self._gains(int(lengths.max()))[rank[mask]]
        # count-like rows, and the agreement rows (they count sources: counts too)
        is_count = np.ones(len(row_lengths), dtype=bool)
        is_count[: len(flat)] = [c.counts for c in flat]
        features = self._standardised_rows(raw, row_lengths, is_count)

        # fused score: each cell's weighted feature summed into its item, in row order
        row_query = np.concatenate((source_query, np.arange(batch)))
        cell_item = np.arange(len(raw)) - (row_starts - bounds[row_query]).repeat(row_lengths)
        fused = np.bincount(cell_item, weights=features * weight_of_row.repeat(row_lengths), minlength=len(union_slots))
        # one row per query, padded with -inf; a score that is not a number never makes a list
        by_query = np.full((batch, int(sizes.max())), -np.inf)
        by_query[union_query, np.arange(len(union_slots)) - bounds[union_query]] = np.where(
            np.isfinite(fused), fused, -np.inf
        )
        wanted = np.minimum([max(query.n_candidates, 0) for _, query, _ in kept], np.isfinite(by_query).sum(axis=1))
        top_n = int(wanted.max())
        # best first; ties in union (slot) order
        top = (-by_query).argsort(axis=1, kind="stable")[:, :top_n]
        listed = np.arange(top_n) < wanted[:, None]
        top_items = bounds[:-1, None] + top  # places in the batch's unions

        # Which sources proposed each listed item, strongest contribution first (for reasons):
        # the (item, source) proposals of listed items, sorted by place in the lists, then by
        # strength; ties keep the sources' order.
        n_listed = int(wanted.sum())
        place = np.full(len(union_slots), -1)
        place[top_items[listed]] = np.arange(n_listed)
        proposal_place = place[entry_item[proposals]]
        proposals = proposals[proposal_place >= 0]
        proposal_place = proposal_place[proposal_place >= 0]
        strength = features[entry_cell[proposals]] * weight_of_row[entry_source[proposals]]
        by_strength = entry_source[proposals[np.lexsort((-strength, proposal_place))]]
        proposer_names = np.array([c.source for c in flat], dtype=object)[by_strength].tolist()
        ends = np.bincount(proposal_place, minlength=n_listed).cumsum().tolist()
        scored = [
            Scored(slot, score, [], proposer_names[start:end])
            for slot, score, start, end in zip(
                union_slots[top_items[listed]].tolist(),
                fused[top_items[listed]].tolist(),  # listed items' scores are finite
                [0, *ends[:-1]],
                ends,
                strict=True,
            )
        ]
        list_ends = wanted.cumsum().tolist()
        for (index, _, _), start, end in zip(kept, [0, *list_ends[:-1]], list_ends, strict=True):
            answers[index] = scored[start:end]
        first_cells = row_starts[per_query.cumsum() - per_query]
        agreement_cells = row_starts[len(flat) :]
        self._remember_batch(
            kept, segments, names, union_slots, bounds, features, first_cells, agreement_cells, top, wanted
        )
        return answers

    @staticmethod
    def _source_scores(lists: list[Candidates], union: np.ndarray) -> list[np.ndarray]:
        """Each source's raw scores of one query's union; an unscored source's row is zero
        (filled with rank gains later)."""
        scores = [c.score_of(union) if c.score_of is not None else np.zeros(len(union)) for c in lists]
        for c, row in zip(lists, scores, strict=True):
            if len(row) != len(union):
                raise ValueError(f"source {c.source}: score_of gave {len(row)} scores for {len(union)} items")
        return scores

    def _without(
        self, failed: list[int], kept: list[tuple[int, Query, list[Candidates]]], answers: list[list[Scored] | None]
    ) -> list[list[Scored] | None]:
        """The batch fused again without the queries whose sources failed: those get no answer,
        as one query alone would (logged and counted as a failure), and the others the lists
        they get alone."""
        if self._metrics is not None:
            failures = self._metrics.plugin_failures.labels(plugin="fusion", hook="recsys_fuse_batch", kind="error")
            failures.inc(len(failed))
        left = [entry for q, entry in enumerate(kept) if q not in set(failed)]
        for q in failed:
            answers[kept[q][0]] = None
        for (index, _, _), answer in zip(
            left, self.recsys_fuse_batch([query for _, query, _ in left], [lists for _, _, lists in left]), strict=True
        ):
            answers[index] = answer
        return answers

    def _remember_batch(
        self,
        kept: list[tuple[int, Query, list[Candidates]]],
        segments: list[str],
        names: list[list[str]],
        union_slots: np.ndarray,
        bounds: np.ndarray,
        features: np.ndarray,
        first_cells: np.ndarray,
        agreement_cells: np.ndarray,
        top: np.ndarray,
        wanted: np.ndarray,
    ) -> None:
        """Keeps each ranking of the batch to learn from the user's choices until their next ranking, in query order
        (the order one query at a time would keep them, and draw their random negatives).
        ``features``: the batch's rows, a query's sources' from ``first_cells[q]``, its
        agreement's from ``agreement_cells[q]``."""
        # Only rankings of users the agent holds are remembered: a read for an unknown user
        # must not grow memory, and a user forgotten while an asynchronous source was awaited
        # must not come back here.
        chosen = [
            q
            for q, (_, query, _) in enumerate(kept)
            if query.user.event_count and (self._users is None or self._users.get(query.user.user_id) is query.user)
        ]
        if not chosen:
            return
        sizes = np.diff(bounds)[chosen]
        # negatives: the list the user was shown (its first k) and passed over, and a sample
        # of the rest of the candidates; keyed by (ranking, position), deduplicated at once
        sample = (self._uniforms(len(chosen)) * sizes[:, None]).astype(np.int64)
        shown_n = np.minimum([kept[q][1].k for q in chosen], wanted[chosen])
        head = top[chosen]
        in_head = np.arange(head.shape[1]) < shown_n[:, None]
        # a draw is below its union's size: the span is above every position
        span = int(sizes.max()) + 1
        owner = np.arange(len(chosen))[:, None] * span
        keys = sorted_unique(np.concatenate([(head + owner)[in_head], (sample + owner).ravel()]))
        shown_bounds = np.searchsorted(keys, np.arange(len(chosen) + 1) * span).tolist()
        sampled_keys = sorted_unique((sample + owner).ravel())
        sampled_bounds = np.searchsorted(sampled_keys, np.arange(len(chosen) + 1) * span).tolist()
        starts = zip(
            chosen, sizes.tolist(), first_cells[chosen].tolist(), agreement_cells[chosen].tolist(), strict=True
        )
        for j, (q, size, start, agreement) in enumerate(starts):
            sources = names[q]
            # one row per feature, in single precision: a feature needs no more digits, and
            # rankings are many
            rows = np.concatenate(
                (features[start : start + (len(sources) - 1) * size], features[agreement : agreement + size]),
                dtype=np.float32,
            )
            ranking = Ranking(
                segments[q],
                sources,
                union_slots[bounds[q] : bounds[q + 1]].copy(),
                rows.reshape(len(sources), size),
                keys[shown_bounds[j] : shown_bounds[j + 1]] - j * span,
                sampled_keys[sampled_bounds[j] : sampled_bounds[j + 1]] - j * span,
                head[j, : shown_n[j]].copy(),
            )
            self._remember(kept[q][1].user.user_id, ranking)

    def _uniforms(self, rankings: int) -> np.ndarray:
        """``RANDOM_NEGATIVES`` uniform draws for each of ``rankings`` rankings, one row each: the
        same draws, in the same order, whether the rankings come one by one or in a batch."""
        # drawn a few thousand at a time: one generator call per ranking costs more than the rest
        parts = []
        while rankings:
            if self._uniform_at + RANDOM_NEGATIVES > len(self._uniform_pool):
                self._uniform_pool = self._rng.random(64 * RANDOM_NEGATIVES)
                self._uniform_at = 0
            take = min(rankings, (len(self._uniform_pool) - self._uniform_at) // RANDOM_NEGATIVES)
            parts.append(self._uniform_pool[self._uniform_at : self._uniform_at + take * RANDOM_NEGATIVES])
            self._uniform_at += take * RANDOM_NEGATIVES
            rankings -= take
        return np.concatenate(parts).reshape(-1, RANDOM_NEGATIVES)

    def _remember(self, user_id: str, ranking: Ranking) -> None:
        self.pending[user_id] = ranking
        self.pending.move_to_end(user_id)
        if len(self.pending) > self.max_pending:
            self.pending.popitem(last=False)

    @hookimpl(tryfirst=True)
    def recsys_apply_event(self, user: UserState, slot: int, signal: float) -> None:
        """One event: a batch of one (the runner calls ``recsys_apply_events``)."""
        self.recsys_apply_events([user], [slot], [signal])

    @hookimpl(tryfirst=True)
    def recsys_apply_events(self, users: list[UserState], slots: list[int], signals: list[float]) -> None:
        """One pairwise step per event whose item was among its user's last candidates.

        tryfirst: the chosen items' features must be read before the sources learn from them.
        Every event's pairs are gathered at once; the steps themselves are taken one event
        after the other, in stream order, as each starts from the weights the one before left
        in its segment."""
        chosen: list[tuple[Ranking, int]] = []
        for user, slot, signal in zip(users, slots, signals, strict=True):
            if signal <= 0:
                # a rejection ends what the list can teach: the next ranking answers it
                self.pending.pop(user.user_id, None)
                continue
            ranking = self.pending.get(user.user_id)
            if ranking is None:
                continue
            position = int(ranking.union.searchsorted(slot))
            if position < len(ranking.union) and ranking.union[position] == slot and position not in ranking.chosen:
                chosen.append((ranking, position))
        if not chosen:
            return
        # each learner's pairs, read before the choices join the rankings' earlier ones
        by_field = {negatives: self._differences(chosen, negatives) for negatives in NEGATIVE_FIELDS}
        pairs = {name: by_field[learner.negatives] for name, learner in self.learners.items()}
        for ranking, position in chosen:
            ranking.chosen.append(position)
        layouts = list(dict.fromkeys((ranking.segment, tuple(ranking.sources)) for ranking, _ in chosen))
        for segment, sources in layouts:
            # a source new to the segment starts at its initial weight
            self._weight_list(segment, list(sources))
        steps = {name: _Steps(learner, layouts) for name, learner in self.learners.items()}
        rate = self.learning_rate
        for i, (ranking, position) in enumerate(chosen):
            layout = (ranking.segment, tuple(ranking.sources))
            # each learner is judged by the place its weights, as they were before this
            # feedback, gave the chosen item, and then learns from it
            gains = {}
            for name, learner_steps in steps.items():
                gains[name] = self._gain_of(ranking, position, learner_steps.weights_of(layout))
                differences = pairs[name][i]
                if differences is not None:
                    learner_steps.step(layout, differences, rate * learner_steps.learner.rate_share)
            self._judge(ranking.segment, gains)
            self.feedbacks += pairs[FIRST_LEARNER][i] is not None
        for learner_steps in steps.values():
            learner_steps.write_back()

    def _gain_of(self, ranking: Ranking, position: int, weights: np.ndarray) -> float:
        """The NDCG gain of the chosen item's place among the ranking's candidates under
        ``weights`` (ties in its favour). Elementwise, for the reason the steps are."""
        scores = np.add.reduce(ranking.features * weights[:, None], axis=0)
        rank = int(np.count_nonzero(scores > scores[position]))
        return float(self._gains(rank + 1)[rank])

    def _judge(self, segment: str, gains: dict[str, float]) -> None:
        """Adds one feedback's gains to the learners' quality in the segment, and serves the
        other learner's weights there once it leads clearly, on enough evidence."""
        keep = 1.0 - QUALITY_DECAY
        evidence = self.evidence[segment] = self.evidence.get(segment, 0.0) * keep + 1.0
        for name, gain in gains.items():
            quality = self.learners[name].quality
            quality[segment] = quality.get(segment, 0.0) * keep + gain
        if evidence < SWITCH_EVIDENCE:
            return
        served = self.serving.get(segment, FIRST_LEARNER)
        ahead = self.learners[served].quality[segment] * (1.0 + SWITCH_MARGIN)
        for name, learner in self.learners.items():
            if name != served and learner.quality[segment] > ahead:
                log.info(
                    "fusion: segment %s serves the %s learner (quality %.1f against %.1f over about %d feedbacks)",
                    segment,
                    name,
                    learner.quality[segment],
                    self.learners[served].quality[segment],
                    evidence,
                )
                self._serve(segment, name)
                return

    @staticmethod
    def _differences(chosen: list[tuple[Ranking, int]], negatives: str = LEARNERS[0][1]) -> list[np.ndarray | None]:
        """For each (ranking, position of the chosen item): the chosen item's features minus
        those of each negative (the items in the ranking's field ``negatives`` but itself), in
        double precision; None where it has no negative. Gathered for all rankings of one
        width at once."""
        out: list[np.ndarray | None] = [None] * len(chosen)
        by_width: dict[int, list[int]] = {}
        for i, (ranking, _) in enumerate(chosen):
            by_width.setdefault(len(ranking.features), []).append(i)
        for group in by_width.values():
            rankings = [chosen[i][0] for i in group]
            features = np.concatenate([r.features for r in rankings], axis=1)
            starts = np.cumsum([0] + [len(r.union) for r in rankings[:-1]])
            positions = np.array([chosen[i][1] for i in group]) + starts
            negative_sets = [getattr(r, negatives) for r in rankings]
            shown = np.concatenate(negative_sets)
            owner = np.arange(len(group)).repeat([len(n) for n in negative_sets])
            shown = shown + starts[owner]
            negative = shown != positions[owner]
            earlier = [p + start for r, start in zip(rankings, starts.tolist(), strict=True) for p in r.chosen]
            if earlier:
                # an item chosen earlier from the same list is no negative of the next choice
                negative &= ~np.isin(shown, earlier)
            owner = owner[negative]
            # one row per pair, one column per feature
            chosen_minus_negative = features[:, positions[owner]].astype(np.float64) - features[:, shown[negative]]
            differences = np.ascontiguousarray(chosen_minus_negative.T)
            ends = np.bincount(owner, minlength=len(group)).cumsum().tolist()
            for i, lo, hi in zip(group, [0, *ends[:-1]], ends, strict=True):
                if hi > lo:
                    out[i] = differences[lo:hi]
        return out

    @hookimpl
    def recsys_forget_user(self, user_id: str) -> None:
        self.pending.pop(user_id, None)

    @hookimpl
    def recsys_export_user(self, user_id: str, catalog: Catalog) -> dict[str, Any] | None:
        ranking = self.pending.get(user_id)
        if ranking is None:
            return None
        # kept until the user's next ranking, to learn which source proposed what they chose
        return {
            "last_ranking": {
                "segment": ranking.segment,
                "sources": list(ranking.sources),
                "candidates": len(ranking.union),
                "shown": [catalog.ids[int(ranking.union[position])] for position in ranking.listed],
            }
        }


def _tables(saved: object) -> dict[str, dict[str, float]]:
    """segment -> feature -> number, from a snapshot as loaded; anything else in it is dropped.
    A number that is not finite (NaN is saved as null) is learned again rather than failing
    the start."""
    if not isinstance(saved, dict):
        return {}
    return {
        str(segment): {
            str(k): float(v)
            for k, v in table.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        }
        for segment, table in saved.items()
        if isinstance(table, dict)
    }


class _Steps:
    """One learner's weights in the segments that a call teaches, held as arrays while its
    steps run: a step reads and writes its weights with one gather and one scatter, not a dict
    access per source; written back to the learner's tables at the end."""

    def __init__(self, learner: Learner, layouts: list[tuple[str, tuple[str, ...]]]) -> None:
        self.learner = learner
        segments = list(dict.fromkeys(segment for segment, _ in layouts))
        self.arrays = {segment: np.array(list(learner.weights[segment].values())) for segment in segments}
        # each weight's summed squared gradients, in the order of its segment's weights
        self.sums = {
            segment: np.array([learner.squares.get(segment, {}).get(f, 0.0) for f in learner.weights[segment]])
            for segment in segments
        }
        index = {segment: {f: i for i, f in enumerate(learner.weights[segment])} for segment in segments}
        self.places = {
            (segment, sources): np.array([index[segment][f] for f in sources]) for segment, sources in layouts
        }

    def weights_of(self, layout: tuple[str, tuple[str, ...]]) -> np.ndarray:
        return self.arrays[layout[0]][self.places[layout]]

    def step(self, layout: tuple[str, tuple[str, ...]], differences: np.ndarray, rate: float) -> None:
        values, squares, place = self.arrays[layout[0]], self.sums[layout[0]], self.places[layout]
        weights = values[place]
        # Elementwise products and sums, not matrix products: the same numbers whichever
        # batch the pairs came in (a BLAS kernel may add in another order on another
        # block). The arrays are tiny: ufuncs called directly, without numpy's wrappers.
        margins = np.add.reduce(differences * weights, axis=1)
        # logistic pairwise loss: pairs already ordered well barely move the weights
        pull = 1.0 / (1.0 + np.exp(np.minimum(np.maximum(margins, -30.0), 30.0)))
        gradient = np.add.reduce(differences * pull[:, None], axis=0) / len(differences) - L2 * weights
        summed = squares[place] + gradient * gradient
        squares[place] = summed
        values[place] = weights + rate * gradient / (np.sqrt(summed) + EPSILON)

    def write_back(self) -> None:
        for segment, values in self.arrays.items():
            table = self.learner.weights[segment]
            features = list(table)
            table.update(zip(features, values.tolist(), strict=True))
            self.learner.squares[segment] = dict(zip(features, self.sums[segment].tolist(), strict=True))


def _keys(learner: str) -> tuple[str, str]:
    """The snapshot keys of a learner's weights and squared-gradient sums; the first learner's
    are those saved before there were two."""
    if learner == FIRST_LEARNER:
        return SNAPSHOT_KEY, SQUARES_KEY
    return f"fusion.{learner}.weights", f"fusion.{learner}.squares"
