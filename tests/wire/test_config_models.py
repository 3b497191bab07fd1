"""Settings precedence and errors; wire-contract parsing; user tokens."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import ConfigError, load_settings
from agent.wire.contract import InvalidMessage, decode_json, parse_event, parse_items, parse_recommend_request
from agent.wire.user_tokens import user_id_from_token, user_token


def test_toml_then_env_then_cli(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('http_port = 9000\nnats_port = 5000\nlog_level = "DEBUG"\n[plugins.trending]\nhalf_life_s = 60\n')
    settings = load_settings(
        config, env={"RECSYS_NATS_PORT": "6000", "RECSYS_HTTP_PORT": "7000"}, overrides={"http_port": "7100"}
    )
    assert (settings.nats_port, settings.http_port, settings.log_level) == (6000, 7100, "DEBUG")
    assert settings.plugin_options("trending") == {"half_life_s": 60}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"RECSYS_HTTP_PORT": "eighty"},
            "config key 'http_port' (from environment RECSYS_HTTP_PORT) must be an integer",
        ),
        ({"RECSYS_HTTP_PORT": "70000"}, "config key 'http_port' must be between 0 and 65535"),
        ({"RECSYS_NO_SUCH": "1"}, "RECSYS_NO_SUCH does not name a known setting"),
        ({"RECSYS_NATS_URL": "http://x"}, "config key 'nats_url' must be one URL, or comma-separated URLs"),
        ({"RECSYS_NATS_URL": "nats://a:4222,http://b"}, "each starting with nats://"),
        ({"RECSYS_SUBJECT_PREFIX": "a b"}, "config key 'subject_prefix'"),
        ({"RECSYS_LOAD_ENTRY_POINTS": "perhaps"}, "must be a boolean"),
        ({"RECSYS_STREAM_NAME": "my events"}, "config key 'stream_name' must be a NATS name"),
        ({"RECSYS_CONSUMER_NAME": "agent.1"}, "config key 'consumer_name' must be a NATS name"),
        ({"RECSYS_STREAM_MAX_AGE_S": "inf"}, "config key 'stream_max_age_s' must be a finite number"),
    ],
)
def test_bad_settings_name_the_key(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env=env)
    assert message in str(info.value)


def test_bad_toml(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("http_port = [1]\n")
    with pytest.raises(ConfigError, match=r"config key 'http_port' .*must be an integer"):
        load_settings(config, env={})
    config.write_text("unknown_key = 1\n")
    with pytest.raises(ConfigError, match=r"'unknown_key' .* is not a known setting"):
        load_settings(config, env={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml", env={})


def test_event_parsing_accepts_the_contract() -> None:
    event = parse_event(
        {
            "id": "a",
            "type": "rate",
            "user_id": "u",
            "item_id": "i",
            "value": 4,
            "ts": "2024-01-02T03:04:05Z",
            "context": {"page": "home"},
        },
        now=0,
    )
    assert event.ts == 1704164645.0 and event.value == 4.0 and event.context == {"page": "home"}
    assert parse_event({"type": "view", "user_id": "u", "item_id": "i"}, now=123.0).ts == 123.0
    assert parse_event({"user_id": "u", "item_id": "i"}, now=0, event_type="skip").type == "skip"


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        ({"type": "view", "user_id": "u", "item_id": "i", "value": True}, "'value' must be a number"),
        ({"type": "view", "user_id": "", "item_id": "i"}, "'user_id' must not be empty"),
        ({"type": "view", "user_id": "u", "item_id": "i", "ts": -5}, "must not be negative"),
        # one lower bound for both forms of 'ts', with one reason
        ({"type": "view", "user_id": "u", "item_id": "i", "ts": "1969-12-31T23:59:59Z"}, "must not be negative"),
        ({"type": "view", "user_id": "u", "item_id": "i", "ts": "0001-01-01T00:00:00Z"}, "must not be negative"),
        ({"type": "view", "user_id": "u", "item_id": "i", "ts": "1970-01-01T00:59:59+01:00"}, "must not be negative"),
        ({"type": "view", "user_id": "u", "item_id": "i", "context": []}, "'context' must be an object"),
        ({"type": "view", "user_id": "u"}, "needs 'item_id'"),
        ({"type": "view", "user_id": "u" * 300, "item_id": "i"}, "longer than"),
        ({"type": 3, "user_id": "u", "item_id": "i"}, "'type' must be a string"),
    ],
)
def test_event_parsing_rejects_with_reason(obj: dict, reason: str) -> None:
    with pytest.raises(InvalidMessage, match=reason):
        parse_event(obj, now=0)


def test_payload_limits_and_items() -> None:
    with pytest.raises(InvalidMessage, match="exceeds the limit"):
        decode_json(b" " * 300, 256)
    items = parse_items([{"id": "a", "title": "A", "categories": ["x"]}, {"id": "b", "title": "B"}])
    assert [i.id for i in items] == ["a", "b"] and items[0].categories == ("x",)
    with pytest.raises(InvalidMessage, match="'categories' must be a list of strings"):
        parse_items({"id": "a", "title": "A", "categories": "x"})
    with pytest.raises(InvalidMessage, match="between 1 and 50"):
        parse_recommend_request({"user_id": "u", "k": 0}, max_k=50)
    # without k: the configured default, within the configured maximum
    assert parse_recommend_request({"user_id": "u"}, max_k=50, default_k=20).k == 20
    assert parse_recommend_request({"user_id": "u"}, max_k=5, default_k=10).k == 5


@pytest.mark.parametrize("user_id", ["alice", "A_b-9", "bob@example.com", "ünïcode", "a.b", "~tilde", "x y"])
def test_user_tokens_round_trip_and_are_subject_safe(user_id: str) -> None:
    token = user_token(user_id)
    assert user_id_from_token(token) == user_id
    assert not any(c in token for c in ". *>")
    assert (token == user_id) == all(c.isascii() and (c.isalnum() or c in "_-") for c in user_id)


def test_the_qdrant_api_key_comes_from_the_environment_and_is_never_printed() -> None:
    settings = load_settings(
        env={"RECSYS_QDRANT_URL": "https://qdrant.example:6333", "RECSYS_QDRANT_API_KEY": "s3cret"}
    )
    assert settings.qdrant_url == "https://qdrant.example:6333" and settings.qdrant_api_key == "s3cret"
    assert "s3cret" not in repr(settings)
