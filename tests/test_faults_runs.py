"""Faults a long run meets (issue 26), as a user meets them: real ``pcace rank`` processes on
the shared CIFAR ResNet-20.

- two runs on one ``--out`` (plain, ``--force``, ``--resume``): the second is refused, the
  first ends with its own results;
- SIGKILL at several points of a run (before any layer, mid-write of a checkpoint, after a
  layer, between the saved files and ``run.json``), each followed by ``--resume``: the
  killed run's lock is taken over with a note, the watcher says what was kept, and the
  last resume ends equal to an uninterrupted run (pcace to 1e-9, p-values exactly);
- a full disk under ``--out`` (an injected ENOSPC in the run, and a real 4 MiB tmpfs when
  running as root) and under ``--spill-dir`` (tmpfs): one clear line, and ``--resume``
  after freeing space ends equal.

A run is paused or failed at an exact point by a small driver that wraps one pcace
function before calling the command's ``main`` (PCACE_TEST_FAULT), so the test kills it
there with a real SIGKILL from outside; nothing is timed.
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

import numpy as np
import pandas as pd
import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])]))
ENV.pop("PCACE_WATCHER", None)
LAYERS = ["layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1"]

# Runs `pcace` with one function wrapped: PCACE_TEST_FAULT="module:name:call:action", where
# action is pause-before / pause-after (write PCACE_TEST_MARKER, wait for MARKER.go),
# torn (write half of an atomic_write's data under its temporary name, then pause) or
# enospc (raise OSError(ENOSPC)).
DRIVER = r"""
import errno, importlib, os, sys, time
module, name, call, action = os.environ["PCACE_TEST_FAULT"].split(":")
target = importlib.import_module(module)
original = getattr(target, name)
calls = [0]

def pause():
    marker = os.environ["PCACE_TEST_MARKER"]
    open(marker, "w").close()
    deadline = time.time() + 600
    while not os.path.exists(marker + ".go") and time.time() < deadline:
        time.sleep(0.05)

