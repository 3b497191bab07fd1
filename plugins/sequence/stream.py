"""What a training round learns from: the latest positive events, and the job made of them.

The plugin keeps the latest ``window_events`` positive events in a ring (user, item slot,
time: ``agent/pipeline/recent_events.py``), as they are applied: a round trains on exactly the events applied before it started,
in a replay as live. A round's job is self-contained (plain arrays, item ids rather than this
agent's slots), so that it can be sent to the worker process, and so that the version it
gives means the same on another agent, whose slots differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from agent.pipeline.recent_events import RecentEvents
from plugins.sequence.options import ModelShape, TrainingSettings

if TYPE_CHECKING:
    from agent.vectors.item_vectors import ItemVectors
    from plugins.sequence.version import Version


@dataclass(slots=True)
class TrainingJob:
    """One round's work, for the worker process.

    Items are numbered for the round: the ``n_window`` items the events name first (their ids
    are ``item_ids``; each gets an id embedding), then items known only by their text (they
    serve as negatives, so that the text projection learns what an unchosen item looks like).
    """

    version: int
    shape: ModelShape
    settings: TrainingSettings
    users: np.ndarray  # int64, per event, oldest first
    items: np.ndarray  # int64, per event: the item's number in the round
    ts: np.ndarray  # float64, per event
    item_ids: list[str]  # the window's items, by number
    text: np.ndarray  # float32 (items, text_dim): every item's text vector (0 where none)
    has_text: np.ndarray  # bool (items,)
    # a previous version's arrays to start from, and for each window item its row there (-1: new)
    warm: dict[str, np.ndarray] | None = None
    warm_rows: np.ndarray | None = None

    @property
    def n_window(self) -> int:
        return len(self.item_ids)


@dataclass(slots=True)
class TrainingResult:
    params: dict[str, np.ndarray]
    examples: int
    steps: int
    loss: float
    # the worker's own wall and CPU time for the round
    seconds: float
    cpu_seconds: float


def make_job(
    recent: RecentEvents,
    ids: list[str],
    vectors: ItemVectors | None,
    text_dim: int,
    number: int,
    shape: ModelShape,
    settings: TrainingSettings,
    warm: Version | None,
) -> tuple[TrainingJob, np.ndarray] | None:
    """The job of a round on the events held now and the slot of each of its items, or None
    when there is nothing to learn.

    ``ids``: the catalog's item ids by slot; ``vectors``: the item text vectors (None: the
    content plugin has none yet, and the round learns from ids alone)."""
    users, slots, ts = recent.window()
    if len(users) < 2:
        return None
    window_slots, items = np.unique(slots, return_inverse=True)
    item_ids = [ids[slot] for slot in window_slots.tolist()]
    if vectors is not None and vectors.dim == text_dim:
        present = vectors.present(len(ids))
        others = np.flatnonzero(present)
        others = others[~np.isin(others, window_slots)]
        every = np.concatenate([window_slots, others])
        has_text = present[every].copy()
        text = np.where(has_text[:, None], np.nan_to_num(vectors.rows(every)), 0.0).astype(np.float32)
    else:
        every = window_slots
        has_text = np.zeros(len(window_slots), dtype=bool)
        text = np.zeros((len(window_slots), text_dim), dtype=np.float32)
    warm_rows = None
    if warm is not None:
        warm_rows = np.array([warm.row_of.get(item_id, -1) for item_id in item_ids], dtype=np.int64)
    job = TrainingJob(
        version=number,
        shape=shape,
        settings=settings,
        users=users,
        items=items.astype(np.int64),
        ts=ts,
        item_ids=item_ids,
        text=text,
        has_text=has_text,
        warm=warm.params if warm is not None else None,
        warm_rows=warm_rows,
    )
    return job, every
