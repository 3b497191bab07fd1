"""The factors plugin's options (``[plugins.factors]``)."""

from __future__ import annotations

from dataclasses import dataclass

# about 24 bytes per event: the ring is allocated whole at start
MAX_WINDOW = 20_000_000
TRAINING_MODES = ("background", "inline")
CONFIDENCES = ("signal", "count")


@dataclass(frozen=True, slots=True)
class FactorsOptions:
    # off unless enabled: it lifts shop baskets (Online Retail 0.0207 -> 0.0242) but costs about
    # 0.2-0.4 ms per list, which the latency targets cannot spare (README, candidates table)
    enabled: bool = False
    # a refit after this many new positive events; the first after ``first_events``, and the
    # interval doubles from there up to ``every_events``, so a young stream is not served by no
    # model at all for ``every_events`` events
    every_events: int = 10_000
    first_events: int = 1_000
    # a fit learns from the latest this many positive events (the memory bound)
    window_events: int = 200_000
    # "background": a fit runs in a worker thread while the previous version serves;
    # "inline": the event that triggers a fit waits for it (replays: the same versions at the
    # same events on every run)
    training: str = "background"
    # implicit's AlternatingLeastSquares; its defaults but for 32 factors (the replay
    # baseline's choice, agent/evaluation/baselines.py)
    factors: int = 32
    regularization: float = 0.01
    alpha: float = 1.0
    iterations: int = 15
    # what a positive event adds to its (user, item) confidence: its taste signal (a purchase
    # weighs more than a view) or 1 (every engagement alike, as the replay's ALS baseline counts)
    confidence: str = "signal"
    # the fold-in weighs a user's older interactions by this factor per newer positive one
    # (1.0: every item of the history counts the same, as implicit's recalculate_user does)
    recency: float = 1.0
    seed: int = 0

    def problems(self) -> list[tuple[str, str]]:
        return [
            (name, message)
            for name, bad, message in (
                ("every_events", self.every_events < 1, "must be at least 1"),
                ("first_events", not 1 <= self.first_events, "must be at least 1"),
                ("window_events", not 2 <= self.window_events <= MAX_WINDOW, f"must be in 2..{MAX_WINDOW:,}"),
                ("training", self.training not in TRAINING_MODES, f"must be one of {', '.join(TRAINING_MODES)}"),
                ("factors", not 1 <= self.factors <= 1024, "must be in 1..1024"),
                ("regularization", not self.regularization > 0, "must be positive"),
                ("alpha", not self.alpha > 0, "must be positive"),
                ("iterations", not 1 <= self.iterations <= 1000, "must be in 1..1000"),
                ("confidence", self.confidence not in CONFIDENCES, f"must be one of {', '.join(CONFIDENCES)}"),
                ("recency", not 0 < self.recency <= 1, "must be in (0, 1]"),
                ("seed", self.seed < 0, "must be at least 0"),
            )
            if bad
        ]
