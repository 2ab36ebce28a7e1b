"""The subspace route against the exact moments route (issue 14).

Shared ResNet-20, all 19 conv layers, cat logit, the first N CIFAR-10 training images
(cached as in ``bench_scale.py``). One run with the seven 16 x 32 x 32 layers on the
subspace route and the other 12 on moments (the routes a budget too small for those
layers' moments and their maps' reduce would give; set here so that the comparison does
not depend on the planner's thresholds); one run under 2 GiB, where every layer takes the
exact moments route. Prints each run's time and peak RSS, per subspace layer the passes it
took, its unconverged channels and largest estimated angle, and the largest difference of
the PCACE values between the runs.

    .venv/bin/python benchmarks/bench_subspace.py --n 5000
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
from bench_scale import SHARED, Normalised, images_uint8  # noqa: E402


def child(n: int, budget: int, out: Path, forced: bool) -> dict:
    import pcace
    from pcace.inputs.models import load_model
    from pcace.reduce.plan import LayerRoute, MemoryPlan

    if forced:
        def routes(self, shapes, n, **_):
            return {k: LayerRoute("subspace" if s[1] * s[2] == 1024 else "moments", "bench",
                                  0, 3, tuple(s)) for k, s in shapes.items()}

        MemoryPlan.routes = routes

    model = load_model("pcace.zoo:cifar_resnet20",
                       checkpoint=SHARED / "data/cifar10/resnet20-12fca82f.th").model
    loader = torch.utils.data.DataLoader(Normalised(images_uint8(SHARED)[:n]), batch_size=256)
    t = time.perf_counter()
    res = pcace.rank(model, loader, target=3, progress=False, device="cpu",
                     memory_budget=budget, permutations=0, split_half=0)
    seconds = time.perf_counter() - t
    res.channels[["layer", "channel", "pcace"]].to_csv(out, index=False)
    routes = res.manifest["routes"]
    return {"budget": budget, "seconds": round(seconds, 1),
            "peak_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "routes": {r: sum(v["route"] == r for v in routes.values())
                       for r in ("in-memory", "spilled", "moments", "subspace")},
            "subspace": {k: {"passes": v["passes"], "unconverged": v["unconverged_channels"],
                             "largest_angle": v["largest_angle"]}
                         for k, v in routes.items() if v["route"] == "subspace"}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--child", type=int, default=None)
    ap.add_argument("--forced", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.n, args.child, args.out, args.forced)))
        return
    import pandas as pd

    images_uint8(SHARED)
    tables = []
    for forced in (True, False):
        out = Path(f"/tmp/bench_subspace_{forced}.csv")
        done = subprocess.run([sys.executable, __file__, "--n", str(args.n), "--child",
                               str(2 * 2**30), "--out", str(out)] +
                              (["--forced"] if forced else []), check=True,
                              capture_output=True, text=True)
        print(done.stdout.strip().splitlines()[-1], flush=True)
        tables.append(pd.read_csv(out).set_index(["layer", "channel"]).pcace)
    diff = (tables[0] - tables[1].loc[tables[0].index]).abs()
    print(json.dumps({"max_abs_diff": float(diff.max()),
                      "median_abs_diff": float(np.median(diff))}))


if __name__ == "__main__":
    main()
