"""A lost Ray cluster (issue 26): its head killed while a run uses it.

The run's driver is a process of its own (the ``pcace`` command, or a script calling
:func:`pcace.rank`), so that this test process survives whatever Ray does to a driver whose
cluster died (Ray may end it at once). Each test starts its own head (``ray start --head
--block`` in a new session, 2 CPUs, on a free loopback port) and kills its whole session
with SIGKILL once the run has checkpointed a layer: the run ends with a clear message and
its finished layers kept, and ``--resume`` here with ``--engine local`` ends equal to an
uninterrupted local run. Skipped where Ray is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback-only cluster
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
pytest.importorskip("ray")

SRC = Path(__file__).resolve().parents[1] / "src"
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])]),
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled")
ENV.pop("PCACE_WATCHER", None)
ENV.pop("PCACE_RAY_LOGS", None)
LAYERS = ["layer1.0.conv1", "layer2.0.conv1", "layer3.2.conv2"]

# The command with one function wrapped to pause after its first call (see
# tests/test_faults_runs.py): the test kills the cluster while the run waits there.
PAUSED = r"""
import os, sys, time
import pcace.results.checkpoints as target
original = target.save_layer_checkpoint

def wrapped(*args, **kwargs):
    out = original(*args, **kwargs)
    marker = os.environ["PCACE_TEST_MARKER"]
    if not os.path.exists(marker):
        open(marker, "w").close()
        deadline = time.time() + 600
        while not os.path.exists(marker + ".go") and time.time() < deadline:
            time.sleep(0.05)
    return out

target.save_layer_checkpoint = wrapped
sys.argv = ["pcace", *sys.argv[1:]]
from pcace.cli.main import main
sys.exit(main())
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session(sid: int) -> list[int]:
    """The live processes of session ``sid`` (the head and everything it started; a
    zombie waiting for its parent to reap it is gone already)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(entry.name))
    return pids


def _kill_session(sid: int, wait: float = 30.0) -> None:
    deadline = time.monotonic() + wait
    while (pids := _session(sid)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


@pytest.fixture
def head():
    """A 2-CPU Ray head on 127.0.0.1 for one test; yields (address, session id)."""
    exe = Path(sys.executable).parent / "ray"
    if not exe.exists():
        pytest.skip("the ray command is not installed beside this Python")
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="pcace-ray-", dir="/tmp")  # socket paths must be short
    proc = subprocess.Popen(
        [str(exe), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--port", str(port), "--num-cpus", "2", "--object-store-memory", str(300 * 2**20),
         "--temp-dir", temp, "--include-dashboard", "false", "--disable-usage-stats"],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("the Ray head did not start")
                time.sleep(0.5)
        yield f"127.0.0.1:{port}", proc.pid
    finally:
        _kill_session(proc.pid)
        proc.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)
        assert not _session(proc.pid), "Ray processes left behind"


@pytest.fixture(scope="module")
def cifar(shared_dir):
    return ["rank", "--model", "pcace.zoo:cifar_resnet20", "--checkpoint",
            str(shared_dir / "data/cifar10/resnet20-12fca82f.th"),
            "--data", str(shared_dir / "data/cifar10/test"), "--class", "cat",
            "--target", "cat", "--mean", "0.485", "0.456", "0.406",
            "--std", "0.229", "0.224", "0.225", "--limit", "40", "--layers", *LAYERS,
            "--permutations", "19", "--split-half", "2", "--no-progress"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pcace.cli.main", *args], capture_output=True,
                          text=True, timeout=600, env=ENV)


@pytest.mark.slow
def test_a_killed_head_ends_the_run_clearly_and_resume_here_ends_equal(head, cifar, tmp_path):
    address, sid = head
    out = tmp_path / "run"
    marker = tmp_path / "first-layer"
    proc = subprocess.Popen([sys.executable, "-c", PAUSED, *cifar, "--engine", "ray",
                             "--ray-address", address, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**ENV, "PCACE_TEST_MARKER": str(marker)})
    try:
        while not marker.exists() and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1]
        _kill_session(sid)  # the head, its raylet, GCS and workers: the cluster is gone
        (tmp_path / "first-layer.go").touch()
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in err and "INFO" not in err, err  # Ray's info lines stay quiet
    layers = len(list((out / "checkpoints").glob("layer-*.npz")))
    assert layers >= 1, err
    if proc.returncode == 75:  # pcace saw the cluster go
        assert f"the Ray cluster at {address} was lost" in err and "--resume" in err, err
        manifest = json.loads((out / "run.json").read_text())
        assert manifest["complete"] is False and manifest["engine"]["connected"] is False
        assert len(manifest["layers_done"]) == layers
    else:  # Ray ended the driver at once (its rule): the watcher spoke for it
        assert proc.returncode != 0 and "ended abruptly" in err and "--resume" in err, err
    assert not (out / ".pcace-lock").exists() or proc.returncode != 75

    resumed = _run(*cifar, "--out", str(out), "--resume", "--engine", "local")
    assert resumed.returncode == 0, resumed.stderr
    fresh = _run(*cifar, "--out", str(tmp_path / "fresh"))
    assert fresh.returncode == 0, fresh.stderr
    a = pd.read_csv(out / "channels.csv")
    b = pd.read_csv(tmp_path / "fresh" / "channels.csv")
    np.testing.assert_allclose(a.pcace, b.pcace, rtol=0, atol=1e-9)
    for col in ("p_value", "q_value", "rank"):
        assert np.array_equal(a[col].to_numpy(), b[col].to_numpy()), col
    final = json.loads((out / "run.json").read_text())
    assert final["complete"] is True and len(final["resumed_layers"]) == layers


# The library's own behaviour, with the driver in a process of its own: pcace.rank on a
# cluster killed after its first layer (while the run waits there, as PAUSED) returns the
# layers finished, marked incomplete, and leaves Ray as it found it.
LIBRARY = r"""
import json, os, sys, time
from pathlib import Path
import ray
import torch
import pcace
import pcace.results.checkpoints as target
from pcace.engines.ray import RayEngine
from pcace.inputs.data import default_transform, image_folder
from pcace.zoo import CIFAR_MEAN, CIFAR_STD, cifar_resnet20

