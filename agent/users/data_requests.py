"""A user's requests about their data: forget, export, merge. HTTP (agent/serving/user_data_api.py)
and NATS (agent/bus/services.py) both answer through :class:`UserData`.

Forget erases the user's events from the event stream and their dead letters (overwritten on
disk, see agent/users/stored_records.py), then what every agent holds: this one at once, the
others through a notice on ``<prefix>.agents.forget``, a subject apps may not publish on. What
stays is what cannot be traced to one person: the trending counts, item co-occurrence counts and
the fusion's weights by segment (README, "Privacy").
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from agent.bus.ingest import drain_bounded
from agent.config import Settings
from agent.pipeline.pipeline import Pipeline
from agent.pipeline.push_scheduler import PushScheduler
from agent.users.stored_records import StoredMessage, erase, user_dead_letters, user_events
from agent.wire.contract import MAX_ID_LENGTH, InvalidMessage, event_subject, parse_event, subject_event_type

log = logging.getLogger(__name__)

# passes over a user's events in one forget, at most: each erases what came during the last
FORGET_PASSES = 3

Moving = Callable[[list[StoredMessage]], Awaitable[None]]


def checked_user_id(value: Any, field: str = "user_id") -> str:
    """A user id as the wire contract takes it, or InvalidMessage saying why not."""
    if not isinstance(value, str) or not value:
        raise InvalidMessage(f"'{field}' must be a non-empty string")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidMessage(f"'{field}' is longer than {MAX_ID_LENGTH} characters")
    return value


def merged_event_id(from_user: str, stored: StoredMessage) -> str:
    """The id of an anonymous visitor's event once it is moved to the user who logged in:
    the same for the same event (a merge asked twice stores it once), and naming neither user
    (the visitor is forgotten, and this id stays in the stream)."""
    digest = hashlib.sha256(f"{from_user}\x00{stored.stream}\x00{stored.seq}".encode()).hexdigest()
    return f"merged-{digest[:32]}"


class UserData:
    def __init__(
        self, settings: Settings, nc: NATS, js: JetStreamContext, pipeline: Pipeline, pushes: PushScheduler
    ) -> None:
        self.settings = settings
        self.nc = nc
        self.js = js
        self.pipeline = pipeline
        self.pushes = pushes
        # from the event stream's metadata (agent/bus/contract_upgrade.py)
        self.v2_from_seq = 0
        self.notice_subject = settings.subject("agents", "forget")

    async def _events(self, user_id: str) -> list[StoredMessage]:
        return [stored async for stored in user_events(self.js, self.settings, user_id, self.v2_from_seq)]

    async def forget(self, user_id: str, before_erasing: Moving | None = None) -> dict[str, Any]:
        """Erase the user everywhere; ``before_erasing`` is handed each pass's events before they
        are erased (a merge moves them)."""
        user_id = checked_user_id(user_id)
        erased_events = 0
        # Each pass erases what the last found; one that finds nothing proves that every event
        # of theirs stored up to the cut-off is gone. What the stream stores after it is a new
        # start (the user came back).
        up_to_seq = 0
        for _ in range(FORGET_PASSES):
            events = await self._events(user_id)
            if not events and up_to_seq:
                break
            if before_erasing is not None and events:
                await before_erasing(events)
            erased_events += await erase(self.js, events)
            up_to_seq = (await self.js.stream_info(self.settings.stream_name)).state.last_seq
        dead_letters = [stored async for stored in user_dead_letters(self.js, self.settings, user_id)]
        erased_dead_letters = await erase(self.js, dead_letters)
        held = await self._drop_state(user_id, up_to_seq)
        notice = {"user_id": user_id, "up_to_seq": up_to_seq}
        await self.nc.publish(self.notice_subject, orjson.dumps(notice))
        log.info(
            "forgot a user: %d events, %d dead letters erased; state held: %s", erased_events, erased_dead_letters, held
        )
        return {
            "forgotten": True,
            "user_id": user_id,
            "erased": {"events": erased_events, "dead_letters": erased_dead_letters, "state": int(held)},
        }

    async def _drop_state(self, user_id: str, up_to_seq: int) -> bool:
        self.pushes.forget(user_id)
        return await self.pipeline.forget_user(user_id, up_to_seq=up_to_seq)

    async def export(self, user_id: str) -> dict[str, Any]:
        user_id = checked_user_id(user_id)
        events = await self._events(user_id)
        dead_letters = [stored async for stored in user_dead_letters(self.js, self.settings, user_id)]
        return {
            "user_id": user_id,
            "events": [
                {"seq": stored.seq, "subject": stored.subject, "stored_at": stored.stored_at, "event": stored.json()}
                for stored in events
            ],
            "dead_letters": [
                {"seq": stored.seq, "stored_at": stored.stored_at, "dead_letter": stored.json()}
                for stored in dead_letters
            ],
            "held": await self.pipeline.export_user(user_id),
        }

    async def merge(self, user_id: str, from_user: str) -> dict[str, Any]:
        """Move ``from_user``'s events (an anonymous visitor who logged in) to ``user_id``, then
        forget ``from_user``. The events are stored again under ``user_id``, in their order and
        with their times, and applied like any other: a restart rebuilds the merged history."""
        user_id = checked_user_id(user_id)
        from_user = checked_user_id(from_user, "from")
        if from_user == user_id:
            raise InvalidMessage("'from' must name another user")
        moved = 0

        async def move(events: list[StoredMessage]) -> None:
            nonlocal moved
            for stored in events:
                moved += await self._move(stored, from_user, user_id)

        # moved pass by pass inside the forget, each pass before it is erased: an event the
        # visitor sends while the merge runs is moved too, never erased unmoved
        forgotten = await self.forget(from_user, before_erasing=move)
        return {
            "merged": True,
            "user_id": user_id,
            "from": from_user,
            "events": moved,
            "forgotten": forgotten["erased"],
        }

    async def _move(self, stored: StoredMessage, from_user: str, user_id: str) -> int:
        """Store one of the visitor's events again under ``user_id``; 1 when stored, 0 when it
        was stored already (a merge asked twice) or was never a valid event."""
        body = stored.json()
        if not isinstance(body, dict):
            return 0
        prefix = self.settings.subject_prefix
        body = {**body, "user_id": user_id, "id": merged_event_id(from_user, stored)}
        try:
            # a body may leave its type to its subject (v2 and v1 alike)
            event = parse_event(
                body, now=stored.stored_at or 0.0, event_type=subject_event_type(prefix, stored.subject)
            )
        except InvalidMessage:
            return 0  # it was dead-lettered when it came: nothing to move
        body["type"] = event.type
        if body.get("ts") is None:
            body["ts"] = event.ts
        ack = await self.js.publish(
            event_subject(prefix, event), orjson.dumps(body), headers={"Nats-Msg-Id": body["id"]}
        )
        return 0 if ack.duplicate else 1

    @asynccontextmanager
    async def listening(self) -> AsyncIterator[UserData]:
        """Drop the state of users another agent forgot (every agent hears every notice)."""

        async def on_notice(msg: Msg) -> None:
            try:
                notice = orjson.loads(msg.data)
                user_id = checked_user_id(notice.get("user_id"))
                up_to_seq = int(notice.get("up_to_seq", 0))
                # a notice can name no event the stream has not stored yet: a forged one with a
                # sequence far ahead would silence the user's events to come
                last_seq = (await self.js.stream_info(self.settings.stream_name)).state.last_seq
            except (orjson.JSONDecodeError, InvalidMessage, AttributeError, TypeError, ValueError):
                log.warning("ignored a malformed forget notice on %s", msg.subject)
                return
            except Exception as exc:
                log.warning("could not check a forget notice (%s); dropping the state only", type(exc).__name__)
                last_seq = 0
            await self._drop_state(user_id, min(up_to_seq, last_seq))

        sub = await self.nc.subscribe(self.notice_subject, cb=on_notice)
        try:
            yield self
        finally:
            await drain_bounded(sub)
