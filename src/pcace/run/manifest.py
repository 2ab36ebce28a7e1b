"""The run's manifest: what was run, on what, how, and what it took.

Examples
--------
>>> from pcace.reduce.plan import MemoryPlan
>>> budget_reason(2**31, MemoryPlan(2**31), MemoryPlan(2**31), None)
'memory_budget as given'
"""

from __future__ import annotations

import platform
import time
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..core.budget import size_text
from ..core.version import __version__
from ..reduce.plan import LayerRoute, MemoryPlan

__all__ = ["budget_reason", "route_record", "versions"]


def versions() -> dict[str, str]:
    """The versions of pcace and of what it computes with."""
    import numba
    import scipy

    return {"pcace": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "scipy": scipy.__version__, "pandas": pd.__version__,
            "numba": numba.__version__}


def created() -> str:
    """Now, as the manifest records it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def budget_reason(given: Any, asked: MemoryPlan, used: MemoryPlan,
                  keeps_maps: str | None) -> str:
    """Why the run had the memory budget it had; ``keeps_maps`` names what made the run
    keep every map, if anything did."""
    if not (isinstance(given, str) and given == "auto"):
        return "memory_budget as given"
    if not asked.ceiling:
        return "auto: a quarter of this machine's memory"
    if used.budget == asked.budget:
        return (f"auto: every layer ran within {size_text(asked.budget)} (kept in memory or "
                "streamed in two passes)")
    why = (f"{keeps_maps} keeps every map in memory" if keeps_maps else
           f"within {size_text(asked.budget)} maps would have spilled to disk or taken "
           "extra forward passes")
    return (f"auto: widened from {size_text(asked.budget)} to {size_text(used.budget)} "
            f"(a quarter of this machine's memory): {why}")


def route_record(layer_routes: dict[str, LayerRoute], records: dict[str, dict[str, Any]]
                 ) -> dict[str, dict[str, Any]]:
    """The manifest's per-layer route: the plan's route, reason, passes and bytes, updated by
    what the route object recorded (spilled, where its passes ran, subspace passes ...)."""
    out = {}
    for name, r in layer_routes.items():
        entry: dict[str, Any] = {"route": r.route, "reason": r.reason, "passes": r.passes,
                                 "stats_bytes": r.stats_bytes}
        if r.groups > 1:
            entry["channel_groups"] = r.groups
        got = dict(records.get(name, {}))
        if got.get("route") in ("moments", "subspace") and "passes_on" not in got:
            got["passes_on"] = "this process"
        if got.get("route") == "in-memory":
            got.pop("route")  # the plan's own word stands
        entry.update(got)
        out[name] = entry
    return out
