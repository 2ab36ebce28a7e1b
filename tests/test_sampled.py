"""Tests of pcace.reduce.sampled: the one-pass sampled-basis reduce.

Oracles: reduce_block on all maps (the exact route) where the sample is all images, and
NumPy float64 eigendecompositions of the maps standardised over all images otherwise.
"""

import warnings

import numpy as np
import pytest
import torch

from pcace.reduce import sampled
from pcace.reduce.pca import reduce_block
from pcace.reduce.sampled import (
    SampleBasis,
    SampledBasisWarning,
    rayleigh_ritz,
    sample_axes,
    sample_indices,
    sample_size,
)
from pcace.reduce.standardise import NonFiniteMaps


def _maps(n, c, p, seed=0, spectrum=(6.0, 3.0, 1.5, 0.8, 0.4, 0.2), noise=0.1):
    """float32 ``(n, c, p)`` maps with a well separated spectrum, offset from 0."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.tensor(spectrum, dtype=torch.float64)
    base = torch.randn(n, c, len(spectrum), generator=gen, dtype=torch.float64) * scale
    mix = torch.linalg.qr(torch.randn(c, p, len(spectrum), generator=gen,
                                      dtype=torch.float64))[0].transpose(1, 2)
    pixel_scale = 0.5 + torch.rand(c, 1, p, generator=gen, dtype=torch.float64)
    maps = torch.einsum("nck,ckp->ncp", base, mix * pixel_scale) * 10
    maps += noise * torch.randn(n, c, p, generator=gen, dtype=torch.float64)
    return (maps + 3.0).float()


def _run(maps, sample, components=3, batch=64, order=None, store_dtype=torch.float16,
         residuals=True, **kwargs):
    basis = SampleBasis.from_maps(sample, components, **kwargs)
    run = basis.start_pass(maps.shape[0], store_dtype=store_dtype, residuals=residuals)
    starts = list(range(0, maps.shape[0], batch))
    for i in (starts if order is None else [starts[j] for j in order(len(starts))]):
        run.add(maps[i:i + batch], i)
    return run.finish(warn=False)


def _exact(maps, components=3):
    return reduce_block(maps.permute(1, 0, 2).contiguous(), components)


def _standardised(x):
    """NumPy float64: columns standardised over the images, constant ones 0."""
    x = np.asarray(x, dtype=np.float64)
    std = x.std(axis=0)
    const = np.ptp(x, axis=0) == 0
    return np.where(const, 0.0, (x - x.mean(axis=0)) / np.where(const, 1.0, std)), const


def _assert_scores(ours, ref, rtol):
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    scale = np.abs(ref).max(axis=0)
    np.testing.assert_array_less(np.abs(ours - ref).max(axis=0), rtol * scale + 1e-12)


@pytest.mark.parametrize("solver", ["exact", "randomized", "randomized-bfloat16"])
@pytest.mark.parametrize("n, p, store, tol", [
    (120, 200, torch.float32, 1e-5), (300, 40, torch.float32, 1e-5),
    (300, 40, torch.float16, 2e-3)], ids=["P>N", "P<N", "P<N-float16"])
def test_whole_sample_equals_exact_route(n, p, store, tol, solver, monkeypatch):
    """The whole set as the sample: the exact route's scores. With the range finder's
    power iterations in bfloat16 the scores are as close; only the self-check's ratio
    moves, by the square of the subspace's rounding (about 1e-5)."""
    low = solver.endswith("bfloat16")
    monkeypatch.setattr(sampled, "RANGE_PRECISION", "bfloat16" if low else "float32")
    solver = solver.removesuffix("-bfloat16")
    maps = _maps(n, 4, p)
    maps[:, 1, 7] = 2.5  # a constant pixel
    maps[:, 3] = -1.0  # a dead channel
    shuffled = maps[torch.randperm(n, generator=torch.Generator().manual_seed(1))]
    red, check = _run(maps, shuffled, order=lambda k: list(reversed(range(k))),
                      store_dtype=store, solver=solver)
    ref = _exact(maps)
    assert red.n_components.tolist() == ref.n_components.tolist() == [3, 3, 3, 0]
    assert red.dead.tolist() == ref.dead.tolist() == [False, False, False, True]
    for c in range(3):
        _assert_scores(red.scores[c], ref.scores[c], tol)
    assert not red.scores[3].any()
    torch.testing.assert_close(red.explained_variance, ref.explained_variance,
                               atol=tol / 10, rtol=0)
    assert not check.poor.any()
    torch.testing.assert_close(check.ratio[:3], torch.ones(3, dtype=torch.float64),
                               atol=max(tol, 1e-4) if low else tol, rtol=0)
    assert float(check.angle[:3].max()) < 10 * tol and float(check.angle[3]) == 0.0


