"""The two writers of a profile's fields: the LLM (prompt, constrained completion, schema check)
and the heuristic that stands in when no LLM is configured or reachable. Both return
``{"interests", "avoid", "summary"}``; :func:`agent.llm.profiles.make_profile` adds the rest."""

from __future__ import annotations

import functools
import logging
import re
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from agent.llm.chat_client import MAX_AVOID, MAX_INTERESTS, PROFILE_SCHEMA, ChatClient, validate_profile
from agent.llm.prompts import REDACTED, HistoryEntry, build_messages

log = logging.getLogger(__name__)

# Bounds its own time and reports a timeout as LLMTimeout (llm_summariser's ChatClient does, with
# ``timeout_s``): one timer per call, where the I/O is, so the scheduler adds none.
LLMFunction = Callable[[list[HistoryEntry]], Awaitable[dict[str, Any]]]


def llm_summariser(client: ChatClient, *, send_categories: bool) -> LLMFunction:
    """The LLM path: prompt from the entries, constrained completion, schema validation."""

    fields_sent = "title, event type" + (", categories" if send_categories else "")

    async def summarise(entries: list[HistoryEntry]) -> dict[str, Any]:
        # What leaves the process, described without any of it: how many items and which fields.
        log.debug("summary request: %d items (%s)", len(entries), fields_sent)
        completion = await client.complete_json(
            build_messages(entries, send_categories=send_categories), PROFILE_SCHEMA
        )
        return validate_profile(completion.data)

    return summarise


# How much one interaction says about a liking; dislike and skip count against a category.
_POSITIVE = {"view": 1.0, "click": 1.0, "rate": 1.5, "like": 2.0, "add_to_cart": 2.0, "purchase": 3.0, "other": 0.5}
_STOPWORDS = frozenset(
    "the a an and or of in on at to for from with by as is it its into over under about after before "
    "part vol volume chapter episode season edition collection movie film show series new old my your "
    "his her their our this that these those ii iii iv de la le les el los das der die und".split()
    + [REDACTED.strip("[]")]
)
_WORD = re.compile(r"[^\W\d_][\w'-]{2,}")


@functools.lru_cache(maxsize=65_536)
def _title_terms(title: str) -> frozenset[str]:
    # cached: the same titles recur in user after user's history
    title = re.sub(r"\(\d{4}\)", " ", title)
    return frozenset({w.lower().strip("'-") for w in _WORD.findall(title)} - _STOPWORDS)


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def heuristic_fields(entries: list[HistoryEntry]) -> dict[str, Any]:
    """A profile without an LLM: categories weighted by event type and recency, plus title words
    that recur across several items. Same shape as the LLM's answer; deterministic."""
    liked: Counter[str] = Counter()
    disliked: Counter[str] = Counter()
    terms: Counter[str] = Counter()
    display: dict[str, str] = {}
    n = len(entries)
    for position, entry in enumerate(entries):
        recency = 0.5 + 0.5 * (position + 1) / n
        for category in entry.categories:
            display.setdefault(category.lower(), category)
            if entry.negative:
                disliked[category.lower()] += recency
            else:
                liked[category.lower()] += _POSITIVE.get(entry.event, 1.0) * recency
        if not entry.negative:
            terms.update(_title_terms(entry.title))
    categories = [c for c, _ in sorted(liked.items(), key=lambda kv: (-kv[1], kv[0]))][:4]
    recurring = [t for t, count in sorted(terms.items(), key=lambda kv: (-kv[1], kv[0])) if count >= 2]
    recurring = [t for t in recurring if t not in categories][: max(0, MAX_INTERESTS - len(categories))][:3]
    interests = [display[c] for c in categories] + recurring
    avoid = [
        display[c] for c, score in sorted(disliked.items(), key=lambda kv: (-kv[1], kv[0])) if score > liked.get(c, 0.0)
    ][:MAX_AVOID]

    parts: list[str] = []
    if categories:
        parts.append(f"Mostly engages with {_join([display[c] for c in categories[:3]])} lately")
    else:
        positives = [e.title for e in entries if not e.negative][-3:]
        if positives:
            parts.append(f"Recently engaged with {_join(positives)}")
    if recurring:
        parts.append(f"recurring themes: {_join(recurring)}")
    sentence = "; ".join(parts) + "." if parts else ""
    if avoid:
        sentence += f" Tends to skip {_join(avoid)}."
    summary = sentence.strip() or "Not enough activity yet to describe a taste."
    return {"interests": interests, "avoid": avoid, "summary": summary}
