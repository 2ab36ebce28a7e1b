"""Tests of pcace.zoo and pcace.inputs.models (no downloads)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torchvision.models as tvm
from torch.utils.data import Subset

from pcace.inputs.data import image_folder
from pcace.inputs.models import (
    LoadedModel,
    count_parameters,
    load_model,
    load_state_dict_file,
    output_size,
    resolve_torchvision_weights,
    weights_hash,
)
from pcace.inputs.rebuild import rebuild_model
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
        load_model("collections:OrderedDict", random_weights=True)
    with pytest.raises(ValueError, match="model_kwargs"):
        load_model("pcace.zoo:mnist_cnn", model_kwargs={"width": 3}, random_weights=True)


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
    assert load_model("torchvision:ResNet18", weights="none").spec["name"] == "resnet18"


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
def test_torchscript_is_refused_with_what_to_use(tmp_path):
    """PyTorch runs no hooks on ScriptModules, nor on their submodules: refuse, say why."""
    net = mnist_cnn().eval()
    path = tmp_path / "mnist.ts"
    torch.jit.save(torch.jit.script(net), str(path))
    scripted = torch.jit.load(str(path))
    for module in (scripted, dict(scripted.named_modules())["conv1"]):
        with pytest.raises(RuntimeError, match="not supported on ScriptModules"):
            module.register_forward_hook(lambda *a: None)
    with pytest.raises(ValueError, match=r"TorchScript .*no forward hooks.*torch\.export"):
        load_model(str(path))
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ValueError, match="not an exported program.*package.module:factory"):
        load_model(str(tmp_path / "sd.pt"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    net = mnist_cnn().eval()
    path = tmp_path_factory.mktemp("export") / "mnist.pt2"
    batch = torch.export.Dim.DYNAMIC
    program = torch.export.export(net, (torch.rand(4, 1, 28, 28),),
                                  dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return net, path


def test_exported_program_loads_with_working_hooks(exported):
    net, path = exported
    loaded = load_model(str(path))
    assert loaded.spec["kind"] == "exported" and loaded.input_shape == (1, 28, 28)
    assert weights_hash(loaded.model) == weights_hash(net)
    seen = []
    layer = dict(loaded.model.named_modules())["conv2"]
    layer.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), net(x), atol=1e-6)
    assert seen == [(5, 16, 14, 14)]


def test_exported_program_with_fixed_batch_is_refused(tmp_path):
    path = tmp_path / "fixed.pt2"
    torch.export.save(torch.export.export(mnist_cnn().eval(), (torch.rand(2, 1, 28, 28),)),
                      str(path))
    with pytest.raises(ValueError, match="batches of exactly 2.*Dim.DYNAMIC"):
        load_model(str(path))


def test_rank_runs_on_an_exported_program(exported):
    import pcace

    _, path = exported
    loaded = load_model(str(path))
    res = pcace.rank(loaded.model, torch.rand(40, 1, 28, 28), target=3, layers=["conv1"],
                     progress=False, device="cpu")
    assert len(res.channels) == 8 and res.channels.pcace.between(0, 1).all()


# --- no silent random weights ------------------------------------------------------------------

def test_factory_without_checkpoint_is_refused():
    with pytest.raises(ValueError, match=r"pcace.zoo:cifar_resnet20 has no trained weights .*"
                       "random_weights=True"):
        load_model("pcace.zoo:cifar_resnet20")
    with pytest.raises(ValueError, match="no trained weights"):
        load_model("torchvision:resnet18")


def test_random_weights_are_seeded_and_recorded():
    a = load_model("pcace.zoo:cifar_resnet20", random_weights=True)
    b = load_model("pcace.zoo:cifar_resnet20", random_weights=True)
    c = load_model("pcace.zoo:cifar_resnet20", random_weights=True, seed=1)
    assert weights_hash(a.model) == weights_hash(b.model) != weights_hash(c.model)
    assert a.spec["random_weights"] is True and a.spec["seed"] == 0 and c.spec["seed"] == 1
    assert "random weights (seed 1)" in c.description
    again = load_model(json.loads(json.dumps(c.spec)))
    assert weights_hash(again.model) == weights_hash(c.model)
    state = torch.random.get_rng_state()
    tv = load_model("torchvision:resnet18", weights="none", seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    assert weights_hash(tv.model) == weights_hash(load_model(tv.spec).model)


# --- rebuilding the model a run records (pcace ablate) -----------------------------------------

def recorded(loaded: LoadedModel) -> dict:
    """run.json's model entry, as rank writes it, through JSON."""
    return json.loads(json.dumps({"class": type(loaded.model).__name__,
                                  "weights_sha256": weights_hash(loaded.model),
                                  "spec": loaded.spec}))


