"""Images in, tensors out: batching for :func:`pcace.rank`, and data given by path.

- :func:`as_batches` -- a tensor, Dataset or DataLoader as image batches, once.
- :func:`describe_data`, :func:`open_dataset` -- a data set named by path (a folder tree,
  a CSV, MNIST files) as a spec any worker can open, and opened.
- The datasets themselves (:class:`ImageFiles`, :func:`image_folder`, ...) live in
  :mod:`pcace.inputs.datasets` and are named here too.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from ..core.voice import action
from .datasets import (
    IMAGE_EXTENSIONS,
    ImageFiles,
    csv_images,
    default_transform,
    image_folder,
    mnist_idx,
    relabel,
    sklearn_digits,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "relabel",
    "ImageBatches",
    "ImageFiles",
    "as_batches",
    "indexable",
    "csv_images",
    "default_transform",
    "image_folder",
    "mnist_idx",
    "sklearn_digits",
]



class ImageBatches:
    """Image batches from a tensor, Dataset or DataLoader; see :func:`as_batches`.

    Attributes
    ----------
    n_images : int or None
        Images it yields, when known before iterating (a tensor, a Dataset, or a
        DataLoader without ``label``); after a full pass, the count of that pass.
    labels : torch.Tensor or None
        After a full pass: the labels of the yielded images, when the input has any.
    """

    def __init__(self, source: Any, batch_size: int, label: Any, n_images: int | None):
        self._source = source
        self.batch_size = batch_size
        self.label = label
        self.n_images = n_images
        self.labels: torch.Tensor | None = None

    def __len__(self) -> int:
        if self.n_images is None:
            raise TypeError("the number of batches is unknown before a pass over the DataLoader")
        return -(-self.n_images // self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        count = 0
        labels: list[torch.Tensor] = []
        for batch in _collated(self._source):
            images, batch_labels = _split_batch(batch)
            if self.label is not None:
                if batch_labels is None:
                    raise ValueError("label filtering needs (image, label) items; "
                                     "these items have no labels")
                keep = _label_mask(batch_labels, self.label)
                images, batch_labels = images[keep], batch_labels[keep]
            if batch_labels is not None:
                labels.append(batch_labels)
            if len(images):
                count += len(images)
                yield images
        if self.label is not None and count == 0:
            raise ValueError(f"no images have label {self.label!r}")
        self.n_images = count
        self.labels = torch.cat(labels) if labels else None


def _collated(source: Any) -> Iterator[Any]:
    """Iterate a DataLoader, turning a failed stack of images of mixed sizes into one line."""
    it = iter(source)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except RuntimeError as err:
            if "stack expects each tensor to be equal size" in str(err) \
                    or "equal size" in str(err):
                raise ValueError("the images have different sizes, so they cannot be batched: "
                                 f"resize or crop them alike ({action('same_size')})") from None
            raise
        yield batch


def _label_mask(labels: torch.Tensor, label: Any) -> torch.Tensor:
    return labels == torch.as_tensor(label, dtype=labels.dtype)


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        images, labels = batch, None
    elif isinstance(batch, list | tuple) and len(batch) >= 2:
        images, labels = batch[0], batch[1]
        if not isinstance(labels, torch.Tensor):
            labels = torch.as_tensor(labels)
    elif isinstance(batch, list | tuple) and len(batch) == 1:
        images, labels = batch[0], None
    else:
        raise ValueError(f"cannot read a batch of type {type(batch).__name__}; items must be "
                         "image tensors or (image, label) pairs")
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"items hold {type(images).__name__} images, not tensors; give the "
                         "dataset a transform such as pcace.inputs.data.default_transform()")
    if images.ndim != 4:
        raise ValueError(f"image batches must have shape (N, C, H, W); got {tuple(images.shape)}")
    return images, labels


def _check_item(item: Any) -> None:
    """Fail early, with advice, on dataset items that cannot be batched as images."""
    image = item[0] if isinstance(item, list | tuple) and item else item
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"items hold {type(image).__name__} images, not tensors; give the "
                         "dataset a transform such as pcace.inputs.data.default_transform()")
    if image.ndim != 3:
        raise ValueError(f"dataset items must be images of shape (C, H, W); got "
                         f"{tuple(image.shape)}")


def dataset_labels(ds: Dataset) -> torch.Tensor | None:
    """Labels of every item, read without decoding images where possible."""
    if isinstance(ds, TensorDataset):
        return ds.tensors[1] if len(ds.tensors) > 1 else None
    if isinstance(ds, Subset):
        inner = dataset_labels(ds.dataset)
        return None if inner is None else inner[torch.as_tensor(ds.indices, dtype=torch.long)]
    if isinstance(ds, ImageFiles):
        return torch.as_tensor(ds.targets) if ds.has_labels else None
    targets = getattr(ds, "targets", None)
    if targets is not None and len(targets) == len(ds):  # type: ignore[arg-type]
        return torch.as_tensor(targets)
    labels = []
    for i in range(len(ds)):  # type: ignore[arg-type]
        item = ds[i]
        if not isinstance(item, list | tuple) or len(item) < 2:
            return None
        labels.append(torch.as_tensor(item[1]))
    return torch.stack(labels) if labels else None


def _loader_count(loader: DataLoader) -> int | None:
    """Images a DataLoader yields in one pass, when its sampler has a length."""
    if loader.batch_size is None:
        return None
    try:
        n = len(loader.sampler)  # type: ignore[arg-type]
    except TypeError:
        return None
    return (n // loader.batch_size) * loader.batch_size if loader.drop_last else n


def as_batches(images: Any, batch_size: int = 64, label: Any = None,
               order: Sequence[int] | None = None) -> ImageBatches:
    """Iterate image batches, optionally only of one label, from any usual input.

    Parameters
    ----------
    images : tensor, ndarray, (images, labels) pair, Dataset, DataLoader or Ray Dataset
        A tensor/array of shape (N, C, H, W); a pair ``(images, labels)`` of such
        and an (N,) tensor; a Dataset whose items are image tensors or
        ``(image, label)``; a DataLoader yielding those batches (its own batch
        size is kept); or a ``ray.data.Dataset`` of image arrays
        (:class:`pcace.inputs.raydata.RayImages`).
    batch_size : int, default 64
        Images per batch (not used for a DataLoader).
    label : optional
        Keep only the items whose label equals it; an error if no item has it or
        the items have no labels.
    order : sequence of int, optional
        Yield the images in this order (positions among the images ``label`` keeps): a
        permutation of them. Only for input that can be indexed (:func:`indexable`).

    Returns
    -------
    ImageBatches
        An iterable of (B, C, H, W) tensors with ``n_images`` and, after a pass,
        ``labels``.

    Examples
    --------
    >>> import torch
    >>> x = torch.rand(10, 1, 8, 8); y = torch.arange(10) % 2
    >>> b = as_batches((x, y), batch_size=4, label=1)
    >>> [t.shape[0] for t in b], b.n_images
    ([4, 1], 5)
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    from .raydata import RayBatches, RayImages, is_ray_dataset

    if is_ray_dataset(images):
        images = RayImages.of(images)
    if isinstance(images, RayImages):
        if label is not None:
            raise ValueError("label filtering is not done for a Ray Dataset; filter it first "
                             "(ds.filter(...))")
        return ImageBatches(RayBatches(images, batch_size), batch_size, None, len(images))
    if isinstance(images, tuple) and len(images) == 2 and \
            all(isinstance(t, torch.Tensor | np.ndarray) for t in images):
        images = TensorDataset(*(torch.as_tensor(t) for t in images))
    if isinstance(images, torch.Tensor):
        return _tensor_batches(images, batch_size, label, order)
    if isinstance(images, DataLoader):
        if order is not None:  # a plain loader over a Dataset: read it in that order
            if indexable(images, label) is None:
                raise ValueError("this DataLoader cannot be read in another order")
            return as_batches(images.dataset, images.batch_size or batch_size, order=order)
        n = _loader_count(images) if label is None else None
        return ImageBatches(images, images.batch_size or batch_size, label, n)
    if isinstance(images, Dataset):
        return _dataset_batches(images, batch_size, label, order)
    raise ValueError(f"cannot read images from {type(images).__name__}; give a tensor "
                     "(N, C, H, W), a Dataset or a DataLoader")


