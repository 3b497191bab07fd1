"""Factors: implicit-feedback matrix factorisation (implicit's ALS) learned from the stream.

- refits implicit's ``AlternatingLeastSquares`` from scratch (``model.py``) on the window of
  recent positive events, at the cadence, in the thread and with the versions, forgetting and
  export of every window-fitted source (``agent/pipeline/window_models.py``);
  ``recsys_factors_model_version`` in ``/metrics`` names the version served;
- serves ``recsys_candidates_batch`` by folding each user in from their current history
  (the core's ``UserState.recent``: no user table here) and scoring every item the window
  named in one matrix product for the batch.

Replays train inline: the same versions at the same events on every run (implicit fits with
one thread and a seed per version: deterministic).

Forgetting a user removes their events from the window: the next fit does not learn from
them (the served item factors are an aggregate over all users until then, and hold no
factors of any user).

Without implicit the plugin is disabled with a message that says which extra brings it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from agent.hooks.specs import hookimpl
from agent.pipeline.values import Candidates, Query
from agent.pipeline.window_models import FitJob, WindowModelSource, answers_of
from agent.vectors.item_vectors import top_allowed
from plugins.factors.model import Version, fit, fold_in, history_of
from plugins.factors.options import FactorsOptions

__all__ = ["FactorsOptions", "FactorsSource", "Version"]

SOURCE = "factors"
# says why without naming anyone: the factors are learned from everyone's choices
REASON = "chosen by people whose choices resemble yours"


class FactorsSource(WindowModelSource[FactorsOptions, Version]):
    """Options (``[plugins.factors]``): see ``FactorsOptions`` (``options.py``): ``enabled``,
    the cadence (``every_events``, ``first_events``, ``window_events``), ``training``
    (``background`` or ``inline``), implicit's ``factors``, ``regularization``, ``alpha``,
    ``iterations``, the fold-in's ``recency`` and the ``seed``."""

    plugin_name = "factors"
    options_type = FactorsOptions
    requires = ("implicit", "implicit.als", "threadpoolctl")

    def fit_version(self, job: FitJob) -> Version:
        return fit(job, self.options)

    # -- serving -------------------------------------------------------------------------------

    @hookimpl
    def recsys_candidates_batch(self, queries: list[Query]) -> list[Candidates | None] | None:
        version = self.served  # read once: one version for the whole batch
        if not self.enabled or version is None or not queries:
            return None
        options = self.options
        histories = [
            history_of(query.user.recent, version, options.recency, options.confidence == "count") for query in queries
        ]
        asked = [i for i, (slots, _) in enumerate(histories) if len(slots)]
        if not asked:
            return [None] * len(queries)
        users = fold_in(version, [histories[i] for i in asked], options.regularization, options.alpha)
        user_rows = users.astype(np.float32)
        # one product and one selection for the batch (scores of every item the version knows)
        found = top_allowed(
            user_rows @ version.item_factors.T,
            [queries[i].allowed() for i in asked],
            version.rankable,
            [queries[i].n_candidates for i in asked],
        )
        return answers_of(len(queries), asked, found, SOURCE, REASON, lambda row: _scorer(version, user_rows[row]))


def _scorer(version: Version, user: np.ndarray) -> Any:
    """Scores of any slots for fusion (NaN: an item the version cannot score)."""

    def score_of(wanted: np.ndarray) -> np.ndarray:
        wanted = np.asarray(wanted, dtype=np.int64)
        ok = wanted < version.size
        ok[ok] = version.rankable[wanted[ok]]
        out = np.full(len(wanted), np.nan)
        out[ok] = version.item_factors[wanted[ok]] @ user
        return out

    return score_of