def test_rebuild_refuses_a_factory_named_only_in_run_json(tmp_path):
    marker = tmp_path / "pwned"
    entry = {"weights_sha256": "0" * 16,
             "spec": {"kind": "factory", "spec": "os:system", "weights": None,
                      "checkpoint": None, "model_kwargs": {"command": f"touch {marker}"}}}
    with pytest.raises(ValueError, match="not a known builder.*model='os:system'"):
        rebuild_model(entry)
    assert not marker.exists()
    with pytest.raises(ValueError, match="differs from the run's model"):
        rebuild_model(entry, model="pcace.zoo:mnist_cnn")
    assert not marker.exists()
    entry["spec"]["kind"] = "torchvision"  # a builder's kind with someone else's spec
    with pytest.raises(ValueError, match="not a known builder"):
        rebuild_model(entry)
    entry["spec"].update(kind="factory", spec="pcace.zoo:torch")  # not a zoo factory
    with pytest.raises(ValueError, match="not a known builder"):
        rebuild_model(entry)
    assert not marker.exists()


def test_rebuild_known_builders_and_check_the_hash(tmp_path):
    net = mnist_cnn()
    torch.save(net.state_dict(), tmp_path / "mnist.pt")
    loaded = load_model("pcace.zoo:mnist_cnn", checkpoint=tmp_path / "mnist.pt")
    entry = recorded(loaded)
    assert weights_hash(rebuild_model(entry).model) == entry["weights_sha256"]
    tv = load_model("torchvision:resnet18", weights="none", seed=2)
    assert weights_hash(rebuild_model(recorded(tv)).model) == weights_hash(tv.model)
    with torch.no_grad():
        net.conv1.weight.add_(1.0)
    torch.save(net.state_dict(), tmp_path / "mnist.pt")  # the checkpoint changed since the run
    with pytest.raises(ValueError, match=r"weights \(hash [0-9a-f]{16}\) differ from the run's "
                       r".*mnist.pt changed since the run.*checkpoint=FILE"):
        rebuild_model(entry)
    torch.save(mnist_cnn().state_dict(), tmp_path / "moved.pt")
    with pytest.raises(ValueError, match="differ from the run's"):
        rebuild_model(entry, checkpoint=tmp_path / "moved.pt")
    del entry["weights_sha256"]
    with pytest.raises(ValueError, match="records no weights_sha256"):
        rebuild_model(entry)


def test_rebuild_a_user_factory_named_again(tmp_path):
    net = mnist_cnn()
    torch.save(net.state_dict(), tmp_path / "mnist.pt")
    loaded = load_model("pcace.zoo:MnistCNN", checkpoint=tmp_path / "mnist.pt")
    entry = recorded(loaded)
    rebuilt = rebuild_model(entry, model="pcace.zoo:MnistCNN")
    assert weights_hash(rebuilt.model) == weights_hash(net)


def test_rebuild_refuses_unsafe_recorded_kwargs():
    entry = {"weights_sha256": "0" * 16,
             "spec": {"kind": "timm", "spec": "timm:resnet18", "weights": None,
                      "checkpoint": None,
                      "model_kwargs": {"pretrained_cfg_overlay": {"file": "/x.pkl"}}}}
    with pytest.raises(ValueError, match="cannot be replayed safely"):
        rebuild_model(entry)


def test_rebuild_exported_needs_the_file_named(exported):
    net, path = exported
    entry = recorded(load_model(str(path)))
    with pytest.raises(ValueError, match="name it again with model="):
        rebuild_model(entry)
    assert weights_hash(rebuild_model(entry, model=str(path)).model) == weights_hash(net)


def test_output_size():
    assert output_size(mnist_cnn(), (1, 28, 28)) == 10
    assert output_size(cifar_resnet20(num_classes=1), (3, 32, 32)) == 1


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
