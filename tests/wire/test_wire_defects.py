"""Wire-contract edges: deep nesting, ids the stream would merge, timestamps before the epoch,
event subjects of another shape. Parsing first, then the same cases over a real nats-server."""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import orjson
import pytest

from agent.app import Agent
from agent.config import Settings
from agent.wire.contract import (
    MAX_NESTING_DEPTH,
    InvalidMessage,
    event_subject,
    parse_event,
    parse_event_message,
    parse_items,
    parse_timestamp,
)
from tests.builders import Client


def nested(depth: int) -> dict[str, Any]:
    """An object nested ``depth`` levels deep (itself being level 1)."""
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def view(**fields: Any) -> dict[str, Any]:
    return {"type": "view", "user_id": "u", "item_id": "i", **fields}


# -- 1. nesting depth, and what is accepted can be written back ---------------------------------


def test_context_nesting_limit_is_one_rule_for_every_field() -> None:
    assert parse_event(view(context=nested(MAX_NESTING_DEPTH)), now=0).context == nested(MAX_NESTING_DEPTH)
    for body in (view(context=nested(MAX_NESTING_DEPTH + 1)), view(context=nested(300)), view(extra=nested(300))):
        with pytest.raises(InvalidMessage, match=f"nests deeper than the limit of {MAX_NESTING_DEPTH} levels"):
            parse_event(body, now=0)
    deep_list: Any = 1
    for _ in range(MAX_NESTING_DEPTH + 1):
        deep_list = [deep_list]
    with pytest.raises(InvalidMessage, match="field 'context' nests deeper"):
        parse_event(view(context={"l": deep_list}), now=0)
    with pytest.raises(InvalidMessage, match="item 0: field 'attributes' nests deeper"):
        parse_items([{"id": "a", "title": "A", "attributes": nested(MAX_NESTING_DEPTH + 1)}])


def test_what_parse_event_accepts_can_be_written_back_as_json() -> None:
    # orjson reads all three of these bodies (in Python) but could not write them back
    for body in (view(context={"n": 2**70}), view(context={1: "x"}), view(user_id="\ud800")):
        with pytest.raises(InvalidMessage, match="cannot be written as JSON"):
            parse_event(body, now=0)
    raw = orjson.dumps(view(context=nested(MAX_NESTING_DEPTH), id="e"))
    assert orjson.loads(orjson.dumps(parse_event(orjson.loads(raw), now=0).to_dict()))["context"]


# -- 2. ids the stream's Nats-Msg-Id would merge ------------------------------------------------


@pytest.mark.parametrize(
    ("event_id", "reason"),
    [
        ("e-1 ", "must not start or end with whitespace"),
        (" e-1", "must not start or end with whitespace"),
        ("e-1\u2003", "must not start or end with whitespace"),
        ("e-1\r\n", "must not start or end with whitespace"),
        ("e\r\n1", "must not contain control characters"),
        ("e\t1", "must not contain control characters"),
        ("e\x001", "must not contain control characters"),
        ("e\x851", "must not contain control characters"),
    ],
)
def test_ids_that_a_header_would_change_are_refused(event_id: str, reason: str) -> None:
    with pytest.raises(InvalidMessage, match=f"field 'id' {reason}"):
        parse_event(view(id=event_id), now=0)


def test_inner_spaces_and_unicode_ids_are_kept() -> None:
    for event_id in ("e 1", "é-1", "a:b/c"):
        assert parse_event(view(id=event_id), now=0).id == event_id


# -- 3. one lower bound for 'ts' -----------------------------------------------------------------


def test_ts_lower_bound_is_the_same_for_numbers_and_text() -> None:
    assert parse_timestamp(0) == parse_timestamp("1970-01-01T00:00:00Z") == 0.0
    assert parse_timestamp("1970-01-01T01:00:00+01:00") == 0.0
    reasons = set()
    for value in (-1, -0.5, "1969-12-31T23:59:59Z", "0001-01-01T00:00:00Z", "1970-01-01T00:00:00+00:01"):
        with pytest.raises(InvalidMessage) as info:
            parse_timestamp(value)
        reasons.add(str(info.value))
    assert reasons == {"field 'ts' must not be negative (before 1970-01-01T00:00:00Z)"}


# -- 4. the event subject ------------------------------------------------------------------------


