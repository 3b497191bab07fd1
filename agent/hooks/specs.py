"""Hook specifications: every stage of the agent a plugin can take part in.

The async rule (one rule, for every hook but the lifespan): an implementation is a plain
function; it may return an awaitable instead of a value, and the agent awaits it under the
stage's budget. Hot-path hooks (validate, enrich, apply, candidates, fuse, rerank) should
return plain values: an awaitable there costs a trip through the event loop on every event.
``recsys_lifespan`` is the one exception: it is an async generator (setup, ``yield``, teardown).

Call modes: each spec declares how it is called (``@spec(CallMode...)``), and the one hook
runner (``agent/hooks/runner.py``) reads that declaration, so no call site chooses a mode:

- ``CallMode.ALL``: every implementation is called; the answers that are not None, in order.
- ``CallMode.FIRST``: implementations in order until one answers (not None): first answer wins.
- ``CallMode.CHAIN``: each implementation sees the previous one's answer in the argument the
  spec names (``chained``); None keeps the value (a chain).

pluggy's ``firstresult`` is never used: the runner calls each implementation itself, so that
each is timed and isolated.

Order: pluggy calls later-registered plugins first; ``tryfirst``/``trylast`` on the
implementation move it. Built-in stages are registered before entry-point plugins, so a
third-party plugin runs before the built-ins unless it says ``trylast``.

Failure: every implementation call is timed and isolated. An exception or a timeout is logged
and counted (``recsys_plugin_failures_total``) and that implementation's answer is skipped; the
event and the agent carry on. Wrappers (``hookwrapper``/``wrapper``) are not supported.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, TypeVar

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


class CallMode(Enum):
    ALL = "all"
    FIRST = "first"
    CHAIN = "chain"


class Budget(Enum):
    STAGE = "stage"  # stage_timeout_ms: the hot path
    CATALOG = "catalog"  # catalog_timeout_s: bulk work off the hot path (embedding a batch)


@dataclass(frozen=True, slots=True)
class CallSpec:
    mode: CallMode
    chained: str | None = None  # CHAIN: the argument threaded through the implementations
    budget: Budget = Budget.STAGE
    # A batch hook: the one-item hook that a plugin may implement instead (called once per
    # item of the batch), and which of the batch's list arguments becomes which of its arguments
    per_item: str | None = None
    aligned: tuple[tuple[str, str], ...] = ()


# hook name -> how it is called; filled by @spec below, read by the hook runner
CALL_SPECS: dict[str, CallSpec] = {}

_F = TypeVar("_F", bound=Callable[..., Any])


def spec(
    mode: CallMode,
    *,
    chained: str | None = None,
    budget: Budget = Budget.STAGE,
    per_item: str | None = None,
    aligned: dict[str, str] | None = None,
) -> Callable[[_F], _F]:
    """Declare a hook specification together with how the agent calls it.

    A batch hook names its one-item form (``per_item``) and maps each of its list arguments,
    aligned item by item, to that form's argument (``aligned``); a plugin implements either.
    """

    def declare(function: _F) -> _F:
        if (mode is CallMode.CHAIN) != (chained is not None):
            raise TypeError(f"{function.__name__}: a chain names its chained argument, and only a chain does")
        if (per_item is None) != (aligned is None):
            raise TypeError(f"{function.__name__}: a batch hook names its one-item form and its aligned arguments")
        CALL_SPECS[function.__name__] = CallSpec(mode, chained, budget, per_item, tuple((aligned or {}).items()))
        return hookspec(function)

    return declare


@spec(CallMode.ALL)
def recsys_lifespan(ctx: AgentContext) -> AsyncIterator[None] | AbstractAsyncContextManager[Any] | None:
    """Hold the plugin's resources while the agent runs: an async generator that sets up,
    yields once, and tears down (an async context manager is accepted too).

    All implementations are entered at start, in call order, after the bus is connected and
    before any message is consumed; they are exited in reverse order at shutdown, after the
    last message has been settled. An exception on entry aborts the start.
    """


@spec(CallMode.ALL, budget=Budget.CATALOG)
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


@spec(CallMode.ALL)
def recsys_validate_event(event: Event, catalog: Catalog) -> str | None:
    """Check an event that is already well-formed under the wire contract.

    All implementations are called. Return None to accept, or a reason: the first reason
    rejects the event, which goes to the dead-letter subject with that reason and is
    acknowledged. Must not change the event or any state.
    """


@spec(CallMode.CHAIN, chained="event")
def recsys_enrich_event(event: Event, catalog: Catalog) -> Event | None:
    """Add information to an accepted event before it is applied (a chain).

    Called in order; each implementation sees the previous one's output. Return a replacement
    Event, or None to leave it unchanged. Runs once per event, after deduplication.
    """


@spec(CallMode.ALL)
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


@spec(
    CallMode.ALL,
    per_item="recsys_apply_event",
    aligned={"events": "event", "users": "user", "slots": "slot", "signals": "signal"},
)
def recsys_apply_events(
    events: list[Event], users: list[UserState], slots: list[int], signals: list[float], catalog: Catalog
) -> None:
    """Learn from a batch of accepted, deduplicated events (the batch form of ``recsys_apply_event``).

    The lists are aligned: ``events[i]`` of ``users[i]`` on item ``slots[i]`` with taste signal
    ``signals[i]``, in stream order. No user appears twice in one batch, and the core has
    appended each event to its user's ``recent`` before the call, so a plugin sees exactly the
    state it would see one event at a time. All implementations are called; a plugin that
    implements only ``recsys_apply_event`` is called once per event. Same rules otherwise:
    acknowledged after every implementation returned; called while rebuilding; no publishing.
    """


@spec(CallMode.ALL, budget=Budget.CATALOG)
def recsys_catalog_upsert(items: list[Item], slots: list[int], changed: list[bool], ts: float) -> Any:
    """A batch of items was added or replaced; ``changed[i]`` is False for an identical resend.

    ``ts`` is when the batch entered the catalog (epoch seconds): the time the catalog stream
    stored its message, so that the rebuild after a restart reports the original time, not
    the time of the restart.

    All implementations are called, in order, before the upsert is acknowledged. Batches let a
    plugin do expensive work (embedding) in bulk; such work may be returned as an awaitable and
    runs under the longer ``catalog_timeout_s`` budget, never on the event hot path.
    """


@spec(CallMode.ALL)
def recsys_catalog_delete(item_id: str, slot: int) -> None:
    """An item left the catalog; it will not be recommended again. All implementations are called."""


@spec(CallMode.ALL)
def recsys_candidates(query: Query) -> Candidates | list[Candidates] | None:
    """Propose items for ``query.user``: one candidate source per implementation (or several).

    All implementations are called. Return about ``query.n_candidates`` items, best first, none
    of them in ``query.exclude``, or None when the source has nothing to say for this user.
    The ``source`` name of the result is how fusion weighs it and how reasons are attributed.
    """


@spec(CallMode.ALL, per_item="recsys_candidates", aligned={"queries": "query"})
def recsys_candidates_batch(queries: list[Query]) -> list[Candidates | list[Candidates] | None] | None:
    """Propose items for every query of a batch (the batch form of ``recsys_candidates``).

    Return one answer per query, aligned with ``queries`` (each what ``recsys_candidates``
    would return), or None for nothing at all. No user appears twice in a batch. Work that does
    not depend on the user (a popularity head, a catalog mask, a matrix) belongs outside the
    per-query loop: that is what the batch is for. All implementations are called; a plugin
    that implements only ``recsys_candidates`` is called once per query.
    """


@spec(CallMode.FIRST)
def recsys_fuse(query: Query, candidates: list[Candidates]) -> list[Scored] | None:
    """Merge the candidate lists of all sources into one ranked list (first answer wins).

    Implementations are called in order until one returns a list; it should hold about
    ``query.n_candidates`` entries, best first, with reasons taken from the sources.
    """


@spec(CallMode.FIRST, per_item="recsys_fuse", aligned={"queries": "query", "candidates": "candidates"})
def recsys_fuse_batch(queries: list[Query], candidates: list[list[Candidates]]) -> list[list[Scored] | None] | None:
    """Fuse the candidate lists of every query of a batch (the batch form of ``recsys_fuse``).

    The first answer wins, per query (first answer wins): implementations are called in order,
    each with the queries that no earlier one answered; return one ranked list (or None) per
    query given. A plugin
    that implements only ``recsys_fuse`` is called once per query.
    """


@spec(CallMode.CHAIN, chained="ranked")
def recsys_rerank(query: Query, ranked: list[Scored]) -> list[Scored] | None:
    """Reorder, filter or rescore the fused list (a chain).

    Called in order; each implementation sees the previous one's output. Return the new list,
    or None to leave it unchanged. The agent keeps the first ``query.k`` entries of the result.
    """


@spec(
    CallMode.CHAIN,
    chained="ranked",
    per_item="recsys_rerank",
    aligned={"queries": "query", "ranked": "ranked"},
)
def recsys_rerank_batch(queries: list[Query], ranked: list[list[Scored]]) -> list[list[Scored] | None] | None:
    """Rerank the fused lists of every query of a batch (the batch form of ``recsys_rerank``; a chain).

    Called in order; each implementation sees the previous one's lists. Return one list per
    query (None keeps that query's list), or None to keep them all. A plugin that implements
    only ``recsys_rerank`` is called once per query.
    """


@spec(CallMode.FIRST)
def recsys_profile(user: UserState) -> dict[str, Any] | None:
    """Return the user's current interest profile for ``Recommendations.profile`` (first answer wins).

    Must answer from memory at once: summarisers refresh profiles on the slow path and this hook
    only reads the latest one.
    """


@spec(CallMode.ALL)
def recsys_publish(recommendations: Recommendations, user_token: str) -> Any:
    """Deliver fresh recommendations that follow one or more events of a user.

    All implementations are called (NATS, websockets, ...); each may return an awaitable.
    ``user_token`` is the subject-safe form of the user id.
    """


@spec(CallMode.ALL)
def recsys_forget_user(user_id: str) -> Any:
    """Erase everything a plugin holds about ``user_id`` (privacy: a user asked to be forgotten).

    All implementations are called, after the core has dropped the user's state. Aggregates
    that cannot be traced back to one user (popularity counts) may stay.
    """


@spec(CallMode.ALL)
def recsys_export_user(user_id: str, catalog: Catalog) -> dict[str, Any] | None:
    """Return what a plugin holds about ``user_id`` outside the user's extras (which the core
    exports itself), as JSON-ready data; None when it holds nothing.

    All implementations are called, for a user's request to see their data: whatever
    ``recsys_forget_user`` would erase should be shown here.
    """


@spec(CallMode.ALL)
def recsys_http_routes() -> list[web.AbstractRouteDef] | None:
    """Return extra aiohttp routes to serve beside the built-in API. All implementations are called."""


@spec(CallMode.ALL)
def recsys_health() -> dict[str, Any] | None:
    """Report what keeps the plugin from doing its work, for ``/healthz``.

    All implementations are called, at every health request, so answer from memory at once.
    Return None when healthy, or a small JSON-ready dict of problems (say
    ``{"vector_writes_pending": 3, "last_error": "..."}``): any answer makes the agent report
    ``"degraded"``, with the answers by plugin. Never put secrets (keys, passwords) in it.
    """
