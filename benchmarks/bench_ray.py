"""The Ray engine's overhead against the local engine, and its per-task costs.

Starts its own Ray head (``ray start --head --block`` on a free loopback port, 2 CPUs by
default, a small object store, a temporary directory) and stops it afterwards (the head's
process group is killed). Parts:

- ``overhead``: ``pcace.rank`` on the shared ResNet-20 over N CIFAR-10 training images
  (evenly over the classes; score: the cat logit), some layers, with a permutation null
  and the split-half check, once with the local engine and once with ``engine="ray"``
  joining the head by address; the two results are compared.
- ``costs``: the round trip of a near-empty Ray task (scheduling overhead), one ACE
  problem at N on one core, a forward shard's moments and projection passes on ResNet-20
  (:class:`pcace.engines.shards.ShardWorker`), and one :meth:`PixelMoments.merge` at ResNet-50
  layer sizes.

Command (repository root; the shared folder beside it):

    PYTHONPATH=src .venv/bin/python benchmarks/bench_ray.py --n 10000 --permutations 100
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback-only cluster

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PCACE_SHARED", ROOT.parent / "shared"))
LAYERS = ["layer1.2.conv2", "layer2.2.conv2", "layer3.2.conv2"]


def start_head(cpus: int) -> tuple[subprocess.Popen, str, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = tempfile.mkdtemp(prefix="pcace-ray-", dir="/tmp")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
         "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", str(cpus),
         "--object-store-memory", str(2**30), "--temp-dir", temp, "--include-dashboard",
         "false", "--disable-usage-stats"], env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"127.0.0.1:{port}", temp
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("the Ray head did not start") from None
            time.sleep(0.5)


def _session(sid: int) -> list[int]:
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


def stop_head(proc: subprocess.Popen) -> None:
    """Stop the head and everything it started (its session: workers have own groups)."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
        for pid in _session(proc.pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while _session(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
    proc.wait(timeout=10)


def resnet():
    from pcace.zoo import cifar_resnet20

    ck = torch.load(SHARED / "data/cifar10/resnet20-12fca82f.th", weights_only=True,
                    map_location="cpu")
    model = cifar_resnet20()
    model.load_state_dict({k.removeprefix("module."): v for k, v in ck["state_dict"].items()})
    return model.eval()


def train_images(n: int) -> torch.Tensor:
    from pcace.inputs.data import default_transform, image_folder
    from pcace.zoo import CIFAR_MEAN, CIFAR_STD

    cache = Path(tempfile.gettempdir()) / "pcace-cifar10-train"
    if not (cache / "cifar10-train").exists():
        with tarfile.open(SHARED / "data/cifar10-train.tar.gz") as tar:
            tar.extractall(cache, filter="data")
    ds = image_folder(cache / "cifar10-train", transform=default_transform(
        mean=CIFAR_MEAN, std=CIFAR_STD))
    pick = np.linspace(0, len(ds) - 1, n).round().astype(int)
    return torch.stack([ds[int(i)][0] for i in pick])


def overhead(args, address: str) -> dict:
    """Local and Ray runs alternated (the machine is shared: load changes between runs)."""
    import ray

    import pcace
    from pcace.engines.ray import RayEngine

    model, images = resnet(), train_images(args.n)
    target = args.target if args.target == "all" else int(args.target)
    budget = "auto" if args.budget == "auto" else int(float(args.budget))
    common = dict(target=target, layers=LAYERS, progress=False, device="cpu",
                  permutations=args.permutations, split_half=args.split_half, seed=0,
                  memory_budget=budget)
    out: dict = {"runs": []}
    t = time.perf_counter()
    engine = RayEngine(address=address)  # joined once: a session on a running cluster
    ray.get(engine._warming)
    out["connect_and_warm_s"] = time.perf_counter() - t
    cols = ["pcace", "null_mean", "p_value", "pcace_adj"]
    try:
        for _ in range(args.repeats):
            for name, runner in (("local", "local"), ("ray", engine)):
                load = os.getloadavg()[0]
                t = time.perf_counter()
                res = pcace.rank(model, images, engine=runner, **common)
                wall = time.perf_counter() - t
                routes = {r["route"] for r in res.manifest["routes"].values()}
                out["runs"].append({"engine": name, "seconds": wall, "load1_before": load,
                                    "routes": sorted(routes),
                                    "timings": res.manifest["timings"],
                                    "stages": dict(res.manifest["engine"]["stage_seconds"]),
                                    "tasks": res.manifest["engine"].get("tasks")})
                out.setdefault("values", {})[name] = res.channels[cols].to_numpy()
                engine.stage_seconds.clear()
        out["max_abs_diff"] = float(np.abs(out["values"]["ray"] - out["values"]["local"]).max())
        del out["values"]
        out["resources"] = engine.resources()
    finally:
        engine.close()
        ray.shutdown()
    best = {e: min(r["seconds"] for r in out["runs"] if r["engine"] == e)
            for e in ("local", "ray")}
    out["best"] = best
    out["ratio_best"] = best["ray"] / best["local"]
    return out


def costs(args, address: str) -> dict:
    import ray

    from pcace.engines.engine import Problems
    from pcace.engines.ray import RayEngine
    from pcace.engines.shards import ShardWorker, merged_bases
    from pcace.reduce.moments import PixelMoments

    out = {}
    engine = RayEngine(address=address, min_task_seconds=0.0, inline_seconds=0.0)
    try:
        ray.get(engine._warming)
        rng = np.random.default_rng(0)
        tiny = Problems(rng.normal(size=(1, 30, 1)), rng.normal(size=(400, 30)), np.arange(1))
        engine.values(tiny, chunk=1)  # warm
        t = time.perf_counter()
        engine.values(tiny, chunk=1)
        wall = time.perf_counter() - t
        out["tiny_tasks"] = len(tiny)
        out["tiny_task_ms_per_slot"] = 1e3 * wall * engine.slots() / len(tiny)
    finally:
        engine.close()
        ray.shutdown()
    rng = np.random.default_rng(1)
    z, y = rng.normal(size=(8, args.n, 3)), rng.normal(size=args.n)
    p = Problems(z, y[None], np.arange(8))
    os.environ["NUMBA_NUM_THREADS"] = "1"
    p.solve(0, 1)
    t = time.perf_counter()
    p.solve(0, 8)
    out["ace_ms_per_problem_one_core"] = 1e3 * (time.perf_counter() - t) / 8
    images = train_images(1024)
    worker = ShardWorker(resnet(), images, LAYERS, 3, batch_size=256)
    shifts = worker.shifts(0, 256, "float32")
    t = time.perf_counter()
    sums, _ = worker.moments(0, 1024, shifts, "float32")
    out["shard_moments_ms_per_image"] = 1e3 * (time.perf_counter() - t) / 1024
    bases = merged_bases([sums], shifts, 3, torch.float32)
    t = time.perf_counter()
    worker.project(0, 1024, bases)
    out["shard_project_ms_per_image"] = 1e3 * (time.perf_counter() - t) / 1024
    for c, side in ((256, 14), (512, 7)):
        a, b = PixelMoments(c, side * side), PixelMoments(c, side * side)
        a.update(torch.randn(8, c, side * side)), b.update(torch.randn(8, c, side * side))
        t = time.perf_counter()
        a.merge(b)
        out[f"merge_ms_C{c}_P{side * side}"] = 1e3 * (time.perf_counter() - t)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--permutations", type=int, default=100)
    parser.add_argument("--split-half", type=int, default=10)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--target", default="3", help="a class index, or all")
    parser.add_argument("--budget", default="auto",
                        help="memory_budget (bytes): a small one routes the layers through "
                        "two passes, which then run on the Ray workers")
    parser.add_argument("--parts", default="overhead,costs")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    proc, address, temp = start_head(args.cpus)
    report = {"n": args.n, "permutations": args.permutations, "layers": LAYERS,
              "load_before": os.getloadavg()}
    try:
        if "overhead" in args.parts:
            report["overhead"] = overhead(args, address)
            print(json.dumps(report, indent=1, default=str), flush=True)
        if "costs" in args.parts:
            report["costs"] = costs(args, address)
    finally:
        stop_head(proc)
        import shutil

        shutil.rmtree(temp, ignore_errors=True)
    report["load_after"] = os.getloadavg()
    print(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
