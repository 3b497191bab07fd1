"""The HTTP API described in OpenAPI 3.1, served at ``/openapi.json``.

Built from the settings, so that the limits it states (``k``, message sizes, token lifetimes)
are those of the agent that serves it. The websocket's messages, which OpenAPI has no words
for, are under ``x-websocket`` of ``GET /v1/ws``: what a client sends, what it receives, and the
close codes. ``tests/serving/test_openapi.py`` checks real answers against it.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from agent.config import Settings
from agent.serving.http_api import STATE
from agent.serving.socket_tokens import MAX_TTL_S
from agent.serving.websockets.hub import GOING_AWAY, TOKEN_EXPIRED, TOO_SLOW
from agent.wire.contract import EVENT_TYPES, MAX_ID_LENGTH

Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: Schema, description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> Schema:
    return _json(_ref("Error"), description)


_ID = {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH}
_STRINGS = {"type": "array", "items": {"type": "string"}}
_INTEGERS = {"type": "array", "items": {"type": "integer"}}
_OPEN: list[dict[str, list[str]]] = []
_USER_ID_PARAM = {"name": "user_id", "in": "path", "required": True, "schema": _ID}
_UNAUTHORISED = _error("no API key, or not a valid one (with api_keys set)")
# the text format prometheus_client writes, as its content type names it (without the charset)
_PROMETHEUS = CONTENT_TYPE_LATEST.split("; charset")[0]


def _event_schema(*, user_id_required: bool) -> Schema:
    return {
        "type": "object",
        "required": ["type", "user_id"] if user_id_required else ["type"],
        "properties": {
            "id": {**_ID, "description": "the event's id; a repeat of an applied id is ignored"},
            "type": {"enum": sorted(EVENT_TYPES)},
            "user_id": _ID,
            "item_id": _ID,
            "ts": {
                "description": "when it happened: epoch seconds or RFC 3339 (default: when it is stored)",
                "anyOf": [{"type": "number", "minimum": 0}, {"type": "string", "format": "date-time"}],
            },
            "value": {"type": "number", "description": "a rating ('rate' needs one), a quantity..."},
            "context": {"type": "object"},
        },
    }


def _schemas(settings: Settings) -> dict[str, Schema]:
    return {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
        "Event": _event_schema(user_id_required=True),
        "SocketEvent": {
            **_event_schema(user_id_required=False),
            "description": "an Event on a socket: user_id may be left out; any other than the token's is refused",
        },
        "Item": {
            "type": "object",
            "required": ["id", "title"],
            "properties": {
                "id": _ID,
                "title": {"type": "string", "minLength": 1},
                "text": {"type": "string"},
                "categories": _STRINGS,
                "attributes": {"type": "object"},
                "image_url": {"type": "string"},
            },
        },
        "RecommendedItem": {
            "type": "object",
            "required": ["item_id", "score", "reasons"],
            "properties": {"item_id": _ID, "score": {"type": "number"}, "reasons": _STRINGS},
            "additionalProperties": False,
        },
        "Profile": {
            "type": "object",
            "description": "the user's interest profile, as the summariser last wrote it",
            "properties": {
                "interests": _STRINGS,
                "avoid": _STRINGS,
                "summary": {"type": "string"},
                "source": {"type": "string"},
                "generated_at": {"type": "number"},
                "based_on_events": {"type": "integer"},
            },
        },
        "Recommendations": {
            "type": "object",
            "required": ["user_id", "items", "generated_at"],
            "properties": {
                "user_id": _ID,
                "items": {"type": "array", "items": _ref("RecommendedItem")},
                "generated_at": {"type": "number", "description": "epoch seconds"},
                "event_id": {"type": "string", "description": "the last event this push reflects"},
                "event_ids": {**_STRINGS, "description": "every event this push reflects (pushes coalesce)"},
                "profile": _ref("Profile"),
            },
            "additionalProperties": False,
        },
        "Stored": {
            "type": "object",
            "description": "every event stored, in request order",
            "required": ["accepted", "sequences", "duplicates"],
            "properties": {
                "accepted": {"type": "integer"},
                "sequences": {**_INTEGERS, "description": "each event's sequence in the event stream"},
                "duplicates": {**_INTEGERS, "description": "indexes of events the stream already held"},
            },
            "additionalProperties": False,
        },
        "Refused": {
            "type": "object",
            "description": "events refused: none of the request's was stored",
            "required": ["error", "accepted", "refused"],
            "properties": {
                "error": {"type": "string"},
                "accepted": {"const": 0},
                "refused": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["index", "reason"],
                        "properties": {"index": {"type": "integer"}, "reason": {"type": "string"}},
                    },
                },
            },
            "additionalProperties": False,
        },
        "PartlyStored": {
            "type": "object",
            "description": "the event stream failed part way: exactly which events were stored",
            "required": ["error", "accepted", "stored", "sequences", "duplicates", "not_stored"],
            "properties": {
                "error": {"type": "string"},
                "accepted": {"type": "integer"},
                "stored": _INTEGERS,
                "sequences": _INTEGERS,
                "duplicates": _INTEGERS,
                "not_stored": _INTEGERS,
            },
        },
        "Health": {
            "type": "object",
            "required": ["status", "problems", "uptime_s", "users", "items", "events_applied", "item_vectors"],
            "properties": {
                "status": {"enum": ["ok", "degraded"]},
                "problems": {"type": "object", "description": "plugin name -> what keeps it from working"},
                "nats_url": {"type": "string", "description": "credentials hidden"},
                "uptime_s": {"type": "number"},
                "users": {"type": "integer"},
                "items": {"type": "integer"},
                "events_applied": {"type": "integer"},
                "item_vectors": {"type": "integer"},
            },
        },
        "Ready": {
            "type": "object",
            "required": ["ready", "waiting_for"],
            "properties": {
                "ready": {"type": "boolean"},
                "waiting_for": {
                    "type": "object",
                    "description": "nats, streams, catalog_vectors: what is not ready yet, and why",
                    "additionalProperties": {"type": "string"},
                },
            },
            "additionalProperties": False,
        },
        "TokenRequest": {
            "type": "object",
            "required": ["user_id"],
            "properties": {
                "user_id": _ID,
                "ttl_s": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": MAX_TTL_S,
                    "default": settings.ws_ttl_s,
                    "description": "seconds the token is accepted",
                },
            },
            "additionalProperties": False,
        },
        "Token": {
            "type": "object",
            "required": ["token", "user_id", "expires_at"],
            "properties": {
                "token": {
                    "type": "string",
                    "pattern": r"^v1\.[A-Za-z0-9_-]+\.[0-9]+\.[A-Za-z0-9_-]+$",
                    "description": "v1.<user id, base64url>.<expires, epoch s>.<HMAC-SHA256, base64url>",
                },
                "user_id": _ID,
                "expires_at": {"type": "integer", "description": "epoch seconds"},
            },
            "additionalProperties": False,
        },
        "Items": {
            "type": "object",
            "required": ["items", "total"],
            "properties": {
                "items": {"type": "array", "items": _ref("Item")},
                "total": {"type": "integer", "description": "items that match, of which these are a page"},
            },
            "additionalProperties": False,
        },
        "Forgotten": {
            "type": "object",
            "required": ["forgotten", "user_id", "erased"],
            "properties": {
                "forgotten": {"const": True},
                "user_id": _ID,
                "erased": {
                    "type": "object",
                    "description": "how many stored events and dead letters were erased; state: 1 when state was held",
                    "properties": {
                        "events": {"type": "integer"},
                        "dead_letters": {"type": "integer"},
                        "state": {"type": "integer"},
                    },
                },
            },
        },
        "Export": {
            "type": "object",
            "required": ["user_id", "events", "dead_letters"],
            "properties": {
                "user_id": _ID,
                "events": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["seq", "subject", "stored_at", "event"],
                        "properties": {
                            "seq": {"type": "integer"},
                            "subject": {"type": "string"},
                            "stored_at": {"type": "number"},
                            "event": {},
                        },
                    },
                },
                "dead_letters": {"type": "array", "items": {"type": "object"}},
                "held": {"description": "the state the agent holds for the user"},
            },
        },
        "MergeRequest": {
            "type": "object",
            "required": ["from"],
            "properties": {"from": {**_ID, "description": "the user whose events move to user_id"}},
        },
        "Merged": {
            "type": "object",
            "required": ["merged", "user_id", "from", "events"],
            "properties": {
                "merged": {"const": True},
                "user_id": _ID,
                "from": _ID,
                "events": {"type": "integer", "description": "events moved"},
                "forgotten": {"type": "object"},
            },
        },
    }


def _websocket(settings: Settings) -> Schema:
    return {
        "summary": "A user's websocket: their pushes, and their events",
        "description": (
            "Authenticated by a user token (?token= from browsers, or Authorization: Bearer), not an API key."
            " Refused before the upgrade with 401 (missing, forged or expired token), 403 (an origin not in"
            " ws_allowed_origins) or 503 (ws_max_sockets reached, or no NATS connection). After it, the socket"
            " receives the user's current Recommendations at once, then every push for that user: the"
            f" Recommendations JSON published on {settings.subject_prefix}.recs.<user_token>, unchanged. A slow"
            " client gets the latest push, never a backlog: a newer push replaces an unsent one. Messages"
            " are JSON text frames."
        ),
        "security": [{"userToken": []}, {"userTokenQuery": []}],
        "parameters": [
            {
                "name": "token",
                "in": "query",
                "schema": {"type": "string"},
                "description": "the user token (browsers cannot set headers on a websocket)",
            }
        ],
        "responses": {
            "101": {"description": "switching to the websocket protocol"},
            "400": _error("not an upgrade request"),
            "401": _error("no token, or one that is forged, malformed or expired"),
            "403": _error("a page of an origin that may not open sockets here"),
            "503": _error("the agent holds its most sockets, or has no NATS connection"),
        },
        "x-websocket": {
            "client_messages": {
                "description": (
                    "the user's events: one Event or a JSON array of them, stored as POST /v1/events"
                    f" stores them; at most {settings.ws_max_message_bytes} bytes a message"
                ),
                "schema": {"anyOf": [_ref("SocketEvent"), {"type": "array", "items": _ref("SocketEvent")}]},
            },
            "server_messages": {
                "description": (
                    "a push (Recommendations: has items); the answer to a message of events, which is"
                    " the body POST /v1/events would answer (Stored, Refused or PartlyStored); or an Error"
                    " (a message that is not JSON, a binary frame)"
                ),
                "schema": {
                    "anyOf": [
                        _ref("Recommendations"),
                        _ref("Stored"),
                        _ref("Refused"),
                        _ref("PartlyStored"),
                        _ref("Error"),
                    ]
                },
            },
            "close_codes": {
                str(GOING_AWAY): "the agent is stopping: connect again (to another agent)",
                "1009": f"a message over ws_max_message_bytes ({settings.ws_max_message_bytes})",
                str(TOKEN_EXPIRED): "the token has expired: connect again with a new one",
                str(
                    TOO_SLOW
                ): f"too slow: a message was not taken for ws_send_timeout_s ({settings.ws_send_timeout_s:g} s)",
            },
            "heartbeat_s": settings.ws_heartbeat_s,
        },
    }


def describe(settings: Settings) -> Schema:
    """The OpenAPI document of an agent with these settings."""
    paths: dict[str, Schema] = {
        "/v1/events": {
            "post": {
                "summary": "Store events: one Event or a JSON array of them",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"anyOf": [_ref("Event"), {"type": "array", "items": _ref("Event")}]}
                        }
                    },
                },
                "responses": {
                    "202": _json(_ref("Stored"), "every event stored durably; each will be applied"),
                    "400": _json(
                        {"anyOf": [_ref("Refused"), _ref("Error")]}, "events refused (nothing stored), or bad JSON"
                    ),
                    "401": _UNAUTHORISED,
                    "413": _json({"anyOf": [_ref("Refused"), _ref("Error")]}, "an event or the request is too large"),
                    "503": _json(_ref("PartlyStored"), "the event stream failed: which events were stored"),
                },
            }
        },
        "/v1/users/{user_id}/recommendations": {
            "get": {
                "summary": "A user's recommendations now",
                "parameters": [
                    _USER_ID_PARAM,
                    {
                        "name": "k",
                        "in": "query",
                        "schema": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": settings.max_k,
                            "default": settings.default_k,
                        },
                    },
                    {
                        "name": "category",
                        "in": "query",
                        "schema": _STRINGS,
                        "style": "form",
                        "explode": True,
                        "description": "only items in one of these categories",
                    },
                ],
                "responses": {
                    "200": _json(_ref("Recommendations"), "the list"),
                    "400": _error("a bad k"),
                    "401": _UNAUTHORISED,
                },
            }
        },
        "/v1/users/{user_id}": {
            "delete": {
                "summary": "Forget a user: their stored events, dead letters and state",
                "parameters": [_USER_ID_PARAM],
                "responses": {
                    "200": _json(_ref("Forgotten"), "forgotten"),
                    "400": _error("a bad user id"),
                    "401": _UNAUTHORISED,
                    "503": _error("the streams did not answer: retry"),
                },
            }
        },
        "/v1/users/{user_id}/export": {
            "get": {
                "summary": "Everything stored about a user",
                "parameters": [_USER_ID_PARAM],
                "responses": {
                    "200": _json(_ref("Export"), "the user's data"),
                    "400": _error("a bad user id"),
                    "401": _UNAUTHORISED,
                    "503": _error("the streams did not answer: retry"),
                },
            }
        },
        "/v1/users/{user_id}/merge": {
            "post": {
                "summary": "Move another user's events to this one, then forget the other",
                "parameters": [_USER_ID_PARAM],
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("MergeRequest")}}},
                "responses": {
                    "200": _json(_ref("Merged"), "merged"),
                    "400": _error("a bad request"),
                    "401": _UNAUTHORISED,
                    "503": _error("the streams did not answer: retry"),
                },
            }
        },
        "/v1/tokens": {
            "post": {
                "summary": "Mint a user token for the websocket (an app's backend, with its API key)",
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("TokenRequest")}}},
                "responses": {
                    "200": _json(_ref("Token"), "the token"),
                    "400": _error("a bad request"),
                    "401": _UNAUTHORISED,
                },
            }
        },
        "/v1/ws": {"get": _websocket(settings)},
        "/v1/items": {
            "get": {
                "summary": "Catalog items: by id, or those matching a search",
                "security": [{"apiKey": []}, {"userToken": []}, {"userTokenQuery": []}],
                "parameters": [
                    {"name": "q", "in": "query", "schema": {"type": "string"}, "description": "words all found"},
                    {"name": "category", "in": "query", "schema": {"type": "string"}},
                    {"name": "ids", "in": "query", "schema": {"type": "string"}, "description": "comma-separated"},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                    {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                    {"name": "token", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {
                    "200": _json(_ref("Items"), "a page of items"),
                    "400": _error("a bad limit or offset"),
                    "401": _error("with api_keys set: neither a key nor a valid user token"),
                },
            }
        },
        "/v1/demo/tokens": {
            "post": {
                "summary": "Demo mode only: a token for a demo user (demo-<a-z 0-9>), for the live page",
                "x-demo-only": True,
                "security": _OPEN,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["user_id"],
                                "properties": {"user_id": {"type": "string", "pattern": "^demo-[a-z0-9]{1,24}$"}},
                                "additionalProperties": False,
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json(_ref("Token"), "the token, for an hour"),
                    "400": _error("a bad request"),
                    "403": _error("not a demo user"),
                },
            }
        },
        "/": {
            "get": {
                "summary": "The live page",
                "security": _OPEN,
                "responses": {"200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}},
            }
        },
        "/page/app.js": {
            "get": {
                "summary": "The live page's script",
                "security": _OPEN,
                "responses": {
                    "200": {"description": "JavaScript", "content": {"text/javascript": {"schema": {"type": "string"}}}}
                },
            }
        },
        "/page/page.css": {
            "get": {
                "summary": "The live page's style sheet",
                "security": _OPEN,
                "responses": {"200": {"description": "CSS", "content": {"text/css": {"schema": {"type": "string"}}}}},
            }
        },
        "/healthz": {
            "get": {
                "summary": "Liveness, and what keeps plugins from working",
                "security": _OPEN,
                "responses": {"200": _json(_ref("Health"), "alive (status says ok or degraded)")},
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness: NATS connected, streams present, catalog vectors built",
                "security": _OPEN,
                "responses": {
                    "200": _json(_ref("Ready"), "ready"),
                    "503": _json(_ref("Ready"), "not ready: waiting_for says on what"),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics, the process's included",
                "security": _OPEN,
                "responses": {
                    "200": {
                        "description": "Prometheus text format",
                        "content": {_PROMETHEUS: {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This description",
                "security": _OPEN,
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1")},
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "recsys-agent",
            "version": "1",
            "description": (
                "Real-time recommendations: events in, recommendations out and pushed. With api_keys set, every"
                " route needs 'Authorization: Bearer <key>' but those whose security says otherwise."
            ),
        },
        "security": [{"apiKey": []}],
        "paths": paths,
        "components": {
            "schemas": _schemas(settings),
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer", "description": "one of api_keys (RECSYS_API_KEYS)"},
                "userToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "a user token: v1.<user>.<expires>.<signature> (POST /v1/tokens)",
                },
                "userTokenQuery": {"type": "apiKey", "in": "query", "name": "token"},
            },
        },
    }


def served_description(settings: Settings, served: set[tuple[str, str]]) -> Schema:
    """The description of exactly the routes ``served`` ((method, path) pairs): what this agent
    does not serve (the demo's route outside demo mode) left out, and the routes of plugins,
    which describe nothing, listed as such."""
    document = describe(settings)
    paths: dict[str, Schema] = document["paths"]
    for path in list(paths):
        for method in list(paths[path]):
            if (method, path) not in served:
                del paths[path][method]
        if not paths[path]:
            del paths[path]
    for method, path in sorted(served):
        if method not in paths.get(path, {}):
            paths.setdefault(path, {})[method] = {
                "summary": "a route a plugin added (recsys_http_routes): not described",
                "x-undescribed": True,
                "responses": {"default": {"description": "not described"}},
            }
    return document


def add_routes(app: web.Application) -> None:
    settings = app[STATE].settings
    # made at the first request, once every route (plugins' included) is registered
    made: list[bytes] = []

    async def openapi(request: web.Request) -> web.Response:
        if not made:
            served = {
                (route.method.lower(), route.resource.canonical)
                for route in request.app.router.routes()
                if route.resource is not None and route.method not in ("HEAD", "*")
            }
            made.append(orjson.dumps(served_description(settings, served)))
        return web.Response(body=made[0], content_type="application/json")

    app.router.add_get("/openapi.json", openapi)
