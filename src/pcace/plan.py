"""The public shortcut to :mod:`pcace.core.plan` (its names, under the path users know).

Everything here is defined in :mod:`pcace.core.plan`; nothing inside pcace imports this module.
"""

from .core.plan import (
    BYTES_PER_VALUE,
    MAX_GROUPS,
    PREFERRED_BUDGET,
    STREAMED,
    LayerRoute,
    MemoryPlan,
    default_memory_budget,
    resolve_budget,
    subspace_bytes,
)

__all__ = ["BYTES_PER_VALUE", "default_memory_budget", "LayerRoute", "MAX_GROUPS",
           "MemoryPlan", "PREFERRED_BUDGET", "resolve_budget", "STREAMED", "subspace_bytes"]
