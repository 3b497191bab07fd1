"""``GET /v1/ws``: one user's socket.

Before the upgrade: the user token (401), the page's origin (403), the agent's capacity (503).
After it, the socket gets the user's current recommendations at once and then every push for
the user, each the Recommendations JSON published on NATS, unchanged. What the client sends is
that user's events, one Event or a JSON array of them (``user_id`` may be left out); each is
checked and stored exactly as ``POST /v1/events`` does, and answered with the body that route
would answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import suppress
from typing import Any
from urllib.parse import urlsplit

import orjson
from aiohttp import WSMsgType, web

from agent.serving.http_api import (
    STATE,
    ApiState,
    Refusal,
    check_events,
    publish_all,
    refused_response,
    stored_response,
)
from agent.serving.socket_tokens import SIGNER, TokenRefused, bearer_or_query_token
from agent.serving.websockets.hub import HUB, TOKEN_EXPIRED, TOO_SLOW, Connection
from agent.wire.contract import InvalidMessage, decode_json

log = logging.getLogger(__name__)

_CHALLENGE = 'Bearer realm="recsys-agent"'


def _error(status: int, reason: str, **headers: str) -> web.Response:
    return web.Response(
        body=orjson.dumps({"error": reason}), status=status, content_type="application/json", headers=headers
    )


def origin_allowed(request: web.Request, allowed: list[str]) -> bool:
    """A browser names the page that opens a socket in ``Origin``: the agent's own pages and
    those of ``allowed`` may; a client without one is not a browser page."""
    origin = request.headers.get("Origin")
    if origin is None or "*" in allowed:
        return True
    origin = origin.strip().rstrip("/").lower()
    if urlsplit(origin).netloc == request.host.lower():
        return True
    return origin in {entry.rstrip("/").lower() for entry in allowed}


async def socket_endpoint(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    hub = request.app[HUB]
    metrics = state.pipeline.metrics
    presented = bearer_or_query_token(request.headers.get("Authorization"), request.query.get("token"))
    if presented is None:
        metrics.ws_refused.labels(reason="token").inc()
        return _error(
            401,
            "a user token is needed: ?token=<token> or 'Authorization: Bearer <token>'"
            " (minted by POST /v1/tokens or recsys-agent token USER_ID)",
            **{"WWW-Authenticate": _CHALLENGE},
        )
    try:
        token = request.app[SIGNER].verify(presented)
    except TokenRefused as exc:
        metrics.ws_refused.labels(reason="token").inc()
        # the token is never logged nor echoed: it is a credential
        return _error(401, str(exc), **{"WWW-Authenticate": f'{_CHALLENGE}, error="invalid_token"'})
    if not origin_allowed(request, state.settings.ws_allowed_origins):
        metrics.ws_refused.labels(reason="origin").inc()
        return _error(403, "pages of this origin may not open sockets here (setting ws_allowed_origins)")
    if hub.full:
        metrics.ws_refused.labels(reason="capacity").inc()
        return _error(
            503, f"this agent holds its most sockets ({state.settings.ws_max_sockets})", **{"Retry-After": "5"}
        )
    if not hub.connected:
        metrics.ws_refused.labels(reason="bus").inc()
        return _error(503, "the agent is not connected to NATS: no pushes to give", **{"Retry-After": "5"})
    ws = web.WebSocketResponse(
        heartbeat=state.settings.ws_heartbeat_s,
        max_msg_size=state.settings.ws_max_message_bytes,
        # per-message deflate keeps a compressor per socket (hundreds of kB each): thousands of
        # sockets cost gigabytes for lists of a few kB
        compress=False,
    )
    if not ws.can_prepare(request).ok:
        return _error(400, "GET /v1/ws is a websocket: send an upgrade request (Connection: Upgrade)")
    transport = request.transport
    conn = Connection(token.user_id, ws, abort=transport.abort if transport is not None else lambda: None)
    # counted before the first wait: sockets opening at once cannot pass ws_max_sockets together
    await hub.join(conn)
    writer: asyncio.Task[None] | None = None
    try:
        await ws.prepare(request)
        writer = asyncio.create_task(_pump(conn, state, token.expires_at), name="websocket-writer")
        await _send_current_list(conn, state)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                reply = await events_reply(state, token.user_id, msg.data)
            elif msg.type == WSMsgType.BINARY:
                reply = orjson.dumps({"error": "send events as JSON in text frames"})
            else:
                break  # the connection failed (aiohttp's ERROR message)
            if not conn.outbox.put_reply(reply):
                metrics.ws_closed.labels(reason="slow").inc()
                await conn.close(TOO_SLOW, "too slow: replies to this socket's messages are not read")
                break
    finally:
        if writer is not None:
            writer.cancel()
            with suppress(asyncio.CancelledError):
                await writer
        await hub.leave(conn)
        if not conn.closing:
            # closed by the client (or its connection lost), not by the agent
            metrics.ws_closed.labels(reason="client").inc()
    return ws


async def _send_current_list(conn: Connection, state: ApiState) -> None:
    state.pipeline.metrics.requests.labels(via="websocket").inc()
    try:
        recs = await state.pipeline.recommend(conn.user_id)
    except Exception:
        # the socket still gets the pushes that follow
        log.exception("websocket: the current recommendations could not be computed")
        return
    # a push that came in meanwhile is at least as new
    if conn.outbox.pushes_put == 0:
        conn.outbox.put_push(recs.to_json())


async def events_reply(state: ApiState, user_id: str, text: str) -> bytes:
    """Store the events of a socket's message as ``POST /v1/events`` would; its reply."""
    try:
        body = decode_json(text.encode("utf-8", "surrogatepass"), state.settings.ws_max_message_bytes)
    except InvalidMessage as exc:
        return orjson.dumps({"error": str(exc)})
    objects: list[Any] = body if isinstance(body, list) else [body]
    if not objects:
        return orjson.dumps({"error": "no events"})
    refusals = []
    for index, obj in enumerate(objects):
        if not isinstance(obj, dict):
            continue  # check_events says why
        named = obj.get("user_id")
        if named is None:
            objects[index] = {**obj, "user_id": user_id}
        elif named != user_id:
            refusals.append(Refusal(index, "the event names another user than the socket's token: never stored"))
    if not refusals:
        accepted, refusals = await check_events(state, objects)
    if refusals:
        return bytes(refused_response(refusals, is_batch=isinstance(body, list)).body)  # type: ignore[arg-type]
    return bytes(stored_response(await publish_all(state, accepted)).body)  # type: ignore[arg-type]


