"""The reduce step of one layer over batches of images, outside a forward pass.

:func:`streaming_reduce` takes a callable that yields the same batches of maps on every
call (a spilled layer read back, a generator over stored maps) and returns what
:func:`~pcace.reduce.pca.reduce_block` gives on all the maps at once, in memory that does
not grow with the number of images: ``"moments"`` accumulates each channel's ``P x P``
moments in one pass (:class:`~pcace.reduce.moments.MomentAccumulator`) and projects in a
second; ``"subspace"`` iterates a block subspace (:class:`~pcace.reduce.subspace.
SubspaceIteration`) for layers whose moments do not fit. The pipeline runs the same
classes inside its forward passes (:mod:`pcace.reduce.twopass`).

Numerics
--------
Everything is float64 (float32 batches are widened on arrival). The constant-column
rule and the rank threshold use the machine epsilon of the batches' dtype (the
coarsest seen), as :func:`~pcace.reduce.pca.reduce_block` does with its block's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from itertools import chain
from typing import Literal

import torch

from .basis import PixelBasis
from .moments import PixelMoments
from .pca import Reduction
from .subspace import subspace_basis

__all__ = ["streaming_reduce"]

Batches = Callable[[], Iterable[torch.Tensor]]



def streaming_reduce(batches: Batches, components: int | float = 3, *,
                     max_components: int = 10, budget_bytes: int | None = None,
                     route: Literal["moments", "subspace"] | None = None,
                     device: torch.device | str | None = None,
                     **subspace_options: float) -> tuple[Reduction, PixelBasis]:
    """The reduce step of one layer over batches of images, in memory independent of N.

    Parameters
    ----------
    batches : callable
        ``batches()`` returns an iterable of ``(B, C, H, W)`` (or ``(B, C, P)``) tensors,
        the same images in the same order on each call. Called twice on the moments
        route (accumulate, project), ``passes + 1`` times on the subspace route.
    components, max_components
        As for :func:`~pcace.reduce.pca.principal_components`.
    budget_bytes : int, optional
        Memory budget for :func:`choose_route` (default 1 GiB) when ``route`` is None.
    route : {"moments", "subspace"}, optional
        Force a route.
    device : torch.device or str, optional
        Where the moments and the iteration live (default: the CPU).
    **subspace_options
        ``oversample``, ``tol``, ``max_passes``, ``seed`` for :func:`subspace_basis`.

    Returns
    -------
    (Reduction, PixelBasis)
        The reduction (as :func:`~pcace.reduce.pca.reduce_block` gives it for all the images
        at once) and the basis it came from (route, passes, convergence).

    Examples
    --------
    >>> import torch
    >>> maps = torch.randn(500, 8, 6, 6)
    >>> red, basis = streaming_reduce(lambda: maps.split(128), 3)
    >>> tuple(red.scores.shape), basis.route
    ((8, 500, 3), 'moments')
    """
    it = iter(batches())
    head = next(it, None)
    if head is None:
        raise ValueError("batches() yielded no batch")
    shape = head.shape
    c, p = int(shape[1]), int(math.prod(shape[2:]))
    if route is None:
        from .plan import choose_route

        route = choose_route(c, p, components, max_components=max_components,
                             budget_bytes=2**30 if budget_bytes is None else budget_bytes,
                             batch_size=int(shape[0])).route
    first = chain([head], it)
    if route == "moments":
        acc = PixelMoments(c, p, device=device)
        for batch in first:
            acc.update(batch)
        basis = acc.basis(components, max_components=max_components)
    elif route == "subspace":
        basis = subspace_basis(batches, components, max_components=max_components,
                               device=device, first=first, **subspace_options)  # type: ignore[arg-type]
    else:
        raise ValueError(f"route must be 'moments' or 'subspace'; got {route!r}")
    return basis.finish([basis.project(b) for b in _iterate(batches)]), basis


def _iterate(batches: Batches) -> Iterator[torch.Tensor]:
    yield from batches()
