"""Scoring a replay: hit rate and NDCG at k with one relevant item, per system."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# the name of the live pipeline's score, beside the baselines'
PIPELINE = "pipeline"


@dataclass(slots=True)
class Score:
    """One system's results: the NDCG of every evaluated event (0 for a miss, so hit = ndcg > 0)."""

    name: str
    ndcg: np.ndarray
    count: int = 0
    hits: int = 0

    @classmethod
    def from_ranks(cls, name: str, ranks: np.ndarray, gains: np.ndarray) -> Score:
        """From the true item's rank at each evaluated event (0: a miss)."""
        clipped = np.where(ranks < len(gains), ranks, 0)
        ndcg = gains[clipped].astype(np.float32)
        return cls(name, ndcg, count=len(ranks), hits=int(np.count_nonzero(ndcg)))

    def add(self, rank: int, gains: np.ndarray) -> None:
        # gains[r] = 1 / log2(r + 1) for r in 1..k, 0 for r = 0 (miss) and r > k.
        gain = gains[rank] if rank < len(gains) else 0.0
        self.ndcg[self.count] = gain
        self.count += 1
        if gain > 0.0:
            self.hits += 1

    def metrics(self, k: int) -> dict[str, float]:
        if self.count == 0:
            return {f"hit_rate@{k}": 0.0, f"ndcg@{k}": 0.0}
        return {f"hit_rate@{k}": self.hits / self.count, f"ndcg@{k}": float(self.ndcg[: self.count].sum() / self.count)}


def gains_table(k: int) -> np.ndarray:
    """Index r (1..k) -> 1 / log2(r + 1); index 0 means a miss and gains nothing."""
    gains = np.zeros(k + 1)
    gains[1:] = 1.0 / np.log2(np.arange(2, k + 2))
    return gains
