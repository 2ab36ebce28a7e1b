"""Images in, tensors out: datasets and batching for :func:`pcace.rank`.

- :class:`ImageFiles` -- image files with labels or regression targets; files that
  cannot be read are skipped (with a warning) when the dataset is built.
- :func:`image_folder`, :func:`csv_images` -- build one from a folder tree or a CSV.
- :func:`mnist_idx`, :func:`sklearn_digits` -- digits as tensors, no download.
- :func:`default_transform` -- a PIL -> tensor pipeline.
- :func:`as_batches` -- a tensor, Dataset or DataLoader as image batches, once.
"""

from __future__ import annotations

import gzip
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageBatches",
    "ImageFiles",
    "as_batches",
    "csv_images",
    "default_transform",
    "image_folder",
    "mnist_idx",
    "sklearn_digits",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_MAX_WARNINGS = 10


def default_transform(resize: int | Sequence[int] | None = None,
                      crop: int | Sequence[int] | None = None,
                      mean: Sequence[float] | None = None,
                      std: Sequence[float] | None = None,
                      grayscale: bool = False) -> Callable[[Image.Image], torch.Tensor]:
    """A PIL image -> float tensor pipeline: resize, centre crop, [0, 1], normalise.

    Parameters
    ----------
    resize : int or (int, int), optional
        An int resizes the shorter side to it; a pair gives (height, width).
    crop : int or (int, int), optional
        Centre crop after resizing.
    mean, std : sequence of float, optional
        Per-channel normalisation; give both or neither.
    grayscale : bool, default False
        Convert to one channel first.

    Returns
    -------
    callable
        A ``torchvision.transforms.Compose``.

    Examples
    --------
    >>> from PIL import Image
    >>> tf = default_transform(resize=40, crop=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    >>> tf(Image.new("RGB", (60, 50))).shape
    torch.Size([3, 32, 32])
    """
    from torchvision import transforms as T

    if (mean is None) != (std is None):
        raise ValueError("give both mean and std for normalisation, or neither")
    steps: list[Any] = []
    if grayscale:
        steps.append(T.Grayscale(1))
    if resize is not None:
        steps.append(T.Resize(resize if isinstance(resize, int) else tuple(resize)))
    if crop is not None:
        steps.append(T.CenterCrop(crop if isinstance(crop, int) else tuple(crop)))
    steps.append(T.ToTensor())
    if mean is not None:
        steps.append(T.Normalize(tuple(mean), tuple(std)))  # type: ignore[arg-type]
    return T.Compose(steps)


def _readable(path: Path) -> str | None:
    """None if ``path`` decodes as an image, else a short reason."""
    try:
        with Image.open(path) as img:
            img.load()
    except FileNotFoundError:
        return "file not found"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    return None


