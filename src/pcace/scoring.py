"""A channel's PCACE value from its principal-component scores: one function for all stages.

The pipeline's observed values, the permutation null and the bootstrap all turn a batch of
problems (components, score) into values through :func:`channel_values`, so the three can
never disagree on what a value is.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .ace import ace
from .validation import score_kind


def _numpy(a: Any) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def abs_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``|Pearson correlation|`` of matching rows of ``a`` and ``b``; 0 where one is constant.

    Examples
    --------
    >>> abs_correlation(np.array([[1.0, 2, 3]]), np.array([[3.0, 2, 1]])).tolist()
    [1.0]
    """
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    den = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    return np.abs(np.where(den > 0, (a * b).sum(-1) / np.where(den > 0, den, 1.0), 0.0))


def channel_values(z: Any, y: Any, score: str = "maximal",
                   ace_options: dict | None = None) -> np.ndarray:
    """PCACE values of a batch of problems.

    Parameters
    ----------
    z : torch.Tensor or numpy.ndarray
        Principal-component scores, ``(B, N, k)``: one problem per row (a channel, or a
        channel under a permutation or resample). A CUDA tensor runs ACE's batched torch
        engine on its device; anything else the compiled CPU engine.
    y : array_like or torch.Tensor
        The score, ``(N,)`` for all problems or ``(B, N)`` one per problem.
    score : {"maximal", "first-component"}
        ``"maximal"``: ACE's maximal correlation, clipped to [0, 1] (PCACE).
        ``"first-component"``: the published scripts' ``|corr(phi_1, theta)|``.
    ace_options : dict, optional
        Keyword arguments for :func:`pcace.ace`.

    Returns
    -------
    numpy.ndarray
        ``(B,)`` float64.

    Examples
    --------
    >>> import torch
    >>> z = torch.randn(4, 100, 3, dtype=torch.float64)
    >>> float(channel_values(z, z[0, :, 0] ** 2)[0].round(2))
    1.0
    """
    score_kind(score)
    options = dict(ace_options or {})
    if len(z) == 0:
        return np.zeros(0)
    if isinstance(z, torch.Tensor) and z.device.type != "cpu":
        r = ace(z.to(torch.float64), torch.as_tensor(y, device=z.device, dtype=torch.float64),
                **options)
    else:
        r = ace(np.asarray(_numpy(z), dtype=np.float64), np.asarray(_numpy(y), np.float64),
                **options)
    if score == "maximal":
        return np.clip(_numpy(r.rho), 0.0, 1.0)
    return abs_correlation(_numpy(r.phi)[..., 0], _numpy(r.theta))
