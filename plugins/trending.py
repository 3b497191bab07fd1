"""Trending: popularity with exponential time decay, learned from every event."""

from __future__ import annotations

import bisect
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import numpy as np

from agent.config import ConfigError
from agent.context import AgentContext
from agent.hooks.specs import hookimpl
from agent.pipeline.catalog import Catalog, grow
from agent.pipeline.taste_signals import rating_share
from agent.pipeline.user_state import UserState
from agent.pipeline.values import Candidates, Query, first_allowed, sorted_unique, top_slots
from agent.wire.contract import Event

# How much one event says about an item's appeal. Negative feedback adds nothing rather than
# subtracting: one user's skip says little about the crowd.
EVENT_WEIGHTS: dict[str, float] = {
    "view": 1.0,
    "click": 1.0,
    "like": 2.0,
    "add_to_cart": 2.0,
    "purchase": 3.0,
    "rate": 1.0,
    "dislike": 0.0,
    "skip": 0.0,
}


HEAD_DEPTH = 256
DEFAULT_HALF_LIVES: dict[str, float] = {"trending": 0.0, "popular_week": 7 * 86_400.0, "popular_month": 30 * 86_400.0}
REASONS = {"trending": "trending now", "popular_week": "popular this week", "popular_month": "popular this month"}
# A batch reads this many times the longest list asked for from the top of each head, for all
# its queries at once: enough for most queries, even those for a few categories; a query that
# finds too few there reads the whole head. Longer costs little: numpy's calls cost more than
# the elements they go through.
HEAD_PREFIX = 4
# Below this many queries a batch is answered one query at a time: the vectorised form costs
# some forty numpy calls a batch, which pay only once shared by several queries (measured: even
# at 8, faster at 16 and more).
VECTORISED_FROM = 8


def allowed_at(queries: list[Query], slots: np.ndarray) -> np.ndarray:
    """(queries, slots) booleans: whether each query may be proposed each of ``slots``. One
    gather per query, of the slots only: stacking the catalog-sized masks would cost a copy of
    the catalog per query. A slot past a query's mask (the catalog grew after the mask was
    made) is not allowed, as ``first_allowed`` has it."""
    if not len(slots):
        return np.zeros((len(queries), 0), dtype=bool)
    bound = int(slots.max()) + 1
    rows = []
    for query in queries:
        allowed = query.allowed()
        if len(allowed) >= bound:
            rows.append(allowed[slots])
        else:
            inside = slots < len(allowed)
            rows.append(inside & allowed[np.where(inside, slots, 0)] if len(allowed) else inside)
    return np.stack(rows)


def first_allowed_batch(
    ok: np.ndarray, ns: np.ndarray, keep: np.ndarray | None = None
) -> tuple[np.ndarray, list[int], np.ndarray]:
    """``first_allowed`` for a batch, in a few array operations: ``ok[i]`` says which positions
    of one ordered list query ``i`` may see. Returns (columns, bounds, enough): the positions
    of row ``i``'s first ``ns[i]`` allowed entries are ``columns[bounds[i]:bounds[i + 1]]``,
    best first, and ``enough[i]`` says whether it found that many. ``keep`` drops positions
    from what was chosen, afterwards (as ``top`` drops the scores that decayed to zero)."""
    take = ok & (np.cumsum(ok, axis=1) <= ns[:, None])
    enough = take.sum(axis=1) == ns
    if keep is not None:
        take &= keep
    # np.nonzero lists the entries row by row: each row's are a run
    rows, columns = np.nonzero(take)
    return columns, np.searchsorted(rows, np.arange(len(ns) + 1)).tolist(), enough