def _tensor_batches(images: torch.Tensor, batch_size: int, label: Any,
                    order: Sequence[int] | None) -> ImageBatches:
    if images.ndim != 4:
        hint = " (add a channel axis: x.unsqueeze(1))" if images.ndim == 3 else ""
        raise ValueError(f"images must have shape (N, C, H, W); got "
                         f"{tuple(images.shape)}{hint}")
    if label is not None:
        raise ValueError("label filtering needs labels; pass (images, labels) or a Dataset")
    if not len(images):
        raise ValueError("no images: the tensor is empty")
    if order is not None:
        index = _permutation(order, len(images))
        return ImageBatches(_Gathered(images, index, batch_size), batch_size, None,
                            len(images))
    return ImageBatches(images.split(batch_size), batch_size, None, len(images))


def _dataset_batches(ds: Dataset, batch_size: int, label: Any,
                     order: Sequence[int] | None) -> ImageBatches:
    if label is not None:
        labels = dataset_labels(ds)
        if labels is None:
            raise ValueError("label filtering needs (image, label) items; "
                             "these items have no labels")
        index = torch.nonzero(_label_mask(labels, label)).flatten().tolist()
        if not index:
            found = sorted({v.item() for v in labels.flatten()})[:20]
            raise ValueError(f"no images have label {label!r}; labels present: {found}")
        ds = Subset(ds, index)
    n = len(ds)  # type: ignore[arg-type]
    if not n:
        raise ValueError("no images: the dataset is empty")
    if order is not None:
        ds = Subset(ds, _permutation(order, n).tolist())
    _check_item(ds[0])
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False)
    return ImageBatches(loader, batch_size, None, n)


