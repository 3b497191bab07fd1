"""HTTP routes for a user's requests about their data (forget, export, merge); the work is
agent/users/data_requests.py. Like every /v1/ route they need an API key when keys are set."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from agent.users.data_requests import UserData
from agent.wire.contract import InvalidMessage, decode_json

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4_096


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


async def _answer(work: Callable[[], Awaitable[dict[str, Any]]]) -> web.Response:
    try:
        return _json(await work())
    except InvalidMessage as exc:
        return _json({"error": str(exc)}, status=400)
    except Exception as exc:
        # the streams unavailable: nothing is half-done that a retry would not finish
        log.exception("a user data request failed")
        return _json({"error": f"could not complete the request: {type(exc).__name__}; retry it"}, status=503)


def user_data_routes(user_data: UserData) -> list[web.AbstractRouteDef]:
    async def forget(request: web.Request) -> web.Response:
        return await _answer(lambda: user_data.forget(request.match_info["user_id"]))

    async def export(request: web.Request) -> web.Response:
        return await _answer(lambda: user_data.export(request.match_info["user_id"]))

    async def merge(request: web.Request) -> web.Response:
        try:
            body = decode_json(await request.read(), MAX_BODY_BYTES)
        except InvalidMessage as exc:
            return _json({"error": str(exc)}, status=400)
        if not isinstance(body, dict) or "from" not in body:
            return _json({"error": 'a merge needs {"from": "<the other user id>"}'}, status=400)
        return await _answer(lambda: user_data.merge(request.match_info["user_id"], body["from"]))

    return [
        web.delete("/v1/users/{user_id}", forget),
        web.get("/v1/users/{user_id}/export", export),
        web.post("/v1/users/{user_id}/merge", merge),
    ]
