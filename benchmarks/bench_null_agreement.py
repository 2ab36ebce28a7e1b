"""Cheap nulls against a 1,000-permutation exact null on the shared ResNet-20 (cat logit).

For each components file (``bench_null_cache.py``: the first N training cats, target 3,
k = 3) the reference is the exact per-channel null with B = 1,000 permutations
(``permutation_null``, seed 12345, cached). Candidates, each with permutations independent
of the reference's:

- ``pooled``: ``pcace.stats.nulls.null_table(method="pooled")`` (pool 1,000, at least 20
  permutations per channel), run ``--replicates`` times with different seeds;
- ``shared``: ``pcace.stats.pooled.shared_null``, one pool per group for all 19 layers
  (``max(1000, 20 * 64)`` values), run ``--replicates`` times;
- a bank sweep: shared banks of M values (and per-layer pools) drawn from reference A's
  values, against reference B's discoveries, 20 draws each: how the bank's size moves
  the agreement without running ACE;
- ``pooled+gpd``: the same pools with the generalized Pareto tail of
  ``pcace.stats.tail.tail_p_values`` where fewer than 10 pooled values reach the observed;
- ``exact B=100`` (today's default): the first 100 permutations of either reference;
- ``exact B=1000``: a second reference (seed 777, cached), B, against the first, A: how well
  two exact nulls agree with each other;
- ``sequential h``: Besag-Clifford stopping (stop a channel after h exceedances, at most
  1,000 permutations; p = h / L, or (g + 1) / 1001) read off reference B's permutation
  sequence (exact: the same draws a sequential run would make).

Reported against each reference (A: seed 12345; B: seed 777): BH discoveries (q <= 0.05
within each layer) found by the candidate as a share of the reference's, extra discoveries
as a share of the reference's, layers whose verdict (``layer_evidence`` with a 10-split
split-half check, the same for all) differs from the reference's, and ACE problems run.

Usage (repository root)::

    python benchmarks/bench_null_agreement.py /tmp/null_work/components_cat_300.npz \\
        /tmp/null_work/components_cat_1000.npz --cache /tmp/null_work
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_null_common import components, exact_null  # noqa: E402

from pcace.stats.evidence import layer_evidence, split_half_table  # noqa: E402
from pcace.stats.null import benjamini_hochberg, null_summary  # noqa: E402
from pcace.stats.nulls import null_table  # noqa: E402
from pcace.stats.pooled import pooled_null, pooled_summary, shared_null  # noqa: E402
from pcace.stats.tail import tail_p_values  # noqa: E402


def sequential_p(obs: np.ndarray, null: np.ndarray, h: int) -> tuple[np.ndarray, int]:
    """Besag-Clifford p-values along each channel's permutation sequence, and the cost."""
    p = np.empty(obs.size)
    cost = 0
    b = null.shape[1]
    for c in range(obs.size):
        hits = np.cumsum(null[c] >= obs[c])
        stop = np.flatnonzero(hits >= h)
        if stop.size:
            p[c] = h / (stop[0] + 1)
            cost += int(stop[0]) + 1
        else:
            p[c] = (hits[-1] + 1) / (b + 1)
            cost += b
    return p, cost


