"""The public shortcut to :mod:`pcace.reduce.plan` (their names, under the path users know).

Everything here is defined there; nothing inside pcace imports this module.
"""

from .reduce.plan import (
    MAX_GROUPS,
    STREAMED,
    LayerRoute,
    MemoryPlan,
    RouteChoice,
    choose_route,
    moments_bytes,
    subspace_bytes,
)

__all__ = ["choose_route", "LayerRoute", "MAX_GROUPS", "MemoryPlan", "moments_bytes",
           "RouteChoice", "STREAMED", "subspace_bytes"]
