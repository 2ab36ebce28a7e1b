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
PYTHON_ARG = re.compile(r"\b[a-z_]+=")  # a Python keyword argument


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


# ---------------------------------------------------------------- the run directory, the lock,
# the Ray engine, the run's options, the rebuilt model, the report's texts

def _saved_run(tmp_path, name="run", **options):
    import pcace
    from pcace.zoo import mnist_cnn

    torch.manual_seed(0)
    result = pcace.rank(mnist_cnn().eval(), torch.rand(24, 1, 28, 28), 3, layers=["conv1"],
                        progress=False, split_half=0, **options)
    result.save(tmp_path / name)
    return tmp_path / name


def _both(call) -> tuple[str, str]:
    """The message ``call`` raises under the command line and under the API."""
    from pcace.core.voice import speaking_cli

    with speaking_cli(), pytest.raises((ValueError, OSError)) as cli:
        call()
    with pytest.raises((ValueError, OSError)) as api:
        call()
    return str(cli.value), str(api.value)


def _speaks(cli: str, api: str, flag: str, name: str) -> None:
    assert flag in cli and not PYTHON_ONLY.search(cli) and not PYTHON_ARG.search(cli), cli
    assert name in api and not FLAG.search(api), api


def test_run_directory_messages_in_each_language(tmp_path, capsys):
    from pcace.results.rundir import prepare_run_dir, read_run

    run = _saved_run(tmp_path, permutations=0)
    cli, api = _both(lambda: prepare_run_dir(run))  # a pcace run there, neither force nor resume
    _speaks(cli, api, "--force", "force=True")
    assert "--resume" in cli and "--out" in cli and "resume=True" in api
    cli, api = _both(lambda: prepare_run_dir(run, force=True, resume=True))
    _speaks(cli, api, "--resume", "resume=True")
    (run / "layers.csv").write_text("tampered\n")
    cli, api = _both(lambda: read_run(run))
    _speaks(cli, api, "--force", "result.save(run_dir)")
    err = _cli_error(capsys, "report", str(run))  # the command says it the same way
    assert "run the command again with --force" in err and not PYTHON_ONLY.search(err), err


def test_a_busy_directory_in_each_language(tmp_path, capsys):
    import json

    from pcace.results.lock import LOCK_NAME, LockInfo, RunDirBusy
    from pcace.results.rundir import prepare_run_dir

    out = tmp_path / "busy"
    out.mkdir()
    info = {**LockInfo.this_process().__dict__, "host": "node-17.cluster", "pid": 4242}
    (out / LOCK_NAME).write_text(json.dumps(info))
    with pytest.raises(RunDirBusy) as api:
        prepare_run_dir(out)
    assert "choose another directory" in str(api.value) and not FLAG.search(str(api.value))
    err = _cli_error(capsys, "rank", "--model", "pcace.zoo:mnist_cnn", "--random-weights",
                     "--data", str(tmp_path), "--target", "3", "--out", str(out))
    assert "choose another --out" in err and not PYTHON_ONLY.search(err), err


def test_a_lost_ray_cluster_in_each_language():
    pytest.importorskip("ray")
    from pcace.core.voice import speaking_cli
    from pcace.engines.ray import _lost_message
    from pcace.engines.select import resolve_engine

    lost = ConnectionError("GCS refused")
    with speaking_cli():
        cli = _lost_message("10.0.0.1:6379", lost)
    api = _lost_message("10.0.0.1:6379", lost)
    _speaks(cli, api, "--resume", "resume=True")
    assert "--engine local" in cli and "engine='local'" in api
    cli, api = _both(lambda: resolve_engine("local", address="auto"))
    _speaks(cli, api, "--ray-address", "engine='ray'")


def test_run_options_in_each_language():
    from pcace.run.config import RankOptions

    cli, api = _both(lambda: RankOptions(per_label=True, label=3))
    _speaks(cli, api, "--per-class", "per_label=True")
    cli, api = _both(lambda: RankOptions(resume=True))
    _speaks(cli, api, "--resume needs --out", "resume=True needs checkpoint_dir=")
    cli, api = _both(lambda: RankOptions(bootstrap=1))
    _speaks(cli, api, "--bootstrap 2", "bootstrap=2")


def test_a_run_made_from_python_is_ablated_from_python(tmp_path, capsys):
    from pcace.inputs.rebuild import rebuild_model

    run = _saved_run(tmp_path, permutations=0)
    err = _cli_error(capsys, "ablate", str(run), "--layer", "conv1")
    assert "from Python" in err and not PYTHON_ONLY.search(err), err
    with pytest.raises(ValueError) as api:
        rebuild_model({"spec": None})
    assert "pcace.ablate(" in str(api.value) and not FLAG.search(str(api.value))
    err = _cli_error(capsys, "rank", "--model", "not a spec", "--data", str(tmp_path),
                     "--target", "3", "--out", str(tmp_path / "never"))
    assert "--checkpoint FILE" in err and not PYTHON_ONLY.search(err), err


def test_the_report_speaks_as_it_was_asked(tmp_path, capsys):
    """A run without a null and without assets: the report says how to get both, with
    flags when `pcace report` wrote it and with Python names when write_report did."""
    from pcace.viz import write_report

    run = _saved_run(tmp_path, permutations=0)
    html = write_report(run).read_text(encoding="utf-8")
    assert "permutations=199" in html and "collect_assets(" in html
    assert "--permutations" not in html and "--report" not in html
    assert main(["report", str(run)]) == 0
    capsys.readouterr()
    html = (run / "report.html").read_text(encoding="utf-8")
    assert "--permutations 199" in html and "pcace rank ... --report" in html
    assert not PYTHON_ONLY.search(html.replace("pcace.zoo", "")), PYTHON_ONLY.search(html)


def test_a_sampled_basis_warning_in_each_language():
    from pcace.core.voice import speaking_cli
    from pcace.reduce.sampled_route import _poor_message

    with speaking_cli():
        cli = _poor_message({"layer3.2.conv2": 4}, 40)
    api = _poor_message({"layer3.2.conv2": 4}, 40)
    _speaks(cli, api, "--basis exact", "basis='exact'")
    assert "--sample-size M" in cli and "manifest[" not in cli and "manifest['routes']" in api


def test_pcace_report_draws_chosen_layers(tmp_path, capsys):
    run = _saved_run(tmp_path, permutations=0)
    err = _cli_error(capsys, "report", str(run), "--layers", "conv9")
    assert "has no layer 'conv9'; its layers: ['conv1']" in err, err
    assert main(["report", str(run), "--layers", "conv1"]) == 0
    html = (run / "report.html").read_text(encoding="utf-8")
    assert 'id="layer-conv1" class="layer"' in html