class DecayedCounts:
    """Popularity with exponential time decay.

    Scores are kept in units relative to a moving reference time: adding an event costs O(1)
    and every score decays by the same factor, so ranking never needs a sweep.
    """

    def __init__(self, half_life_s: float, depth: int = HEAD_DEPTH) -> None:
        self.rate = math.log(2) / half_life_s
        self.scores = np.zeros(1024)
        self.reference_ts: float | None = None
        # The head: a superset of the ``depth`` best items, kept exactly and in order. Scores
        # only grow (in reference units), so an item outside the head can only enter through
        # add(), and an item in it can only move up: one event costs a few swaps, not a sort.
        self.depth = depth
        self.head: dict[int, float] = {}
        # head slots, best first, and their negated scores (ascending, for bisect)
        self.order: list[int] = []
        self.keys: list[float] = []
        self.head_floor = 0.0

    def add(self, slot: int, weight: float, ts: float) -> None:
        self.add_many([(slot, weight, ts)])

    def add_many(self, entries: list[tuple[int, float, float]]) -> None:
        """``add(slot, weight, ts)`` for each entry, in order. Each event still updates the head
        in turn (the order of equal scores in it depends on the order of the updates); what a
        batch saves is the array growth and the exponential, once per distinct timestamp
        (events come in bursts that share one)."""
        if not entries:
            return
        self.scores = grow(self.scores, max(slot for slot, _, _ in entries) + 1)
        head, depth = self.head, self.depth
        last_exponent, boost = math.nan, 1.0
        for slot, weight, ts in entries:
            if self.reference_ts is None:
                self.reference_ts = ts
            exponent = (ts - self.reference_ts) * self.rate
            if exponent > 50:
                self._rebase(ts, exponent)
                exponent = 0.0
            if exponent != last_exponent:
                boost = math.exp(exponent)
                last_exponent = exponent
            # a Python float sum is the same IEEE addition as numpy's, without its scalars
            value = self.scores.item(slot) + weight * boost
            self.scores[slot] = value
            if slot in head or value > self.head_floor or len(head) < depth:
                previous = head.get(slot)
                head[slot] = value
                self._reposition(slot, previous, value)
                if len(self.order) > 2 * depth:
                    for dropped in self.order[depth:]:
                        del head[dropped]
                    del self.order[depth:], self.keys[depth:]
                    self.head_floor = head[self.order[-1]]

    def _rebase(self, ts: float, exponent: float) -> None:
        # Move the reference forward before exp() overflows; rescaling keeps the order. In
        # place, so that add_many's reference to the head stays valid.
        factor = math.exp(-exponent)
        self.scores *= factor
        for slot in self.head:
            self.head[slot] *= factor
        self.keys[:] = [k * factor for k in self.keys]
        self.head_floor *= factor
        self.reference_ts = ts

    def _reposition(self, slot: int, previous: float | None, value: float) -> None:
        # Binary searches and list moves in C: an event costs microseconds, never a sort.
        order, keys = self.order, self.keys
        if previous is not None:
            at = bisect.bisect_left(keys, -previous)
            while order[at] != slot:  # equal scores: the slot is among them
                at += 1
            del order[at], keys[at]
        at = bisect.bisect_left(keys, -value)
        order.insert(at, slot)
        keys.insert(at, -value)

    def top(self, n: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` best allowed slots with a positive score, from the head when it suffices."""
        chosen = first_allowed(self.order, n, allowed)
        if len(chosen) == n or len(self.head) < self.depth:
            scores = self.scores[chosen]
            # scores that decayed below float range read as zero: not trending any more
            keep = scores > 0
            return chosen[keep], scores[keep]
        # the user has excluded most of the head: a full scan is exact
        scores = self.view(len(allowed))
        return top_slots(scores, n, allowed & (scores > 0))

    def top_batch(
        self, queries: list[Query], prefix: np.ndarray, ok: np.ndarray
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """``top(query.n_candidates, query.allowed())`` for every query, as ``first_allowed``
        reads: ``prefix`` is the start of the head's order (an array), ``ok`` which of it each
        query may see. The prefix answers most queries at once; those that excluded most of it
        read the whole head (together), and those short of n there as well (they excluded most
        of it) go through ``top`` and its full scan."""
        ns = np.fromiter((query.n_candidates for query in queries), dtype=np.int64, count=len(queries))
        found = self._first_in(prefix, ok, ns, whole=len(prefix) == len(self.order))
        missing = [i for i, answer in enumerate(found) if answer is None]
        if missing:
            head = np.array(self.order, dtype=np.int64)
            again = self._first_in(head, allowed_at([queries[i] for i in missing], head), ns[missing], whole=True)
            for i, answer in zip(missing, again):
                found[i] = answer
        complete = len(self.head) < self.depth
        out = []
        for query, answer in zip(queries, found):
            assert answer is not None
            slots, values, enough = answer
            out.append((slots, values) if enough or complete else self.top(query.n_candidates, query.allowed()))
        return out

    def _first_in(
        self, slots: np.ndarray, ok: np.ndarray, ns: np.ndarray, *, whole: bool
    ) -> list[tuple[np.ndarray, np.ndarray, bool] | None]:
        """Per row of ``ok``: the first ``ns[i]`` allowed of ``slots`` (a prefix of the head)
        with a positive score, their scores, and whether there were ``ns[i]`` allowed; None
        where there were not and ``slots`` is not the whole head (more may follow)."""
        scores = self.scores[slots]
        columns, bounds, enough = first_allowed_batch(ok, ns, scores > 0)
        chosen, values = slots[columns], scores[columns]
        return [
            (chosen[bounds[j] : bounds[j + 1]], values[bounds[j] : bounds[j + 1]], found) if found or whole else None
            for j, found in enumerate(enough.tolist())
        ]

    def view(self, size: int) -> np.ndarray:
        self.scores = grow(self.scores, size)
        return self.scores[:size]


@dataclass(frozen=True, slots=True)
class TrendingOptions:
    # source name -> half-life; empty: DEFAULT_HALF_LIVES; "trending" = 0: the agent's setting
    half_lives_s: dict[str, float] = field(default_factory=dict)


class Trending:
    """One candidate source per half-life, so that fusion learns which horizon predicts best
    (news wants hours, films weeks). Sources: ``trending`` (the ``trending_half_life_s``
    setting), ``popular_week`` and ``popular_month``.

    Options (``[plugins.trending]``): ``half_lives_s`` (source name -> half-life in seconds,
    replacing the defaults).
    """

    def __init__(self) -> None:
        self.counters: dict[str, DecayedCounts] = {}
        self.rating_max = 10.0

    @hookimpl
    async def recsys_lifespan(self, ctx: AgentContext) -> AsyncIterator[None]:
        configured = ctx.options("trending", TrendingOptions).half_lives_s
        half_lives = dict(configured) if configured else dict(DEFAULT_HALF_LIVES)
        if "trending" in half_lives and not half_lives["trending"]:
            half_lives["trending"] = ctx.settings.trending_half_life_s
        for name, half_life in half_lives.items():
            if half_life <= 0:
                raise ConfigError(
                    f"[plugins.trending] option 'half_lives_s.{name}' must be a positive number of seconds"
                )
        self.counters = {name: DecayedCounts(float(h)) for name, h in half_lives.items()}
        self.rating_max = ctx.settings.rating_max
        yield

    def _weight(self, event: Event) -> float:
        weight = EVENT_WEIGHTS.get(event.type, 0.0)
        if event.type == "rate" and event.value is not None:
            # A rating counts as an interaction whatever its value; high ratings a bit more.
            weight = 1.0 + rating_share(event.value, self.rating_max)
        return weight

    @hookimpl
    def recsys_apply_event(self, event: Event, user: UserState, slot: int, catalog: Catalog) -> None:
        self.recsys_apply_events([event], [slot])

    @hookimpl
    def recsys_apply_events(self, events: list[Event], slots: list[int]) -> None:
        entries = []
        for event, slot in zip(events, slots):
            weight = self._weight(event)
            if weight > 0.0:
                entries.append((slot, weight, event.ts))
        # the horizons are independent: each takes the whole batch in turn
        for counter in self.counters.values():
            counter.add_many(entries)

    @hookimpl
    def recsys_candidates(self, query: Query) -> list[Candidates] | None:
        return self.recsys_candidates_batch([query])[0]

    @hookimpl
    def recsys_candidates_batch(self, queries: list[Query]) -> list[list[Candidates] | None]:
        if not queries:
            return []
        catalog = queries[0].catalog
        if len(queries) > 1 and any(query.catalog is not catalog for query in queries):
            return [self.recsys_candidates_batch([query])[0] for query in queries]
        size = catalog.size
        if size == 0 or not self.counters:
            return [None] * len(queries)
        tops = self._tops(queries) if len(queries) >= VECTORISED_FROM else self._tops_one_by_one(queries)
        answers: list[list[Candidates]] = [[] for _ in queries]
        for name, counter in self.counters.items():
            # one score lookup per horizon for the whole batch: fusion reads the live scores
            score_of = _lookup(counter.view(size))
            reason = REASONS.get(name, name)
            for found, (slots, values) in zip(answers, tops[name]):
                if len(slots):
                    found.append(
                        Candidates(
                            source=name, slots=slots, scores=values, reasons=reason, score_of=score_of, counts=True
                        )
                    )
        return [found or None for found in answers]

    def _tops_one_by_one(self, queries: list[Query]) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
        return {
            name: [counter.top(query.n_candidates, query.allowed()) for query in queries]
            for name, counter in self.counters.items()
        }

    def _tops(self, queries: list[Query]) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
        """Each horizon's best allowed items for every query. Once per batch: the top of each
        head (``HEAD_PREFIX`` times the longest list asked for) as an array, and one gather per
        query of its mask over those prefixes together (they overlap)."""
        looked = HEAD_PREFIX * max(query.n_candidates for query in queries)
        prefixes = {name: np.array(counter.order[:looked], dtype=np.int64) for name, counter in self.counters.items()}
        union = sorted_unique(np.concatenate(list(prefixes.values())))
        ok = allowed_at(queries, union)
        return {
            name: counter.top_batch(queries, prefixes[name], ok[:, np.searchsorted(union, prefixes[name])])
            for name, counter in self.counters.items()
        }


def _lookup(scores: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    def score_of(wanted: np.ndarray) -> np.ndarray:
        return scores[wanted]

    return score_of
