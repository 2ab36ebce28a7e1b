"""Cost of a permutation null at large N: shared set-up against gathered problems.

A permutation null is ``C x B`` ACE problems: every channel against ``B`` permutations
of one score. :class:`pcace.engines.engine.Problems` solves them without gathering, sorting each
channel's components and the score once (:func:`pcace.maxcorr.ace.ace_shared`); the baseline
gathers each chunk of problems and solves them one by one
(:func:`pcace.maxcorr.scoring.channel_values`,
the path before the shared set-up). Both give identical values (checked here).

Usage::

    .venv/bin/python benchmarks/bench_null.py --n 5000 50000 --channels 4 --permutations 10
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from pcace.core.threads import thread_count
from pcace.engines.engine import Problems
from pcace.maxcorr.scoring import channel_values


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[5000, 50000])
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--permutations", type=int, default=10)
    p.add_argument("--k", type=int, default=3)
    a = p.parse_args()
    print(f"threads {thread_count()}, load {os.getloadavg()[0]:.2f}")
    rng = np.random.default_rng(0)
    warm = Problems(rng.normal(size=(1, 50, a.k)), rng.normal(size=(2, 50)), np.arange(1))
    warm.solve(0, 2)
    channel_values(rng.normal(size=(2, 50, a.k)), rng.normal(size=(2, 50)))
    for n in a.n:
        z = rng.normal(size=(a.channels, n, a.k))
        y = z[0, :, 0] ** 2 + rng.normal(size=n)
        ys = y[np.stack([rng.permutation(n) for _ in range(a.permutations)])]
        problems = Problems(z, ys, np.arange(a.channels), order="channel")
        ch, rows = problems.index(0, len(problems))
        t0 = time.perf_counter()
        shared = problems.solve(0, len(problems))
        t1 = time.perf_counter()
        gathered = channel_values(z[ch], ys[rows])
        t2 = time.perf_counter()
        assert np.array_equal(shared, gathered)
        per_shared = (t1 - t0) / len(problems) * 1e3
        per_gathered = (t2 - t1) / len(problems) * 1e3
        print(f"n = {n:>6}: {len(problems)} problems; shared set-up {per_shared:.2f} ms/problem, "
              f"gathered {per_gathered:.2f} ms/problem ({per_gathered / per_shared:.2f}x); "
              "values identical")


if __name__ == "__main__":
    main()
