"""Tests of pcace.reduce.streaming against an independent float64 NumPy PCA of the
standardised maps."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from pcace.reduce.moments import PixelMoments
from pcace.reduce.pca import reduce_block
from pcace.reduce.plan import choose_route
from pcace.reduce.standardise import NonFiniteMaps
from pcace.reduce.streaming import streaming_reduce
from pcace.reduce.subspace import subspace_basis

ROOT = Path(__file__).resolve().parents[1]


# --- the oracle: written from the method's definition, sharing no code with pcace ---------

def oracle(maps: np.ndarray, components, max_components: int = 10, eps: float | None = None):
    """Per channel: standardise columns (ddof 0, constant -> 0), SVD, top-k scores and axes.

    Returns scores (C, N, width), axes (list of (P, k_c)), n_components, explained, dead.
    """
    maps = np.asarray(maps, dtype=np.float64)
    n, c, p = maps.shape
    eps = np.finfo(np.float64).eps if eps is None else eps
    per = []
    for ch in range(c):
        m = maps[:, ch, :]
        mu = m.mean(axis=0)
        sd = np.sqrt(((m - mu) ** 2).mean(axis=0))
        big = np.maximum(np.abs(m.max(axis=0)), np.abs(m.min(axis=0)))
        const = (m.max(axis=0) <= m.min(axis=0)) | (sd <= 8.0 * eps * big)
        z = np.where(const, 0.0, (m - mu) / np.where(const, 1.0, sd))
        u, s, vt = np.linalg.svd(z, full_matrices=False)
        ev = s**2
        total = ev.sum()
        rank = int(((ev > max(n, p) * eps * ev[0]) & (ev > 0)).sum()) if ev[0] > 0 else 0
        if isinstance(components, float):
            cum = np.cumsum(ev[:max_components]) / total if total > 0 else np.zeros(1)
            hit = np.nonzero(cum >= components)[0]
            k = int(hit[0]) + 1 if hit.size else min(max_components, len(ev))
        else:
            k = components
        k = min(k, rank)
        if const.all():
            k = 0
        sc = u[:, :k] * s[:k]
        for j in range(k):  # sign: largest-magnitude entry positive (first on ties)
            if sc[np.argmax(np.abs(sc[:, j])), j] < 0:
                sc[:, j] *= -1
        per.append((sc, vt[:k].T, k, ev[:k].sum() / total if total > 0 else 0.0, const.all()))
    width = components if isinstance(components, int) else max(1, max(x[2] for x in per))
    scores = np.zeros((c, n, width))
    for ch, (sc, _, k, _, _) in enumerate(per):
        scores[ch, :, :k] = sc
    return (scores, [x[1] for x in per], np.array([x[2] for x in per]),
            np.array([x[3] for x in per]), np.array([x[4] for x in per]))


def largest_angle(a: np.ndarray, b: np.ndarray) -> float:
    """Largest principal angle between the column spans of a and b (orthonormalised)."""
    qa, qb = np.linalg.qr(a)[0], np.linalg.qr(b)[0]
    resid = qb - qa @ (qa.T @ qb)
    return float(np.arcsin(min(1.0, np.linalg.norm(resid, 2))))


def check(red, basis, maps, components, max_components=10, eps=None, tol=1e-6):
    ref, axes, k_ref, expl_ref, dead_ref = oracle(maps, components, max_components, eps)
    assert red.n_components.tolist() == k_ref.tolist()
    assert red.dead.tolist() == dead_ref.tolist()
    np.testing.assert_allclose(red.explained_variance.numpy(), expl_ref, rtol=1e-9, atol=1e-12)
    assert red.scores.shape == ref.shape
    for c, k in enumerate(k_ref):
        if k == 0:
            assert not red.scores[c].any()
            continue
        mine = basis.vectors[c, :, :k].numpy()
        assert largest_angle(axes[c], mine) < tol
        scale = np.abs(ref[c]).max(axis=0)
        err = np.abs(red.scores[c].numpy() - ref[c]).max(axis=0)
        assert (err <= tol * np.maximum(scale, 1.0)).all(), (c, err / scale)


# --- data ---------------------------------------------------------------------------------

def noise(n, c, p, seed=0, offset=0.0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, c, p)) + offset


def low_rank(n, c, p, rank=4, noise_level=0.05, seed=0, offset=3.0):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, c, rank)) * np.array([8.0, 4.0, 2.0, 1.0, 0.5][:rank])
    mix = rng.standard_normal((c, rank, p))
    return np.einsum("ncr,crp->ncp", base, mix) + noise_level * rng.standard_normal((n, c, p)) \
        + offset


def batches_of(maps, size):
    t = torch.from_numpy(np.ascontiguousarray(maps))
    return lambda: t.split(size)


def moments_of(maps, size):
    t = torch.from_numpy(np.ascontiguousarray(maps))
    acc = PixelMoments(t.shape[1], t.shape[2])
    for b in t.split(size):
        acc.update(b)
    return acc


# --- the moments route --------------------------------------------------------------------

@pytest.mark.parametrize("kind, n, c, p, batch", [
    ("flat", 203, 4, 36, 50),       # small P, noise spectrum, N not a multiple of the batch
    ("steep", 517, 3, 400, 64),     # large P, low rank + noise
    ("flat", 700, 2, 256, 97),      # large P, noise
    ("steep", 150, 2, 324, 40),     # N < P (the in-memory path takes the N x N side)
])
def test_moments_route_matches_oracle(kind, n, c, p, batch):
    maps = noise(n, c, p, seed=1) if kind == "flat" else low_rank(n, c, p, seed=2)
    red, basis = streaming_reduce(batches_of(maps, batch), 3, route="moments")
    assert basis.route == "moments" and basis.passes == 1 and basis.count == n
    check(red, basis, maps, 3)


def test_four_d_float32_batches():
    maps = low_rank(300, 3, 64, seed=4).astype(np.float32).reshape(300, 3, 8, 8)
    red, basis = streaming_reduce(batches_of(maps, 64), 3, route="moments")
    # same float32 values, widened: the rules use float32's epsilon as reduce_block does
    check(red, basis, maps.reshape(300, 3, 64), 3, eps=float(np.finfo(np.float32).eps))


def test_large_mean_does_not_cancel():
    # naive sums of squares lose (1e6)^2 * eps ~ 2e-4 of a unit variance; Chan's does not
    maps = low_rank(400, 2, 49, seed=5, offset=1e6)
    red, basis = streaming_reduce(batches_of(maps, 33), 3, route="moments")
    check(red, basis, maps, 3)


def test_constant_columns_and_dead_channels():
    maps = low_rank(260, 4, 100, seed=6)
    maps[:, 0, 10:40] = 3.7          # constant pixel columns
    maps[:, 1, :] = -2.0             # dead channel
    maps[:, 2, 1:] = 0.5             # one live column: rank 1 < k
    red, basis = streaming_reduce(batches_of(maps, 64), 3, route="moments")
    assert basis.constant[0, 10:40].all() and not basis.constant[0, :10].any()
    assert red.dead.tolist() == [False, True, False, False]
    assert red.n_components.tolist() == [3, 0, 1, 3]
    check(red, basis, maps, 3)


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.95])
def test_fractional_components(fraction):
    maps = np.concatenate([low_rank(300, 2, 81, seed=7), noise(300, 1, 81, seed=8)], axis=1)
    red, basis = streaming_reduce(batches_of(maps, 70), fraction, max_components=6,
                                  route="moments")
    check(red, basis, maps, fraction, max_components=6)


def test_shards_merged_equal_one_pass():
    maps = low_rank(611, 3, 144, seed=9, offset=50.0)
    whole = moments_of(maps, 611)
    shards = [moments_of(maps[:100], 37), moments_of(maps[100:101], 1),
              moments_of(maps[101:450], 128), moments_of(maps[450:], 64)]
    merged = PixelMoments(3, 144)
    for s in shards:
        merged.merge(s)
    assert merged.count == whole.count == 611
    for name in ("mean", "sq", "lo", "hi", "cross"):
        a, b = getattr(merged, name), getattr(whole, name)
        assert torch.allclose(a, b, rtol=1e-11, atol=1e-9 * float(b.abs().max())), name
    # and the merged moments give the oracle's reduction
    basis = merged.basis(3)
    red = basis.finish([basis.project(b) for b in batches_of(maps, 200)()])
    check(red, basis, maps, 3)


def test_matches_in_memory_reduce_block():
    maps = low_rank(320, 3, 100, seed=10)
    ours, _ = streaming_reduce(batches_of(maps, 64), 3, route="moments")
    block = torch.from_numpy(maps).permute(1, 0, 2).contiguous()
    ref = reduce_block(block, 3)
    torch.testing.assert_close(ours.scores, ref.scores, rtol=0, atol=1e-8)
    assert torch.equal(ours.n_components, ref.n_components)


def test_projection_must_see_the_same_images():
    maps = noise(100, 2, 16)
    basis = moments_of(maps, 30).basis(2)
    with pytest.raises(ValueError, match="same images"):
        basis.finish([basis.project(torch.from_numpy(maps[:90]))])


def test_non_finite_batch_names_channel():
    maps = noise(50, 3, 16)
    maps[7, 2, 3] = np.nan
    acc = PixelMoments(3, 16)
    with pytest.raises(NonFiniteMaps) as err:
        acc.update(torch.from_numpy(maps))
    assert err.value.channels == [2]
    assert acc.count == 0


def test_bad_shapes():
    acc = PixelMoments(3, 16)
    with pytest.raises(ValueError, match="channels"):
        acc.update(torch.zeros(4, 2, 16))
    with pytest.raises(ValueError, match="float32 or float64"):
        acc.update(torch.zeros(4, 3, 16, dtype=torch.int32))
    with pytest.raises(ValueError, match="cross products"):
        PixelMoments(3, 16, cross=False).basis(2)


# --- the subspace route -------------------------------------------------------------------

@pytest.mark.parametrize("components, p", [(3, 400), (0.8, 256), (2, 900)])
def test_subspace_route_matches_oracle(components, p):
    maps = low_rank(350, 3, p, seed=11)
    maps[:, 1, :50] = 1.25                 # constant columns
    red, basis = streaming_reduce(batches_of(maps, 64), components, max_components=5,
                                  route="subspace")
    assert basis.route == "subspace" and basis.converged.all()
    assert 2 <= basis.passes < 20
    check(red, basis, maps, components, max_components=5)


def test_subspace_with_dead_channel_and_rank_below_k():
    maps = low_rank(240, 3, 300, seed=12)
    maps[:, 0, :] = 4.0
    maps[:, 2, 2:] = 1.0                    # two live columns: rank 2 < k = 3
    red, basis = streaming_reduce(batches_of(maps, 50), 3, route="subspace")
    assert basis.converged.all()
    assert red.n_components.tolist() == [0, 3, 2]
    check(red, basis, maps, 3)


def test_subspace_on_a_moderate_spectrum():
    # a power-law spectrum: slower than low rank, still converges to the tolerance
    rng = np.random.default_rng(13)
    n, p = 500, 196
    scales = np.arange(1, p + 1) ** -1.0
    maps = (rng.standard_normal((n, 2, p)) * scales) @ np.linalg.qr(
        rng.standard_normal((p, p)))[0] + 1.0
    basis = subspace_basis(batches_of(maps, 128), 3, max_passes=80)
    assert basis.converged.all(), basis.angle
    red = basis.finish([basis.project(b) for b in batches_of(maps, 128)()])
    check(red, basis, maps, 3)


def test_subspace_reports_non_convergence():
    maps = noise(300, 2, 200, seed=14)      # flat: far too slow for 3 passes
    basis = subspace_basis(batches_of(maps, 100), 3, max_passes=3)
    assert basis.passes == 3
    assert not basis.converged.all()
    assert (basis.angle[~basis.converged] > 1e-9).all()


def test_subspace_refuses_a_changed_pass():
    maps = low_rank(200, 2, 100)
    calls = []

    def batches():
        calls.append(1)
        t = torch.from_numpy(maps if len(calls) == 1 else maps[:150])
        return t.split(64)

    with pytest.raises(ValueError, match="different number"):
        subspace_basis(batches, 3)


# --- the route chooser --------------------------------------------------------------------

def test_route_chooser():
    big = choose_route(16, 1024, budget_bytes=2**30, images=5000)
    assert big.route == "moments" and "fit" in big.reason
    assert big.moments_bytes >= 8 * 16 * 1024**2
    small = choose_route(64, 112 * 112, budget_bytes=2**30, batch_size=32)
    assert small.route == "subspace" and small.subspace_bytes < 2**30 < small.moments_bytes
    with pytest.raises(ValueError, match="neither route"):
        choose_route(64, 112 * 112, budget_bytes=2**20)
    # the estimate does not depend on N
    assert choose_route(16, 1024, budget_bytes=2**30, images=10).moments_bytes == \
        choose_route(16, 1024, budget_bytes=2**30, images=10**6).moments_bytes


def test_streaming_reduce_picks_subspace_under_a_small_budget():
    maps = low_rank(200, 2, 400, seed=15)
    red, basis = streaming_reduce(batches_of(maps, 50), 3, budget_bytes=3 * 2**20)
    assert basis.route == "subspace"
    check(red, basis, maps, 3)


# --- memory -------------------------------------------------------------------------------

_MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from pcace.reduce.moments import PixelMoments
    n, c, p, b = int(sys.argv[1]), 8, 16, 4000
    gen = torch.Generator().manual_seed(0)
    acc = PixelMoments(c, p)
    for _ in range(n // b):
        acc.update(torch.randn(b, c, p, generator=gen))
    print(acc.count, acc.nbytes, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
""")


