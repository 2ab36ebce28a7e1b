"""Adaptive split halves on the shared ResNet-20: splits run and agreement against 10 splits.

For every layer of a components file (``bench_null_cache.py``) the split-half check runs
``--max-splits`` splits once (``pcace.stats.evidence.split_half``). An adaptive check
(``split_half(..., width=w, min_splits=m)``) runs the first splits of that same sequence
and stops by a rule on their per-split Spearman correlations, so its answer for every rule
is read off the prefix of the full run (``pcace.stats.halves._splits_needed`` decides, as
in ``split_half``); one layer per file is re-run through ``split_half(width=...)`` to check
that the prefix reading is what the function returns.

Printed per rule: splits run per layer (min / median / max, total against 10 per layer),
and the largest difference of the projected agreement from the 10-split value and from the
``--max-splits`` value.

Usage (repository root)::

    python benchmarks/bench_null_split.py /tmp/null_work/components_cat_1000.npz \\
        --max-splits 30 --cache /tmp/null_work
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_null_common import components  # noqa: E402

from pcace.stats.evidence import NOT_REPRODUCIBLE, split_half  # noqa: E402
from pcace.stats.halves import _spearman_rows, _splits_needed, spearman_brown  # noqa: E402


def full_runs(path: Path, max_splits: int, cache: Path) -> tuple[dict, np.ndarray, dict]:
    """Per layer the ``(S, 2, C)`` values of ``max_splits`` splits (cached)."""
    z, _, extra = components(path)
    out = cache / f"splits_{path.stem}_{max_splits}.npz"
    if out.exists():
        d = np.load(out)
        return z, extra["scores"], {k: d[k] for k in z}
    start = time.perf_counter()
    values = {}
    for name, zl in z.items():
        s = split_half(zl, extra["scores"], splits=max_splits, seed=0)
        values[name] = np.stack([s["values_a"], s["values_b"]], axis=1)
    secs = time.perf_counter() - start
    print(f"{path.name}: {max_splits} splits of {len(z)} layers in {secs:.0f} s "
          f"(load {os.getloadavg()[0]:.1f})")
    np.savez(out, **values)
    return z, extra["scores"], values


def stop_at(values: np.ndarray, width: float, min_splits: int, cap: int,
            settled: float | None = None) -> int:
    """The number of splits an adaptive check with this rule runs (at most ``cap``)."""
    done = min(min_splits, cap)
    while done < cap:
        need = _splits_needed(values[:done], width, 0.95, values.shape[2], done, settled)
        if need <= done:
            break
        done = min(cap, need)
    return done


def projected(values: np.ndarray, s: int) -> float:
    rho = _spearman_rows(values[:s, 0], values[:s, 1])
    return float(spearman_brown(np.nanmean(rho)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", type=Path, nargs="+")
    p.add_argument("--max-splits", type=int, default=30)
    p.add_argument("--cap", type=int, default=10, help="splits an adaptive check may run")
    p.add_argument("--cache", type=Path, default=Path("/tmp/null_work"))
    a = p.parse_args()
    rules = [(0.05, 3, None), (0.05, 4, None), (0.05, 5, None), (0.1, 4, None),
             (0.05, 4, NOT_REPRODUCIBLE), (0.05, 3, NOT_REPRODUCIBLE)]
    for path in a.files:
        z, y, values = full_runs(path, a.max_splits, a.cache)
        print(f"\n{path.name}: per-split Spearman sd per layer "
              + ", ".join(f"{float(np.nanstd(_spearman_rows(v[:, 0], v[:, 1]), ddof=1)):.3f}"
                          for v in values.values()))
        for width, first, settled in rules:
            used, d10, dmax, settled_d10 = [], [], [], []
            drift = max(abs(projected(v, 10) - projected(v, a.max_splits))
                        for v in values.values())
            for v in values.values():
                s = stop_at(v, width, first, a.cap, settled)
                used.append(s)
                wide = stop_at(v, width, first, a.cap)
                (settled_d10 if s < wide else d10).append(abs(projected(v, s) -
                                                              projected(v, 10)))
                dmax.append(abs(projected(v, s) - projected(v, a.max_splits)))
            tag = "" if settled is None else f", settled below {settled}"
            note = (f" (layers settled early: {len(settled_d10)}, their |adaptive - 10 "
                    f"splits| max {max(settled_d10):.3f})" if settled_d10 else "")
            print(f"width {width}, min_splits {first}{tag}: splits {min(used)}/"
                  f"{int(np.median(used))}/{max(used)} (total {sum(used)} vs "
                  f"{10 * len(used)}); |adaptive - 10 splits| max "
                  f"{max(d10, default=0.0):.3f}{note}, "
                  f"|adaptive - {a.max_splits} splits| max {max(dmax):.3f}, "
                  f"|10 - {a.max_splits} splits| max {drift:.3f}")
        name = list(z)[-1]
        check = split_half(z[name], y, splits=a.cap, seed=0, width=0.05)
        expect = stop_at(values[name], 0.05, 4, a.cap)
        assert check["splits"] == expect, (check["splits"], expect)
        assert abs(check["spearman"] - projected(values[name], expect)) < 1e-12
        print(f"check: split_half(width=0.05) on {name} ran {expect} splits, as read off")


if __name__ == "__main__":
    main()
