"""Wire-contract v2 objects and their validation.

Parsing is hand-written rather than schema-driven because it runs once per event on the hot
path; every rejection raises :class:`InvalidMessage` whose text is the reason that goes to the
dead-letter subject or back to an HTTP client.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from agent.wire.user_tokens import user_token

EVENT_TYPES: frozenset[str] = frozenset({"view", "click", "add_to_cart", "purchase", "rate", "like", "dislike", "skip"})
MAX_ID_LENGTH = 256
MAX_TITLE_LENGTH = 1_000
MAX_TEXT_LENGTH = 20_000
# How deep a field of an event or item ('context', 'attributes', any other) may nest, the
# field's own object or array being level 1. Real metadata is a few levels deep; the limit keeps
# every accepted message far inside orjson's own recursion limit (254 on writing, where reading
# allows 1024), so the agent can always store and republish what it accepted.
MAX_NESTING_DEPTH = 32
# The earliest accepted 'ts', for numbers and RFC 3339 text alike: the Unix epoch.
MIN_TS = 0.0


class InvalidMessage(ValueError):
    """A message that can never be applied; the text is the reason reported to the sender."""


@dataclass(slots=True)
class Event:
    type: str
    user_id: str
    ts: float
    id: str | None = None
    item_id: str | None = None
    value: float | None = None
    context: dict[str, Any] = field(default_factory=dict)
    # When the event stream stored it (not on the wire): checks against "now" use this, so
    # that a rebuild at start judges every event as it was judged when it arrived.
    received_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "user_id": self.user_id, "ts": self.ts}
        if self.id is not None:
            out["id"] = self.id
        if self.item_id is not None:
            out["item_id"] = self.item_id
        if self.value is not None:
            out["value"] = self.value
        if self.context:
            out["context"] = self.context
        return out


@dataclass(slots=True)
class Item:
    id: str
    title: str
    text: str = ""
    categories: tuple[str, ...] = ()
    attributes: dict[str, Any] = field(default_factory=dict)
    image_url: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "title": self.title}
        if self.text:
            out["text"] = self.text
        if self.categories:
            out["categories"] = list(self.categories)
        if self.attributes:
            out["attributes"] = self.attributes
        if self.image_url:
            out["image_url"] = self.image_url
        return out


@dataclass(slots=True)
class RecommendedItem:
    item_id: str
    score: float
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "score": round(self.score, 6), "reasons": self.reasons}


@dataclass(slots=True)
class Recommendations:
    user_id: str
    items: list[RecommendedItem]
    generated_at: float
    event_id: str | None = None
    event_ids: list[str] | None = None
    profile: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "user_id": self.user_id,
            "items": [item.to_dict() for item in self.items],
            "generated_at": self.generated_at,
        }
        if self.event_id is not None:
            out["event_id"] = self.event_id
        if self.event_ids is not None:
            out["event_ids"] = self.event_ids
        if self.profile is not None:
            out["profile"] = self.profile
        return out

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())


def decode_json(payload: bytes, max_bytes: int) -> Any:
    if len(payload) > max_bytes:
        raise InvalidMessage(f"payload of {len(payload)} bytes exceeds the limit of {max_bytes}")
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise InvalidMessage(f"invalid JSON: {exc}") from None


def _require_str(obj: dict[str, Any], key: str, *, optional: bool = False) -> str | None:
    value = obj.get(key)
    if value is None:
        if optional:
            return None
        raise InvalidMessage(f"missing field '{key}'")
    if not isinstance(value, str):
        raise InvalidMessage(f"field '{key}' must be a string, got {type(value).__name__}")
    if not value:
        raise InvalidMessage(f"field '{key}' must not be empty")
    if len(value) > MAX_ID_LENGTH and key in {"id", "user_id", "item_id"}:
        raise InvalidMessage(f"field '{key}' is longer than {MAX_ID_LENGTH} characters")
    return value


# Unicode category Cc: C0 controls (CR, LF, tab...), DEL and C1 controls
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _event_id(obj: dict[str, Any]) -> str | None:
    """The optional event id, refused when the stream could not keep it apart from another id.

    An event id is also the stream's ``Nats-Msg-Id`` (the HTTP API sets it; a client publishing
    on NATS may too), and nats-py strips the header value and turns CR/LF into spaces, so
    ``"e-1"``, ``"e-1 "`` and ``"e-1\\r\\n"`` would all be one message id: every one after the
    first dropped as a duplicate without a word. An id therefore must not start or end with
    whitespace (Unicode whitespace included: that is what ``str.strip`` removes) nor contain a
    control character anywhere; every id that passes is its own header value, unchanged (a
    client that sets ``Nats-Msg-Id`` itself should set it to the event id).
    """
    event_id = _require_str(obj, "id", optional=True)
    if event_id is None:
        return None
    if event_id[0].isspace() or event_id[-1].isspace():
        raise InvalidMessage(f"field 'id' must not start or end with whitespace: {event_id[:64]!r}")
    if _CONTROL.search(event_id):
        raise InvalidMessage(f"field 'id' must not contain control characters (CR, LF, tab...): {event_id[:64]!r}")
    return event_id


def _too_deep(value: Any, levels_left: int) -> bool:
    """Whether the objects and arrays in ``value`` nest more than ``levels_left`` levels."""
    if isinstance(value, dict):
        children: Any = value.values()
    elif isinstance(value, (list, tuple)):
        children = value
    else:
        return False
    if levels_left == 0:
        return True
    # Recursion is bounded by the limit, not by the input: it stops one level past it.
    for child in children:
        if _too_deep(child, levels_left - 1):
            return True
    return False


def _check_storable(body: dict[str, Any], what: str) -> None:
    """Refuse a message body the agent could not write back as JSON (it stores and republishes
    what it accepts: the HTTP API stores the body as given).

    Every field, free-form ones ('context', 'attributes') and unknown ones alike, may nest at
    most MAX_NESTING_DEPTH levels. Within that depth orjson.dumps cannot fail on what orjson.loads
    read; it still guards bodies built in Python (an integer beyond 64 bits, a lone surrogate,
    a non-JSON type), so that a stored message never fails later, far from its cause.
    """
    for key, value in body.items():
        if _too_deep(value, MAX_NESTING_DEPTH):
            raise InvalidMessage(f"field '{key}' nests deeper than the limit of {MAX_NESTING_DEPTH} levels")
    try:
        orjson.dumps(body)
    except orjson.JSONEncodeError as exc:
        raise InvalidMessage(f"{what} cannot be written as JSON: {exc}") from None


def _number(value: Any, key: str) -> float:
    # bool is an int subclass in Python; true/false are not numbers on the wire.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidMessage(f"field '{key}' must be a number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise InvalidMessage(f"field '{key}' must be finite")
    return number


_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")


def parse_timestamp(value: Any) -> float:
    """Epoch seconds from a number or an RFC 3339 text; one lower bound (MIN_TS) for both forms."""
    if isinstance(value, str):
        if not _RFC3339.match(value):
            raise InvalidMessage(f"field 'ts' is not an RFC 3339 timestamp: {value[:64]!r}")
        text = value.replace("z", "Z").replace("Z", "+00:00")
        try:
            ts = datetime.fromisoformat(text).timestamp()
        except (ValueError, OverflowError, OSError) as exc:
            # the right shape, but no such moment (February 30th, hour 25, offset +99:00)
            raise InvalidMessage(f"field 'ts' is not a valid date: {value[:64]!r} ({exc})") from None
    else:
        ts = _number(value, "ts")
    if ts < MIN_TS:
        raise InvalidMessage("field 'ts' must not be negative (before 1970-01-01T00:00:00Z)")
    return ts


def event_subject(prefix: str, event: Event) -> str:
    """The subject an event is published on: ``<prefix>.events.<type>.<user_token>`` (wire
    contract v2). Naming the user lets the stream erase one user's events by subject."""
    return f"{prefix}.events.{event.type}.{user_token(event.user_id)}"


