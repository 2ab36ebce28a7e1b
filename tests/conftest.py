"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def find_shared() -> Path | None:
    """The shared data folder: $PCACE_SHARED, else ../shared beside the repository."""
    env = os.environ.get("PCACE_SHARED")
    candidates = [Path(env).expanduser()] if env else []
    candidates.append(REPO_ROOT.parent / "shared")
    for path in candidates:
        if (path / "data").is_dir():
            return path.resolve()
    return None


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """Root of the read-only shared material (holds data/ and fixtures/); skips if absent."""
    path = find_shared()
    if path is None:
        pytest.skip("shared data not found: set PCACE_SHARED or put it at ../shared")
    return path


@pytest.fixture(scope="session")
def cifar_cats(shared_dir):
    """``n -> (model, images)``: the shared pretrained ResNet-20 and its first ``n`` cat test
    images, normalised as it was trained."""
    from torchvision import transforms

    from pcace.inputs.data import image_folder
    from pcace.inputs.models import load_model
    from pcace.zoo import CIFAR_MEAN, CIFAR_STD

    def load(n: int):
        loaded = load_model("pcace.zoo:cifar_resnet20",
                            checkpoint=shared_dir / "data/cifar10/resnet20-12fca82f.th")
        tf = transforms.Compose([transforms.ToTensor(),
                                 transforms.Normalize(CIFAR_MEAN, CIFAR_STD)])
        ds = image_folder(shared_dir / "data/cifar10/test", class_name="cat", transform=tf)
        return loaded.model, torch.stack([ds[i][0] for i in range(n)])

    return load


@pytest.fixture
def two_pass_routes(monkeypatch):
    """Every layer through the two passes (``MemoryPlan.routes`` replaced for the test)."""
    from pcace.reduce.plan import LayerRoute, MemoryPlan

    def routes(self, shapes, n, run_images=256, **_):
        return {k: LayerRoute("moments", "forced by the test", 0, 2, tuple(s))
                for k, s in shapes.items()}

    monkeypatch.setattr(MemoryPlan, "routes", routes)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module of tiny tensors (faster, and much faster on a busy
    machine); the caller's thread count comes back after. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
