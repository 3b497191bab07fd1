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
from agent.wire.user_tokens import tokens_named

if TYPE_CHECKING:
    from nats.aio.msg import Msg
    from nats.js import JetStreamContext

    from agent.serving.metrics import Metrics

log = logging.getLogger(__name__)

DLQ_PAYLOAD_CHARS = 1_024
# on a dead letter: the tokens of the users it is about, comma-separated (tokens hold no comma)
USER_TOKENS_HEADER = "Recsys-User-Tokens"
RETRY_DELAY_S = 1.0


class Disposition(Enum):
    ACK = "ack"
    RETRY = "retry"
    DEAD_LETTER = "dead_letter"


@dataclass(frozen=True, slots=True)
class Verdict:
    disposition: Disposition
    reason: str = ""
    # the message itself can never be applied (not a fault of ours that a fix would mend)
    permanent: bool = False


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
        return Verdict(Disposition.DEAD_LETTER, str(error), permanent=True)
    if deliveries >= max_deliver:
        return Verdict(Disposition.DEAD_LETTER, f"failed {deliveries} times, last error: {error!r}")
    return Verdict(Disposition.RETRY, repr(error))


def dead_letter_body(reason: str, subject: str, payload: bytes, payload_chars: int = DLQ_PAYLOAD_CHARS) -> bytes:
    """A dead letter: why and where from, and the first ``payload_chars`` characters of what
    was refused (0: none; the excerpt is what tells an operator what was wrong, and also what
    may name a person, so how much is kept is a setting)."""
    body: dict[str, str] = {"reason": reason, "subject": subject}
    if payload_chars > 0:
        body["payload"] = payload[: payload_chars * 4].decode("utf-8", errors="replace")[:payload_chars]
    return orjson.dumps(body)


def _origin(msg: Msg) -> str:
    """Which stream message ``msg`` is (stream and sequence), or "" when it has no metadata."""
    try:
        return f"{msg.metadata.stream}:{msg.metadata.sequence.stream}"
    except Exception:
        return ""


class Disposer:
    def __init__(
        self,
        js: JetStreamContext,
        dlq_subject: str,
        metrics: Metrics,
        payload_chars: int = DLQ_PAYLOAD_CHARS,
        subject_prefix: str = "recsys",
    ) -> None:
        self.subject_prefix = subject_prefix
        self.js = js
        self.dlq_subject = dlq_subject
        self.metrics = metrics
        self.payload_chars = payload_chars

    async def dead_letter(self, reason: str, subject: str, payload: bytes, source: str, origin: str = "") -> None:
        # every agent refuses a bad catalog message (each consumes the whole catalog): the
        # stream message it came from names the dead letter, so the stream keeps one
        headers = {"Nats-Msg-Id": f"dead-letter:{origin}"} if origin else {}
        tokens = tokens_named(self.subject_prefix, subject, payload)
        if tokens:
            # whose it is, so that a user's export shows it and their forget erases it
            headers[USER_TOKENS_HEADER] = ",".join(tokens)
        await self.js.publish(
            self.dlq_subject, dead_letter_body(reason, subject, payload, self.payload_chars), headers=headers or None
        )
        self.metrics.dead_letters.labels(source=source).inc()
        log.info("dead-lettered a message from %s: %s", subject, reason)

    async def _erase_refused(self, msg: Msg) -> None:
        """A refused event lives on as its dead letter, kept as long as dead letters are
        (``dlq_max_age_s``, ``dlq_payload_chars``), not in the event stream for as long as
        events are: it is never applied, and on a subject of the wrong shape or user it would
        escape the erasure of a forgotten user, which finds a user's events by their subject."""
        try:
            await self.js.delete_msg(msg.metadata.stream, msg.metadata.sequence.stream)
        except Exception as exc:
            log.warning("could not erase refused event %d from the stream: %s", msg.metadata.sequence.stream, exc)

    async def dispose(self, msg: Msg, verdict: Verdict, source: str) -> None:
        if verdict.disposition is Disposition.ACK:
            await msg.ack()
        elif verdict.disposition is Disposition.DEAD_LETTER:
            # If storing the dead letter fails the original is not acked and comes back.
            await self.dead_letter(verdict.reason, msg.subject, msg.data, source, _origin(msg))
            await msg.ack()
            # Only a message that can never be applied: one that failed for a fault of ours
            # (a plugin's bug) stays in the stream, and the next start, with the fault mended,
            # applies it.
            if source == "events" and verdict.permanent:
                await self._erase_refused(msg)
        else:
            self.metrics.retries.inc()
            log.warning("will retry a message from %s: %s", msg.subject, verdict.reason)
            await msg.nak(delay=RETRY_DELAY_S)
