"""``[plugins.summariser]``: the summariser's options, typed and range-checked."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, get_type_hints

from agent.config import ConfigError, coerce_option
from agent.llm.chat_client import Dialect


@dataclass(slots=True)
class SummaryOptions:
    """``[plugins.summariser]`` options; see the README section on the LLM for each one."""

    base_url: str = ""
    model: str = ""
    dialect: str = Dialect.OPENAI_JSON_SCHEMA.value
    api_key_env: str = ""
    refresh_after_events: int = 5
    refresh_after_s: float = 300.0
    max_event_age_s: float = 600.0
    max_concurrency: int = 2
    max_pending_users: int = 1_000
    max_tracked_users: int = 1_000_000
    timeout_s: float = 10.0
    max_retries: int = 2
    backoff_s: float = 0.5
    breaker_failures: int = 5
    breaker_reset_s: float = 30.0
    history_items: int = 20
    send_categories: bool = True
    max_tokens: int = 320
    temperature: float = 0.0
    explain: bool = True

    @classmethod
    def parse(cls, raw: Mapping[str, Any], section: str = "plugins.summariser") -> SummaryOptions:
        """Typed, range-checked options; an unknown or bad option raises ConfigError naming it."""
        known = {f.name for f in fields(cls)}
        kinds = get_type_hints(cls)
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if key not in known:
                raise ConfigError(f"[{section}] has no option '{key}' (known: {', '.join(sorted(known))})")
            # Plugin options come from TOML only, typed already: "2" is not read as an integer.
            values[key] = coerce_option(f"[{section}] option '{key}'", kinds[key], value, parse_strings=False)
        options = cls(**values)
        options._check(section)
        return options

    def _check(self, section: str) -> None:
        checks: list[tuple[str, bool, str]] = [
            (
                "dialect",
                self.dialect in {d.value for d in Dialect},
                f"must be one of {', '.join(d.value for d in Dialect)}",
            ),
            (
                "base_url",
                not self.base_url or self.base_url.startswith(("http://", "https://")),
                "must be empty or start with http:// or https://",
            ),
            (
                "model",
                not self.base_url or bool(self.model),
                "is required when 'base_url' is set (the name the server serves)",
            ),
            ("refresh_after_events", self.refresh_after_events >= 1, "must be at least 1"),
            ("refresh_after_s", self.refresh_after_s > 0, "must be positive"),
            ("max_event_age_s", self.max_event_age_s >= 0, "must not be negative (0: no limit)"),
            ("max_concurrency", 1 <= self.max_concurrency <= 256, "must be between 1 and 256"),
            ("max_pending_users", self.max_pending_users >= 1, "must be at least 1"),
            ("max_tracked_users", self.max_tracked_users >= 1, "must be at least 1"),
            ("timeout_s", self.timeout_s > 0, "must be positive"),
            ("max_retries", 0 <= self.max_retries <= 10, "must be between 0 and 10"),
            ("backoff_s", self.backoff_s >= 0, "must not be negative"),
            ("breaker_failures", self.breaker_failures >= 1, "must be at least 1"),
            ("breaker_reset_s", self.breaker_reset_s > 0, "must be positive"),
            ("history_items", 1 <= self.history_items <= 200, "must be between 1 and 200"),
            ("max_tokens", 16 <= self.max_tokens <= 8192, "must be between 16 and 8192"),
            ("temperature", 0 <= self.temperature <= 2, "must be between 0 and 2"),
        ]
        for key, ok, reason in checks:
            if not ok:
                raise ConfigError(f"[{section}] option '{key}' {reason} (got {getattr(self, key)!r})")

    def api_key(self, environ: Mapping[str, str], section: str = "plugins.summariser") -> str | None:
        """The key from the environment variable named by ``api_key_env`` (keys never sit in config)."""
        if not self.api_key_env:
            return None
        key = environ.get(self.api_key_env)
        if not key:
            raise ConfigError(f"[{section}] option 'api_key_env' names {self.api_key_env}, which is not set or empty")
        return key
