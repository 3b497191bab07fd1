"""``POST /v1/tokens``: an app's backend mints a user's token (it holds an API key)."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from agent.serving.http_api import STATE
from agent.serving.socket_tokens import SIGNER, check_ttl
from agent.wire.contract import MAX_ID_LENGTH, InvalidMessage, decode_json

# a token request is a user id and a number: anything larger is not one
MAX_REQUEST_BYTES = 4_096


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


async def read_token_request(request: web.Request, *, allow_ttl: bool) -> tuple[str, int | None]:
    """The user id and ``ttl_s`` (None: the default) of a token request; InvalidMessage naming
    what is wrong."""
    body = decode_json(await request.read(), MAX_REQUEST_BYTES)
    if not isinstance(body, dict):
        raise InvalidMessage('a token request is a JSON object: {"user_id": ..., "ttl_s"?: ...}')
    allowed = {"user_id", "ttl_s"} if allow_ttl else {"user_id"}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidMessage(f"unknown field {unknown[0][:64]!r} (a token request has {', '.join(sorted(allowed))})")
    user_id = body.get("user_id")
    if not isinstance(user_id, str) or not user_id:
        raise InvalidMessage("field 'user_id' must be a non-empty string")
    if len(user_id) > MAX_ID_LENGTH:
        raise InvalidMessage(f"field 'user_id' is longer than {MAX_ID_LENGTH} characters")
    ttl = body.get("ttl_s")
    if ttl is not None:
        try:
            check_ttl(ttl)
        except ValueError as exc:
            raise InvalidMessage(str(exc)) from None
    return user_id, ttl


def minted(request: web.Request, user_id: str, ttl_s: int) -> web.Response:
    token, expires_at = request.app[SIGNER].mint(user_id, ttl_s)
    response = _json({"token": token, "user_id": user_id, "expires_at": expires_at})
    # a credential: no cache may keep it
    response.headers["Cache-Control"] = "no-store"
    return response


async def post_tokens(request: web.Request) -> web.Response:
    """Mint a token for any user; the API key middleware has let only a key holder in."""
    try:
        user_id, ttl = await read_token_request(request, allow_ttl=True)
    except InvalidMessage as exc:
        return _json({"error": str(exc)}, status=400)
    return minted(request, user_id, ttl or request.app[STATE].settings.ws_ttl_s)
