"""The recorded events a replay runs on: read in replay order, and a reproducible subset."""

from __future__ import annotations

import random
import zlib
from pathlib import Path

from agent.evaluation.datasets import DatasetError, read_jsonl, stream_order_key
from agent.wire.contract import Event, InvalidMessage, parse_event


def load_events(path: Path) -> list[Event]:
    """Events from ``path`` in replay order. Every event needs a timestamp: without one there is
    no order to replay."""
    events = []
    for number, obj in read_jsonl(path):
        if isinstance(obj, dict) and obj.get("ts") is None:
            raise DatasetError(f"{path}:{number}: invalid event: missing field 'ts' (needed to replay in time order)")
        try:
            events.append(parse_event(obj, now=0.0))
        except InvalidMessage as exc:
            raise DatasetError(f"{path}:{number}: invalid event: {exc}") from None
    events.sort(key=stream_order_key)
    return events


def select_events(events: list[Event], *, sample_users: float | None = None, limit: int | None = None) -> list[Event]:
    """A reproducible subset: the events of a hashed fraction of users, then the first ``limit``.

    Users are sampled by a hash of their id (not at random) so that the same fraction always
    keeps the same users, whatever the order or size of the file.
    """
    if sample_users is not None:
        if not 0.0 < sample_users <= 1.0:
            raise ValueError("sample_users must be in (0, 1]")
        threshold = sample_users * 2**32
        events = [e for e in events if zlib.crc32(e.user_id.encode()) < threshold]
    if limit is not None:
        events = events[:limit]
    return events


def shuffle_ties(events: list[Event], seed: int) -> list[Event]:
    """``events`` (in replay order) with the events of each user that share a timestamp (a
    basket) in a random order, reproducible by ``seed``; everything else stays in place.

    Replay order breaks such ties by item id, an order no user chose; shuffling them shows
    whether a figure depends on it (with the basket protocol it must not: a basket is one step).
    """
    rng = random.Random(seed)
    shuffled: list[Event] = []
    start = 0
    for position in range(1, len(events) + 1):
        if (
            position == len(events)
            or events[position].ts != events[start].ts
            or events[position].user_id != events[start].user_id
        ):
            tie = events[start:position]
            if len(tie) > 1:
                rng.shuffle(tie)
            shuffled.extend(tie)
            start = position
    return shuffled
