"""The public shortcut to :mod:`pcace.stats.atlas` (its names, under the path users know).

Everything here is defined in :mod:`pcace.stats.atlas`; nothing inside pcace imports this module.
"""

from .stats.atlas import (
    class_column,
    class_evidence,
    selectivity,
)

__all__ = ["class_column", "class_evidence", "selectivity"]
