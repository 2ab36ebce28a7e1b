"""Batches of maps in the layout the reduce step works in: ``(C, B, P)``, bounded copies.

Examples
--------
>>> import torch
>>> x, dtype = as_cbp(torch.zeros(5, 3, 2, 2), torch.device("cpu"))
>>> tuple(x.shape), x.dtype, dtype
((3, 5, 4), torch.float64, torch.float32)
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

__all__ = ["CHUNK_BYTES", "as_cbp", "image_chunks"]

#: Bytes of float64 copy a batch is widened into at once (larger batches go in chunks of
#: images: a batch of 64 maps of 64 x 112 x 112 would otherwise take 411 MiB).
CHUNK_BYTES = 64 * 2**20


def as_cbp(batch: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.dtype]:
    """A ``(B, C, H, W)`` or ``(B, C, P)`` batch as a new ``(C, B, P)`` float64 tensor on
    ``device``, and the batch's own dtype."""
    if not isinstance(batch, torch.Tensor):
        batch = torch.as_tensor(batch)
    if batch.ndim == 4:
        batch = batch.flatten(2)
    if batch.ndim != 3 or batch.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"a batch must be a (B, C, H, W) or (B, C, P) float32 or float64 "
                         f"tensor; got {tuple(batch.shape)} {batch.dtype}")
    out = torch.empty((batch.shape[1], batch.shape[0], batch.shape[2]), dtype=torch.float64,
                      device=device)
    out.copy_(batch.permute(1, 0, 2))
    return out, batch.dtype


def image_chunks(batch: torch.Tensor) -> Iterator[torch.Tensor]:
    """``batch`` ``(B, C, ...)`` in runs of images whose float64 copy fits :data:`CHUNK_BYTES`."""
    if not isinstance(batch, torch.Tensor):
        batch = torch.as_tensor(batch)
    per_image = 8 * max(1, math.prod(batch.shape[1:]))
    rows = max(1, CHUNK_BYTES // per_image)
    if batch.ndim == 0 or batch.shape[0] <= rows:
        yield batch
        return
    yield from batch.split(rows)
