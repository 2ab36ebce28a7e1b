"""Scale: pcace.rank on N = 5,000 and 50,000 CIFAR-10 training images (issue 14).

Shared ResNet-20, all 19 conv layers, cat logit (class 3), default memory budget. Each
measurement runs in its own subprocess (so ``ru_maxrss`` is that run's peak): a bare
forward pass over the same loader, then ``pcace.rank``. Images are decoded once into a
uint8 cache under /tmp and normalised per batch by a Dataset, so the input costs
3 KB per image of RAM, not a float copy of all images.

    .venv/bin/python benchmarks/bench_scale.py --n 5000
    .venv/bin/python benchmarks/bench_scale.py --n 50000
    .venv/bin/python benchmarks/bench_scale.py --n 5000 --budget 2147483648   # streamed

``rank`` runs without the permutation null and split-half check by default (the ratio
measures the pipeline); ``--permutations 100 --split-half 10`` times rank's defaults.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
TRAIN = Path("/tmp/cifar10-train")
CACHE = Path("/tmp/cifar10-train-uint8.npy")


def images_uint8(shared: Path) -> np.ndarray:
    """All 50,000 training images as (N, 32, 32, 3) uint8, classes interleaved."""
    if CACHE.exists():
        return np.load(CACHE)
    root = TRAIN / "cifar10-train"
    if not root.is_dir():
        with tarfile.open(shared / "data/cifar10-train.tar.gz") as tar:
            tar.extractall(TRAIN, filter="data")
    from PIL import Image

    classes = sorted(p.name for p in root.iterdir())
    files = [sorted((root / c).glob("*.jpg")) for c in classes]
    order = [f for group in zip(*files, strict=False) for f in group]  # interleave classes
    out = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in order])
    np.save(CACHE, out)
    return out


class Normalised(torch.utils.data.Dataset):
    def __init__(self, raw: np.ndarray):
        from pcace.zoo import CIFAR_MEAN, CIFAR_STD

        self.raw = raw
        self.mean = torch.tensor(CIFAR_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CIFAR_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = torch.from_numpy(self.raw[i]).permute(2, 0, 1).float().div_(255)
        return (x - self.mean) / self.std


def measure(mode: str, n: int, batch: int, shared: Path, budget: str = "auto",
            permutations: int = 0, split_half: int = 0) -> dict:
    import pcace
    from pcace.inputs.models import load_model

    model = load_model("pcace.zoo:cifar_resnet20",
                       checkpoint=shared / "data/cifar10/resnet20-12fca82f.th").model
    loader = torch.utils.data.DataLoader(Normalised(images_uint8(shared)[:n]), batch_size=batch)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    out: dict = {}
    if mode == "forward":
        with torch.inference_mode():
            for x in loader:
                model(x)[:, 3].numpy()
    else:
        res = pcace.rank(model, loader, target=3, progress=False, device="cpu",
                         memory_budget=budget if budget == "auto" else int(float(budget)),
                         permutations=permutations, split_half=split_half)
        routes = res.manifest["routes"]
        out["routes"] = {r: sum(v["route"] == r for v in routes.values())
                         for r in ("in-memory", "spilled", "moments")}
        out["timings"] = res.manifest["timings"]
        out["budget_gib"] = res.manifest["memory_budget"] / 2**30
    out.update(mode=mode, n=n, seconds=time.perf_counter() - t,
               peak_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
               rss_before_gib=before / 2**20)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--shared", type=Path, default=SHARED)
    ap.add_argument("--budget", default="auto", help="memory_budget in bytes, or auto")
    ap.add_argument("--permutations", type=int, default=0,
                    help="rank's permutation null (0: the pipeline alone, the ratio's measure)")
    ap.add_argument("--split-half", type=int, default=0, help="rank's split-half check (0)")
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.n, args.batch_size, args.shared,
                                 args.budget, args.permutations, args.split_half)))
        return
    images_uint8(args.shared)
    results = {}
    for mode in ("forward", "rank"):
        cmd = [sys.executable, __file__, "--child", mode, "--n", str(args.n),
               "--batch-size", str(args.batch_size), "--shared", str(args.shared),
               "--budget", args.budget, "--permutations", str(args.permutations),
               "--split-half", str(args.split_half)]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps(results[mode]), flush=True)
    ratio = results["rank"]["seconds"] / results["forward"]["seconds"]
    print(json.dumps({"n": args.n, "ratio": round(ratio, 2),
                      "rank_peak_gib": round(results["rank"]["peak_gib"], 2)}))


if __name__ == "__main__":
    main()