def subject_event_type(prefix: str, subject: str) -> str | None:
    """The event type a subject under ``<prefix>.events.`` names, in whatever shape (v1 or v2);
    None when its first token after ``events`` is no known type."""
    head = f"{prefix}.events."
    if not subject.startswith(head):
        return None
    first = subject[len(head) :].split(".", 1)[0]
    return first if first in EVENT_TYPES else None


def v1_event_type(prefix: str, subject: str) -> str | None:
    """The type a wire contract v1 event subject (exactly ``<prefix>.events.<type>``) names;
    None for any other subject."""
    head = f"{prefix}.events."
    rest = subject[len(head) :] if subject.startswith(head) else ""
    return rest if rest in EVENT_TYPES else None


def parse_event_message(prefix: str, subject: str, obj: Any, *, now: float) -> Event:
    """The event a stream message carries: its body, checked against its subject.

    The subject must be exactly the one :func:`event_subject` gives for the body (its type and
    its user's token): a v1 subject (``<prefix>.events.<type>``), another shape, another type or
    another user's token is refused with a reason that names the subject to publish on, so a
    client on the wrong subject learns it at once and no event is filed under the wrong user.
    A body without ``type`` takes the subject's.
    """
    event = parse_event(obj, now=now, event_type=subject_event_type(prefix, subject), type_from_body=True)
    expected = event_subject(prefix, event)
    if subject != expected:
        raise InvalidMessage(
            f"subject {subject[:200]!r} does not match the event: publish it on {expected!r} "
            f"(wire contract v2: '{prefix}.events.<type>.<user_token>')"
        )
    return event


