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
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import orjson
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError

from agent.bus.disposition import USER_TOKENS_HEADER
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
    headers: dict[str, str] = field(default_factory=dict)

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
                headers=dict(msg.headers or {}),
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
    async with aclosing(read_stored(js, settings.stream_name, f"{prefix}.events.*")) as legacy:
        async for stored in legacy:
            if stored.seq >= v2_from_seq:
                return
            body = stored.json()
            if v1_event_type(prefix, stored.subject) and isinstance(body, dict) and body.get("user_id") == user_id:
                yield stored


def names_user(stored: StoredMessage, user_id: str, token: str, prefix: str) -> bool:
    """Whether a dead letter is about the user: the agent tags each with the tokens of the users
    it names (agent/bus/disposition.py). One stored before the tags existed is theirs when its
    v2 subject carries their token or its excerpt, read as JSON, has their ``user_id``: never
    by a match of text, which would show one user's refused events to another."""
    tags = stored.headers.get(USER_TOKENS_HEADER)
    if tags is not None:
        return token in tags.split(",")
    dead_letter = stored.json()
    if not isinstance(dead_letter, dict):
        return False
    subject = dead_letter.get("subject")
    if isinstance(subject, str) and subject.startswith(f"{prefix}.events."):
        tokens = subject[len(f"{prefix}.events.") :].split(".")
        if len(tokens) == 2 and tokens[1] == token:
            return True
    excerpt = dead_letter.get("payload")
    if not isinstance(excerpt, str):
        return False
    try:
        body = orjson.loads(excerpt)
    except orjson.JSONDecodeError:
        return False
    return isinstance(body, dict) and body.get("user_id") == user_id


async def user_dead_letters(js: JetStreamContext, settings: Settings, user_id: str) -> AsyncIterator[StoredMessage]:
    token = user_token(user_id)
    async for stored in read_stored(js, settings.dlq_stream_name, settings.subject("dlq")):
        if names_user(stored, user_id, token, settings.subject_prefix):
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
