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
from .nulls import NULL_METHODS, null_table
from .pooled import PooledNull, pooled_null, pooled_summary

__all__ = ["NULL_METHODS", "PooledNull", "adjusted_value", "benjamini_hochberg",
           "bootstrap_summary", "bootstrap_values", "interval_scheme", "layer_stability",
           "null_summary", "null_table", "permutation_null", "pooled_null", "pooled_summary",
           "share_significant"]
