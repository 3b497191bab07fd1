"""What waits to be sent on one socket, bounded whatever the client does."""

from __future__ import annotations

import asyncio
from collections import deque


class Outbox:
    """The latest push not yet sent, and the replies to the client's messages.

    A push is the user's whole current list, so an unsent one is worth nothing once a newer one
    exists: a newer push replaces it, and a slow client gets the latest list instead of a backlog
    of stale ones. Replies (acknowledgements, errors) each answer one message of the client and
    are kept in order, up to ``max_replies``: a client that sends and never reads is too slow.
    """

    __slots__ = ("_ready", "max_replies", "push", "pushes_put", "replaced", "replies")

    def __init__(self, max_replies: int) -> None:
        self.max_replies = max_replies
        self.push: bytes | None = None
        self.replies: deque[bytes] = deque()
        # pushes put so far, and how many of them a newer one replaced before they were sent
        self.pushes_put = 0
        self.replaced = 0
        self._ready = asyncio.Event()

    def put_push(self, data: bytes) -> bool:
        """Queue ``data`` as the socket's next push; True when it replaced an unsent one."""
        replaced = self.push is not None
        if replaced:
            self.replaced += 1
        self.push = data
        self.pushes_put += 1
        self._ready.set()
        return replaced

    def put_reply(self, data: bytes) -> bool:
        """Queue a reply; False when ``max_replies`` are already waiting (the client is too slow)."""
        if len(self.replies) >= self.max_replies:
            return False
        self.replies.append(data)
        self._ready.set()
        return True

    async def next(self) -> tuple[bytes, bool]:
        """The next message to send, once there is one, and whether it is a push: replies
        first, in order, then the push."""
        while not self.replies and self.push is None:
            self._ready.clear()
            await self._ready.wait()
        if self.replies:
            return self.replies.popleft(), False
        data, self.push = self.push, None
        assert data is not None
        return data, True

    def __len__(self) -> int:
        return len(self.replies) + (self.push is not None)
