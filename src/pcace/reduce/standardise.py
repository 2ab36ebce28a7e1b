"""Standardise the pixel columns of a stack of channels in place, in two memory passes.

The reduce step works on ``(C, N, P)`` blocks (channels x images x pixels). Torch's
reductions over the middle axis plus the subtract/scale passes read the block about six
times; this compiled kernel reads it once for the column statistics (accumulated in
float64 whatever the block's dtype) and once more to write the standardised values,
parallel over channels on pcace's own threads.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

from ..core.threads import parallel_ranges


def _standardise(x: np.ndarray, constant_ulps: float, eps: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    c, _, p = x.shape
    constant = np.zeros((c, p), np.bool_)
    finite = np.ones(c, np.bool_)
    parallel_ranges(_standardise_range, c, x, float(constant_ulps), float(eps), constant,
                    finite)
    return constant, finite


@njit(nogil=True, cache=True)
def _standardise_range(lo, hi, x, constant_ulps, eps, constant, finite):  # pragma: no cover
    _, n, p = x.shape
    for ci in range(lo, hi):
        shift = x[ci, 0].astype(np.float64)
        s1 = np.zeros(p)
        s2 = np.zeros(p)
        lo = shift.copy()
        hi = shift.copy()
        for i in range(1, n):
            row = x[ci, i]
            for j in range(p):
                v = np.float64(row[j])
                d = v - shift[j]
                s1[j] += d
                s2[j] += d * d
                if v < lo[j]:
                    lo[j] = v
                if v > hi[j]:
                    hi[j] = v
        mean = np.empty(p)
        inv = np.empty(p)
        if not np.isfinite(s1.sum() + s2.sum()):
            finite[ci] = False
            continue  # left as it was, so the caller can say which images are bad
        for j in range(p):
            m = s1[j] / n
            var = max(s2[j] / n - m * m, 0.0)
            mean[j] = shift[j] + m
            std = np.sqrt(var)
            scale = max(abs(lo[j]), abs(hi[j]))
            if hi[j] <= lo[j] or std <= constant_ulps * eps * scale:
                constant[ci, j] = True
                inv[j] = 0.0
            else:
                inv[j] = 1.0 / std
        for i in range(n):
            row = x[ci, i]
            for j in range(p):
                row[j] = (np.float64(row[j]) - mean[j]) * inv[j]


class NonFiniteMaps(ValueError):
    """Activations hold NaN or inf; ``channels`` are their indices within the block."""

    def __init__(self, channels: list[int]):
        self.channels = channels
        super().__init__(f"maps holds NaN or inf in channel(s) {channels[:10]}; "
                         "check the layer's activations")


def standardise_(block: torch.Tensor, constant_ulps: float) -> torch.Tensor:
    """Standardise each ``block[c, :, j]`` column over the images, in place.

    Mean 0 and population variance 1; a constant column (max == min, or standard deviation
    below ``constant_ulps * eps(dtype) * max|column|``) becomes 0.

    Parameters
    ----------
    block : torch.Tensor
        ``(C, N, P)`` float32 or float64, C-contiguous, on the CPU. Overwritten.
    constant_ulps : float
        The constant-column threshold in ulps of the column's magnitude.

    Returns
    -------
    torch.Tensor
        ``(C, P)`` bool: which columns were constant.

    Raises
    ------
    NonFiniteMaps
        A channel holds NaN or inf (named by its index in the block); such channels are
        left unchanged.

    Examples
    --------
    >>> import torch
    >>> x = torch.tensor([[[1.0, 5.0], [3.0, 5.0]]])
    >>> standardise_(x, 8.0).tolist(), x.tolist()
    ([[False, True]], [[[-1.0, 0.0], [1.0, 0.0]]])
    """
    if block.device.type != "cpu" or not block.is_contiguous() or block.ndim != 3:
        raise ValueError("standardise_ needs a C-contiguous (C, N, P) CPU tensor")
    arr = block.numpy()
    constant, finite = _standardise(arr, float(constant_ulps),
                                    float(np.finfo(arr.dtype).eps))
    if not finite.all():
        raise NonFiniteMaps(np.flatnonzero(~finite).tolist())
    return torch.from_numpy(constant)
