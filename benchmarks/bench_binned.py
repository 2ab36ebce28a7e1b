"""Binned ACE against exact ACE: error and speed at large n (issue 25).

Parts (``--parts``, comma-separated):

* ``fixtures``: the 36 shared acepack fixtures resampled to n rows (rows drawn with
  replacement, a small Gaussian jitter added except in the ``ties`` family, whose ties
  must stay), every case solved exact and binned.
* ``families``: fresh problems of known structure (k = 3 standard normal predictors)
  from a few function families and noise levels, including the null.
* ``pcace``: PCACE problems: the principal components (k = 3) of every channel of the
  shared CIFAR ResNet-20's conv layers, cat logit (class 3) as the score; N = 5,000
  (the 5,000 cat training images, all 19 layers) and N = 50,000 (all training images,
  ``--layers-50k``). Components are computed once by ``pcace.rank`` and cached
  (``--cache``).
* ``speed``: time per problem, exact and binned, in one process, on PCACE-shaped
  problems (one channel against permutations of one score, solved by
  ``pcace.maxcorr.ace.ace_shared`` as the pipeline's null does, and single ``pcace.ace``
  calls that sort everything).

Error figures: the 99th percentile and maximum of ``|rho_binned - rho_exact|``; for
``pcace``, also the Spearman correlation of each layer's channel ranking.

    .venv/bin/python benchmarks/bench_binned.py --parts fixtures,families,speed
    .venv/bin/python benchmarks/bench_binned.py --parts pcace --n 5000 50000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import SHARED, Normalised, images_uint8  # noqa: E402

LAYERS_50K = ("conv1", "layer1.2.conv2", "layer2.2.conv2", "layer3.2.conv2")


def components(n: int, cache: Path, layers: tuple[str, ...] | None) -> dict:
    """``{layer: (C, n, 3) float64}`` and ``"__scores__"``, computed once and cached."""
    path = cache / f"components_{n}.npz"
    if path.exists():
        with np.load(path) as f:
            return dict(f)
    import torch

    import pcace
    from pcace.inputs.models import load_model

    raw = images_uint8(SHARED)
    raw = raw[3::10] if n <= 5000 else raw  # interleaved classes: 3::10 are the cats
    model = load_model("pcace.zoo:cifar_resnet20",
                       checkpoint=SHARED / "data/cifar10/resnet20-12fca82f.th").model
    loader = torch.utils.data.DataLoader(Normalised(raw[:n]), batch_size=256)
    t = time.perf_counter()
    res = pcace.rank(model, loader, target=3, layers=list(layers) if layers else None,
                     permutations=0, split_half=0, progress=False, device="cpu",
                     ace_options={"bins": None})
    print(f"components at N = {n}: {time.perf_counter() - t:.0f} s", flush=True)
    out = {name: c.double().numpy() for name, c in res.components.items()}
    out["__scores__"] = np.asarray(res.scores, dtype=np.float64)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="fixtures,families,speed")
    ap.add_argument("--n", type=int, nargs="+", default=[5000, 20000, 50000])
    ap.add_argument("--cache", type=Path, default=Path("/tmp/pcace-binned"))
    ap.add_argument("--layers-50k", nargs="+", default=list(LAYERS_50K))
    a = ap.parse_args()
    print(f"load {os.getloadavg()[0]:.2f}", flush=True)
    for part in a.parts.split(","):
        if part == "components":
            for n in a.n:
                components(n, a.cache, None if n <= 5000 else tuple(a.layers_50k))
        else:
            raise SystemExit(f"unknown part {part!r}")
    print(json.dumps({}))


if __name__ == "__main__":
    main()