def wrapped(*args, **kwargs):
    calls[0] += 1
    hit = calls[0] == int(call)
    if hit and action == "enospc":
        raise OSError(errno.ENOSPC, "No space left on device")
    if hit and action == "torn":
        from pathlib import Path
        from pcace.core.files import temp_name
        data = args[1] if isinstance(args[1], bytes) else str(args[1]).encode()
        temp_name(Path(args[0])).write_bytes(data[: len(data) // 2])
        pause()
    if hit and action == "pause-before":
        pause()
    out = original(*args, **kwargs)
    if hit and action == "pause-after":
        pause()
    return out

setattr(target, name, wrapped)
sys.argv = ["pcace", *sys.argv[1:]]
from pcace.cli.main import main
sys.exit(main())
"""


@pytest.fixture(scope="module")
def cifar(shared_dir):
    return ["rank", "--model", "pcace.zoo:cifar_resnet20", "--checkpoint",
            str(shared_dir / "data/cifar10/resnet20-12fca82f.th"),
            "--data", str(shared_dir / "data/cifar10/test"), "--class", "cat",
            "--target", "cat", "--mean", "0.485", "0.456", "0.406",
            "--std", "0.229", "0.224", "0.225"]


def args_for(cifar: list[str], out: Path, *extra: str, layers: list[str] = LAYERS) -> list[str]:
    return [*cifar, "--limit", "30", "--layers", *layers, "--permutations", "19",
            "--split-half", "2", "--seed", "3", "--out", str(out), *extra]


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The command, its output as written (bytes decoded, no newline translation)."""
    proc = subprocess.run([sys.executable, "-m", "pcace.cli.main", *args], capture_output=True,
                          timeout=600, env={**ENV, **(env or {})})
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(),
                                       proc.stderr.decode())


def start(args: list[str], fault: str, marker: Path) -> subprocess.Popen:
    """A run with ``fault`` (see DRIVER); returns once it reached the point (or ended)."""
    env = {**ENV, "PCACE_TEST_FAULT": fault, "PCACE_TEST_MARKER": str(marker)}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    while not marker.exists() and proc.poll() is None:
        time.sleep(0.05)
    return proc


def kill(proc: subprocess.Popen) -> str:
    """SIGKILL from outside; the run's stderr (with the watcher's line)."""
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err
    return err.replace("\r", "\n")


def assert_same(out: Path, reference: Path) -> None:
    """Values equal to the uninterrupted run: pcace to 1e-9, p- and q-values exactly."""
    a = pd.read_csv(out / "channels.csv")
    b = pd.read_csv(reference / "channels.csv")
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    assert (a.layer == b.layer).all() and (a.channel == b.channel).all()
    np.testing.assert_allclose(a.pcace, b.pcace, rtol=0, atol=1e-9)
    for col in ("p_value", "q_value", "rank"):
        assert np.array_equal(a[col].to_numpy(), b[col].to_numpy()), col
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["complete"] is True and not (out / "checkpoints").exists()
    assert not (out / ".pcace-lock").exists()


def checkpointed(out: Path) -> int:
    return len(list((out / "checkpoints").glob("layer-*.npz")))


@pytest.fixture(scope="module")
def reference(cifar, tmp_path_factory):
    """The uninterrupted run (with progress bars, to a pipe: a job's log)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = run(*args_for(cifar, out))
    assert proc.returncode == 0, proc.stderr
    return out, proc.stderr


def final_lines(err: str, bar: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(f"{bar}: 100%")]


def test_bars_in_a_log_write_their_final_line_once(reference, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(reference[0], copy)
    report = run("report", str(copy))  # its bar is one of pcace.core.progress
    assert report.returncode == 0, report.stderr
    assert "\r" not in report.stderr and len(final_lines(report.stderr, "report figures")) == 1


def test_the_runs_bars_in_a_log_write_their_final_line_once(reference):
    _, err = reference
    assert "\r" not in err, err
    for bar in ("forward pass", "scoring channels"):
        assert len(final_lines(err, bar)) == 1, (bar, err)


def test_a_second_run_on_a_busy_out_is_refused_and_the_first_ends_fine(cifar, reference,
                                                                         tmp_path):
    out = tmp_path / "busy"
    marker = tmp_path / "first-layer-done"
    first = start(args_for(cifar, out), "pcace.results.checkpoints:save_layer_checkpoint:1:"
                  "pause-after", marker)
    try:
        assert first.poll() is None, first.communicate()[1]
        for extra in ([], ["--force"], ["--resume"]):
            second = run(*args_for(cifar, out, "--seed", "5", "--no-progress", *extra))
            assert second.returncode == 2, second.stderr
            assert "Traceback" not in second.stderr
            line = [x for x in second.stderr.splitlines() if x.startswith("pcace: error")]
            assert len(line) == 1 and f"in use by another pcace run (pid {first.pid}" in line[0]
            assert "score =" not in second.stderr  # refused before any work
            assert checkpointed(out) == 1  # the first run's work is untouched
        report = run("report", str(out))  # nor does a report write into a run going on
        assert report.returncode == 2 and "in use by another pcace run" in report.stderr
        (tmp_path / "first-layer-done.go").touch()
        _, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, err
    assert json.loads((out / "run.json").read_text())["seed"] == 3
    assert_same(out, reference[0])


def test_sigkill_at_any_point_then_resume_ends_equal(cifar, reference, tmp_path):
    """One run killed four times at four points, resumed each time; then a truncated
    checkpoint; the last resume ends equal to the uninterrupted run."""
    out = tmp_path / "run"
    resume = args_for(cifar, out, "--resume", "--no-progress")
    points = [  # (fault, layers checkpointed when killed)
        ("pcace.results.checkpoints:start_checkpoints:1:pause-after", 0),  # before any layer
        ("pcace.results.checkpoints:atomic_write:2:torn", 1),  # mid-write of a checkpoint
        ("pcace.results.checkpoints:save_layer_checkpoint:1:pause-after", 2),  # after a layer
        ("pcace.results.rundir:_write_manifest:1:pause-before", 3),  # files saved, no run.json
    ]
    for i, (fault, done) in enumerate(points):
        args = args_for(cifar, out, "--no-progress") if i == 0 else resume
        proc = start(args, fault, tmp_path / f"point-{i}")
        assert proc.poll() is None, proc.communicate()[1]
        err = kill(proc)
        assert checkpointed(out) == done, (fault, err)
        assert "ended abruptly" in err and "--resume" in err, err  # the watcher's word
        if i:
            assert "pcace: note: took over the lock" in err and "no longer runs" in err, err
        torn = list((out / "checkpoints").glob(".layer-*.tmp-*"))
        assert bool(torn) == (i == 1)  # the torn write's leftover, removed by the next run
    assert (out / "channels.csv").exists() and not (out / "run.json").exists()
    victim = sorted((out / "checkpoints").glob("layer-*.npz"))[0]
    victim.write_bytes(victim.read_bytes()[:200])  # a truncated checkpoint: scored again
    last = run(*resume)
    assert last.returncode == 0, last.stderr
    assert "took over the lock" in last.stderr and "scored again" in last.stderr
    assert_same(out, reference[0])


def test_full_disk_in_a_run_then_resume_ends_equal(cifar, reference, tmp_path):
    """ENOSPC at the second layer's checkpoint (injected: no root needed; the first
    write is state.json)."""
    out = tmp_path / "run"
    proc = start(args_for(cifar, out, "--no-progress"),
                 "pcace.results.checkpoints:atomic_write:3:enospc", tmp_path / "never")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 2 and "Traceback" not in err, err
    line = [x for x in err.splitlines() if x.startswith("pcace: error")]
    assert len(line) == 1 and "could not checkpoint layer 'layer1.1.conv1'" in line[0]
    assert "No space left on device" in line[0] and "--resume" in line[0]
    assert "ended abruptly" not in err  # the command said it itself
    assert checkpointed(out) == 1
    again = run(*args_for(cifar, out, "--resume", "--no-progress"))
    assert again.returncode == 0, again.stderr
    # what --resume found and what is left (issue 27)
    assert "pcace: --resume: 1 of 3 layers done in" in again.stderr
    assert "(layer1.0.conv1); 2 left" in again.stderr
    assert_same(out, reference[0])


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (root only; skipped otherwise)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("a real full disk needs a tmpfs, which only root can mount; the injected "
                    "ENOSPC tests cover the same paths")
    where = tmp_path / "small"
    where.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.strip()})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` but ``leave`` bytes; returns the filler (delete it to free space)."""
    stat = os.statvfs(disk)
    filler = disk / "filler"
    filler.write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))
    return filler


