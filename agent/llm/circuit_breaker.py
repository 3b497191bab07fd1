"""The circuit breaker in front of the LLM: after repeated failures, stop calling for a while."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from enum import Enum

log = logging.getLogger(__name__)


class BreakerState(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Closed -> (``threshold`` consecutive failures) -> open -> (``reset_s``) -> half-open: one
    trial call; its success closes the breaker, its failure opens it again."""

    def __init__(self, threshold: int, reset_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self.reset_s = reset_s
        self.clock = clock
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self._trial = False

    def allow(self) -> bool:
        """May a call be made now? In half-open state only one caller gets True."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN and self.clock() - self.opened_at >= self.reset_s:
            self.state = BreakerState.HALF_OPEN
            self._trial = False
        if self.state is BreakerState.HALF_OPEN and not self._trial:
            self._trial = True
            return True
        return False

    def success(self) -> None:
        self.state = BreakerState.CLOSED
        self.failures = 0
        self._trial = False

    def failure(self) -> None:
        self.failures += 1
        if self.state is BreakerState.HALF_OPEN or self.failures >= self.threshold:
            if self.state is not BreakerState.OPEN:
                log.warning(
                    "LLM circuit breaker open after %d failures: heuristic summaries for %.0f s",
                    self.failures,
                    self.reset_s,
                )
            self.state = BreakerState.OPEN
            self.opened_at = self.clock()
        self._trial = False

    def abandon(self) -> None:
        """A call was cancelled before it could tell success from failure (shutdown)."""
        self._trial = False
