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
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError

from agent.bus.disposition import Disposer, decide
from agent.config import Settings
from agent.pipeline.pipeline import ApplyOutcome, Pipeline
from agent.wire.contract import (
    Event,
    InvalidMessage,
    decode_json,
    parse_event,
    parse_event_message,
    parse_items,
    v1_event_type,
)

log = logging.getLogger(__name__)

REBUILD_IDLE_TIMEOUT_S = 5.0
# messages that fail while rebuilding are each logged with their traceback up to this many
MAX_REBUILD_REPORTS = 5
# a drain waits for messages already delivered to this agent; when the bus is gone it gives up
DRAIN_TIMEOUT_S = 3.0
# the events consumer asks for what is there (no_wait) and gives up on that almost at once
# (nats-py then waits out the rest of this for more: it bounds what an event may wait here);
# then it waits for the next message with a long poll, answered the moment one arrives
IDLE_PROBE_S = 0.002
IDLE_WAIT_S = 5.0
FETCH_RETRY_S = 0.1
# how long the server keeps an agent's catalog consumer after the agent is gone
CATALOG_CONSUMER_INACTIVE_S = 300.0
FETCH_RETRY_MAX_S = 5.0


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
            name=settings.dlq_stream_name,
            subjects=[subjects.dlq],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            max_age=settings.dlq_max_age_s,
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
        disposer: Disposer,
        on_applied: Callable[[str, str], None],
    ) -> None:
        self.settings = settings
        self.js = js
        self.pipeline = pipeline
        self.disposer = disposer
        self.subjects = Subjects.from_settings(settings)
        self.on_applied = on_applied
        self.rebuilt_up_to: dict[str, int] = {}
        self.stopping = False
        self.undelivered = 0
        # messages fetched and not yet disposed of (acked, retried or dead-lettered)
        self.in_hand = 0
        # set while the stream holds nothing more for this consumer: pushes wait for it, so
        # that a burst is applied first and its pushes coalesce (one list per user, not per event)
        self.caught_up = asyncio.Event()
        self.caught_up.set()
        self.rebuild_failures = 0
        # events stored before this sequence on a v1 subject are applied as v1 (see
        # agent/bus/contract_upgrade.py)
        self.v2_from_seq = 0

    def _parse_event_message(self, msg: Msg) -> Event:
        """The event a message carries; raises InvalidMessage with the reason it cannot be one."""
        obj = decode_json(msg.data, self.settings.max_payload_bytes)
        # A missing timestamp takes the time the stream stored the message, so a rebuild
        # reproduces exactly the state the first pass built.
        stored_at = _stored_at(msg)
        legacy_type = v1_event_type(self.settings.subject_prefix, msg.subject)
        if legacy_type is not None and msg.metadata.sequence.stream < self.v2_from_seq:
            # stored under wire contract v1, before this stream moved to v2: it was accepted
            # then and stays part of the record
            event = parse_event(obj, now=stored_at, event_type=legacy_type)
        else:
            # The stream takes any subject under '<prefix>.events.>'; only the contract's shape
            # is applied, anything else is dead-lettered naming the subject to use.
            event = parse_event_message(self.settings.subject_prefix, msg.subject, obj, now=stored_at)
        event.received_at = stored_at
        return event

    async def _apply_event_messages(self, msgs: list[Msg]) -> list[tuple[str, str] | Exception | None]:
        """Apply a batch of event messages in stream order; per message: (user_id, event key)
        when a push is owed, None when not (a duplicate), or the exception that kept it from
        being applied."""
        results: list[tuple[str, str] | Exception | None] = []
        batch: list[tuple[Event, int]] = []
        parsed_at: list[int] = []
        for msg in msgs:
            try:
                event = self._parse_event_message(msg)
            except Exception as exc:
                results.append(exc)
                continue
            parsed_at.append(len(results))
            results.append(None)
            batch.append((event, msg.metadata.sequence.stream))
        outcomes = await self.pipeline.apply_events(batch)
        for position, (event, seq), outcome in zip(parsed_at, batch, outcomes):
            if isinstance(outcome, Exception):
                results[position] = outcome
            elif outcome is ApplyOutcome.APPLIED or outcome is ApplyOutcome.REDELIVERY:
                results[position] = (event.user_id, event.id if event.id is not None else f"seq:{seq}")
        return results

    async def _apply_catalog_message(self, msg: Msg) -> None:
        obj = decode_json(msg.data, 8 * 1024 * 1024)
        if msg.subject == self.subjects.delete:
            if not isinstance(obj, dict) or not isinstance(obj.get("id"), str) or not obj["id"]:
                raise InvalidMessage('a delete needs {"id": <string>}')
            await self.pipeline.delete_item(obj["id"])
        else:
            # the stream's time: an item rebuilt after a restart keeps the day it was added
            await self.pipeline.upsert_items(parse_items(obj), ts=_stored_at(msg))

    async def on_events(self, msgs: list[Msg]) -> None:
        """Apply a fetched batch, then dispose of every message of it (acks sent together) and owe
        the pushes: a message is acknowledged only after it has been applied."""
        self.pipeline.metrics.events_received.inc(len(msgs))
        self.pipeline.metrics.apply_batch_size.observe(len(msgs))
        # the stream's messages not yet delivered to this consumer, as of the batch's last
        self.undelivered = msgs[-1].metadata.num_pending
        self.in_hand = len(msgs)
        try:
            results = await self._apply_event_messages(msgs)
        except Exception as exc:
            # the batch as a whole failed (nothing of it is acknowledged): each is retried
            results = [exc] * len(msgs)
        finally:
            self.in_hand = 0
        for msg, result in zip(msgs, results):
            await self._dispose(msg, result if isinstance(result, Exception) else None, "events")
        for result in results:
            if isinstance(result, tuple):
                self.on_applied(*result)

    async def _fetch(self, sub: JetStreamContext.PullSubscription) -> list[Msg]:
        """What the stream holds for this consumer now, up to ``fetch_batch`` messages, without
        waiting for a batch to fill; when it holds nothing, wait for the next message."""
        # (nats-py raises its own TimeoutError or asyncio's, both builtin TimeoutErrors)
        with suppress(TimeoutError):
            # no_wait first: answers at once with what is there
            return await sub.fetch(self.settings.fetch_batch, timeout=IDLE_PROBE_S)
        with suppress(TimeoutError):
            # one message returns as soon as it arrives; the next round takes what followed it
            return await sub.fetch(1, timeout=IDLE_WAIT_S)
        return []

    async def _consume_events(self, sub: JetStreamContext.PullSubscription) -> None:
        failures = 0
        while not self.stopping:
            try:
                msgs = await self._fetch(sub)
            except Exception as exc:
                # the bus reconnecting, a consumer being recreated: nothing was taken, so
                # nothing is lost; ask again after a pause that grows while it lasts
                failures += 1
                delay = min(FETCH_RETRY_MAX_S, FETCH_RETRY_S * 2 ** min(failures - 1, 10))
                log.warning("fetching events failed (%s); again in %.1f s", exc.__class__.__name__, delay)
                await asyncio.sleep(delay)
                continue
            failures = 0
            if self.stopping:
                # fetched as the stop came (a cancel that a finishing wait swallowed): handed
                # back for at once redelivery
                for msg in msgs:
                    await msg.nak()
                return
            if msgs:
                await self.on_events(msgs)
            if msgs and self.undelivered > 0:
                self.caught_up.clear()
            else:
                self.caught_up.set()
            # the push worker and the catalog consumer run between batches
            await asyncio.sleep(0)

    async def on_catalog(self, msg: Msg) -> None:
        if self.stopping:
            await msg.nak()
            return
        error: BaseException | None = None
        try:
            await self._apply_catalog_message(msg)
        except Exception as exc:
            error = exc
        await self._dispose(msg, error, "catalog")

    async def _dispose(self, msg: Msg, error: BaseException | None, source: str) -> None:
        if error is not None and not isinstance(error, InvalidMessage):
            log.exception("could not apply a message from %s", msg.subject, exc_info=error)
        verdict = decide(error, msg.metadata.num_delivered, self.settings.max_deliver)
        try:
            await self.disposer.dispose(msg, verdict, source)
        except Exception:
            # Not acked: JetStream redelivers after ack_wait and the dedup check absorbs it.
            log.exception("could not dispose of a message from %s", msg.subject)

    async def rebuild(self) -> None:
        """Replay both streams into the pipeline: catalog first, then events."""
        await self._replay(self.settings.catalog_stream_name, self._rebuild_catalog)
        count = await self._replay(self.settings.stream_name, self._rebuild_events, batched=True)
        self.pipeline.metrics.events_rebuilt.inc(count)
        if self.rebuild_failures:
            log.error("%d messages could not be applied while rebuilding and were skipped", self.rebuild_failures)

    async def _rebuild_catalog(self, msg: Msg) -> None:
        await self._rebuild_one(msg, self._apply_catalog_message)

    async def _rebuild_events(self, msgs: list[Msg]) -> None:
        for msg, result in zip(msgs, await self._apply_event_messages(msgs)):
            if isinstance(result, Exception) and not isinstance(result, InvalidMessage):
                # dead-lettered (or retried) on its first pass; one message must not stop
                # every later start
                self._report_rebuild_failure(msg, result)

    async def _rebuild_one(self, msg: Msg, apply: Callable[[Msg], Awaitable[object]]) -> None:
        # One that fails otherwise than as invalid (it was retried and dead-lettered, or a
        # plugin changed since) is skipped with a report: one message must not stop every
        # later start.
        try:
            await apply(msg)
        except InvalidMessage:
            return  # dead-lettered with its reason on its first pass: skipped quietly
        except Exception as exc:
            self._report_rebuild_failure(msg, exc)

    def _report_rebuild_failure(self, msg: Msg, error: Exception) -> None:
        self.rebuild_failures += 1
        if self.rebuild_failures <= MAX_REBUILD_REPORTS:
            log.error(
                "skipped message %d of %s while rebuilding",
                msg.metadata.sequence.stream,
                msg.subject,
                exc_info=error,
            )

    async def _replay(self, stream: str, apply: Callable[[Any], Awaitable[object]], batched: bool = False) -> int:
        """Apply every message the stream holds now, in order: one at a time, or (``batched``)
        in lists of what has arrived, up to ``fetch_batch``."""
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
        pending: list[Msg] = []
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
                pending.append(msg)
                count += 1
                # a batch is what has arrived, never waited for
                if not batched or seq >= last or len(pending) >= self.settings.fetch_batch or not sub.pending_msgs:
                    await apply(pending if batched else msg)
                    pending = []
                if seq >= last:
                    break
            if pending:
                await apply(pending)
        finally:
            await sub.unsubscribe()
        log.info("rebuilt %d messages of stream %s in %.2f s", count, stream, time.perf_counter() - started)
        return count

    async def _stop_consumer(self, consumer: asyncio.Task[None]) -> None:
        # A batch in hand is applied and disposed of first; a wait for messages is cancelled, as
        # often as it takes: asyncio.wait_for (inside nats-py's fetch) can swallow a cancel
        # that comes as its wait ends, and the loop then stops at its check of `stopping`.
        while not consumer.done():
            if not self.in_hand:
                consumer.cancel()
            await asyncio.wait({consumer}, timeout=0.05)
        with suppress(asyncio.CancelledError):
            await consumer

    async def _hand_back(self, sub: JetStreamContext.PullSubscription) -> None:
        """Messages a pull request delivered after the last fetch: handed straight back, so that
        they are redelivered at once to whichever agent runs next, not after ack_wait."""
        with suppress(Exception):
            async with asyncio.timeout(DRAIN_TIMEOUT_S):
                for msg in await sub.fetch(self.settings.fetch_batch, timeout=IDLE_PROBE_S):
                    await msg.nak()

    async def _ensure_pull_consumer(self) -> None:
        """A durable push consumer left by an earlier version becomes a pull consumer that
        starts after what the old one had acknowledged (what follows is applied again, once:
        the deduplicator and the ack-after-apply rule make that safe)."""
        try:
            info = await self.js.consumer_info(self.settings.stream_name, self.settings.consumer_name)
        except NotFoundError:
            return
        if not info.config.deliver_subject:
            return
        floor = info.ack_floor.stream_seq if info.ack_floor is not None else 0
        await self.js.delete_consumer(self.settings.stream_name, self.settings.consumer_name)
        self.rebuilt_up_to[self.settings.stream_name] = max(floor, 0)
        log.info("consumer %s was a push consumer: now a pull consumer from sequence %d", info.name, floor + 1)

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
        """The consumers, drained on exit: the events' durable pull consumer, which agents that
        share the work share, and a catalog consumer of this agent's own.

        Every agent needs every catalog change, so the catalog consumer is not shared: it is an
        ephemeral consumer (acknowledged and redelivered like a durable one) from where this
        start's rebuild ended, which the server removes once its agent is gone."""
        catalog_config = self._consumer_config(self.settings.catalog_stream_name, 1_000)
        catalog_config.inactive_threshold = CATALOG_CONSUMER_INACTIVE_S
        catalog_sub = await self.js.subscribe(
            self.subjects.upsert.rsplit(".", 1)[0] + ".>",
            stream=self.settings.catalog_stream_name,
            cb=self.on_catalog,
            manual_ack=True,
            config=catalog_config,
        )
        await self._ensure_pull_consumer()
        events_sub = await self.js.pull_subscribe(
            self.subjects.events,
            durable=self.settings.consumer_name,
            stream=self.settings.stream_name,
            config=self._consumer_config(self.settings.stream_name, self.settings.max_ack_pending),
        )
        # fetched and not applied yet, and still in the stream for this consumer
        self.undelivered = 0
        self.pipeline.context.backlog = lambda: self.in_hand + self.undelivered
        consumer = asyncio.create_task(self._consume_events(events_sub), name="events-consumer")
        try:
            yield
        finally:
            self.pipeline.context.backlog = lambda: 0
            self.caught_up.set()  # the pushes owed are flushed at the stop, not held back
            # Stop taking work: a batch being applied finishes and is disposed of (the task is
            # cancelled only between batches, at its fetch or its yield).
            self.stopping = True
            await self._stop_consumer(consumer)
            await self._hand_back(events_sub)
            await drain_bounded(catalog_sub)
            with suppress(Exception):
                await events_sub.unsubscribe()
