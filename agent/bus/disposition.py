"""Message disposition: whether a consumed message is acked, retried or dead-lettered.

This is the only module that decides. Consumers report what happened to a message and
:func:`decide` answers; :class:`Disposer` carries the answer out. A dead letter is stored in
JetStream before the original is acknowledged, so a rejected message is never lost.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

import orjson

from agent.wire.contract import InvalidMessage

if TYPE_CHECKING:
    from nats.aio.msg import Msg
    from nats.js import JetStreamContext

    from agent.serving.metrics import Metrics

log = logging.getLogger(__name__)

DLQ_PAYLOAD_CHARS = 1_024
RETRY_DELAY_S = 1.0


class Disposition(Enum):
    ACK = "ack"
    RETRY = "retry"
    DEAD_LETTER = "dead_letter"


@dataclass(frozen=True, slots=True)
class Verdict:
    disposition: Disposition
    reason: str = ""


ACK = Verdict(Disposition.ACK)


def decide(error: BaseException | None, deliveries: int, max_deliver: int) -> Verdict:
    """The one rule.

    - no error: ack;
    - the message can never be applied (InvalidMessage): dead-letter with its reason, ack;
    - anything else is our fault or a passing fault: retry, until the message has been
      delivered ``max_deliver`` times, then dead-letter so it cannot block the stream forever.
    """
    if error is None:
        return ACK
    if isinstance(error, InvalidMessage):
        return Verdict(Disposition.DEAD_LETTER, str(error))
    if deliveries >= max_deliver:
        return Verdict(Disposition.DEAD_LETTER, f"failed {deliveries} times, last error: {error!r}")
    return Verdict(Disposition.RETRY, repr(error))


def dead_letter_body(reason: str, subject: str, payload: bytes) -> bytes:
    text = payload[: DLQ_PAYLOAD_CHARS * 4].decode("utf-8", errors="replace")[:DLQ_PAYLOAD_CHARS]
    return orjson.dumps({"reason": reason, "subject": subject, "payload": text})


class Disposer:
    def __init__(self, js: JetStreamContext, dlq_subject: str, metrics: Metrics) -> None:
        self.js = js
        self.dlq_subject = dlq_subject
        self.metrics = metrics

    async def dead_letter(self, reason: str, subject: str, payload: bytes, source: str) -> None:
        await self.js.publish(self.dlq_subject, dead_letter_body(reason, subject, payload))
        self.metrics.dead_letters.labels(source=source).inc()
        log.info("dead-lettered a message from %s: %s", subject, reason)

    async def dispose(self, msg: Msg, verdict: Verdict, source: str) -> None:
        if verdict.disposition is Disposition.ACK:
            await msg.ack()
        elif verdict.disposition is Disposition.DEAD_LETTER:
            # If storing the dead letter fails the original is not acked and comes back.
            await self.dead_letter(verdict.reason, msg.subject, msg.data, source)
            await msg.ack()
        else:
            self.metrics.retries.inc()
            log.warning("will retry a message from %s: %s", msg.subject, verdict.reason)
            await msg.nak(delay=RETRY_DELAY_S)