class ImageFiles(Dataset):
    """Image files with an optional label or target each.

    All files are decoded once when the dataset is built; unreadable ones are left
    out with a warning naming them, and counted in ``skipped``.

    Parameters
    ----------
    samples : sequence of (path, label_or_target)
        The label may be None for every sample; items are then images alone.
    transform : callable, optional
        PIL image -> tensor; default :func:`default_transform` (tensor in [0, 1]).
    mode : str or None, default "RGB"
        PIL mode to convert each image to; None keeps the file's mode.
    classes : list of str, optional
        Class names, index = label.

    Attributes
    ----------
    samples : list of (str, label)
        The readable files.
    targets : list
        Their labels/targets.
    skipped : int
        Number of unreadable files left out.
    skipped_files : list of str
        Those files.

    Examples
    --------
    >>> ds = ImageFiles([("a.jpg", 0), ("b.jpg", 1)])  # doctest: +SKIP
    >>> image, label = ds[0]  # doctest: +SKIP
    """

    def __init__(self, samples: Sequence[tuple[str | Path, Any]],
                 transform: Callable[[Image.Image], Any] | None = None,
                 mode: str | None = "RGB", classes: Sequence[str] | None = None):
        self.transform = transform if transform is not None else default_transform()
        self.mode = mode
        self.classes = list(classes) if classes is not None else None
        self.samples: list[tuple[str, Any]] = []
        self.skipped_files: list[str] = []
        for path, target in samples:
            reason = _readable(Path(path))
            if reason is None:
                self.samples.append((str(path), target))
                continue
            self.skipped_files.append(str(path))
            if len(self.skipped_files) <= _MAX_WARNINGS:
                warnings.warn(f"skipping unreadable image {path}: {reason}", stacklevel=2)
        if self.skipped > _MAX_WARNINGS:
            warnings.warn(f"skipped {self.skipped} unreadable images in all "
                          f"({self.skipped - _MAX_WARNINGS} not named above)", stacklevel=2)
        self.targets = [t for _, t in self.samples]
        self.has_labels = any(t is not None for t in self.targets)
        if self.has_labels and any(t is None for t in self.targets):
            raise ValueError("some samples have a label and some do not; give all or none")

    @property
    def skipped(self) -> int:
        return len(self.skipped_files)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Any:
        path, target = self.samples[index]
        with Image.open(path) as img:
            img = img.convert(self.mode) if self.mode else img.copy()
        try:
            image = self.transform(img)
        except (RuntimeError, ValueError, TypeError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ValueError(f"preprocessing {path} ({img.mode}, {img.size[0]}x{img.size[1]}) "
                             f"failed: {first}. Check the normalisation (--mean/--std: one "
                             "value per image channel) and --resize/--crop") from None
        return (image, target) if self.has_labels else image

    def __repr__(self) -> str:
        extra = f", {self.skipped} skipped" if self.skipped else ""
        return f"ImageFiles({len(self)} images{extra})"


def _require_dir(root: str | Path, what: str) -> Path:
    p = Path(root).expanduser()
    if p.is_file():
        raise ValueError(f"{p} is a file, not a folder: {what} must be a folder of images (one "
                         "subfolder per class, or the images themselves); PCACE needs many "
                         "images, not one")
    if not p.is_dir():
        raise FileNotFoundError(f"{what} not found: {p}; check the path")
    return p


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def image_folder(root: str | Path, class_name: str | None = None,
                 transform: Callable[[Image.Image], Any] | None = None) -> ImageFiles:
    """Images in ``root/<class>/...`` (torchvision's ImageFolder layout).

    Classes are the sub-folder names in alphabetical order; a label is the index of
    its class in that full list, even when ``class_name`` keeps only one class.

    Parameters
    ----------
    root : str or Path
        Folder with one sub-folder per class.
    class_name : str, optional
        Keep only this class's images.
    transform : callable, optional
        PIL image -> tensor (see :class:`ImageFiles`).

    Returns
    -------
    ImageFiles
        With ``classes`` (all class names) and labels = class indices.

    Examples
    --------
    >>> cats = image_folder("shared/data/cifar10/test", class_name="cat")  # doctest: +SKIP
    >>> len(cats), cats.classes.index("cat")  # doctest: +SKIP
    (200, 3)
    """
    root = _require_dir(root, "image folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class sub-folders; expected root/<class>/<image> "
                         "(use csv_images for a flat list of files)")
    keep = classes
    if class_name is not None:
        if class_name not in classes:
            raise ValueError(f"no class {class_name!r} in {root}; available: "
                             f"{', '.join(classes)}")
        keep = [class_name]
    samples = [(f, classes.index(c)) for c in keep for f in _image_files(root / c)]
    if not samples:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}"
                         + (f"/{class_name}" if class_name else ""))
    ds = ImageFiles(samples, transform=transform, classes=classes)
    if not len(ds):
        raise ValueError(f"none of the {len(samples)} image files under {root} could be read")
    ds.class_to_idx = {c: i for i, c in enumerate(classes)}
    return ds


