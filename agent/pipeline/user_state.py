"""Per-user state the core keeps for every stage, and the event-id deduplicator."""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from agent.pipeline.extras import Extras


@dataclass(slots=True)
class Interaction:
    slot: int
    type: str
    ts: float
    # the event's taste signal (agent/signals.py), computed once when the event is applied
    signal: float
    value: float | None = None


@dataclass(slots=True)
class UserState:
    user_id: str
    recent: deque[Interaction]
    # every item slot the user has interacted with: never recommended back to them
    seen: set[int] = field(default_factory=set)
    event_count: int = 0
    last_ts: float = 0.0
    # free space for plugins, keyed by plugin name, so forgetting a user drops it too
    extras: Extras = field(default_factory=Extras)

    def recent_positive(self, limit: int, *, skip_last: bool = False) -> list[int]:
        """Distinct slots of the user's latest positive interactions, newest first, at most
        ``limit``; ``skip_last`` leaves out the newest interaction (the event being applied)."""
        out: list[int] = []
        history = reversed(self.recent)
        if skip_last:
            next(history, None)
        for interaction in history:
            if interaction.signal > 0 and interaction.slot not in out:
                out.append(interaction.slot)
                if len(out) >= limit:
                    break
        return out


class UserStore:
    """Users in least-recently-active order, bounded by ``max_users`` (the oldest is evicted)."""

    def __init__(self, history_length: int, max_users: int) -> None:
        self._users: OrderedDict[str, UserState] = OrderedDict()
        self.history_length = history_length
        self.max_users = max_users
        self.evicted = 0

    def get(self, user_id: str) -> UserState | None:
        return self._users.get(user_id)

    def get_or_create(self, user_id: str) -> UserState:
        user = self._users.get(user_id)
        if user is None:
            user = UserState(user_id=user_id, recent=deque(maxlen=self.history_length))
            self._users[user_id] = user
            if len(self._users) > self.max_users:
                self._users.popitem(last=False)
                self.evicted += 1
        else:
            self._users.move_to_end(user_id)
        return user

    def forget(self, user_id: str) -> bool:
        return self._users.pop(user_id, None) is not None

    def __len__(self) -> int:
        return len(self._users)


class Deduplicator:
    """Remembers which stream message first carried each event key.

    A second message with the same key is a duplicate from the client (ignored); the same
    message delivered again (same stream sequence) is a redelivery of something already
    applied, which still deserves its acknowledgement and push.
    """

    def __init__(self, capacity: int) -> None:
        self._first_seq: OrderedDict[str, int] = OrderedDict()
        self.capacity = capacity

    def check(self, key: str, seq: int) -> str:
        """Return 'new', 'redelivery' or 'duplicate' and remember ``key`` when new."""
        first = self._first_seq.get(key)
        if first is None:
            self._first_seq[key] = seq
            if len(self._first_seq) > self.capacity:
                self._first_seq.popitem(last=False)
            return "new"
        return "redelivery" if first == seq and seq > 0 else "duplicate"

    def discard(self, key: str) -> None:
        """Forget ``key``: its message could not be applied after all, and a retry must apply it."""
        self._first_seq.pop(key, None)

    def __len__(self) -> int:
        return len(self._first_seq)
