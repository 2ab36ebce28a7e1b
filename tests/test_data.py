"""Tests of pcace.inputs.data on the shared data and on small files written here."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from pcace.inputs.data import (
    ImageFiles,
    as_batches,
    csv_images,
    default_transform,
    image_folder,
    mnist_idx,
    sklearn_digits,
)


@pytest.fixture(scope="module")
def cifar_dir(shared_dir):
    return shared_dir / "data" / "cifar10" / "test"


@pytest.fixture()
def small_folder(tmp_path):
    """Two classes of three small generated images each."""
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for cls in ("b_dog", "a_cat"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 255, size=(12, 10, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
    return root


def test_image_folder_one_class(cifar_dir):
    cats = image_folder(cifar_dir, class_name="cat")
    assert len(cats) == 200 and cats.skipped == 0
    assert cats.classes[3] == "cat" and len(cats.classes) == 10
    image, label = cats[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert set(cats.targets) == {3}


def test_image_folder_unknown_class_lists_classes(cifar_dir):
    with pytest.raises(ValueError, match="airplane, automobile"):
        image_folder(cifar_dir, class_name="kat")
    with pytest.raises(FileNotFoundError):
        image_folder(cifar_dir / "nope")


def test_corrupt_image_is_skipped_and_counted(cifar_dir, tmp_path):
    root = tmp_path / "copy"
    (root / "cat").mkdir(parents=True)
    for src in sorted((cifar_dir / "cat").glob("*.jpg"))[:4]:
        shutil.copy(src, root / "cat" / src.name)
    (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = (root / "cat" / "0000.jpg").read_bytes()
    (root / "cat" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    with pytest.warns(UserWarning) as record:
        ds = image_folder(root, class_name="cat", transform=default_transform())
    messages = " ".join(str(w.message) for w in record)
    assert "broken.jpg" in messages and "truncated.jpg" in messages
    assert len(ds) == 4 and ds.skipped == 2
    assert sorted(f.rsplit("/", 1)[-1] for f in ds.skipped_files) == ["broken.jpg",
                                                                     "truncated.jpg"]
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch[0].shape == (4, 3, 32, 32)


def test_image_folder_classes_sorted(small_folder):
    ds = image_folder(small_folder, transform=default_transform(resize=(8, 8)))
    assert ds.classes == ["a_cat", "b_dog"]
    assert ds.targets == [0, 0, 0, 1, 1, 1]
    assert ds[4][0].shape == (3, 8, 8)


def test_csv_images_labels_and_targets(small_folder, tmp_path):
    csv = small_folder / "list.csv"
    rows = ["path,kind,no2,idx"]
    files = sorted(small_folder.rglob("*.png"))
    for i, f in enumerate(files):
        rows.append(f"{f.relative_to(small_folder)},{f.parent.name},{10.5 + i},{i % 2}")
    csv.write_text("\n".join(rows) + "\n")

    reg = csv_images(csv, target_column="no2")
    assert len(reg) == 6 and reg.targets[1] == pytest.approx(11.5)
    assert reg[0][0].shape == (3, 12, 10)
    named = csv_images(csv, label_column="kind")
    assert named.classes == ["a_cat", "b_dog"] and named.targets[-1] == 1
    assert csv_images(csv, label_column="idx").targets[:2] == [0, 1]
    plain = csv_images(csv)
    assert isinstance(plain[0], torch.Tensor)  # no labels: items are images alone

    with pytest.raises(ValueError, match="columns present: path, kind, no2, idx"):
        csv_images(csv, target_column="pm25")
    with pytest.raises(ValueError, match="numeric"):
        csv_images(csv, target_column="kind")
    with pytest.raises(ValueError, match="path_column"):
        csv_images(csv, path_column="file")


def test_csv_missing_file_is_skipped(small_folder):
    csv = small_folder / "list.csv"
    csv.write_text("path,y\na_cat/0.png,1.0\na_cat/missing.png,2.0\n")
    with pytest.warns(UserWarning, match="missing.png"):
        ds = csv_images(csv, target_column="y")
    assert len(ds) == 1 and ds.skipped == 1


def test_mnist_idx(shared_dir):
    ds = mnist_idx(shared_dir / "data" / "mnist")
    x, y = ds.tensors
    assert x.shape == (10_000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (10_000,) and y.dtype == torch.int64
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.99
    assert set(y.tolist()) == set(range(10))
    threes = mnist_idx(shared_dir / "data" / "mnist" / "t10k-images-idx3-ubyte.gz",
                       digit=3, limit=50)
    assert len(threes) == 50 and (threes.tensors[1] == 3).all()


def test_mnist_idx_uncompressed_and_bad_header(tmp_path):
    images = np.arange(2 * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(2, 28, 28)
    header = (2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (2, 28, 28))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(header + images.tobytes())
    labels = (2049).to_bytes(4, "big") + (2).to_bytes(4, "big") + bytes([7, 1])
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(labels)
    x, y = mnist_idx(tmp_path).tensors
    assert x.shape == (2, 1, 28, 28) and y.tolist() == [7, 1]
    assert x[0, 0, 0, 1] == pytest.approx(1 / 255)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(labels)
    with pytest.raises(ValueError, match="magic"):
        mnist_idx(tmp_path)
    with pytest.raises(FileNotFoundError, match="train-images"):
        mnist_idx(tmp_path, train=True)


def test_sklearn_digits():
    x, y = sklearn_digits().tensors
    assert x.shape == (1797, 1, 28, 28) and y.shape == (1797,)
    assert 0.0 <= x.min() and x.max() <= 1.0
    sevens = sklearn_digits(digit=7, size=8)
    assert sevens.tensors[0].shape[1:] == (1, 8, 8)
    assert (sevens.tensors[1] == 7).all()


def test_as_batches_tensor():
    x = torch.rand(10, 3, 4, 4)
    b = as_batches(x, batch_size=4)
    assert b.n_images == 10 and len(b) == 3
    assert [t.shape[0] for t in b] == [4, 4, 2]
    with pytest.raises(ValueError, match="labels"):
        as_batches(x, 4, label=1)
    arr = as_batches(x.numpy(), batch_size=6)
    assert torch.equal(torch.cat(list(arr)), x)
    with pytest.raises(ValueError, match="unsqueeze"):
        as_batches(torch.rand(10, 4, 4), 4)


def test_as_batches_dataset_with_label_filter():
    x = torch.rand(12, 1, 5, 5)
    y = torch.arange(12) % 3
    ds = TensorDataset(x, y)
    b = as_batches(ds, batch_size=3, label=2)
    assert b.n_images == 4
    got = torch.cat(list(b))
    assert torch.equal(got, x[y == 2])
    assert b.labels.tolist() == [2, 2, 2, 2]
    assert as_batches(ds, batch_size=5).n_images == 12
    with pytest.raises(ValueError, match="no images have label 7"):
        as_batches(ds, 4, label=7)
    with pytest.raises(ValueError, match="no labels"):
        as_batches(TensorDataset(x), 4, label=0)
    assert sum(t.shape[0] for t in as_batches(TensorDataset(x), 5)) == 12


def test_as_batches_image_files(small_folder):
    ds = image_folder(small_folder, transform=default_transform(resize=(6, 6)))
    b = as_batches(ds, batch_size=2, label=1)
    batches = list(b)
    assert b.n_images == 3 and [t.shape for t in batches][0] == (2, 3, 6, 6)
    assert b.labels.tolist() == [1, 1, 1]


def test_as_batches_dataloader():
    x = torch.rand(9, 1, 3, 3)
    y = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1])
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    b = as_batches(loader, batch_size=100)
    assert b.n_images == 9 and [t.shape[0] for t in b] == [4, 4, 1]
    filtered = as_batches(loader, 100, label=1)
    assert filtered.n_images is None
    assert torch.equal(torch.cat(list(filtered)), x[y == 1])
    assert filtered.n_images == 5
    with pytest.raises(ValueError, match="no images have label 3"):
        list(as_batches(loader, 4, label=3))
    images_only = DataLoader(x, batch_size=5)
    with pytest.raises(ValueError, match="no labels"):
        list(as_batches(images_only, 4, label=1))
    pil = DataLoader(TensorDataset(x, y), batch_size=4, drop_last=True)
    assert as_batches(pil, 1).n_images == 8


def test_as_batches_rejects_pil_items(small_folder):
    ds = ImageFiles([(p, 0) for p in sorted(small_folder.rglob("*.png"))],
                    transform=lambda img: img)
    with pytest.raises(ValueError, match="transform"):
        as_batches(ds, 2)
    with pytest.raises(ValueError, match="no images"):
        as_batches(torch.rand(0, 3, 4, 4), 2)
    with pytest.raises(ValueError, match="batch_size"):
        as_batches(torch.rand(2, 3, 4, 4), 0)


def test_default_transform():
    tf = default_transform(resize=20, crop=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    out = tf(Image.new("RGB", (40, 30), color=(255, 255, 255)))
    assert out.shape == (3, 16, 16) and torch.allclose(out, torch.ones_like(out))
    gray = default_transform(grayscale=True)(Image.new("RGB", (5, 5)))
    assert gray.shape == (1, 5, 5)
    with pytest.raises(ValueError, match="both"):
        default_transform(mean=(0.5,))


def test_csv_target_column_refuses_inf_and_names_the_line(tmp_path):
    from PIL import Image

    from pcace.inputs.data import csv_images

    for i in range(3):
        Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "t.csv").write_text("path,no2\n0.png,1.5\n1.png,inf\n2.png,2.0\n")
    with pytest.raises(ValueError, match=r"inf on line\(s\) \[3\]"):
        csv_images(tmp_path / "t.csv", target_column="no2")
