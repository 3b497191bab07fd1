"""Hook specifications: every stage of the agent a plugin can take part in.

The async rule (one rule, for every hook): an implementation is a plain function; it may
return an awaitable instead of a value, and the agent awaits it under the stage's timeout.
Hot-path hooks (validate, enrich, apply, candidates, fuse, rerank) should return plain values:
an awaitable there costs a trip through the event loop on every event. pluggy's
``firstresult`` is never used; where a spec says "first answer wins", the agent calls the
implementations in pluggy's order itself and stops at the first non-None result.

Order: pluggy calls later-registered plugins first; ``tryfirst``/``trylast`` on the
implementation move it. Built-in stages are registered before entry-point plugins, so a
third-party plugin runs before the built-ins unless it says ``trylast``.

Failure: every implementation call is timed and isolated. An exception or a timeout is logged
and counted (``recsys_plugin_failures_total``) and that implementation's answer is skipped; the
event and the agent carry on. Wrappers (``hookwrapper``/``wrapper``) are not supported.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from aiohttp import web

    from agent.context import AgentContext
    from agent.pipeline.catalog import Catalog
    from agent.pipeline.user_state import UserState
    from agent.pipeline.values import Candidates, Query, Scored
    from agent.wire.contract import Event, Item, Recommendations

PROJECT = "recsys_agent"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def recsys_lifespan(ctx: AgentContext) -> AbstractAsyncContextManager[Any] | None:
    """Return an async context manager that holds the plugin's resources while the agent runs.

    All implementations are entered at start, in call order, after the bus is connected and
    before any message is consumed; they are exited in reverse order at shutdown, after the
    last message has been settled. An exception on entry aborts the start.
    """


@hookspec
def recsys_settle() -> Any:
    """Return an awaitable that completes once the background work queued so far is done.

    All implementations are called. Background work is what a plugin does off the hot path
    (embedding new items, loading a model). The live agent never waits on it; batch tools
    (replay, catalog import) and tests do, through ``Pipeline.settle()``.

    The awaitable's result is a short text saying why the plugin cannot do that work (say,
    its model did not load); any other result (None, or whatever a gathered awaitable gives)
    means it can: ``Pipeline.settle()`` returns those texts, and
    a batch tool whose output would be wrong without the work (catalog import) stops on them.
    Report such a failure by returning it, not by raising: an exception or a timeout here is
    only logged and skipped, as in every hook.
    """


@hookspec
def recsys_validate_event(event: Event, catalog: Catalog) -> str | None:
    """Check an event that is already well-formed under the wire contract.

    All implementations are called. Return None to accept, or a reason: the first reason
    rejects the event, which goes to the dead-letter subject with that reason and is
    acknowledged. Must not change the event or any state.
    """


@hookspec
def recsys_enrich_event(event: Event, catalog: Catalog) -> Event | None:
    """Add information to an accepted event before it is applied (a chain).

    Called in order; each implementation sees the previous one's output. Return a replacement
    Event, or None to leave it unchanged. Runs once per event, after deduplication.
    """


@hookspec
def recsys_apply_event(event: Event, user: UserState, slot: int, signal: float, catalog: Catalog) -> None:
    """Learn from one accepted, deduplicated event.

    ``signal`` is the event's taste signal (``agent/signals.py``: positive wants more like the
    item, negative less), computed once by the core and stored with the interaction.

    All implementations are called, after the core has appended the event to ``user.recent``
    and added ``slot`` to ``user.seen``. This is where sources update what they learn online
    (counts, transitions, vectors). The event is acknowledged only after every implementation
    has returned, so state here reflects each event exactly once. Also called while the agent
    rebuilds its state from the stream at start, so it must not publish anything.
    """


@hookspec
def recsys_catalog_upsert(items: list[Item], slots: list[int], changed: list[bool], ts: float) -> Any:
    """A batch of items was added or replaced; ``changed[i]`` is False for an identical resend.

    ``ts`` is when the batch entered the catalog (epoch seconds): the time the catalog stream
    stored its message, so that the rebuild after a restart reports the original time, not
    the time of the restart.

    All implementations are called, in order, before the upsert is acknowledged. Batches let a
    plugin do expensive work (embedding) in bulk; such work may be returned as an awaitable and
    runs under the longer ``catalog_timeout_s`` budget, never on the event hot path.
    """


@hookspec
def recsys_catalog_delete(item_id: str, slot: int) -> None:
    """An item left the catalog; it will not be recommended again. All implementations are called."""


@hookspec
def recsys_candidates(query: Query) -> Candidates | list[Candidates] | None:
    """Propose items for ``query.user``: one candidate source per implementation (or several).

    All implementations are called. Return about ``query.n_candidates`` items, best first, none
    of them in ``query.exclude``, or None when the source has nothing to say for this user.
    The ``source`` name of the result is how fusion weighs it and how reasons are attributed.
    """


@hookspec
def recsys_fuse(query: Query, candidates: list[Candidates]) -> list[Scored] | None:
    """Merge the candidate lists of all sources into one ranked list (first answer wins).

    Implementations are called in order until one returns a list; it should hold about
    ``query.n_candidates`` entries, best first, with reasons taken from the sources.
    """


@hookspec
def recsys_rerank(query: Query, ranked: list[Scored]) -> list[Scored] | None:
    """Reorder, filter or rescore the fused list (a chain).

    Called in order; each implementation sees the previous one's output. Return the new list,
    or None to leave it unchanged. The agent keeps the first ``query.k`` entries of the result.
    """


@hookspec
def recsys_profile(user: UserState) -> dict[str, Any] | None:
    """Return the user's current interest profile for ``Recommendations.profile`` (first answer wins).

    Must answer from memory at once: summarisers refresh profiles on the slow path and this hook
    only reads the latest one.
    """


@hookspec
def recsys_publish(recommendations: Recommendations, user_token: str) -> Any:
    """Deliver fresh recommendations that follow one or more events of a user.

    All implementations are called (NATS, websockets, ...); each may return an awaitable.
    ``user_token`` is the subject-safe form of the user id.
    """


@hookspec
def recsys_forget_user(user_id: str) -> Any:
    """Erase everything a plugin holds about ``user_id`` (privacy: a user asked to be forgotten).

    All implementations are called, after the core has dropped the user's state. Aggregates
    that cannot be traced back to one user (popularity counts) may stay.
    """


@hookspec
def recsys_http_routes() -> list[web.AbstractRouteDef] | None:
    """Return extra aiohttp routes to serve beside the built-in API. All implementations are called."""
