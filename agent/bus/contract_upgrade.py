"""The event stream's move from wire contract v1 to v2, recorded on the stream itself.

v1 published events on ``<prefix>.events.<type>``; v2 adds the user's token. Events that a
stream stored on v1 subjects were accepted and applied when they came, so they stay part of the
record: the first start under v2 writes, into the stream's metadata, the sequence from which v2
holds. A v1 subject stored before it is applied as v1; from it on, it is dead-lettered like
any other subject of the wrong shape. Forgetting a user also finds their v1 events (see
agent/users/stored_records.py), so nothing is left behind by the upgrade.
"""

from __future__ import annotations

import dataclasses
import logging

from nats.js import JetStreamContext

log = logging.getLogger(__name__)

V2_FROM_SEQ = "recsys_wire_v2_from_seq"


async def wire_v2_from_seq(js: JetStreamContext, stream: str) -> int:
    """The sequence from which the event stream holds only v2 subjects; recorded at the first
    start under v2 (a new stream: 1, so every event must come on a v2 subject)."""
    info = await js.stream_info(stream)
    metadata = dict(info.config.metadata or {})
    recorded = metadata.get(V2_FROM_SEQ)
    if recorded is not None and recorded.isdigit():
        return int(recorded)
    first_v2 = info.state.last_seq + 1
    metadata[V2_FROM_SEQ] = str(first_v2)
    await js.update_stream(dataclasses.replace(info.config, metadata=metadata))
    if info.state.last_seq:
        log.info(
            "event stream %s moves to wire contract v2 at sequence %d: the %d events stored before it keep their v1 subjects",
            stream,
            first_v2,
            info.state.messages,
        )
    return first_v2