def csv_images(csv_path: str | Path, path_column: str = "path",
               label_column: str | None = None, target_column: str | None = None,
               transform: Callable[[Image.Image], Any] | None = None) -> ImageFiles:
    """Images listed in a CSV file, with an optional class label or numeric target.

    Parameters
    ----------
    csv_path : str or Path
        The CSV (with a header row). Relative image paths are resolved against
        the CSV's folder.
    path_column : str, default "path"
        Column of image paths.
    label_column : str, optional
        Column of class labels: integers are used as they are; other values are
        mapped to the index of their sorted unique values (``classes``).
    target_column : str, optional
        Column of numeric regression targets (float). Give at most one of
        ``label_column`` and ``target_column``.
    transform : callable, optional
        PIL image -> tensor (see :class:`ImageFiles`).

    Returns
    -------
    ImageFiles

    Examples
    --------
    >>> ds = csv_images("images.csv", target_column="no2")  # doctest: +SKIP
    """
    import pandas as pd

    csv_path = Path(csv_path).expanduser()
    if not csv_path.is_file():
        raise FileNotFoundError(f"CSV file not found: {csv_path}; check the path")
    if label_column is not None and target_column is not None:
        raise ValueError("give label_column or target_column, not both")
    table = pd.read_csv(csv_path)
    present = ", ".join(map(str, table.columns))
    for role, col in (("path_column", path_column), ("label_column", label_column),
                      ("target_column", target_column)):
        if col is not None and col not in table.columns:
            raise ValueError(f"{csv_path.name} has no column {col!r} ({role}); "
                             f"columns present: {present}")
    if table.empty:
        raise ValueError(f"{csv_path} lists no images")
    base = csv_path.parent
    paths = [p if p.is_absolute() else base / p
             for p in (Path(str(v)).expanduser() for v in table[path_column])]
    classes = None
    if target_column is not None:
        values = pd.to_numeric(table[target_column], errors="coerce")
        if values.isna().any():
            bad = table[target_column][values.isna()].head(3).tolist()
            raise ValueError(f"column {target_column!r} must be numeric; found {bad}")
        infinite = np.flatnonzero(~np.isfinite(values.to_numpy(dtype=float)))
        if infinite.size:
            rows = (infinite[:10] + 2).tolist()  # line numbers, after the header
            raise ValueError(f"column {target_column!r} holds inf on line(s) {rows} of "
                             f"{csv_path.name}; give every image a finite target")
        targets: list[Any] = [float(v) for v in values]
    elif label_column is not None:
        column = table[label_column]
        if column.isna().any():
            raise ValueError(f"column {label_column!r} has empty cells; give every image a label")
        if pd.api.types.is_integer_dtype(column):
            targets = [int(v) for v in column]
        else:
            classes = sorted({str(v) for v in column})
            targets = [classes.index(str(v)) for v in column]
    else:
        targets = [None] * len(paths)
    ds = ImageFiles(list(zip(paths, targets, strict=True)), transform=transform, classes=classes)
    if not len(ds):
        raise ValueError(f"none of the {len(paths)} images listed in {csv_path} could be read")
    return ds


_IDX_MAGIC = {2051: 3, 2049: 1}  # images: 3 dimensions; labels: 1


def _read_idx(path: Path, magic: int) -> np.ndarray:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        kind = "images (magic 2051)" if magic == 2051 else "labels (magic 2049)"
        raise ValueError(f"{path} is not an IDX file of {kind}: magic number {got}")
    ndim = _IDX_MAGIC[magic]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    start = 4 + 4 * ndim
    count = int(np.prod(dims))
    if len(raw) - start != count:
        raise ValueError(f"{path} is truncated or padded: header says {dims}, "
                         f"{len(raw) - start} bytes of data follow")
    return np.frombuffer(raw, dtype=np.uint8, offset=start).reshape(dims)


def _find_idx(folder: Path, prefix: str, kind: str) -> Path:
    names = [f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte",
             f"{prefix}-{kind}.idx{3 if kind == 'images' else 1}-ubyte"]
    for name in names:
        for candidate in (folder / f"{name}.gz", folder / name):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"no {names[0]}[.gz] in {folder}; give the folder holding the "
                            "MNIST IDX files")


