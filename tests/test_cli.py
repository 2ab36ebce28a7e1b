"""The pcace command: happy paths on shared data, and one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pcace.cli.main import main
from pcace.cli.parser import parse_size


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pcace.cli.main", *args], capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def cifar_args(shared_dir):
    return ["--model", "pcace.zoo:cifar_resnet20", "--checkpoint",
            str(shared_dir / "data/cifar10/resnet20-12fca82f.th"),
            "--data", str(shared_dir / "data/cifar10/test"), "--class", "cat",
            "--mean", "0.485", "0.456", "0.406", "--std", "0.229", "0.224", "0.225"]


def test_rank_writes_run_directory(cifar_args, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("rank", *cifar_args, "--target", "cat", "--limit", "60", "--layers",
                   "layer3.2.conv2", "layer1.0.conv1", "--no-progress", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "layer3.2.conv2" in proc.stdout
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["data"]["n_images"] == 60
    assert manifest["target"]["index"] == 3
    assert manifest["layers"] == ["layer1.0.conv1", "layer3.2.conv2"]  # network order
    assert (out / "channels.csv").exists() and (out / "layers.csv").exists()


def test_rank_bootstrap_interval_option(cifar_args, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("rank", *cifar_args, "--target", "cat", "--limit", "60", "--layers",
                   "layer3.2.conv2", "--bootstrap", "8", "--interval", "basic", "--no-progress",
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["interval"] == "basic" and manifest["bootstrap"] == 8
    header = (out / "channels.csv").read_text().splitlines()[0]
    assert "ci_low" in header and "ci_high" in header


def test_layers_lists_modules(cifar_args):
    proc = run_cli("layers", *cifar_args[:4], "--input-shape", "3", "32", "32")
    assert proc.returncode == 0, proc.stderr
    assert "layer3.2.conv2" in proc.stdout and "Conv2d" in proc.stdout


@pytest.mark.parametrize("change, message", [
    (("--layers", "layer9.conv"), "layer9.conv"),
    (("--target", "12"), "12"),
    (("--target", "unicorn"), "unicorn"),
    (("--class", "unicorn"), "unicorn"),
])
def test_bad_input_one_line_no_traceback(cifar_args, tmp_path, change, message):
    args = list(cifar_args) + ["--target", "cat", "--limit", "20", "--no-progress",
                               "--out", str(tmp_path / "x")]
    flag = change[0]
    if flag in args and flag != "--layers":
        i = args.index(flag)
        args[i + 1] = change[1]
    else:
        args += list(change)
    proc = run_cli("rank", *args)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr
    assert proc.stderr.startswith("pcace: error:")


def test_unknown_model_and_missing_data(tmp_path):
    proc = run_cli("rank", "--model", "torchvision:resnet1800", "--weights", "none", "--data",
                   str(tmp_path), "--target", "1", "--out", str(tmp_path / "o"))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "resnet1800" in proc.stderr
    proc = run_cli("rank", "--model", "torchvision:resnet18", "--weights", "none", "--data",
                   str(tmp_path / "nowhere"), "--target", "1", "--out", str(tmp_path / "o"))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "nowhere" in proc.stderr


def test_too_few_images(cifar_args, tmp_path):
    assert main(["rank", *cifar_args, "--target", "cat", "--limit", "5", "--no-progress",
                 "--out", str(tmp_path / "o")]) == 2


def test_parse_size():
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("512M") == 512 * 2**20
    assert parse_size("1000") == 1000


def test_rank_report_and_ablate(cifar_args, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("rank", *cifar_args, "--target", "cat", "--limit", "60", "--layers",
                   "layer3.2.conv2", "--permutations", "19", "--report", "--no-progress",
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    html = (out / "report.html").read_text()
    assert "layer3.2.conv2" in html and "data:image/png;base64" in html
    assert (out / "figures" / "overview.png").exists()
    channels = (out / "channels.csv").read_text().splitlines()[0]
    assert "p_value" in channels and "pcace_adj" in channels

    proc = run_cli("report", str(out))
    assert proc.returncode == 0, proc.stderr

    proc = run_cli("ablate", str(out), "--layer", "layer3.2.conv2", "--sizes", "1", "4",
                   "--repeats", "2", "--no-baselines", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert (out / "ablation_layer3.2.conv2.csv").exists()
    assert "pcace" in proc.stdout

    proc = run_cli("ablate", str(out), "--layer", "conv1")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "layer3.2.conv2" in proc.stderr  # lists the run's layers


def test_report_on_a_non_run_directory(tmp_path):
    proc = run_cli("report", str(tmp_path))
    assert proc.returncode != 0 and "not a pcace run directory" in proc.stderr


def test_rank_several_targets_one_line_each(cifar_args, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("rank", *cifar_args, "--target", "cat", "--target", "dog", "--limit", "40",
                   "--layers", "layer2.0.conv1", "layer3.2.conv2", "--no-progress",
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["target_labels"] == ["cat", "dog"]
    assert [t["index"] for t in manifest["targets"]] == [3, 5]
    lines = proc.stdout.splitlines()
    assert sum(line.lstrip().startswith("target ") for line in lines) == 2
    assert len(lines) < 10  # a short line per target, not a table per target
    import pandas as pd

    channels = pd.read_csv(out / "channels.csv")
    assert channels.groupby("target").size().to_dict() == {"cat": 96, "dog": 96}


def test_rank_per_class_writes_atlas(cifar_args, shared_dir, tmp_path):
    data = tmp_path / "three"
    for name in ("airplane", "automobile", "bird"):  # class indices 0, 1, 2 of CIFAR-10
        (data / name).mkdir(parents=True)
        for src in sorted((shared_dir / "data/cifar10/test" / name).glob("*.jpg"))[:14]:
            (data / name / src.name).symlink_to(src)
    args = [a for a in cifar_args if a not in ("--class", "cat")]
    args[args.index("--data") + 1] = str(data)
    out = tmp_path / "run"
    proc = run_cli("rank", *args, "--per-class", "--layers", "layer3.2.conv2",
                   "--permutations", "9", "--report", "--no-progress", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["per_label"] and manifest["data"]["labels"] == {"0": 14, "1": 14, "2": 14}
    assert (out / "figures" / "class_atlas.png").exists()
    assert "figures/class_atlas.png" in manifest["files"]
    # the overview links one page per class, each the report of that class's own run
    overview = (out / "report.html").read_text()
    pages = sorted(p.name for p in out.glob("report-*.html"))
    assert len(pages) == 3 and all(p in manifest["files"] for p in pages)
    for page in pages:
        assert f'href="{page}"' in overview
        text = (out / page).read_text()
        assert "layer3.2.conv2" in text and "Evidence" in text or "evidence" in text
    assert "label 0 / target airplane" in proc.stdout  # the model's own class names
    assert "own class logit" in proc.stdout
