"""Binned ACE against exact ACE: error and speed at large n (issue 25).

Parts (``--parts``, comma-separated):

* ``fixtures``: the 36 shared acepack fixtures resampled to n rows (rows drawn with
  replacement, a small Gaussian jitter added except in the ``ties`` family, whose ties
  must stay), every case solved exact and binned.
* ``families``: fresh problems of known structure (k = 3 standard normal predictors)
  from a few function families and noise levels, including the null.
* ``pcace``: PCACE problems: the principal components (k = 3) of every channel of the
  shared CIFAR ResNet-20's conv layers, cat logit (class 3) as the score; N = 5,000
  (the 5,000 cat training images, all 19 layers) and N = 50,000 (all training images,
  ``--layers-50k``). Components are computed once by ``pcace.rank`` and cached
  (``--cache``).
* ``speed``: time per problem, exact and binned, in one process, on PCACE-shaped
  problems (one channel against permutations of one score, solved by
  ``pcace.maxcorr.ace.ace_shared`` as the pipeline's null does, and single ``pcace.ace``
  calls that sort everything).

Error figures: the 99th percentile and maximum of ``|rho_binned - rho_exact|``; for
``pcace``, also the Spearman correlation of each layer's channel ranking.

    .venv/bin/python benchmarks/bench_binned.py --parts fixtures,families,speed
    .venv/bin/python benchmarks/bench_binned.py --parts pcace --n 5000 50000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import SHARED, Normalised, images_uint8  # noqa: E402

LAYERS_50K = ("conv1", "layer1.2.conv2", "layer2.2.conv2", "layer3.2.conv2")


def components(n: int, cache: Path, layers: tuple[str, ...] | None) -> dict:
    """``{layer: (C, n, 3) float64}`` and ``"__scores__"``, computed once and cached."""
    path = cache / f"components_{n}.npz"
    if path.exists():
        with np.load(path) as f:
            return dict(f)
    import torch

    import pcace
    from pcace.inputs.models import load_model

    raw = images_uint8(SHARED)
    raw = raw[3::10] if n <= 5000 else raw  # interleaved classes: 3::10 are the cats
    model = load_model("pcace.zoo:cifar_resnet20",
                       checkpoint=SHARED / "data/cifar10/resnet20-12fca82f.th").model
    loader = torch.utils.data.DataLoader(Normalised(raw[:n]), batch_size=256)
    t = time.perf_counter()
    res = pcace.rank(model, loader, target=3, layers=list(layers) if layers else None,
                     permutations=0, split_half=0, progress=False, device="cpu",
                     ace_options={"bins": None})
    print(f"components at N = {n}: {time.perf_counter() - t:.0f} s", flush=True)
    out = {name: c.double().numpy() for name, c in res.components.items()}
    out["__scores__"] = np.asarray(res.scores, dtype=np.float64)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


def errors(exact: np.ndarray, binned: np.ndarray) -> dict:
    """Summary of ``|binned - exact|``."""
    d = np.abs(np.asarray(binned) - np.asarray(exact))
    return {"problems": int(d.size), "p50": float(np.median(d)), "p99": float(np.quantile(d, 0.99)),
            "max": float(d.max()), "mean_signed": float(np.mean(np.asarray(binned) - exact))}


def acepack_rho(x: np.ndarray, y: np.ndarray) -> float | None:
    """R acepack's ``cor(rowSums(tx), ty)`` for one problem, or None without R/acepack."""
    import shutil
    import subprocess
    import tempfile

    if shutil.which("Rscript") is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "case.csv"
        np.savetxt(path, np.column_stack([x, y]), delimiter=",", fmt="%.17g")
        k = x.shape[1]
        code = (f'suppressMessages(library(acepack)); d <- as.matrix(read.csv("{path}", '
                f'header=FALSE)); a <- ace(d[, 1:{k}, drop=FALSE], d[, {k + 1}]); '
                'cat(sprintf("%.10f", cor(rowSums(a$tx), a$ty)))')
        done = subprocess.run(["Rscript", "-e", code], capture_output=True, text=True)
    return float(done.stdout) if done.returncode == 0 and done.stdout else None


def solve_pair(x: np.ndarray, y: np.ndarray, bins: list[int], label: str,
               disagreements: list) -> tuple[float, dict]:
    """rho of one problem, exact and with each bin budget. Where the two differ by more
    than 0.005, acepack's answer is recorded beside them (``disagreements``)."""
    from pcace import ace

    exact = float(ace(x, y, bins=None).rho)
    by = {b: float(ace(x, y, bins=b).rho) for b in bins}
    if any(abs(v - exact) > 0.005 for v in by.values()):
        disagreements.append({"problem": label, "n": len(y), "exact": exact, "binned": by,
                              "acepack": acepack_rho(x, y)})
        print(f"  {json.dumps(disagreements[-1])}", flush=True)
    return exact, by


