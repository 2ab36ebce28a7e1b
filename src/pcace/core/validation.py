"""Checks of user input shared by every stage: one place, one wording.

Each check either returns the value in its canonical type or raises ``ValueError`` (or
``TypeError``) with a message that names the argument, what was expected and what came.
"""

from __future__ import annotations

from numbers import Integral, Real
from typing import Any

import numpy as np
import torch

#: What a channel's value can be: PCACE's maximal correlation, or the published scripts'
#: ``|corr(phi_1, theta)|`` (for comparison only).
SCORES = ("maximal", "first-component")

#: ACE needs at least this many observations (images).
MIN_OBSERVATIONS = 10


def integer(value: Any, name: str, minimum: int | None = 1) -> int:
    """``value`` as an int, refusing bools, floats and values below ``minimum``.

    Examples
    --------
    >>> integer(3, "permutations")
    3
    >>> integer(-1, "seed", minimum=None)
    -1
    """
    if isinstance(value, bool) or not isinstance(value, Integral):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name} must be an int{bound}; got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
    return int(value)


def fraction(value: Any, name: str) -> float:
    """A number strictly between 0 and 1 (a level, an alpha).

    Examples
    --------
    >>> fraction(0.95, "level")
    0.95
    """
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be a number in (0, 1); got {value!r}")
    return float(value)


def components(value: Any, max_components: Any = 1) -> tuple[int, float | None]:
    """``k`` components (an int >= 1) or a variance fraction in (0, 1).

    Returns ``(k, None)`` for an int, ``(max_components, fraction)`` for a fraction.

    Examples
    --------
    >>> components(3)
    (3, None)
    >>> components(0.9, 50)
    (50, 0.9)
    """
    integer(max_components, "max_components")
    if isinstance(value, bool):
        raise ValueError(f"components must be an int >= 1 or a float in (0, 1); got {value!r}")
    if isinstance(value, Integral):
        if value < 1:
            raise ValueError(f"components must be >= 1 when an int; got {value}")
        return int(value), None
    if isinstance(value, Real):
        share = float(value)
        if not 0.0 < share < 1.0:
            raise ValueError(f"components as a float is a variance fraction in (0, 1); got "
                             f"{share}. For a fixed number of components pass an int")
        return int(max_components), share
    raise ValueError(f"components must be an int >= 1 or a float in (0, 1); "
                     f"got {type(value).__name__} {value!r}")


def score_kind(score: Any) -> str:
    """One of :data:`SCORES`."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}; got {score!r}")
    return score


def float64_array(a: Any, name: str) -> np.ndarray:
    """``a`` (array-like or tensor on any device) as a float64 NumPy array."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    try:
        return np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a numeric array: {err}") from None


def scores(values: Any, n: int | None = None) -> np.ndarray:
    """The score per image: finite, varying, at least :data:`MIN_OBSERVATIONS` of them.

    Examples
    --------
    >>> scores(np.arange(12.0)).shape
    (12,)
    """
    y = float64_array(values, "scores")
    if y.ndim != 1 or (n is not None and y.shape[0] != n):
        want = f"({n},)" if n is not None else "(N,)"
        raise ValueError(f"scores must have shape {want}, one per image; got {y.shape}")
    if y.size < MIN_OBSERVATIONS:
        raise ValueError(f"PCACE needs at least {MIN_OBSERVATIONS} images; got {y.size}. "
                         "Pass more images (a few hundred is typical)")
    bad = np.flatnonzero(~np.isfinite(y))
    if bad.size:
        raise ValueError(f"the score is NaN or inf for image(s) {bad[:10].tolist()}"
                         f"{' and more' if bad.size > 10 else ''} (positions in the input "
                         "order); check the target and those images")
    if np.ptp(y) <= 1e-12 * max(1.0, float(np.abs(y).max())):
        raise ValueError(f"the score is constant (does not vary) across the {y.size} images (all "
                         f"{y[0]:.6g}); choose another target or images on which the output "
                         "changes")
    return y


def maps(values: Any, min_images: int = 2) -> torch.Tensor:
    """Activation maps ``(N, C, H, W)`` or ``(N, C, P)``, returned as ``(N, C, P)``.

    Examples
    --------
    >>> tuple(maps(torch.zeros(4, 2, 3, 3)).shape)
    (4, 2, 9)
    """
    if not isinstance(values, torch.Tensor):
        try:
            values = torch.as_tensor(np.asarray(values))
        except (TypeError, ValueError) as err:
            raise ValueError(f"maps must be a tensor (N, C, H, W) or (N, C, P): {err}") from None
    if values.ndim == 4:
        values = values.flatten(2)
    if values.ndim != 3:
        raise ValueError(f"maps must have shape (N, C, H, W) or (N, C, P); got "
                         f"{tuple(values.shape)}. For a single channel use maps[:, None]")
    if values.is_complex() or values.dtype == torch.bool:
        raise ValueError(f"maps must be real-valued; got dtype {values.dtype}")
    n, c, p = values.shape
    if n < min_images:
        raise ValueError(f"maps needs at least {min_images} images (first axis); got {n}")
    if c < 1 or p < 1:
        raise ValueError(f"maps has no channels or no pixels: shape {tuple(values.shape)}")
    return values


def byte_count(value: Any, name: str) -> int:
    """A number of bytes >= 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"{name} must be a number of bytes >= 0 or 'auto'; got {value!r}")
    return int(value)


def device(value: str | torch.device) -> torch.device:
    """``"auto"`` (CUDA when available, else the CPU), or a device that exists here.

    Examples
    --------
    >>> device("cpu")
    device(type='cpu')
    """
    if isinstance(value, torch.device):
        dev = value
    elif value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(value)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"unknown device {value!r}: {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(value)!r} requested but CUDA is not available; "
                         "use 'cpu' or 'auto'")
    return dev
