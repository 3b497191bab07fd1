"""The open sockets by user, and the one NATS subscription each connected user has.

Pushes reach sockets through NATS, not from the push worker directly: a user's sockets take
what is published on ``<prefix>.recs.<user_token>``, so a push made by any agent reaches a socket
held by any agent. The subscription is shared by the user's sockets on this agent: made when
the first one opens, dropped when the last one closes.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from agent.config import Settings
from agent.serving.metrics import Metrics
from agent.serving.websockets.outbox import Outbox
from agent.wire.user_tokens import user_token

log = logging.getLogger(__name__)

# close codes a client may see (RFC 6455 leaves 4000-4999 to applications)
GOING_AWAY = 1001
TOKEN_EXPIRED = 4401
TOO_SLOW = 4408
# replies (acknowledgements, errors) a socket may hold for a client that does not read
MAX_PENDING_REPLIES = 64
# seconds a closing socket's client has to take the close frame
CLOSE_GRACE_S = 2.0
# descriptors the agent needs besides its sockets (NATS, Qdrant's files, the model, logs)
SPARE_DESCRIPTORS = 1_024


@dataclass(eq=False, slots=True)
class Connection:
    """One open socket of one user."""

    user_id: str
    ws: web.WebSocketResponse
    # the request's transport: aborted when a close cannot be sent to a client that stopped reading
    abort: Callable[[], None]
    outbox: Outbox = field(default_factory=lambda: Outbox(MAX_PENDING_REPLIES))
    closing: bool = False

    async def close(self, code: int, reason: str) -> None:
        """Close with ``code`` and ``reason``, queued behind what the socket holds unsent; the
        connection is cut CLOSE_GRACE_S later whatever the client does: one that stopped
        reading would otherwise hold it (and its buffers) open without end."""
        if self.closing:
            return
        self.closing = True
        asyncio.get_running_loop().call_later(CLOSE_GRACE_S, self.abort)
        try:
            async with asyncio.timeout(CLOSE_GRACE_S):
                # not drained: the close frame waits behind unsent data, and a stalled client
                # never drains it
                await self.ws.close(code=code, message=reason.encode(), drain=False)
        except (TimeoutError, ConnectionError):
            self.abort()


@dataclass(eq=False, slots=True)
class UserSockets:
    connections: set[Connection] = field(default_factory=set)
    subscription: Subscription | None = None


class SocketHub:
    def __init__(self, settings: Settings, metrics: Metrics, nc: Callable[[], NATS | None]) -> None:
        self.settings = settings
        self.metrics = metrics
        self._nc = nc
        self._users: dict[str, UserSockets] = {}
        self.count = 0

    @property
    def full(self) -> bool:
        return self.count >= self.settings.ws_max_sockets

    @property
    def connected(self) -> bool:
        nc = self._nc()
        return nc is not None and nc.is_connected

    async def join(self, conn: Connection) -> None:
        """Count ``conn`` among its user's sockets; the first one subscribes to the user's pushes."""
        nc = self._nc()
        if nc is None:
            raise ConnectionError("the agent has no NATS connection")
        entry = self._users.get(conn.user_id)
        first = entry is None
        if entry is None:
            entry = self._users[conn.user_id] = UserSockets()
        entry.connections.add(conn)
        self.count += 1
        self._update_gauges()
        if first:
            subject = self.settings.subject("recs", user_token(conn.user_id))
            try:
                entry.subscription = await nc.subscribe(subject, cb=self._deliverer(entry))
            except BaseException:
                await self.leave(conn)
                raise

    async def leave(self, conn: Connection) -> None:
        entry = self._users.get(conn.user_id)
        if entry is None or conn not in entry.connections:
            return
        entry.connections.discard(conn)
        self.count -= 1
        if not entry.connections:
            # gone from the table at once: a socket that opens meanwhile makes a new subscription
            del self._users[conn.user_id]
            if entry.subscription is not None:
                try:
                    await entry.subscription.unsubscribe()
                except Exception as exc:
                    # a closed connection has no subscriptions left to drop
                    log.debug("websocket: unsubscribe failed: %s", exc)
        self._update_gauges()

    def _deliverer(self, entry: UserSockets) -> Callable[[Msg], object]:
        replaced = self.metrics.ws_pushes_replaced

        async def deliver(msg: Msg) -> None:
            # the entry, not a look-up by user: a subscription being dropped feeds no one
            for conn in entry.connections:
                if conn.outbox.put_push(msg.data):
                    replaced.inc()

        return deliver

    async def close_all(self, code: int, reason: str) -> None:
        connections = [conn for entry in self._users.values() for conn in entry.connections]
        if connections:
            log.info("websocket: closing %d socket(s): %s", len(connections), reason)
        await asyncio.gather(*(conn.close(code, reason) for conn in connections), return_exceptions=True)

    def _update_gauges(self) -> None:
        self.metrics.ws_sockets.set(self.count)
        self.metrics.ws_users.set(len(self._users))


HUB = web.AppKey("socket_hub", SocketHub)


def raise_descriptor_limit(max_sockets: int) -> None:
    """Raise the soft limit on open files toward what ``max_sockets`` needs (each socket is one),
    as far as the hard limit allows; say so when that is not enough."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_sockets + SPARE_DESCRIPTORS
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError) as exc:
            log.debug("could not raise the open-files limit: %s", exc)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning(
            "websocket: the open-files limit is %d, below ws_max_sockets (%d) + %d: sockets past it fail;"
            " raise it (ulimit -n, LimitNOFILE=) or lower ws_max_sockets",
            soft,
            max_sockets,
            SPARE_DESCRIPTORS,
        )