def part_fixtures(ns: list[int], bins: list[int]) -> dict:
    """The shared acepack fixtures resampled to n rows."""
    root = SHARED / "fixtures" / "acepack"
    cases = json.loads((root / "cases.json").read_text())
    out = {}
    for n in ns:
        rng = np.random.default_rng(n)
        exact, by, odd = [], {b: [] for b in bins}, []
        for case in cases:
            data = np.loadtxt(root / case["file"], delimiter=",", ndmin=2)
            rows = data[rng.integers(0, len(data), n)]
            if case["name"] != "ties":  # jitter: a tenth of a column's sd, shrinking with n
                sd = np.where(data.std(0) > 0, data.std(0), 1.0)
                rows = rows + rng.normal(size=rows.shape) * 0.1 * sd * len(data) ** -0.2
            e, b = solve_pair(rows[:, :-1], rows[:, -1], bins,
                              f"case {case['id']} {case['name']}", odd)
            exact.append(e)
            for k, v in b.items():
                by[k].append(v)
        out[n] = {b: errors(np.array(exact), np.array(v)) for b, v in by.items()}
        out[n]["disagreements"] = odd
        print(f"fixtures n = {n}: {json.dumps(out[n])}", flush=True)
    return out


FAMILIES = {
    "sine": lambda x, e: np.sin(2 * x[:, 0]) + 0.5 * x[:, 1] ** 2 + e,
    "exp": lambda x, e: np.exp(x[:, 0]) + 2 * e,
    "product": lambda x, e: x[:, 0] * x[:, 1] + e,
    "abs_cube": lambda x, e: np.abs(x[:, 0]) + x[:, 1] ** 3 / 5 + x[:, 2] + e,
    "log_response": lambda x, e: np.exp(x[:, 0] + x[:, 1] / 2 + e),
    "step": lambda x, e: np.sign(x[:, 0]) + (x[:, 1] > 1) + e,
    "null": lambda x, e: e,
}


def part_families(ns: list[int], bins: list[int], noises=(0.3, 1.0, 3.0)) -> dict:
    """Fresh problems of known structure, k = 3: standard normal or t(3) predictors."""
    out = {}
    for n in ns:
        rng = np.random.default_rng(10 + n)
        exact, by, odd, heavy, labels = [], {b: [] for b in bins}, [], [], []
        for name, f in FAMILIES.items():
            for noise in noises:
                for tails in (False, True):
                    heavy.append(tails)
                    x = rng.standard_t(3, size=(n, 3)) if tails else rng.normal(size=(n, 3))
                    label = f"{name}, noise {noise}, {'t(3)' if tails else 'normal'} x"
                    e, b = solve_pair(x, f(x, noise * rng.normal(size=n)), bins, label, odd)
                    labels.append(label)
                    exact.append(e)
                    for k, v in b.items():
                        by[k].append(v)
        exact, heavy = np.array(exact), np.array(heavy)
        out[n] = {b: {"all": errors(exact, np.array(v)),
                      "normal_x": errors(exact[~heavy], np.array(v)[~heavy]),
                      "t3_x": errors(exact[heavy], np.array(v)[heavy])} for b, v in by.items()}
        out[n]["disagreements"] = odd
        print(f"families n = {n}: {json.dumps(out[n])}", flush=True)
        out[n]["problems"] = [{"problem": lab, "exact": float(e),
                               **{str(b): by[b][i] for b in bins}}
                              for i, (lab, e) in enumerate(zip(labels, exact, strict=True))]
    return out


def part_pcace(ns: list[int], bins: list[int], cache: Path, layers_50k: list[str],
               permutations: int = 2, mirror: bool = False) -> dict:
    """Every channel of the cached layers, observed and against a few permutations.

    ``mirror``: also exact ACE on the mirrored problems (every variable negated), which
    have the same maximal correlation: how far exact ACE itself moves.
    """
    from scipy.stats import spearmanr

    from pcace.maxcorr.ace import ace_shared

    out = {}
    for n in ns:
        comp = components(n, cache, None if n <= 5000 else tuple(layers_50k))
        y = comp.pop("__scores__")
        rng = np.random.default_rng(0)
        ys = np.stack([y] + [y[rng.permutation(n)] for _ in range(permutations)])
        obs_e, obs_b, null_e, null_b = [], {b: [] for b in bins}, [], {b: [] for b in bins}
        obs_m, null_m = [], []
        spearman = {b: {} for b in bins}
        seconds = {"exact": 0.0, **{b: 0.0 for b in bins}}
        for name, z in comp.items():
            live = np.flatnonzero(z.std(axis=1).max(axis=1) > 0)
            ch = np.repeat(live, len(ys))
            rows = np.tile(np.arange(len(ys)), live.size)
            t = time.perf_counter()
            e = ace_shared(z, ys, ch, rows, bins=None)[0].reshape(live.size, len(ys))
            seconds["exact"] += time.perf_counter() - t
            obs_e.append(e[:, 0])
            null_e.append(e[:, 1:].ravel())
            if mirror:  # the same problems with every axis reversed: exact ACE's own wobble
                m = ace_shared(-z, -ys, ch, rows, bins=None)[0].reshape(live.size, len(ys))
                obs_m.append(m[:, 0])
                null_m.append(m[:, 1:].ravel())
            for b in bins:
                t = time.perf_counter()
                v = ace_shared(z, ys, ch, rows, bins=b)[0].reshape(live.size, len(ys))
                seconds[b] += time.perf_counter() - t
                obs_b[b].append(v[:, 0])
                null_b[b].append(v[:, 1:].ravel())
                spearman[b][name] = float(spearmanr(e[:, 0], v[:, 0]).statistic)
            print(f"  N = {n} {name}: {live.size} live channels, exact rho "
                  f"{np.median(e[:, 0]):.3f} (median); Spearman "
                  f"{ {b: round(spearman[b][name], 4) for b in bins} }", flush=True)
        cat = np.concatenate
        out[n] = {b: {"observed": errors(cat(obs_e), cat(obs_b[b])),
                      "permuted": errors(cat(null_e), cat(null_b[b])),
                      "spearman_min": min(spearman[b].values()),
                      "spearman_median": float(np.median(list(spearman[b].values()))),
                      "seconds": seconds[b]} for b in bins}
        out[n]["exact_seconds"] = seconds["exact"]
        if mirror:
            out[n]["exact_mirrored"] = {"observed": errors(cat(obs_e), cat(obs_m)),
                                        "permuted": errors(cat(null_e), cat(null_m))}
        print(f"pcace N = {n}: {json.dumps(out[n])}", flush=True)
    return out


