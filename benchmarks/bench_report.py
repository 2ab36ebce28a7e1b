"""Time and size of the HTML report of a many-layer run (figures, assets, page height).

Two networks over CIFAR-10 cat images: the shared pretrained ResNet-20 (all 19 conv layers)
and a CIFAR ResNet-56 (55 conv layers) with its default random initialisation, which is
enough for time and size. The ranking (with a permutation null) is timed on its own; what
the benchmark is about is what follows it: ``collect_assets`` (example maps, CAM,
ACE transforms, feature visualisations) and ``write_report``. The page height and the width
of the navigation are measured in headless Chromium when it is installed.

    PYTHONPATH=src python benchmarks/bench_report.py --nets resnet20 resnet56

Results: ``benchmarks/README.md``, "Report".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path("/work/shared/data/cifar10")
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def load_images(n: int) -> torch.Tensor:
    """The first ``n`` cat test images, normalised."""
    from PIL import Image
    from torchvision import transforms

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    files = sorted((DATA / "test" / "cat").glob("*.jpg"))[:n]
    return torch.stack([tf(Image.open(f).convert("RGB")) for f in files])


def build(net: str) -> torch.nn.Module:
    """The pretrained ResNet-20, or a ResNet-56 (9 blocks per stage) with random weights."""
    from pcace.zoo import CifarResNet, cifar_resnet20

    if net == "resnet20":
        state = torch.load(DATA / "resnet20-12fca82f.th", weights_only=True,
                           map_location="cpu")["state_dict"]
        model = cifar_resnet20()
        model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
        return model.eval()
    torch.manual_seed(0)
    return CifarResNet(blocks_per_stage=9).eval()


def ranked(net: str, model: torch.nn.Module, images: torch.Tensor, permutations: int):
    """The run, as ``pcace.rank`` returns it (with the components the ACE plots need)."""
    import pcace
    from pcace.inputs.targets import ClassLogit

    t0 = time.perf_counter()
    result = pcace.rank(model, images, ClassLogit(3, "cat"), device="cpu", progress=False,
                        permutations=permutations, seed=0)
    print(f"{net}: ranked {len(result.layers)} layers, {len(result.channels)} channels in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    return result


def page_metrics(report: Path) -> dict:
    """Height of the page and width of its navigation bar at a 1200 px window (Chromium)."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from test_report_browser import evaluate, find_chromium, open_page
    except ImportError:
        return {}
    binary = find_chromium()
    if binary is None:
        return {}
    import tempfile

    with tempfile.TemporaryDirectory() as profile:
        dt, session = open_page(binary, report, Path(profile))
        try:
            return evaluate(dt, session, """(function () {
                var nav = document.querySelector('nav');
                return {height: document.documentElement.scrollHeight,
                        nav_width: nav ? nav.scrollWidth : null,
                        nav_height: nav ? nav.getBoundingClientRect().height : null,
                        page_width: document.documentElement.scrollWidth}; })()""")
        finally:
            dt.close()


def bench(net: str, n: int, permutations: int, work: Path, reuse: bool = False,
          threads: int = 2) -> dict:
    import pcace
    from pcace.viz import collect_assets, write_report

    torch.set_num_threads(threads)
    images = load_images(n)
    model = build(net)
    run = work / f"{net}-{n}"
    if reuse and (run / "run.json").exists():
        result = pcace.load(run)  # no principal components: the ACE figures are left out
        for stale in ("assets", "figures"):
            for f in (run / stale).glob("*"):
                f.unlink()
    else:
        result = ranked(net, model, images, permutations)
        result.save(run)
    t0, c0 = time.perf_counter(), time.process_time()
    collect_assets(run, model, images, result, mean=MEAN, std=STD)
    t_assets, c_assets = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    path = write_report(run)
    t_report, c_report = time.perf_counter() - t0, time.process_time() - c0
    figures = list((run / "figures").glob("*"))
    out = {"net": net, "images": len(images), "layers": len(result.layers),
           "channels": len(result.channels), "assets_s": round(t_assets, 1),
           "report_s": round(t_report, 1), "total_s": round(t_assets + t_report, 1),
           "cpu_s": round(c_assets + c_report, 1),
           "load_avg": round(__import__("os").getloadavg()[0], 1),
           "report_mb": round(path.stat().st_size / 1e6, 2), "figures": len(figures),
           "figures_mb": round(sum(f.stat().st_size for f in figures) / 1e6, 2)}
    out.update(page_metrics(path))
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nets", nargs="+", default=["resnet20", "resnet56"],
                    choices=["resnet20", "resnet56"])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--permutations", type=int, default=99)
    ap.add_argument("--work", type=Path, default=Path("/tmp/pcace-bench-report"))
    ap.add_argument("--reuse", action="store_true",
                    help="reuse a run saved in --work (skips the ranking; no ACE figures)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    for net in args.nets:
        bench(net, args.images, args.permutations, args.work, args.reuse, args.threads)


if __name__ == "__main__":
    main()