def test_whole_sample_fraction_k_equals_exact_route():
    maps = _maps(150, 3, 60, spectrum=(6.0, 2.0, 1.0, 0.5, 0.25))
    red, _ = _run(maps, maps, components=0.9, max_components=4, store_dtype=torch.float32)
    ref = _exact(maps, 0.9)
    assert red.n_components.tolist() == ref.n_components.tolist()
    assert red.scores.shape == ref.scores.shape
    for c in range(3):
        _assert_scores(red.scores[c], ref.scores[c], 1e-5)


def test_sample_repeated_equals_exact_route():
    """All images are the sample three times over: same moments, so the exact answer."""
    sample = _maps(80, 2, 50)
    maps = torch.cat([sample, sample.flip(0), sample])
    red, check = _run(maps, sample, batch=50, store_dtype=torch.float32)
    ref = _exact(maps)
    for c in range(2):
        _assert_scores(red.scores[c], ref.scores[c], 1e-5)
    assert check.sample_size == 80 and not check.poor.any()


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("m, p", [(400, 900), (900, 400)], ids=["P>m", "P<m"])
def test_randomized_axes_against_numpy(m, p, precision):
    """A known, decaying spectrum: the randomized range finder's top axes and values are
    NumPy's (float64 eigh of X^T X) to well within the sample's own noise, with its power
    iterations in float32 or in bfloat16 (the axes then come from float32 X all the
    same)."""
    gen = torch.Generator().manual_seed(3)
    c, width = 3, 13
    spectrum = torch.logspace(1, -1.5, 40, dtype=torch.float64)
    left = torch.linalg.qr(torch.randn(c, m, 40, generator=gen, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(c, p, 40, generator=gen, dtype=torch.float64))[0]
    x = (left * spectrum) @ right.transpose(1, 2)
    x = (x + 1e-3 * torch.randn(c, m, p, generator=gen, dtype=torch.float64)).float()
    vals, axes = sample_axes(x, width, solver="randomized", precision=precision)
    assert vals.shape == (c, width) and axes.shape == (c, p, width)
    for ch in range(c):
        xd = x[ch].double().numpy()
        ref_vals, ref_vecs = np.linalg.eigh(xd.T @ xd)
        ref_vals, ref_vecs = ref_vals[::-1][:width], ref_vecs[:, ::-1][:, :width]
        np.testing.assert_allclose(vals[ch].numpy(), ref_vals, rtol=1e-4)
        # each axis, up to sign; the subspace of the top 3 to 1e-6
        cos = np.abs(np.sum(axes[ch].numpy() * ref_vecs, axis=0))
        np.testing.assert_array_less(1 - cos, 1e-3)
        top = np.linalg.svd(axes[ch, :, :3].numpy().T @ ref_vecs[:, :3], compute_uv=False)
        assert 1 - top.min() < 1e-6
    same = sample_axes(x, width, solver="randomized", precision=precision)
    assert torch.equal(same[1], axes)  # deterministic for the seed
    with pytest.raises(ValueError, match="solver must be"):
        sample_axes(x, width, solver="lanczos")
    with pytest.raises(ValueError, match="precision must be"):
        sample_axes(x, width, precision="float16")


def test_rayleigh_ritz_against_numpy():
    rng = np.random.default_rng(0)
    p, width = 30, 6
    a = rng.standard_normal((p, p))
    s = a @ a.T
    u = rng.standard_normal((p, width)) * rng.uniform(0.2, 3.0, size=width)
    theta, rot = rayleigh_ritz(torch.from_numpy(u.T @ s @ u)[None],
                               torch.from_numpy(u.T @ u)[None])
    q = np.linalg.qr(u)[0]
    expected = np.linalg.eigvalsh(q.T @ s @ q)[::-1]
    np.testing.assert_allclose(theta[0].numpy(), expected, rtol=1e-10)
    axes = u @ rot[0].numpy()  # the Ritz vectors: orthonormal, S-orthogonal
    np.testing.assert_allclose(axes.T @ axes, np.eye(width), atol=1e-10)
    np.testing.assert_allclose(axes.T @ s @ axes, np.diag(expected), atol=1e-8)


def test_rayleigh_ritz_recovers_known_spectrum():
    """A subspace holding the top 3 eigenvectors (mixed, scaled) gives them exactly."""
    rng = np.random.default_rng(1)
    p = 40
    vecs = np.linalg.qr(rng.standard_normal((p, p)))[0]
    lam = np.geomspace(50.0, 0.01, p)
    s = (vecs * lam) @ vecs.T
    u = np.hstack([vecs[:, :3], rng.standard_normal((p, 3))]) @ rng.standard_normal((6, 6))
    u = np.hstack([u[:, :4], np.zeros((p, 1)), u[:, 4:]])  # an axis the subspace lacks
    theta, rot = rayleigh_ritz(torch.from_numpy(u.T @ s @ u)[None],
                               torch.from_numpy(u.T @ u)[None])
    np.testing.assert_allclose(theta[0, :3].numpy(), lam[:3], rtol=1e-9)
    assert float(theta[0, -1]) == 0.0 and not rot[0, :, -1].any()
    found = u @ rot[0, :, :3].numpy()
    np.testing.assert_allclose(np.abs(found.T @ vecs[:, :3]), np.eye(3), atol=1e-8)


def test_ritz_is_best_within_the_subspace_over_all_images():
    """m < N: scores and explained variance equal NumPy's best-k in the same subspace."""
    maps = _maps(400, 2, 30, noise=2.0)
    maps[:200, :, :5] *= 3.0  # pixel scales differ between sample and all images
    idx = sample_indices(400, 60, seed=3)
    basis = SampleBasis.from_maps(maps[idx], 3, extra=3)
    run = basis.start_pass(400, store_dtype=torch.float32)
    run.add(maps, 0)
    red, check = run.finish(warn=False)
    for c in range(2):
        z, _ = _standardised(maps[:, c])
        r = np.asarray(maps[:, c], np.float64).std(axis=0)
        u = (r * basis.inv_std[c].numpy())[:, None] * basis.axes[c].numpy()
        q = np.linalg.qr(u)[0]
        w, v = np.linalg.eigh(q.T @ (z.T @ z / 400) @ q)
        ref = z @ q @ v[:, ::-1][:, :3]
        ref *= np.sign(ref[np.abs(ref).argmax(axis=0), range(3)])
        _assert_scores(red.scores[c], ref, 1e-4)
        assert float(red.explained_variance[c]) == pytest.approx(w[::-1][:3].sum() / 30,
                                                                 rel=1e-5)
        best = np.linalg.eigvalsh(z.T @ z / 400)[::-1][:3].sum() / 30
        assert float(red.explained_variance[c]) <= best + 1e-9
    assert torch.all(check.explained == red.explained_variance)


def test_angle_estimate_against_numpy():
    """The residual-over-gap angle, from the pass's sums, against NumPy on the same maps."""
    maps = _maps(400, 2, 40, noise=1.0)
    basis = SampleBasis.from_maps(maps[:80], 3, extra=3)
    run = basis.start_pass(400, residuals=True)
    for i in range(0, 400, 128):
        run.add(maps[i:i + 128], i)
    _, check = run.finish(warn=False)
    for c in range(2):
        x = maps[:, c].double().numpy()
        z, _ = _standardised(x)
        s = z.T @ z / 400
        u = (x.std(axis=0) * basis.inv_std[c].numpy())[:, None] * basis.axes[c].numpy()
        q = np.linalg.qr(u)[0]
        theta, a = np.linalg.eigh(q.T @ s @ q)
        theta, ritz = theta[::-1], (q @ a)[:, ::-1]
        resid = np.linalg.norm(s @ ritz[:, :3] - ritz[:, :3] * theta[:3], axis=0)
        expected = np.sqrt(((resid / (theta[:3] - theta[3])) ** 2).sum())
        assert float(check.angle[c]) == pytest.approx(expected, rel=1e-3)
        cosines = np.linalg.svd(ritz[:, :3].T @ np.linalg.eigh(s)[1][:, ::-1][:, :3],
                                compute_uv=False)
        assert np.arcsin(np.sqrt(1 - cosines.min() ** 2)) < float(check.angle[c])


def test_pixel_constant_in_sample_only():
    """A pixel constant over the sample but varying over all images: honest, no NaN."""
    maps = _maps(300, 2, 25)
    maps[:, 0, 3] = 1.0
    maps[250:, 0, 3] += torch.linspace(0.0, 5.0, 50)
    red, check = _run(maps, maps[:100])
    assert torch.isfinite(red.scores).all()
    assert check.unseen.tolist() == [1, 0]
    z, _ = _standardised(maps[:, 0])
    total = (z ** 2).sum() / 300  # 25 varying pixels
    held = sum(float((red.scores[0, :, j].double() ** 2).mean()) for j in range(3))
    assert float(red.explained_variance[0]) == pytest.approx(held / total, rel=1e-4)


def test_self_check_warns_on_a_poor_sample():
    """The sample (the first images) shows a shared factor that the rest of the images lack."""
    gen = torch.Generator().manual_seed(5)
    n = 500
    maps = _maps(n, 2, 40)
    maps[:100, 0, 10:30] += 40 * torch.randn(100, 1, generator=gen)  # the sample's story
    maps[100:, 0, 10:30] += 40 * torch.randn(400, 20, generator=gen)  # everyone else's
    basis = SampleBasis.from_maps(maps[:100], 3, extra=2)
    run = basis.start_pass(n)
    run.add(maps, 0)
    with pytest.warns(SampledBasisWarning, match=r"layer L: .*channel\(s\) \[0\]"):
        red, check = run.finish(layer="L")
    assert check.poor.tolist() == [True, False]
    assert float(check.ratio[0]) < 0.7 and float(check.ratio[1]) > 0.95
    assert check.summary()["poor_channels"] == [0]
    # the check's numbers are what they say: the scores' variance over all images
    held = (red.scores[0].double() ** 2).mean(dim=0).sum() / 40
    assert float(check.explained[0]) == pytest.approx(float(held), rel=1e-4)
    # and the held-out estimate is near the share on the images outside the sample
    for c in range(2):
        z, _ = _standardised(maps[:, c])
        out = red.scores[c, 100:].double().numpy()
        share = out.var(axis=0).sum() / z[100:].var(axis=0).sum()
        assert float(check.ratio[c]) == pytest.approx(share / float(check.sample_explained[c]),
                                                      abs=0.03)


def test_no_warning_on_a_fair_sample():
    maps = _maps(600, 3, 64)
    basis = SampleBasis.from_maps(maps[sample_indices(600, 150)], 3)
    run = basis.start_pass(600)
    run.add(maps, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, check = run.finish(layer="L")
    assert not check.poor.any() and check.message() is None


def test_channel_constant_in_sample_only():
    maps = _maps(200, 2, 20)
    maps[:100, 1] = 4.0
    red, check = _run(maps, maps[:100])
    assert red.n_components.tolist() == [3, 0] and not red.dead.any()
    assert not red.scores[1].any()
    assert check.poor.tolist() == [False, True]


def test_torch_path_equals_compiled_path():
    maps = _maps(200, 3, 49).reshape(200, 3, 7, 7)
    basis = SampleBasis.from_maps(maps[::3], 3, extra=5)
    runs = [basis.start_pass(200, residuals=True), basis.start_pass(200, residuals=True)]
    for i in range(0, 200, 64):
        runs[0].add(maps[i:i + 64], i)
        runs[1]._add_torch(maps[i:i + 64].flatten(2), slice(i, i + 64))
        runs[1]._seen[i:i + 64] = True
    torch.testing.assert_close(runs[0].projections.float(), runs[1].projections.float(),
                               rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(runs[0]._sums, runs[1]._sums, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(runs[0]._squares, runs[1]._squares, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(runs[0]._cross, runs[1]._cross, rtol=1e-4, atol=1e-2)
    assert torch.equal(runs[0]._lo, runs[1]._lo) and torch.equal(runs[0]._hi, runs[1]._hi)
    a, b = runs[0].finish(warn=False)[0], runs[1].finish(warn=False)[0]
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-3)


@pytest.mark.parametrize("store, tol", [(torch.float32, 1e-5), (torch.float16, 1e-3)])
def test_project_matches_the_pass(store, tol):
    maps = _maps(100, 2, 30)
    basis = SampleBasis.from_maps(maps[:40], 2)
    run = basis.start_pass(100, store_dtype=store)
    run.add(maps, 0)
    assert run.projections.dtype == store
    kept = run.projections.float() * run.scale[:, None, :]
    torch.testing.assert_close(basis.project(maps), kept, rtol=tol, atol=tol)
    half = 100 * 2 * basis.width * (2 if store == torch.float16 else 4)
    assert run.nbytes == half + 24 * 2 * 30 + 100
    assert run.nbytes == run.bytes_needed(2, 30, 100, basis.width, half // (200 * basis.width))
    red, check = run.finish(warn=False)
    assert check.angle is None and "angle_max" not in check.summary()


def test_float16_overflow_is_refused():
    maps = _maps(100, 1, 30)
    run = SampleBasis.from_maps(maps[:40], 2).start_pass(100)
    with pytest.raises(ValueError, match="overflows float16"):
        run.add(maps[40:] * 1e6, 40)


def test_bad_input_is_refused():
    maps = _maps(50, 2, 16)
    basis = SampleBasis.from_maps(maps[:20], 2)
    run = basis.start_pass(50)
    run.add(maps[:30], 0)
    with pytest.raises(ValueError, match="image 10 was added to this pass before"):
        run.add(maps[10:20], 10)
    with pytest.raises(ValueError, match="fall outside"):
        run.add(maps[:30], 30)
    with pytest.raises(ValueError, match="3 channels of 16 pixels"):
        run.add(torch.zeros(5, 3, 16), 30)
    with pytest.raises(ValueError, match="20 of the pass's 50 images were never added"):
        run.finish()
    with pytest.raises(ValueError, match="at least 2 images"):
        SampleBasis.from_maps(maps[:1])
    with pytest.raises(ValueError, match="extra"):
        SampleBasis.from_maps(maps, extra=-1)
    bad = maps.clone()
    bad[3, 1, 2] = float("nan")
    run = basis.start_pass(50)
    run.add(bad, 0)
    with pytest.raises(NonFiniteMaps) as err:
        run.finish()
    assert err.value.channels == [1]


def test_basis_from_moments_equals_basis_from_maps():
    from pcace.reduce.streaming import PixelMoments

    maps = _maps(300, 3, 30)
    maps[:, 2, 4] = 7.0  # a constant pixel
    sample = maps[sample_indices(300, 90)]
    moments = PixelMoments(3, 30)
    for part in sample.split(32):
        moments.update(part)
    results = []
    for basis in (SampleBasis.from_moments(moments, 3), SampleBasis.from_maps(sample, 3)):
        assert basis.width == 13 and basis.count == 90
        run = basis.start_pass(300, store_dtype=torch.float32)
        run.add(maps, 0)
        results.append(run.finish(warn=False))
    (a, check_a), (b, check_b) = results
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-3 * float(b.scores.abs().max()))
    torch.testing.assert_close(check_a.ratio, check_b.ratio, rtol=1e-5, atol=0)
    assert a.n_components.tolist() == b.n_components.tolist()


def test_sample_indices():
    idx = sample_indices(1000, 100, seed=7)
    assert idx.numel() == 100 and idx.unique().numel() == 100
    assert torch.equal(idx, idx.sort().values) and int(idx.max()) < 1000
    assert torch.equal(idx, sample_indices(1000, 100, seed=7))
    assert sample_indices(5, 10).tolist() == [0, 1, 2, 3, 4]
    assert [sample_size(n) for n in (10, 2000, 20_000, 50_000)] == [10, 2000, 2000, 5000]
    with pytest.raises(ValueError, match="n_images"):
        sample_size(0)


@pytest.mark.parametrize("residuals", [False, True])
def test_add_sample_equals_adding_its_maps(residuals):
    """The sample added from its standardised block gives the pass what adding its maps
    gives: the same statistics, projections, scores and check (a constant pixel, a mean
    far from 0 whose float32 rounding the shift carries)."""
    maps = _maps(300, 3, 40) + 1000.0
    maps[:, 1, 5] = 7.25
    sample = maps[:120]
    twice = []
    for from_block in (False, True):
        block = sample.transpose(0, 1).contiguous()
        basis = SampleBasis.from_block(block, 3)
        run = basis.start_pass(300, store_dtype=torch.float32, residuals=residuals)
        if from_block:
            run.add_sample(block)
        else:
            run.add(sample, 0)
        run.add(maps[120:], 120)
        stats = [t.clone() for t in (run._sums, run._squares, run._lo, run._hi, run._cross)]
        twice.append((stats, run.projections.clone(), *run.finish(warn=False)))
    (s0, p0, r0, c0), (s1, p1, r1, c1) = twice
    for a, b in zip(s0, s1, strict=True):
        if a.numel():
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6 * float(a.abs().max()))
    torch.testing.assert_close(p1, p0, rtol=0, atol=2e-6 * float(p0.abs().max()))
    for c in range(3):
        _assert_scores(r1.scores[c], r0.scores[c], 1e-5)
    torch.testing.assert_close(c1.ratio, c0.ratio, rtol=0, atol=1e-6)
    if residuals:
        torch.testing.assert_close(c1.angle, c0.angle, rtol=1e-3, atol=1e-7)


def test_add_sample_needs_the_sample_and_its_block():
    maps = _maps(100, 2, 30)
    block = maps[:50].transpose(0, 1).contiguous()
    run = SampleBasis.from_block(block, 2).start_pass(100)
    with pytest.raises(ValueError, match="contiguous"):
        run.add_sample(block[:, :40])
    run.add_sample(block)
    with pytest.raises(ValueError, match="added to this pass before"):
        run.add_sample(block)
    from pcace.reduce.streaming import PixelMoments

    moments = SampleBasis.from_moments(PixelMoments(2, 30).update(maps[:50]), 2)
    with pytest.raises(ValueError, match="from the sample's maps"):
        moments.start_pass(100).add_sample(block)


def test_projection_moments_and_rotation_against_numpy():
    """The finish's moments of the kept projections (float16, a mean 300 standard
    deviations from 0, more rows than one chunk) and its rotation, against NumPy in float64."""
    from pcace.reduce import sampled_pass

    gen = torch.Generator().manual_seed(5)
    n = sampled_pass.ROWS + 1234
    y = (300.0 + torch.randn(2, n, 4, generator=gen)).to(torch.float16)
    scale = torch.tensor([[0.5, 2.0, 1.0, 3.0], [1.0, 1.0, 0.25, 4.0]])
    mean, cov = sampled_pass._moments(y, scale)
    turn = torch.randn(2, 4, 3, generator=gen, dtype=torch.float64)
    out = sampled_pass._rotate(y, scale, mean, turn)
    for c in range(2):
        rows = y[c].double().numpy() * scale[c].double().numpy()
        np.testing.assert_allclose(mean[c].numpy(), rows.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(cov[c].numpy(), np.cov(rows.T, bias=True), rtol=1e-9)
        ref = (rows - rows.mean(axis=0)) @ turn[c].numpy()
        np.testing.assert_allclose(out[c].numpy(), ref, rtol=0,
                                   atol=1e-5 * np.abs(ref).max())


def test_sample_standardisation_the_same_both_ways():
    """The compiled standardisation (CPU) and the torch one (other devices; run here on the
    CPU) give the same statistics and the same standardised block, constant pixels too."""
    from pcace.reduce.sampled import _standardise_sample_

    block = _maps(90, 3, 20).transpose(0, 1).contiguous()
    block[1, :, 4] = 2.5
    block[2, :, 7] = 0.0
    out = []
    for compiled in (True, False):
        x = block.clone()
        out.append((x, *_standardise_sample_(x, compiled=compiled)))
    (x0, m0, i0, c0, s0), (x1, m1, i1, c1, s1) = out
    assert c0.tolist() == c1.tolist() and bool(c0[1, 4]) and bool(c0[2, 7])
    torch.testing.assert_close(x1, x0, rtol=1e-5, atol=1e-5)
    for a, b in zip((m0, i0, *s0), (m1, i1, *s1), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)
    ref = _standardised(block[0].numpy())[0]
    np.testing.assert_allclose(x0[0].numpy(), ref, rtol=1e-5, atol=1e-5)
