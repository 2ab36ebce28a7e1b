"""Which images are scored against which targets: one group of all images, or one per label.

A run ranks every channel against its targets over a *group* of images: all of them, or,
with ``per_label``, each label's images on their own (their own standardisation, PCA and
ACE). Each group knows its rows and the columns of the score matrix it is scored on.

Examples
--------
>>> import numpy as np
>>> from pcace.inputs.targets import TargetSet
>>> groups = make_groups(np.array([1, 0, 1]), TargetSet(all_classes=True), True,
...                      own_class=True, n_targets=2)
>>> [(g.label, g.rows.tolist(), g.columns) for g in groups]
[(0, [1], (0,)), (1, [0, 2], (1,))]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..core.validation import scores as check_scores
from ..core.voice import action, option
from ..inputs.categories import Categories, folder_classes
from ..inputs.datasets import ImageFiles
from ..inputs.targets import TargetSet, resolve_targets

__all__ = ["ImageGroup", "check_folder_labels", "check_score_matrix", "describe_target",
           "group_labels",
           "image_labels", "make_groups", "target_set", "targets_setting"]


@dataclass(frozen=True)
class ImageGroup:
    """Images scored together against some targets: all images (``rows`` None), or one
    label's."""

    label: Any
    rows: np.ndarray | None
    columns: tuple[int, ...]

    def scores(self, matrix: np.ndarray) -> np.ndarray:
        """This group's ``(N_g, T_g)`` block of the score matrix."""
        rows = matrix if self.rows is None else matrix[self.rows]
        return rows[:, list(self.columns)]


def target_set(target: Any, categories: Sequence[str] | None, per_label: bool) -> TargetSet:
    """The run's targets; for ``per_label`` without a target, every class logit."""
    if per_label and target is None:
        return TargetSet(all_classes=True, categories=categories)
    return resolve_targets(target, categories)


def describe_target(score_fn: Any) -> Any:
    """A target as the manifest and the checkpoints record it."""
    if hasattr(score_fn, "to_dict"):
        return score_fn.to_dict()
    return {"callable": getattr(score_fn, "__name__", type(score_fn).__name__)}


def targets_setting(spec: Any, targets: TargetSet, per_label: bool) -> Any:
    """What the checkpoints' settings record of the targets."""
    if targets.all_classes:
        return "own class" if per_label and spec is None else "all"
    if len(targets) == 1:
        return describe_target(targets.targets[0])
    return [describe_target(t) for t in targets.targets or []]


def check_folder_labels(images: Any, categories: Sequence[str] | None) -> None:
    """Refuse, before any pass, class folders whose labels are not the model's classes.

    ``per_label`` without a target scores each label's images on the logit of that class
    index. An image folder's labels are its folders' positions (``cat/``, ``dog/``: 0 and
    1), the model's classes only when the folders are all of them in its order. With the
    model's class names (``categories``) the folders are checked by name.

    Examples
    --------
    >>> ds = ImageFiles([])
    >>> ds.classes, ds.class_to_idx = ["cat", "dog"], {"cat": 0, "dog": 1}
    >>> check_folder_labels(ds, ["plane", "car", "bird", "cat", "deer", "dog"])
    Traceback (most recent call last):
    ...
    ValueError: per_label scores each label's images on the logit of its class, but the ...
    """
    ds = images.dataset if isinstance(images, torch.utils.data.DataLoader) else images
    ds = ds.dataset if isinstance(ds, torch.utils.data.Subset) else ds
    if not isinstance(ds, ImageFiles) or not getattr(ds, "class_to_idx", None) or \
            not categories:
        return
    folders = list(ds.classes)
    matched = folder_classes(folders, Categories(tuple(categories), "declared"),
                             len(categories))
    start = ("per_label scores each label's images on the logit of its class, but the "
             f"labels are the positions of the class folders ({', '.join(folders)})")
    if matched.indices is None:
        raise ValueError(f"{start}, and {matched.reason}; name the folders after the classes")
    if not matched.identity:
        raise ValueError(f"{start}, and the model's classes of those folders are "
                         f"{list(matched.indices)}; "
                         f"{action('relabel', indices=list(matched.indices))}")


def image_labels(batches: Any, per_label: bool) -> np.ndarray | None:
    """Every image's label after a pass (``per_label``), else None."""
    if not per_label:
        return None
    labels = getattr(batches, "labels", None)
    if labels is None:
        raise ValueError(f"{option('per_label')} needs labelled images: "
                         f"{action('labelled_images')}")
    return np.asarray(torch.as_tensor(labels).cpu()).reshape(-1)


def make_groups(labels: np.ndarray | None, targets: TargetSet, per_label: bool,
                own_class: bool, n_targets: int | None = None) -> list[ImageGroup]:
    """One group of all images, or one per label (own class: scored on its own logit)."""
    count = len(targets) if n_targets is None else n_targets
    every = tuple(range(count))
    if not per_label:
        return [ImageGroup(None, None, every)]
    assert labels is not None
    groups = []
    for value in pd.unique(labels):
        rows = np.flatnonzero(labels == value)
        label = value.item() if hasattr(value, "item") else value
        if own_class:
            index = int(value)
            if index != value or not 0 <= index < count:
                raise ValueError(f"label {value!r} is not a class index of the model's "
                                 f"{count} outputs; per_label without a target scores "
                                 "each label's images on that class's logit")
            groups.append(ImageGroup(label, rows, (index,)))
        else:
            groups.append(ImageGroup(label, rows, every))
    return sorted(groups, key=lambda g: g.label)


def group_labels(groups: list[ImageGroup], n: int) -> np.ndarray:
    """Every image's label, from the groups (for a checkpoint)."""
    labels = np.empty(n, dtype=np.asarray([g.label for g in groups]).dtype)
    for g in groups:
        labels[g.rows] = g.label
    return labels


def check_score_matrix(scores: np.ndarray, groups: list[ImageGroup], names: list[str]) -> None:
    """Every target's score on every group: enough images, finite, varying."""
    for g in groups:
        block = g.scores(scores)
        for j, column in enumerate(g.columns):
            try:
                check_scores(block[:, j])
            except ValueError as err:
                where = f"target {names[column]!r}" if len(names) > 1 else ""
                if g.label is not None:
                    where += f"{' on ' if where else ''}the images of label {g.label!r}"
                raise ValueError(f"{where}: {err}" if where else str(err)) from None
