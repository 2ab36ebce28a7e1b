"""A channel's PCACE value from its principal-component scores: one function for all stages.

The pipeline's observed values, the permutation null and the bootstrap all turn a batch of
problems (components, score) into values through :func:`channel_values`, so the three can
never disagree on what a value is.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..core.validation import score_kind
from .ace import ace


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


def target_values(red: Any, scores: Any, score: str = "maximal",
                  ace_options: dict | None = None, chunk: int | None = None) -> np.ndarray:
    """PCACE values of every channel of a reduction against every column of a score matrix.

    One PCA per channel serves all targets: the (channel, target) problems share the
    channel's components and are solved in batched ACE calls of at most ``chunk`` problems.
    Dead channels get 0 without running ACE.

    Parameters
    ----------
    red : pcace.reduce.pca.Reduction
        ``scores`` ``(C, N, k)`` and ``dead`` ``(C,)`` of a block of channels.
    scores : array_like
        ``(N, T)``: one column per target (``(N,)`` is one target).
    score : {"maximal", "first-component"}
        As for :func:`channel_values`.
    ace_options : dict, optional
        Keyword arguments for :func:`pcace.ace`.
    chunk : int, optional
        Problems per ACE call (default: all at once); ``MemoryPlan.ace_problems(N, k)``.

    Returns
    -------
    numpy.ndarray
        ``(C, T)`` float64.

    Examples
    --------
    >>> import torch
    >>> from pcace.reduce.pca import Reduction
    >>> z = torch.randn(3, 100, 2, dtype=torch.float64)
    >>> red = Reduction(z, torch.full((3,), 2), torch.ones(3), torch.tensor([False, False, True]))
    >>> s = torch.stack([z[0, :, 0] ** 2, z[1, :, 1]], dim=1).numpy()
    >>> v = target_values(red, s)
    >>> v.shape, bool(v[0, 0] > 0.9), bool(v[1, 1] > 0.9), float(v[2].max())
    ((3, 2), True, True, 0.0)
    """
    y = np.asarray(_numpy(scores), dtype=np.float64)
    if y.ndim == 1:
        y = y[:, None]
    z = red.scores
    c, t = z.shape[0], y.shape[1]
    if y.ndim != 2 or y.shape[0] != z.shape[1]:
        raise ValueError(f"scores must have shape (N, T) with N = {z.shape[1]}; got {y.shape}")
    out = np.zeros((c, t), dtype=np.float64)
    live = np.flatnonzero(~_numpy(red.dead).astype(bool))
    total = live.size * t
    step = total if chunk is None else max(1, int(chunk))
    on_device = isinstance(z, torch.Tensor) and z.device.type != "cpu"
    ys = torch.as_tensor(y.T.copy(), device=z.device) if on_device else y.T
    flat = np.empty(total, dtype=np.float64)
    for start in range(0, total, step):
        idx = np.arange(start, min(start + step, total))
        ch, tg = live[idx // t], idx % t
        if on_device:
            xs = z[torch.as_tensor(ch, device=z.device)]
            yb = ys[torch.as_tensor(tg, device=z.device)]
        else:
            xs = z[torch.as_tensor(ch)] if isinstance(z, torch.Tensor) else z[ch]
            yb = ys[tg]
        flat[start:start + idx.size] = channel_values(xs, yb, score, ace_options)
    out[live] = flat.reshape(live.size, t)
    return out
