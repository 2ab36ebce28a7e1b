"""Measurements behind pcace.stats.evidence: split-half checks on real data and the cost of a null.

Parts (``--parts``, comma-separated, default all):

- ``validate``: the shared CIFAR ResNet-20, cat logit, cat images (the 200 test cats and
  the 5,000 training cats, ``--train``: the extracted ``cifar10-train.tar.gz``). Per layer:

  * ``issue``: the ranking on the 200 test cats against the one on 4,800 training cats
    (Spearman), next to what :func:`pcace.stats.evidence.split_half` predicts from the 200
    alone (``sqrt(R_200 * R_4800)``, with ``R`` the projected split-half agreement);
    share of channels with BH q <= 0.05 at N = 200 (B = 100) and the verdict table.
  * ``projection``: disjoint sets of N training cats (N in ``--sizes``), each with its
    own PCA: the directly measured agreement of two N-sets (mean over pairs) against
    the split-half agreement measured inside one set, raw (N/2 vs N/2) and projected
    to N (Spearman-Brown); and ``reuse``: the split-half agreement when the halves
    reuse the set's principal components (what split_half does) against halves that
    recompute their own PCA.

- ``cost20``: seconds per ACE problem (k = 3) at N = 300 and N = 5,000, and the
  permutation null's cost on the ResNet-20's 688 channels at N = 5,000 (timed on a
  few permutations, extrapolated linearly in B).
- ``cost18``: torchvision ResNet-18 with random weights on 300 random 224 px images
  (4,800 conv channels): the time of ``pcace.rank`` without statistics, and of the
  permutation null (timed on a few permutations) and the split-half check.

Measured (2026-12-01, the 2-core shared machine under heavy load from other jobs: load
average 5-10, so absolute times are 4-8x an idle machine's; ratios hold better):

validate (ResNet-20, cat logit, k = 3; splits = 10, 90% intervals):

- N = 200 (test cats): split-half agreement projected to N: -0.12 to 0.39 in the first 18
  layers ("not reproducible"), 0.82 (0.75-0.87) in layer3.2.conv2 ("reproducible").
  The same 200 images' ranking against 4,800 training cats: -0.55 to 0.63 in the first 18
  layers, 0.88 in the last. BH q <= 0.05 (B = 100): 0% except layer3.2.conv1 (30%) and
  layer3.2.conv2 (67%). Verdicts: none x 17, weak (layer3.2.conv1), strong (layer3.2.conv2).
- Projection (disjoint sets of training cats, each with its own PCA; mean over the 19
  layers of projected split-half minus the measured agreement of two N-sets):
  N = 200 (5 pairs): -0.013 (raw halves: -0.067); N = 600 (4 pairs): -0.000 (raw: -0.105);
  N = 2,400 (1 pair): +0.004 (raw: -0.102). Median |difference| per layer 0.05-0.06.
  Measured agreement, median over layers: 0.12, 0.41, 0.77.
- Reuse of the set's PCA minus each half's own PCA (same halves, raw split-half Spearman,
  2 sets x 3 splits): +0.000, +0.049, +0.062 at N = 200, 600, 2,400.
- 90% intervals held the measured agreement in 78%, 80%, 84% of layers x sets.

cost18 (ResNet-18, random weights, 300 random images, 4,800 channels): rank without
statistics 80 s; permutation null 6.8 s per permutation (1.4 ms per problem under load;
0.17 ms idle, benchmarks/README.md); split-half, 10 splits: 98 s (= 14 permutations).
cost20 (ResNet-20, 5,000 training cats, 688 channels): PCA 76 s, observed ACE 14 s, null
10.9 s per permutation (15.8 ms per problem under load), split-half, 10 splits: 99 s
(= 9 permutations). ACE on Gaussian data, k = 3, same load: N = 300 0.66-1.2 ms, N = 5,000
13-18 ms per problem (ratio 15-20), N = 150 0.53x and N = 2,500 5.6x the N = 300 time.

Usage (from the repository root)::

    PYTHONPATH=src .venv/bin/python benchmarks/bench_evidence.py --parts validate \\
        --train /tmp/cifar10-train/cifar10-train --out evidence.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

from pcace import ace
from pcace.reduce.pca import principal_components
from pcace.stats import null_summary, permutation_null
from pcace.stats.evidence import layer_evidence, spearman_brown, split_half_table

REPO = Path(__file__).resolve().parents[1]
K = 3


def shared_root(arg: str | None) -> Path:
    for cand in [arg, os.environ.get("PCACE_SHARED"), str(REPO.parent / "shared"), "/work/shared"]:
        if cand and (Path(cand) / "data").is_dir():
            return Path(cand)
    sys.exit("shared data not found: pass --shared")


# ---------------------------------------------------------------------------- helpers

def load_cats(folder: Path) -> torch.Tensor:
    from PIL import Image
    from torchvision import transforms

    from pcace.zoo import CIFAR_MEAN, CIFAR_STD

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(CIFAR_MEAN, CIFAR_STD)])
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".png"))
    return torch.stack([tf(Image.open(p).convert("RGB")) for p in files])


def capture_all(model: torch.nn.Module, images: torch.Tensor, names: list[str]
                ) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """Conv outputs (N, C, H, W) float32 of every named layer, and the cat logit."""
    mods = dict(model.named_modules())
    store: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [mods[n].register_forward_hook(
        lambda m, i, o, n=n: store[n].append(o.detach().float().clone())) for n in names]
    logits = []
    with torch.no_grad():
        for s in range(0, len(images), 250):
            logits.append(model(images[s:s + 250])[:, 3].double())
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in store.items()}, torch.cat(logits).numpy()


def values_of(z: torch.Tensor | np.ndarray, y: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    live = np.flatnonzero((z != 0).reshape(z.shape[0], -1).any(1))
    out = np.zeros(z.shape[0])
    if live.size:
        out[live] = np.clip(np.asarray(ace(z[live], y).rho), 0, 1)
    return out


def pca(maps: torch.Tensor, idx: np.ndarray) -> np.ndarray:
    red = principal_components(maps[torch.as_tensor(idx)], K)
    z = red.scores.numpy().copy()
    z[red.dead.numpy()] = 0.0
    return z


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    r = spearmanr(a, b).statistic
    return float(r) if np.isfinite(r) else float("nan")


def own_pca_split_half(maps: dict[str, torch.Tensor], comps: dict[str, np.ndarray],
                       idx: np.ndarray, y: np.ndarray, splits: int, seed: int
                       ) -> tuple[dict[str, float], dict[str, float]]:
    """Split-half Spearman (raw, N/2 vs N/2) on the same halves with each half's own PCA
    and with the set's components reused (what split_half does)."""
    n = idx.size
    half = n // 2
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(splits):
        while True:
            perm = rng.permutation(n)
            a, b = perm[:half], perm[half:2 * half]
            if np.ptp(y[a]) > 0 and np.ptp(y[b]) > 0:
                break
        draws.append((np.sort(a), np.sort(b)))
    own, reuse = {}, {}
    for name, m in maps.items():
        rs, ru = [], []
        for a, b in draws:
            va = values_of(pca(m, idx[a]), y[a])
            vb = values_of(pca(m, idx[b]), y[b])
            rs.append(spearman(va, vb))
            ru.append(spearman(values_of(comps[name][:, a], y[a]),
                               values_of(comps[name][:, b], y[b])))
        own[name] = float(np.nanmean(rs))
        reuse[name] = float(np.nanmean(ru))
    return own, reuse