def indexable(images: Any, label: Any = None) -> int | None:
    """How many images an input holds, when it can be read in any order (a tensor, a
    map-style Dataset, or a DataLoader reading one in order with default batching); None
    for streams, shuffling loaders and label filters on a tensor or a loader.

    Examples
    --------
    >>> indexable(torch.rand(5, 1, 2, 2)), indexable(iter([torch.rand(2, 1, 2, 2)]))
    (5, None)
    """
    from torch.utils.data import SequentialSampler
    from torch.utils.data.dataloader import default_collate

    if isinstance(images, tuple) and len(images) == 2 and \
            all(isinstance(t, torch.Tensor | np.ndarray) for t in images):
        images = TensorDataset(*(torch.as_tensor(t) for t in images))
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if isinstance(images, torch.Tensor):
        return int(images.shape[0]) if images.ndim == 4 and label is None else None
    if isinstance(images, DataLoader):
        plain = (isinstance(images.sampler, SequentialSampler) and images.batch_size
                 and images.collate_fn is default_collate and not images.drop_last)
        return indexable(images.dataset, label) if plain and label is None else None
    if isinstance(images, Dataset) and hasattr(images, "__len__"):
        if label is None:
            return len(images)  # type: ignore[arg-type]
        labels = dataset_labels(images)
        return None if labels is None else int(_label_mask(labels, label).sum())
    return None


