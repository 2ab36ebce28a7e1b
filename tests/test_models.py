"""Tests of pcace.zoo and pcace.models (no downloads)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torchvision.models as tvm
from torch.utils.data import Subset

from pcace.data import image_folder
from pcace.models import (
    LoadedModel,
    count_parameters,
    load_model,
    load_state_dict_file,
    resolve_torchvision_weights,
    weights_hash,
)
from pcace.zoo import CIFAR10_CLASSES, cifar_resnet20, mnist_cnn


@pytest.fixture(autouse=True)
def no_download(monkeypatch):
    """Any attempt to fetch torchvision weights fails the test."""

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"test tried to download {self}")

    monkeypatch.setattr(tvm.WeightsEnum, "get_state_dict", refuse)


@pytest.fixture(scope="module")
def resnet20_checkpoint(shared_dir):
    return shared_dir / "data" / "cifar10" / "resnet20-12fca82f.th"


def test_zoo_shapes_and_size():
    net = cifar_resnet20().eval()
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert count_parameters(net) == 269_722  # the 0.27M of He et al.
    small = mnist_cnn().eval()
    assert small(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    convs = [n for n, m in small.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs == ["conv1", "conv2"]
    assert cifar_resnet20(num_classes=4)(torch.zeros(1, 3, 32, 32)).shape == (1, 4)


def test_shortcut_pads_channels_equally():
    net = cifar_resnet20().eval()
    shortcut = net.layer2[0].shortcut
    x = torch.randn(1, 16, 8, 8)
    out = shortcut(x)
    assert out.shape == (1, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()
    assert sum(p.numel() for p in shortcut.parameters()) == 0


def test_pretrained_resnet20_loads_strictly_and_is_accurate(resnet20_checkpoint, shared_dir):
    loaded = load_model("pcace.zoo:cifar_resnet20", checkpoint=resnet20_checkpoint)
    assert loaded.categories == list(CIFAR10_CLASSES)
    assert loaded.input_shape == (3, 32, 32)
    assert not loaded.model.training
    ds = image_folder(shared_dir / "data" / "cifar10" / "test", transform=loaded.transform)
    assert ds.classes == list(CIFAR10_CLASSES)
    # 50 images of each class (the first 500 in folder order cover only three classes)
    subset = Subset(ds, [i for i in range(len(ds)) if i % 200 < 50])
    x = torch.stack([subset[i][0] for i in range(len(subset))])
    y = torch.tensor([subset[i][1] for i in range(len(subset))])
    with torch.no_grad():
        accuracy = (loaded.model(x).argmax(1) == y).float().mean().item()
    assert accuracy >= 0.75


def test_state_dict_file_forms(tmp_path):
    net = mnist_cnn()
    sd = net.state_dict()
    forms = {
        "bare.pt": sd,
        "wrapped.pth": {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3},
        "model_state.pt": {"model_state_dict": sd},
    }
    for name, obj in forms.items():
        torch.save(obj, tmp_path / name)
        loaded = load_model("pcace.zoo:mnist_cnn", checkpoint=tmp_path / name)
        assert weights_hash(loaded.model) == weights_hash(net), name
        assert loaded.categories == [str(d) for d in range(10)]
        assert loaded.transform is not None


def test_factory_errors(tmp_path):
    torch.save(mnist_cnn().state_dict(), tmp_path / "mnist.pt")
    with pytest.raises(ValueError, match="missing keys: .*unexpected keys"):
        load_model("pcace.zoo:cifar_resnet20", checkpoint=tmp_path / "mnist.pt")
    with pytest.raises(ValueError, match="num_classes"):
        load_model("pcace.zoo:mnist_cnn", checkpoint=tmp_path / "mnist.pt",
                   model_kwargs={"num_classes": 3})
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model("pcace.zoo:mnist_cnn", checkpoint=tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="did you mean cifar_resnet20"):
        load_model("pcace.zoo:cifar_resnet2")
    with pytest.raises(ValueError, match="cannot import"):
        load_model("no_such_package_xyz.models:net")
    with pytest.raises(ValueError, match="not a torch.nn.Module"):
        load_model("collections:OrderedDict")
    with pytest.raises(ValueError, match="model_kwargs"):
        load_model("pcace.zoo:mnist_cnn", model_kwargs={"width": 3})


def test_checkpoint_with_pickled_model_is_refused(tmp_path):
    torch.save(mnist_cnn(), tmp_path / "full.pt")  # a pickled module, not a state dict
    with pytest.raises(ValueError, match="state_dict"):
        load_state_dict_file(tmp_path / "full.pt")


def test_bad_specs():
    for spec in ("resnet18", "not a spec", "torchvision:", ""):
        with pytest.raises(ValueError):
            load_model(spec)
    with pytest.raises(ValueError, match="torchvision:NAME"):
        load_model("resnet18")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model("missing/model.pt")


def test_torchvision_random_weights_and_reload():
    loaded = load_model("torchvision:resnet18", weights="none")
    assert isinstance(loaded, LoadedModel)
    assert isinstance(loaded.model, tvm.ResNet) and not loaded.model.training
    assert loaded.categories is None
    assert loaded.input_shape == (3, 224, 224)
    assert loaded.transform is not None
    json.dumps(loaded.spec)
    again = load_model(json.loads(json.dumps(loaded.spec)))
    assert type(again.model) is type(loaded.model)
    assert again.spec == loaded.spec


def test_torchvision_unknown_name_suggests():
    with pytest.raises(ValueError, match="resnet18"):
        load_model("torchvision:resnet181")
    assert load_model("torchvision:ResNet18").spec["name"] == "resnet18"


def test_torchvision_weights_resolve_without_download():
    assert resolve_torchvision_weights("resnet18", "DEFAULT") is tvm.ResNet18_Weights.DEFAULT
    assert resolve_torchvision_weights("resnet18", "imagenet1k_v1") is \
        tvm.ResNet18_Weights.IMAGENET1K_V1
    assert resolve_torchvision_weights("resnet18", "ResNet18_Weights.IMAGENET1K_V1") is \
        tvm.ResNet18_Weights.IMAGENET1K_V1
    assert resolve_torchvision_weights("vgg16", "DEFAULT") is tvm.VGG16_Weights.IMAGENET1K_V1
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        resolve_torchvision_weights("resnet18", "IMAGENET1K_V9")
    with pytest.raises(ValueError, match="not for resnet18"):
        resolve_torchvision_weights("resnet18", "VGG16_Weights.IMAGENET1K_V1")


def test_torchvision_named_weights_metadata(monkeypatch):
    """The named-weights path, with the download replaced by a random state dict."""
    fake = tvm.resnet18().state_dict()
    monkeypatch.setattr(tvm.WeightsEnum, "get_state_dict", lambda self, *a, **k: fake)
    loaded = load_model("torchvision:resnet18", weights="DEFAULT")
    assert len(loaded.categories) == 1000 and loaded.categories[285] == "Egyptian cat"
    assert loaded.spec["weights"] == "ResNet18_Weights.IMAGENET1K_V1"
    assert loaded.input_shape == (3, 224, 224)
    from PIL import Image

    assert loaded.transform(Image.new("RGB", (300, 260))).shape == (3, 224, 224)


def test_torchvision_state_dict_file(tmp_path):
    net = tvm.mobilenet_v3_small()
    torch.save({"state_dict": net.state_dict()}, tmp_path / "mnv3.pth")
    loaded = load_model("torchvision:mobilenet_v3_small", weights=str(tmp_path / "mnv3.pth"))
    assert weights_hash(loaded.model) == weights_hash(net)
    assert loaded.spec["checkpoint"].endswith("mnv3.pth")
    assert load_model(loaded.spec).spec == loaded.spec
    with pytest.raises(ValueError, match="does not match"):
        load_model("torchvision:resnet18", checkpoint=tmp_path / "mnv3.pth")


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript(tmp_path):
    net = mnist_cnn().eval()
    path = tmp_path / "mnist.ts"
    torch.jit.save(torch.jit.script(net), str(path))
    loaded = load_model(str(path))
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), net(x))
    assert loaded.spec["kind"] == "torchscript"
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ValueError, match="not a TorchScript"):
        load_model(str(tmp_path / "sd.pt"))


def test_timm_missing_says_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ValueError, match="pip install timm"):
        load_model("timm:resnet18")


def test_weights_hash_changes_with_weights():
    net = mnist_cnn()
    h = weights_hash(net)
    assert len(h) == 16 and int(h, 16) >= 0
    with torch.no_grad():
        net.conv1.weight[0, 0, 0, 0] += 1.0
    assert weights_hash(net) != h
