"""Benchmark and figures of pcace.stats and pcace.stats.ablate
(benchmarks/README.md, "Statistics").

Parts (``--parts``, comma-separated, default all):

- ``null``: PCACE values and a permutation null of B = 1,000 for every conv channel of the
  shared CIFAR ResNet-20 (688 channels) on the images of one class; timed; a per-layer table
  of raw and adjusted values and BH discoveries.
- ``bootstrap``: B = 200 half-sample and B = 200 with-replacement replicates of one layer;
  timed; intervals and stability.
- ``coverage``: coverage and width of bootstrap intervals (half-sample, and the
  with-replacement basic and percentile ones) of planted channels whose maximal
  correlation is known (k = 3, linear and non-monotone relations, N in {100, 300}),
  through ``bootstrap_values`` (PCA and ACE on every replicate).
- ``synthetic``: p-value calibration and pcace_adj across N and k on planted signals.
- ``ablation``: PCACE against baseline rankings (mean |activation|, filter L1, Taylor, layer
  conductance when Captum is installed) on a few layers, by top-m ablation.

Usage::

    .venv/bin/python benchmarks/bench_stats.py [--shared ../shared] [--parts null,bootstrap]
        [--permutations 1000] [--boots 200] [--coverage-sets 300] [--out stats.json]
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
from scipy import stats as sps

from pcace import ace
from pcace.inputs.data import default_transform, image_folder
from pcace.reduce.pca import principal_components
from pcace.stats import (
    bootstrap_summary,
    bootstrap_values,
    interval_scheme,
    layer_stability,
    null_summary,
    permutation_null,
    share_significant,
)
from pcace.stats.ablate import ablate, baseline_rankings, faithfulness_summary
from pcace.zoo import CIFAR10_CLASSES, CIFAR_MEAN, CIFAR_STD, cifar_resnet20

REPO = Path(__file__).resolve().parents[1]


def shared_root(arg: str | None) -> Path:
    for cand in [arg, os.environ.get("PCACE_SHARED"), str(REPO.parent / "shared")]:
        if cand and (Path(cand) / "data").is_dir():
            return Path(cand)
    sys.exit("shared data not found: pass --shared or set PCACE_SHARED")


def load_model(shared: Path) -> torch.nn.Module:
    ck = torch.load(shared / "data/cifar10/resnet20-12fca82f.th", weights_only=True,
                    map_location="cpu")
    model = cifar_resnet20()
    model.load_state_dict({k.removeprefix("module."): v for k, v in ck["state_dict"].items()})
    return model.eval()


def load_images(shared: Path, name: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    ds = image_folder(shared / "data/cifar10/test", name,
                      default_transform(mean=CIFAR_MEAN, std=CIFAR_STD))
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([i[0] for i in items]), torch.tensor([i[1] for i in items])


def conv_maps(model: torch.nn.Module, x: torch.Tensor, target: int):
    """Outputs of every Conv2d (one pass) and the target logit."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    store: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    mods = dict(model.named_modules())
    handles = [mods[n].register_forward_hook(
        lambda _m, _i, o, n=n: store[n].append(o.detach())) for n in names]
    with torch.no_grad():
        scores = torch.cat([model(b)[:, target] for b in x.split(100)])
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in store.items()}, scores.double().numpy()


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average": os.getloadavg(), "torch": torch.__version__}


# ----------------------------------------------------------------------------- parts

def part_null(model, x, target, permutations, components, out):
    maps, scores = conv_maps(model, x, target)
    t0 = time.perf_counter()
    z_parts, observed, layer_of = [], [], []
    for name, m in maps.items():
        red = principal_components(m, components)
        z = red.scores.numpy()
        obs = np.where(red.dead.numpy(), 0.0, np.clip(ace(z, scores).rho, 0, 1))
        z_parts.append(z)
        observed.append(obs)
        layer_of += [name] * z.shape[0]
    t_observed = time.perf_counter() - t0
    z_all = np.concatenate(z_parts)
    obs_all = np.concatenate(observed)
    print(f"[null] {z_all.shape[0]} channels, N = {z_all.shape[1]}, k = {components}: "
          f"PCA + ACE on all layers {t_observed:.1f} s", flush=True)
    t0 = time.perf_counter()
    null = permutation_null(z_all, scores, permutations=permutations, seed=0, progress=False)
    t_null = time.perf_counter() - t0
    problems = z_all.shape[0] * permutations
    print(f"[null] B = {permutations}: {problems} ACE problems in {t_null:.1f} s "
          f"({1e3 * t_null / problems:.3f} ms each)", flush=True)
    layer_of = np.array(layer_of)
    rows = []
    for name in maps:
        sel = layer_of == name
        t = null_summary(obs_all[sel], null[sel])
        rows.append({"layer": name, "channels": int(sel.sum()),
                     "pcace_mean": t.pcace.mean(), "null_mean": t.null_mean.mean(),
                     "pcace_adj_mean": t.pcace_adj.mean(), "pcace_max": t.pcace.max(),
                     "pcace_adj_max": t.pcace_adj.max(),
                     "share_q05": share_significant(t.q_value, 0.05),
                     "min_p": t.p_value.min()})
    table = pd.DataFrame(rows)
    print(table.round(3).to_string(index=False), flush=True)
    out["null"] = {"channels": int(z_all.shape[0]), "images": int(z_all.shape[1]),
                   "components": components, "permutations": permutations,
                   "seconds_observed": t_observed, "seconds_null": t_null,
                   "ms_per_problem": 1e3 * t_null / problems,
                   "layers": table.to_dict(orient="records")}
    return maps, scores


