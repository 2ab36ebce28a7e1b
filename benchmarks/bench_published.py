"""The published procedure against pcace, on ResNet-18's conv1 (64 channels, 300 images).

The authors' scripts score one channel at a time: for every image they run the whole network
on that single image to get the channel's map, then standardise, PCA (k = 3) and run the PyPI
``ace`` package, reporting |corr(phi_1, theta)|. This emulates that procedure on local tensors
(the scripts also fetch each image from a URL, which is not counted here) for a few channels,
extrapolates linearly to all 64 (every channel costs the same N forward passes), and times
``pcace.rank`` on the same layer and images in the same process.

Needs the optional benchmark dependency ``ace`` (``pip install ace``) and scikit-learn.

Usage::

    python benchmarks/bench_published.py [--channels 2] [--images 300] [--size 224]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torchvision
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

import pcace


def published_channel(model: torch.nn.Module, images: torch.Tensor, channel: int,
                      target: int) -> float:
    """One channel, the scripts' way: N single-image passes, PCA, PyPI ace, |corr(phi_1, y)|."""
    from ace import ace as pypi_ace

    maps, scores = [], []
    store = {}
    handle = model.conv1.register_forward_hook(
        lambda m, i, o: store.__setitem__("a", o[0, channel].detach().flatten().numpy()))
    try:
        for image in images:
            with torch.no_grad():
                out = model(image[None])
            maps.append(store["a"])
            scores.append(float(out[0, target]))
    finally:
        handle.remove()
    z = PCA(n_components=3).fit_transform(StandardScaler().fit_transform(np.array(maps)))
    solver = pypi_ace.ACESolver()
    solver.specify_data_set([z[:, j] for j in range(3)], np.array(scores))
    solver.solve()
    return abs(float(np.corrcoef(solver.x_transforms[0], solver.y_transform)[0, 1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=2)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    images = torch.randn(args.images, 3, args.size, args.size)
    target = 281

    pcace.rank(model, images[:16], target, layers=["conv1"], progress=False)  # warm-up (JIT)
    t = time.perf_counter()
    ours = pcace.rank(model, images, target, layers=["conv1"], progress=False,
                      score="first-component")
    ours_s = time.perf_counter() - t
    t = time.perf_counter()
    ours_max = pcace.rank(model, images, target, layers=["conv1"], progress=False)
    ours_max_s = time.perf_counter() - t

    t = time.perf_counter()
    theirs = [published_channel(model, images, c, target) for c in range(args.channels)]
    per_channel = (time.perf_counter() - t) / args.channels
    extrapolated = per_channel * 64
    first = ours.channels.pcace.to_numpy()[:args.channels]
    print(json.dumps({
        "layer": "conv1 (64 channels)", "images": args.images, "size": args.size,
        "published_seconds_per_channel": per_channel,
        "published_seconds_64_channels_extrapolated": extrapolated,
        "pcace_first_component_seconds": ours_s,
        "pcace_maximal_seconds": ours_max_s,
        "speedup_vs_published": extrapolated / ours_s,
        "published_values": theirs,
        "pcace_first_component_values": first.tolist(),
        "pcace_maximal_values": ours_max.channels.pcace.to_numpy()[:args.channels].tolist(),
        "measured_channels": args.channels,
    }, indent=2))


if __name__ == "__main__":
    main()
