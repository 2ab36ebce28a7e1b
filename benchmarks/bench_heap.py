"""Bare forward passes with glibc's default malloc settings against the heap kept by pcace.

Usage::

    python benchmarks/bench_heap.py resnet18 [--images 300] [--batch-size 32]
    python benchmarks/bench_heap.py vgg16 --images 96

Runs the model over the images twice in each setting (default first, then inside
``pcace.core.malloc.kept_heap()``, whose thresholds stay set for the second setting only) and
prints the time, the minor page faults and the working memory of each pass (peak resident
set size above the level before the pass). Run it in a fresh process: glibc's automatic
thresholds are fixed once ``kept_heap`` has run, so the order matters.
"""

from __future__ import annotations

import argparse
import json
import resource

import torch
import torchvision
from bench_pipeline import bare_forward  # this folder: scripts run as files

from pcace.core.malloc import kept_heap


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed_pass(model: torch.nn.Module, images: torch.Tensor, batch_size: int) -> dict:
    base = _rss_gib()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    seconds = bare_forward(model, images, batch_size, torch.device("cpu"))
    return {"seconds": round(seconds, 3),
            "page_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults,
            "working_gib_at_most": round(_peak_gib() - base, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=["resnet18", "vgg16"])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(weights=None).eval()
    images = torch.randn(args.images, 3, 224, 224)
    with torch.inference_mode():
        model(images[:args.batch_size])  # warm-up
    report = {"model": args.model, "images": args.images, "batch_size": args.batch_size,
              "glibc_defaults": [timed_pass(model, images, args.batch_size) for _ in range(2)]}
    with kept_heap() as tuned:
        report["heap_kept"] = [timed_pass(model, images, args.batch_size) for _ in range(2)]
    report["malloc_tuned"] = tuned
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
