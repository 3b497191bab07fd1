"""The HTTP API: events in, recommendations out, health and metrics.

With ``api_keys`` set, every route but :data:`OPEN_PATHS` asks for one of the keys as
``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.log import server_logger
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import NotFoundError
from prometheus_client import CONTENT_TYPE_LATEST

from agent.config import PortInUse, Settings, redact_url
from agent.pipeline.pipeline import Pipeline
from agent.wire.contract import Event, InvalidMessage, decode_json, event_subject, parse_event

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ApiState:
    settings: Settings
    pipeline: Pipeline
    js: JetStreamContext
    nats_url: str
    started_at: float


STATE = web.AppKey("state", ApiState)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _error(status: int, reason: str) -> web.Response:
    return _json({"error": reason}, status=status)


# JetStream publishes in flight at once: enough to hide the round trip to the server, few
# enough that one request cannot fill the connection's outbound buffer.
PUBLISH_WINDOW = 512
YIELD_EVERY = 1_000


@dataclass(slots=True)
class Refusal:
    index: int
    reason: str
    # 413 for an event over the size limit, 400 for every other reason
    status: int = 400


async def post_events(request: web.Request) -> web.Response:
    """Accept one Event or a JSON array of Events; each goes into the event stream.

    Every event is checked (the wire contract, then the validation plugins, as the consumer
    would) before any is stored: a refused batch stores nothing and gets a 400 (413 when an
    event is too large) naming each refused event and its reason, instead of a silent dead
    letter. 202 means every event is stored durably and will be applied.
    """
    state = request.app[STATE]
    raw = await request.read()
    try:
        body = decode_json(raw, state.settings.max_payload_bytes * 100)
    except InvalidMessage as exc:
        return _error(400, str(exc))
    objects = body if isinstance(body, list) else [body]
    if not objects:
        return _error(400, "no events")
    accepted, refusals = await check_events(state, objects)
    if refusals:
        return refused_response(refusals, is_batch=isinstance(body, list))
    outcomes = await publish_all(state, accepted)
    return stored_response(outcomes)


async def check_events(state: ApiState, objects: list[Any]) -> tuple[list[tuple[Event, bytes]], list[Refusal]]:
    """The events ready to publish (parsed, validated, serialised), and the refusals."""
    now = time.time()
    accepted: list[tuple[Event, bytes]] = []
    refusals: list[Refusal] = []
    for index, obj in enumerate(objects):
        if index and index % YIELD_EVERY == 0:
            # a batch of 100,000 is seconds of work: the hot path gets the loop between parts
            await asyncio.sleep(0)
        try:
            event = parse_event(obj, now=now)
            payload = _serialise(obj)
        except InvalidMessage as exc:
            refusals.append(Refusal(index, str(exc)))
            continue
        limit = state.settings.max_payload_bytes
        if len(payload) > limit:
            refusals.append(Refusal(index, f"an event of {len(payload)} bytes exceeds the limit of {limit}", 413))
            continue
        try:
            # what the consumer would dead-letter, refused while the client still listens
            await state.pipeline.validate(event)
        except InvalidMessage as exc:
            refusals.append(Refusal(index, str(exc)))
            continue
        accepted.append((event, payload))
    return accepted, refusals


def _serialise(obj: Any) -> bytes:
    # Only what orjson.loads read reaches here, but orjson.dumps refuses some of it (nesting
    # past its own limit): the client's input, so a 400 with the reason, never a 500.
    try:
        return orjson.dumps(obj)
    except orjson.JSONEncodeError as exc:
        # orjson words its depth limit "Recursion limit reached"; a client thinks in nesting
        reason = "it nests too deeply" if "ecursion" in str(exc) else str(exc)
        raise InvalidMessage(f"the event cannot be stored as JSON: {reason}") from None


def refused_response(refusals: list[Refusal], *, is_batch: bool) -> web.Response:
    first = refusals[0]
    error = f"event {first.index}: {first.reason}" if is_batch else first.reason
    if len(refusals) > 1:
        error += f" ({len(refusals)} events refused)"
    status = 400 if any(r.status == 400 for r in refusals) else 413
    body = {
        "error": error,
        "accepted": 0,
        "refused": [{"index": r.index, "reason": r.reason} for r in refusals],
    }
    return _json(body, status=status)


class NotTried(Exception):
    """Not published: an earlier publish of the same request failed."""


NOT_TRIED = NotTried()


async def publish_all(state: ApiState, batch: list[tuple[Event, bytes]]) -> list[PubAck | BaseException]:
    """Publish ``batch`` PUBLISH_WINDOW at a time; one outcome per event, in request order.

    Stops after a window in which a publish failed: the later events are NOT_TRIED."""
    outcomes: list[PubAck | BaseException] = []
    for start in range(0, len(batch), PUBLISH_WINDOW):
        window = batch[start : start + PUBLISH_WINDOW]
        results = await asyncio.gather(*(_publish(state, e, p) for e, p in window), return_exceptions=True)
        outcomes.extend(results)
        if any(isinstance(result, BaseException) for result in results):
            break
    outcomes.extend(NOT_TRIED for _ in range(len(batch) - len(outcomes)))
    return outcomes


async def _publish(state: ApiState, event: Event, payload: bytes) -> PubAck:
    # JetStream drops a repeat of the same Nats-Msg-Id within its window; the agent's own
    # dedup covers repeats after that.
    headers = {"Nats-Msg-Id": event.id} if event.id is not None else None
    return await state.js.publish(event_subject(state.settings.subject_prefix, event), payload, headers=headers)


def stored_response(outcomes: list[PubAck | BaseException]) -> web.Response:
    """202 with each event's stream sequence, in request order; or, when some were not stored,
    503 naming exactly which were (the client resends only the others: resending an event
    without an id would apply it twice)."""
    stored = [(index, ack) for index, ack in enumerate(outcomes) if isinstance(ack, PubAck)]
    duplicates = [index for index, ack in stored if ack.duplicate]
    if len(stored) == len(outcomes):
        return _json(
            {"accepted": len(stored), "sequences": [ack.seq for _, ack in stored], "duplicates": duplicates},
            status=202,
        )
    failure = next(o for o in outcomes if isinstance(o, BaseException) and o is not NOT_TRIED)
    log.warning("event stream unavailable: %d of %d events stored: %s", len(stored), len(outcomes), failure)
    body = {
        "error": f"event stream unavailable: {type(failure).__name__}",
        "accepted": len(stored),
        "stored": [index for index, _ in stored],
        "sequences": [ack.seq for _, ack in stored],
        "duplicates": duplicates,
        "not_stored": [index for index, ack in enumerate(outcomes) if not isinstance(ack, PubAck)],
    }
    return _json(body, status=503)


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
    # a plugin that cannot do its work (vector writes failing) makes the agent "degraded"
    problems = dict(await state.pipeline.hooks.call("recsys_health"))
    return _json(
        {
            "status": "degraded" if problems else "ok",
            # plugin name -> what it reports; empty when every plugin is healthy
            "problems": problems,
            "nats_url": redact_url(state.nats_url),
            "uptime_s": round(time.time() - state.started_at, 3),
            "users": len(state.pipeline.users),
            "items": state.pipeline.catalog.active_count(),
            # counters are floats in Prometheus; what they count here are whole things
            "events_applied": int(metrics.value("recsys_events_applied_total")),
            "item_vectors": int(metrics.value("recsys_item_vectors")),
        }
    )


async def readyz(request: web.Request) -> web.Response:
    """Whether the agent can serve: 200 when NATS is connected, its streams exist and every
    catalog item has its vector (when content retrieval is on); else 503 naming what is not."""
    state = request.app[STATE]
    settings = state.settings
    waiting: dict[str, str] = {}
    nc = state.pipeline.context.nc
    if nc is None or not nc.is_connected:
        waiting["nats"] = "not connected"
    else:
        for name in (settings.stream_name, settings.catalog_stream_name):
            try:
                async with asyncio.timeout(2.0):
                    await state.js.stream_info(name)
            except NotFoundError:
                waiting["streams"] = f"stream {name} does not exist"
            except Exception as exc:
                waiting["streams"] = f"stream {name} did not answer ({type(exc).__name__})"
    if state.pipeline.pm.get_plugin("content") is not None:
        vectors = int(state.pipeline.metrics.value("recsys_item_vectors"))
        items = state.pipeline.catalog.active_count()
        if vectors < items:
            waiting["catalog_vectors"] = f"{vectors} of {items} items have their vector"
    return _json({"ready": not waiting, "waiting_for": waiting}, status=503 if waiting else 200)


async def metrics_text(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.pipeline.metrics.users.set(len(state.pipeline.users))
    # Prometheus's text format names its version in the content type
    return web.Response(body=state.pipeline.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error answer in JSON ``{"error": ...}``, aiohttp's own (413, 404, 405) included."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")}
        response = _error(exc.status, exc.text or exc.reason)
        response.headers.update(headers)
        return response
    except Exception:
        log.exception("HTTP %s %s failed", request.method, request.path)
        return _error(500, "internal error")


class ClientErrorLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's server log, where a request that is not valid HTTP (a 9 kB request line,
    a bad header) is one line: it is the client's mistake, already answered with a 400, and
    a flood of them must not fill the log with tracebacks. Anything else keeps its traceback."""

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):
            self.info(f"{msg}: %s %s", *args, exc_info.code, exc_info.message, **kwargs)
        else:
            super().exception(msg, *args, exc_info=exc_info, **kwargs)


