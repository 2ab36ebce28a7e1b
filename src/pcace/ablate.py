"""The public shortcut to :mod:`pcace.stats.ablate` (their names, under the path users know).

Everything here is defined there; nothing inside pcace imports this module.
"""

from .stats.ablate import (
    BASELINES,
    MODES,
    ablate,
    baseline_importance,
    baseline_rankings,
    faithfulness_summary,
)

__all__ = ["ablate", "baseline_importance", "baseline_rankings", "BASELINES",
           "faithfulness_summary", "MODES"]
