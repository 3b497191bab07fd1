"""Ease: item-to-item regression (EASE, Steck 2019) refitted on the stream's recent window.

- refits the closed-form regression (``model.py``) from scratch on the window of recent
  positive events, over the ``max_items`` items most users of the window engaged with, at the
  cadence, in the thread and with the versions, forgetting and export of every window-fitted
  source (``agent/pipeline/window_models.py``); ``recsys_ease_model_version`` in ``/metrics``
  names the version served;
- serves ``recsys_candidates_batch`` from each user's current history (the core's
  ``UserState.recent``: no user table here): one sparse-by-dense product for the batch.

Where co-occurrence counts how often two items meet, the regression weighs each item by what
it adds beside the user's other items, so a basket's many popular lines do not drown the one
that says most; on shop baskets it is the strongest single source (README, candidates table).

Needs scipy (the ``ml`` extra); without it the plugin is disabled with a message that says so.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from agent.hooks.specs import hookimpl
from agent.pipeline.values import Candidates, Query
from agent.pipeline.window_models import FitJob, WindowModelSource, answers_of
from agent.vectors.item_vectors import top_allowed
from plugins.ease.model import Version, fit, history_of
from plugins.ease.options import EaseOptions

__all__ = ["EaseOptions", "EaseSource", "Version"]

SOURCE = "ease"
# learned from everyone's choices, said without naming anyone
REASON = "goes with what you chose"


class EaseSource(WindowModelSource[EaseOptions, Version]):
    """Options (``[plugins.ease]``): see ``EaseOptions`` (``options.py``): ``enabled``, the
    cadence (``every_events``, ``first_events``, ``window_events``), ``training``
    (``background`` or ``inline``), ``max_items``, ``regularization`` and ``recency``."""

    plugin_name = "ease"
    options_type = EaseOptions
    requires = ("scipy", "scipy.sparse")

    def fit_version(self, job: FitJob) -> Version:
        return fit(job, self.options)

    @hookimpl
    def recsys_candidates_batch(self, queries: list[Query]) -> list[Candidates | None] | None:
        version = self.served  # read once: one version for the whole batch
        if not self.enabled or version is None or not queries:
            return None
        import scipy.sparse

        histories = [history_of(query.user.recent, version, self.options.recency) for query in queries]
        asked = [i for i, (rows, _) in enumerate(histories) if len(rows)]
        if not asked:
            return [None] * len(queries)
        rows = [histories[i][0] for i in asked]
        users = scipy.sparse.csr_matrix(
            (
                np.concatenate([histories[i][1] for i in asked]),
                np.concatenate(rows),
                np.concatenate([[0], np.cumsum([len(r) for r in rows])]),
            ),
            shape=(len(asked), len(version.modelled)),
        )
        # the batch's scores of every modelled item, in one product
        scores = np.asarray(users @ version.weights, dtype=np.float32)
        # Selected among the modelled items only (a few thousand columns, not the catalog's
        # width); they are in slot order, so ties still go to the lower slot. The selection
        # overwrites what it blocks: fusion's score_of reads the scores as computed.
        found = top_allowed(
            scores.copy(),
            [modelled_mask(version.modelled, queries[i].allowed()) for i in asked],
            np.ones(len(version.modelled), dtype=bool),
            [queries[i].n_candidates for i in asked],
        )
        found = [(version.modelled[columns], values) for columns, values in found]
        return answers_of(len(queries), asked, found, SOURCE, REASON, lambda row: _scorer(version, scores[row]))


def modelled_mask(modelled: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """A query's mask (over catalog slots) read at the ``modelled`` slots (ascending); a slot
    beyond the mask (added to the catalog after the query was made) is not allowed."""
    within = int(np.searchsorted(modelled, len(allowed)))
    mask = np.zeros(len(modelled), dtype=bool)
    mask[:within] = allowed[modelled[:within]]
    return mask


def _scorer(version: Version, scores: np.ndarray) -> Any:
    """Scores of any slots for fusion (NaN: an item the version does not model)."""

    def score_of(wanted: np.ndarray) -> np.ndarray:
        columns = version.columns_of(np.asarray(wanted, dtype=np.int64))
        out = np.full(len(columns), np.nan)
        known = columns >= 0
        out[known] = scores[columns[known]]
        return out

    return score_of
