"""Checks and defaults the statistics modules share (arrays in, arrays out)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..core.validation import float64_array
from ..reduce.plan import MemoryPlan

#: The working memory the statistics use when no plan is given (as ``pcace.rank`` with a
#: 2 GiB budget would give them).
DEFAULT_PLAN = MemoryPlan(2 * 2**30)


def check_observed_matrix(observed: Any, matrix: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    obs = float64_array(observed, "observed")
    mat = float64_array(matrix, what)
    if obs.ndim != 1:
        raise ValueError(f"observed must have shape (C,); got {obs.shape}")
    if mat.ndim != 2 or mat.shape[0] != obs.shape[0]:
        raise ValueError(f"{what} must have shape (C, B) = ({obs.shape[0]}, B); got {mat.shape}")
    if mat.shape[1] < 1:
        raise ValueError(f"{what} has no replicates (B = 0)")
    if obs.shape[0] < 1:
        raise ValueError("observed is empty: pass at least one channel")
    if not np.all(np.isfinite(obs)):
        raise ValueError("observed holds NaN or inf")
    if not np.all(np.isfinite(mat)):
        raise ValueError(f"{what} holds NaN or inf")
    return obs, mat


def channel_ids(channels: Sequence[int] | None, c: int) -> np.ndarray:
    if channels is None:
        return np.arange(c)
    ids = np.asarray(channels)
    if ids.shape != (c,):
        raise ValueError(f"channels must name one id per channel ({c}); got shape {ids.shape}")
    return ids


