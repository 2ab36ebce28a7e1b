"""One pass over N images (issue 24): the sampled basis against a bare forward pass and
against the exact route.

Shared ResNet-20, all 19 conv layers, cat logit (class 3), CIFAR-10 training images held
as one normalised float tensor, batch 256, statistics off (``permutations=0,
split_half=0``; ``--defaults``: rank's default statistics). In one process: the bare
forward pass (the tensor through the model in ``torch.inference_mode()``), then
``pcace.rank`` with ``basis="sample"``; the ratio of their times, and the peak RSS of the
run minus that of the bare pass (``ru_maxrss`` after each: the bare pass's peak comes
first). ``--exact`` also runs ``basis="exact"`` (in a subprocess of its own, for its
memory) and compares the channels' values per layer: Spearman and the 99th percentile of
|difference|.

    .venv/bin/python benchmarks/bench_onepass.py --n 5000 --exact
    .venv/bin/python benchmarks/bench_onepass.py --n 5000 --exact --solver exact
    .venv/bin/python benchmarks/bench_onepass.py --n 50000
    .venv/bin/python benchmarks/bench_onepass.py --model resnet18 --n 2000 --exact

``--solver`` sets how the sampled basis finds the sample's axes
(``pcace.reduce.sampled.SOLVER``: ``auto``, the default, ``randomized`` or ``exact``);
``--precision`` the dtype of the range finder's power iterations
(``pcace.reduce.sampled.RANGE_PRECISION``: ``auto``, ``bfloat16`` or ``float32``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import SHARED, images_uint8  # noqa: E402


def _tensor(n: int, model: str, seed: int = 0) -> torch.Tensor:
    """The images: CIFAR-10 training images (normalised), or random 224 px ones."""
    if model == "resnet18":
        gen = torch.Generator().manual_seed(seed)
        return torch.rand(n, 3, 224, 224, generator=gen)
    from pcace.zoo import CIFAR_MEAN, CIFAR_STD

    raw = torch.from_numpy(images_uint8(SHARED)[:n]).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return (raw - mean) / std


def _model(name: str) -> torch.nn.Module:
    if name == "resnet18":
        import torchvision

        torch.manual_seed(0)
        return torchvision.models.resnet18(weights=None).eval()
    from pcace.inputs.models import load_model

    return load_model("pcace.zoo:cifar_resnet20",
                      checkpoint=SHARED / "data/cifar10/resnet20-12fca82f.th").model


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure(args: argparse.Namespace, basis: str) -> dict:
    """The bare pass, then the run, in this process."""
    import pcace
    import pcace.reduce.sampled

    pcace.reduce.sampled.SOLVER = args.solver
    pcace.reduce.sampled.RANGE_PRECISION = args.precision
    model, x = _model(args.model), _tensor(args.n, args.model)
    target = 3 if args.model == "resnet20" else 0
    start = time.perf_counter()
    with torch.inference_mode():
        for part in x.split(args.batch_size):
            model(part)[:, target].numpy()
    bare = time.perf_counter() - start
    bare_peak = _peak_gib()
    start = time.perf_counter()
    stats = {} if args.defaults else {"permutations": 0, "split_half": 0}
    res = pcace.rank(model, x, target=target, progress=False, device="cpu",
                     batch_size=args.batch_size, basis=basis, sample_size=args.sample_size,
                     layers=args.layers, **stats)
    seconds = time.perf_counter() - start
    routes = {}
    for entry in res.manifest["routes"].values():
        routes[entry["route"]] = routes.get(entry["route"], 0) + 1
    if args.save:
        res.channels.to_csv(Path(args.save), index=False)
    return {"basis": basis, "solver": args.solver if basis == "sample" else None,
            "precision": args.precision if basis == "sample" else None,
            "n": args.n, "bare_s": round(bare, 2), "rank_s": round(seconds, 2),
            "ratio": round(seconds / bare, 2),
            "peak_minus_bare_gib": round(_peak_gib() - bare_peak, 2),
            "bare_peak_gib": round(bare_peak, 2), "routes": routes,
            "stages": res.manifest["timings"]["stages"]}


def compare(sample_csv: Path, exact_csv: Path) -> list[dict]:
    """Per layer: Spearman of the channels' values and the 99th percentile |difference|."""
    import pandas as pd
    from scipy.stats import spearmanr

    a = pd.read_csv(sample_csv).set_index(["layer", "channel"]).pcace
    b = pd.read_csv(exact_csv).set_index(["layer", "channel"]).pcace.loc[a.index]
    rows = []
    for layer in dict.fromkeys(a.index.get_level_values(0)):
        u, v = a.loc[layer].to_numpy(), b.loc[layer].to_numpy()
        rows.append({"layer": layer, "spearman": round(float(spearmanr(u, v)[0]), 4),
                     "p99_abs_diff": round(float(np.quantile(np.abs(u - v), 0.99)), 4),
                     "max_abs_diff": round(float(np.abs(u - v).max()), 4)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--model", choices=["resnet20", "resnet18"], default="resnet20")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--sample-size", default="auto",
                    type=lambda s: s if s == "auto" else int(s))
    ap.add_argument("--defaults", action="store_true",
                    help="rank's default statistics (pooled null, split halves), not the "
                         "pipeline alone")
    ap.add_argument("--layers", nargs="*", default=None)
    ap.add_argument("--solver", choices=["auto", "randomized", "exact"], default="auto",
                    help="how the sampled basis finds the sample's axes "
                         "(pcace.reduce.sampled.SOLVER)")
    ap.add_argument("--precision", choices=["auto", "bfloat16", "float32"], default="auto",
                    help="the range finder's power iterations "
                         "(pcace.reduce.sampled.RANGE_PRECISION)")
    ap.add_argument("--exact", action="store_true", help="also basis='exact', and compare")
    ap.add_argument("--reuse-exact", action="store_true",
                    help="with --exact: compare with the exact route's values saved by an "
                         "earlier run of the same --n and --model")
    ap.add_argument("--child", default=None)
    ap.add_argument("--save", default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args, args.child)))
        return
    out = Path(f"/tmp/bench_onepass_{args.model}_{args.n}")
    out.mkdir(exist_ok=True)
    bases = ["sample", "exact"] if args.exact else ["sample"]
    if args.reuse_exact and (out / "exact.csv").exists():
        bases = ["sample"]
    for basis in bases:
        cmd = [sys.executable, __file__, "--child", basis, "--n", str(args.n), "--model",
               args.model, "--batch-size", str(args.batch_size), "--sample-size",
               str(args.sample_size), "--solver", args.solver, "--precision", args.precision,
               "--save", str(out / f"{basis}.csv")]
        if args.defaults:
            cmd.append("--defaults")
        if args.layers:
            cmd += ["--layers", *args.layers]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        print(done.stdout.strip().splitlines()[-1], flush=True)
    if args.exact:
        rows = compare(out / "sample.csv", out / "exact.csv")
        for row in rows:
            print(json.dumps(row))
        print(json.dumps({"min_spearman": min(r["spearman"] for r in rows),
                          "max_p99": max(r["p99_abs_diff"] for r in rows)}))


if __name__ == "__main__":
    main()
