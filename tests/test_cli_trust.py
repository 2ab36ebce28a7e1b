"""Runs you can trust (issue 12): each scenario a user or a careless colleague can cause.

Every test drives the real ``pcace`` command in a subprocess on the shared CIFAR ResNet-20
and checks what the user sees: the exit code, one line on stderr, the run directory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None
            ) -> subprocess.CompletedProcess:
    full = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "pcace.cli.main", *args], capture_output=True,
                          text=True, timeout=600, env=full, cwd=cwd)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("pcace: error")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def weights(shared_dir):
    return shared_dir / "data/cifar10/resnet20-12fca82f.th"


@pytest.fixture(scope="module")
def cifar(shared_dir, weights):
    return ["--model", "pcace.zoo:cifar_resnet20", "--checkpoint", str(weights),
            "--data", str(shared_dir / "data/cifar10/test"), "--class", "cat",
            "--mean", "0.485", "0.456", "0.406", "--std", "0.229", "0.224", "0.225"]


@pytest.fixture(scope="module")
def small_run(cifar, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "cat"
    proc = run_cli("rank", *cifar, "--target", "cat", "--limit", "30", "--layers",
                   "layer3.2.conv2", "--no-progress", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# 1. a run directory is data: nothing in it is imported or called

def test_edited_run_json_runs_nothing(small_run, tmp_path):
    run = _copy_run(small_run, tmp_path / "run")
    manifest = json.loads((run / "run.json").read_text())
    marker = tmp_path / "pwned"
    manifest["model"]["spec"] = {"kind": "factory", "spec": "os:system",
                                 "model_kwargs": {"command": f"touch {marker}"}}
    (run / "run.json").write_text(json.dumps(manifest))
    line = one_line_error(run_cli("ablate", str(run), "--layer", "layer3.2.conv2",
                                  "--sizes", "1", "--repeats", "1", "--no-baselines"))
    assert "os:system" in line and "--model" in line
    assert not marker.exists()


# 2. targets mean the model's classes

def test_class_name_against_folders_that_are_not_the_models_classes(shared_dir, weights,
                                                                     tmp_path):
    only_cats = tmp_path / "data" / "cat"
    only_cats.mkdir(parents=True)
    for src in sorted((shared_dir / "data/cifar10/test/cat").glob("*.jpg"))[:20]:
        shutil.copy(src, only_cats / src.name)
    factory = tmp_path / "plainnet.py"  # a factory that declares no class names
    factory.write_text("from pcace.zoo import cifar_resnet20\n\n"
                       "def net():\n    return cifar_resnet20()\n")
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = ["--checkpoint", str(weights), "--data", str(tmp_path / "data"), "--target", "cat",
            "--layers", "layer3.2.conv2", "--no-progress"]
    line = one_line_error(run_cli("rank", "--model", "plainnet:net", *args,
                                  "--out", str(tmp_path / "a"), env=env))
    assert "cat" in line and ("index" in line or "categories" in line)
    # the same folder with a model that declares its classes: its own class 3
    ok = run_cli("rank", "--model", "pcace.zoo:cifar_resnet20", *args,
                 "--out", str(tmp_path / "b"))
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "b/run.json").read_text())["target"]["index"] == 3
    assert "logit of class 3 (cat" in ok.stderr


# 3. no silent random weights

def test_factory_without_weights_is_refused_unless_asked(shared_dir, tmp_path):
    data = ["--data", str(shared_dir / "data/cifar10/test"), "--class", "cat", "--limit", "20",
            "--target", "3", "--layers", "layer3.2.conv2", "--no-progress"]
    line = one_line_error(run_cli("rank", "--model", "pcace.zoo:cifar_resnet20", *data,
                                  "--out", str(tmp_path / "a")))
    assert "--random-weights" in line
    hashes = []
    for name in ("b", "c"):
        proc = run_cli("rank", "--model", "pcace.zoo:cifar_resnet20", "--random-weights",
                       "--init-seed", "7", *data, "--out", str(tmp_path / name))
        assert proc.returncode == 0, proc.stderr
        manifest = json.loads((tmp_path / name / "run.json").read_text())
        hashes.append(manifest["model"]["weights_sha256"])
        assert manifest["model"]["spec"]["seed"] == 7
    assert hashes[0] == hashes[1]  # seeded: reproducible


# 4. output directories

def test_reused_out_is_refused_and_force_removes_only_pcace_files(cifar, small_run, tmp_path):
    run = _copy_run(small_run, tmp_path / "run")
    (run / "report.html").write_text("an old report")  # as if an earlier --report wrote it
    from pcace.results.rundir import add_files

    add_files(run, ["report.html"])
    (run / "notes.txt").write_text("the user's own notes")
    args = ["rank", *cifar, "--target", "dog", "--limit", "20", "--layers", "layer3.2.conv2",
            "--no-progress", "--out", str(run)]
    line = one_line_error(run_cli(*args))
    assert "--force" in line
    proc = run_cli(*args, "--force")
    assert proc.returncode == 0, proc.stderr
    assert not (run / "report.html").exists()  # the cat run's report is gone
    assert (run / "notes.txt").read_text() == "the user's own notes"
    assert json.loads((run / "run.json").read_text())["target"]["index"] == 5
    # a directory of the user's own files is never taken
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "channels.csv").write_text("my,own\n1,2\n")
    line = one_line_error(run_cli(*args[:-1], str(mine), "--force"))
    assert (mine / "channels.csv").read_text() == "my,own\n1,2\n"


# 5. atomic, verifiable saves

def test_truncated_or_mixed_run_directory_is_refused(small_run, tmp_path):
    run = _copy_run(small_run, tmp_path / "run")
    text = (run / "channels.csv").read_text().splitlines()
    (run / "channels.csv").write_text("\n".join(text[: len(text) // 2]) + "\n")
    line = one_line_error(run_cli("report", str(run)))
    assert "channels.csv" in line and "run.json" in line
    mixed = _copy_run(small_run, tmp_path / "mixed")
    other = pd.read_csv(mixed / "layers.csv")
    other["median"] = other["median"] + 0.1  # another run's file put beside this run.json
    other.to_csv(mixed / "layers.csv", index=False)
    assert "layers.csv" in one_line_error(run_cli("report", str(mixed)))


# 6. unusable --out is found before any computation

@pytest.mark.parametrize("kind", ["file", "unwritable"])
def test_unusable_out_fails_before_the_forward_pass(cifar, tmp_path, kind):
    if kind == "file":
        out = tmp_path / "a-file"
        out.write_text("x")
    else:
        out = Path("/proc/self/pcace-run")  # a filesystem nobody can create folders in
    start = time.perf_counter()
    proc = run_cli("rank", *cifar, "--target", "cat", "--no-progress", "--out", str(out))
    line = one_line_error(proc)
    assert str(out) in line
    assert "score =" not in proc.stderr  # stopped before the model was even loaded
    assert time.perf_counter() - start < 60  # generous: no computation happened


# 7. interrupts and resume

def _rank_args(cifar: list[str], out: Path) -> list[str]:
    return ["rank", *cifar, "--target", "cat", "--limit", "60", "--permutations", "200",
            "--out", str(out)]


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_while_scoring_saves_finished_layers_and_resume_matches(cifar, tmp_path,
                                                                        signum, code):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "pcace.cli.main", *_rank_args(cifar, out),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if len(list((out / "checkpoints").glob("layer-*.npz"))) >= 2:
            break  # two layers finished: the run is in its scoring step
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err
    assert "Traceback" not in err and "SystemError" not in err, err
    assert "--resume" in err
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["complete"] is False
    done = manifest["layers_done"]
    assert 2 <= len(done) < len(manifest["layers"])
    partial = pd.read_csv(out / "channels.csv")
    assert sorted(set(partial.layer)) == sorted(done)
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob(f"pcace-spill-{proc.pid}-*"))

    resumed = run_cli(*_rank_args(cifar, out), "--resume", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    fresh = tmp_path / "fresh"
    whole = run_cli(*_rank_args(cifar, fresh), "--no-progress")
    assert whole.returncode == 0, whole.stderr
    a = pd.read_csv(out / "channels.csv")
    b = pd.read_csv(fresh / "channels.csv")
    pd.testing.assert_frame_equal(a, b)
    final = json.loads((out / "run.json").read_text())
    assert final["complete"] is True and sorted(final["resumed_layers"]) == sorted(done)
    assert not (out / "checkpoints").exists()


def test_resume_with_other_settings_is_refused(cifar, small_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    from pcace.results.checkpoints import start_checkpoints
    from pcace.results.lock import release_run_dir

    start_checkpoints(run, {"something": "else"})
    release_run_dir(run)  # this process is done with it (else the command is refused: busy)
    line = one_line_error(run_cli("rank", *cifar, "--target", "cat", "--limit", "30",
                                  "--layers", "layer3.2.conv2", "--no-progress", "--out",
                                  str(run), "--resume"))
    assert "settings" in line or "differ" in line


# 8. ablate checks the weights

def test_ablate_refuses_changed_weights(cifar, weights, tmp_path):
    ckpt = tmp_path / "w.th"
    shutil.copy(weights, ckpt)
    args = list(cifar)
    args[args.index("--checkpoint") + 1] = str(ckpt)
    out = tmp_path / "run"
    proc = run_cli("rank", *args, "--target", "cat", "--limit", "20", "--layers",
                   "layer3.2.conv2", "--no-progress", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    state = torch.load(ckpt, weights_only=True, map_location="cpu")
    key = next(k for k in state["state_dict"] if k.endswith("conv2.weight"))
    state["state_dict"][key] = state["state_dict"][key] * 1.01
    torch.save(state, ckpt)
    line = one_line_error(run_cli("ablate", str(out), "--layer", "layer3.2.conv2",
                                  "--sizes", "1", "--repeats", "1", "--no-baselines"))
    assert "weights" in line or "sha256" in line


# 9. TorchScript

def test_torchscript_is_refused_with_what_to_use(shared_dir, tmp_path):
    from pcace.zoo import mnist_cnn

    path = tmp_path / "net.ts"
    torch.jit.save(torch.jit.script(mnist_cnn()), path)
    line = one_line_error(run_cli("layers", "--model", str(path), "--input-shape",
                                  "1", "28", "28"))
    assert "torch.export" in line


# 10. one-line errors for input the user got wrong

def test_wrong_normalisation_is_one_line(cifar, tmp_path):
    args = list(cifar)
    i = args.index("--mean")
    args[i + 1:i + 4] = ["0.5", "0.5"]
    line = one_line_error(run_cli("rank", *args, "--target", "cat", "--limit", "20",
                                  "--no-progress", "--out", str(tmp_path / "x")))
    assert "--mean" in line


def test_mixed_image_sizes_and_a_single_file_are_one_line(shared_dir, weights, tmp_path):
    from PIL import Image

    folder = tmp_path / "mixed" / "cat"
    folder.mkdir(parents=True)
    for i in range(12):
        size = 40 if i == 5 else 32
        Image.new("RGB", (size, size), (i * 20, 0, 0)).save(folder / f"{i:02d}.png")
    base = ["--model", "pcace.zoo:cifar_resnet20", "--checkpoint", str(weights),
            "--target", "3", "--no-progress", "--mean", "0.5", "0.5", "0.5", "--std", "0.2",
            "0.2", "0.2"]  # our own normalisation, no resize
    line = one_line_error(run_cli("rank", *base, "--data", str(tmp_path / "mixed"),
                                  "--out", str(tmp_path / "a")))
    assert "different sizes" in line and "--resize" in line
    single = folder / "00.png"
    line = one_line_error(run_cli("rank", *base, "--data", str(single),
                                  "--out", str(tmp_path / "b")))
    assert "is a file" in line