# ---------------------------------------------------------------------------- validate

def part_validate(args, shared: Path, results: dict) -> None:
    from pcace.inputs.models import load_model

    loaded = load_model("pcace.zoo:cifar_resnet20",
                        checkpoint=shared / "data/cifar10/resnet20-12fca82f.th")
    model = loaded.model.eval()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    t0 = time.perf_counter()
    test = load_cats(shared / "data/cifar10/test/cat")
    train = load_cats(Path(args.train) / "cat")
    maps_test, y_test = capture_all(model, test, names)
    maps_train, y_train = capture_all(model, train, names)
    print(f"captured {len(test)} + {len(train)} images in {time.perf_counter() - t0:.0f} s",
          flush=True)
    rng = np.random.default_rng(args.seed)
    pool = rng.permutation(len(train))
    out: dict = {"layers": names}

    # --- issue: 200 test cats vs 4,800 training cats
    t0 = time.perf_counter()
    idx_t = np.arange(len(test))
    comps_200 = {n: pca(maps_test[n], idx_t) for n in names}
    v200 = {n: values_of(comps_200[n], y_test) for n in names}
    big = pool[:4800]
    comps_big = {n: pca(maps_train[n], big) for n in names}
    vbig = {n: values_of(comps_big[n], y_train[big]) for n in names}
    sh200 = split_half_table(comps_200, y_test, splits=args.splits, seed=args.seed,
                             level=args.level)
    shbig = split_half_table(comps_big, y_train[big], splits=3, seed=args.seed, level=args.level)
    chans = []
    for n in names:
        null = permutation_null(comps_200[n], y_test, 100, seed=args.seed)
        t = null_summary(v200[n], null)
        t.insert(0, "layer", n)
        chans.append(t)
    channels = pd.concat(chans, ignore_index=True)
    verdict = layer_evidence(channels, sh200)
    rows = []
    for i, n in enumerate(names):
        r200 = sh200.split_half_spearman[i]
        rbig = shbig.split_half_spearman[i]
        pred = float(np.sqrt(max(r200, 0) * max(rbig, 0)))
        rows.append({"layer": n, "direct_200_vs_4800": spearman(v200[n], vbig[n]),
                     "predicted": pred, "split_half_200": r200,
                     "low_200": sh200.split_half_spearman_low[i],
                     "high_200": sh200.split_half_spearman_high[i],
                     "split_half_4800": rbig,
                     "top10_200": sh200.split_half_top10[i],
                     "significant_share_200": verdict.significant_share[i],
                     "evidence_200": verdict.evidence[i]})
    issue = pd.DataFrame(rows)
    print(issue.round(2).to_string(), flush=True)
    print(verdict[["layer", "evidence", "evidence_text"]].to_string(), flush=True)
    out["issue"] = issue.to_dict("list")
    out["verdict_200"] = verdict.to_dict("list")
    out["issue_seconds"] = time.perf_counter() - t0

    # --- projection and reuse: disjoint N-sets of training cats
    proj = {}
    for size in args.sizes:
        t0 = time.perf_counter()
        n_sets = min(args.max_sets, len(train) // size)
        n_sets -= n_sets % 2
        sets = [pool[i * size:(i + 1) * size] for i in range(n_sets)]
        vals, tables, own, reuse = [], [], [], []
        for j, s in enumerate(sets):
            comps = {n: pca(maps_train[n], s) for n in names}
            vals.append({n: values_of(comps[n], y_train[s]) for n in names})
            tables.append(split_half_table(comps, y_train[s], splits=args.splits,
                                           seed=args.seed + j, level=args.level))
            if j < args.own_sets:
                o, r = own_pca_split_half(maps_train, comps, s, y_train[s], args.own_splits,
                                          args.seed + j)
                own.append(o)
                reuse.append(r)
        rows = []
        for i, n in enumerate(names):
            direct = [spearman(vals[2 * p][n], vals[2 * p + 1][n]) for p in range(n_sets // 2)]
            raw = np.nanmean([t.split_half_raw[i] for t in tables])
            rows.append({
                "layer": n, "direct": float(np.nanmean(direct)),
                "direct_sd": float(np.nanstd(direct, ddof=1)) if len(direct) > 1 else np.nan,
                "projected": float(np.nanmean([t.split_half_spearman[i] for t in tables])),
                "projected_of_mean": float(spearman_brown(raw)),
                "raw_half": float(raw),
                "low": float(np.nanmean([t.split_half_spearman_low[i] for t in tables])),
                "high": float(np.nanmean([t.split_half_spearman_high[i] for t in tables])),
                "covered": float(np.mean([(t.split_half_spearman_low[i] <= np.nanmean(direct)
                                           <= t.split_half_spearman_high[i]) for t in tables])),
                "raw_half_own_pca": float(np.nanmean([o[n] for o in own])) if own else np.nan,
                "raw_half_reuse_same_halves": float(np.nanmean([r[n] for r in reuse]))
                if reuse else np.nan,
            })
        table = pd.DataFrame(rows)
        d = table.projected - table.direct
        summary = {"sets": n_sets, "pairs": n_sets // 2,
                   "mean_projected_minus_direct": float(d.mean()),
                   "median_abs_projected_minus_direct": float(d.abs().median()),
                   "mean_raw_minus_direct": float((table.raw_half - table.direct).mean()),
                   "mean_reuse_minus_own_pca": float((table.raw_half_reuse_same_halves
                                                      - table.raw_half_own_pca).mean()),
                   "median_abs_reuse_minus_own_pca": float(
                       (table.raw_half_reuse_same_halves - table.raw_half_own_pca).abs().median()),
                   "median_direct": float(table.direct.median()),
                   "seconds": time.perf_counter() - t0}
        print(f"\nN = {size}: {summary}", flush=True)
        print(table.round(2).to_string(), flush=True)
        proj[str(size)] = {"summary": summary, "table": table.to_dict("list")}
        results["validate"] = {**out, "projection": proj}
        write(args, results)
    out["projection"] = proj
    results["validate"] = out


# ---------------------------------------------------------------------------- costs

def time_ace(n: int, problems: int, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(problems, n, K))
    y = rng.normal(size=(problems, n))
    ace(z[:2], y[:2])  # compile
    t = time.perf_counter()
    ace(z, y)
    return (time.perf_counter() - t) / problems


def part_cost20(args, shared: Path, results: dict) -> None:
    from pcace.inputs.models import load_model

    out = {"per_problem_s": {}}
    for n, p in ((300, 2000), (5000, 200)):
        out["per_problem_s"][str(n)] = time_ace(n, p)
        print(f"ACE, k = 3, N = {n}: {out['per_problem_s'][str(n)] * 1e3:.2f} ms per problem",
              flush=True)
    loaded = load_model("pcace.zoo:cifar_resnet20",
                        checkpoint=shared / "data/cifar10/resnet20-12fca82f.th")
    model = loaded.model.eval()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    train = load_cats(Path(args.train) / "cat")[:5000]
    maps, y = capture_all(model, train, names)
    idx = np.arange(len(train))
    t0 = time.perf_counter()
    comps = {n: pca(maps[n], idx) for n in names}
    t_pca = time.perf_counter() - t0
    del maps
    t0 = time.perf_counter()
    for n in names:
        values_of(comps[n], y)
    t_obs = time.perf_counter() - t0
    b = args.cost_permutations
    t0 = time.perf_counter()
    for n in names:
        permutation_null(comps[n], y, b, seed=0)
    t_null = (time.perf_counter() - t0) / b
    t0 = time.perf_counter()
    split_half_table(comps, y, splits=args.splits, seed=0)
    t_split = time.perf_counter() - t0
    out.update({"n_images": len(train), "channels": int(sum(c.shape[0] for c in comps.values())),
                "pca_s": t_pca, "observed_ace_s": t_obs, "null_s_per_permutation": t_null,
                "split_half_s": t_split, "splits": args.splits})
    print(f"ResNet-20, N = {len(train)}: PCA {t_pca:.0f} s, observed ACE {t_obs:.0f} s, "
          f"null {t_null:.1f} s per permutation, split-half ({args.splits} splits) "
          f"{t_split:.0f} s", flush=True)
    results["cost20"] = out


def part_cost18(args, shared: Path, results: dict) -> None:
    import torchvision

    import pcace

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    images = torch.rand(300, 3, 224, 224)
    t0 = time.perf_counter()
    res = pcace.rank(model, images, target=281, progress=False, device="cpu")
    t_rank = time.perf_counter() - t0
    y = res.scores
    b = args.cost_permutations
    t0 = time.perf_counter()
    for z in res.components.values():
        permutation_null(z, y, b, seed=0)
    t_null = (time.perf_counter() - t0) / b
    t0 = time.perf_counter()
    split_half_table(res.components, y, splits=args.splits, seed=0)
    t_split = time.perf_counter() - t0
    c = int(sum(z.shape[0] for z in res.components.values()))
    out = {"channels": c, "n_images": 300, "rank_s": t_rank, "null_s_per_permutation": t_null,
           "null_s_per_problem": t_null / c, "split_half_s": t_split, "splits": args.splits}
    print(f"ResNet-18, N = 300, {c} channels: rank {t_rank:.0f} s, null {t_null:.2f} s per "
          f"permutation ({t_null / c * 1e3:.3f} ms per problem), split-half "
          f"({args.splits} splits) {t_split:.0f} s", flush=True)
    results["cost18"] = out


def write(args, results: dict) -> None:
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, default=float))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shared")
    p.add_argument("--train", default="/tmp/cifar10-train/cifar10-train")
    p.add_argument("--parts", default="validate,cost20,cost18")
    p.add_argument("--sizes", type=int, nargs="+", default=[200, 600, 2400])
    p.add_argument("--max-sets", type=int, default=10)
    p.add_argument("--own-sets", type=int, default=2,
                   help="sets per size whose halves also get their own PCA")
    p.add_argument("--own-splits", type=int, default=3)
    p.add_argument("--splits", type=int, default=10)
    p.add_argument("--level", type=float, default=0.90,
                   help="interval level of the split-half checks in part validate")
    p.add_argument("--cost-permutations", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out")
    args = p.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    shared = shared_root(args.shared)
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                 "torch": torch.__version__}, "args": vars(args)}
    for part in args.parts.split(","):
        {"validate": part_validate, "cost20": part_cost20, "cost18": part_cost18}[part](
            args, shared, results)
        write(args, results)


if __name__ == "__main__":
    main()
