"""Images from a Ray Dataset: in order, in batches, from any range of rows.

A ``ray.data.Dataset`` whose rows hold an image array (``(C, H, W)``, float) in one
column (and optionally a label in another) can be ranked like a tensor or a torch
Dataset: :func:`pcace.inputs.data.as_batches` reads it in the driver, and on a Ray engine the
workers of the two-pass route each read their own rows (:class:`RayImages` travels to
them, the data stays where Ray keeps it). pcace reads the dataset in its row order: it
turns on ``preserve_order`` in the dataset's own execution context, as both passes must
see the same images in the same order. Ray Data needs ``pyarrow``
(``pip install "pcace[ray]"`` brings both).

Examples
--------
>>> import numpy as np, ray  # doctest: +SKIP
>>> ds = ray.data.from_numpy(np.random.rand(100, 3, 32, 32).astype(np.float32))  # doctest: +SKIP
>>> res = pcace.rank(model, ds, target=3, engine="ray")  # doctest: +SKIP
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

__all__ = ["RayBatches", "RayImages", "is_ray_dataset"]

#: Datasets already executed into blocks (keyed weakly: they go when the dataset goes).
_SEEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def is_ray_dataset(obj: Any) -> bool:
    """Whether ``obj`` is a ``ray.data.Dataset`` (without importing Ray when it is not)."""
    return any(c.__module__.startswith("ray.data") and c.__name__ == "Dataset"
               for c in type(obj).__mro__)


class RayImages:
    """A Ray Dataset read as pcace reads images: ordered batches of one column.

    The dataset is executed once, in the driver, into blocks in Ray's object store
    (``Dataset.to_numpy_refs``, in row order); afterwards any range of rows is read from
    those blocks, in the driver or in a worker, without running Ray Data again (a worker
    that holds a CPU slot never waits for Ray Data tasks to get one).

    Parameters
    ----------
    dataset : ray.data.Dataset
        Rows with an image array ``(C, H, W)`` in ``column``.
    column : str, optional
        The images' column: default ``"image"`` when there is one, else the only column
        (``ray.data.from_numpy`` names it ``"data"``), else the first that is not
        ``label_column``.
    label_column : str, optional
        A column of labels, yielded with the images (default ``"label"`` when there is one).

    Examples
    --------
    >>> images = RayImages(ds)  # doctest: +SKIP
    >>> len(images), images.column  # doctest: +SKIP
    (100, 'data')
    """

    def __init__(self, dataset: Any, column: str | None = None,
                 label_column: str | None = None):
        import ray

        columns = list(dataset.columns() or [])
        if label_column is None and "label" in columns:
            label_column = "label"
        if column is None:
            rest = [c for c in columns if c != label_column]
            column = "image" if "image" in columns else (rest[0] if rest else None)
        if column not in columns:
            raise ValueError(f"the Ray Dataset has no image column {column!r}; its columns: "
                             f"{columns}")
        if label_column is not None and label_column not in columns:
            raise ValueError(f"the Ray Dataset has no label column {label_column!r}; its "
                             f"columns: {columns}")
        dataset.context.execution_options.preserve_order = True  # this dataset's own context
        self.column, self.label_column = column, label_column
        self.blocks = dataset.to_numpy_refs()  # one dict of columns per block, in row order
        sizes = ray.get([_row_task().remote(b, column) for b in self.blocks])
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.n = int(self.starts[-1])
        if self.n == 0:
            raise ValueError("no images: the Ray Dataset is empty")

    @classmethod
    def of(cls, dataset: Any) -> RayImages:
        """The images of ``dataset``, executed once however often pcace asks for them."""
        try:
            cached = _SEEN.get(dataset)
        except TypeError:  # not weakly referenceable
            return cls(dataset)
        if cached is None:
            cached = _SEEN[dataset] = cls(dataset)
        return cached

    def __len__(self) -> int:
        return self.n

    def batches(self, lo: int = 0, hi: int | None = None, batch_size: int = 64
                ) -> Iterator[Any]:
        """Batches of rows ``lo .. hi - 1``: ``(B, C, H, W)`` tensors, or (images, labels)."""
        import ray

        hi = self.n if hi is None else min(int(hi), self.n)
        lo, size = int(lo), int(batch_size)
        first = int(np.searchsorted(self.starts, lo, side="right")) - 1
        pending: list[tuple[np.ndarray, np.ndarray | None]] = []
        held = 0
        for b in range(max(first, 0), len(self.blocks)):
            start, stop = int(self.starts[b]), int(self.starts[b + 1])
            if start >= hi:
                break
            block = ray.get(self.blocks[b])
            a, z = max(lo, start) - start, min(hi, stop) - start
            images = np.asarray(block[self.column])[a:z]
            labels = None if self.label_column is None else \
                np.asarray(block[self.label_column])[a:z]
            pending.append((images, labels))
            held += len(images)
            while held >= size:
                batch, pending, held = _take(pending, size)
                yield self._batch(*batch)
        if held:
            batch, pending, held = _take(pending, held)
            yield self._batch(*batch)

    def _batch(self, images: np.ndarray, labels: np.ndarray | None) -> Any:
        x = torch.from_numpy(np.array(images))  # a writable copy, in the stored dtype
        if x.ndim != 4:
            raise ValueError(f"column {self.column!r} must hold (C, H, W) arrays; a batch "
                             f"has shape {tuple(x.shape)}")
        return x if labels is None else (x, torch.as_tensor(np.array(labels)))


def _take(pending: list[tuple[np.ndarray, np.ndarray | None]], size: int
          ) -> tuple[tuple[np.ndarray, np.ndarray | None], list, int]:
    """The first ``size`` rows of the pending pieces, and what is left."""
    images, labels, left, need = [], [], [], size
    for x, y in pending:
        if need <= 0:
            left.append((x, y))
            continue
        images.append(x[:need])
        labels.append(None if y is None else y[:need])
        if len(x) > need:
            left.append((x[need:], None if y is None else y[need:]))
        need -= len(x[:need])
    batch = (np.concatenate(images), None if labels[0] is None else np.concatenate(labels))
    return batch, left, sum(len(x) for x, _ in left)


def _rows_of(block: Any, column: str) -> int:
    return len(block[column])


_ROW_TASK: Any = None


def _row_task() -> Any:
    """``_rows_of`` as a Ray task (made on first use: Ray is imported only then)."""
    global _ROW_TASK
    if _ROW_TASK is None:
        import ray

        _ROW_TASK = ray.remote(num_cpus=0)(_rows_of)
    return _ROW_TASK


class RayBatches:
    """All rows of a :class:`RayImages` in batches, iterable again for a second pass."""

    def __init__(self, images: RayImages, batch_size: int):
        self.images, self.batch_size = images, int(batch_size)

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        return self.images.batches(0, None, self.batch_size)