def test_event_subject_is_exactly_prefix_events_type_user_token() -> None:
    body = {"type": "click", "user_id": "u", "item_id": "i"}
    assert event_subject("recsys", parse_event(body, now=0)) == "recsys.events.click.u"
    assert parse_event_message("recsys", "recsys.events.click.u", body, now=0).user_id == "u"
    assert parse_event_message("a.b", "a.b.events.rate.u", {**body, "type": "rate", "value": 4}, now=0).type == "rate"
    # a user id that is not subject-safe travels as its token
    odd = {**body, "user_id": "ann@example.com"}
    assert parse_event_message("recsys", event_subject("recsys", parse_event(odd, now=0)), odd, now=0).user_id == (
        "ann@example.com"
    )
    # the subject's type fills a body that has none
    assert parse_event_message("recsys", "recsys.events.like.u", {"user_id": "u", "item_id": "i"}, now=0).type == "like"
    for subject in [
        "recsys.events.click",  # wire contract v1
        "recsys.events.view.u",  # another type
        "recsys.events.click.bob",  # another user
        "recsys.events.foo.click.u",
        "recsys.events.click.u.extra",
        "other.events.click.u",
        "recsys.eventsx.click.u",
    ]:
        with pytest.raises(InvalidMessage, match=re.escape("publish it on 'recsys.events.click.u'")):
            parse_event_message("recsys", subject, body, now=0)


# -- over a real nats-server ---------------------------------------------------------------------


async def _ok(client: Client, agent: Agent, event_id: str) -> None:
    """Publish a good event and wait for its push: everything published before is settled."""
    await client.publish_event({"id": event_id, "type": "view", "user_id": "ok", "item_id": "i"})
    await client.wait_for(lambda: event_id in client.reflected_event_ids())


async def test_deep_context_is_refused_over_http_and_dead_lettered_over_nats(
    settings: Settings, client: Client
) -> None:
    settings.disabled_plugins = ["content"]
    # written by hand: orjson itself would refuse to write this (its limit is 254 levels)
    context = b'{"a":' * 299 + b'{"leaf":1}' + b"}" * 299
    deep = b'{"id": "deep", "type": "view", "user_id": "deep-user", "item_id": "i", "context": ' + context + b"}"
    assert orjson.loads(deep)["id"] == "deep"
    async with Agent(settings) as agent:
        async with aiohttp.ClientSession(agent.http_url) as http:
            response = await http.post("/v1/events", data=deep)
            assert response.status == 400, await response.text()
            assert "field 'context' nests deeper than the limit of 32 levels" in (await response.json())["error"]
        await client.publish_event(deep, subject=client.event_subject("view", "deep-user"))
        await _ok(client, agent, "after-deep")
        assert agent.pipeline.users.get("deep-user") is None, "the deep event is not applied"
    [letter] = client.dead_letters
    assert "field 'context' nests deeper than the limit of 32 levels" in letter["reason"]


async def test_ids_differing_only_by_whitespace_are_never_silently_dropped(settings: Settings, client: Client) -> None:
    settings.disabled_plugins = ["content"]
    async with Agent(settings) as agent:
        async with aiohttp.ClientSession(agent.http_url) as http:
            response = await http.post("/v1/events", json=view(id="e-1", user_id="http-user"))
            assert response.status == 202, await response.text()
            # the HTTP API makes the id the stream's Nats-Msg-Id: these would be taken for e-1
            for event_id in ("e-1 ", "e-1\r\n"):
                response = await http.post("/v1/events", json=view(id=event_id, user_id="http-user"))
                assert response.status == 400, (event_id, await response.text())
                assert "field 'id' must not start or end with whitespace" in (await response.json())["error"]
        # over NATS each is stored (the agent sets no message id there) and judged by the agent
        for event_id in ("n-1", "n-1 ", "n-1\r\n"):
            await client.publish_event(view(id=event_id, user_id="nats-user"))
        await _ok(client, agent, "after-ids")
        assert "e-1" in client.reflected_event_ids() and "n-1" in client.reflected_event_ids()
        assert agent.pipeline.users.get("http-user").event_count == 1  # type: ignore[union-attr]
        assert agent.pipeline.users.get("nats-user").event_count == 1  # type: ignore[union-attr]
    reasons = sorted(letter["reason"] for letter in client.dead_letters)
    assert reasons == [
        "field 'id' must not start or end with whitespace: 'n-1 '",
        "field 'id' must not start or end with whitespace: 'n-1\\r\\n'",
    ]


async def test_a_subject_of_another_shape_is_dead_lettered_naming_the_subject_to_use(
    settings: Settings, client: Client
) -> None:
    settings.disabled_plugins = ["content"]
    async with Agent(settings) as agent:
        await client.js.publish(
            settings.subject("events", "foo", "view"), orjson.dumps(view(id="odd", user_id="odd-user"))
        )
        await _ok(client, agent, "after-subject")
        assert agent.pipeline.users.get("odd-user") is None, "the event is not applied"
        assert "odd" not in client.reflected_event_ids()
    [letter] = client.dead_letters
    assert letter["subject"] == settings.subject("events", "foo", "view")
    assert f"publish it on '{client.event_subject('view', 'odd-user')}'" in letter["reason"], letter
