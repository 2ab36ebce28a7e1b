"""Runs of several targets or one image set per class, seen from the command line: which
logit each class folder is ranked on, and ``pcace ablate`` on one target of such a run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pcace.cli.main import rounded_table
from pcace.inputs.categories import Categories, folder_classes
from pcace.stats.faithfulness import faithfulness_summary

CIFAR = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
         "truck")


def run_cli(*args: str, path: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(path), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "pcace.cli.main", *args], capture_output=True,
                          text=True, timeout=600, env=env)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("pcace: error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def linked_folders(shared_dir: Path, root: Path, names: dict[str, str], n: int) -> Path:
    """``root/<folder>/`` holding links to ``n`` CIFAR test images of class ``names[folder]``."""
    for folder, cifar_class in names.items():
        (root / folder).mkdir(parents=True)
        for src in sorted((shared_dir / "data/cifar10/test" / cifar_class).glob("*.jpg"))[:n]:
            (root / folder / src.name).symlink_to(src)
    return root


@pytest.fixture(scope="module")
def model_args(shared_dir):
    return ["--model", "pcace.zoo:cifar_resnet20", "--checkpoint",
            str(shared_dir / "data/cifar10/resnet20-12fca82f.th"),
            "--mean", "0.485", "0.456", "0.406", "--std", "0.229", "0.224", "0.225"]


@pytest.fixture(scope="module")
def cat_dog_run(shared_dir, model_args, tmp_path_factory):
    """A --per-class run over folders cat/ and dog/ only (CIFAR-10 classes 3 and 5)."""
    root = tmp_path_factory.mktemp("catdog")
    data = linked_folders(shared_dir, root / "data", {"cat": "cat", "dog": "dog"}, 24)
    out = root / "run"
    proc = run_cli("rank", *model_args, "--data", str(data), "--per-class", "--layers",
                   "layer3.2.conv2", "--permutations", "9", "--split-half", "2",
                   "--no-progress", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_per_class_ranks_each_folder_on_its_own_class_logit(cat_dog_run):
    # folder positions are 0 and 1 (airplane, automobile); the model's cat and dog are 3, 5
    out, proc = cat_dog_run
    channels = pd.read_csv(out / "channels.csv")
    pairs = set(zip(channels.label, channels.target, strict=True))
    assert pairs == {(3, "cat"), (5, "dog")}
    assert json.loads((out / "run.json").read_text())["data"]["labels"] == {"3": 24, "5": 24}
    assert "airplane" not in proc.stdout and "target cat" in proc.stdout


def test_per_class_refuses_folders_that_name_no_class(shared_dir, model_args, tmp_path):
    data = linked_folders(shared_dir, tmp_path / "data", {"cats": "cat", "wolf": "dog"}, 4)
    line = one_line_error(run_cli("rank", *model_args, "--data", str(data), "--per-class",
                                  "--no-progress", "--out", str(tmp_path / "run")))
    assert "cats, wolf" in line and "--categories" in line
    assert not (tmp_path / "run" / "channels.csv").exists()


def test_ablate_on_a_per_class_run_needs_a_target_and_says_which(cat_dog_run):
    out, _ = cat_dog_run
    line = one_line_error(run_cli("ablate", str(out), "--layer", "layer3.2.conv2"))
    assert "--target" in line and "cat, dog" in line
    line = one_line_error(run_cli("ablate", str(out), "--layer", "layer3.2.conv2",
                                  "--target", "horse"))
    assert "horse" in line and "cat, dog" in line


def test_ablate_tests_one_target_on_its_images_with_the_models_labels(cat_dog_run):
    out, _ = cat_dog_run
    proc = run_cli("ablate", str(out), "--layer", "layer3.2.conv2", "--target", "dog",
                   "--sizes", "1", "4", "64", "--repeats", "3", "--no-baselines",
                   "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "target dog, 24 images" in proc.stdout
    # dogs labelled 5 (the model's dog): the trained model gets most of them right; with
    # the folder's position (1, automobile) as label it got almost none
    accuracy = float(proc.stdout.split("accuracy ")[1].split("%")[0]) / 100
    assert accuracy > 0.5
    assert "class folders" in proc.stdout
    curves = pd.read_csv(out / "ablation_layer3.2.conv2_dog.csv")
    summary = pd.read_csv(out / "faithfulness_layer3.2.conv2_dog.csv").set_index("ranking")
    # the gap averages m = 1 and 4 only: m = 64 ablates the whole layer (every set the same)
    rows = curves.set_index(["ranking", "selection", "m"]).score_change
    gap = [rows["pcace", "top", m] - rows["random", "random", m] for m in (1, 4)]
    assert summary.loc["pcace", "mean_gap"] == pytest.approx((gap[0] + gap[1]) / 2, abs=1e-9)
    assert "8.67" not in proc.stdout and "e-1" not in proc.stdout


def test_repeated_class_and_all_among_targets_are_refused(model_args, shared_dir, tmp_path):
    base = [*model_args, "--data", str(shared_dir / "data/cifar10/test"), "--no-progress",
            "--out", str(tmp_path / "run")]
    line = one_line_error(run_cli("rank", *base, "--class", "cat", "--class", "dog",
                                  "--target", "cat"))
    assert "--class" in line and "cat, dog" in line
    line = one_line_error(run_cli("rank", *base, "--class", "cat", "--target", "cat",
                                  "--target", "all"))
    assert "--target all" in line and "unknown class" not in line


def test_layers_on_a_grey_model_names_input_shape(tmp_path):
    (tmp_path / "grey_net.py").write_text(
        "import torch.nn as nn\n"
        "def grey():\n"
        "    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),\n"
        "                         nn.Flatten(), nn.Linear(4, 2))\n")
    line = one_line_error(run_cli("layers", "--model", "grey_net:grey", path=tmp_path))
    assert "--input-shape" in line and "(3, 224, 224)" in line
    proc = run_cli("layers", "--model", "grey_net:grey", "--input-shape", "1", "28", "28",
                   path=tmp_path)
    assert proc.returncode == 0, proc.stderr and "Conv2d" in proc.stdout


# ---------------------------------------------------------------------------------------
# The pieces, on plain values
# ---------------------------------------------------------------------------------------


def test_folders_match_the_models_classes_by_name():
    cifar = Categories(CIFAR, "model")
    assert folder_classes(["cat", "dog"], cifar, 10).indices == (3, 5)
    assert folder_classes(["Cat", "TRUCK"], cifar, 10).indices == (3, 9)
    assert folder_classes(list(CIFAR), cifar, 10).identity
    missing = folder_classes(["cat", "wolf"], cifar, 10)
    assert missing.indices is None and "wolf" in missing.reason
    assert folder_classes(["cat"], None, 10).indices is None
    assert "1 output" in folder_classes(["a", "b"], Categories(("a",), "declared"), 1).reason


def test_the_whole_layer_is_left_out_of_the_gaps():
    def curves(ms):
        rows = []
        for m in ms:
            rows += [("r", "top", m, 2.0 * m, None), ("r", "bottom", m, 0.5 * m, None),
                     ("random", "random", m, 1.0 * m, 0.1)]
        frame = pd.DataFrame(rows, columns=["ranking", "selection", "m", "score_drop",
                                            "score_drop_sd"])
        frame.attrs["n_channels"] = 8
        return frame

    with_whole = faithfulness_summary(curves([1, 2, 8]))
    without = faithfulness_summary(curves([1, 2]))
    assert with_whole.mean_gap.iloc[0] == pytest.approx(without.mean_gap.iloc[0])
    assert without.mean_gap.iloc[0] == pytest.approx(1.5)  # gaps 1 and 2, one octave apart
    with pytest.raises(ValueError, match="below the channel count"):
        faithfulness_summary(curves([8]))


def test_tables_print_rounding_noise_as_zero():
    text = rounded_table(pd.DataFrame({"gap": [0.31234567, 8.673617e-19, np.nan],
                                       "big": [12345.678, 2.0, 3.0]}))
    assert "e-19" not in text and "0.3123" in text and "0.0000" in text
    assert "1.235e+04" in text


def test_many_targets_print_out_leads_with_the_verdicts():
    from pcace.results.printout import many_summary
    from pcace.results.result import PCACEResult

    layers = pd.DataFrame({
        "layer": ["a", "b"] * 3, "target": ["cat"] * 2 + ["dog"] * 2 + ["car"] * 2,
        "channels": [4] * 6, "median": [0.2] * 6,
        "evidence": ["none", "weak", "none", "strong", "strong", "strong"],
        "significant_share": [0.0, 0.25, 0.0, 0.75, 1.0, 0.5],
        "split_half_spearman": [0.1, 0.5, 0.0, 0.9, 0.95, 0.85]})
    channels = pd.DataFrame([(layer, target, c, c + 1, 0.9 - 0.1 * c)
                             for layer in "ab" for target in ("cat", "dog", "car")
                             for c in range(4)],
                            columns=["layer", "target", "channel", "rank", "pcace"])
    lines = many_summary(PCACEResult(channels, layers, {})).splitlines()
    assert lines[0] == "Answer per target: 2 of 3 have a strong layer."
    # the targets with strong layers first (most strong layers first), each with its best
    # strong layer; the one without is not shown as a finding
    assert lines[2].split()[:2] == ["target", "car"] and "2 of 2 layers strong" in lines[2]
    assert "best a: 100% beat chance" in lines[2]
    assert lines[3].split()[:2] == ["target", "dog"] and "best b" in lines[3]
    assert lines[4].split()[:2] == ["target", "cat"]
    assert "no strong layer (1 none, 1 weak): its rankings are not findings" in lines[4]
    assert "0:0.900" not in lines[4]


def test_report_of_a_per_class_run_names_every_page(cat_dog_run):
    out, _ = cat_dog_run
    proc = run_cli("report", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "2 target pages" in proc.stdout
    assert sorted(p.name for p in out.glob("report-*.html")) == ["report-3_cat.html",
                                                                   "report-5_dog.html"]


def test_per_label_from_python_refuses_folder_positions_that_are_not_the_classes(tmp_path):
    # the Python route of the same trap: an image folder holding only cat/ and dog/
    import torch
    from PIL import Image

    import pcace
    from pcace.data import image_folder, relabel
    from pcace.zoo import mnist_cnn

    for folder in ("cat", "dog"):
        (tmp_path / folder).mkdir()
        for i in range(3):
            Image.new("L", (28, 28), 40 * i).save(tmp_path / folder / f"{i}.png")
    ds = image_folder(tmp_path)
    with pytest.raises(ValueError, match=r"relabel\(images, \[3, 5\], categories\)"):
        pcace.rank(mnist_cnn(), ds, None, per_label=True, categories=list(CIFAR),
                   progress=False)
    relabel(ds, [3, 5], CIFAR)
    assert sorted(set(ds.targets)) == [3, 5] and ds.classes[5] == "dog"
    from pcace.run.groups import check_folder_labels

    check_folder_labels(torch.utils.data.Subset(ds, range(4)), list(CIFAR))  # now accepted


def test_a_run_saved_over_an_earlier_one_leaves_no_empty_report_folders(tmp_path):
    # a resumed (or re-saved) run drops the earlier run's report files; their folders go
    # with them (they were left empty: figures/<target>/, assets/<target>/)
    import torch

    import pcace
    from pcace.results.rundir import add_files
    from pcace.zoo import mnist_cnn

    images = torch.rand(24, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    first = pcace.rank(mnist_cnn(), images, [1, 7], progress=False, permutations=0,
                       split_half=0)
    first.save(tmp_path)
    for name in ("figures/1/maps.png", "assets/1/index.json", "figures/7/maps.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    add_files(tmp_path, ["figures", "assets"])
    again = pcace.rank(mnist_cnn(), images, [1, 7], progress=False, permutations=0,
                       split_half=0)
    again.save(tmp_path)
    assert not (tmp_path / "figures").exists() and not (tmp_path / "assets").exists()
    assert (tmp_path / "channels.csv").exists()
