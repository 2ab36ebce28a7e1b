"""Tests of pcace.reduce.pca: standardisation + PCA per channel against sklearn."""

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

from pcace.reduce.pca import Reduction, principal_components


def _maps(n, c, p, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # correlated columns so the components are well separated
    base = torch.randn(n, c, 4, generator=gen, dtype=torch.float64)
    mix = torch.randn(c, 4, p, generator=gen, dtype=torch.float64)
    noise = 0.3 * torch.randn(n, c, p, generator=gen, dtype=torch.float64)
    return torch.einsum("nck,ckp->ncp", base, mix) + noise + 5.0


def _sklearn_scores(m, k):
    z = StandardScaler().fit_transform(m)
    pca = PCA(n_components=k, svd_solver="full").fit(z)
    return pca.transform(z), pca


def _assert_equal_up_to_sign(ours, ref, atol):
    signs = np.sign((ours * ref).sum(axis=0))
    signs[signs == 0] = 1
    np.testing.assert_allclose(ours, ref * signs, atol=atol, rtol=0)


@pytest.mark.parametrize("n, p", [(30, 80), (80, 12)], ids=["gram-NxN", "covariance-PxP"])
def test_scores_match_sklearn(n, p):
    maps = _maps(n, 3, p)
    red = principal_components(maps, components=3)
    assert isinstance(red, Reduction)
    assert red.scores.shape == (3, n, 3)
    assert red.scores.dtype == torch.float64
    for c in range(3):
        ref, pca = _sklearn_scores(maps[:, c].numpy(), 3)
        _assert_equal_up_to_sign(red.scores[c].numpy(), ref, atol=1e-8)
        assert red.explained_variance[c].item() == pytest.approx(
            pca.explained_variance_ratio_.sum(), abs=1e-10)
    assert red.n_components.tolist() == [3, 3, 3]
    assert not red.dead.any()


def test_four_d_input_and_input_untouched():
    maps = _maps(20, 2, 36).reshape(20, 2, 6, 6).float()
    before = maps.clone()
    red = principal_components(maps, components=2)
    assert torch.equal(maps, before)
    flat = principal_components(maps.flatten(2), components=2)
    assert torch.equal(red.scores, flat.scores)


def test_deterministic_sign():
    maps = _maps(25, 2, 40)
    scores = principal_components(maps, components=3).scores
    idx = scores.abs().argmax(dim=1, keepdim=True)
    assert (scores.gather(1, idx) > 0).all()
    flipped = principal_components(-maps, components=3).scores
    torch.testing.assert_close(flipped, scores, atol=1e-9, rtol=0)


def test_float32_close_to_float64():
    maps = _maps(40, 2, 50).float()
    r64 = principal_components(maps, components=2)
    r32 = principal_components(maps, components=2, dtype=torch.float32)
    assert r32.scores.dtype == torch.float64  # eigenproblems are always solved in float64
    scale = r64.scores.abs().max()
    assert (r32.scores.double() - r64.scores).abs().max() < 1e-4 * scale


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.9])
def test_fraction_picks_k_like_sklearn(fraction):
    maps = _maps(40, 4, 30, seed=3)
    red = principal_components(maps, components=fraction, max_components=30)
    for c in range(4):
        z = StandardScaler().fit_transform(maps[:, c].numpy())
        ratio = PCA(svd_solver="full").fit(z).explained_variance_ratio_
        cum = np.cumsum(ratio)
        expected = int(np.argmax(cum >= fraction)) + 1
        assert red.n_components[c].item() == expected
        assert red.explained_variance[c].item() == pytest.approx(cum[expected - 1], abs=1e-10)
        assert PCA(n_components=fraction, svd_solver="full").fit(z).n_components_ == expected
    assert red.scores.shape[2] == int(red.n_components.max())
    for c in range(4):
        assert (red.scores[c, :, red.n_components[c]:] == 0).all()


def test_fraction_capped_by_max_components():
    maps = _maps(40, 2, 30)
    red = principal_components(maps, components=0.999, max_components=2)
    assert red.n_components.tolist() == [2, 2]
    assert red.scores.shape == (2, 40, 2)


def test_constant_columns_dropped():
    maps = _maps(30, 2, 20)
    maps[:, 0, [3, 7]] = 4.25  # exactly constant pixel positions
    big = torch.tensor(1e6, dtype=torch.float64)
    wobble = torch.nextafter(big, torch.tensor(2e6, dtype=torch.float64))  # 1 ulp above
    maps[:, 1, 5] = torch.where(torch.arange(30) % 2 == 0, big, wobble)  # rounding-level
    red = principal_components(maps, components=2)
    for c, cols in ((0, [3, 7]), (1, [5])):
        keep = [j for j in range(20) if j not in cols]
        ref, _ = _sklearn_scores(maps[:, c, keep].numpy(), 2)
        _assert_equal_up_to_sign(red.scores[c].numpy(), ref, atol=1e-8)
        full_ref, _ = _sklearn_scores(maps[:, c].numpy(), 2)  # sklearn zeroes them too
        _assert_equal_up_to_sign(red.scores[c].numpy(), full_ref, atol=1e-8)


