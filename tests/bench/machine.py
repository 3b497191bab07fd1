"""What every benchmark prints beside its figures: the machine, and how busy it was."""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path


def cpu_model() -> str:
    """``lscpu``'s model name (``/proc/cpuinfo`` where lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        out = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() == "model name":
            return value.strip()
    return "unknown CPU"


def cores() -> int:
    """The cores this process may run on (what ``nproc`` says), not the host's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def describe() -> str:
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    # the load average shows whether something else shared the cores during the run
    return f"machine: {cpu_model()}, {cores()} cores; load average {load} (1, 5, 15 min)"


def load_average() -> float:
    return os.getloadavg()[0]


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by the nearest-rank rule; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered), max(1, math.ceil(q * len(ordered)))) - 1]
