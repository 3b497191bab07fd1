"""A bounded ring of the latest positive events, what background-trained models learn from.

Each event is (user code, item slot, one number: its time or its signal, as the model needs).
The ring's capacity fixes its memory whatever the stream's length. Users get small integer
codes; a code whose events all left the ring is dropped at the next compaction, so the code
table stays within the ring's size too. A forgotten user's events are blanked at once: the
next training round does not learn from them.
"""

from __future__ import annotations

import numpy as np


class RecentEvents:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.users = np.full(capacity, -1, dtype=np.int64)
        self.slots = np.zeros(capacity, dtype=np.int64)
        self.values = np.zeros(capacity, dtype=np.float64)
        # events appended since the start (the ring holds the last ``capacity`` of them)
        self.appended = 0
        self.codes: dict[str, int] = {}
        self._next_code = 0

    def __len__(self) -> int:
        return int(np.count_nonzero(self.users[: min(self.appended, self.capacity)] >= 0))

    def append(self, user_ids: list[str], slots: list[int], values: list[float]) -> None:
        if not user_ids:
            return
        codes = self.codes
        for user_id in user_ids:
            if user_id not in codes:
                codes[user_id] = self._next_code
                self._next_code += 1
        at = (self.appended + np.arange(len(user_ids))) % self.capacity
        self.users[at] = [codes[user_id] for user_id in user_ids]
        self.slots[at] = slots
        self.values[at] = values
        self.appended += len(user_ids)
        if len(codes) > 2 * self.capacity:
            self._compact()

    def forget(self, user_id: str) -> int:
        """Drop every event of the user; how many the ring held."""
        code = self.codes.pop(user_id, None)
        if code is None:
            return 0
        mine = self.users == code
        self.users[mine] = -1
        return int(mine.sum())

    def of_user(self, user_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(slots, values) of the user's events held, oldest first."""
        code = self.codes.get(user_id)
        users, slots, values = self.window()
        mine = users == code if code is not None else np.zeros(len(users), dtype=bool)
        return slots[mine], values[mine]

    def window(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(user codes, slots, values) of the events held, oldest first; copies."""
        held = min(self.appended, self.capacity)
        order = (self.appended - held + np.arange(held)) % self.capacity
        users = self.users[order]
        keep = users >= 0
        return users[keep], self.slots[order][keep], self.values[order][keep]

    def _compact(self) -> None:
        present = set(np.unique(self.users[self.users >= 0]).tolist())
        self.codes = {user_id: code for user_id, code in self.codes.items() if code in present}