def test_accumulator_memory_does_not_grow_with_n():
    # 400,000 images of 8 x 16 float32 maps would take 205 MB if stored; measured in fresh
    # interpreters so other tests' allocations do not count
    out = {}
    for n in (4_000, 400_000):
        run = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(n)], check=True,
                             capture_output=True, text=True, cwd=ROOT,
                             env={"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1",
                                  "PATH": "/usr/bin:/bin"})
        count, nbytes, peak = map(int, run.stdout.split())
        assert count == n
        out[n] = (nbytes, peak)
    # packed float64 triangles of the cross products, per-pixel sums, minima and maxima
    assert out[4_000][0] == out[400_000][0] == 4 * 8 * 16 * 17 + 3 * 8 * 8 * 16
    assert out[400_000][1] - out[4_000][1] < 64 * 2**20


def test_subspace_chebyshev_filter_needs_fewer_passes_on_a_flat_tail(monkeypatch):
    """A spectrum whose 24th eigenvalue is 0.8 of the 3rd (what slows ResNet-20's
    ``layer1.2`` channels): the Chebyshev filter converges in fewer passes than its degree-1
    step (the shifted power step, ``CHEBYSHEV_RESTART = 1``), and both equal NumPy's PCA."""
    import pcace.reduce.subspace as streaming

    rng = np.random.default_rng(21)
    n, p = 2000, 256
    scales = np.sqrt(np.concatenate([[3.0, 2.0, 1.5], np.linspace(1.3, 0.9, 40),
                                     np.full(p - 43, 0.3)]))
    maps = (rng.standard_normal((n, 1, p)) * scales) @ np.linalg.qr(
        rng.standard_normal((p, p)))[0]
    passes = {}
    for restart in (1, streaming.CHEBYSHEV_RESTART):
        monkeypatch.setattr(streaming, "CHEBYSHEV_RESTART", restart)
        basis = subspace_basis(batches_of(maps, 256), 3, max_passes=80)
        assert basis.converged.all(), basis.angle
        red = basis.finish([basis.project(b) for b in batches_of(maps, 256)()])
        check(red, basis, maps, 3)
        passes[restart] = basis.passes
    assert passes[streaming.CHEBYSHEV_RESTART] < 0.85 * passes[1], passes
