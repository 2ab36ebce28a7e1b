"""What a ranking is worth: the permutation null, the bootstrap, split halves and verdicts,
ablation (faithfulness) and the per-class atlas."""

from .bootstrap import bootstrap_summary, bootstrap_values, interval_scheme, layer_stability
from .null import (
    adjusted_value,
    benjamini_hochberg,
    null_summary,
    permutation_null,
    share_significant,
)

__all__ = ["adjusted_value", "benjamini_hochberg", "bootstrap_summary", "bootstrap_values",
           "interval_scheme", "layer_stability", "null_summary", "permutation_null",
           "share_significant"]
