"""The interest profile: the dict the slow path writes and the rest of the agent reads.

Contract with the rest of the agent (the profile dict)
------------------------------------------------------
The latest profile of a user lives in ``user.extras[PROFILE]`` (``UserState.extras``) and is
what ``recsys_profile`` returns, so it travels in ``Recommendations.profile`` (pushes, request/
reply and ``GET /v1/users/{id}/recommendations``)::

    {"interests": [str, ...],   # up to 6 short phrases (genres, themes), best first
     "avoid": [str, ...],       # up to 4 phrases the user skipped or disliked
     "summary": str,            # one or two sentences, never naming the user
     "source": "llm" | "heuristic",
     "generated_at": float,     # epoch seconds when it was written
     "based_on_events": int}    # the user's event count (UserState.event_count) it reflects

A retrieval source that wants the profile as a query vector embeds
``summary + ". " + "; ".join(interests)`` (``profile_text``) with the same sentence-transformers
model as the items; it must treat the dict as read-only and expect it to be replaced, not
mutated, by each refresh (so reading it needs no lock and a reader never sees half of one).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent.pipeline.extras import PROFILE

# the key in UserState.extras (agent/pipeline/extras.py)
PROFILE_KEY = PROFILE


def make_profile(
    fields_: Mapping[str, Any], *, source: str, generated_at: float, based_on_events: int
) -> dict[str, Any]:
    return {
        "interests": list(fields_["interests"]),
        "avoid": list(fields_["avoid"]),
        "summary": str(fields_["summary"]),
        "source": source,
        "generated_at": generated_at,
        "based_on_events": based_on_events,
    }


def profile_text(profile: Mapping[str, Any]) -> str:
    """The text a retrieval source embeds for a profile (see the module docstring)."""
    interests = "; ".join(str(i) for i in profile.get("interests") or [])
    summary = str(profile.get("summary") or "")
    return f"{summary}. {interests}".strip(". ") if interests else summary
