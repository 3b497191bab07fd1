"""The model's forward pass in numpy, for serving: a version is a set of arrays.

Serving runs on the event loop's thread, inside the batched hot path, so it must not depend on
torch (whose intra-op threads would compete with the hot path, and whose per-call overhead is
several times numpy's at these sizes). The same arithmetic as ``model.py``'s training forward
(a test holds them together): a small SASRec-style encoder whose item input is an item row
(``item_rows``: a learned id embedding plus a projection of the item's text vector).

Batch rule: a query's answer depends on its own rows alone, to the bit. Every array keeps one
query per leading index and every product runs per query in shapes that do not depend on the
batch (numpy's ``matmul`` multiplies each matrix of a stack on its own), so a user gets the
same scores alone as in a batch of 32.
"""

from __future__ import annotations

import numpy as np

from plugins.sequence.options import ModelShape

# an attention score that cannot be chosen: finite, so that a query with no key left (a padding
# row) averages its keys instead of dividing by zero; exp() of it is exactly 0 in float32
MASKED = -1e9
LAYER_NORM_EPS = 1e-5

Params = dict[str, np.ndarray]


def param_names(shape: ModelShape) -> list[str]:
    """Every array of a version, in a fixed order (``ids`` first)."""
    names = ["ids", "text_weight", "text_bias", "position"]
    for block in range(shape.blocks):
        names += [
            f"b{block}.{part}"
            for part in (
                "norm1_weight",
                "norm1_bias",
                "qkv_weight",
                "qkv_bias",
                "out_weight",
                "out_bias",
                "norm2_weight",
                "norm2_bias",
                "ff1_weight",
                "ff1_bias",
                "ff2_weight",
                "ff2_bias",
            )
        ]
    return [*names, "norm_weight", "norm_bias"]


def param_shapes(shape: ModelShape, n_ids: int, text_dim: int) -> dict[str, tuple[int, ...]]:
    d = shape.dim
    shapes: dict[str, tuple[int, ...]] = {
        "ids": (n_ids, d),
        "text_weight": (text_dim, d),
        "text_bias": (d,),
        "position": (shape.max_length, d),
        "norm_weight": (d,),
        "norm_bias": (d,),
    }
    for block in range(shape.blocks):
        for part, dims in (
            ("norm1_weight", (d,)),
            ("norm1_bias", (d,)),
            ("qkv_weight", (d, 3 * d)),
            ("qkv_bias", (3 * d,)),
            ("out_weight", (d, d)),
            ("out_bias", (d,)),
            ("norm2_weight", (d,)),
            ("norm2_bias", (d,)),
            ("ff1_weight", (d, 2 * d)),
            ("ff1_bias", (2 * d,)),
            ("ff2_weight", (2 * d, d)),
            ("ff2_bias", (d,)),
        ):
            shapes[f"b{block}.{part}"] = dims
    return shapes


def text_rows(params: Params, text: np.ndarray) -> np.ndarray:
    """The text part of item rows: (items, text_dim) -> (items, dim)."""
    return text @ params["text_weight"] + params["text_bias"]


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    variance = (centred * centred).mean(axis=-1, keepdims=True)
    return centred / np.sqrt(variance + LAYER_NORM_EPS) * weight + bias


def _softmax(scores: np.ndarray) -> np.ndarray:
    scores = scores - scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores


def encode(params: Params, shape: ModelShape, rows: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The user vectors (queries, dim) for sequences of item rows (queries, max_length, dim),
    padded on the left (``valid`` False), the newest item last. Only the last position's output
    is computed in the last block: it is all that serving reads."""
    queries, length, dim = rows.shape
    heads = shape.heads
    head_dim = dim // heads
    x = (rows + params["position"][-length:]).astype(np.float32, copy=False)
    key_bias = np.where(valid, 0.0, MASKED).astype(np.float32)[:, None, None, :]
    causal = np.triu(np.full((length, length), MASKED, dtype=np.float32), 1)
    scale = np.float32(1.0 / np.sqrt(head_dim))
    for block in range(shape.blocks):
        p = f"b{block}."
        last = block == shape.blocks - 1
        h = layer_norm(x, params[p + "norm1_weight"], params[p + "norm1_bias"])
        weight, bias = params[p + "qkv_weight"], params[p + "qkv_bias"]
        # the last block needs the query of the last position only
        asked = h[:, -1:, :] if last else h
        q = np.matmul(asked, weight[:, :dim]) + bias[:dim]
        kv = np.matmul(h, weight[:, dim:]) + bias[dim:]
        # (queries, heads, positions, head_dim)
        q = q.reshape(queries, -1, heads, head_dim).transpose(0, 2, 1, 3)
        k, v = (
            kv[:, :, i * dim : (i + 1) * dim].reshape(queries, length, heads, head_dim).transpose(0, 2, 1, 3)
            for i in range(2)
        )
        scores = np.matmul(q, k.transpose(0, 1, 3, 2)) * scale + key_bias
        if not last:
            scores = scores + causal
        attended = np.matmul(_softmax(scores), v).transpose(0, 2, 1, 3).reshape(queries, -1, dim)
        residual = x[:, -1:, :] if last else x
        x = residual + np.matmul(attended, params[p + "out_weight"]) + params[p + "out_bias"]
        h = layer_norm(x, params[p + "norm2_weight"], params[p + "norm2_bias"])
        inner = np.maximum(np.matmul(h, params[p + "ff1_weight"]) + params[p + "ff1_bias"], 0.0)
        x = x + np.matmul(inner, params[p + "ff2_weight"]) + params[p + "ff2_bias"]
    return layer_norm(x[:, -1, :], params["norm_weight"], params["norm_bias"])


def score_rows(table: np.ndarray, users: np.ndarray) -> np.ndarray:
    """(queries, items) scores: each user vector against every row of ``table``, one
    matrix-vector product per query (a query's scores do not depend on the batch)."""
    return np.matmul(table, users[:, :, None])[:, :, 0]
