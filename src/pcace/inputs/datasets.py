"""Image datasets from files and from bundled digits: folders, CSVs, MNIST IDX, scikit-learn.

- :class:`ImageFiles` -- image files with labels or regression targets; files that
  cannot be read are skipped (with a warning) when the dataset is built.
- :func:`image_folder`, :func:`csv_images` -- build one from a folder tree or a CSV.
- :func:`mnist_idx`, :func:`sklearn_digits` -- digits as tensors, no download.
- :func:`default_transform` -- a PIL -> tensor pipeline.
"""

from __future__ import annotations

import gzip
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, TensorDataset

from ..core.errors import first_line
from ..core.voice import action

__all__ = ["IMAGE_EXTENSIONS", "ImageFiles", "csv_images", "default_transform", "image_folder",
           "mnist_idx", "relabel", "sklearn_digits"]

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
        return first_line(err)
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
            first = first_line(err)
            raise ValueError(f"preprocessing {path} ({img.mode}, {img.size[0]}x{img.size[1]}) "
                             f"failed: {first}. Check {action('fix_preprocessing')}") from None
        return (image, target) if self.has_labels else image

    def __repr__(self) -> str:
        extra = f", {self.skipped} skipped" if self.skipped else ""
        return f"ImageFiles({len(self)} images{extra})"


def relabel(ds: Dataset, indices: Sequence[int], classes: Sequence[str]) -> None:
    """Give every image of an image folder a new label, in place: ``indices[old]``.

    An image folder's labels are the folders' positions (``cat/``, ``dog/``: 0, 1); this
    turns them into the model's class indices (3 and 5 for CIFAR-10), found with
    :func:`pcace.inputs.categories.folder_classes`, and names the classes as the model does.

    Parameters
    ----------
    ds : ImageFiles, or a Subset of one
        The dataset; changed in place.
    indices : sequence of int
        The new label of each old label.
    classes : sequence of str
        The class names of the new labels (``classes[new]``).

    Examples
    --------
    >>> ds = ImageFiles([])
    >>> ds.samples, ds.has_labels = [("a.png", 0), ("b.png", 1)], True
    >>> relabel(ds, [3, 5], ["airplane", "automobile", "bird", "cat", "deer", "dog"])
    >>> ds.targets, ds.classes[3]
    ([3, 5], 'cat')
    """
    base = ds.dataset if isinstance(ds, torch.utils.data.Subset) else ds
    if not isinstance(base, ImageFiles) or not base.has_labels:
        raise TypeError("relabel needs labelled ImageFiles (an image folder), or a Subset of them")
    base.samples = [(path, int(indices[label])) for path, label in base.samples]
    base.targets = [label for _, label in base.samples]
    base.classes = list(classes)
    base.class_to_idx = {name: i for i, name in enumerate(base.classes)}


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


def _flat_folder(root: Path, class_name: str | None,
                 transform: Callable[[Image.Image], Any] | None) -> ImageFiles:
    """The images directly in ``root`` as one group (no classes, labels 0)."""
    from ..core.voice import option

    files = [p for p in sorted(root.iterdir())
             if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise ValueError(f"{root} holds neither class sub-folders nor image files "
                         f"({', '.join(IMAGE_EXTENSIONS)}); expected root/<class>/<image> or "
                         "root/<image>")
    if class_name is not None:
        raise ValueError(f"{root} is a flat folder of images (no class sub-folders), so "
                         f"{option('class_name', repr(class_name))} has nothing to choose; "
                         "leave it out to rank all its images")
    ds = ImageFiles([(f, 0) for f in files], transform=transform, classes=[])
    ds.class_to_idx = {}
    return ds


def image_folder(root: str | Path, class_name: str | None = None,
                 transform: Callable[[Image.Image], Any] | None = None) -> ImageFiles:
    """Images in ``root/<class>/...`` (torchvision's ImageFolder layout), or a flat folder.

    Classes are the sub-folder names in alphabetical order; a label is the index of
    its class in that full list, even when ``class_name`` keeps only one class. A folder
    with images and no sub-folders is one group of images: no classes, every label 0.

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
        return _flat_folder(root, class_name, transform)
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
