"""Websockets: a user's pushes to browsers and apps, and their events back (``/v1/ws``), and the
tokens that say which user a socket is (``POST /v1/tokens``)."""

from __future__ import annotations

from aiohttp import web

from agent.serving.http_api import STATE
from agent.serving.socket_tokens import SIGNER, TokenSigner, token_secret
from agent.serving.websockets.endpoint import socket_endpoint
from agent.serving.websockets.hub import GOING_AWAY, HUB, SocketHub, raise_descriptor_limit
from agent.serving.websockets.minting import post_tokens

__all__ = ["HUB", "add_routes"]


def add_routes(app: web.Application) -> None:
    state = app[STATE]
    app[SIGNER] = TokenSigner(token_secret(state.settings))
    # the agent's NATS connection, read at each use: the pipeline's context holds it
    hub = SocketHub(state.settings, state.pipeline.metrics, lambda: state.pipeline.context.nc)
    app[HUB] = hub
    raise_descriptor_limit(state.settings.ws_max_sockets)

    async def close_sockets(_: web.Application) -> None:
        # before the server waits for its handlers: a socket's handler ends when it closes
        await hub.close_all(GOING_AWAY, "the agent is stopping")

    app.on_shutdown.append(close_sockets)
    app.router.add_get("/v1/ws", socket_endpoint)
    app.router.add_post("/v1/tokens", post_tokens)
