"""Calibration of the pooled null: shares of small p-values when nothing relates to the score.

Parts (``--parts``, comma-separated):

- ``synthetic``: ``--layers`` layers of ``--channels`` channels with independent N(0, 1)
  components (``--n`` images, k = 3) and an independent score; p-values from
  ``null_table(method="pooled")``. Printed: shares of p <= 0.05 and p <= 0.01 over all
  tests, their binomial standard errors, and a Kolmogorov-Smirnov test against uniform.
- ``mixed`` (the limits): layers whose channels differ in the shape of their components --
  normal, Student t with 3 degrees of freedom (heavy tails), rectified normal (half the
  values tied at 0, like a ReLU) and log-normal (skewed), all standardised, 8 of each per
  layer -- pooled together. Printed: the shares per kind.
- ``perchannel``: validity for single channels, from the cached 1,000-permutation exact
  nulls of ``bench_null_agreement.py`` (``--cache``; no ACE runs): each channel's first
  500 permutation values feed the pool (``max(20, ceil(1000 / C))`` drawn per channel, 5
  draws), its last 500 are draws from its own null; printed per layer and overall, the
  rate at which a channel's own null values reach p <= 0.05 (and 0.01) against the pool:
  the channel's true type-I error under the pooled null (500 values: a rate of 5% is
  measured with a standard error of 1%).
- ``gpd``: accuracy of generalized Pareto tails (``pcace.stats.tail``) on the same cached
  nulls: the 6 layer3 layers' 384,000 exact null values at N = 300 are the truth; 200
  pools of ``--gpd-pool`` values drawn from them are fitted (probability-weighted moments
  or scipy's maximum likelihood; ``M // 4`` or ``M // 10`` excesses, at most 250; on the
  values, their squares or ``-log(1 - r^2)``); printed: the median and spread of
  log10(estimate / truth) at true p = 1e-3 and 3e-4.
- ``resnet``: the shared ResNet-20's components (``bench_null_cache.py`` files) against
  scores independent of the images: a hash of each image's ten logits (salts 1..``--salts``).
  Per salt the exact per-channel null (B = ``--exact-b``, the same permutations for every
  channel) and the pooled null. Printed: shares of channels (all 19 layers, 688 channels)
  with p <= 0.05 and p <= 0.01 under each, per salt and pooled over salts.

Usage (repository root)::

    python benchmarks/bench_null_calibration.py --parts synthetic,mixed
    python benchmarks/bench_null_calibration.py --parts perchannel,resnet \\
        --files /tmp/null_work/components_cat_300.npz /tmp/null_work/components_cat_1000.npz
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_null_common import components, hash_scores  # noqa: E402

from pcace.maxcorr.scoring import channel_values  # noqa: E402
from pcace.stats.null import null_summary, permutation_null  # noqa: E402
from pcace.stats.nulls import null_table  # noqa: E402
from pcace.stats.pooled import pooled_summary, shared_null  # noqa: E402


def shares(p: np.ndarray) -> str:
    m = p.size
    se5, se1 = np.sqrt(0.05 * 0.95 / m), np.sqrt(0.01 * 0.99 / m)
    return (f"p<=0.05 {np.mean(p <= 0.05):.4f} (se {se5:.4f}), "
            f"p<=0.01 {np.mean(p <= 0.01):.4f} (se {se1:.4f}) of {m}")


def synthetic(a: argparse.Namespace) -> None:
    rng = np.random.default_rng(a.seed)
    start = time.perf_counter()
    p = []
    for layer in range(a.layers):
        z = rng.normal(size=(a.channels, a.n, 3))
        y = rng.normal(size=a.n)
        t, _ = null_table(channel_values(z, y), z, y, seed=layer)
        p.append(t.p_value.to_numpy())
    p = np.concatenate(p)
    ks = stats.kstest(p, "uniform").pvalue
    print(f"synthetic: {a.layers} layers x {a.channels} channels, n = {a.n}, k = 3: "
          f"{shares(p)}; KS p = {ks:.2f} ({time.perf_counter() - start:.0f} s)")


def mixed_layer(rng: np.random.Generator, n: int, per_kind: int) -> np.ndarray:
    draws = {
        "normal": rng.normal(size=(per_kind, n, 3)),
        "t3": rng.standard_t(3, size=(per_kind, n, 3)),
        "relu": np.maximum(rng.normal(size=(per_kind, n, 3)), 0.0),
        "lognormal": rng.lognormal(size=(per_kind, n, 3)),
    }
    z = np.concatenate(list(draws.values()))
    return (z - z.mean(axis=1, keepdims=True)) / z.std(axis=1, keepdims=True)


def mixed(a: argparse.Namespace) -> None:
    rng = np.random.default_rng(a.seed + 1)
    kinds = ["normal", "t3", "relu", "lognormal"]
    per_kind = 8
    p = []
    for layer in range(a.mixed_layers):
        z = mixed_layer(rng, a.n, per_kind)
        y = rng.normal(size=a.n)
        t, _ = null_table(channel_values(z, y), z, y, seed=layer)
        p.append(t.p_value.to_numpy().reshape(len(kinds), per_kind))
    p = np.stack(p)                                   # (layers, kinds, per_kind)
    print(f"mixed: {a.mixed_layers} layers of 4 x {per_kind} channels, n = {a.n}:")
    for i, kind in enumerate(kinds):
        print(f"  {kind:10s} {shares(p[:, i].ravel())}")


def perchannel(a: argparse.Namespace) -> None:
    rng = np.random.default_rng(a.seed)
    for path in a.files:
        d = np.load(a.cache / f"exact_{path.stem}_B1000.npz")
        r05, r01, layers = [], [], []
        for key in d.files:
            null = d[key]
            c = null.shape[0]
            b = max(20, -(-1000 // c))
            test = null[:, 500:]
            rates = np.zeros((2, c))
            for _ in range(5):
                pick = np.stack([rng.choice(500, b, replace=False) for _ in range(c)])
                pool = np.sort(np.take_along_axis(null[:, :500], pick, axis=1).ravel())
                p = (1 + pool.size - np.searchsorted(pool, test, side="left")) / (pool.size + 1)
                rates += [(p <= 0.05).mean(axis=1), (p <= 0.01).mean(axis=1)]
            rates /= 5
            r05.append(rates[0])
            r01.append(rates[1])
            layers.append(f"{key.split(':', 1)[1]} {rates[0].min():.3f}-{rates[0].max():.3f}")
        a5, a1 = np.concatenate(r05), np.concatenate(r01)
        noise5 = stats.binom.sf(0.07 * 500, 500, 0.05)        # P(rate > 0.07 | true 0.05)
        noise1 = stats.binom.sf(0.02 * 500, 500, 0.01)
        print(f"{path.name}: per-channel rate of p <= 0.05 (min-max per layer): "
              + "; ".join(layers))
        print(f"{path.name}: all {a5.size} channels: p <= 0.05 mean {a5.mean():.4f}, range "
              f"{a5.min():.3f}-{a5.max():.3f}, share above 0.07 {np.mean(a5 > 0.07):.3f} "
              f"({noise5:.3f} expected from the 500 values' noise alone); p <= 0.01 mean "
              f"{a1.mean():.4f}, range {a1.min():.4f}-{a1.max():.4f}, share above 0.02 "
              f"{np.mean(a1 > 0.02):.3f} ({noise1:.3f} expected from noise)")


def gpd(a: argparse.Namespace) -> None:
    from pcace.stats.tail import fit_gpd, gpd_sf

    rng = np.random.default_rng(a.seed)
    path = a.files[0]
    d = np.load(a.cache / f"exact_{path.stem}_B1000.npz")
    values = np.sort(np.concatenate([d[k].ravel() for k in d.files if "layer3" in k]))
    truth = np.array([1e-3, 3e-4])
    x = values[(values.size * (1 - truth)).astype(int)]
    truth = np.array([(values >= v).mean() for v in x])
    scales = {"value": lambda v: v, "square": lambda v: v ** 2,
              "log": lambda v: -np.log1p(-np.minimum(v, 1 - 1e-12) ** 2)}
    m_all = a.gpd_pool
    print(f"gpd: {values.size} null values of {path.name}'s layer3; pools of {m_all}")
    for name, f in scales.items():
        for frac in (4, 10):
            for method in ("pwm", "ml"):
                m = min(250, m_all // frac)
                out = []
                for _ in range(200):
                    top = np.sort(f(rng.choice(values, m_all, replace=False)))[::-1]
                    t = 0.5 * (top[m - 1] + top[m])
                    if method == "pwm":
                        xi, sigma = fit_gpd(top[:m] - t)
                    else:
                        xi, _, sigma = stats.genpareto.fit(top[:m] - t, floc=0)
                    est = np.maximum(m / m_all * gpd_sf(f(x) - t, xi, sigma), 0.01 / (m_all + 1))
                    out.append(np.log10(est / truth))
                out = np.array(out)
                print(f"  {name:6s} {m:3d} excesses {method:3s}: log10(estimate / truth) at "
                      f"p = 1e-3, 3e-4: median {np.median(out[:, 0]):+.2f}, "
                      f"{np.median(out[:, 1]):+.2f}; sd {out[:, 0].std():.2f}, "
                      f"{out[:, 1].std():.2f}")


def resnet(a: argparse.Namespace) -> None:
    for path in a.files:
        z, _, extra = components(path)
        n = extra["scores"].size
        every: dict[str, list[np.ndarray]] = {"exact": [], "pooled": [], "shared": []}
        for salt in range(1, a.salts + 1):
            start = time.perf_counter()
            y = hash_scores(extra["logits"], salt)
            got: dict[str, list[np.ndarray]] = {key: [] for key in every}
            obs = {name: channel_values(zl, y) for name, zl in z.items()}
            shared = shared_null(z, y, seed=3000 + salt)
            for name, zl in z.items():
                null = permutation_null(zl, y, a.exact_b, seed=1000 + salt)
                got["exact"].append(null_summary(obs[name], null).p_value.to_numpy())
                t, _ = null_table(obs[name], zl, y, seed=2000 + salt)
                got["pooled"].append(t.p_value.to_numpy())
                got["shared"].append(pooled_summary(obs[name], shared[name])
                                     .p_value.to_numpy())
            for key in every:
                every[key].append(np.concatenate(got[key]))
            print(f"{path.name} (N = {n}) salt {salt}: exact B = {a.exact_b}: "
                  f"{shares(every['exact'][-1])}; pooled: {shares(every['pooled'][-1])}; "
                  f"shared: {shares(every['shared'][-1])} "
                  f"({time.perf_counter() - start:.0f} s, load {os.getloadavg()[0]:.1f})")
        print(f"{path.name} (N = {n}) all {a.salts} salts: " + "; ".join(
            f"{key}: {shares(np.concatenate(v))}" for key, v in every.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="synthetic,mixed")
    p.add_argument("--layers", type=int, default=160)
    p.add_argument("--mixed-layers", type=int, default=40)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--files", type=Path, nargs="*", default=[])
    p.add_argument("--salts", type=int, default=4)
    p.add_argument("--exact-b", type=int, default=200)
    p.add_argument("--cache", type=Path, default=Path("/tmp/null_work"))
    p.add_argument("--gpd-pool", type=int, default=1280)
    a = p.parse_args()
    parts = {"synthetic": synthetic, "mixed": mixed, "perchannel": perchannel, "gpd": gpd,
             "resnet": resnet}
    for part in a.parts.split(","):
        parts[part](a)


if __name__ == "__main__":
    main()
