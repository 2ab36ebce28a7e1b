"""What the report of a run with several targets costs against one-target reports.

A run of T targets (or a per-class run of T classes) gets, for every target, the pictures
a run of that target alone gets (``collect_assets`` then ``write_report``). This measures
that report against T one-target reports of the same targets on the same images, on the
shared ResNet-20 and CIFAR-10 test images: two targets (cat and dog logits over the cat and
dog images) and a per-class run of ten classes (each class's images on its own logit).
The ranking itself is not timed; only the report (assets and pages).

    .venv/bin/python benchmarks/bench_many_assets.py --per-class-images 40
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import pcace
from pcace.data import default_transform, image_folder
from pcace.inputs.data import stack_images
from pcace.models import load_model
from pcace.viz import collect_assets, write_report

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def class_images(name: str, n: int) -> torch.Tensor:
    ds = image_folder(SHARED / "test", class_name=name,
                      transform=default_transform(mean=MEAN, std=STD))
    return stack_images(torch.utils.data.Subset(ds, range(n)))[0]


def report_seconds(model, images, result, root: Path) -> float:
    """Seconds for the report of ``result``: its assets and its page(s)."""
    result.save(root)
    t0 = time.perf_counter()
    collect_assets(root, model, images, result, mean=MEAN, std=STD, device="cpu",
                   progress=False)
    write_report(root, progress=False)
    seconds = time.perf_counter() - t0
    print(f"  report of {root.name}: {seconds:.1f} s", file=sys.stderr, flush=True)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-class-images", type=int, default=40, help="images per class")
    ap.add_argument("--layers", nargs="+", default=["layer1.0.conv1", "layer2.0.conv1",
                                                   "layer3.0.conv1", "layer3.2.conv2"])
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats (two targets)")
    ap.add_argument("--two-only", action="store_true", help="only the two-target comparison")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = load_model("pcace.zoo:cifar_resnet20",
                       checkpoint=str(SHARED / "resnet20-12fca82f.th")).model.eval()
    n = args.per_class_images
    by_class = {c: class_images(c, n) for c in CLASSES}
    options = dict(layers=args.layers, progress=False, permutations=19, split_half=2,
                   device="cpu", categories=list(CLASSES))
    out = {"n_per_class": n, "layers": args.layers}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # two targets over the same images (cat and dog images, both logits)
        both = torch.cat([by_class["cat"], by_class["dog"]])
        many = pcace.rank(model, both, ["cat", "dog"], **options)
        alone = {t: pcace.rank(model, both, t, **options) for t in ("cat", "dog")}
        two, ones = [], []
        for r in range(args.repeats):  # interleaved; the fastest of each
            two.append(report_seconds(model, both, many, tmp / f"two_{r}"))
            ones.append(sum(report_seconds(model, both, alone[t], tmp / f"one_{t}_{r}")
                            for t in alone))
        out["two_targets_s"], out["two_one_target_reports_s"] = min(two), min(ones)
        if args.two_only:
            out["two_targets_ratio"] = out["two_targets_s"] / out["two_one_target_reports_s"]
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v
                              for k, v in out.items()}))
            return
        # a per-class run of ten classes against ten one-target reports
        images = torch.cat([by_class[c] for c in CLASSES])
        labels = torch.arange(10).repeat_interleave(n)
        atlas = pcace.rank(model, (images, labels), None, per_label=True, **options)
        out["ten_class_atlas_s"] = report_seconds(model, images, atlas, tmp / "atlas")
        out["ten_one_target_reports_s"] = sum(
            report_seconds(model, by_class[c], pcace.rank(model, by_class[c], c, **options),
                           tmp / f"class_{c}") for c in CLASSES)
    out["two_targets_ratio"] = out["two_targets_s"] / out["two_one_target_reports_s"]
    out["ten_class_ratio"] = out["ten_class_atlas_s"] / out["ten_one_target_reports_s"]
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
    main()
