"""Optional reranking of the top of the list by a sentence-transformers CrossEncoder.

Off unless ``[plugins.cross_encoder] model`` names a model (a local path or a name in the local
cache). The query is the titles of the user's recent positive items; each candidate's item text
is scored against it. A cross-encoder costs tens of milliseconds per list on a CPU, so it runs
in a worker thread under the stage timeout: when it does not answer in time, the fused order
stands. One prediction at a time: a list asked for while one still runs (perhaps for a list
whose stage timed out) keeps its fused order, so abandoned predictions cannot pile up and take
the CPU or the threads other stages use. It earns its cost on a GPU (``device = "cuda"``).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.context import AgentContext
from agent.hooks.specs import hookimpl
from agent.pipeline.values import Query, Scored
from agent.threads import in_daemon_thread
from agent.vectors.embeddings import item_text

DEFAULT_DEPTH = 20
QUERY_ITEMS = 5


@dataclass(frozen=True, slots=True)
class CrossEncoderOptions:
    model: str = ""  # empty: the reranker is off
    depth: int = DEFAULT_DEPTH
    weight: float = 0.5
    device: str = "cpu"

    def problems(self) -> list[tuple[str, str]]:
        return [
            (name, message)
            for name, bad, message in (
                ("weight", not 0 <= self.weight <= 1, "must be in [0, 1]"),
                ("depth", self.depth < 2, "must be at least 2"),
            )
            if bad
        ]


class CrossEncoderReranker:
    """Options: ``model``, ``device`` (default cpu), ``depth`` (items rescored, default 20),
    ``weight`` (share of the cross-encoder score in the final order, default 0.5)."""

    def __init__(self) -> None:
        self.model: Any = None
        self.depth = DEFAULT_DEPTH
        self.weight = 0.5
        # set on the loop's thread, cleared by the prediction's own thread when it ends
        self._predicting = False

    @hookimpl
    async def recsys_lifespan(self, ctx: AgentContext) -> AsyncIterator[None]:
        options = ctx.options("cross_encoder", CrossEncoderOptions)
        self.depth, self.weight = options.depth, options.weight
        if options.model:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from sentence_transformers import CrossEncoder

            # a daemon thread: a stop while the model loads must not wait for it
            self.model = await in_daemon_thread(lambda: CrossEncoder(options.model, device=options.device))
        try:
            yield
        finally:
            self.model = None

    def _user_text(self, query: Query) -> str:
        return "; ".join(query.catalog.title(slot) for slot in query.user.recent_positive(QUERY_ITEMS))

    @hookimpl
    def recsys_rerank(self, query: Query, ranked: list[Scored]) -> Any:
        if self.model is None or len(ranked) < 2 or self._predicting:
            return None
        user_text = self._user_text(query)
        if not user_text:
            return None
        head, tail = ranked[: self.depth], ranked[self.depth :]
        texts = [item_text(item) if (item := query.catalog.item(s.slot)) else "" for s in head]
        return self._rescore(user_text, head, tail, texts)

    async def _rescore(self, user_text: str, head: list[Scored], tail: list[Scored], texts: list[str]) -> list[Scored]:
        model = self.model
        pairs = [(user_text, t) for t in texts]

        def predict() -> Any:
            try:
                return model.predict(pairs)
            finally:
                self._predicting = False

        self._predicting = True
        scores = np.asarray(await in_daemon_thread(predict), dtype=np.float64)
        fused = np.array([s.score for s in head])
        blended = (1 - self.weight) * _unit(fused) + self.weight * _unit(scores)
        order = np.argsort(-blended, kind="stable")
        return [head[i] for i in order] + tail


def _unit(values: np.ndarray) -> np.ndarray:
    spread = values.max() - values.min()
    return (values - values.min()) / spread if spread > 0 else np.zeros(len(values))
