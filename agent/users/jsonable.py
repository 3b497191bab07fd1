"""Turning what plugins keep about a user (numpy arrays, sets, dataclasses) into JSON values, so
that an export shows all of it, whatever its type."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

# how deep an export follows nested containers; deeper parts are shown by their type
MAX_DEPTH = 8


def jsonable(value: Any, depth: int = 0) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if depth >= MAX_DEPTH:
        return f"<{type(value).__name__}>"
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist(), depth + 1)
    if isinstance(value, np.generic):
        return jsonable(value.item(), depth + 1)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name), depth + 1) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(getattr(key, "name", key)): jsonable(inner, depth + 1) for key, inner in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted((jsonable(inner, depth + 1) for inner in value), key=repr)
    if isinstance(value, (list, tuple)) or (hasattr(value, "__iter__") and hasattr(value, "__len__")):
        return [jsonable(inner, depth + 1) for inner in value]
    return repr(value)
