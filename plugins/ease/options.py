"""The ease plugin's options (``[plugins.ease]``): the window's (``WindowOptions``) and the
regression's."""

from __future__ import annotations

from dataclasses import dataclass

from agent.pipeline.window_models import WindowOptions

# the weight matrix is items x items float32: 4,000 items take 64 MB, and a fit briefly twice that
MAX_ITEMS = 20_000


@dataclass(frozen=True, slots=True)
class EaseOptions(WindowOptions):
    enabled: bool = True
    # the regression models the items most users of the window engaged with, at most this many
    # (the others are neither proposed nor scored by it)
    max_items: int = 4_000
    # the ridge penalty, relative to the mean number of users per modelled item, so that it
    # scales with the window rather than being a count tuned to one data set
    regularization: float = 10.0
    # a user's older positive items weigh this factor per newer one (1.0: all alike)
    recency: float = 1.0

    def problems(self) -> list[tuple[str, str]]:
        return WindowOptions.problems(self) + [
            (name, message)
            for name, bad, message in (
                ("max_items", not 2 <= self.max_items <= MAX_ITEMS, f"must be in 2..{MAX_ITEMS:,}"),
                ("regularization", not self.regularization > 0, "must be positive"),
                ("recency", not 0 < self.recency <= 1, "must be in (0, 1]"),
            )
            if bad
        ]