def gpd_p(obs: np.ndarray, z: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """Pooled p-values with the GPD tail (one pool: every channel has k components)."""
    null = pooled_null(z, y, 1000, seed=seed)
    return tail_p_values(obs, null.pool(int(null.groups.max())))


def bank_sweep(obs: dict, ref_source: dict, ref: dict, sizes: list[int], draws: int,
               seed: int) -> None:
    """A shared bank of M values drawn from one exact null's values (all layers' channels),
    against the discoveries of the other: found and extra, mean [min, max] over draws;
    and the same for per-layer pools of ``max(1000, 20 C)`` drawn the same way."""
    rng = np.random.default_rng(seed)
    names = list(obs)
    source = np.concatenate([ref_source[k] for k in names])
    total = sum(int(v.sum()) for v in ref.values())

    def discoveries(bank_of) -> tuple[float, float]:
        found = extra = 0
        for k in names:
            bank = bank_of(k)
            p = (1 + bank.size - np.searchsorted(bank, obs[k], side="left")) / (bank.size + 1)
            disc = benjamini_hochberg(p) <= 0.05
            found += int((disc & ref[k]).sum())
            extra += int((disc & ~ref[k]).sum())
        return found / total, extra / total

    def draw(values: np.ndarray, m: int) -> np.ndarray:
        rows, cols = rng.integers(0, values.shape[0], m), rng.integers(0, values.shape[1], m)
        return np.sort(values[rows, cols])

    cases = [("per-layer pools", None)] + [(f"shared M = {m}", m) for m in sizes]
    for label, m in cases:
        rows = []
        for _ in range(draws):
            if m is None:
                rows.append(discoveries(
                    lambda k: draw(ref_source[k], max(1000, 20 * ref_source[k].shape[0]))))
            else:
                bank = draw(source, m)
                rows.append(discoveries(lambda k, bank=bank: bank))
        got = np.array(rows)
        print(f"  bank sweep, {label:18s}: found {got[:, 0].mean():.3f} "
              f"[{got[:, 0].min():.3f}, {got[:, 0].max():.3f}], extra {got[:, 1].mean():.3f} "
              f"[{got[:, 1].min():.3f}, {got[:, 1].max():.3f}] ({draws} draws)")


def verdicts(q: dict[str, np.ndarray], adj: dict[str, np.ndarray], split: pd.DataFrame,
             n: int) -> pd.Series:
    rows = [pd.DataFrame({"layer": name, "q_value": q[name], "pcace_adj": adj[name]})
            for name in q]
    ev = layer_evidence(pd.concat(rows, ignore_index=True), split, n_images=n)
    return ev.set_index("layer").evidence


def compare(ref: dict[str, np.ndarray], cand: dict[str, np.ndarray]) -> tuple[float, float]:
    total = sum(int(r.sum()) for r in ref.values())
    found = sum(int((cand[k] & ref[k]).sum()) for k in ref)
    extra = sum(int((cand[k] & ~ref[k]).sum()) for k in ref)
    return found / max(total, 1), extra / max(total, 1)


def _report(ctx: dict, label: str, q: dict, adj: dict, cost: int,
            secs: float = float("nan")) -> None:
    parts = []
    for key in ("A", "B"):
        disc, v_ref = ctx[f"disc_{key}"], ctx[f"v_{key}"]
        found, more = compare(disc, {k: v <= 0.05 for k, v in q.items()})
        changed = [k for k, v in verdicts(q, adj, ctx["split"], ctx["n"]).items()
                   if v != v_ref[k]]
        parts.append(f"vs {key}: found {found:.3f} extra {more:.3f} verdicts changed "
                     f"{len(changed)}")
    print(f"  {label:22s} {'; '.join(parts)}; ACE problems {cost} ({secs:.0f} s)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", type=Path, nargs="+")
    p.add_argument("--cache", type=Path, default=Path("/tmp/null_work"))
    p.add_argument("--replicates", type=int, default=3)
    a = p.parse_args()
    for path in a.files:
        z, obs, extra = components(path)
        y = extra["scores"]
        n = y.size
        ref_null = exact_null(z, y, 1000, 12345, a.cache / f"exact_{path.stem}_B1000.npz")
        second = exact_null(z, y, 1000, 777, a.cache / f"exact2_{path.stem}_B1000.npz")
        split = split_half_table(z, y, splits=10, seed=0)
        q_ref, adj_ref, ctx = {}, {}, {"split": split, "n": n}
        for key, null in (("A", ref_null), ("B", second)):
            q, adj = {}, {}
            for name in z:
                t = null_summary(obs[name], null[name])
                q[name], adj[name] = t.q_value.to_numpy(), t.pcace_adj.to_numpy()
            ctx[f"disc_{key}"] = {k: v <= 0.05 for k, v in q.items()}
            ctx[f"v_{key}"] = verdicts(q, adj, split, n)
            q_ref[key], adj_ref[key] = q, adj
            print(f"{path.name} (N = {n}): reference {key} (exact, B = 1,000, seed "
                  f"{12345 if key == 'A' else 777}): discoveries "
                  f"{sum(int(v.sum()) for v in ctx[f'disc_{key}'].values())} of "
                  f"{sum(v.size for v in ctx[f'disc_{key}'].values())} channels; verdicts "
                  f"{dict(ctx[f'v_{key}'].value_counts())}")
        print(f"  load {os.getloadavg()[0]:.1f}; vs B is the fair comparison for candidates "
              "built from A's permutations, vs A for those from B's")
        report = partial(_report, ctx)
        cells = sum(v.shape[0] for v in z.values())
        report("exact B=1000 (ref. B)", q_ref["B"], adj_ref["B"], 1000 * cells)
        adj_ref = adj_ref["A"]
        for rep in range(a.replicates):
            start = time.perf_counter()
            q, adj, cost = {}, {}, 0
            for name in z:
                t, rec = null_table(obs[name], z[name], y, method="pooled", seed=100 + rep)
                q[name], adj[name] = t.q_value.to_numpy(), t.pcace_adj.to_numpy()
                cost += rec["ace_problems"]
            report(f"pooled (seed {100 + rep})", q, adj, cost, time.perf_counter() - start)
        for rep in range(a.replicates):
            start = time.perf_counter()
            shared = shared_null(z, y, seed=100 + rep)
            q, adj = {}, {}
            for name in z:
                t = pooled_summary(obs[name], shared[name])
                q[name], adj[name] = t.q_value.to_numpy(), t.pcace_adj.to_numpy()
            cost = sum(v.problems for v in shared.values())
            report(f"shared (seed {100 + rep})", q, adj, cost, time.perf_counter() - start)
        q = {k: benjamini_hochberg(gpd_p(obs[k], z[k], y, 100)) for k in z}
        report("pooled+gpd (seed 100)", q, adj, cost)
        q, adj = {}, {}
        for name in z:
            t = null_summary(obs[name], second[name][:, :100])
            q[name], adj[name] = t.q_value.to_numpy(), t.pcace_adj.to_numpy()
        report("exact B=100 (B's first)", q, adj, 100 * cells)
        q, adj = {}, {}
        for name in z:
            t = null_summary(obs[name], ref_null[name][:, :100])
            q[name], adj[name] = t.q_value.to_numpy(), t.pcace_adj.to_numpy()
        report("exact B=100 (A's first)", q, adj, 100 * cells)
        for h in (10, 20):
            q, cost = {}, 0
            for name in z:
                pv, c = sequential_p(obs[name], second[name], h)
                q[name] = benjamini_hochberg(pv)
                cost += c
            report(f"sequential h={h} (B's)", q, adj_ref, cost)
        bank_sweep(obs, ref_null, ctx["disc_B"], [1280, 2560, 5000, 10000, 20000], 20, 5)
        per_layer = {name: (v.shape[0], max(1000, 20 * v.shape[0])) for name, v in z.items()}
        print("  ACE problems per layer (C: pooled / exact B=100 / B=1000): " + ", ".join(
            f"{c}: {pc} / {100 * c} / {1000 * c}" for c, pc in sorted(set(per_layer.values()))))


if __name__ == "__main__":
    main()