# What answers without a key: probes of load balancers and Prometheus, which carry none, and
# tell nothing about users. Everything else needs one, routes of plugins included: a route
# added later is protected unless it is named here.
OPEN_PATHS = frozenset(
    {
        "/healthz",
        "/readyz",
        "/metrics",
        # the API's description, and the live page (whose user proves who they are with a user
        # token, not a key)
        "/openapi.json",
        "/",
        "/page/app.js",
        "/page/page.css",
        # each checks a user token itself (/v1/items takes a key too); /v1/demo/tokens exists
        # only in demo mode and mints tokens for demo users alone
        "/v1/ws",
        "/v1/items",
        "/v1/demo/tokens",
    }
)
_CHALLENGE = 'Bearer realm="recsys-agent"'


def key_matches(authorization: str | None, keys: list[bytes]) -> bool:
    """Whether the ``Authorization`` header carries one of ``keys`` as a Bearer token."""
    scheme, _, presented = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        return False
    # aiohttp decodes a header's undecodable bytes to lone surrogates; they must not raise
    candidate = presented.strip().encode("utf-8", "surrogatepass")
    matched = False
    for key in keys:
        # constant time, and every key compared: the time taken tells neither how much of a
        # key was right nor which key it was
        matched |= hmac.compare_digest(candidate, key)
    return matched


