"""The live page at ``GET /``: plain HTML, CSS and JavaScript shipped in this package (no build
step, nothing fetched from elsewhere), and what it reads besides the socket: the catalog
(``GET /v1/items``) and, in demo mode, tokens for demo users (``POST /v1/demo/tokens``)."""

from __future__ import annotations

import asyncio
from importlib.resources import files
from typing import Any

import orjson
from aiohttp import web

from agent.demo import DEMO_TTL_S, is_demo_user
from agent.serving.http_api import STATE, key_matches
from agent.serving.socket_tokens import SIGNER, TokenRefused, bearer_or_query_token
from agent.serving.websockets.minting import minted, read_token_request
from agent.wire.contract import InvalidMessage

# path -> (file in this package, content type)
ASSETS = {"/page/app.js": ("app.js", "text/javascript"), "/page/page.css": ("page.css", "text/css")}
# The page's own files and the agent's socket, nothing else: an item's text that carried markup
# could not load a script even if the page inserted it as HTML (it inserts text only).
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self';"
        " base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
MAX_ITEMS = 1_000
# items compared with a search between two yields to the event loop (the hot path shares it)
SCAN_SLICE = 5_000


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _read(name: str) -> bytes:
    return files(__name__).joinpath(name).read_bytes()


def add_routes(app: web.Application) -> None:
    settings = app[STATE].settings
    # the page learns whether it may mint demo tokens from its own markup: no extra request
    index = _read("index.html").replace(b'data-demo="false"', f'data-demo="{str(settings.demo).lower()}"'.encode())
    assets = {path: (_read(name), kind) for path, (name, kind) in ASSETS.items()}

    async def page(_: web.Request) -> web.Response:
        return web.Response(body=index, content_type="text/html", charset="utf-8", headers=SECURITY_HEADERS)

    async def asset(request: web.Request) -> web.Response:
        body, kind = assets[request.path]
        return web.Response(body=body, content_type=kind, charset="utf-8", headers=SECURITY_HEADERS)

    app.router.add_get("/", page)
    for path in assets:
        app.router.add_get(path, asset)
    app.router.add_get("/v1/items", list_items)
    if settings.demo:
        app.router.add_post("/v1/demo/tokens", demo_token)


def _reader_refusal(request: web.Request) -> str | None:
    """Why the request may not read the catalog, or None: with API keys set, it needs a key or
    a valid user token (the page's user has a token, never a key)."""
    settings = request.app[STATE].settings
    if not settings.api_keys:
        return None
    authorization = request.headers.get("Authorization")
    if key_matches(authorization, [key.encode() for key in settings.api_keys]):
        return None
    presented = bearer_or_query_token(authorization, request.query.get("token"))
    if presented is None:
        return "an API key or a user token is needed: 'Authorization: Bearer <key or token>'"
    try:
        request.app[SIGNER].verify(presented)
    except TokenRefused as exc:
        return str(exc)
    return None


def _int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise InvalidMessage(f"{name} must be an integer, got {raw[:32]!r}") from None
    if not low <= value <= high:
        raise InvalidMessage(f"{name} must be between {low} and {high}")
    return value


async def list_items(request: web.Request) -> web.Response:
    """Catalog items: those of ``ids`` (comma-separated), or those matching every word of ``q``
    (in title, text or categories) in ``category``, ``limit`` from ``offset``."""
    refusal = _reader_refusal(request)
    if refusal is not None:
        response = _json({"error": refusal}, status=401)
        response.headers["WWW-Authenticate"] = 'Bearer realm="recsys-agent"'
        return response
    catalog = request.app[STATE].pipeline.catalog
    try:
        limit = _int(request, "limit", 100, 1, MAX_ITEMS)
        offset = _int(request, "offset", 0, 0, 10_000_000)
    except InvalidMessage as exc:
        return _json({"error": str(exc)}, status=400)
    if "ids" in request.query:
        wanted = [i for i in request.query["ids"].split(",") if i][:MAX_ITEMS]
        found = [item for item in (_active(catalog, i) for i in wanted) if item is not None]
        return _json({"items": [item.to_dict() for item in found], "total": len(found)})
    words = request.query.get("q", "").lower().split()
    category = request.query.get("category", "")
    matches = []
    for slot in range(catalog.size):
        if slot and slot % SCAN_SLICE == 0:
            await asyncio.sleep(0)
        item = catalog.item(slot)
        if item is None or (category and category not in item.categories):
            continue
        if words:
            haystack = f"{item.title} {item.text} {' '.join(item.categories)}".lower()
            if not all(word in haystack for word in words):
                continue
        matches.append(item)
    page = matches[offset : offset + limit]
    return _json({"items": [item.to_dict() for item in page], "total": len(matches)})


def _active(catalog: Any, item_id: str) -> Any:
    slot = catalog.slot(item_id)
    return catalog.item(slot) if slot is not None else None


async def demo_token(request: web.Request) -> web.Response:
    """A token for a demo user, without an API key: only in demo mode (the route exists only
    then), only for ids ``demo-<letters and digits>``, for an hour."""
    try:
        user_id, _ = await read_token_request(request, allow_ttl=False)
    except InvalidMessage as exc:
        return _json({"error": str(exc)}, status=400)
    if not is_demo_user(user_id):
        return _json({"error": "the demo mints tokens for demo users only: demo-<1 to 24 of a-z 0-9>"}, status=403)
    return minted(request, user_id, DEMO_TTL_S)
