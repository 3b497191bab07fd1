"""JetStream ingestion: the streams, rebuilding state from them at start, and durable consumers.

The event and catalog streams are the record of truth: the agent's in-memory state is a
projection of them, rebuilt by replaying the streams at start and then kept current by durable
consumers that acknowledge a message only once it has been applied.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError

from agent.bus.disposition import Settler, decide
from agent.config import Settings
from agent.pipeline.pipeline import ApplyOutcome, Pipeline
from agent.wire.contract import InvalidMessage, decode_json, parse_event, parse_event_subject, parse_items

log = logging.getLogger(__name__)

REBUILD_IDLE_TIMEOUT_S = 5.0
# messages that fail while rebuilding are each logged with their traceback up to this many
MAX_REBUILD_REPORTS = 5
# a drain waits for messages already delivered to this agent; when the bus is gone it gives up
DRAIN_TIMEOUT_S = 3.0


async def drain_bounded(sub: Subscription) -> None:
    """Drain a subscription, giving up after DRAIN_TIMEOUT_S (the bus may be gone)."""
    with suppress(Exception):
        async with asyncio.timeout(DRAIN_TIMEOUT_S):
            await sub.drain()


@dataclass(frozen=True, slots=True)
class Subjects:
    events: str
    upsert: str
    delete: str
    dlq: str

    @classmethod
    def from_settings(cls, settings: Settings) -> Subjects:
        return cls(
            events=settings.subject("events", ">"),
            upsert=settings.subject("catalog", "upsert"),
            delete=settings.subject("catalog", "delete"),
            dlq=settings.subject("dlq"),
        )


async def ensure_streams(js: JetStreamContext, settings: Settings) -> None:
    """Create the streams, or bring an existing stream's limits in line with the settings."""
    subjects = Subjects.from_settings(settings)
    wanted = [
        api.StreamConfig(
            name=settings.stream_name,
            subjects=[subjects.events],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            max_age=settings.stream_max_age_s or None,
            max_bytes=settings.stream_max_bytes,
            # Larger than the agent's own limit on purpose: an oversize event is stored and then
            # dead-lettered with its reason, where a stream refusal would be silent to a client
            # that publishes without waiting for the stream's acknowledgement.
            max_msg_size=max(1024 * 1024, settings.max_payload_bytes),
            duplicate_window=120.0,
        ),
        api.StreamConfig(
            name=settings.catalog_stream_name,
            subjects=[subjects.upsert, subjects.delete],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            max_msg_size=8 * 1024 * 1024,
        ),
        api.StreamConfig(
            name=f"{settings.stream_name}_DLQ",
            subjects=[subjects.dlq],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            max_age=7 * 86_400.0,
        ),
    ]
    for config in wanted:
        try:
            info = await js.stream_info(config.name)
        except NotFoundError:
            await js.add_stream(config)
        else:
            # Only what the settings say changes: what an operator set on the stream (replicas
            # on a cluster, placement, a message limit) stays.
            await js.update_stream(
                dataclasses.replace(info.config, **{name: getattr(config, name) for name in AGENT_STREAM_FIELDS})
            )


# the stream settings the agent decides (from its settings); update_stream leaves the rest
AGENT_STREAM_FIELDS = ("subjects", "retention", "storage", "max_age", "max_bytes", "max_msg_size", "duplicate_window")


def _stored_at(msg: Msg) -> float:
    """When the stream stored the message (epoch seconds): the same on every replay of it."""
    stamp = msg.metadata.timestamp
    return stamp.timestamp() if stamp else time.time()