address, shared, ckpt = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
original = target.save_layer_checkpoint

def wrapped(*args, **kwargs):
    out = original(*args, **kwargs)
    marker = os.environ["PCACE_TEST_MARKER"]
    if not os.path.exists(marker):
        open(marker, "w").close()
        while not os.path.exists(marker + ".go"):
            time.sleep(0.05)
    return out

target.save_layer_checkpoint = wrapped
state = torch.load(shared / "data/cifar10/resnet20-12fca82f.th", weights_only=True,
                   map_location="cpu")["state_dict"]
model = cifar_resnet20()
model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
ds = image_folder(shared / "data/cifar10/test", "cat",
                  default_transform(mean=CIFAR_MEAN, std=CIFAR_STD))
images = torch.stack([ds[i][0] for i in range(60)])
engine = RayEngine(address=address, lost_after=3, inline_seconds=0)
try:
    result = pcace.rank(model.eval(), images, target=3,
                        layers=["layer1.0.conv1", "layer2.0.conv1", "layer3.2.conv2"],
                        progress=False, device="cpu", permutations=100, split_half=4,
                        engine=engine, checkpoint_dir=ckpt)
finally:
    engine.close()
print(json.dumps({"complete": result.complete, "done": result.manifest["layers_done"],
                  "connected": result.manifest["engine"].get("connected"),
                  "initialized": ray.is_initialized()}))
"""


@pytest.mark.slow
def test_a_lost_cluster_ends_pcace_rank_like_an_interruption(head, shared_dir, tmp_path):
    address, sid = head
    marker = tmp_path / "first-layer"
    proc = subprocess.Popen([sys.executable, "-c", LIBRARY, address, str(shared_dir),
                             str(tmp_path / "run")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**ENV, "PCACE_TEST_MARKER": str(marker)})
    try:
        while not marker.exists() and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1]
        _kill_session(sid)
        (tmp_path / "first-layer.go").touch()
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    facts = json.loads(out.strip().splitlines()[-1])
    assert facts["complete"] is False and facts["done"] == ["layer1.0.conv1"]
    assert facts["connected"] is False
    assert facts["initialized"] is False  # nothing was started behind the caller's back
    assert "is gone" in err  # the interruption's warning names the cluster
    assert len(list((tmp_path / "run").glob("checkpoints/layer-*.npz"))) == 1
