"""The agent: every component's lifespan, entered in order and exited in reverse.

Start: bus -> streams -> plugins -> state rebuilt from the streams -> push worker -> consumers
-> request/reply (a NATS micro service) -> HTTP. Stop is the mirror image, so by the time the bus closes every
delivered message has been applied and disposed of and every owed push has been attempted.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import nats
import pluggy
from nats.aio.client import Client as NATS

from agent.bus.contract_upgrade import wire_v2_from_seq
from agent.bus.disposition import Disposer
from agent.bus.embedded_server import NATS_DIR, embedded_nats_server
from agent.bus.ingest import DRAIN_TIMEOUT_S, Ingestor, ensure_streams
from agent.bus.services import request_service
from agent.config import Settings, is_loopback, redact_url
from agent.hooks.manager import get_plugin_manager
from agent.pipeline.pipeline import Pipeline
from agent.pipeline.push_scheduler import PushScheduler
from agent.serving.http_api import OPEN_PATHS, ApiState, serving
from agent.serving.metrics import Metrics
from agent.serving.user_data_api import user_data_routes
from agent.users.data_requests import UserData

log = logging.getLogger(__name__)

# The pipeline's stages, in the order an event meets them; a stage's hooks are those whose
# names start with recsys_<stage> (recsys_apply_event, a batch variant recsys_apply_events...).
STAGES = ("validate", "enrich", "apply", "candidates", "fuse", "rerank", "profile", "publish")


def _implementers(pm: pluggy.PluginManager, prefix: str) -> list[str]:
    """Plugins implementing any hook named ``prefix...``, in pluggy's call order."""
    names: list[str] = []
    for hook_name, caller in vars(pm.hook).items():
        if not hook_name.startswith(prefix):
            continue
        # pluggy calls the last registered first
        for impl in reversed(caller.get_hookimpls()):
            if impl.plugin_name not in names:
                names.append(impl.plugin_name)
    return names


@asynccontextmanager
async def nats_connection(servers: str | list[str]) -> AsyncIterator[NATS]:
    """A connection to one server or to any of a cluster's (a list of URLs)."""
    # Closing disconnects too: only a loss that nobody asked for is worth a warning.
    closing = False

    async def on_error(exc: Exception) -> None:
        log.warning("NATS: %s", redact_url(str(exc)))

    async def on_disconnect() -> None:
        if closing:
            log.debug("NATS connection closed")
        else:
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
        closing = True
        with suppress(Exception):
            await nc.drain()
        if not nc.is_closed:
            await nc.close()


def freeze_survivors_of_full_passes(phase: str, info: dict[str, int]) -> None:
    """A ``gc.callbacks`` entry: what survives a full pass is state that lives on (users'
    histories, learned counts), so it joins the frozen objects, and the next full pass scans
    only what came since. Without it every full pass scans all users again, and their cost
    grows with the agent's age. (A cycle among frozen objects that later becomes garbage is
    not collected; the agent's state holds no such cycles: reference counting frees it.)"""
    if phase == "stop" and info.get("generation") == 2:
        gc.freeze()


class Agent:
    """Use as ``async with Agent(settings) as agent:``; it serves until the block exits."""

    def __init__(self, settings: Settings, extra_plugins: Iterable[tuple[str, Any]] = ()) -> None:
        # before anything starts: a refused configuration opens nothing
        settings.check_http_exposure()
        self.settings = settings
        self.metrics = Metrics()
        self.pm = get_plugin_manager(settings, extra_plugins)
        self.pipeline = Pipeline(settings, self.pm, self.metrics)
        # the bus's URL as it may be shown: the embedded server's without its credentials
        self.nats_url = settings.nats_url
        # the embedded server's credentials file; None on an external server
        self.nats_credentials_file: Path | None = None
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
        servers = settings.nats_servers()
        if not servers:
            server = await stack.enter_async_context(
                embedded_nats_server(settings.data_dir / NATS_DIR, settings.nats_port, binary=settings.nats_server_bin)
            )
            self.nats_url = server.address
            self.nats_credentials_file = server.credentials_file
            servers = [server.url]
        nc = await stack.enter_async_context(nats_connection(servers))
        js = nc.jetstream()
        await ensure_streams(js, settings)
        self.pipeline.context.nc = nc
        self.pipeline.context.js = js
        await stack.enter_async_context(self.pipeline.running())
        log.info("plugins: %s", self._plugins_by_stage())

        pushes = PushScheduler(self.pipeline, settings.push_batch)
        disposer = Disposer(
            js, settings.subject("dlq"), self.metrics, settings.dlq_payload_chars, settings.subject_prefix
        )
        ingestor = Ingestor(settings, js, self.pipeline, disposer, pushes.schedule)
        pushes.ingest_caught_up = ingestor.caught_up
        user_data = UserData(settings, nc, js, self.pipeline, pushes)
        ingestor.v2_from_seq = user_data.v2_from_seq = await wire_v2_from_seq(js, settings.stream_name)
        # listening before the rebuild: a forget by another agent meanwhile is not missed
        await stack.enter_async_context(user_data.listening())
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
        await stack.enter_async_context(request_service(nc, settings, self.pipeline, user_data))

        routes = user_data_routes(user_data)
        routes += [route for _, answer in await self.pipeline.hooks.call("recsys_http_routes") for route in answer]
        api = ApiState(settings=settings, pipeline=self.pipeline, js=js, nats_url=self.nats_url, started_at=time.time())
        self.http_url = await stack.enter_async_context(serving(api, routes))
        if settings.api_keys:
            log.info(
                "HTTP API: %d API key(s); every route needs one but %s",
                len(settings.api_keys),
                ", ".join(sorted(OPEN_PATHS)),
            )
        elif not is_loopback(settings.http_host):
            log.warning(
                "HTTP API on %s without API keys (insecure): whoever reaches it can read and write every user's data",
                settings.http_host,
            )
        log.info("agent ready: NATS %s, HTTP %s", redact_url(self.nats_url), self.http_url)

    def _plugins_by_stage(self) -> str:
        """The loaded plugins per pipeline stage, in call order, for the start's log: what a
        disabled_plugins setting or an installed package changed is seen at a glance."""
        parts, named = [], set()
        for stage in STAGES:
            names = _implementers(self.pm, f"recsys_{stage}")
            named.update(names)
            parts.append(f"{stage}={','.join(names) or '-'}")
        others = sorted(name for name, plugin in self.pm.list_name_plugin() if plugin and name not in named)
        if others:
            parts.append(f"other={','.join(others)}")
        return " ".join(parts)

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
        gc.callbacks.append(freeze_survivors_of_full_passes)
        try:
            yield
        finally:
            gc.callbacks.remove(freeze_survivors_of_full_passes)
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
            gc.unfreeze()
