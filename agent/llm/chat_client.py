"""A small client for OpenAI-compatible chat-completions servers, asking for JSON that fits a schema.

Production runs ``vllm serve MODEL`` on a GPU; llama.cpp's server (``llama_cpp.server`` from
llama-cpp-python) and other OpenAI-compatible servers work as well. They differ in how a JSON
schema is requested, hence the ``dialect``:

- ``openai_json_schema`` (vLLM, OpenAI, llama.cpp's C++ ``llama-server``):
  ``"response_format": {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``
- ``json_object_schema`` (llama-cpp-python's server):
  ``"response_format": {"type": "json_object", "schema": ...}``. That server answers the
  OpenAI form with HTTP 500 (a validation error about ``response_format.type``), which this
  client reports as :class:`LLMRejected` naming the dialect setting.

Every answer is checked: HTTP status, the completion's ``finish_reason`` (``length`` means the
JSON was cut off), that the content parses as JSON, and that it fits the schema (see
:func:`validate_profile`). Anything else is an :class:`LLMError` subclass, never a crash and
never a half-parsed object. Whether an error is worth retrying is on the exception
(``retryable``); the scheduler in ``agent/llm/scheduler.py`` owns retries and the circuit breaker.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any

import aiohttp

log = logging.getLogger(__name__)


class Dialect(str, Enum):
    OPENAI_JSON_SCHEMA = "openai_json_schema"
    JSON_OBJECT_SCHEMA = "json_object_schema"


# Bounds in the schema do double duty: they keep the profile small enough to embed and show,
# and grammar-constrained decoders (vLLM, llama.cpp) enforce them while generating, so a small
# model cannot ramble into max_tokens.
MAX_INTERESTS = 6
MAX_AVOID = 4
MAX_PHRASE_CHARS = 40
MAX_SUMMARY_CHARS = 300

PROFILE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "interests": {
            "type": "array",
            "items": {"type": "string", "minLength": 1, "maxLength": MAX_PHRASE_CHARS},
            "maxItems": MAX_INTERESTS,
        },
        "avoid": {
            "type": "array",
            "items": {"type": "string", "minLength": 1, "maxLength": MAX_PHRASE_CHARS},
            "maxItems": MAX_AVOID,
        },
        "summary": {"type": "string", "minLength": 1, "maxLength": MAX_SUMMARY_CHARS},
    },
    "required": ["interests", "avoid", "summary"],
    "additionalProperties": False,
}


class LLMError(Exception):
    """The LLM gave no usable answer. ``kind`` labels metrics; ``retryable`` guides the scheduler."""

    kind = "error"
    retryable = False


class LLMUnavailable(LLMError):
    """Connection refused or reset, DNS failure, HTTP 5xx, 429: the server may recover."""

    kind = "unavailable"
    retryable = True


class LLMTimeout(LLMUnavailable):
    kind = "timeout"


class LLMRejected(LLMError):
    """The server refused the request itself (4xx, unsupported response_format): a configuration
    problem that a retry cannot fix."""

    kind = "rejected"


class LLMOutputError(LLMError):
    """The server answered, but not with JSON that fits the schema (malformed, truncated, wrong
    shape). At temperature 0 a retry gives the same answer, so it is not retried."""

    kind = "invalid_output"


@dataclass(frozen=True, slots=True)
class Completion:
    data: dict[str, Any]
    prompt_tokens: int | None
    completion_tokens: int | None


def response_format(dialect: Dialect, schema: dict[str, Any], name: str) -> dict[str, Any]:
    if dialect is Dialect.OPENAI_JSON_SCHEMA:
        return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    return {"type": "json_object", "schema": schema}


def _strip_fences(text: str) -> str:
    # Servers without constrained decoding sometimes wrap JSON in a markdown fence.
    text = text.strip()
    if text.startswith("```"):
        text = text.split("\n", 1)[1] if "\n" in text else ""
        if text.rstrip().endswith("```"):
            text = text.rstrip()[:-3]
    return text.strip()


def parse_json_object(content: str) -> dict[str, Any]:
    try:
        # strict=False admits raw tabs and newlines inside strings: llama.cpp's JSON grammar lets a
        # model emit them, and validate_profile cleans every string anyway.
        value = json.loads(_strip_fences(content), strict=False)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise LLMOutputError(f"the answer is not valid JSON ({exc.__class__.__name__}: {str(exc)[:80]})") from None
    if not isinstance(value, dict):
        raise LLMOutputError(f"the answer is JSON {type(value).__name__}, not an object")
    return value


def _clean_phrase(value: Any, limit: int, where: str) -> str:
    if not isinstance(value, str):
        raise LLMOutputError(f"{where} must be a string, got {type(value).__name__}")
    # Collapse whitespace and drop control characters: the text is shown to users and embedded.
    text = " ".join("".join(ch for ch in value if ch.isprintable() or ch.isspace()).split())
    return text[:limit].rstrip()


def _phrases(obj: dict[str, Any], key: str, max_items: int) -> list[str]:
    value = obj.get(key)
    if not isinstance(value, list):
        raise LLMOutputError(f"'{key}' must be a list of strings, got {type(value).__name__}")
    seen: set[str] = set()
    out: list[str] = []
    for position, entry in enumerate(value):
        phrase = _clean_phrase(entry, MAX_PHRASE_CHARS, f"'{key}'[{position}]")
        if phrase and phrase.lower() not in seen:
            seen.add(phrase.lower())
            out.append(phrase)
    return out[:max_items]


def validate_profile(obj: dict[str, Any]) -> dict[str, Any]:
    """Check a decoded answer against :data:`PROFILE_SCHEMA` and return only its known fields.

    Wrong types and missing keys are errors; keys outside the schema are dropped and over-long
    lists or strings are cut to the schema's bounds (servers without constrained decoding do not
    enforce them), so the result always has exactly the schema's shape.
    """
    missing = [key for key in ("interests", "avoid", "summary") if key not in obj]
    if missing:
        raise LLMOutputError(f"the answer lacks {', '.join(repr(m) for m in missing)}")
    interests = _phrases(obj, "interests", MAX_INTERESTS)
    avoid = _phrases(obj, "avoid", MAX_AVOID)
    summary = _clean_phrase(obj["summary"], MAX_SUMMARY_CHARS, "'summary'")
    if not summary and not interests:
        raise LLMOutputError("the answer has neither interests nor a summary")
    return {"interests": interests, "avoid": avoid, "summary": summary}


class ChatClient:
    """One aiohttp session to one server; use as ``async with ChatClient(...) as client``.

    Nothing here logs message contents: the debug log names the model, the dialect and the size
    of what leaves the process.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        dialect: Dialect = Dialect.OPENAI_JSON_SCHEMA,
        api_key: str | None = None,
        timeout_s: float = 10.0,
        max_tokens: int = 256,
        temperature: float = 0.0,
        max_connections: int = 4,
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.models_url = base_url.rstrip("/") + "/models"
        self.model = model
        self.dialect = dialect
        self.timeout_s = timeout_s
        self.max_tokens = max_tokens
        self.temperature = temperature
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ChatClient:
        self._session = aiohttp.ClientSession(
            headers=self._headers,
            connector=aiohttp.TCPConnector(limit=self._max_connections),
            # A call's only timeout (the summariser's timeout_s): ``total`` bounds connecting and
            # reading the whole answer, and surfaces as LLMTimeout in complete_json.
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _require_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("ChatClient used outside 'async with'")
        return self._session

    def request_body(self, messages: list[dict[str, str]], schema: dict[str, Any], schema_name: str) -> dict[str, Any]:
        return {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "stream": False,
            "response_format": response_format(self.dialect, schema, schema_name),
        }

    async def probe(self) -> list[str]:
        """The model ids the server lists at ``/models``; raises LLMUnavailable if unreachable."""
        try:
            async with self._require_session().get(self.models_url) as response:
                if response.status >= 400:
                    raise LLMUnavailable(f"GET /models answered HTTP {response.status}")
                body = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError, RecursionError) as exc:
            raise LLMUnavailable(f"cannot reach the LLM server: {exc.__class__.__name__}") from None
        listed = body.get("data") if isinstance(body, dict) else None
        if not isinstance(listed, list):
            # a server that answers, but not with a model list: start anyway, say why
            raise LLMUnavailable("GET /models did not answer with a model list")
        return [str(m.get("id")) for m in listed if isinstance(m, dict)]

    async def complete_json(
        self, messages: list[dict[str, str]], schema: dict[str, Any], schema_name: str = "profile"
    ) -> Completion:
        """One chat completion constrained to ``schema``; returns the decoded JSON object.

        Shape checks beyond "a JSON object" belong to the caller (see validate_profile).
        """
        body = self.request_body(messages, schema, schema_name)
        payload = json.dumps(body, ensure_ascii=False).encode()
        log.debug(
            "LLM request: model=%s dialect=%s messages=%d bytes=%d",
            self.model,
            self.dialect.value,
            len(messages),
            len(payload),
        )
        started = time.perf_counter()
        try:
            async with self._require_session().post(self.url, data=payload) as response:
                # bytes decoded leniently: a server's bad UTF-8 is bad output, not a crash
                text = (await response.read()).decode("utf-8", errors="replace")
                status = response.status
        except TimeoutError:
            raise LLMTimeout(f"no answer within {self.timeout_s:g} s") from None
        except aiohttp.ClientError as exc:
            raise LLMUnavailable(f"cannot reach the LLM server: {exc.__class__.__name__}: {str(exc)[:120]}") from None
        elapsed = time.perf_counter() - started
        if status >= 400:
            raise self._http_error(status, text)
        try:
            answer = json.loads(text)
            choice = answer["choices"][0]
            content = choice["message"]["content"]
            finish = choice.get("finish_reason")
        except (ValueError, KeyError, IndexError, TypeError, RecursionError):
            raise LLMOutputError("the server's reply is not a chat completion") from None
        if not isinstance(content, str):
            raise LLMOutputError("the completion has no text content")
        if finish == "length":
            raise LLMOutputError(f"the answer was cut off at max_tokens={self.max_tokens} (truncated JSON)")
        data = parse_json_object(content)
        usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else {}
        log.debug("LLM answer: %.3f s, finish=%s, bytes=%d", elapsed, finish, len(content))
        return Completion(
            data=data,
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
        )

    def _http_error(self, status: int, text: str) -> LLMError:
        detail = _error_message(text)
        # llama-cpp-python's server reports request validation errors as HTTP 500, so a 500 that
        # complains about response_format is a dialect mismatch, not an outage.
        if "response_format" in detail:
            other = next(d for d in Dialect if d is not self.dialect)
            return LLMRejected(
                f"HTTP {status}: the server refused response_format for dialect '{self.dialect.value}';"
                f' this server may want dialect = "{other.value}": {detail[:200]}'
            )
        if status == 429 or status >= 500:
            return LLMUnavailable(f"HTTP {status}: {detail[:200]}")
        return LLMRejected(f"HTTP {status}: {detail[:200]}")


def _error_message(text: str) -> str:
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):
        return text.strip()
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict):
        return str(error.get("message", error))
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])
    return str(error)
