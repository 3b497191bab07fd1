"""Versions shared by the agents of one stream, through JetStream.

Several agents serve one stream; one of them trains, and every agent serves the version it
published. Two buckets beside the event stream:

- key-value ``<stream>_SEQUENCE``: ``trainer``, the claim of the agent that trains (its id and
  when it last renewed the claim), and ``version``, the latest published version (its number
  and the object that holds it);
- object store ``<stream>_SEQUENCE_MODELS``: the versions themselves (``Version.to_bytes``, a
  few MB: more than one NATS message holds, which the object store splits into chunks).

The first agent whose round comes due claims ``trainer`` (an atomic create); it renews the
claim at each poll and each round. Another agent whose round comes due while the claim is
fresh does not train: it loads what the trainer publishes. A claim not renewed for
``lease_s`` (its agent stopped) is taken over, by compare-and-set, by the next agent whose
round comes due. An object is written before the pointer that names it, so a pointer never
names an object that is not there yet; the two previous objects are kept for loaders that are
still reading them.
"""

from __future__ import annotations

import logging
import time
from contextlib import suppress
from typing import Any

import orjson
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError

log = logging.getLogger(__name__)

TRAINER_KEY = "trainer"
VERSION_KEY = "version"
KEEP_OBJECTS = 3


class SharedVersions:
    def __init__(self, js: JetStreamContext, stream_name: str, agent_id: str, lease_s: float) -> None:
        self.js = js
        self.agent_id = agent_id
        self.lease_s = lease_s
        self.kv_bucket = f"{stream_name}_SEQUENCE"
        self.object_bucket = f"{stream_name}_SEQUENCE_MODELS"
        self._kv: Any = None
        self._objects: Any = None
        # the revision of our claim on ``trainer``, while we hold it
        self._claim: int | None = None

    async def _store(self) -> Any:
        if self._kv is None:
            try:
                self._kv = await self.js.key_value(self.kv_bucket)
            except BucketNotFoundError:
                self._kv = await self.js.create_key_value(bucket=self.kv_bucket, history=1)
        return self._kv

    async def _object_store(self) -> Any:
        if self._objects is None:
            try:
                self._objects = await self.js.object_store(self.object_bucket)
            except (BucketNotFoundError, NotFoundError):
                self._objects = await self.js.create_object_store(bucket=self.object_bucket)
        return self._objects

    @property
    def trains(self) -> bool:
        """Whether this agent held the trainer's claim at its last look."""
        return self._claim is not None

    async def claim(self) -> bool:
        """Claim (or renew) the right to train; False when another agent holds a fresh claim."""
        kv = await self._store()
        value = orjson.dumps({"agent": self.agent_id, "renewed_at": time.time()})
        try:
            entry = await kv.get(TRAINER_KEY)
        except KeyNotFoundError:
            entry = None
        try:
            if entry is None or not entry.value:
                self._claim = await kv.create(TRAINER_KEY, value)
                log.info("sequence model: this agent (%s) trains and publishes", self.agent_id)
                return True
            holder = _json(entry.value)
            mine = holder.get("agent") == self.agent_id
            renewed_at = holder.get("renewed_at")
            stale = not isinstance(renewed_at, (int, float)) or time.time() - renewed_at > self.lease_s
            if not mine and not stale:
                self._claim = None
                return False
            self._claim = await kv.update(TRAINER_KEY, value, last=entry.revision)
            if not mine:
                log.info("sequence model: agent %s took over training from %s", self.agent_id, holder.get("agent"))
            return True
        except KeyWrongLastSequenceError:
            # another agent claimed it between our read and our write
            self._claim = None
            return False

    async def renew(self) -> None:
        """Renew our claim, if we hold one (each poll), so that it does not go stale."""
        if self._claim is not None:
            await self.claim()

    async def release(self) -> None:
        """Give up our claim (a stop), so that another agent may train at once."""
        if self._claim is None:
            return
        kv = await self._store()
        # another agent holds the claim by now (ours lapsed): theirs stays
        with suppress(KeyWrongLastSequenceError):
            await kv.delete(TRAINER_KEY, last=self._claim)
        self._claim = None

    async def latest(self) -> dict[str, Any] | None:
        """The pointer to the latest published version: ``{"number", "object", "agent", ...}``."""
        kv = await self._store()
        try:
            entry = await kv.get(VERSION_KEY)
        except KeyNotFoundError:
            return None
        pointer = _json(entry.value) if entry.value else {}
        if not isinstance(pointer.get("number"), int) or not isinstance(pointer.get("object"), str):
            return None
        return pointer

    async def publish(self, number: int, data: bytes, info: dict[str, Any]) -> None:
        objects = await self._object_store()
        name = f"v{number}-{self.agent_id}"
        await objects.put(name, data)
        kv = await self._store()
        await kv.put(VERSION_KEY, orjson.dumps({"number": number, "object": name, "agent": self.agent_id, **info}))
        await self._prune(objects, keep=name)

    async def fetch(self, name: str) -> bytes:
        result = await (await self._object_store()).get(name)
        return bytes(result.data or b"")

    async def _prune(self, objects: Any, keep: str) -> None:
        try:
            listed = await objects.list()
        except NotFoundError:
            return
        live = sorted((info for info in listed if not info.deleted), key=lambda info: _number(info.name))
        for info in live[:-KEEP_OBJECTS]:
            if info.name != keep:
                await objects.delete(info.name)


def _json(value: bytes) -> dict[str, Any]:
    try:
        loaded = orjson.loads(value)
    except orjson.JSONDecodeError:
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _number(name: str) -> int:
    head = name.partition("-")[0].removeprefix("v")
    return int(head) if head.isdigit() else -1
