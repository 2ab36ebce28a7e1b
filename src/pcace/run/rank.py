""":func:`rank`: the public face of the pipeline (its stages are in :mod:`pcace.run.pipeline`).

Every option is declared once, in :class:`pcace.run.config.RankOptions` (default, type,
text, check); :func:`rank` keeps them as keyword arguments, checks them there, and runs
:func:`pcace.run.pipeline.run`. Its docstring's parameter list is built from the same
declarations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..engines.engine import Engine
from ..results.result import PCACEResult
from .config import RankOptions, options_doc
from .pipeline import run

__all__ = ["rank"]


def rank(
    model: torch.nn.Module,
    images: Any,
    target: Any = None,
    layers: Sequence[str] | None = None,
    components: int | float = 3,
    *,
    basis: str = "sample",
    sample_size: int | str = "auto",
    batch_size: int = 64,
    device: str | torch.device = "auto",
    memory_budget: int | str = "auto",
    device_memory_budget: int | str = "auto",
    pca_dtype: torch.dtype = torch.float32,
    score: str = "maximal",
    label: int | None = None,
    per_label: bool = False,
    categories: Sequence[str] | None = None,
    permutations: int = 100,
    null: str = "shared",
    split_half: int = 10,
    bootstrap: int = 0,
    level: float = 0.95,
    interval: str = "half-sample",
    seed: int = 0,
    progress: bool = True,
    spill_dir: str | Path | None = None,
    ace_options: dict | None = None,
    tune_malloc: bool | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    on_step: Callable[[], None] | None = None,
    engine: str | Engine = "local",
    ray_address: str | None = None,
) -> PCACEResult:
    options = {k: v for k, v in locals().items() if k not in ("model", "images")}
    return run(model, images, RankOptions(**options))


_MODEL_AND_IMAGES = [
    ("model", "torch.nn.Module",
     "The trained network. It runs in eval mode, without gradients, on ``device``; its "
     "training flags and device are restored afterwards (:func:`pcace.inputs.hooks."
     "evaluating`)."),
    ("images", "torch.Tensor, Dataset or DataLoader",
     "Preprocessed images (N, C, H, W), or a Dataset whose items are images or (image, "
     "label) pairs, or a DataLoader of those, or a Ray Dataset of image arrays."),
]

rank.__doc__ = f"""Rank every channel of the chosen layers of ``model`` by PCACE.

    Parameters
    ----------
{options_doc(_MODEL_AND_IMAGES)}

    Returns
    -------
    PCACEResult

    Examples
    --------
    >>> import torch, pcace
    >>> from pcace.zoo import mnist_cnn
    >>> model = mnist_cnn()
    >>> images = torch.rand(40, 1, 28, 28)
    >>> res = pcace.rank(model, images, target=3, progress=False)
    >>> sorted(res.channels.columns)[:3]
    ['channel', 'dead', 'explained_variance']
    """
