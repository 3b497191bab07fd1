"""How much an event says about a user's taste for its item: one table for every stage."""

from __future__ import annotations

# Positive: the user wants more like this; negative: less. Stronger commitments weigh more.
EVENT_SIGNAL: dict[str, float] = {
    "view": 1.0,
    "click": 1.5,
    "like": 3.0,
    "add_to_cart": 2.5,
    "purchase": 4.0,
    "rate": 1.0,
    "dislike": -3.0,
    "skip": -1.0,
}


def rating_share(value: float, rating_max: float) -> float:
    """Where a rating stands on the agent's scale, from 0 (bottom or below) to 1 (top or above)."""
    return max(0.0, min(value / rating_max, 1.0)) if rating_max > 0 else 0.0


def event_signal(event_type: str, value: float | None, rating_max: float) -> float:
    """Taste signal of one event; a rating is an engagement scaled by its value.

    Rating anything means the user consumed the item, so even a low rating stays a (weak)
    positive: a low rating predicts what the user will consume next better than nothing does.
    """
    if event_type == "rate" and value is not None and rating_max > 0:
        return 0.5 + rating_share(value, rating_max)
    return EVENT_SIGNAL.get(event_type, 0.0)