async def _pump(conn: Connection, state: ApiState, expires_at: int) -> None:
    """Send what the outbox holds, one message at a time, until the socket closes: closed when a
    message is not taken within ``ws_send_timeout_s``, or when the token expires."""
    ws, outbox, metrics = conn.ws, conn.outbox, state.pipeline.metrics
    timeout = state.settings.ws_send_timeout_s
    loop = asyncio.get_running_loop()
    expiry = loop.time() + (expires_at - time.time())
    while True:
        try:
            async with asyncio.timeout_at(expiry):
                data, is_push = await outbox.next()
        except TimeoutError:
            metrics.ws_closed.labels(reason="expired").inc()
            await conn.close(TOKEN_EXPIRED, "the token has expired: connect again with a new one")
            return
        try:
            async with asyncio.timeout(timeout):
                await ws.send_str(data.decode("utf-8"))
        except TimeoutError:
            metrics.ws_closed.labels(reason="slow").inc()
            log.info("websocket: a socket of a user took no message for %g s: closed", timeout)
            await conn.close(TOO_SLOW, f"too slow: took no message for {timeout:g} s")
            return
        except (ConnectionError, RuntimeError):
            # closing or gone: the reader sees it too and ends the handler
            return
        # not kept while waiting for the next: thousands of idle sockets would each hold a list
        del data
        if is_push:
            metrics.ws_pushes.inc()