def parse_event(obj: Any, *, now: float, event_type: str | None = None, type_from_body: bool = False) -> Event:
    """Validate a decoded JSON value as an Event.

    ``event_type`` fills a body that omits ``type``; when given it must agree with the body,
    unless ``type_from_body`` (then the caller checks the two agree, see
    :func:`parse_event_message`).

    The same rules hold on every path in (NATS, HTTP, replay files):

    - ``id``: at most MAX_ID_LENGTH characters, no leading or trailing whitespace and no control
      characters, so that distinct ids are distinct ``Nats-Msg-Id`` headers (see :func:`_event_id`);
    - ``ts``: epoch seconds or RFC 3339, not before 1970-01-01T00:00:00Z in either form;
    - ``context`` (and any other field): nested at most MAX_NESTING_DEPTH levels, and the body
      as a whole can be written back as JSON (see :func:`_check_storable`).
    """
    if not isinstance(obj, dict):
        raise InvalidMessage(f"an event must be a JSON object, got {type(obj).__name__}")
    body_type = obj.get("type", event_type)
    if not isinstance(body_type, str):
        raise InvalidMessage("missing field 'type'" if body_type is None else "field 'type' must be a string")
    if body_type not in EVENT_TYPES:
        raise InvalidMessage(f"unknown event type {body_type[:64]!r}")
    if event_type is not None and event_type != body_type and not type_from_body:
        raise InvalidMessage(f"subject names type {event_type!r} but the body says {body_type!r}")
    user_id = _require_str(obj, "user_id")
    assert user_id is not None
    # Every v1 event type is about one item; 'item_id' stays optional in the schema for the
    # user-level event types a later version adds (forget).
    item_id = _require_str(obj, "item_id", optional=True)
    if item_id is None:
        raise InvalidMessage(f"a '{body_type}' event needs 'item_id'")
    event_id = _event_id(obj)
    ts = parse_timestamp(obj["ts"]) if obj.get("ts") is not None else now
    value = _number(obj["value"], "value") if obj.get("value") is not None else None
    if body_type == "rate" and value is None:
        raise InvalidMessage("a 'rate' event needs a numeric 'value'")
    context = obj.get("context")
    if context is None:
        context = {}
    if not isinstance(context, dict):
        raise InvalidMessage("field 'context' must be an object")
    _check_storable(obj, "the event")
    return Event(type=body_type, user_id=user_id, ts=ts, id=event_id, item_id=item_id, value=value, context=context)


def parse_item(obj: Any) -> Item:
    if not isinstance(obj, dict):
        raise InvalidMessage(f"an item must be a JSON object, got {type(obj).__name__}")
    item_id = _require_str(obj, "id")
    title = _require_str(obj, "title")
    assert item_id is not None and title is not None
    if len(title) > MAX_TITLE_LENGTH:
        raise InvalidMessage(f"field 'title' is longer than {MAX_TITLE_LENGTH} characters")
    text = obj.get("text") or ""
    if not isinstance(text, str):
        raise InvalidMessage("field 'text' must be a string")
    if len(text) > MAX_TEXT_LENGTH:
        raise InvalidMessage(f"field 'text' is longer than {MAX_TEXT_LENGTH} characters")
    categories = obj.get("categories") or []
    if not isinstance(categories, list) or not all(isinstance(c, str) for c in categories):
        raise InvalidMessage("field 'categories' must be a list of strings")
    attributes = obj.get("attributes") or {}
    if not isinstance(attributes, dict):
        raise InvalidMessage("field 'attributes' must be an object")
    image_url = obj.get("image_url")
    if image_url is not None and not isinstance(image_url, str):
        raise InvalidMessage("field 'image_url' must be a string")
    _check_storable(obj, "the item")
    return Item(
        id=item_id,
        title=title,
        text=text,
        categories=tuple(categories),
        attributes=attributes,
        image_url=image_url,
    )


def parse_items(obj: Any) -> list[Item]:
    """An upsert body is one Item or a JSON array of Items; one bad item rejects the whole batch."""
    if isinstance(obj, list):
        items = []
        for position, entry in enumerate(obj):
            try:
                items.append(parse_item(entry))
            except InvalidMessage as exc:
                raise InvalidMessage(f"item {position}: {exc}") from None
        return items
    return [parse_item(obj)]


@dataclass(slots=True)
class RecommendRequest:
    user_id: str
    k: int = 10
    categories: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()


def parse_recommend_request(obj: Any, *, max_k: int, default_k: int = 10) -> RecommendRequest:
    if not isinstance(obj, dict):
        raise InvalidMessage("a recommend request must be a JSON object")
    user_id = _require_str(obj, "user_id")
    assert user_id is not None
    k_raw = obj.get("k", min(default_k, max_k))
    if isinstance(k_raw, bool) or not isinstance(k_raw, int) or not 1 <= k_raw <= max_k:
        raise InvalidMessage(f"field 'k' must be an integer between 1 and {max_k}")
    categories = obj.get("categories") or []
    if not isinstance(categories, list) or not all(isinstance(c, str) for c in categories):
        raise InvalidMessage("field 'categories' must be a list of strings")
    exclude = obj.get("exclude") or []
    if not isinstance(exclude, list) or not all(isinstance(c, str) for c in exclude):
        raise InvalidMessage("field 'exclude' must be a list of strings")
    return RecommendRequest(user_id=user_id, k=k_raw, categories=tuple(categories), exclude=tuple(exclude))
