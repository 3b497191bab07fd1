"""Candidate sources whose model is refitted from scratch on a window of recent positive events.

The factors source (implicit's ALS) and the ease source (closed-form item-to-item regression)
differ in what they fit and how they score; what they share lives here:

- the window: the latest ``window_events`` positive events (``recent_events.py``), appended by
  the batch apply hook;
- the cadence: a refit every ``every_events`` of them, the first after ``first_events`` and the
  interval doubling up to ``every_events``, so a young stream is not served by no model; in
  the background, at most one fit starts per ``min_interval_s`` seconds, so that a fast stream
  does not spend a growing share of the CPU on refits (a fit costs the same whatever the rate);
- where a fit runs: a worker thread (``training = "background"``; the previous version serves
  meanwhile) or on the triggering apply (``"inline"``: a replay gets the same versions at the
  same events on every run);
- versions: each fit gives a new immutable version, installed by one assignment, so a batch
  that read the served version once is answered by one version; ``/metrics`` names it
  (``recsys_<plugin>_model_version``, ``recsys_<plugin>_fits_total``);
- forgetting: a user's events leave the window; a fit that copied the window before the forget
  is dropped and redone at once;
- export: the user's events in the window.

A subclass says what a fit makes (``fit_version``, run off the event loop) and answers
``recsys_candidates_batch`` from ``self.served``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import numpy as np
from prometheus_client import Counter, Gauge

from agent.chained_tasks import settle_chain
from agent.context import AgentContext
from agent.hooks.manager import missing_extra
from agent.hooks.specs import hookimpl
from agent.pipeline.catalog import Catalog
from agent.pipeline.recent_events import RecentEvents
from agent.pipeline.user_state import UserState
from agent.pipeline.values import Candidates
from agent.threads import in_daemon_thread, join_running
from agent.wire.contract import Event

log = logging.getLogger(__name__)

# about 24 bytes per event: the ring is allocated whole at start
MAX_WINDOW = 20_000_000
TRAINING_MODES = ("background", "inline")
# how long a stop waits for a fit in flight
THREAD_JOIN_S = 5.0
# fits kept in the report
REPORTED_FITS = 200


@dataclass(frozen=True, slots=True)
class WindowOptions:
    """The options every window-fitted source has; a source's options extend these."""

    enabled: bool = False
    # a refit after this many new positive events; the first after ``first_events``, and the
    # interval doubles from there up to ``every_events``
    every_events: int = 10_000
    first_events: int = 1_000
    # background fits: a due fit waits until this many seconds have passed since the last one
    # started (an inline fit, as in a replay, is counted in events alone)
    min_interval_s: float = 60.0
    # a fit learns from the latest this many positive events (the memory bound)
    window_events: int = 200_000
    # "background": a fit runs in a worker thread while the previous version serves;
    # "inline": the event that triggers a fit waits for it
    training: str = "background"
    seed: int = 0

    def problems(self) -> list[tuple[str, str]]:
        return [
            (name, message)
            for name, bad, message in (
                ("every_events", self.every_events < 1, "must be at least 1"),
                ("first_events", self.first_events < 1, "must be at least 1"),
                ("min_interval_s", not 0 <= self.min_interval_s <= 86_400, "must be in 0..86400"),
                ("window_events", not 2 <= self.window_events <= MAX_WINDOW, f"must be in 2..{MAX_WINDOW:,}"),
                ("training", self.training not in TRAINING_MODES, f"must be one of {', '.join(TRAINING_MODES)}"),
                ("seed", self.seed < 0, "must be at least 0"),
            )
            if bad
        ]


@dataclass(frozen=True, slots=True)
class FitJob:
    """One fit's input, copied on the loop's thread: the window as it was at the trigger."""

    number: int
    users: np.ndarray
    slots: np.ndarray
    signals: np.ndarray
    n_items: int
    events_seen: int


class FittedVersion(Protocol):
    """What a fit returns: served whole, never modified."""

    @property
    def number(self) -> int: ...

    @property
    def info(self) -> dict[str, Any]: ...


def answers_of(
    n_queries: int,
    asked: list[int],
    found: list[tuple[np.ndarray, np.ndarray]],
    source: str,
    reason: str,
    scorer: Callable[[int], Callable[[np.ndarray], np.ndarray]],
) -> list[Candidates | None]:
    """A batch's answers: the queries ``asked`` get their ``found`` (slots, scores), with the
    scorer of their row (``scorer(row)``, fusion's ``score_of``); the others None."""
    answers: list[Candidates | None] = [None] * n_queries
    for row, (i, (slots, scores)) in enumerate(zip(asked, found, strict=True)):
        if len(slots):
            answers[i] = Candidates(
                source=source, slots=slots, scores=scores.astype(np.float64), reasons=reason, score_of=scorer(row)
            )
    return answers


OptionsT = TypeVar("OptionsT", bound=WindowOptions)
VersionT = TypeVar("VersionT", bound=FittedVersion)