def mnist_idx(path_or_dir: str | Path, train: bool = False, digit: int | None = None,
              limit: int | None = None) -> TensorDataset:
    """MNIST from its IDX files (gzipped or not), without torchvision's folder layout.

    Parameters
    ----------
    path_or_dir : str or Path
        The folder holding ``t10k-images-idx3-ubyte.gz`` etc., or the images file
        itself (the labels file is found beside it).
    train : bool, default False
        Read the training files instead of the test files (folder only).
    digit : int, optional
        Keep only this digit.
    limit : int, optional
        Keep at most this many images (the first ones, after ``digit``).

    Returns
    -------
    TensorDataset
        ``(images, labels)``: float32 (N, 1, 28, 28) in [0, 1] and int64 (N,).

    Examples
    --------
    >>> ds = mnist_idx("shared/data/mnist", digit=3, limit=300)  # doctest: +SKIP
    >>> ds.tensors[0].shape  # doctest: +SKIP
    torch.Size([300, 1, 28, 28])
    """
    p = Path(path_or_dir).expanduser()
    if p.is_dir():
        prefix = "train" if train else "t10k"
        images_path, labels_path = _find_idx(p, prefix, "images"), _find_idx(p, prefix, "labels")
    elif p.is_file():
        images_path = p
        labels_path = p.with_name(p.name.replace("images", "labels").replace("idx3", "idx1"))
        if not labels_path.is_file():
            raise FileNotFoundError(f"labels file {labels_path.name} not found beside {p}")
    else:
        raise FileNotFoundError(f"MNIST path not found: {p}; give the folder of the IDX files")
    images = _read_idx(images_path, 2051)
    labels = _read_idx(labels_path, 2049)
    if len(images) != len(labels):
        raise ValueError(f"{images_path.name} has {len(images)} images but "
                         f"{labels_path.name} has {len(labels)} labels")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return _select(x, y, digit, limit)


def _select(x: torch.Tensor, y: torch.Tensor, digit: int | None,
            limit: int | None) -> TensorDataset:
    if digit is not None:
        if not 0 <= int(digit) <= 9:
            raise ValueError(f"digit must be in 0..9; got {digit}")
        keep = y == int(digit)
        x, y = x[keep], y[keep]
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be a positive number of images; got {limit}")
        x, y = x[:limit], y[:limit]
    return TensorDataset(x, y)


def sklearn_digits(digit: int | None = None, size: int = 28,
                   limit: int | None = None) -> TensorDataset:
    """scikit-learn's bundled 8x8 digits (1,797 images) upsampled to ``size`` x ``size``.

    Needs no download, so it serves offline demos and tests.

    Parameters
    ----------
    digit : int, optional
        Keep only this digit.
    size : int, default 28
        Output height and width (bilinear upsampling); 8 keeps the originals.
    limit : int, optional
        Keep at most this many images.

    Returns
    -------
    TensorDataset
        ``(images, labels)``: float32 (N, 1, size, size) in [0, 1] and int64 (N,).

    Examples
    --------
    >>> x, y = sklearn_digits(digit=3).tensors
    >>> tuple(x.shape[1:]), int(y[0])
    ((1, 28, 28), 3)
    """
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        x = x.clamp(0.0, 1.0)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    return _select(x, y, digit, limit)


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
                                 "resize or crop them alike (CLI: --resize N --crop N)") from None
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


def _dataset_labels(ds: Dataset) -> torch.Tensor | None:
    """Labels of every item, read without decoding images where possible."""
    if isinstance(ds, TensorDataset):
        return ds.tensors[1] if len(ds.tensors) > 1 else None
    if isinstance(ds, Subset):
        inner = _dataset_labels(ds.dataset)
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


def as_batches(images: Any, batch_size: int = 64, label: Any = None) -> ImageBatches:
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
        if images.ndim != 4:
            hint = " (add a channel axis: x.unsqueeze(1))" if images.ndim == 3 else ""
            raise ValueError(f"images must have shape (N, C, H, W); got "
                             f"{tuple(images.shape)}{hint}")
        if label is not None:
            raise ValueError("label filtering needs labels; pass (images, labels) or a Dataset")
        if not len(images):
            raise ValueError("no images: the tensor is empty")
        return ImageBatches(images.split(batch_size), batch_size, None, len(images))
    if isinstance(images, DataLoader):
        n = _loader_count(images) if label is None else None
        return ImageBatches(images, images.batch_size or batch_size, label, n)
    if isinstance(images, Dataset):
        ds: Dataset = images
        if label is not None:
            labels = _dataset_labels(ds)
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
        _check_item(ds[0])
        loader = DataLoader(ds, batch_size=batch_size, shuffle=False)
        return ImageBatches(loader, batch_size, None, n)
    raise ValueError(f"cannot read images from {type(images).__name__}; give a tensor "
                     "(N, C, H, W), a Dataset or a DataLoader")


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