class _Gathered:
    """Batches of a tensor's images in a given order (each batch gathered on demand)."""

    def __init__(self, images: torch.Tensor, index: torch.Tensor, batch_size: int):
        self.images, self.index, self.batch_size = images, index, batch_size

    def __len__(self) -> int:
        return -(-len(self.index) // self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for part in self.index.split(self.batch_size):
            yield self.images[part]


def _permutation(order: Sequence[int], n: int) -> torch.Tensor:
    index = torch.as_tensor(np.asarray(order), dtype=torch.long).flatten()
    if index.numel() != n or not torch.equal(index.sort().values, torch.arange(n)):
        raise ValueError(f"order must be a permutation of the {n} images")
    return index


# ------------------------------------------------------------------ data sources by path

#: The options of a data source recorded in a run's manifest (besides its path).
DATA_OPTIONS = ("class_name", "label", "limit", "resize", "crop", "mean", "std", "path_column",
                "label_column", "target_column")


def describe_data(path: str | Path, **options: Any) -> dict:
    """The JSON description of a data source: its absolute path and the options given.

    Examples
    --------
    >>> spec = describe_data(".", limit=10)
    >>> spec["limit"], spec["crop"]
    (10, None)
    """
    unknown = sorted(set(options) - set(DATA_OPTIONS))
    if unknown:
        raise TypeError(f"unknown data options {unknown}; expected some of {DATA_OPTIONS}")
    spec: dict[str, Any] = {"path": str(Path(path).resolve())}
    spec.update({key: options.get(key) for key in DATA_OPTIONS})
    return spec


def _is_mnist(path: Path) -> bool:
    if path.is_file():
        return "idx" in path.name
    return any("idx3" in p.name for p in path.iterdir())


def open_dataset(spec: dict, transform: Any = None) -> tuple[Dataset, list[str] | None]:
    """Open the data source ``spec`` describes (:func:`describe_data`) and its class names.

    The kind is detected from the path: a ``.csv`` file (:func:`csv_images`), MNIST IDX
    files (:func:`mnist_idx`), else an image folder (:func:`image_folder`). ``transform``
    (the model's own preprocessing) is used unless the spec sets ``resize``, ``crop``,
    ``mean`` or ``std``. Sets ``spec["kind"]``.
    """
    path = Path(spec["path"])
    if not path.exists():
        raise FileNotFoundError(f"data path {path} does not exist")
    if any(spec.get(k) is not None for k in ("resize", "crop", "mean", "std")) \
            or transform is None:
        transform = default_transform(resize=spec.get("resize"), crop=spec.get("crop"),
                                      mean=spec.get("mean"), std=spec.get("std"))
    classes = None
    if path.suffix.lower() == ".csv":
        spec["kind"] = "csv"
        ds: Dataset = csv_images(path, path_column=spec.get("path_column") or "path",
                                 label_column=spec.get("label_column"),
                                 target_column=spec.get("target_column"), transform=transform)
        classes = list(getattr(ds, "classes", None) or []) or None
    elif _is_mnist(path):
        spec["kind"] = "mnist"
        ds = mnist_idx(path, digit=spec.get("label"))
    else:
        spec["kind"] = "image_folder"
        ds = image_folder(path, class_name=spec.get("class_name"), transform=transform)
        classes = list(getattr(ds, "classes", None) or []) or None
    if spec.get("limit"):
        ds = torch.utils.data.Subset(ds, range(min(int(spec["limit"]), len(ds))))
    return ds, classes


def normalisation(spec: dict, transform: Any = None) -> tuple[Any, Any]:
    """(mean, std) the images were normalised with, for display; (None, None) if unknown."""
    if spec.get("mean") is not None:
        return spec.get("mean"), spec.get("std")
    for obj in [transform, *getattr(transform, "transforms", [])]:
        if getattr(obj, "mean", None) is not None and getattr(obj, "std", None) is not None:
            return list(obj.mean), list(obj.std)
    return None, None


def stack_images(ds: Any, label: Any = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """All images of a dataset as one tensor (in iteration order), with labels if it has any."""
    batches = as_batches(ds, 64, label=label)
    images = torch.cat(list(batches))
    labels = getattr(batches, "labels", None)
    return images, (torch.as_tensor(labels) if labels is not None else None)