def test_dead_channel():
    maps = _maps(30, 3, 16)
    maps[:, 1] = 0.0
    maps[:, 2] = torch.linspace(0, 1, 16)  # varies over pixels, not over images
    red = principal_components(maps, components=3)
    assert red.dead.tolist() == [False, True, True]
    assert (red.scores[1:] == 0).all()
    assert red.n_components.tolist() == [3, 0, 0]
    assert red.explained_variance[1:].tolist() == [0.0, 0.0]
    assert red.scores[0].abs().sum() > 0


def test_pads_when_rank_below_k():
    gen = torch.Generator().manual_seed(1)
    factor = torch.randn(30, 2, generator=gen, dtype=torch.float64)
    mix = torch.randn(2, 25, generator=gen, dtype=torch.float64)
    rank2 = factor @ mix  # rank 2 after centring
    maps = torch.stack([rank2, torch.randn(30, 25, generator=gen, dtype=torch.float64)], 1)
    red = principal_components(maps, components=4)
    assert red.scores.shape == (2, 30, 4)
    assert red.n_components.tolist() == [2, 4]
    assert (red.scores[0, :, 2:] == 0).all()
    assert red.explained_variance[0].item() == pytest.approx(1.0, abs=1e-10)
    # more components than images
    small = principal_components(_maps(5, 1, 40), components=7)
    assert small.scores.shape == (1, 5, 7)
    assert small.n_components.item() == 4  # 5 centred images span 4 dimensions
    assert (small.scores[0, :, 4:] == 0).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"components": 0}, "components must be >= 1"),
        ({"components": 1.0}, r"fraction in \(0, 1\)"),
        ({"components": -0.2}, r"fraction in \(0, 1\)"),
        ({"components": True}, "components must be"),
        ({"components": "3"}, "components must be"),
        ({"components": 0.5, "max_components": 0}, "max_components"),
        ({"dtype": torch.float16}, "dtype"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        principal_components(_maps(10, 2, 9), **kwargs)


@pytest.mark.parametrize(
    "maps, match",
    [
        (torch.zeros(10, 9), "shape"),
        (torch.zeros(1, 2, 9), "at least 2 images"),
        (torch.zeros(10, 0, 9), "no channels"),
    ],
)
def test_bad_maps(maps, match):
    with pytest.raises(ValueError, match=match):
        principal_components(maps)


def test_nan_names_channel():
    maps = _maps(10, 3, 9)
    maps[4, 2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"channel\(s\) \[2\]"):
        principal_components(maps)


# --- the compiled pieces: standardisation kernel, reduce_block, the eigen iteration -----------

def _numpy_standardised(block):
    """Independent oracle: NumPy float64 column standardisation, constant columns -> 0."""
    x = block.astype(np.float64)
    mean = x.mean(axis=1, keepdims=True)
    sd = x.std(axis=1, keepdims=True)
    const = (np.ptp(x, axis=1, keepdims=True) == 0)
    return np.where(const, 0.0, (x - mean) / np.where(const, 1.0, sd)), const[:, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_standardise_kernel_matches_numpy(dtype):
    from pcace.reduce.standardise import standardise_

    gen = torch.Generator().manual_seed(4)
    block = (torch.randn(5, 40, 33, generator=gen, dtype=torch.float64) * 3 + 7).to(dtype)
    block[1, :, 4] = 2.5  # a constant column
    block[3] = -1.0  # a dead channel
    expected, const = _numpy_standardised(block.numpy())
    constant = standardise_(block, 8.0)
    np.testing.assert_array_equal(constant.numpy(), const)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    np.testing.assert_allclose(block.double().numpy(), expected, atol=tol, rtol=0)


def test_standardise_kernel_leaves_non_finite_channel_untouched():
    from pcace.reduce.standardise import NonFiniteMaps, standardise_

    block = torch.randn(3, 20, 6)
    block[1, 7, 2] = float("inf")
    before = block[1].clone()
    with pytest.raises(NonFiniteMaps, match=r"channel\(s\) \[1\]") as info:
        standardise_(block, 8.0)
    assert info.value.channels == [1]
    assert torch.equal(block[1], before)


@pytest.mark.parametrize("spectrum", ["steep", "flat"])
def test_iteration_path_matches_sklearn(spectrum):
    """N = 200 images and P = 400 pixels: the 200 x 200 Gram goes through the iteration
    (steep spectrum) or falls back to LAPACK's subset solver (flat: pure noise)."""
    n, p = 200, 400
    maps = _maps(n, 2, p, seed=5) if spectrum == "steep" else \
        torch.randn(n, 2, p, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    red = principal_components(maps, components=3)
    for c in range(2):
        ref, _ = _sklearn_scores(maps[:, c].numpy(), 3)
        _assert_equal_up_to_sign(red.scores[c].numpy(), ref, atol=1e-7 * np.abs(ref).max())


def test_top_eigenpairs_fallback_and_iteration_agree_with_eigh():
    from pcace.reduce.pca import top_eigenpairs

    gen = torch.Generator().manual_seed(6)
    a = torch.randn(3, 150, 160, generator=gen, dtype=torch.float64)
    a[0] *= torch.logspace(0, -3, 160, dtype=torch.float64)  # steep: the iteration converges
    g = a @ a.transpose(1, 2)
    w, v = torch.linalg.eigh(g)
    exact_w, exact_v = w.flip(-1)[:, :3], v.flip(-1)[:, :, :3]
    # 1 round: everything not converged goes to the exact solver; a flat mask sends the
    # marked matrices there without iterating (mixed, all, none)
    for rounds, flat in [(10, None), (1, None), (10, [False, True, False]),
                         (10, [True, True, True]), (10, [False, False, False])]:
        vals, vecs = top_eigenpairs(g, 3, max_rounds=rounds,
                                    flat=None if flat is None else torch.tensor(flat))
        torch.testing.assert_close(vals, exact_w, rtol=1e-10, atol=0)
        overlap = (vecs * exact_v).sum(dim=1).abs()
        torch.testing.assert_close(overlap, torch.ones_like(overlap), rtol=0, atol=1e-8)


def test_small_matrices_exact_top_pairs():
    from pcace.reduce.pca import top_eigenpairs

    gen = torch.Generator().manual_seed(7)
    a = torch.randn(5, 49, 300, generator=gen, dtype=torch.float64)
    a[1, :, :2] *= 30  # two dominant directions
    g = a @ a.transpose(1, 2)
    g[4] = torch.eye(49, dtype=torch.float64) * 2  # a triple top eigenvalue
    vals, vecs = top_eigenpairs(g, 3)
    exact = torch.linalg.eigvalsh(g).flip(-1)[:, :3]
    torch.testing.assert_close(vals, exact, rtol=1e-12, atol=0)
    resid = (g @ vecs - vecs * vals[:, None, :]).norm(dim=1)
    assert float(resid.max()) < 1e-10 * float(vals[:, 0].max())
    gram = vecs.transpose(1, 2) @ vecs
    torch.testing.assert_close(gram, torch.eye(3, dtype=torch.float64).expand(5, 3, 3),
                               rtol=0, atol=1e-10)


def test_reduce_block_float32_close_to_float64_and_in_place():
    from pcace.reduce.pca import reduce_block

    maps = _maps(60, 3, 300, seed=7)
    exact = principal_components(maps, components=3)
    block = maps.permute(1, 0, 2).contiguous().float()
    red = reduce_block(block, 3)
    scale = exact.scores.abs().amax()
    assert (red.scores - exact.scores).abs().max() < 1e-5 * scale
    torch.testing.assert_close(block.double().mean(dim=1), torch.zeros(3, 300, dtype=torch.float64),
                               atol=1e-5, rtol=0)  # standardised in place
    with pytest.raises(ValueError, match=r"\(C, N, P\)"):
        reduce_block(block.int(), 3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("pixel_side", [False, True])
def test_gram_kernel_matches_numpy(dtype, pixel_side):
    from pcace.reduce.kernels import gram

    x = np.random.default_rng(8).standard_normal((3, 7, 11) if not pixel_side
                                                 else (3, 11, 7)).astype(dtype)
    expected = np.einsum("cnp,cmp->cnm", x.astype(np.float64), x.astype(np.float64)) \
        if not pixel_side else np.einsum("cnp,cnq->cpq", x.astype(np.float64),
                                         x.astype(np.float64))
    got, spread = gram(x, pixel_side, np.empty(expected.shape))
    assert got.dtype == np.float64 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5 if dtype == np.float32 else 1e-12,
                               atol=1e-5 if dtype == np.float32 else 1e-12)
    eig = np.linalg.eigvalsh(expected)  # participation ratio of the spectrum, over m
    np.testing.assert_allclose(spread, eig.sum(1) ** 2 / (eig ** 2).sum(1) / eig.shape[1],
                               rtol=1e-5 if dtype == np.float32 else 1e-10)


def test_gram_spread_tells_flat_spectra_from_dominated_ones():
    from pcace.reduce.kernels import gram

    rng = np.random.default_rng(3)
    noise = rng.standard_normal((1, 50, 2000))
    planted = noise[:, :, :40] * 0.05 + rng.standard_normal((1, 50, 2))[..., [0, 1] * 20] * 3
    # Marchenko-Pastur with ratio 50/2000: nearly flat
    assert gram(noise, False, np.empty((1, 50, 50)))[1][0] > 0.9
    assert gram(planted, True, np.empty((1, 40, 40)))[1][0] < 0.1  # two dominant directions


def test_gram_refuses_the_larger_side():
    from pcace.reduce.kernels import gram

    with pytest.raises(ValueError, match="smaller"):
        gram(np.zeros((1, 5, 3)), False, np.empty((1, 5, 5)))


# --- the torch (GPU) paths, run here on the CPU against the compiled ones -------------------

def test_torch_standardisation_matches_compiled_kernel():
    from pcace.reduce.pca import CONSTANT_ULPS, _standardise_torch
    from pcace.reduce.standardise import standardise_

    gen = torch.Generator().manual_seed(9)
    block = torch.randn(4, 30, 17, generator=gen) * 2 + 3
    block[2, :, 5] = 1.5
    a, b = block.clone(), block.clone()
    const_torch = _standardise_torch(a)
    const_numba = standardise_(b, CONSTANT_ULPS)
    assert torch.equal(const_torch, const_numba)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("spectrum", ["steep", "flat"])
def test_torch_eigen_path_matches_compiled(spectrum):
    from pcace.reduce.pca import _top_cpu, _top_torch

    gen = torch.Generator().manual_seed(10)
    a = torch.randn(3, 150, 200, generator=gen, dtype=torch.float64)
    if spectrum == "steep":
        a *= torch.logspace(0, -3, 200, dtype=torch.float64)
    g = a @ a.transpose(1, 2)
    v_cpu, u_cpu = _top_cpu(g, 3, False, 1e-12, 10)
    v_t, u_t = _top_torch(g, 3, False, 1e-12, 10)
    torch.testing.assert_close(v_t, v_cpu, rtol=1e-10, atol=0)
    overlap = (u_t * u_cpu).sum(dim=1).abs()
    torch.testing.assert_close(overlap, torch.ones_like(overlap), rtol=0, atol=1e-8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("p", [400, 120])
def test_reduce_block_on_cuda_matches_cpu(p):
    from pcace.reduce.pca import reduce_block

    maps = _maps(200, 3, p, seed=11)
    block = maps.permute(1, 0, 2).contiguous()
    cpu = reduce_block(block.clone(), 3)
    gpu = reduce_block(block.clone().cuda(), 3)
    assert gpu.scores.device.type == "cuda"
    torch.testing.assert_close(gpu.scores.cpu(), cpu.scores, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(gpu.explained_variance.cpu(), cpu.explained_variance)


def test_exact_solver_in_float32_for_float32_grams():
    from pcace.reduce.pca import top_eigenpairs

    gen = torch.Generator().manual_seed(12)
    a = torch.randn(3, 150, 160, generator=gen) * torch.logspace(0, -1, 160)
    g = (a @ a.transpose(1, 2)).double()  # float32 values, held in float64
    w, v = torch.linalg.eigh(g)
    vals, vecs = top_eigenpairs(g, 3, max_rounds=1, exact_dtype=torch.float32)  # all exact
    torch.testing.assert_close(vals, w.flip(-1)[:, :3], rtol=1e-5, atol=0)
    overlap = (vecs * v.flip(-1)[:, :, :3]).sum(dim=1).abs()
    torch.testing.assert_close(overlap, torch.ones_like(overlap), rtol=0, atol=1e-4)


def test_reused_gram_buffer_changes_no_result():
    from pcace.reduce.pca import reduce_block, reusing_buffers

    gen = torch.Generator().manual_seed(12)
    blocks = [torch.randn(c, 40, p, generator=gen) for c, p in [(5, 60), (3, 200), (6, 25)]]
    fresh = [reduce_block(b.clone(), 3) for b in blocks]
    with reusing_buffers():  # the second block needs a larger buffer, the third a smaller
        reused = [reduce_block(b.clone(), 3) for b in blocks]
    for a, b in zip(fresh, reused, strict=True):
        torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=0)
        torch.testing.assert_close(a.explained_variance, b.explained_variance, rtol=0, atol=0)
