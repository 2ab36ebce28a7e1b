"""Shared helpers of the ``bench_null_*.py`` scripts: cached components and exact nulls.

Not a benchmark by itself. ``components(path)`` reads what ``bench_null_cache.py`` wrote;
``exact_null(...)`` computes (once, then reads from ``.npz``) the per-channel permutation
null of every layer with ``pcace.stats.null.permutation_null``, the reference the cheap
nulls are compared with.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np


def components(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    """``(z per layer, observed values per layer, extras)`` from a components file."""
    d = np.load(path)
    layers = [str(s) for s in d["layers"]]
    z = {name: d[f"z:{name}"] for name in layers}
    obs = {name: d[f"obs:{name}"] for name in layers}
    return z, obs, {"scores": d["scores"], "logits": d["logits"]}


def hash_scores(logits: np.ndarray, salt: int) -> np.ndarray:
    """A score per image from a hash of its logits: a deterministic function of the image
    that no channel can predict (uniform on (0, 1))."""
    out = np.empty(len(logits))
    for i, row in enumerate(np.asarray(logits, dtype=np.float32)):
        h = hashlib.sha256(row.tobytes() + salt.to_bytes(4, "little")).digest()
        out[i] = (int.from_bytes(h[:8], "little") + 0.5) / 2.0**64
    return out


def exact_null(z: dict[str, np.ndarray], scores: np.ndarray, permutations: int, seed: int,
               cache: Path) -> dict[str, np.ndarray]:
    """Per layer the ``(C, B)`` exact null, cached in ``cache`` (an ``.npz`` path)."""
    from pcace.stats.null import permutation_null

    if cache.exists():
        d = np.load(cache)
        if all(f"null:{k}" in d for k in z):
            return {k: d[f"null:{k}"] for k in z}
    out = {}
    start = time.perf_counter()
    for name, zl in z.items():
        out[name] = permutation_null(zl, scores, permutations, seed)
    secs = time.perf_counter() - start
    problems = sum(v.size for v in out.values())
    print(f"exact null B = {permutations}: {problems} problems, {secs:.0f} s "
          f"({secs / problems * 1e3:.2f} ms/problem, load {os.getloadavg()[0]:.1f}) -> {cache}")
    np.savez(cache, **{f"null:{k}": v for k, v in out.items()})
    return out