def part_bootstrap(maps, scores, layer, boots, components, out):
    m = maps[layer]
    red = principal_components(m, components)
    obs = np.where(red.dead.numpy(), 0.0, np.clip(ace(red.scores.numpy(), scores).rho, 0, 1))
    res = {"layer": layer, "channels": int(m.shape[1]), "boots": boots}
    for scheme, methods in (("half-sample", ("half-sample",)),
                            ("replacement", ("basic", "percentile"))):
        t0 = time.perf_counter()
        boot = bootstrap_values(m, scores, components, boots=boots, seed=0, scheme=scheme)
        seconds = time.perf_counter() - t0
        stab = layer_stability(obs, boot, top=10)
        s = bootstrap_summary(obs, boot, method=methods[0])
        widths = {}
        for meth in methods:
            t = bootstrap_summary(obs, boot, method=meth)
            widths[meth] = float((t.ci_high - t.ci_low).mean())
        print(f"[bootstrap] {layer}, {scheme}: {m.shape[1]} channels x {boots} replicates in "
              f"{seconds:.1f} s; mean excess of replicates {s.bias.mean():.3f}, mean widths "
              f"{widths}, Spearman {stab['spearman_mean']:.3f}, "
              f"top-10 retention {stab['top_retention']:.2f}", flush=True)
        top = s.sort_values("rank").head(10)
        print(top.round(3).to_string(index=False), flush=True)
        res[scheme] = {"seconds": seconds, "mean_excess": float(s.bias.mean()),
                       "mean_width": widths,
                       "share_interval_below_value": float((s.ci_high < s.pcace).mean()),
                       "spearman_mean": stab["spearman_mean"],
                       "top10_retention": stab["top_retention"],
                       "top10": stab["top_share"],
                       "top10_intervals": top[["channel", "pcace", "ci_low", "ci_high",
                                               "rank_low", "rank_high"]].to_dict("records")}
    out["bootstrap"] = res


def planted_maps(rng, n, rho, shape, channels=1):
    """Maps (n, channels, 12) whose maximal correlation with the returned score is rho.

    Pixels: x1 eight times, x2 three times, x3 once (so the first three principal
    components are about x1, x2, x3). x1 relates to the score only through u, standard
    normal, with corr(u, score) = rho: "gauss": x1 = u; "abs": x1 = +-Phi(u), uniform on
    (-1, 1), so u = Phi^-1(|x1|), a non-monotone relation. Same as tests/test_stats.py.
    """
    y = rng.normal(size=n)
    u = rho * y[:, None] + np.sqrt(1 - rho * rho) * rng.normal(size=(n, channels))
    x1 = u if shape == "gauss" else sps.norm.cdf(u) * rng.choice([-1.0, 1.0], size=u.shape)
    x2, x3 = rng.normal(size=(2, n, channels))
    return torch.as_tensor(np.stack([x1] * 8 + [x2] * 3 + [x3], axis=-1)), y


