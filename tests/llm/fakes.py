"""Stand-ins the LLM tests share."""

from __future__ import annotations

from collections import deque
from typing import Any

from agent.llm.profiles import PROFILE_KEY
from agent.llm.prompts import HistoryEntry
from agent.llm.scheduler import HistorySnapshot
from agent.pipeline.user_state import Interaction, UserState
from plugins.summariser import COVERED


class Users:
    """A ProfileSource over plain UserStates, as the plugin provides one over the UserStore."""

    def __init__(self) -> None:
        self.users: dict[str, UserState] = {}
        self.stored: list[tuple[str, dict[str, Any]]] = []

    def add_events(self, user_id: str, n: int = 1) -> int:
        user = self.users.setdefault(user_id, UserState(user_id=user_id, recent=deque(maxlen=50)))
        for _ in range(n):
            user.recent.append(Interaction(slot=0, type="view", ts=0.0, signal=1.0))
            user.event_count += 1
        return self.unsummarised(user_id)

    def snapshot(self, user_id: str) -> HistorySnapshot | None:
        user = self.users.get(user_id)
        if user is None:
            return None
        entries = [
            HistoryEntry(title=f"Film {i}", categories=("Sci-Fi",), event="view") for i in range(len(user.recent))
        ]
        return HistorySnapshot(
            entries=entries, event_count=user.event_count, has_profile=PROFILE_KEY in user.extras, owner=user
        )

    def unsummarised(self, user_id: str) -> int:
        user = self.users.get(user_id)
        if user is None:
            return 0
        return user.event_count - int(user.extras.get(COVERED, 0))  # type: ignore[call-overload]

    def store(self, user_id: str, snapshot: HistorySnapshot, profile: dict[str, Any], *, final: bool) -> None:
        user = self.users.get(user_id)
        if user is None or user is not snapshot.owner:
            return
        if final:
            user.extras[COVERED] = snapshot.event_count
        user.extras[PROFILE_KEY] = profile
        self.stored.append((user_id, profile))