def require_api_key(api_keys: list[str]) -> Middleware:
    keys = [key.encode() for key in api_keys]

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS or key_matches(request.headers.get("Authorization"), keys):
            return await handler(request)
        if "Authorization" in request.headers:
            # the presented value is never logged nor echoed: it may be a key one typo away
            reason, challenge = "the API key is not valid", f'{_CHALLENGE}, error="invalid_token"'
        else:
            reason, challenge = "an API key is needed: send 'Authorization: Bearer <key>'", _CHALLENGE
        log.debug("HTTP 401: %s %s from %s", request.method, request.path, request.remote)
        response = _error(401, reason)
        response.headers["WWW-Authenticate"] = challenge
        return response

    return check


def build_app(state: ApiState, extra_routes: list[web.AbstractRouteDef]) -> web.Application:
    middlewares: list[Middleware] = [json_errors]
    if state.settings.api_keys:
        middlewares.append(require_api_key(state.settings.api_keys))
    app = web.Application(client_max_size=state.settings.max_payload_bytes * 100, middlewares=middlewares)
    app[STATE] = state
    app.router.add_post("/v1/events", post_events)
    app.router.add_get("/v1/users/{user_id}/recommendations", get_recommendations)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_text)
    app.router.add_get("/readyz", readyz)
    # these read this module's STATE: imported here, not where this module is imported
    from agent.serving import openapi, page, websockets

    websockets.add_routes(app)
    page.add_routes(app)
    openapi.add_routes(app)
    app.router.add_routes(extra_routes)
    return app


@asynccontextmanager
async def serving(state: ApiState, extra_routes: list[web.AbstractRouteDef]) -> AsyncIterator[str]:
    """Serve the API; yields the base URL (with the real port when the setting is 0)."""
    runner = web.AppRunner(
        build_app(state, extra_routes),
        access_log=None,
        shutdown_timeout=2.0,
        logger=ClientErrorLog(server_logger, {}),
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, state.settings.http_host, state.settings.http_port)
        try:
            await site.start()
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(state.settings.http_port, "--http-port") from None
            raise
        port = runner.addresses[0][1] if runner.addresses else state.settings.http_port
        yield f"http://{state.settings.http_host}:{port}"
    finally:
        await runner.cleanup()
