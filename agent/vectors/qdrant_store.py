"""Item vectors in Qdrant, the store of record, through qdrant-client.

Embedded default: qdrant-client's local mode on the agent's data dir. At scale: a Qdrant server
or cluster (``qdrant_url``). The hot path does not query Qdrant for small and medium catalogs;
it scores against an in-memory copy (:mod:`agent.vectors.item_vectors`) loaded from here at start.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from qdrant_client import QdrantClient, models

log = logging.getLogger(__name__)

_ID_NAMESPACE = uuid.UUID("5b1c7c02-6f0e-4c1e-9d51-3f4f2b0d8a11")


def point_id(item_id: str) -> str:
    # Qdrant ids are integers or UUIDs; a name-based UUID keeps item ids of any shape.
    return str(uuid.uuid5(_ID_NAMESPACE, item_id))


class VectorStore:
    def __init__(
        self, collection: str, dim: int, *, path: Path | None = None, url: str = "", api_key: str | None = None
    ) -> None:
        if url:
            self.client = QdrantClient(url=url, api_key=api_key)
            self.where = url
        else:
            assert path is not None
            path.mkdir(parents=True, exist_ok=True)
            try:
                self.client = QdrantClient(path=str(path))
            except RuntimeError as exc:
                # local mode locks its folder: say what to do, for every caller (agent, import, replay)
                if "already accessed by another instance" not in str(exc):
                    raise
                raise RuntimeError(
                    f"the Qdrant store at {path} is in use by another process (a running agent?): stop it, "
                    "or run both against a Qdrant server (--qdrant-url)"
                ) from None
            self.where = str(path)
        self.collection = collection
        self.dim = dim
        self._ensure_collection()

    def _ensure_collection(self) -> None:
        if self.client.collection_exists(self.collection):
            info = self.client.get_collection(self.collection)
            vectors = info.config.params.vectors
            size = vectors.size if isinstance(vectors, models.VectorParams) else None
            if size is not None and size != self.dim:
                raise ValueError(
                    f"Qdrant collection {self.collection} at {self.where} holds {size}-d vectors but the "
                    f"embedding model makes {self.dim}-d ones; use another collection or delete it"
                )
            return
        self.client.create_collection(
            self.collection,
            vectors_config=models.VectorParams(size=self.dim, distance=models.Distance.COSINE),
        )
        log.info("created Qdrant collection %s at %s", self.collection, self.where)

    def upsert(
        self, item_ids: list[str], vectors: np.ndarray, hashes: list[str], payloads: list[dict[str, object]]
    ) -> None:
        if not item_ids:
            return
        points = [
            models.PointStruct(
                id=point_id(item_id),
                vector=vector.tolist(),
                payload={**payload, "item_id": item_id, "content_hash": content_hash},
            )
            for item_id, vector, content_hash, payload in zip(item_ids, vectors, hashes, payloads, strict=True)
        ]
        self.client.upsert(self.collection, points=points, wait=True)

    def delete(self, item_ids: list[str]) -> None:
        if item_ids:
            self.client.delete(
                self.collection, points_selector=models.PointIdsList(points=[point_id(i) for i in item_ids]), wait=True
            )

    def scan(self, batch: int = 2_048) -> Iterator[tuple[str, str, np.ndarray]]:
        """Every stored (item id, content hash, vector)."""
        offset = None
        while True:
            records, offset = self.client.scroll(
                self.collection, limit=batch, offset=offset, with_payload=["item_id", "content_hash"], with_vectors=True
            )
            for record in records:
                payload = record.payload or {}
                vector = record.vector
                if isinstance(vector, list):
                    yield (
                        str(payload.get("item_id")),
                        str(payload.get("content_hash", "")),
                        np.asarray(vector, dtype=np.float32),
                    )
            if offset is None:
                return

    def search(self, vector: np.ndarray, limit: int) -> list[tuple[str, float]]:
        """Nearest items by cosine, for catalogs too large to hold in memory."""
        response = self.client.query_points(
            self.collection, query=vector.tolist(), limit=limit, with_payload=["item_id"]
        )
        return [(str((p.payload or {}).get("item_id")), float(p.score)) for p in response.points]

    def count(self) -> int:
        return int(self.client.count(self.collection, exact=True).count)

    def close(self) -> None:
        self.client.close()
