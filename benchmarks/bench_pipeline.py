"""Pipeline benchmarks: pcace.rank against a bare forward pass, and peak memory.

Usage::

    python benchmarks/bench_pipeline.py resnet18 [--images 300] [--size 224] [--device cpu]
    python benchmarks/bench_pipeline.py vgg16 [--images 300] [--budget 2GiB|auto]

``resnet18``: random-weight torchvision ResNet-18, all 20 conv layers (4,800 channels),
N images of size x size. Times a bare forward pass over the same images (same batch size,
inference mode) and ``pcace.rank`` (the pipeline alone: no null, no split-half) in the same
process, and prints their ratio. ``--malloc default`` (the library's default) never tunes
``malloc``: bare pass and rank run with glibc's settings. ``--malloc tuned`` is what the
``pcace`` command runs: ``rank(..., tune_malloc=True)``, and the bare pass inside
``kept_heap()`` too (pcace's own work over an equally fast pass). Once tuned, glibc's
thresholds stay fixed for the process, so the two settings must run in separate
processes; compare ``rank_s`` of a tuned run with ``bare_forward_s`` of a default run for
the CLI's ratio to what a user's own loop costs.

``vgg16``: random-weight VGG-16, all 13 conv layers; prints time and the peak resident set
size (ru_maxrss) of the process with the given memory budget. Run it in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import torch
import torchvision

import pcace
from pcace.cli.parser import parse_size
from pcace.core.malloc import kept_heap


def bare_forward(model: torch.nn.Module, images: torch.Tensor, batch_size: int,
                 device: torch.device) -> float:
    model.eval().to(device)
    t = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            model(images[i:i + batch_size].to(device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def natural_images(shared: str, n: int, size: int) -> torch.Tensor:
    """``n`` shared CIFAR-10 test images (all classes), bilinearly upsampled, standardised."""
    from pathlib import Path

    from torchvision.io import read_image

    files = sorted((Path(shared) / "data/cifar10/test").glob("*/*.jpg"))[::6][:n]
    x = torch.stack([read_image(str(f)).float() / 255 for f in files])
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                        align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return (x - mean) / std


def reuse_store_memory() -> None:
    """Diagnostic: keep the activation store's RAM segments from one rank call to the next.

    Separates the cost of acquiring fresh memory (page faults; on a VM that hands free memory
    back to its host, far dearer than on bare metal) from pcace's own work: with it, every
    call after the first writes into memory the process already touched. Not a pcace
    feature (it would hold the memory after the call); it patches a private method.
    """
    from pcace.capture.capture import ActivationStore

    kept: dict[tuple, torch.Tensor] = {}
    add_segment = ActivationStore._add_segment

    def reusing(self, name, layer):  # noqa: ANN001, ANN202 - same signature as the original
        c, h, w = layer.shape
        key = (name, c, layer.capacity, h * w)
        if layer.spilled or key not in kept:
            add_segment(self, name, layer)
            if not layer.spilled:
                kept[key] = layer.segments[-1]
            return
        self._reserve(name, layer.segment_bytes)
        if layer.spilled:  # the reservation spilled it after all
            add_segment(self, name, layer)
        else:
            layer.segments.append(kept[key])

    ActivationStore._add_segment = reusing


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=["resnet18", "vgg16"])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--budget", default="auto",
                        type=lambda t: "auto" if t == "auto" else parse_size(t))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--pca-dtype", choices=["float64", "float32"], default="float32")
    parser.add_argument("--natural", metavar="SHARED_DIR", default=None,
                        help="use the shared CIFAR-10 test images (natural images, upsampled "
                             "to --size) instead of Gaussian noise; e.g. ../shared")
    parser.add_argument("--malloc", choices=["default", "tuned"], default="default",
                        help="default: glibc's settings throughout; tuned: as the pcace "
                             "command runs (see the module docstring)")
    parser.add_argument("--defaults", action="store_true",
                        help="rank's default statistics (the null and the split-half check) "
                             "instead of the pipeline alone")
    parser.add_argument("--null", default=None, help="with --defaults: null='pooled'|'exact'")
    parser.add_argument("--reuse-store", action="store_true",
                        help="diagnostic: reuse the store's memory between rank calls, to "
                             "measure the cost of acquiring fresh memory (see the README)")
    args = parser.parse_args()
    if args.reuse_store:
        reuse_store_memory()

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(weights=None).eval()
    images = (natural_images(args.natural, args.images, args.size) if args.natural
              else torch.randn(args.images, 3, args.size, args.size))
    target = 281  # any logit: random weights, timing only
    rss_before = peak_rss_gib()

    tuned_run = args.malloc == "tuned"
    pcace.rank(model, images[:16], target, layers=["features.0" if args.model == "vgg16"
                                                   else "conv1"], progress=False,
               device=device, permutations=0, split_half=0,
               tune_malloc=tuned_run)  # warm-up: JIT compile, allocator
    forward, ranked = [], []
    for _ in range(args.repeats):
        with kept_heap(tuned_run) as tuned:
            forward.append(bare_forward(model, images, args.batch_size, device))
        t = time.perf_counter()
        stats = {} if args.defaults else {"permutations": 0, "split_half": 0}
        if args.defaults and args.null:
            stats["null"] = args.null
        res = pcace.rank(model, images, target, batch_size=args.batch_size, device=device,
                         memory_budget=args.budget, progress=False,
                         pca_dtype=getattr(torch, args.pca_dtype), tune_malloc=tuned_run,
                         **stats)
        ranked.append(time.perf_counter() - t)
    report = {
        "model": args.model, "images": len(images), "size": args.size,
        "natural_images": bool(args.natural),
        "pca_dtype": args.pca_dtype,
        "layers": len(res.layers), "channels": len(res.channels), "device": str(device),
        "bare_forward_s": min(forward), "rank_s": min(ranked),
        "ratio": min(ranked) / min(forward),
        "malloc": args.malloc, "malloc_tuned": tuned,
        "single_run": {"bare_forward_s": forward[0], "rank_s": ranked[0]},
        "rank_timings": res.manifest["timings"], "statistics": stats or "defaults",
        "spilled_layers": len(res.manifest["spilled_layers"]),
        "reuse_store": args.reuse_store,
        "memory_budget_gib": res.manifest["memory_budget"] / 2**30,
        "memory_budget_reason": res.manifest.get("memory_budget_reason"),
        "peak_rss_gib": peak_rss_gib(), "rss_before_gib": rss_before,
        "machine": f"{platform.processor() or platform.machine()}, "
                   f"{torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
