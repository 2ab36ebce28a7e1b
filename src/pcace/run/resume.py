"""A run's per-layer checkpoints as the pipeline uses them: open, restore, save.

With a run directory (``checkpoint_dir``) each finished layer is saved as the run goes
(:mod:`pcace.results.checkpoints`); with ``resume`` the layers an interrupted run with the
same settings finished are taken from there, and only the rest are scored. Without a
directory every method does nothing.

Examples
--------
>>> run = Checkpoints.open(None, False, {"seed": 0})
>>> run.done
{}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..core.voice import action, option
from ..results import checkpoints as files  # through the module: a test may wrap its calls
from ..results.checkpoints import LayerCheckpoint
from ..results.common import RunDirError

__all__ = ["Checkpoints"]


class Checkpoints:
    """A run's per-layer checkpoints in its directory (none when it has no directory).

    Attributes
    ----------
    done : dict
        ``{layer: LayerCheckpoint}`` of the layers an interrupted run finished.
    """

    def __init__(self, root: Path | None, settings: dict, done: dict[str, LayerCheckpoint]):
        self.root, self.settings, self.done = root, settings, done

    @classmethod
    def open(cls, root: str | Path | None, resume: bool, settings: dict) -> Checkpoints:
        """Start (or, with ``resume``, re-open) the checkpoints of a run with ``settings``."""
        if root is None:
            if resume:
                raise ValueError(f"{option('resume')} needs "
                                 f"{option('checkpoint_dir', 'DIR', python='...')} (the "
                                 "interrupted run's directory)")
            return cls(None, settings, {})
        done = files.load_layer_checkpoints(root, settings) if resume else {}
        files.start_checkpoints(root, settings)
        return cls(Path(root), settings, done)

    def scores(self) -> np.ndarray:
        """The score matrix the finished layers were scored on."""
        scores = next(iter(self.done.values())).arrays["scores"]
        return scores if scores.ndim == 2 else scores[:, None]

    def labels(self) -> np.ndarray | None:
        """The images' labels of a per-label run (None otherwise)."""
        return next(iter(self.done.values())).arrays.get("labels")

    def nulls(self, name: str) -> dict | None:
        """The null's records of a finished layer (None when it had no null)."""
        return self.done[name].extra.get("nulls")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The finished layers' ``(C, H, W)``."""
        return {name: tuple(ckpt.extra["shape"]) for name, ckpt in self.done.items()}

    def check_scores(self, scores: np.ndarray, labels: np.ndarray | None = None) -> None:
        """The resumed images must be the interrupted run's, in its order."""
        for name, ckpt in self.done.items():
            same = np.array_equal(ckpt.arrays["scores"], scores) and (
                labels is None or np.array_equal(ckpt.arrays.get("labels"), labels))
            if not same:
                raise RunDirError(f"the images (or their order) differ from those of the "
                                  f"interrupted run: its layer {name!r} was scored on other "
                                  f"scores. Resume with {action('same_data')}, or "
                                  f"{action('start_afresh')}")

    def save(self, name: str, table: pd.DataFrame, stability: dict | None,
             components: dict[Any, torch.Tensor], scores: np.ndarray, shape: tuple[int, ...],
             labels: np.ndarray | None = None, nulls: dict | None = None) -> None:
        """Save a finished layer: all its groups and targets in one file."""
        if self.root is None:
            return
        arrays = {"scores": scores}
        if labels is None:
            arrays["components"] = next(iter(components.values())).numpy()
        else:
            arrays["labels"] = labels
            for i, comp in enumerate(components.values()):
                arrays[f"components_{i}"] = comp.numpy()
        files.save_layer_checkpoint(self.root, name, table, stability=stability, arrays=arrays,
                              extra={"shape": list(shape), "nulls": nulls})

    def restore(self, name: str, labels: list[Any]) -> tuple[pd.DataFrame, dict, dict | None]:
        """A checkpointed layer's table, components (keyed as the run keys them: the layer,
        or ``(layer, label)`` for each group's ``labels``) and stability."""
        ckpt = self.done[name]
        if "components" in ckpt.arrays:
            comps = {name: torch.from_numpy(ckpt.arrays["components"])}
        else:
            comps = {(name, label): torch.from_numpy(ckpt.arrays[f"components_{i}"])
                     for i, label in enumerate(labels)}
        return ckpt.table, comps, ckpt.stability
