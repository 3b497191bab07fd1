"""Sequence model: a next-item model trained on the stream, served in the batched hot path.

A small SASRec-style self-attention model over each user's latest items (``model.py``) whose
item input is the item's text vector (the content plugin's MiniLM vectors) projected beside a
learned id embedding: an item is rankable as soon as it has a vector, before any event names
it. The plugin:

- keeps the latest positive events (``stream.py``) and, every ``every_events`` of them (or
  every ``every_s`` seconds, live), trains a round in a worker process at low priority
  (``worker.py``, ``training.py``), warm-started from the previous version;
- swaps the new version in atomically: a batch of queries reads the served version once, so
  every answer comes from one version (``version.py``); ``recsys_sequence_model_version`` in
  ``/metrics`` names it, and ``ctx.extras[SEQUENCE_MODEL]`` reports every round;
- answers ``recsys_candidates_batch`` with one forward pass (in numpy, ``forward.py``) per
  batch, scoring every rankable item of the catalog;
- with a bus, shares versions through JetStream (``sharing.py``): one agent trains and
  publishes, the others load what it published.

Replays: rounds are paced by the event count only (the time cadence needs a wall clock), on
the events applied before the round. A version trained at pipeline time T in S seconds of
wall time is served from pipeline time T + S: in a replay, the events of those seconds (at
the stream's own pace) are still ranked by the previous version, as they would be live.
``recsys_settle`` waits for the round in flight: a replay that calls ``Pipeline.settle()``
after each batch gets the same versions at the same events on every run, and the wait is
its time. ``training = "inline"`` does that without the replay's help: the apply that
triggers a round waits for it (no sharing through NATS in that mode).

Without torch the plugin is disabled with a message that says which extra brings it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import numpy as np
from prometheus_client import Counter, Gauge

from agent.chained_tasks import settle_chain
from agent.context import AgentContext
from agent.hooks.manager import missing_extra
from agent.hooks.specs import hookimpl
from agent.pipeline.catalog import Catalog
from agent.pipeline.extras import ITEM_VECTORS, Key
from agent.pipeline.recent_events import RecentEvents
from agent.pipeline.user_state import UserState
from agent.pipeline.values import Candidates, Query
from agent.threads import in_daemon_thread
from agent.vectors.item_vectors import ItemVectors, top_allowed
from agent.wire.contract import Event, Item
from plugins.sequence.forward import encode, score_rows
from plugins.sequence.options import SequenceOptions
from plugins.sequence.sharing import SharedVersions
from plugins.sequence.stream import TrainingJob, make_job
from plugins.sequence.version import ItemTable, Served, Version
from plugins.sequence.worker import TrainingFailed, TrainingWorker

__all__ = ["SEQUENCE_MODEL", "SequenceOptions", "SequenceSource", "Version"]

log = logging.getLogger(__name__)

# the name this plugin is registered under (agent/hooks/manager.py) and the source it proposes
PLUGIN_NAME = "sequence"
SOURCE = "sequence"
# the served version and every round, for the replay's report (JSON-ready)
SEQUENCE_MODEL: Key[dict[str, Any]] = Key("sequence_model")
# the MiniLM's width: the text input of a model trained before any item vector exists
DEFAULT_TEXT_DIM = 384
# a pipeline clock this far from wall time is a replay's event clock: no time cadence there
LIVE_CLOCK_TOLERANCE_S = 3_600.0
STOP_TIMEOUT_S = 2.0
# rounds kept in the report
REPORTED_ROUNDS = 200


@dataclass(slots=True)
class _Prepared:
    """A round's job and what its table is built from, taken on the loop's thread."""

    job: TrainingJob
    ids: list[str]
    # the slot of each of the job's items
    item_slots: np.ndarray
    trigger: float
    events_seen: int


class SequenceSource:
    """Options (``[plugins.sequence]``): see ``SequenceOptions`` (``options.py``): ``enabled``,
    the cadence (``every_events``, ``every_s``, ``min_events``, ``window_events``),
    ``training`` (``background`` or ``inline``), the model's shape and training settings,
    the worker's ``nice``, and ``poll_s`` / ``lease_s`` for sharing through NATS."""

    def __init__(self) -> None:
        self.options = SequenceOptions()
        self.enabled = False
        self.disabled_reason: str | None = None
        self.agent_id = uuid.uuid4().hex[:12]
        self.recent = RecentEvents(1)  # sized at start, when enabled: a disabled plugin holds no window
        # the version every query is answered by, and versions trained but not servable yet
        self.served: Served | None = None
        self.pending: deque[Served] = deque()
        # the newest version this agent has (served or pending): numbering, warm starts
        self.latest: Version | None = None
        self.new_events = 0
        self.last_round_at = time.monotonic()
        # the highest version number published on the bus, seen at the last look
        self._published_number = 0
        self.rounds: list[dict[str, Any]] = []
        self.failure: str | None = None
        self.worker: TrainingWorker | None = None
        self.sharing: SharedVersions | None = None
        self._ctx: AgentContext | None = None
        self._round: asyncio.Task[None] | None = None
        self._again = False
        self._version_gauge: Gauge | None = None
        self._seconds_gauge: Gauge | None = None
        self._versions: Counter | None = None

    # -- lifespan ------------------------------------------------------------------------------

    @hookimpl
    async def recsys_lifespan(self, ctx: AgentContext) -> AsyncIterator[None]:
        self.options = options = ctx.options(PLUGIN_NAME, SequenceOptions)
        self._ctx = ctx
        if not options.enabled:
            yield
            return
        self.disabled_reason = missing_extra(PLUGIN_NAME, "torch")
        if self.disabled_reason is not None:
            log.warning(self.disabled_reason)
            yield
            return
        self.enabled = True
        self.recent = RecentEvents(options.window_events)
        registry = ctx.metrics.registry
        self._version_gauge = Gauge(
            "recsys_sequence_model_version", "Version of the sequence model served (0: none yet)", registry=registry
        )
        self._seconds_gauge = Gauge(
            "recsys_sequence_training_seconds", "Wall seconds of the latest training round", registry=registry
        )
        self._versions = Counter(
            "recsys_sequence_versions",
            "Sequence model versions this agent trained, loaded from another agent, or failed to make",
            ["outcome"],
            registry=registry,
        )
        # inline, the agent waits for the round: a lower priority would only make it wait longer
        self.worker = TrainingWorker(options.nice if options.training == "background" else 0)
        poller = None
        if ctx.js is not None and options.training == "background":
            self.sharing = SharedVersions(ctx.js, ctx.settings.stream_name, self.agent_id, options.lease_s)
            poller = asyncio.create_task(self._poll(), name="sequence-versions")
        ctx.extras[SEQUENCE_MODEL] = self.report()
        try:
            yield
        finally:
            self.enabled = False
            # the worker first: a round in flight then ends (its thread gets TrainingFailed)
            await asyncio.to_thread(self.worker.close)
            for task in (poller, self._round):
                if task is not None:
                    task.cancel()
                    with suppress(asyncio.CancelledError):
                        await task
            if self.sharing is not None:
                with suppress(Exception):
                    async with asyncio.timeout(STOP_TIMEOUT_S):
                        await self.sharing.release()
            ctx.extras.pop(SEQUENCE_MODEL, None)

    @hookimpl
    def recsys_settle(self) -> Any:
        # a round may chain another (events that came meanwhile): the last is waited for
        return settle_chain(lambda: self._round)

    @hookimpl
    def recsys_health(self) -> dict[str, object] | None:
        return {"training_failed": self.failure} if self.enabled and self.failure else None

    # -- learning ------------------------------------------------------------------------------

    @hookimpl
    def recsys_apply_events(
        self, events: list[Event], users: list[UserState], slots: list[int], signals: list[float]
    ) -> None:
        if not self.enabled:
            return
        positive = [i for i, signal in enumerate(signals) if signal > 0]
        if positive:
            self.recent.append(
                [users[i].user_id for i in positive], [slots[i] for i in positive], [events[i].ts for i in positive]
            )
            self.new_events += len(positive)
        self._promote(self._clock())
        if self._due():
            self._start_round()

    @hookimpl
    def recsys_forget_user(self, user_id: str) -> None:
        self.recent.forget(user_id)

    @hookimpl
    def recsys_catalog_upsert(self, items: list[Item], slots: list[int], changed: list[bool]) -> None:
        if not self.enabled:
            return
        vectors = self._vectors()
        # an item whose text changed gets its row again once its new vector is there
        stale = {slot: (vectors.hashes.get(slot) if vectors else None) for slot, c in zip(slots, changed) if c}
        for served in self._tables():
            served.table.stale.update(stale)

    def _tables(self) -> list[Served]:
        return [served for served in (self.served, *self.pending) if served is not None]

    def _clock(self) -> float:
        return self._ctx.clock() if self._ctx is not None else time.time()

    def _vectors(self) -> ItemVectors | None:
        return self._ctx.extras.get(ITEM_VECTORS) if self._ctx is not None else None

    def _due(self) -> bool:
        options = self.options
        if self.new_events >= options.every_events:
            return True
        if not options.every_s or self.new_events < options.min_events:
            return False
        live = abs(self._clock() - time.time()) < LIVE_CLOCK_TOLERANCE_S
        return live and time.monotonic() - self.last_round_at >= options.every_s

    def start_round(self) -> None:
        """Start a round now, whatever the cadence (background: in a task; inline: here)."""
        if self.enabled:
            self._start_round()

    def _start_round(self) -> None:
        if self.options.training == "inline":
            self._round_inline()
            return
        if self._round is not None and not self._round.done():
            self._again = True
            return
        # the job is made now, of the events applied so far, whenever the task gets to run
        prepared = self._prepare()
        if prepared is not None:
            self._round = asyncio.get_running_loop().create_task(self._run_rounds(prepared), name="sequence-training")

    def _round_inline(self) -> None:
        """A round on the calling thread: the event that triggered it waits (replays)."""
        prepared = self._prepare()
        if prepared is None:
            return
        started = time.perf_counter()
        try:
            served = self._train(prepared)
        except TrainingFailed as exc:
            self._failed(exc)
            return
        self._install(served, prepared, time.perf_counter() - started, "trained")

    async def _run_rounds(self, prepared: _Prepared | None) -> None:
        try:
            while prepared is not None:
                if self.sharing is not None and not await self.sharing.claim():
                    # another agent trains: this one serves what it publishes
                    return
                started = time.perf_counter()
                served = await in_daemon_thread(self._train, prepared)
                self._install(served, prepared, time.perf_counter() - started, "trained")
                if self.sharing is not None:
                    version = served.version
                    await self.sharing.publish(version.number, await in_daemon_thread(version.to_bytes), version.info)
                # events that came due during the round: one more, on everything applied by now
                prepared = self._prepare() if self._again and self._due() else None
                self._again = False
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed(exc)
        finally:
            self._again = False

    def _prepare(self) -> _Prepared | None:
        """The round's job, on the loop's thread: the events held now, the item vectors now."""
        options = self.options
        vectors = self._vectors()
        latest = self.latest
        text_dim = vectors.dim if vectors is not None else latest.text_dim if latest else DEFAULT_TEXT_DIM
        warm = latest if latest is not None and latest.shape == options.shape and latest.text_dim == text_dim else None
        assert self._ctx is not None
        ids = list(self._ctx.catalog.ids)
        made = make_job(self.recent, ids, vectors, text_dim, self._next_number(), options.shape, options.settings, warm)
        self.new_events = 0
        self.last_round_at = time.monotonic()
        if made is None:
            return None
        job, item_slots = made
        return _Prepared(job, ids, item_slots, self._clock(), self.recent.appended)

    def _next_number(self) -> int:
        return max(self.latest.number if self.latest is not None else 0, self._published_number) + 1

    def _train(self, prepared: _Prepared) -> Served:
        """Train in the worker and build this agent's table (in a thread, or inline)."""
        assert self.worker is not None
        job = prepared.job
        result = self.worker.train(job)
        version = Version(
            number=job.version,
            shape=job.shape,
            text_dim=job.text.shape[1],
            item_ids=tuple(job.item_ids),
            params=result.params,
            info={
                "trainer": self.agent_id,
                "events_seen": prepared.events_seen,
                "window_events": len(job.users),
                "items": job.n_window,
                "examples": result.examples,
                "steps": result.steps,
                "loss": round(result.loss, 4) if math.isfinite(result.loss) else None,
                "training_s": round(result.seconds, 3),
                "training_cpu_s": round(result.cpu_seconds, 3),
            },
        )
        table = ItemTable(version)
        with_text = job.has_text
        table.build(prepared.ids, prepared.item_slots[with_text], job.text[with_text])
        return Served(version, table, ready_at=math.inf)

    def _install(self, served: Served, prepared: _Prepared | None, seconds: float, outcome: str) -> None:
        """Queue a version: one trained here serves from its trigger's time plus the seconds it
        took; one loaded from another agent, at once."""
        served.ready_at = prepared.trigger + seconds if prepared is not None else self._clock()
        self.latest = served.version
        self.pending.append(served)
        self.failure = None
        self.rounds.append({"version": served.version.number, "outcome": outcome, "seconds": round(seconds, 3)})
        self.rounds[:] = self.rounds[-REPORTED_ROUNDS:]
        if self._seconds_gauge is not None and outcome == "trained":
            self._seconds_gauge.set(seconds)
        if self._versions is not None:
            self._versions.labels(outcome=outcome).inc()
        log.info(
            "sequence model: version %d %s in %.2f s (%s)", served.version.number, outcome, seconds, served.version.info
        )
        self._promote(self._clock())

    def _failed(self, exc: Exception) -> None:
        self.failure = f"{exc.__class__.__name__}: {exc}"[-500:]
        if self._versions is not None:
            self._versions.labels(outcome="failed").inc()
        if self.enabled:
            log.error("sequence model: a training round failed: %s", self.failure)

    def _promote(self, now: float) -> Served | None:
        """The version to serve at ``now``: the swap is this one assignment."""
        while self.pending and self.pending[0].ready_at <= now:
            self.served = self.pending.popleft()
            if self._version_gauge is not None:
                self._version_gauge.set(self.served.version.number)
            if self._ctx is not None:
                self._ctx.extras[SEQUENCE_MODEL] = self.report()
        return self.served

    def report(self) -> dict[str, Any]:
        served = self.served
        return {
            "version": served.version.number if served is not None else 0,
            "info": dict(served.version.info) if served is not None else {},
            "rounds": list(self.rounds),
            "training_s": round(sum(r["seconds"] for r in self.rounds if r["outcome"] == "trained"), 3),
        }

    # -- sharing -------------------------------------------------------------------------------

    async def _poll(self) -> None:
        """Load what another agent published; renew this agent's claim when it trains."""
        assert self.sharing is not None
        while True:
            try:
                await self.sharing.renew()
                pointer = await self.sharing.latest()
                if pointer is not None:
                    self._published_number = max(self._published_number, pointer["number"])
                    known = self.latest.number if self.latest is not None else 0
                    if pointer["number"] > known and pointer.get("agent") != self.agent_id:
                        await self._load(pointer)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("sequence model: could not look for a shared version: %s", exc)
            await asyncio.sleep(self.options.poll_s)

    async def _load(self, pointer: dict[str, Any]) -> None:
        assert self.sharing is not None and self._ctx is not None
        started = time.perf_counter()
        data = await self.sharing.fetch(pointer["object"])
        ids = list(self._ctx.catalog.ids)
        vectors = self._vectors()
        slots = np.flatnonzero(vectors.present(len(ids))) if vectors is not None else np.empty(0, dtype=np.int64)
        text = vectors.rows(slots) if vectors is not None else np.zeros((0, DEFAULT_TEXT_DIM), dtype=np.float32)

        def build() -> Served:
            version = Version.from_bytes(data)
            table = ItemTable(version)
            table.build(ids, slots, text)
            return Served(version, table, ready_at=math.inf)

        served = await in_daemon_thread(build)
        if self.latest is not None and served.version.number <= self.latest.number:
            return
        self._install(served, None, time.perf_counter() - started, "loaded")

    # -- serving -------------------------------------------------------------------------------

    @hookimpl
    def recsys_candidates(self, query: Query) -> Candidates | None:
        answers = self.recsys_candidates_batch([query])
        return answers[0] if answers else None

    @hookimpl
    def recsys_candidates_batch(self, queries: list[Query]) -> list[Candidates | None] | None:
        if not self.enabled or not queries:
            return None
        # one version for the whole batch: read once, here
        served = self._promote(min(query.now for query in queries))
        if served is None:
            return None
        catalog = queries[0].catalog
        if any(query.catalog is not catalog for query in queries):
            return [self._answer(served, [query], query.catalog)[0] for query in queries]
        return self._answer(served, queries, catalog)

    def _answer(self, served: Served, queries: list[Query], catalog: Catalog) -> list[Candidates | None]:
        table = served.table
        table.refresh(catalog.ids, self._vectors())
        shape = served.version.shape
        length = shape.max_length
        sequences = [self._sequence(query.user, table, length) for query in queries]
        asked = [i for i, sequence in enumerate(sequences) if sequence]
        answers: list[Candidates | None] = [None] * len(queries)
        if not asked:
            return answers
        index = np.zeros((len(asked), length), dtype=np.int64)
        valid = np.zeros((len(asked), length), dtype=bool)
        for row, i in enumerate(asked):
            sequence = sequences[i]
            index[row, length - len(sequence) :] = sequence
            valid[row, length - len(sequence) :] = True
        rows = np.where(valid[:, :, None], table.rows[index], np.float32(0.0))
        users = encode(served.version.params, shape, rows, valid)
        size = table.size
        scores = score_rows(table.rows[:size], users)
        found = top_allowed(
            scores,
            [queries[i].allowed() for i in asked],
            table.rankable[:size],
            [queries[i].n_candidates for i in asked],
        )
        for row, (i, (slots, found_scores)) in enumerate(zip(asked, found, strict=True)):
            if not len(slots):
                continue
            last = sequences[i][-1]
            answers[i] = Candidates(
                source=SOURCE,
                slots=slots,
                scores=found_scores.astype(np.float64),
                reasons=_reason(catalog, last),
                score_of=_scorer(table.rows, table.rankable, users[row].copy()),
            )
        return answers

    @staticmethod
    def _sequence(user: UserState, table: ItemTable, length: int) -> list[int]:
        """The user's latest positive items that the version can read, oldest first."""
        found: list[int] = []
        rankable, size = table.rankable, table.size
        for interaction in reversed(user.recent):
            if interaction.signal > 0:
                slot = interaction.slot
                if slot < size and rankable[slot]:
                    found.append(slot)
                    if len(found) == length:
                        break
        found.reverse()
        return found


def _reason(catalog: Catalog, last: int) -> Any:
    def reason(slot: int) -> str:
        return f"often comes next after {catalog.title(last)}"

    return reason


def _scorer(rows: np.ndarray, rankable: np.ndarray, user: np.ndarray) -> Any:
    """Scores of any slots for fusion, from the rows as they are when it asks (NaN: not rankable)."""

    def score_of(wanted: np.ndarray) -> np.ndarray:
        wanted = np.asarray(wanted, dtype=np.int64)
        ok = wanted < len(rankable)
        ok[ok] = rankable[wanted[ok]]
        out = np.full(len(wanted), np.nan)
        out[ok] = rows[wanted[ok]] @ user
        return out

    return score_of
