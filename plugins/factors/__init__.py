"""Factors: implicit-feedback matrix factorisation (implicit's ALS) learned from the stream.

- keeps the latest ``window_events`` positive events (``agent/pipeline/recent_events.py``) and, every
  ``every_events`` of them (sooner at the start: ``first_events``, doubling), refits
  implicit's ``AlternatingLeastSquares`` on that window from scratch (``model.py``), in a
  worker thread (``training = "background"``) or on the triggering apply (``"inline"``);
- swaps the new item factors in whole: a batch of queries reads the served version once, so
  every answer of a batch comes from one version; ``recsys_factors_model_version`` in
  ``/metrics`` names it;
- serves ``recsys_candidates_batch`` by folding each user in from their current history
  (the core's ``UserState.recent``: no user table here) and scoring every item the window
  named in one matrix product for the batch.

Replays: ``recsys_settle`` waits for the fit in flight; ``training = "inline"`` makes the
apply that triggers a fit wait for it, so a replay gets the same versions at the same events
on every run (implicit fits with one thread and a seed per version: deterministic).

Forgetting a user removes their events from the window: the next fit does not learn from
them (the served item factors are an aggregate over all users until then, and hold no
factors of any user).

Without implicit the plugin is disabled with a message that says which extra brings it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import suppress
from typing import Any

import numpy as np
from prometheus_client import Counter, Gauge

from agent.context import AgentContext
from agent.hooks.manager import missing_extra
from agent.hooks.specs import hookimpl
from agent.pipeline.catalog import Catalog
from agent.pipeline.recent_events import RecentEvents
from agent.pipeline.user_state import UserState
from agent.pipeline.values import Candidates, Query
from agent.threads import in_daemon_thread, join_running
from agent.vectors.item_vectors import top_allowed
from agent.wire.contract import Event
from plugins.factors.model import FitJob, Version, fit, fold_in, history_of
from plugins.factors.options import FactorsOptions

__all__ = ["FactorsOptions", "FactorsSource", "Version"]

log = logging.getLogger(__name__)

# the name this plugin is registered under (agent/hooks/manager.py) and the source it proposes
PLUGIN_NAME = "factors"
SOURCE = "factors"
# says why without naming anyone: the factors are learned from everyone's choices
REASON = "chosen by people whose choices resemble yours"
# how long a stop waits for a fit in flight
THREAD_JOIN_S = 5.0
# fits kept in the report
REPORTED_FITS = 200


class FactorsSource:
    """Options (``[plugins.factors]``): see ``FactorsOptions`` (``options.py``): ``enabled``,
    the cadence (``every_events``, ``first_events``, ``window_events``), ``training``
    (``background`` or ``inline``), implicit's ``factors``, ``regularization``, ``alpha``,
    ``iterations``, the fold-in's ``recency`` and the ``seed``."""

    def __init__(self) -> None:
        self.options = FactorsOptions()
        self.enabled = False
        self.disabled_reason: str | None = None
        self.window = RecentEvents(1)  # sized at start, when enabled: a disabled plugin holds no window
        # the version every query is answered by; replaced whole, never changed
        self.served: Version | None = None
        self.seen = 0
        self.next_fit = self.options.first_events
        self.fits: list[dict[str, Any]] = []
        self.failure: str | None = None
        self._number = 0
        self._ctx: AgentContext | None = None
        self._fit: asyncio.Task[None] | None = None
        self._again = False
        # forgets of users with events in the window while a fit ran (see recsys_forget_user)
        self._forgets = 0
        self._version_gauge: Gauge | None = None
        self._outcomes: Counter | None = None

    # -- lifespan ------------------------------------------------------------------------------

    @hookimpl
    async def recsys_lifespan(self, ctx: AgentContext) -> AsyncIterator[None]:
        self.options = options = ctx.options(PLUGIN_NAME, FactorsOptions)
        self._ctx = ctx
        if not options.enabled:
            yield
            return
        self.disabled_reason = missing_extra(PLUGIN_NAME, "implicit", "implicit.als", "threadpoolctl")
        if self.disabled_reason is not None:
            log.warning(self.disabled_reason)
            yield
            return
        self.enabled = True
        self.window = RecentEvents(options.window_events)
        self.next_fit = min(options.first_events, options.every_events)
        registry = ctx.metrics.registry
        self._version_gauge = Gauge(
            "recsys_factors_model_version", "Version of the factors model served (0: none yet)", registry=registry
        )
        self._outcomes = Counter(
            "recsys_factors_fits", "Fits of the factors model, by outcome", ["outcome"], registry=registry
        )
        try:
            yield
        finally:
            self.enabled = False
            # a fit in flight cannot be stopped (native code): its thread is a daemon, what it
            # returns is dropped, and it is given a bounded while to finish, since native code
            # aborts when the interpreter exits under it
            if self._fit is not None:
                self._fit.cancel()
                with suppress(asyncio.CancelledError):
                    await self._fit
                await asyncio.to_thread(join_running, THREAD_JOIN_S)

    @hookimpl
    def recsys_settle(self) -> Any:
        if self._fit is None or self._fit.done():
            return None
        return self._settled()

    async def _settled(self) -> None:
        # a fit may chain another (events that came due meanwhile): wait for the last
        while self._fit is not None and not self._fit.done():
            await asyncio.wait([self._fit])

    @hookimpl
    def recsys_health(self) -> dict[str, object] | None:
        return {"fit_failed": self.failure} if self.enabled and self.failure else None

    # -- learning ------------------------------------------------------------------------------

    @hookimpl
    def recsys_apply_events(
        self, events: list[Event], users: list[UserState], slots: list[int], signals: list[float], catalog: Catalog
    ) -> None:
        if not self.enabled:
            return
        positive = [i for i, signal in enumerate(signals) if signal > 0]
        if not positive:
            return
        self.window.append(
            [users[i].user_id for i in positive], [slots[i] for i in positive], [signals[i] for i in positive]
        )
        self.seen += len(positive)
        if self.seen >= self.next_fit:
            self._start_fit(catalog)

    @hookimpl
    def recsys_forget_user(self, user_id: str) -> None:
        if self.window.forget(user_id) and self._fit is not None and not self._fit.done():
            # the fit in flight copied the window before the forget: its version is dropped and
            # another fit follows at once, on the window without the user
            self._forgets += 1
            self._again = True

    @hookimpl
    def recsys_export_user(self, user_id: str, catalog: Catalog) -> dict[str, Any] | None:
        slots, signals = self.window.of_user(user_id)
        if not len(slots):
            return None
        ids = catalog.ids
        return {
            "training_window": [
                {"item_id": ids[slot] if slot < len(ids) else None, "signal": float(signal)}
                for slot, signal in zip(slots.tolist(), signals.tolist())
            ]
        }

    def start_fit(self, catalog: Catalog) -> None:
        """Fit now, whatever the cadence (background: in a task; inline: here)."""
        if self.enabled:
            self._start_fit(catalog)

    def _start_fit(self, catalog: Catalog) -> None:
        options = self.options
        # the interval doubles up to every_events: fits at 1,000, 2,000, 4,000, ... events
        self.next_fit = self.seen + min(options.every_events, max(options.first_events, self.seen))
        if options.training == "inline":
            job = self._job(catalog)
            if job is not None:
                self._run_inline(job)
            return
        if self._fit is not None and not self._fit.done():
            self._again = True
            return
        job = self._job(catalog)
        if job is not None:
            self._fit = asyncio.get_running_loop().create_task(
                self._run_fits(job, catalog, self._forgets), name="factors-fit"
            )

    def _job(self, catalog: Catalog) -> FitJob | None:
        users, slots, signals = self.window.window()
        if not len(users):
            return None
        self._number += 1
        return FitJob(self._number, users, slots, signals, catalog.size, self.seen)

    def _run_inline(self, job: FitJob) -> None:
        try:
            version = fit(job, self.options)
        except Exception as exc:
            self._failed(exc)
            return
        self._install(version)

    async def _run_fits(self, job: FitJob | None, catalog: Catalog, forgets: int) -> None:
        """Fit ``job`` (whose window was copied when ``forgets`` users had been forgotten during
        fits), and again while events came due or a user was forgotten meanwhile."""
        try:
            while job is not None:
                version = await in_daemon_thread(fit, job, self.options)
                if not self.enabled:
                    return
                if forgets == self._forgets:
                    self._install(version)
                # else: it learned from a user forgotten meanwhile; the refit below replaces it
                # events that came due during the fit: one more, on the window as it is now
                job = self._job(catalog) if self._again else None
                forgets = self._forgets
                self._again = False
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed(exc)
        finally:
            self._again = False

    def _install(self, version: Version) -> None:
        # the swap is this one assignment: a batch that read the old version keeps it
        self.served = version
        self.failure = None
        self.fits.append({"version": version.number, **version.info})
        self.fits[:] = self.fits[-REPORTED_FITS:]
        if self._version_gauge is not None:
            self._version_gauge.set(version.number)
        if self._outcomes is not None:
            self._outcomes.labels(outcome="fitted").inc()
        log.info("factors model: version %d fitted (%s)", version.number, version.info)

    def _failed(self, exc: Exception) -> None:
        self.failure = f"{exc.__class__.__name__}: {exc}"[-500:]
        if self._outcomes is not None:
            self._outcomes.labels(outcome="failed").inc()
        log.error("factors model: a fit failed: %s", self.failure)

    # -- serving -------------------------------------------------------------------------------

    @hookimpl
    def recsys_candidates_batch(self, queries: list[Query]) -> list[Candidates | None] | None:
        version = self.served  # read once: one version for the whole batch
        if not self.enabled or version is None or not queries:
            return None
        options = self.options
        histories = [
            history_of(query.user.recent, version, options.recency, options.confidence == "count") for query in queries
        ]
        asked = [i for i, (slots, _) in enumerate(histories) if len(slots)]
        answers: list[Candidates | None] = [None] * len(queries)
        if not asked:
            return answers
        users = fold_in(version, [histories[i] for i in asked], options.regularization, options.alpha)
        user_rows = users.astype(np.float32)
        # one product and one selection for the batch (scores of every item the version knows)
        found = top_allowed(
            user_rows @ version.item_factors.T,
            [queries[i].allowed() for i in asked],
            version.rankable,
            [queries[i].n_candidates for i in asked],
        )
        for row, (i, (slots, scores)) in enumerate(zip(asked, found, strict=True)):
            if len(slots):
                answers[i] = Candidates(
                    source=SOURCE,
                    slots=slots,
                    scores=scores.astype(np.float64),
                    reasons=REASON,
                    score_of=_scorer(version, user_rows[row]),
                )
        return answers


def _scorer(version: Version, user: np.ndarray) -> Any:
    """Scores of any slots for fusion (NaN: an item the version cannot score)."""

    def score_of(wanted: np.ndarray) -> np.ndarray:
        wanted = np.asarray(wanted, dtype=np.int64)
        ok = wanted < version.size
        ok[ok] = version.rankable[wanted[ok]]
        out = np.full(len(wanted), np.nan)
        out[ok] = version.item_factors[wanted[ok]] @ user
        return out

    return score_of