def part_coverage(boots, sets, levels, out):
    """Coverage of the true maximal correlation by bootstrap intervals, per method and level."""
    methods = ("half-sample", "basic", "percentile")
    rows = []
    for shape in ("gauss", "abs"):
        for n in (100, 300):
            for rho in (0.0, 0.3, 0.6, 0.9):
                rng = np.random.default_rng([2024, n, int(100 * rho), shape == "abs"])
                ends = {(lv, m): ([], []) for lv in levels for m in methods}
                values, seconds = [], {"half-sample": 0.0, "replacement": 0.0}
                for i in range(sets):
                    maps, y = planted_maps(rng, n, rho, shape)
                    red = principal_components(maps, 3)
                    obs = np.clip(ace(red.scores.numpy(), y).rho, 0, 1)
                    values.append(obs[0])
                    boot = {}
                    for scheme in seconds:
                        t0 = time.perf_counter()
                        boot[scheme] = bootstrap_values(maps, y, 3, boots=boots, seed=i,
                                                        scheme=scheme)
                        seconds[scheme] += time.perf_counter() - t0
                    for (lv, meth), (lo, hi) in ends.items():
                        t = bootstrap_summary(obs, boot[interval_scheme(meth)], lv, method=meth)
                        lo.append(t.ci_low[0])
                        hi.append(t.ci_high[0])
                for lv in levels:
                    row = {"shape": shape, "n": n, "rho": rho, "level": lv, "sets": sets,
                           "boots": boots, "mean_value": float(np.mean(values)),
                           "sd_value": float(np.std(values)),
                           "seconds_half": seconds["half-sample"],
                           "seconds_replacement": seconds["replacement"]}
                    for meth in methods:
                        a, b = (np.array(e) for e in ends[lv, meth])
                        row[f"coverage_{meth}"] = float(np.mean((a <= rho + 1e-12)
                                                                & (rho <= b + 1e-12)))
                        row[f"width_{meth}"] = float(np.mean(b - a))
                        row[f"above_{meth}"] = float(np.mean(rho > b + 1e-12))  # truth above
                    rows.append(row)
                    print("[coverage]", {k: round(v, 3) if isinstance(v, float) else v
                                         for k, v in row.items()}, flush=True)
    table = pd.DataFrame(rows)
    cols = ["shape", "n", "rho"] + [f"{p}_{m}" for m in methods for p in ("coverage", "width")]
    for lv in levels:
        sub = table[table.level == lv]
        print(f"[coverage] level {lv}\n" + sub[cols].round(3).to_string(index=False),
              flush=True)
        pos = sub[sub.rho > 0]
        for meth in methods:
            cov = pos[f"coverage_{meth}"]
            print(f"[coverage] level {lv}, {meth}: rho > 0 coverage {cov.min():.3f}-"
                  f"{cov.max():.3f}, mean |coverage - {lv}| {np.abs(cov - lv).mean():.3f}; "
                  f"rho = 0: {sub[sub.rho == 0][f'coverage_{meth}'].round(3).tolist()}",
                  flush=True)
    out["coverage"] = rows


def part_synthetic(out):
    rng = np.random.default_rng(2024)
    res: dict = {}
    # calibration: 1,000 noise channels, n = 150, k = 3, B = 199
    c, n, k, b = 1000, 150, 3, 199
    z = rng.normal(size=(c, n, k))
    y = rng.normal(size=n)
    t = null_summary(np.clip(ace(z, y).rho, 0, 1), permutation_null(z, y, b, seed=1))
    p = t.p_value.to_numpy()
    from scipy.stats import kstest

    res["calibration"] = {"channels": c, "n": n, "k": k, "B": b,
                          "share_p_le_0.05": float(np.mean(p <= 0.05)),
                          "share_p_le_0.01": float(np.mean(p <= 0.01)),
                          "ks_pvalue": float(kstest(p, "uniform").pvalue),
                          "share_q_le_0.05": share_significant(t.q_value),
                          "raw_mean": float(t.pcace.mean()),
                          "adj_mean": float(t.pcace_adj.mean()),
                          "adj_linear_mean": float(t.pcace_adj_linear.mean())}
    print("[synthetic] calibration", res["calibration"], flush=True)

    # pcace_adj across N and k (planted x^2 signal with maximal correlation rho)
    comp = []
    for rho in (0.0, 0.4, 0.6):
        for n in (100, 300):
            for k in (1, 3, 5):
                raw, adj, lin = [], [], []
                for _ in range(20):
                    zz = rng.normal(size=(1, n, k))
                    x0 = zz[0, :, 0]
                    yy = (x0 ** 2 - 1 + np.sqrt(2 / rho ** 2 - 2) * rng.normal(size=n)
                          if rho > 0 else rng.normal(size=n))
                    obs = np.clip(ace(zz, yy).rho, 0, 1)
                    t = null_summary(obs, permutation_null(zz, yy, 100,
                                                           seed=int(rng.integers(1 << 30))))
                    raw.append(t.pcace[0])
                    adj.append(t.pcace_adj[0])
                    lin.append(t.pcace_adj_linear[0])
                row = {"rho": rho, "n": n, "k": k, "raw": float(np.mean(raw)),
                       "adj": float(np.mean(adj)), "adj_linear": float(np.mean(lin)),
                       "adj_sd": float(np.std(adj))}
                comp.append(row)
                print("[synthetic] adj", row, flush=True)
    res["adjusted"] = comp
    out["synthetic"] = res


