"""The Ray engine against a real cluster on this machine, compared with the local engine.

The cluster is a head started as its own process (``ray start --head --block`` in a new
session, on a free loopback port, in a temporary directory, 2 CPUs, a small object
store); the runs join it by address. Its workers import this checkout (PYTHONPATH). The
finaliser kills the head's session (the head and every process it started). Skipped
where Ray is not installed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

# A loopback-only cluster: Ray then keeps every server on 127.0.0.1, and a driver must know
# it too before Ray is imported (else it resolves 127.0.0.1 to the machine's address).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# A token that an earlier local Ray left in ~/.ray must not lock this test's cluster out.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ray = pytest.importorskip("ray")

SRC = Path(__file__).resolve().parents[1] / "src"
LAYERS = ["layer1.0.conv1", "layer3.2.conv2"]
COLUMNS = ["pcace", "null_mean", "null_q95", "p_value", "q_value", "pcace_adj", "ci_low",
           "ci_high"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session(sid: int) -> list[int]:
    """The processes of session ``sid``: the head and everything it started (workers run
    in process groups of their own, in the head's session)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:
                pids.append(int(entry.name))
    return pids


def _stop(proc: subprocess.Popen) -> None:
    """Stop the head's process group, then anything left in its session."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
        for pid in _session(proc.pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while _session(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _session(proc.pid):
            break
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def cluster():
    """A 2-CPU Ray head on 127.0.0.1; yields (address, session id)."""
    exe = Path(sys.executable).parent / "ray"
    if not exe.exists():
        pytest.skip("the ray command is not installed beside this Python")
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="pcace-ray-", dir="/tmp")  # socket paths must be short
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])]),
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # local-only: every server on 127.0.0.1
        RAY_AUTH_MODE="disabled")
    proc = subprocess.Popen(
        [str(exe), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--port", str(port), "--num-cpus", "2", "--object-store-memory", str(500 * 2**20),
         "--temp-dir", temp, "--include-dashboard", "false", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
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
        if ray.is_initialized():
            ray.shutdown()
        _stop(proc)
        shutil.rmtree(temp, ignore_errors=True)
        assert not _session(proc.pid), "Ray processes left behind"


@pytest.fixture(scope="module")
def resnet_cats(shared_dir):
    from pcace.inputs.data import default_transform, image_folder
    from pcace.zoo import CIFAR_MEAN, CIFAR_STD, cifar_resnet20

    ck = torch.load(shared_dir / "data" / "cifar10" / "resnet20-12fca82f.th",
                    weights_only=True, map_location="cpu")
    model = cifar_resnet20()
    model.load_state_dict({k.removeprefix("module."): v for k, v in ck["state_dict"].items()})
    ds = image_folder(shared_dir / "data" / "cifar10" / "test", "cat",
                      default_transform(mean=CIFAR_MEAN, std=CIFAR_STD))
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    return model.eval(), images


def _rank(model, images, **options):
    import pcace

    return pcace.rank(model, images, target=3, layers=LAYERS, progress=False, device="cpu",
                      permutations=40, split_half=4, bootstrap=4, seed=7, **options)


@pytest.fixture(scope="module")
def local_result(resnet_cats):
    return _rank(*resnet_cats)


def _same(ray_result, local) -> None:
    cols = [c for c in COLUMNS if c in local.channels.columns]
    np.testing.assert_allclose(ray_result.channels[cols].to_numpy(),
                               local.channels[cols].to_numpy(), rtol=0, atol=1e-9)
    assert (ray_result.channels["rank"] == local.channels["rank"]).all()
    for col in ("split_half_spearman", "significant_share", "median_adj"):
        if col in local.layers.columns:
            np.testing.assert_allclose(ray_result.layers[col].to_numpy(dtype=float),
                                       local.layers[col].to_numpy(dtype=float), atol=1e-9)


@pytest.mark.slow
def test_ray_engine_equals_local_engine(cluster, resnet_cats, local_result):
    address, _ = cluster
    result = _rank(*resnet_cats, engine="ray", ray_address=address)
    _same(result, local_result)
    engine = result.manifest["engine"]
    assert engine["name"] == "ray" and engine["resources"]["CPU"] == 2
    assert engine["tasks"] > 0 and {"null", "split_half"} <= set(engine["stage_seconds"])
    assert local_result.manifest["engine"]["name"] == "local"
    assert not ray.is_initialized()  # the run disconnected from the cluster it joined


def _kill_first_task(sid: int, name: str, stop: threading.Event, killed: list) -> None:
    """SIGKILL the first worker of the cluster seen running task ``name``."""
    title = f"ray::{name}".encode()
    while not stop.is_set():
        for pid in _session(sid):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if cmd.startswith(title):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
        time.sleep(0.005)


@pytest.mark.slow
def test_a_worker_killed_during_ace_changes_nothing(cluster, resnet_cats, local_result):
    from pcace.engines.ray import RayEngine

    address, sid = cluster
    engine = RayEngine(address=address)
    try:
        stop, killed = threading.Event(), []
        killer = threading.Thread(target=_kill_first_task,
                                  args=(sid, "_solve_chunk", stop, killed), daemon=True)
        killer.start()
        try:
            result = _rank(*resnet_cats, engine=engine)
        finally:
            stop.set()
            killer.join(timeout=5)
        assert killed, "no ACE task was seen running: nothing was killed"
        _same(result, local_result)
        assert result.complete
    finally:
        engine.close()


@pytest.mark.slow
def test_sharded_passes_on_actors_equal_one_process(cluster, shared_dir):
    from pcace.engines.ray import RayEngine
    from pcace.engines.shards import sharded_components
    from pcace.inputs.data import describe_data, open_dataset
    from pcace.inputs.models import load_model
    from pcace.reduce.streaming import streaming_reduce
    from pcace.zoo import CIFAR_MEAN, CIFAR_STD

    address, _ = cluster
    loaded = load_model("pcace.zoo:cifar_resnet20",
                        checkpoint=shared_dir / "data/cifar10/resnet20-12fca82f.th")
    data = describe_data(shared_dir / "data/cifar10/test", class_name="cat", limit=150,
                         mean=list(CIFAR_MEAN), std=list(CIFAR_STD))
    layer = "layer2.0.conv1"
    engine = RayEngine(address=address)
    try:
        reds, scores = sharded_components(loaded.spec, data, [layer], 3, 3, shard_size=40,
                                          batch_size=32, engine=engine)
    finally:
        engine.close()
    # the reference: this process, one streaming pass over the same images in batches
    ds, _ = open_dataset(dict(data), loaded.transform)
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    model, seen = loaded.model.eval(), {}
    handle = dict(model.named_modules())[layer].register_forward_hook(
        lambda m, i, out: seen.__setitem__("x", out.detach()))

    def batches():
        with torch.inference_mode():
            for b in images.split(64):
                model(b)
                yield seen["x"]
    try:
        ref, _ = streaming_reduce(batches, 3, route="moments")
        with torch.inference_mode():
            expected = model(images)[:, 3].double().numpy()
    finally:
        handle.remove()
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    np.testing.assert_allclose(reds[layer].scores.numpy(), ref.scores.numpy(), atol=1e-9)
    assert "forward_moments" in engine.stage_seconds


@pytest.mark.slow
def test_cli_joins_a_cluster_by_address(cluster, shared_dir, tmp_path):
    import json

    address, _ = cluster
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run(
        [sys.executable, "-m", "pcace.cli.main", "rank", "--model", "pcace.zoo:cifar_resnet20",
         "--checkpoint", str(shared_dir / "data/cifar10/resnet20-12fca82f.th"), "--data",
         str(shared_dir / "data/cifar10/test"), "--class", "cat", "--target", "cat",
         "--mean", "0.485", "0.456", "0.406", "--std", "0.229", "0.224", "0.225",
         "--limit", "60", "--layers", "layer3.2.conv2", "--permutations", "10",
         "--split-half", "2", "--engine", "ray", "--ray-address", address, "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    assert f"engine ray at {address}" in proc.stderr
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["engine"]["name"] == "ray" and manifest["engine"]["resources"]["CPU"] == 2


# A lost cluster (its head killed mid-run) is tested in tests/test_faults_ray.py, with the
# driver in a process of its own and a cluster of its own.


def test_streamed_layers_run_on_the_workers(cluster, resnet_cats, two_pass_routes):
    """Layers on the two-pass route: on Ray both passes run on actors that got the model
    and the images through the object store; two targets and a null equal the local run
    (whose passes run in this process) to 1e-9."""
    import pcace
    address, _ = cluster
    model, images = resnet_cats

    kw = dict(target=[3, 5], layers=LAYERS, progress=False, device="cpu", permutations=20,
              split_half=2, seed=3, batch_size=50)
    local = pcace.rank(model, images, **kw)
    remote = pcace.rank(model, images, engine="ray", ray_address=address, **kw)
    stages = remote.manifest["engine"]["stage_seconds"]
    assert {"forward_moments", "forward_project", "observed", "null"} <= set(stages)
    assert "forward_moments" not in local.manifest["engine"]["stage_seconds"]
    np.testing.assert_array_equal(remote.scores, local.scores)
    cols = ["pcace", "null_mean", "p_value", "q_value"]
    np.testing.assert_allclose(remote.channels[cols].to_numpy(),
                               local.channels[cols].to_numpy(), rtol=0, atol=1e-9)
    assert {r["route"] for r in remote.manifest["routes"].values()} == {"moments"}


def test_a_ray_dataset_as_input(cluster, resnet_cats, monkeypatch):
    """Images as a Ray Dataset (several blocks): the streamed layers' workers read their own
    rows from the dataset's blocks; the values equal the local run on the same tensor."""
    pytest.importorskip("pyarrow")
    import pcace
    from pcace.reduce.plan import LayerRoute, MemoryPlan

    address, _ = cluster
    model, images = resnet_cats

    def routes(self, shapes, n, run_images=256, **_):
        return {k: LayerRoute("moments" if k == LAYERS[-1] else "in-memory", "test", 0, 2,
                              tuple(s)) for k, s in shapes.items()}

    monkeypatch.setattr(MemoryPlan, "routes", routes)
    kw = dict(target=3, layers=LAYERS, progress=False, device="cpu", permutations=10,
              split_half=0, seed=1, batch_size=40)
    local = pcace.rank(model, images, **kw)
    ray.init(address=address, log_to_driver=False)
    try:
        ds = ray.data.from_numpy(images.numpy()).repartition(3)
        remote = pcace.rank(model, ds, engine="ray", **kw)
    finally:
        ray.shutdown()
    assert remote.manifest["routes"][LAYERS[-1]]["passes_on"] == "ray workers"
    assert remote.manifest["data"]["n_images"] == len(images)
    np.testing.assert_array_equal(remote.scores, local.scores)
    np.testing.assert_allclose(remote.channels[["pcace", "p_value"]].to_numpy(),
                               local.channels[["pcace", "p_value"]].to_numpy(), rtol=0,
                               atol=1e-9)


@pytest.mark.slow
def test_a_worker_killed_during_the_first_pass_changes_nothing(cluster, resnet_cats,
                                                               two_pass_routes):
    """An actor's process SIGKILLed while it accumulates its shard's moments: Ray restarts
    it (it rebuilds its model from the object store) and re-runs the shard; same values."""
    import pcace
    from pcace.engines.ray import RayEngine
    address, sid = cluster
    model, images = resnet_cats

    kw = dict(target=3, layers=LAYERS, progress=False, device="cpu", permutations=5,
              split_half=0, seed=2, batch_size=16)
    local = pcace.rank(model, images, **kw)
    engine = RayEngine(address=address)
    try:
        stop, killed = threading.Event(), []
        killer = threading.Thread(target=_kill_first_task,
                                  args=(sid, "ShardWorker.moments", stop, killed), daemon=True)
        killer.start()
        try:
            remote = pcace.rank(model, images, engine=engine, **kw)
        finally:
            stop.set()
            killer.join(timeout=5)
        assert killed, "no shard was seen running: nothing was killed"
        assert remote.complete
        np.testing.assert_allclose(remote.channels[["pcace", "p_value"]].to_numpy(),
                                   local.channels[["pcace", "p_value"]].to_numpy(), rtol=0,
                                   atol=1e-9)
    finally:
        engine.close()
