"""The one rule that decides a consumed message's fate (agent/bus/disposition.py), and the
disposer that carries it out: a dead letter is stored before the original is acknowledged."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from agent.bus.disposition import ACK, DLQ_PAYLOAD_CHARS, Disposer, Disposition, dead_letter_body, decide
from agent.serving.metrics import Metrics
from agent.wire.contract import InvalidMessage


@pytest.mark.parametrize(
    ("error", "deliveries", "expected"),
    [
        (None, 1, Disposition.ACK),
        (None, 9, Disposition.ACK),
        (InvalidMessage("field 'type' is missing"), 1, Disposition.DEAD_LETTER),
        (RuntimeError("Qdrant is down"), 1, Disposition.RETRY),
        (RuntimeError("Qdrant is down"), 4, Disposition.RETRY),
        (RuntimeError("Qdrant is down"), 5, Disposition.DEAD_LETTER),
        (RuntimeError("Qdrant is down"), 7, Disposition.DEAD_LETTER),
    ],
)
def test_the_rule(error: BaseException | None, deliveries: int, expected: Disposition) -> None:
    assert decide(error, deliveries, max_deliver=5).disposition is expected


def test_the_reasons_say_why() -> None:
    assert decide(InvalidMessage("field 'type' is missing"), 1, 5).reason == "field 'type' is missing"
    assert decide(RuntimeError("boom"), 5, 5).reason == "failed 5 times, last error: RuntimeError('boom')"
    assert decide(None, 1, 5) is ACK


def test_a_dead_letter_keeps_reason_subject_and_a_bounded_excerpt() -> None:
    body = orjson.loads(dead_letter_body("bad", "recsys.events.view", ("é" * 10_000).encode()))
    assert body["reason"] == "bad" and body["subject"] == "recsys.events.view"
    assert body["payload"] == "é" * DLQ_PAYLOAD_CHARS
    # bytes that are no UTF-8 are replaced, not a reason to lose the dead letter
    assert orjson.loads(dead_letter_body("bad", "s", b"\xff\xfe"))["payload"] == "\ufffd\ufffd"


class Recorder:
    """Stands in for JetStream and for one message: records the order of what is done."""

    def __init__(self, fail_publish: bool = False) -> None:
        self.calls: list[str] = []
        self.fail_publish = fail_publish
        self.subject, self.data = "recsys.events.view", b"{}"

    async def publish(self, subject: str, body: bytes, headers: dict[str, str] | None = None) -> Any:
        if self.fail_publish:
            raise ConnectionError("no JetStream")
        self.calls.append(f"publish {subject}")

    async def ack(self) -> None:
        self.calls.append("ack")

    async def nak(self, delay: float | None = None) -> None:
        self.calls.append(f"nak {delay}")

    async def delete_msg(self, stream: str, seq: int) -> bool:
        self.calls.append(f"erase {stream} {seq}")
        return True

    @property
    def metadata(self) -> Any:
        return SimpleNamespace(stream="EVENTS", sequence=SimpleNamespace(stream=7))


async def test_the_settler_stores_the_dead_letter_before_it_acknowledges() -> None:
    recorder = Recorder()
    disposer = Disposer(recorder, "recsys.dlq", Metrics())  # type: ignore[arg-type]
    await disposer.dispose(recorder, decide(InvalidMessage("no"), 1, 5), "events")  # type: ignore[arg-type]
    await disposer.dispose(recorder, decide(RuntimeError("later"), 1, 5), "events")  # type: ignore[arg-type]
    await disposer.dispose(recorder, ACK, "events")  # type: ignore[arg-type]
    # a refused event lives on as its dead letter only
    assert recorder.calls == ["publish recsys.dlq", "ack", "erase EVENTS 7", "nak 1.0", "ack"]


async def test_an_event_that_failed_for_a_fault_of_ours_stays_in_the_stream() -> None:
    # dead-lettered after its last delivery, but nothing was wrong with it: the next start,
    # with the fault mended, applies it
    recorder = Recorder()
    disposer = Disposer(recorder, "recsys.dlq", Metrics())  # type: ignore[arg-type]
    await disposer.dispose(recorder, decide(RuntimeError("a plugin's bug"), 5, 5), "events")  # type: ignore[arg-type]
    assert recorder.calls == ["publish recsys.dlq", "ack"]


async def test_a_dead_letter_that_cannot_be_stored_leaves_the_message_unacknowledged() -> None:
    recorder = Recorder(fail_publish=True)
    disposer = Disposer(recorder, "recsys.dlq", Metrics())  # type: ignore[arg-type]
    with pytest.raises(ConnectionError):
        await disposer.dispose(recorder, decide(InvalidMessage("no"), 1, 5), "events")  # type: ignore[arg-type]
    assert recorder.calls == [], "not acknowledged: JetStream redelivers it"
