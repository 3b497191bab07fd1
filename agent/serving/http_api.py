"""The HTTP API: events in, recommendations out, health and metrics."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from nats.js import JetStreamContext

from agent.config import Settings
from agent.pipeline.pipeline import Pipeline
from agent.wire.contract import InvalidMessage, decode_json, parse_event

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ApiState:
    settings: Settings
    pipeline: Pipeline
    js: JetStreamContext
    nats_url: str
    started_at: float


STATE = web.AppKey("state", ApiState)


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _error(status: int, reason: str) -> web.Response:
    return _json({"error": reason}, status=status)


async def post_events(request: web.Request) -> web.Response:
    """Accept one Event or a JSON array of Events; each goes into the event stream.

    Validation happens here too, so a client gets a 400 with the reason at once instead of a
    silent dead letter. 202 means the events are stored durably and will be applied.
    """
    state = request.app[STATE]
    raw = await request.read()
    try:
        body = decode_json(raw, state.settings.max_payload_bytes * 100)
        events = body if isinstance(body, list) else [body]
        if not events:
            raise InvalidMessage("no events")
        parsed = []
        for position, obj in enumerate(events):
            try:
                parsed.append((obj, parse_event(obj, now=time.time())))
            except InvalidMessage as exc:
                raise InvalidMessage(f"event {position}: {exc}" if isinstance(body, list) else str(exc)) from None
    except InvalidMessage as exc:
        return _error(400, str(exc))
    # Every event is checked before any is stored: a refused batch stores nothing.
    payloads = []
    for obj, event in parsed:
        payload = orjson.dumps(obj)
        if len(payload) > state.settings.max_payload_bytes:
            return _error(
                413, f"an event of {len(payload)} bytes exceeds the limit of {state.settings.max_payload_bytes}"
            )
        payloads.append((event, payload))
    sequences: list[int] = []
    for event, payload in payloads:
        # JetStream drops a repeat of the same Nats-Msg-Id within its window; the agent's own
        # dedup covers repeats after that.
        headers = {"Nats-Msg-Id": event.id} if event.id is not None else None
        try:
            ack = await state.js.publish(state.settings.subject("events", event.type), payload, headers=headers)
        except Exception as exc:
            # The first len(sequences) events are stored: the client resends only the rest
            # (resending an event without an id would apply it twice).
            log.warning("event stream unavailable after %d of %d events: %s", len(sequences), len(payloads), exc)
            return _json(
                {
                    "error": f"event stream unavailable: {type(exc).__name__}",
                    "accepted": len(sequences),
                    "sequences": sequences,
                },
                status=503,
            )
        sequences.append(ack.seq)
    return _json({"accepted": len(sequences), "sequences": sequences}, status=202)


def _k(request: web.Request, settings: Settings) -> int:
    raw = request.query.get("k", str(settings.default_k))
    try:
        k = int(raw)
    except ValueError:
        raise InvalidMessage(f"k must be an integer, got {raw[:32]!r}") from None
    if not 1 <= k <= settings.max_k:
        raise InvalidMessage(f"k must be between 1 and {settings.max_k}")
    return k


async def get_recommendations(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        k = _k(request, state.settings)
    except InvalidMessage as exc:
        return _error(400, str(exc))
    categories = tuple(c for c in request.query.getall("category", []) if c)
    state.pipeline.metrics.requests.labels(via="http").inc()
    recs = await state.pipeline.recommend(request.match_info["user_id"], k, categories=categories)
    return _json(recs.to_dict())


async def healthz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    metrics = state.pipeline.metrics
    return _json(
        {
            "status": "ok",
            "nats_url": state.nats_url,
            "uptime_s": round(time.time() - state.started_at, 3),
            "users": len(state.pipeline.users),
            "items": state.pipeline.catalog.active_count(),
            "events_applied": metrics.value("recsys_events_applied_total"),
            "item_vectors": metrics.value("recsys_item_vectors"),
        }
    )


async def metrics_text(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.pipeline.metrics.users.set(len(state.pipeline.users))
    return web.Response(body=state.pipeline.metrics.render(), content_type="text/plain", charset="utf-8")


def build_app(state: ApiState, extra_routes: list[web.AbstractRouteDef]) -> web.Application:
    app = web.Application(client_max_size=state.settings.max_payload_bytes * 100)
    app[STATE] = state
    app.router.add_post("/v1/events", post_events)
    app.router.add_get("/v1/users/{user_id}/recommendations", get_recommendations)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_text)
    app.router.add_routes(extra_routes)
    return app


@asynccontextmanager
async def serving(state: ApiState, extra_routes: list[web.AbstractRouteDef]) -> AsyncIterator[str]:
    """Serve the API; yields the base URL (with the real port when the setting is 0)."""
    runner = web.AppRunner(build_app(state, extra_routes), access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, state.settings.http_host, state.settings.http_port)
    await site.start()
    port = runner.addresses[0][1] if runner.addresses else state.settings.http_port
    try:
        yield f"http://{state.settings.http_host}:{port}"
    finally:
        await runner.cleanup()