def test_full_disk_under_out_then_resume_ends_equal(cifar, reference, small_disk):
    out = small_disk / "run"
    out.mkdir()
    # room for the lock, state.json and the first layer's checkpoint (~16 KiB), not the
    # second's (~16 KiB) and its temporary copy
    filler = fill(small_disk, leave=28 * 1024)
    proc = run(*args_for(cifar, out, "--no-progress"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    line = [x for x in proc.stderr.splitlines() if x.startswith("pcace: error")]
    assert len(line) == 1 and "No space left on device" in line[0], proc.stderr
    assert "--resume" in line[0] or "free space" in line[0], line
    done = checkpointed(out)
    filler.unlink()  # the user frees space
    again = run(*args_for(cifar, out, "--resume", "--no-progress"))
    assert again.returncode == 0, again.stderr
    assert_same(out, reference[0])
    assert done >= 1 or "checkpoints" in line[0]


def test_full_disk_under_spill_dir_is_one_line_and_resumes(cifar, small_disk, tmp_path):
    out = tmp_path / "run"
    spill = ["--limit", "100", "--layers", "layer1.0.conv1", "--permutations", "0",
             "--split-half", "0", "--memory-budget", "2MiB", "--no-progress", "--out", str(out)]
    proc = run(*cifar, *spill, "--spill-dir", str(small_disk))  # 6.5 MB of maps, 4 MiB disk
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    line = [x for x in proc.stderr.splitlines() if x.startswith("pcace: error")]
    assert len(line) == 1 and "could not spill layer 'layer1.0.conv1'" in line[0]
    assert "No space left on device" in line[0]
    assert not list(small_disk.glob("pcace-spill-*"))  # its spilled maps are removed
    roomy = tmp_path / "roomy"
    again = run(*cifar, *spill, "--spill-dir", str(roomy), "--resume")
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "run.json").read_text())["complete"] is True
