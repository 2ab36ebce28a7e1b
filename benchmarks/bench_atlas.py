"""The per-class atlas at scale: every CIFAR-10 class's training images on its own logit.

Shared ResNet-20, all 19 conv layers, ``per_label=True`` (each label's images on its own
class logit), a permutation null, over the first N CIFAR-10 training images (classes
interleaved; the uint8 cache of ``bench_scale.py``). Reports the time, the peak RSS, how
the labels ran (one pass, or in turn when the maps of all images exceed the budget) and,
per class, the layers' evidence. Run in its own process so that ``ru_maxrss`` is the run's.

    .venv/bin/python benchmarks/bench_atlas.py --n 50000 --permutations 20
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import SHARED, Normalised, images_uint8  # noqa: E402


class Labelled(Normalised):
    """(image, label) pairs with labels readable without decoding (``targets``)."""

    def __init__(self, raw: np.ndarray, labels: np.ndarray):
        super().__init__(raw)
        self.targets = labels.tolist()

    def __getitem__(self, i: int):
        return super().__getitem__(i), self.targets[i]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--permutations", type=int, default=20)
    ap.add_argument("--split-half", type=int, default=0)
    ap.add_argument("--budget", default="auto")
    ap.add_argument("--out", type=Path, default=None, help="also save the run here")
    a = ap.parse_args()
    import pcace
    from pcace.inputs.models import load_model

    raw = images_uint8(SHARED)[: a.n]
    labels = np.arange(a.n) % 10  # bench_scale's cache interleaves the 10 sorted classes
    model = load_model("pcace.zoo:cifar_resnet20",
                       checkpoint=SHARED / "data/cifar10/resnet20-12fca82f.th").model
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    load = os.getloadavg()[0]
    t = time.perf_counter()
    res = pcace.rank(model, Labelled(raw, labels), per_label=True, device="cpu",
                     permutations=a.permutations, split_half=a.split_half, progress=False,
                     batch_size=256,
                     memory_budget=a.budget if a.budget == "auto" else int(float(a.budget)))
    seconds = time.perf_counter() - t
    if a.out is not None:
        res.save(a.out)
    layers = res.layers
    share = layers.pivot_table(index="layer", columns="label", values="significant_share",
                               sort=False)
    print(json.dumps({
        "n": a.n, "permutations": a.permutations, "seconds": seconds, "load_before": load,
        "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "rss_before_gib": before, "mode": res.manifest.get("per_label_passes", "one pass"),
        "per_label_seconds": {k: v["timings"].get("total") for k, v in
                              res.manifest.get("per_label_runs", {}).items()},
        "median_share_significant_by_class": share.median().round(3).to_dict(),
        "median_share_significant_by_layer": share.median(axis=1).round(3).to_dict(),
    }, indent=1, default=str))


if __name__ == "__main__":
    main()
