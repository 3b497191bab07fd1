"""Where a profiled replay's time goes, by project module (``recsys-agent replay --profile``)."""

from __future__ import annotations

import cProfile
import io
import pstats
from typing import Any

_FunctionKey = tuple[str, int, str]


def _module(filename: str) -> str | None:
    """The project module a profiled function belongs to (a plugin, the core, the harness), or
    None for library code and C functions."""
    path = filename.replace("\\", "/")
    for package in ("plugins", "agent"):
        marker = f"/{package}/"
        if marker in path and "/site-packages/" not in path:
            module = path.rsplit(marker, 1)[1]
            if package == "agent" and module.startswith("evaluation/"):
                # the replay's own work (loop, scoring, baselines), not the pipeline's
                return f"harness: agent/{module}"
            return f"{package}/{module}"
    return None


def time_by_module(stats: pstats.Stats) -> dict[str, float]:
    """Own time per project module, library time included: the time of a numpy or C function
    is charged to the project functions that called it, in proportion to their calls' time, so
    "argpartition" shows up where it is asked for, in the plugin that sorts."""
    table: dict[_FunctionKey, Any] = stats.stats  # type: ignore[attr-defined]
    memo: dict[_FunctionKey, dict[str, float]] = {}

    def shares(function: _FunctionKey, visiting: set[_FunctionKey]) -> dict[str, float]:
        module = _module(function[0])
        if module is not None:
            return {module: 1.0}
        if function in memo:
            return memo[function]
        callers: dict[_FunctionKey, tuple[int, int, float, float]] = table[function][4]
        weights = {caller: max(entry[3], 1e-12) for caller, entry in callers.items() if caller not in visiting}
        total = sum(weights.values())
        if not weights:
            return {"other (event loop, libraries)": 1.0}
        result: dict[str, float] = {}
        for caller, weight in weights.items():
            for name, share in shares(caller, visiting | {function}).items():
                result[name] = result.get(name, 0.0) + share * weight / total
        memo[function] = result
        return result

    by_module: dict[str, float] = {}
    for function, (_, _, tottime, _, _) in table.items():
        for name, share in shares(function, set()).items():
            by_module[name] = by_module.get(name, 0.0) + tottime * share
    return by_module


def profile_summary(profile: cProfile.Profile, top: int = 25) -> str:
    """Time by project module (library calls charged to their callers), then the functions with
    the most own time."""
    stats = pstats.Stats(profile)
    by_module = time_by_module(stats)
    total = sum(by_module.values()) or 1.0
    lines = ["time by module, numpy and C calls charged to their callers (cProfile slows Python code ~2x):"]
    for name, seconds in sorted(by_module.items(), key=lambda kv: -kv[1]):
        if seconds / total >= 0.005:
            lines.append(f"  {seconds:7.2f} s  {100 * seconds / total:5.1f}%  {name}")
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(top)
    text = out.getvalue()
    start = text.find("   ncalls")
    lines.append(text[start:] if start >= 0 else text)
    return "\n".join(lines)