class WindowModelSource(ABC, Generic[OptionsT, VersionT]):
    """The lifecycle of a source refitted on the window; see the module's docstring."""

    # the name the plugin is registered under (agent/hooks/manager.py), also its metrics' infix
    plugin_name: ClassVar[str]
    options_type: ClassVar[type[WindowOptions]]
    # (module whose extra brings it, modules to import): the plugin is disabled without them
    requires: ClassVar[tuple[str, ...]]

    def __init__(self) -> None:
        self.options: OptionsT = self.options_type()  # type: ignore[assignment]
        self.enabled = False
        self.disabled_reason: str | None = None
        self.window = RecentEvents(1)  # sized at start, when enabled: a disabled plugin holds no window
        # the version every query is answered by; replaced whole, never changed
        self.served: VersionT | None = None
        self.seen = 0
        self.next_fit = self.options.first_events
        # when the last background fit started, by ``clock`` (seconds)
        self.clock: Callable[[], float] = time.monotonic
        self._fit_started = -math.inf
        # the timer of a fit that is due but waits for min_interval_s
        self._due: asyncio.TimerHandle | None = None
        self.fits: list[dict[str, Any]] = []
        self.failure: str | None = None
        self._number = 0
        self._fit: asyncio.Task[None] | None = None
        self._again = False
        # forgets of users with events in the window while a fit ran (see recsys_forget_user)
        self._forgets = 0
        self._version_gauge: Gauge | None = None
        self._outcomes: Counter | None = None

    @property
    def _thread_group(self) -> str:
        return f"{self.plugin_name}-fit"

    @abstractmethod
    def fit_version(self, job: FitJob) -> VersionT:
        """A fresh model from the job's events (in a worker thread, or inline)."""

    # -- lifespan ------------------------------------------------------------------------------

    @hookimpl
    async def recsys_lifespan(self, ctx: AgentContext) -> AsyncIterator[None]:
        self.options = options = ctx.options(self.plugin_name, self.options_type)  # type: ignore[assignment]
        if not options.enabled:
            yield
            return
        self.disabled_reason = missing_extra(self.plugin_name, *self.requires)
        if self.disabled_reason is not None:
            log.warning(self.disabled_reason)
            yield
            return
        self.enabled = True
        self.window = RecentEvents(options.window_events)
        self.next_fit = min(options.first_events, options.every_events)
        registry = ctx.metrics.registry
        name = self.plugin_name
        self._version_gauge = Gauge(
            f"recsys_{name}_model_version", f"Version of the {name} model served (0: none yet)", registry=registry
        )
        self._outcomes = Counter(
            f"recsys_{name}_fits", f"Fits of the {name} model, by outcome", ["outcome"], registry=registry
        )
        try:
            yield
        finally:
            self.enabled = False
            if self._due is not None:
                self._due.cancel()
                self._due = None
            # a fit in flight cannot be stopped (native code): its thread is a daemon, what it
            # returns is dropped, and it is given a bounded while to finish, since native code
            # aborts when the interpreter exits under it
            if self._fit is not None:
                self._fit.cancel()
                with suppress(asyncio.CancelledError):
                    await self._fit
                await asyncio.to_thread(join_running, THREAD_JOIN_S, self._thread_group)

    @hookimpl
    def recsys_settle(self) -> Any:
        # a fit may chain another (events that came due meanwhile): the last is waited for
        return settle_chain(lambda: self._fit)

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
        if self.seen < self.next_fit:
            return
        wait = self._wait_s()
        if wait <= 0:
            self._start_fit(catalog)
        elif self._due is None:
            # started when the interval has passed even if no event comes then: a burst
            # followed by silence is still learned from
            self._due = asyncio.get_running_loop().call_later(wait, self._start_due_fit, catalog)

    def _wait_s(self) -> float:
        """Seconds until a due fit may start (0 or less: now)."""
        if self.options.training == "inline":
            return 0.0
        return self.options.min_interval_s - (self.clock() - self._fit_started)

    def _start_due_fit(self, catalog: Catalog) -> None:
        self._due = None
        if self.enabled and self.seen >= self.next_fit:
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
        if self._due is not None:
            self._due.cancel()
            self._due = None
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
            # at once, not when the task first runs: an apply before then must see it
            self._fit_started = self.clock()
            self._fit = asyncio.get_running_loop().create_task(
                self._run_fits(job, catalog, self._forgets), name=f"{self.plugin_name}-fit"
            )

    def _job(self, catalog: Catalog) -> FitJob | None:
        users, slots, signals = self.window.window()
        if not len(users):
            return None
        self._number += 1
        return FitJob(self._number, users, slots, signals, catalog.size, self.seen)

    def _run_inline(self, job: FitJob) -> None:
        try:
            version = self.fit_version(job)
        except Exception as exc:
            self._failed(exc)
            return
        self._install(version)

    async def _run_fits(self, job: FitJob | None, catalog: Catalog, forgets: int) -> None:
        """Fit ``job`` (whose window was copied when ``forgets`` users had been forgotten during
        fits), and again while events came due or a user was forgotten meanwhile."""
        try:
            while job is not None:
                self._fit_started = self.clock()
                version = await in_daemon_thread(self.fit_version, job, group=self._thread_group)
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

    def _install(self, version: VersionT) -> None:
        # the swap is this one assignment: a batch that read the old version keeps it
        self.served = version
        self.failure = None
        self.fits.append({"version": version.number, **version.info})
        self.fits[:] = self.fits[-REPORTED_FITS:]
        if self._version_gauge is not None:
            self._version_gauge.set(version.number)
        if self._outcomes is not None:
            self._outcomes.labels(outcome="fitted").inc()
        log.info("%s model: version %d fitted (%s)", self.plugin_name, version.number, version.info)

    def _failed(self, exc: Exception) -> None:
        self.failure = f"{exc.__class__.__name__}: {exc}"[-500:]
        if self._outcomes is not None:
            self._outcomes.labels(outcome="failed").inc()
        log.error("%s model: a fit failed: %s", self.plugin_name, self.failure)
