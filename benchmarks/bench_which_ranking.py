"""Which ranking answers which question: PCACE and the baseline rankings under mean, zero and
resample ablation, scored by score_drop, score_change and variance_share (issue 29;
benchmarks/README.md, "Which ranking for which question"; docs/which-ranking.md).

The shared CIFAR ResNet-20, the cat logit. Rankings of each layer from the first N
training cats (N = 200 and 2,000): PCACE (``pcace.rank``) and PCACE null-adjusted
(``pcace_adj`` against each channel's own permutation null, B = 100), first-order Taylor,
Captum's layer conductance, mean |activation|, filter L1 norm
(``pcace.stats.ablate.baseline_rankings``);
random sets come with every ablation. Each ranking's top m (and bottom m) channels are
ablated on the 200 held-out test cats (``pcace.stats.ablate.ablate``) in three modes:
``mean`` (filled with the mean over 2,000 training images, 200 per class: a class-neutral
reference), ``zero`` and ``resample`` (donors from the test cats, 5 derangements). The
number reported is ``faithfulness_summary``'s ``mean_gap``: the excess of the top m over
random sets of m, averaged over log2 m (m = 1..32 in mean and zero modes, 1..16 in
resample mode, as in the issue).

Writes into ``--out`` (default ``benchmarks/results``):

- ``which_ranking.csv``: one row per (layer, mode, metric, ranking) with the summary's
  columns, the ranking's N and the command;
- ``which_ranking_curves.csv``: the ablation curves (every m, top/bottom/random);
- ``which_ranking.png``: the gap of the top m over random sets against m, a panel per mode
  and layer (score_drop for mean and zero, variance_share for resample);
- ``which_ranking.txt``: the command, the time it took, the machine, and the tables.

``--part halves`` measures instead how far the resample gaps move with the test images: the
rankings of PCACE, Taylor and mean |activation| from the largest N, ablated in resample
mode on each half (even and odd files) of the test cats; ``which_ranking_halves.csv`` and
``which_ranking_halves.txt``.

Usage::

    PYTHONPATH=src nice .venv/bin/python benchmarks/bench_which_ranking.py [--shared ../shared]
        [--train-cache /tmp/pcace-cifar10-train] [--ns 200,2000] [--resamples 5]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from bench_stats import load_model, machine, shared_root

from pcace import rank
from pcace.inputs.data import default_transform, image_folder
from pcace.stats.ablate import ablate, baseline_rankings, faithfulness_summary
from pcace.zoo import CIFAR10_CLASSES, CIFAR_MEAN, CIFAR_STD

REPO = Path(__file__).resolve().parents[1]
TARGET = CIFAR10_CLASSES.index("cat")
METRICS = ("score_drop", "score_change", "variance_share")
#: The metric each mode's figure panel shows.
HEADLINE = {"mean": "score_drop", "zero": "score_drop", "resample": "variance_share"}
SIZES = {"mean": (1, 2, 4, 8, 16, 32), "zero": (1, 2, 4, 8, 16, 32),
         "resample": (1, 2, 4, 8, 16)}


def train_root(shared: Path, cache: Path) -> Path:
    """The CIFAR-10 training images, extracted once into ``cache`` (never into the repo)."""
    root = cache / "cifar10-train"
    if not (root / "cat").is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        with tarfile.open(shared / "data/cifar10-train.tar.gz") as tar:
            tar.extractall(cache, filter="data")
    return root


def load(root: Path, name: str, start: int, stop: int) -> torch.Tensor:
    ds = image_folder(root, name, default_transform(mean=CIFAR_MEAN, std=CIFAR_STD))
    return torch.stack([ds[i][0] for i in range(start, min(stop, len(ds)))])


def rankings_of(model: torch.nn.Module, cats: torch.Tensor, layers: list[str], n: int,
                log: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """``{layer: {name: order}}`` from the first ``n`` training cats."""
    t0 = time.perf_counter()
    # the exact null: each channel against its own 100 permutations (the default pooled null
    # adjusts the channels of a layer alike, and would order them as PCACE does)
    result = rank(model, cats[:n], TARGET, layers=layers, progress=False, split_half=0,
                  null="exact", permutations=100)
    out: dict[str, dict[str, np.ndarray]] = {}
    for layer in layers:
        table = result.channels[result.channels.layer == layer]
        out[layer] = {
            "pcace": table.sort_values("rank").channel.to_numpy(),
            "pcace_adj": table.sort_values("pcace_adj", ascending=False,
                                           kind="stable").channel.to_numpy()}
    t1 = time.perf_counter()
    for layer in layers:
        base = baseline_rankings(model, cats[:n], TARGET, layer)
        out[layer].update({"conductance" if k == "layer_conductance" else k: v
                           for k, v in base.items()})
    say(log, f"rankings from {n} training cats: PCACE {t1 - t0:.0f} s, baselines "
             f"{time.perf_counter() - t1:.0f} s")
    return out


def say(log: list[str], text: str) -> None:
    print(text, flush=True)
    log.append(text)


def run(args: argparse.Namespace, log: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    shared = shared_root(args.shared)
    model = load_model(shared)
    torch.manual_seed(0)
    train = train_root(shared, Path(args.train_cache))
    ns = sorted(int(v) for v in args.ns.split(","))
    layers = args.layers.split(",")
    cats = load(train, "cat", 0, ns[-1])
    test = shared / "data/cifar10/test"
    x_eval = load(test, "cat", 0, 10**6)
    y_eval = torch.full((len(x_eval),), TARGET)
    reference = torch.cat([load(train, c, 4800, 5000) for c in CIFAR10_CLASSES])
    say(log, f"{len(cats)} training cats for the rankings, {len(x_eval)} test cats ablated, "
             f"{len(reference)} training images (200 per class) for the mean fill")

    by_n = {n: rankings_of(model, cats, layers, n, log) for n in ns}
    summary_rows, curve_frames = [], []
    for layer in layers:
        named = {}
        for n in ns:
            for name, order in by_n[n][layer].items():
                if name == "weight_l1" and n != ns[0]:
                    continue  # the weights do not depend on the images
                named[name if name == "weight_l1" else f"{name}/{n}"] = order
        for mode in ("mean", "zero", "resample"):
            t0 = time.perf_counter()
            curves = ablate(model, x_eval, TARGET, layer, named, sizes=SIZES[mode], mode=mode,
                            repeats=args.repeats, labels=y_eval, batch_size=args.batch_size,
                            reference=reference if mode == "mean" else None,
                            resamples=args.resamples, seed=0)
            say(log, f"{layer} {mode}: {time.perf_counter() - t0:.0f} s")
            curve_frames.append(curves.assign(layer=layer, mode=mode))
            for metric in METRICS:
                table = faithfulness_summary(curves, metric=metric)
                for rec in table.to_dict("records"):
                    name, _, n = rec.pop("ranking").partition("/")
                    for each in ([int(n)] if n else ns):  # weight L1: the same for every N
                        summary_rows.append({"layer": layer, "mode": mode, "metric": metric,
                                             "N": each, "ranking": name, **rec})
    return pd.DataFrame(summary_rows), pd.concat(curve_frames, ignore_index=True)


def halves(args: argparse.Namespace, log: list[str]) -> pd.DataFrame:
    """Resample gaps of a few rankings on each half of the test cats: their spread."""
    shared = shared_root(args.shared)
    model = load_model(shared)
    train = train_root(shared, Path(args.train_cache))
    n = max(int(v) for v in args.ns.split(","))
    layers = args.layers.split(",")
    cats = load(train, "cat", 0, n)
    x_eval = load(shared / "data/cifar10/test", "cat", 0, 10**6)
    result = rank(model, cats, TARGET, layers=layers, progress=False, split_half=0,
                  permutations=0)
    rows = []
    for layer in layers:
        table = result.channels[result.channels.layer == layer]
        named = {"pcace": table.sort_values("rank").channel.to_numpy(),
                 **baseline_rankings(model, cats, TARGET, layer,
                                     methods=["taylor", "mean_abs_activation"])}
        for half in (0, 1):
            t0 = time.perf_counter()
            curves = ablate(model, x_eval[half::2], TARGET, layer, named,
                            sizes=SIZES["resample"], mode="resample", repeats=args.repeats,
                            batch_size=args.batch_size, resamples=args.resamples, seed=0)
            for metric in ("variance_share", "score_change"):
                for rec in faithfulness_summary(curves, metric=metric).to_dict("records"):
                    rows.append({"layer": layer, "half": half, "metric": metric, "N": n,
                                 **rec})
            say(log, f"{layer} half {half}: {time.perf_counter() - t0:.0f} s")
    out = pd.DataFrame(rows)
    wide = out.pivot_table(index=["layer", "metric", "ranking"], columns="half",
                           values="mean_gap")
    say(log, "resample mean_gap on each half of the test cats (100 images each):\n"
        + wide.round(3).to_string())
    return out


def gap_curves(curves: pd.DataFrame, metric: str) -> pd.DataFrame:
    """``gap(m) = metric(top m) - metric(random m)`` per ranking (wide: a column per m)."""
    rand = curves[curves.selection == "random"].set_index("m")[metric]
    top = curves[curves.selection == "top"].copy()
    top["gap"] = top[metric].to_numpy() - rand.loc[top.m].to_numpy()
    return top.pivot(index="ranking", columns="m", values="gap")


def figure(curves: pd.DataFrame, path: Path, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(dict.fromkeys(curves.layer))
    modes = ["mean", "zero", "resample"]
    fig, axes = plt.subplots(len(layers), len(modes), figsize=(13, 4 * len(layers)),
                             squeeze=False)
    colours = {"pcace": "C3", "pcace_adj": "C1", "taylor": "C0", "conductance": "C2",
               "mean_abs_activation": "C4", "weight_l1": "C7"}
    for i, layer in enumerate(layers):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            sub = curves[(curves.layer == layer) & (curves["mode"] == mode)]
            gaps = gap_curves(sub, HEADLINE[mode])
            for name, row in gaps.iterrows():
                base, _, n = str(name).partition("/")
                ax.plot(row.index, row.to_numpy(), marker="o", ms=3, color=colours[base],
                        ls=":" if n and int(n) < 1000 else "-",
                        label=f"{base} (N={n})" if n else base)
            ax.axhline(0, color="k", lw=0.6)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{layer}, {mode} ablation")
            ax.set_xlabel("m (channels ablated)")
            ax.set_ylabel(f"{HEADLINE[mode]}: top m - random m")
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.suptitle("Gap of each ranking's top m channels over random sets (shared ResNet-20, "
                 "cat logit, 200 test cats)", fontsize=11)
    fig.text(0.01, 0.005, command, fontsize=7, family="monospace")
    fig.tight_layout(rect=(0, 0.02, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tables(summary: pd.DataFrame) -> str:
    """The mean gaps, a row per (layer, N, mode, metric) and a column per ranking."""
    order = ["taylor", "conductance", "pcace", "pcace_adj", "mean_abs_activation",
             "weight_l1"]
    wide = summary.pivot_table(index=["layer", "mode", "metric", "N"], columns="ranking",
                               values="mean_gap", dropna=False)
    wide = wide[[c for c in order if c in wide.columns]]
    return wide.round(3).to_string()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared")
    ap.add_argument("--train-cache", default="/tmp/pcace-cifar10-train",
                    help="where the training images are extracted (once)")
    ap.add_argument("--ns", default="200,2000", help="numbers of training cats ranked on")
    ap.add_argument("--layers", default="layer3.0.conv1,layer3.2.conv2")
    ap.add_argument("--repeats", type=int, default=10, help="random sets per size")
    ap.add_argument("--resamples", type=int, default=5, help="donor derangements")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--part", choices=["tables", "halves"], default="tables")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "PYTHONPATH=src python benchmarks/bench_which_ranking.py " + shlex.join(
        sys.argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log: list[str] = [f"command: {command}", f"machine: {machine()}"]
    start = time.perf_counter()
    if args.part == "halves":
        table = halves(args, log)
        say(log, f"total {(time.perf_counter() - start) / 60:.1f} min")
        table.assign(command=command).to_csv(out / "which_ranking_halves.csv", index=False)
        (out / "which_ranking_halves.txt").write_text("\n".join(log) + "\n")
        return
    summary, curves = run(args, log)
    elapsed = time.perf_counter() - start
    say(log, f"total {elapsed / 60:.1f} min")
    summary.assign(command=command).to_csv(out / "which_ranking.csv", index=False)
    curves.to_csv(out / "which_ranking_curves.csv", index=False)
    figure(curves, out / "which_ranking.png", command)
    text = tables(summary)
    say(log, "mean_gap (top m over random m), per layer, mode, metric and N:\n" + text)
    (out / "which_ranking.txt").write_text("\n".join(log) + "\n")
    print(f"wrote {out}/which_ranking.{{csv,png,txt}} and which_ranking_curves.csv")


if __name__ == "__main__":
    main()
