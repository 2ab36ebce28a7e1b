"""Messages in the caller's language: CLI errors name flags and commands, API errors Python
names (issue 27); one place decides (:mod:`pcace.core.voice`)."""

from __future__ import annotations

import re
from urllib.error import URLError

import pytest
import torch

from pcace.cli.main import main

PYTHON_ONLY = re.compile(r"=True|pcace\.[a-z_.]+\(|\b[a-z_]+=FILE|csv_images|write_report\(")
FLAG = re.compile(r"(?<![\w-])--[a-z]")


def _cli_error(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("pcace: error:"), err
    return err


@pytest.fixture
def cifar(shared_dir):
    return shared_dir / "data/cifar10"


def test_cli_unknown_layer_names_the_layers_command(cifar, tmp_path, capsys):
    err = _cli_error(capsys, "rank", "--model", "pcace.zoo:cifar_resnet20", "--checkpoint",
                     str(cifar / "resnet20-12fca82f.th"), "--data", str(cifar / "test"),
                     "--class", "cat", "--target", "cat", "--layers", "layer4.0.conv1",
                     "--out", str(tmp_path / "run"), "--no-progress")
    assert "pcace layers --model" in err and not PYTHON_ONLY.search(err), err


def test_api_unknown_layer_names_a_function():
    import pcace
    from pcace.zoo import mnist_cnn

    with pytest.raises(ValueError) as info:
        pcace.rank(mnist_cnn(), torch.rand(20, 1, 28, 28), 3, layers=["conv9"], progress=False)
    assert "describe_layers(" in str(info.value) and not FLAG.search(str(info.value))


def test_no_weights_in_each_language(tmp_path, capsys):
    from pcace.inputs.models import load_model

    err = _cli_error(capsys, "rank", "--model", "pcace.zoo:mnist_cnn", "--data",
                     str(tmp_path), "--target", "3", "--out", str(tmp_path / "run"))
    assert "--checkpoint FILE" in err and "--random-weights" in err
    assert not PYTHON_ONLY.search(err), err
    with pytest.raises(ValueError) as info:
        load_model("pcace.zoo:mnist_cnn")
    text = str(info.value)
    assert "checkpoint=FILE" in text and "random_weights=True" in text
    assert not FLAG.search(text), text


def test_failed_download_says_what_to_do(tmp_path, capsys, monkeypatch):
    import torchvision.models._api as api

    def offline(*args, **kwargs):
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    err = _cli_error(capsys, "rank", "--model", "torchvision:resnet18", "--weights", "DEFAULT",
                     "--data", str(tmp_path), "--target", "3", "--out", str(tmp_path / "run"))
    assert "downloading the weights ResNet18_Weights.IMAGENET1K_V1 of resnet18 failed" in err
    assert "Name or service not known" in err and "--checkpoint FILE" in err


def test_a_flat_folder_ranks_as_one_group(cifar, tmp_path, capsys):
    import shutil

    from pcace.inputs.datasets import image_folder

    folder = tmp_path / "flat"
    folder.mkdir()
    for path in sorted((cifar / "test" / "cat").iterdir())[:30]:
        shutil.copy(path, folder / path.name)
    ds = image_folder(folder)
    assert len(ds) == 30 and ds.classes == []
    with pytest.raises(ValueError, match="class_name='cat'"):
        image_folder(folder, class_name="cat")
    model = ["--model", "pcace.zoo:cifar_resnet20", "--checkpoint",
             str(cifar / "resnet20-12fca82f.th"), "--data", str(folder), "--target", "3"]
    code = main(["rank", *model, "--layers", "layer3.2.conv2", "--permutations", "9",
                 "--split-half", "0", "--no-progress", "--out", str(tmp_path / "run")])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert out.out.startswith("PCACE over 30 images")
    err = _cli_error(capsys, "rank", *model, "--class", "cat", "--out", str(tmp_path / "run2"))
    assert "--class 'cat'" in err and not PYTHON_ONLY.search(err)