def part_ablation(model, x, y, x_all, target, maps, scores, layers, components, out):
    rows = []
    for layer in layers:
        red = principal_components(maps[layer], components)
        obs = np.where(red.dead.numpy(), 0.0,
                       np.clip(ace(red.scores.numpy(), scores).rho, 0, 1))
        nul = permutation_null(red.scores.numpy(), scores, 500, seed=0)
        table = null_summary(obs, nul)
        rankings = {"pcace": np.argsort(-obs, kind="stable"),
                    "pcace_adj": np.argsort(-table.pcace_adj.to_numpy(), kind="stable")}
        t0 = time.perf_counter()
        base = baseline_rankings(model, x, target, layer)
        t_base = time.perf_counter() - t0
        rankings.update(base)
        c = maps[layer].shape[1]
        sizes = [m for m in (1, 2, 4, 8, 16, 32) if m < c]
        for mode, ref in (("zero", None), ("mean", x_all)):
            t0 = time.perf_counter()
            curves = ablate(model, x, target, layer, rankings, sizes=sizes, mode=mode,
                            repeats=10, labels=y, reference=ref)
            print(f"[ablation] {layer} mode={mode} ({time.perf_counter() - t0:.0f} s; baselines "
                  f"{t_base:.0f} s)", flush=True)
            for metric in ("score_drop", "score_change"):
                summary = faithfulness_summary(curves, metric=metric)
                print(f"  metric={metric}\n" + summary.round(3).to_string(index=False),
                      flush=True)
                for rec in summary.to_dict("records"):
                    rows.append({"layer": layer, "mode": mode, "metric": metric, **rec})
            rand = curves[curves.selection == "random"][
                ["m", "score_drop", "score_drop_sd", "score_change", "score_change_sd"]]
            print("  random (m, drop, sd, change, sd):", rand.round(2).values.tolist(),
                  flush=True)
            rows.append({"layer": layer, "mode": mode, "ranking": "random_curve",
                         "random": rand.to_dict("records")})
        from scipy.stats import spearmanr

        # position of each channel in a baseline's order (0 = best), negated: higher = better
        corr = {k: float(spearmanr(obs, -np.argsort(v)).statistic) for k, v in base.items()}
        print(f"  Spearman(pcace value, baseline rank order): {corr}", flush=True)
        rows.append({"layer": layer, "ranking": "spearman_with_pcace", **corr})
    out["ablation"] = rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared")
    ap.add_argument("--parts", default="null,bootstrap,coverage,synthetic,ablation")
    ap.add_argument("--class", dest="cls", default="cat")
    ap.add_argument("--permutations", type=int, default=1000)
    ap.add_argument("--boots", type=int, default=200)
    ap.add_argument("--coverage-sets", type=int, default=300,
                    help="simulated data sets per cell of the coverage part")
    ap.add_argument("--levels", default="0.95,0.8",
                    help="levels of the intervals in the coverage part, comma-separated")
    ap.add_argument("--components", type=int, default=3)
    ap.add_argument("--layer", default="layer3.2.conv2", help="layer of the bootstrap")
    ap.add_argument("--ablation-layers",
                    default="layer1.2.conv2,layer2.2.conv2,layer3.0.conv1,layer3.2.conv2")
    ap.add_argument("--out", default="bench_stats.json")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    out: dict = {"machine": machine(), "args": vars(args)}
    print(machine(), flush=True)
    maps = scores = None
    if parts & {"null", "bootstrap", "ablation"}:
        shared = shared_root(args.shared)
        model = load_model(shared)
        target = CIFAR10_CLASSES.index(args.cls)
        x, y = load_images(shared, args.cls)
        print(f"{len(x)} {args.cls} images", flush=True)
        if "null" in parts:
            maps, scores = part_null(model, x, target, args.permutations, args.components, out)
        else:
            maps, scores = conv_maps(model, x, target)
    if "bootstrap" in parts:
        part_bootstrap(maps, scores, args.layer, args.boots, args.components, out)
    if "coverage" in parts:
        part_coverage(args.boots, args.coverage_sets,
                      [float(v) for v in args.levels.split(",")], out)
    if "synthetic" in parts:
        part_synthetic(out)
    if "ablation" in parts:
        x_all, _ = load_images(shared, None)
        part_ablation(model, x, y, x_all, target, maps, scores,
                      args.ablation_layers.split(","), args.components, out)
    Path(args.out).write_text(json.dumps(out, indent=1, default=float))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
