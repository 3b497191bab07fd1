"""A trained version of the model, as this agent serves it.

A ``Version`` is what a round produces and what agents share through NATS: the arrays, the
ids of the items that have an id embedding, and how it was trained. It never changes once made.
A ``Served`` version adds this agent's item table: one row per catalog slot (the item's id
embedding where the version has one, plus the projection of its text vector where the content
plugin has one), kept up to date on the event loop's thread as items and vectors arrive, so an
item is rankable as soon as it is embedded.

Swapping versions is replacing one reference to a ``Served`` (``SequenceSource`` does it); a
batch of queries reads that reference once, so its answers all come from one version.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.pipeline.catalog import grow
from agent.vectors.item_vectors import ItemVectors
from plugins.sequence.forward import Params, param_names, param_shapes, text_rows
from plugins.sequence.options import ModelShape

FORMAT = 1


@dataclass(frozen=True, slots=True, eq=False)
class Version:
    number: int
    shape: ModelShape
    text_dim: int
    item_ids: tuple[str, ...]
    params: Params
    # how it was made: trainer, events, seconds... (JSON-ready)
    info: dict[str, Any] = field(default_factory=dict)
    row_of: dict[str, int] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not self.row_of:
            self.row_of.update({item_id: row for row, item_id in enumerate(self.item_ids)})
        expected = param_shapes(self.shape, len(self.item_ids), self.text_dim)
        for name in param_names(self.shape):
            array = self.params.get(name)
            if array is None or array.shape != expected[name] or array.dtype != np.float32:
                got = "missing" if array is None else f"{array.dtype} {array.shape}"
                raise ValueError(f"sequence model version {self.number}: array {name} is {got}, not {expected[name]}")
            if not np.isfinite(array).all():
                raise ValueError(f"sequence model version {self.number}: array {name} is not finite")

    def to_bytes(self) -> bytes:
        """The version as an ``.npz`` archive: no pickles, so loading one runs no code."""
        header = {
            "format": FORMAT,
            "number": self.number,
            "shape": [self.shape.dim, self.shape.heads, self.shape.blocks, self.shape.max_length],
            "text_dim": self.text_dim,
            "info": self.info,
        }
        out = io.BytesIO()
        np.savez(
            out,
            header=np.array(json.dumps(header)),
            item_ids=np.array(self.item_ids, dtype=str),
            **{f"param:{name}": array for name, array in self.params.items()},
        )
        return out.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Version:
        """Raises ValueError for anything but a version written by ``to_bytes``."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                header = json.loads(str(archive["header"]))
                ids = archive["item_ids"]
                params = {key.partition(":")[2]: archive[key] for key in archive.files if key.startswith("param:")}
            if header.get("format") != FORMAT:
                raise ValueError(f"format {header.get('format')!r}, not {FORMAT}")
            dim, heads, blocks, max_length = (int(value) for value in header["shape"])
            number, text_dim, info = int(header["number"]), int(header["text_dim"]), dict(header.get("info") or {})
        except Exception as exc:
            raise ValueError(f"not a sequence model version: {exc.__class__.__name__}: {exc}") from None
        return cls(
            number=number,
            shape=ModelShape(dim, heads, blocks, max_length),
            text_dim=text_dim,
            item_ids=tuple(str(item_id) for item_id in ids.tolist()) if ids.size else (),
            params=params,
            info=info,
        )


class ItemTable:
    """Item rows by this agent's slots for one version; ``rankable`` says which slots have one.

    Built off the loop's thread (``build``), then kept up to date on it (``refresh``)."""

    def __init__(self, version: Version) -> None:
        self.version = version
        dim = version.shape.dim
        self.rows = np.zeros((1024, dim), dtype=np.float32)
        self.rankable = np.zeros(1024, dtype=bool)
        self.has_text = np.zeros(1024, dtype=bool)
        # the version's id row of each slot, -1 for none
        self.id_row = np.full(1024, -1, dtype=np.int64)
        self.size = 0
        # slots whose text changed since their row was made -> the vector hash they had then
        self.stale: dict[int, str | None] = {}

    def build(self, ids: list[str], slots: np.ndarray, text: np.ndarray) -> None:
        """Rows for the catalog's ``ids`` (by slot), with the text vectors of ``slots``; reads only
        its arguments, so it may run in a worker thread before the table is served."""
        self._grow(len(ids))
        row_of = self.version.row_of
        id_rows = np.fromiter((row_of.get(item_id, -1) for item_id in ids), dtype=np.int64, count=len(ids))
        self.id_row[: len(ids)] = id_rows
        known = np.flatnonzero(id_rows >= 0)
        self.rows[known] = self.version.params["ids"][id_rows[known]]
        self.rankable[known] = True
        if len(slots) and self.version.text_dim == text.shape[1]:
            self._add_text(slots, text)
        self.size = len(ids)

    def refresh(self, ids: list[str], vectors: ItemVectors | None) -> None:
        """Rows for the slots and vectors that arrived since (on the loop's thread): a few array
        operations when nothing did."""
        size = len(ids)
        if size > self.size:
            self._grow(size)
            row_of = self.version.row_of
            for slot in range(self.size, size):
                row = row_of.get(ids[slot], -1)
                self.id_row[slot] = row
                if row >= 0:
                    self.rows[slot] = self.version.params["ids"][row]
                    self.rankable[slot] = True
            self.size = size
        if vectors is None or vectors.dim != self.version.text_dim:
            return
        present = vectors.present(size)
        new = np.flatnonzero(present & ~self.has_text[:size])
        if self.stale:
            new = np.union1d(new, self._restaled(vectors, present))
        if len(new):
            self._add_text(new, vectors.rows(new))

    def _restaled(self, vectors: ItemVectors, present: np.ndarray) -> np.ndarray:
        """The stale slots whose new vector has come (their text part is dropped for it)."""
        hashes = vectors.hashes
        done = [
            slot
            for slot, old in self.stale.items()
            if slot >= len(present) or (present[slot] and hashes.get(slot) != old)
        ]
        for slot in done:
            del self.stale[slot]
        ready = np.array([slot for slot in done if slot < len(present)], dtype=np.int64)
        self._drop_text(ready)
        return ready

    def _add_text(self, slots: np.ndarray, text: np.ndarray) -> None:
        self.rows[slots] += text_rows(self.version.params, np.nan_to_num(text).astype(np.float32))
        self.has_text[slots] = True
        self.rankable[slots] = True

    def _drop_text(self, slots: np.ndarray) -> None:
        """Rows of ``slots`` back to their id part alone (their text changed)."""
        if not len(slots):
            return
        rows = self.id_row[slots]
        self.rows[slots] = np.where(
            (rows >= 0)[:, None], self.version.params["ids"][np.maximum(rows, 0)], np.float32(0.0)
        )
        self.has_text[slots] = False
        self.rankable[slots] = rows >= 0

    def _grow(self, size: int) -> None:
        self.rows = grow(self.rows, size)
        self.rankable = grow(self.rankable, size, fill=False)
        self.has_text = grow(self.has_text, size, fill=False)
        self.id_row = grow(self.id_row, size, fill=-1)


@dataclass(slots=True)
class Served:
    """A version with this agent's item table, servable from ``ready_at`` (pipeline clock)."""

    version: Version
    table: ItemTable
    ready_at: float
