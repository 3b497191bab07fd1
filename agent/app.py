"""The agent: every component's lifespan, entered in order and exited in reverse.

Start: bus -> streams -> plugins -> state rebuilt from the streams -> push worker -> consumers
-> request/reply -> HTTP. Stop is the mirror image, so by the time the bus closes every
delivered message has been applied and settled and every owed push has been attempted.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from typing import Any

import nats
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from agent.bus.disposition import Settler
from agent.bus.embedded_server import embedded_nats_server
from agent.bus.ingest import DRAIN_TIMEOUT_S, Ingestor, drain_bounded, ensure_streams
from agent.config import Settings
from agent.hooks.manager import get_plugin_manager
from agent.pipeline.pipeline import Pipeline
from agent.pipeline.push_scheduler import PushScheduler
from agent.serving.http_api import ApiState, serving
from agent.serving.metrics import Metrics
from agent.wire.contract import InvalidMessage, decode_json, parse_recommend_request

log = logging.getLogger(__name__)

QUEUE_GROUP = "recsys-agent"


@asynccontextmanager
async def nats_connection(servers: str | list[str]) -> AsyncIterator[NATS]:
    """A connection to one server or to any of a cluster's (a list of URLs)."""

    async def on_error(exc: Exception) -> None:
        log.warning("NATS: %s", exc)

    async def on_disconnect() -> None:
        log.warning("NATS connection lost; reconnecting")

    async def on_reconnect() -> None:
        log.info("NATS connection restored")

    nc = await nats.connect(
        servers,
        name="recsys-agent",
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        # bounded, so that shutting down never waits long on a bus that is gone
        drain_timeout=DRAIN_TIMEOUT_S,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
    )
    try:
        yield nc
    finally:
        with suppress(Exception):
            await nc.drain()
        if not nc.is_closed:
            await nc.close()


class Agent:
    """Use as ``async with Agent(settings) as agent:``; it serves until the block exits."""

    def __init__(self, settings: Settings, extra_plugins: Iterable[tuple[str, Any]] = ()) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.pm = get_plugin_manager(settings, extra_plugins)
        self.pipeline = Pipeline(settings, self.pm, self.metrics)
        self.nats_url = settings.nats_url
        self.http_url = ""
        self._stack: AsyncExitStack | None = None

    async def __aenter__(self) -> Agent:
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            await self._start(stack)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()
        log.info("agent stopped")

    async def _start(self, stack: AsyncExitStack) -> None:
        settings = self.settings
        if not settings.nats_url:
            server = await stack.enter_async_context(
                embedded_nats_server(settings.data_dir / "nats", settings.nats_port, binary=settings.nats_server_bin)
            )
            self.nats_url = server.url
        nc = await stack.enter_async_context(nats_connection(settings.nats_servers() or [self.nats_url]))
        js = nc.jetstream()
        await ensure_streams(js, settings)
        self.pipeline.context.nc = nc
        self.pipeline.context.js = js
        await stack.enter_async_context(self.pipeline.running())

        pushes = PushScheduler(self.pipeline)
        settler = Settler(js, settings.subject("dlq"), self.metrics)
        ingestor = Ingestor(settings, js, self.pipeline, settler, pushes.schedule)
        started = time.perf_counter()
        await ingestor.rebuild()
        log.info(
            "state rebuilt in %.2f s: %d items, %d users",
            time.perf_counter() - started,
            self.pipeline.catalog.active_count(),
            len(self.pipeline.users),
        )
        await stack.enter_async_context(self._collector_spared_startup())
        await stack.enter_async_context(pushes.running())
        await stack.enter_async_context(ingestor.consuming())
        await stack.enter_async_context(self._recommend_responder(nc))

        routes = [route for _, answer in await self.pipeline.hooks.call_all("recsys_http_routes") for route in answer]
        api = ApiState(settings=settings, pipeline=self.pipeline, js=js, nats_url=self.nats_url, started_at=time.time())
        self.http_url = await stack.enter_async_context(serving(api, routes))
        log.info("agent ready: NATS %s, HTTP %s", self.nats_url, self.http_url)

    @asynccontextmanager
    async def _collector_spared_startup(self) -> AsyncIterator[None]:
        """Keep what the start built (models, the catalog, the rebuilt state: hundreds of
        thousands of objects) out of the cyclic garbage collector's full passes.

        Measured on the dev set: with them in, every full pass took 280-360 ms, a stall that
        every event in flight waits out (p99 at 250 events/s rose from about 20 to 300 ms).
        They live as long as the agent, so scanning them finds nothing. Frozen once the
        state is rebuilt (collected first, so no garbage is kept), and again once the
        background work of the start (the embedding model, the catalog's vectors) is done.
        """
        gc.collect()
        gc.freeze()

        async def after_settle() -> None:
            await self.pipeline.settle()
            gc.freeze()
            log.debug("%d objects kept out of the garbage collector's passes", gc.get_freeze_count())

        task = asyncio.create_task(after_settle(), name="freeze-after-settle")
        try:
            yield
        finally:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
            gc.unfreeze()

    @asynccontextmanager
    async def _recommend_responder(self, nc: NATS) -> AsyncIterator[None]:
        async def on_request(msg: Msg) -> None:
            self.metrics.requests.labels(via="nats").inc()
            try:
                request = parse_recommend_request(
                    decode_json(msg.data, self.settings.max_payload_bytes),
                    max_k=self.settings.max_k,
                    default_k=self.settings.default_k,
                )
                recs = await self.pipeline.recommend(
                    request.user_id, request.k, categories=request.categories, exclude=request.exclude
                )
                body = recs.to_json()
            except InvalidMessage as exc:
                body = orjson.dumps({"error": str(exc)})
            except Exception as exc:
                log.exception("recommend request failed")
                body = orjson.dumps({"error": f"internal error: {type(exc).__name__}"})
            if msg.reply:
                await msg.respond(body)

        # A queue group, so that several agents answer requests between them.
        sub = await nc.subscribe(self.settings.subject("recommend"), queue=QUEUE_GROUP, cb=on_request)
        try:
            yield
        finally:
            await drain_bounded(sub)
