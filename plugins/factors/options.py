"""The factors plugin's options (``[plugins.factors]``): the window's (``WindowOptions``) and
implicit's."""

from __future__ import annotations

from dataclasses import dataclass

from agent.pipeline.window_models import WindowOptions

CONFIDENCES = ("signal", "count")


@dataclass(frozen=True, slots=True)
class FactorsOptions(WindowOptions):
    # off unless enabled: it lifts shop baskets (Online Retail 0.0207 -> 0.0242) but costs about
    # 0.2-0.4 ms per list, which the latency targets cannot spare (README, candidates table)
    enabled: bool = False
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

    def problems(self) -> list[tuple[str, str]]:
        return WindowOptions.problems(self) + [
            (name, message)
            for name, bad, message in (
                ("factors", not 1 <= self.factors <= 1024, "must be in 1..1024"),
                ("regularization", not self.regularization > 0, "must be positive"),
                ("alpha", not self.alpha > 0, "must be positive"),
                ("iterations", not 1 <= self.iterations <= 1000, "must be in 1..1000"),
                ("confidence", self.confidence not in CONFIDENCES, f"must be one of {', '.join(CONFIDENCES)}"),
                ("recency", not 0 < self.recency <= 1, "must be in (0, 1]"),
            )
            if bad
        ]
