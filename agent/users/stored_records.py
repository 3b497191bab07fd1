"""What the streams hold about one user: finding their messages, and erasing them for good.

Under wire contract v2 a user's events are exactly the messages on ``<prefix>.events.*.<token>``,
so the stream finds them by subject. Two places need a scan instead: events stored on v1
subjects before the stream moved to v2 (agent/bus/contract_upgrade.py), and dead letters, whose
one subject names no user.

Erasing deletes each message with the server's default erase, which overwrites its bytes on
disk; a purge by subject would only mark them deleted, leaving the user's data in the store's
files until a compaction that may never come.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import nats.errors
import orjson
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError

from agent.config import Settings
from agent.wire.contract import v1_event_type
from agent.wire.user_tokens import user_token

log = logging.getLogger(__name__)

# a scan that receives nothing for this long has met the end of what the server holds
READ_IDLE_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class StoredMessage:
    stream: str
    seq: int
    subject: str
    data: bytes
    stored_at: float | None

    def json(self) -> Any:
        try:
            return orjson.loads(self.data)
        except orjson.JSONDecodeError:
            return None


async def _count(js: JetStreamContext, stream: str, subjects: str) -> int:
    """How many messages of ``stream`` are on subjects matching ``subjects``."""
    try:
        info = await js.stream_info(stream, subjects_filter=subjects)
    except NotFoundError:
        return 0
    return sum((info.state.subjects or {}).values())


async def read_stored(js: JetStreamContext, stream: str, subjects: str) -> AsyncIterator[StoredMessage]:
    """Every message of ``stream`` on ``subjects`` (a filter, wildcards allowed), in order."""
    expected = await _count(js, stream, subjects)
    if not expected:
        return
    # An ordered consumer: ephemeral, flow-controlled, gone when unsubscribed, and never acked.
    sub = await js.subscribe(
        subjects, stream=stream, ordered_consumer=True, deliver_policy=api.DeliverPolicy.ALL, manual_ack=True
    )
    try:
        while True:
            try:
                msg: Msg = await sub.next_msg(timeout=READ_IDLE_TIMEOUT_S)
            except nats.errors.TimeoutError:
                log.warning("stream %s: reading %s stopped short", stream, subjects)
                return
            stamp = msg.metadata.timestamp
            yield StoredMessage(
                stream=stream,
                seq=msg.metadata.sequence.stream,
                subject=msg.subject,
                data=msg.data,
                stored_at=stamp.timestamp() if stamp else None,
            )
            if msg.metadata.num_pending == 0:
                return
    finally:
        await sub.unsubscribe()


async def user_events(
    js: JetStreamContext, settings: Settings, user_id: str, v2_from_seq: int
) -> AsyncIterator[StoredMessage]:
    """The user's events in the event stream: their v2 subjects, then any v1 events of theirs
    stored before the stream moved to v2."""
    prefix = settings.subject_prefix
    async for stored in read_stored(js, settings.stream_name, f"{prefix}.events.*.{user_token(user_id)}"):
        yield stored
    if v2_from_seq <= 1:
        return
    async for stored in read_stored(js, settings.stream_name, f"{prefix}.events.*"):
        if stored.seq >= v2_from_seq:
            return
        body = stored.json()
        if v1_event_type(prefix, stored.subject) and isinstance(body, dict) and body.get("user_id") == user_id:
            yield stored


def names_user(dead_letter: Any, user_id: str, token: str, prefix: str) -> bool:
    """Whether a dead letter may be about the user: its subject carries their token, or what it
    kept of the refused message names their id as a JSON string. (A dead letter is refused
    input, often not valid JSON, so it is matched as text; one that merely quotes the same
    string elsewhere is erased too, which costs only a diagnostic.)"""
    if not isinstance(dead_letter, dict):
        return False
    subject = dead_letter.get("subject")
    head = f"{prefix}.events."
    if isinstance(subject, str) and subject.startswith(head):
        # the v2 shape, <type>.<user_token>, whatever the type named
        tokens = subject[len(head) :].split(".")
        if len(tokens) == 2 and tokens[1] == token:
            return True
    excerpt = dead_letter.get("payload")
    return isinstance(excerpt, str) and orjson.dumps(user_id).decode() in excerpt


async def user_dead_letters(js: JetStreamContext, settings: Settings, user_id: str) -> AsyncIterator[StoredMessage]:
    token = user_token(user_id)
    async for stored in read_stored(js, settings.dlq_stream_name, settings.subject("dlq")):
        if names_user(stored.json(), user_id, token, settings.subject_prefix):
            yield stored


async def erase(js: JetStreamContext, messages: list[StoredMessage]) -> int:
    """Delete each message, overwriting its stored bytes; the number erased (one gone already,
    by age or by another agent's erase, is not counted)."""
    erased = 0
    for stored in messages:
        try:
            if await js.delete_msg(stored.stream, stored.seq):
                erased += 1
        except NotFoundError:
            continue
    return erased