class Ingestor:
    """Turns stream messages into pipeline calls; reports every outcome to the disposition rule."""

    def __init__(
        self,
        settings: Settings,
        js: JetStreamContext,
        pipeline: Pipeline,
        settler: Settler,
        on_applied: Callable[[str, str], None],
    ) -> None:
        self.settings = settings
        self.js = js
        self.pipeline = pipeline
        self.settler = settler
        self.subjects = Subjects.from_settings(settings)
        self.on_applied = on_applied
        self.rebuilt_up_to: dict[str, int] = {}
        self.stopping = False
        self.undelivered = 0
        self.rebuild_failures = 0

    async def _apply_event_message(self, msg: Msg) -> tuple[str, str] | None:
        """Apply one event message; returns (user_id, event key) when a push is owed."""
        meta = msg.metadata
        # The stream takes any subject under '<prefix>.events.>'; only the contract's shape is
        # applied, anything else is dead-lettered naming the subject to use.
        subject = parse_event_subject(self.settings.subject_prefix, msg.subject)
        obj = decode_json(msg.data, self.settings.max_payload_bytes)
        # A missing timestamp takes the time the stream stored the message, so a rebuild
        # reproduces exactly the state the first pass built.
        stored_at = _stored_at(msg)
        event = parse_event(obj, now=stored_at, event_type=subject.type)
        event.received_at = stored_at
        seq = meta.sequence.stream
        outcome = await self.pipeline.apply_event(event, seq)
        if outcome is ApplyOutcome.DUPLICATE:
            return None
        return event.user_id, event.id if event.id is not None else f"seq:{seq}"

    async def _apply_catalog_message(self, msg: Msg) -> None:
        obj = decode_json(msg.data, 8 * 1024 * 1024)
        if msg.subject == self.subjects.delete:
            if not isinstance(obj, dict) or not isinstance(obj.get("id"), str) or not obj["id"]:
                raise InvalidMessage('a delete needs {"id": <string>}')
            await self.pipeline.delete_item(obj["id"])
        else:
            # the stream's time: an item rebuilt after a restart keeps the day it was added
            await self.pipeline.upsert_items(parse_items(obj), ts=_stored_at(msg))

    async def on_event(self, msg: Msg) -> None:
        if self.stopping:
            # Handed straight back: redelivered at once to whichever agent runs next, instead
            # of holding the shutdown or waiting out ack_wait.
            await msg.nak()
            return
        self.pipeline.metrics.events_received.inc()
        error: BaseException | None = None
        owed: tuple[str, str] | None = None
        try:
            # the stream's messages not yet delivered to this consumer, as of this one (set
            # first, so that a last message that fails or is a duplicate still updates it)
            self.undelivered = msg.metadata.num_pending
            owed = await self._apply_event_message(msg)
        except Exception as exc:
            error = exc
        await self._settle(msg, error, "events")
        if owed is not None and error is None:
            self.on_applied(*owed)

    async def on_catalog(self, msg: Msg) -> None:
        if self.stopping:
            await msg.nak()
            return
        error: BaseException | None = None
        try:
            await self._apply_catalog_message(msg)
        except Exception as exc:
            error = exc
        await self._settle(msg, error, "catalog")

    async def _settle(self, msg: Msg, error: BaseException | None, source: str) -> None:
        if error is not None and not isinstance(error, InvalidMessage):
            log.exception("could not apply a message from %s", msg.subject, exc_info=error)
        verdict = decide(error, msg.metadata.num_delivered, self.settings.max_deliver)
        try:
            await self.settler.settle(msg, verdict, source)
        except Exception:
            # Not acked: JetStream redelivers after ack_wait and the dedup check absorbs it.
            log.exception("could not settle a message from %s", msg.subject)

    async def rebuild(self) -> None:
        """Replay both streams into the pipeline: catalog first, then events."""
        await self._replay(self.settings.catalog_stream_name, self._rebuild_catalog)
        count = await self._replay(self.settings.stream_name, self._rebuild_event)
        self.pipeline.metrics.events_rebuilt.inc(count)
        if self.rebuild_failures:
            log.error("%d messages could not be applied while rebuilding and were skipped", self.rebuild_failures)

    async def _rebuild_catalog(self, msg: Msg) -> None:
        await self._rebuild_one(msg, self._apply_catalog_message)

    async def _rebuild_event(self, msg: Msg) -> None:
        await self._rebuild_one(msg, self._apply_event_message)

    async def _rebuild_one(self, msg: Msg, apply: Callable[[Msg], Awaitable[object]]) -> None:
        # One that fails otherwise than as invalid (it was retried and dead-lettered, or a
        # plugin changed since) is skipped with a report: one message must not stop every
        # later start.
        try:
            await apply(msg)
        except InvalidMessage:
            return  # dead-lettered with its reason on its first pass: skipped quietly
        except Exception:
            self.rebuild_failures += 1
            if self.rebuild_failures <= MAX_REBUILD_REPORTS:
                log.exception("skipped message %d of %s while rebuilding", msg.metadata.sequence.stream, msg.subject)

    async def _replay(self, stream: str, apply: Callable[[Msg], object]) -> int:
        info = await self.js.stream_info(stream)
        last = info.state.last_seq
        self.rebuilt_up_to[stream] = last
        if info.state.messages == 0:
            return 0
        started = time.perf_counter()
        # An ordered consumer: ephemeral, flow-controlled, and it never needs acks.
        sub = await self.js.subscribe(
            f"{self.settings.subject_prefix}.>",
            stream=stream,
            ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.ALL,
            manual_ack=True,
        )
        count = 0
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=REBUILD_IDLE_TIMEOUT_S)
                except nats.errors.TimeoutError:
                    log.warning("stream %s stopped short of sequence %d while rebuilding", stream, last)
                    break
                seq = msg.metadata.sequence.stream
                if seq > last:
                    break
                await apply(msg)  # type: ignore[misc]
                count += 1
                if seq >= last:
                    break
        finally:
            await sub.unsubscribe()
        log.info("rebuilt %d messages of stream %s in %.2f s", count, stream, time.perf_counter() - started)
        return count

    def _consumer_config(self, stream: str, max_ack_pending: int) -> api.ConsumerConfig:
        """The durable consumer's configuration, used only when it does not exist yet (an
        existing one keeps its own, and its position).

        A new consumer starts after what the rebuild applied: from the stream's start it
        would apply every event a second time (the deduplicator holds only so many keys).
        """
        return api.ConsumerConfig(
            ack_wait=self.settings.ack_wait_s,
            # JetStream stops redelivering after max_deliver + 1; by then decide() has
            # dead-lettered the message.
            max_deliver=self.settings.max_deliver + 1,
            max_ack_pending=max_ack_pending,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self.rebuilt_up_to.get(stream, 0) + 1,
        )

    @asynccontextmanager
    async def consuming(self) -> AsyncIterator[None]:
        """Durable push consumers for the catalog and the events, drained on exit."""
        catalog_sub = await self.js.subscribe(
            self.subjects.upsert.rsplit(".", 1)[0] + ".>",
            durable=f"{self.settings.consumer_name}-catalog",
            stream=self.settings.catalog_stream_name,
            cb=self.on_catalog,
            manual_ack=True,
            config=self._consumer_config(self.settings.catalog_stream_name, 1_000),
        )
        events_sub = await self.js.subscribe(
            self.subjects.events,
            durable=self.settings.consumer_name,
            stream=self.settings.stream_name,
            cb=self.on_event,
            manual_ack=True,
            config=self._consumer_config(self.settings.stream_name, self.settings.max_ack_pending),
        )
        # waiting here, and still in the stream for this consumer
        self.undelivered = 0
        self.pipeline.context.backlog = lambda: events_sub.pending_msgs + self.undelivered
        try:
            yield
        finally:
            self.pipeline.context.backlog = lambda: 0
            # Stop taking work; what is buffered here goes back to JetStream unacknowledged.
            self.stopping = True
            for sub in (events_sub, catalog_sub):
                await drain_bounded(sub)
