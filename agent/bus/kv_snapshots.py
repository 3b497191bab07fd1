"""Small learned state that the event stream cannot rebuild, kept in JetStream key-value.

Most state is a projection of the event stream and is rebuilt by replaying it. What is learned
from the agent's own rankings (fusion weights) is not in the stream; it is saved here, in a
bucket beside the streams, so a restart or a second agent starts from what was learned.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError

log = logging.getLogger(__name__)


class Snapshots:
    def __init__(self, js: JetStreamContext, bucket: str) -> None:
        self.js = js
        self.bucket = bucket
        self._kv: Any = None

    async def _store(self) -> Any:
        if self._kv is None:
            try:
                self._kv = await self.js.key_value(self.bucket)
            except BucketNotFoundError:
                self._kv = await self.js.create_key_value(bucket=self.bucket, history=1)
        return self._kv

    async def load(self, key: str) -> Any:
        try:
            entry = await (await self._store()).get(key)
        except KeyNotFoundError:
            return None
        if not entry.value:
            return None
        try:
            return orjson.loads(entry.value)
        except orjson.JSONDecodeError:
            # A snapshot is a cache of learned state, not the record: start without it.
            log.warning("snapshot %s in bucket %s is not valid JSON; starting without it", key, self.bucket)
            return None

    async def save(self, key: str, value: Any) -> None:
        await (await self._store()).put(key, orjson.dumps(value))
