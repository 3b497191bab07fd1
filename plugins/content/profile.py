"""The LLM profile as one more query vector, embedded off the hot path.

When a summariser has written an LLM profile (``user.extras[PROFILE]``), its text is embedded
in the background and the vector kept in the user's extras, so it goes when the user is
evicted or forgotten. Until the embedding is done the previous vector (if any) keeps serving.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from agent.llm.profiles import profile_text
from agent.pipeline.extras import PROFILE, Key
from agent.pipeline.user_state import UserState
from agent.threads import in_daemon_thread
from agent.vectors.embeddings import Embedder

PROFILE_REASON = "matches your interest profile"
# the embedded LLM profile's key in UserState.extras
PROFILE_VECTOR: Key[ProfileVector] = Key("content.profile_vector")
# the name prefix of the tasks that embed a profile
TASK_PREFIX = "profile:"


@dataclass(slots=True)
class ProfileVector:
    text: str = ""
    vector: np.ndarray | None = None


def profile_query(user: UserState, embedder: Embedder | None, tasks: set[asyncio.Task[None]]) -> np.ndarray | None:
    """The vector of the user's LLM profile as it is now, or None; a changed profile is queued
    for embedding (its task joins ``tasks``)."""
    profile_dict = user.extras.get(PROFILE)
    # Only an LLM's profile adds something: a heuristic one is built from the same history
    # that the taste vectors already embed, and re-embedding it after every event would
    # cost more CPU than everything else on the hot path.
    from_llm = isinstance(profile_dict, dict) and profile_dict.get("source") == "llm"
    text = profile_text(profile_dict) if from_llm else ""  # type: ignore[arg-type]
    if not text:
        return None
    # in the user's extras, so it goes when the user is evicted or forgotten
    profile = user.extras.get(PROFILE_VECTOR)
    if not isinstance(profile, ProfileVector):
        profile = user.extras[PROFILE_VECTOR] = ProfileVector()
    if text != profile.text:
        _embed_later(user.user_id, profile, text, embedder, tasks)
    return profile.vector


def _embed_later(
    user_id: str, profile: ProfileVector, text: str, embedder: Embedder | None, tasks: set[asyncio.Task[None]]
) -> None:
    # Embedding a text costs milliseconds of CPU: never on the hot path. Until it is done
    # the previous profile vector (if any) keeps serving.
    # One profile embedding at a time, whoever asks: a user skipped now is served at a
    # later push, and the CPU the hot path needs is never taken by a queue of these.
    if embedder is None or any(t.get_name().startswith(TASK_PREFIX) for t in tasks):
        return

    async def embed() -> None:
        vector = (await in_daemon_thread(embedder.encode, [text]))[0]
        profile.vector, profile.text = vector, text

    try:
        task = asyncio.get_running_loop().create_task(embed(), name=f"{TASK_PREFIX}{user_id}")
    except RuntimeError:
        return
    tasks.add(task)
    task.add_done_callback(tasks.discard)