def part_speed(ns: list[int], bins: list[int], channels: int = 4, permutations: int = 10,
               k: int = 3, repeats: int = 5) -> dict:
    """ms per problem, exact and binned, in this process: shared set-up and single calls.

    Each variant is timed ``repeats`` times, the variants interleaved, and the fastest
    time kept (the machine is shared: the minimum is the least disturbed run).
    """
    from pcace import ace
    from pcace.maxcorr.ace import ace_shared

    rng = np.random.default_rng(0)
    warm = rng.normal(size=(2, 300, k))
    variants = [None, *bins]
    for b in variants:  # compile (or load) every kernel before timing
        ace_shared(warm, warm[:, :, 0], np.array([0, 1]), np.array([0, 1]), bins=b)
        ace(warm[0], warm[1, :, 0], bins=b)
    out = {}
    for n in ns:
        z = rng.normal(size=(channels, n, k))
        y = np.sin(z[0, :, 0]) + z[1, :, 1] ** 2 + rng.normal(size=n)
        ys = np.stack([y] + [y[rng.permutation(n)] for _ in range(permutations - 1)])
        ch = np.repeat(np.arange(channels), permutations)
        rows = np.tile(np.arange(permutations), channels)
        best = {("exact" if b is None else b): {"shared_ms": np.inf, "single_ms": np.inf}
                for b in variants}
        for _ in range(repeats):
            for b in variants:
                key = "exact" if b is None else b
                t = time.perf_counter()
                ace_shared(z, ys, ch, rows, bins=b)
                shared = (time.perf_counter() - t) / ch.size * 1e3
                t = time.perf_counter()
                for c in range(channels):  # one problem per call: sorting included
                    ace(z[c], y, bins=b)
                single = (time.perf_counter() - t) / channels * 1e3
                best[key]["shared_ms"] = min(best[key]["shared_ms"], shared)
                best[key]["single_ms"] = min(best[key]["single_ms"], single)
        out[n] = best
        print(f"speed n = {n} (load {os.getloadavg()[0]:.2f}): {json.dumps(best)}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="fixtures,families,speed")
    ap.add_argument("--n", type=int, nargs="+", default=[5000, 20000, 50000])
    ap.add_argument("--bins", type=int, nargs="+", default=None,
                    help="bin budgets to compare (default: what bins='auto' uses)")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/pcace-binned"))
    ap.add_argument("--layers-50k", nargs="+", default=list(LAYERS_50K))
    ap.add_argument("--mirror", action="store_true",
                    help="pcace: also exact ACE on the mirrored problems (a reference)")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    a = ap.parse_args()
    from pcace.core.threads import thread_count
    from pcace.maxcorr.binning import AUTO_BINS

    bins = a.bins or [AUTO_BINS]
    print(f"threads {thread_count()}, load {os.getloadavg()[0]:.2f}", flush=True)
    results = {}
    for part in a.parts.split(","):
        if part == "components":
            for n in a.n:
                components(n, a.cache, None if n <= 5000 else tuple(a.layers_50k))
        elif part == "fixtures":
            results[part] = part_fixtures(a.n, bins)
        elif part == "families":
            results[part] = part_families(a.n, bins)
        elif part == "pcace":
            results[part] = part_pcace(a.n, bins, a.cache, a.layers_50k, mirror=a.mirror)
        elif part == "speed":
            results[part] = part_speed(a.n, bins)
        else:
            raise SystemExit(f"unknown part {part!r}")
    if a.out is not None:
        a.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
