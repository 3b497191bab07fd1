"""The next-item model in torch, for training (in the worker process) only.

A SASRec-style encoder (pre-norm self-attention blocks over the user's latest items, causal)
whose item input is an item row: a learned id embedding plus a linear projection of the item's
text vector (the bundled MiniLM's). The same rows are the output embeddings a user vector is
scored against, so an item that no event has named yet is scored from its text alone.

The parameters are the arrays of ``forward.param_names``, laid out as the numpy forward reads
them (``x @ weight``), so a version moves between the two without transposes.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from plugins.sequence.forward import LAYER_NORM_EPS, MASKED, Params, param_names, param_shapes
from plugins.sequence.options import ModelShape

INIT_STD = 0.02


class NextItemModel(nn.Module):
    def __init__(self, shape: ModelShape, n_ids: int, text_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.shape = shape
        self.n_ids = n_ids
        self.text_dim = text_dim
        self.dropout = dropout
        self.weights = nn.ParameterDict()
        for name, dims in param_shapes(shape, n_ids, text_dim).items():
            # ParameterDict keys may not contain dots
            self.weights[_key(name)] = nn.Parameter(_initial(name, dims))

    def param(self, name: str) -> torch.Tensor:
        return self.weights[_key(name)]

    def item_rows(
        self, items: torch.Tensor, use_id: torch.Tensor, text: torch.Tensor, has_text: torch.Tensor
    ) -> torch.Tensor:
        """Rows of ``items`` (indices, id rows where ``use_id``), from their text vectors."""
        ids = functional.embedding(items.clamp(max=self.n_ids - 1), self.param("ids")) * use_id[:, None]
        words = (text @ self.param("text_weight") + self.param("text_bias")) * has_text[:, None]
        return ids + words

    def encode(self, rows: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Every position's output (batch, length, dim) for left-padded sequences of item rows."""
        batch, length, dim = rows.shape
        heads = self.shape.heads
        head_dim = dim // heads
        drop = self.dropout if self.training else 0.0
        x = functional.dropout(rows + self.param("position")[-length:], drop, self.training)
        key_bias = torch.where(valid, 0.0, MASKED)[:, None, None, :]
        causal = torch.triu(torch.full((length, length), MASKED), 1)
        for block in range(self.shape.blocks):
            p = f"b{block}."
            h = self._norm(x, p + "norm1")
            qkv = h @ self.param(p + "qkv_weight") + self.param(p + "qkv_bias")
            q, k, v = (
                qkv[:, :, i * dim : (i + 1) * dim].reshape(batch, length, heads, head_dim).transpose(1, 2)
                for i in range(3)
            )
            scores = q @ k.transpose(2, 3) / math.sqrt(head_dim) + key_bias + causal
            attended = (functional.dropout(scores.softmax(-1), drop, self.training) @ v).transpose(1, 2)
            out = attended.reshape(batch, length, dim) @ self.param(p + "out_weight") + self.param(p + "out_bias")
            x = x + functional.dropout(out, drop, self.training)
            h = self._norm(x, p + "norm2")
            inner = functional.relu(h @ self.param(p + "ff1_weight") + self.param(p + "ff1_bias"))
            inner = functional.dropout(inner, drop, self.training)
            out = inner @ self.param(p + "ff2_weight") + self.param(p + "ff2_bias")
            x = x + functional.dropout(out, drop, self.training)
        return self._norm(x, "norm")

    def _norm(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        weight, bias = self.param(prefix + "_weight"), self.param(prefix + "_bias")
        return functional.layer_norm(x, (x.shape[-1],), weight, bias, LAYER_NORM_EPS)

    def to_numpy(self) -> Params:
        return {
            name: self.param(name).detach().numpy().astype(np.float32, copy=True) for name in param_names(self.shape)
        }

    def load_numpy(self, params: Params, id_rows: np.ndarray | None = None) -> None:
        """Take ``params`` (a previous version's arrays): every array of the same shape, and of the
        id embeddings the rows that ``id_rows`` maps (new row -> previous row, -1: a new item)."""
        with torch.no_grad():
            for name in param_names(self.shape):
                if name not in params:
                    continue
                source = torch.from_numpy(np.asarray(params[name], dtype=np.float32))
                target = self.param(name)
                if name == "ids" and id_rows is not None:
                    known = np.flatnonzero(id_rows >= 0)
                    previous = id_rows[known]
                    inside = previous < len(source)
                    target[torch.from_numpy(known[inside])] = source[torch.from_numpy(previous[inside])]
                elif tuple(source.shape) == tuple(target.shape):
                    target.copy_(source)


def _key(name: str) -> str:
    return name.replace(".", "__")


def _initial(name: str, dims: tuple[int, ...]) -> torch.Tensor:
    part = name.rpartition(".")[2]
    if part.startswith("norm") and part.endswith("weight"):
        return torch.ones(dims)
    if part.endswith("bias"):
        return torch.zeros(dims)
    return torch.randn(dims) * INIT_STD
