"""The agent's request/reply endpoints on NATS, served as a NATS micro service (ADR-32).

``$SRV.PING``, ``$SRV.INFO`` and ``$SRV.STATS`` discover the agents and count their requests;
every agent joins one queue group per endpoint, so several agents share the requests. An error
answer is the JSON ``{"error": ...}`` body with the micro service's error headers (code 400 for
a request that can never succeed, 500 for the agent's own failure).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from importlib import metadata
from typing import Any

import orjson
from nats.aio.client import Client as NATS
from nats.micro import add_service
from nats.micro.request import Request

from agent.config import Settings
from agent.pipeline.pipeline import Pipeline
from agent.users.data_requests import UserData
from agent.wire.contract import InvalidMessage, decode_json, parse_recommend_request

log = logging.getLogger(__name__)

SERVICE_NAME = "recsys-agent"
QUEUE_GROUP = "recsys-agent"
MAX_USER_REQUEST_BYTES = 4_096


def _version() -> str:
    try:
        return metadata.version("recsys-agent")
    except metadata.PackageNotFoundError:
        return "0.0.0"


Work = Callable[[Any], Awaitable[dict[str, Any] | bytes]]


def _handler(nc: NATS, name: str, work: Work, max_bytes: int) -> Callable[[Request], Awaitable[None]]:
    async def handle(request: Request) -> None:
        try:
            answer = await work(decode_json(request.data, max_bytes))
        except InvalidMessage as exc:
            await request.respond_error("400", str(exc), orjson.dumps({"error": str(exc)}))
            return
        except Exception as exc:
            log.exception("%s request failed", name)
            reason = f"internal error: {type(exc).__name__}"
            await request.respond_error("500", reason, orjson.dumps({"error": reason}))
            return
        body = answer if isinstance(answer, bytes) else orjson.dumps(answer)
        if len(body) > nc.max_payload:
            # a user with thousands of events: an answer NATS cannot carry, said as such
            reason = f"the answer is {len(body)} bytes, more than NATS carries ({nc.max_payload}): ask over HTTP"
            await request.respond_error("413", reason, orjson.dumps({"error": reason}))
            return
        await request.respond(body)

    return handle


def _user_request(body: Any, *fields: str) -> list[Any]:
    if not isinstance(body, dict):
        raise InvalidMessage("a request must be a JSON object")
    missing = [field for field in fields if field not in body]
    if missing:
        raise InvalidMessage(f"missing field '{missing[0]}'")
    return [body[field] for field in fields]


@asynccontextmanager
async def request_service(nc: NATS, settings: Settings, pipeline: Pipeline, users: UserData) -> AsyncIterator[None]:
    """Serve ``<prefix>.recommend`` and ``<prefix>.users.{forget,export,merge}`` until exit."""

    async def recommend(body: Any) -> bytes:
        pipeline.metrics.requests.labels(via="nats").inc()
        request = parse_recommend_request(body, max_k=settings.max_k, default_k=settings.default_k)
        recs = await pipeline.recommend(
            request.user_id, request.k, categories=request.categories, exclude=request.exclude
        )
        return recs.to_json()

    async def forget(body: Any) -> dict[str, Any]:
        (user_id,) = _user_request(body, "user_id")
        return await users.forget(user_id)

    async def export(body: Any) -> dict[str, Any]:
        (user_id,) = _user_request(body, "user_id")
        return await users.export(user_id)

    async def merge(body: Any) -> dict[str, Any]:
        user_id, from_user = _user_request(body, "user_id", "from")
        return await users.merge(user_id, from_user)

    endpoints: list[tuple[str, str, Work, int]] = [
        ("recommend", settings.subject("recommend"), recommend, settings.max_payload_bytes),
        ("users-forget", settings.subject("users", "forget"), forget, MAX_USER_REQUEST_BYTES),
        ("users-export", settings.subject("users", "export"), export, MAX_USER_REQUEST_BYTES),
        ("users-merge", settings.subject("users", "merge"), merge, MAX_USER_REQUEST_BYTES),
    ]
    service = await add_service(
        nc,
        name=SERVICE_NAME,
        version=_version(),
        description="real-time recommendations, and users' requests about their data",
        queue_group=QUEUE_GROUP,
    )
    try:
        for name, subject, work, max_bytes in endpoints:
            await service.add_endpoint(name=name, subject=subject, handler=_handler(nc, name, work, max_bytes))
        yield
    finally:
        await service.stop()
