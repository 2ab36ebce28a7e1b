"""Tests of pcace.stats: permutation nulls, q-values, pcace_adj and bootstrap
intervals."""

import numpy as np
import pytest
import torch
from scipy import stats as sps

from pcace import ace
from pcace.stats import (
    adjusted_value,
    benjamini_hochberg,
    bootstrap_summary,
    bootstrap_values,
    interval_scheme,
    layer_stability,
    null_summary,
    permutation_null,
    share_significant,
)


def _observed(z, y):
    return np.clip(ace(z, y).rho, 0.0, 1.0)


def _std(v):
    return (v - v.mean()) / v.std()


# ------------------------------------------------------------------- permutation null

def test_null_shape_dead_channels_and_shared_permutations():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(4, 40, 2))
    z[1] = 0.0  # dead
    z[3] = z[2]  # identical channels must see identical permutations
    y = rng.normal(size=40)
    null = permutation_null(z, y, permutations=15, seed=3)
    assert null.shape == (4, 15)
    assert np.all(null[1] == 0.0)
    np.testing.assert_array_equal(null[2], null[3])
    assert np.all((null >= 0) & (null <= 1))
    # deterministic in the seed, independent of chunking and of tensor input
    again = permutation_null(torch.as_tensor(z), y, permutations=15, seed=3, chunk=7)
    np.testing.assert_array_equal(null, again)
    other = permutation_null(z, y, permutations=15, seed=4)
    assert not np.array_equal(null[0], other[0])


def test_null_matches_direct_ace_on_permuted_scores():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(2, 30, 3))
    y = rng.normal(size=30)
    null = permutation_null(z, y, permutations=5, seed=11)
    perms = np.random.default_rng(11).permuted(np.tile(np.arange(30), (5, 1)), axis=1)
    for b in range(5):
        np.testing.assert_allclose(null[:, b], _observed(z, y[perms[b]]), atol=1e-12)


@pytest.mark.parametrize("score", ["maximal", "first-component"])
def test_null_scores_like_rank(score):
    """Shared permutations (twin channels get one null); with k = 1 both scores coincide."""
    rng = np.random.default_rng(0)
    one = rng.normal(size=(2, 40, 1))
    z = np.concatenate([one[:1], one[:1], one[1:]])
    y = rng.normal(size=40)
    null = permutation_null(z, y, 8, seed=5, score=score)
    np.testing.assert_array_equal(null[0], null[1])
    assert not np.array_equal(null[0], null[2])
    other = "first-component" if score == "maximal" else "maximal"
    # one component: sum_j phi_j is phi_1, so |corr(phi_1, theta)| is ACE's rho
    np.testing.assert_allclose(null, permutation_null(z, y, 8, seed=5, score=other),
                               atol=1e-10)
    # and a null value is ACE's on a permutation of the score: never the unpermuted fit
    # for every draw (8 draws of 40! orderings)
    observed = min(max(float(ace(z[2], y).rho), 0.0), 1.0)
    assert not np.allclose(null[2], observed)


@pytest.mark.parametrize("kwargs, match", [
    ({"permutations": 0}, "permutations"),
    ({"chunk": 0}, "chunk"),
    ({"seed": 1.5}, "seed"),
    ({"score": "pearson"}, "score"),
])
def test_null_bad_arguments(kwargs, match):
    z = np.zeros((2, 20, 1))
    z[:, :, 0] = np.arange(20)
    with pytest.raises(ValueError, match=match):
        permutation_null(z, np.arange(20.0), **kwargs)


def test_null_bad_shapes():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"\(C, N, k\)"):
        permutation_null(rng.normal(size=(20, 3)), rng.normal(size=20))
    with pytest.raises(ValueError, match="one per image"):
        permutation_null(rng.normal(size=(2, 20, 3)), rng.normal(size=21))
    with pytest.raises(ValueError, match="constant"):
        permutation_null(rng.normal(size=(2, 20, 3)), np.ones(20))
    with pytest.raises(ValueError, match="at least 10"):
        permutation_null(rng.normal(size=(2, 5, 3)), rng.normal(size=5))


def test_p_values_are_uniform_under_independence():
    """Calibration: a score independent of the components gives uniform p-values."""
    rng = np.random.default_rng(2024)
    c, n, k, b = 300, 120, 3, 99
    z = rng.normal(size=(c, n, k))
    y = rng.normal(size=n)
    obs = _observed(z, y)
    table = null_summary(obs, permutation_null(z, y, permutations=b, seed=7))
    p = table.p_value.to_numpy()
    below = float(np.mean(p <= 0.05))
    assert 0.01 <= below <= 0.10, below
    assert sps.kstest(p, "uniform").pvalue > 0.001
    # the adjusted value is centred near 0 for noise, the raw one is not
    assert abs(table.pcace_adj.mean()) < 0.05
    assert abs(table.pcace_adj_linear.mean()) < 0.03
    assert table.pcace.mean() > 0.25
    # with no signal BH finds (almost) nothing
    assert share_significant(table.q_value, 0.05) <= 0.01


def test_planted_channels_are_significant_after_bh():
    rng = np.random.default_rng(5)
    c, n, k = 30, 150, 3
    z = rng.normal(size=(c, n, k))
    y = (_std(z[0, :, 0] ** 2) + _std(np.abs(z[1, :, 0])) + _std(np.cos(2 * z[2, :, 0]))
         + 0.3 * rng.normal(size=n))
    obs = _observed(z, y)
    table = null_summary(obs, permutation_null(z, y, permutations=399, seed=0))
    assert (table.p_value[:3] < 0.01).all()
    assert (table.q_value[:3] <= 0.05).all()
    assert set(table.nlargest(3, "pcace_adj").channel) == {0, 1, 2}
    assert share_significant(table.q_value) < 0.2


def test_bh_matches_scipy():
    rng = np.random.default_rng(3)
    p = np.concatenate([rng.uniform(size=40), rng.uniform(0, 0.01, size=10),
                        [0.02, 0.02, 0.02, 1.0, 1.0]])
    rng.shuffle(p)
    np.testing.assert_allclose(benjamini_hochberg(p),
                               sps.false_discovery_control(p, method="bh"), atol=1e-12)
    # and through null_summary, on permutation p-values with many ties
    obs = rng.uniform(size=25)
    null = rng.uniform(size=(25, 19))
    table = null_summary(obs, null)
    np.testing.assert_allclose(table.q_value,
                               sps.false_discovery_control(table.p_value, method="bh"))


def test_null_summary_definitions():
    null = np.array([[0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 0.0, 0.0]])
    table = null_summary([0.3, 0.0], null, channels=[5, 6])
    assert table.channel.tolist() == [5, 6]
    assert table.p_value.tolist() == [3 / 5, 1.0]  # ties count against the channel
    assert table.null_mean[0] == pytest.approx(0.25)
    a = (0.09 - np.mean(null[0] ** 2)) / (1 - np.mean(null[0] ** 2))
    assert table.pcace_adj[0] == pytest.approx(np.sign(a) * np.sqrt(abs(a)))
    assert table.pcace_adj_linear[0] == pytest.approx((0.3 - 0.25) / 0.75)
    assert table.pcace_adj[1] == 0.0  # dead channel
    assert adjusted_value([1.0], [[0.5, 0.7]])[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"\(C, B\)"):
        null_summary([0.1, 0.2], np.zeros((3, 4)))
    with pytest.raises(ValueError, match="one id per channel"):
        null_summary([0.1, 0.2], np.zeros((2, 4)), channels=[1])
    with pytest.raises(ValueError, match="alpha"):
        share_significant([0.1], alpha=0)


def test_adjusted_value_comparable_across_n_and_k():
    """A planted channel keeps its adjusted value as N and k change; noise stays at 0.

    The raw value of noise channels moves with the bias (about 0.16 at N = 300,
    k = 1 and 0.5 at N = 100, k = 5); the adjusted value does not.
    """
    rng = np.random.default_rng(8)
    rho_true, noise_channels, sets, b = 0.6, 12, 4, 49
    planted, noise_adj, noise_raw = {}, {}, {}
    for n in (100, 300):
        for k in (1, 3, 5):
            p_vals, a_vals, r_vals = [], [], []
            for _ in range(sets):
                z = rng.normal(size=(noise_channels + 1, n, k))
                x = z[0, :, 0]
                y = (x ** 2 - 1) + np.sqrt(2 / rho_true ** 2 - 2) * rng.normal(size=n)
                obs = _observed(z, y)
                table = null_summary(obs, permutation_null(z, y, permutations=b,
                                                           seed=int(rng.integers(1 << 30))))
                p_vals.append(table.pcace_adj[0])
                a_vals.extend(table.pcace_adj[1:])
                r_vals.extend(table.pcace[1:])
            planted[n, k] = np.mean(p_vals)
            noise_adj[n, k] = np.mean(a_vals)
            noise_raw[n, k] = np.mean(r_vals)
    raw_spread = max(noise_raw.values()) - min(noise_raw.values())
    adj_spread = max(noise_adj.values()) - min(noise_adj.values())
    assert raw_spread > 0.25, noise_raw
    assert all(abs(v) < 0.1 for v in noise_adj.values()), noise_adj
    assert adj_spread < raw_spread / 3
    assert all(0.45 < v < 0.9 for v in planted.values()), planted
    assert max(planted.values()) - min(planted.values()) < 0.25, planted


# --------------------------------------------------------------------------- bootstrap

def _planted(rng, n, channels, rho, shape="gauss"):
    """Maps of ``channels`` channels whose maximal correlation with the score is ``rho``.

    Each channel has 12 pixels: its informative variable x1 in eight, an independent
    x2 in three, an independent x3 in one, so that the first three principal
    components are about x1, x2, x3 (k = 3; the large eigenvalue gaps keep the sample
    PCA from mixing them much). The score is shared; per channel, x1 relates to it only
    through u, a standard normal forming a Gaussian pair with the score with
    correlation rho: ``"gauss"``: x1 = u (linear); ``"abs"``: x1 = +-Phi(u) with a
    random sign, uniform on (-1, 1), so u = Phi^-1(|x1|) (non-monotone). The maximal
    correlation of the maps with the score is therefore exactly rho.
    """
    y = rng.normal(size=n)
    u = rho * y[:, None] + np.sqrt(1 - rho * rho) * rng.normal(size=(n, channels))
    if shape == "gauss":
        x1 = u
    else:
        x1 = sps.norm.cdf(u) * rng.choice([-1.0, 1.0], size=u.shape)
    x2, x3 = rng.normal(size=(2, n, channels))
    maps = np.stack([x1] * 8 + [x2] * 3 + [x3], axis=-1)
    return torch.as_tensor(maps), y


def _pcace(maps, y, k=3):
    from pcace.reduce.pca import principal_components

    red = principal_components(maps, k)
    return np.where(red.dead.numpy(), 0.0, _observed(red.scores.numpy(), y))


def _coverage(rho, n, *, channels, draws, boots, seed, shape="gauss", method="half-sample",
              level=0.95):
    """Share of intervals covering the known maximal correlation, and their mean width."""
    rng = np.random.default_rng(seed)
    covered, widths = [], []
    for i in range(draws):
        maps, y = _planted(rng, n, channels, rho, shape)
        obs = _pcace(maps, y)
        boot = bootstrap_values(maps, y, components=3, boots=boots, seed=seed + i,
                                scheme=interval_scheme(method))
        s = bootstrap_summary(obs, boot, level, method=method)
        covered.append((s.ci_low <= rho + 1e-12) & (rho <= s.ci_high + 1e-12))
        widths.append(s.ci_high - s.ci_low)
    return float(np.mean(np.concatenate(covered))), float(np.mean(np.concatenate(widths)))


def test_bootstrap_values_shape_and_determinism():
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(50, 3, 4, 4, generator=g, dtype=torch.float64)
    maps[:, 1] = 2.0  # dead channel
    y = maps[:, 0].flatten(1).mean(1).numpy() ** 2
    for scheme in ("half-sample", "replacement"):
        boot = bootstrap_values(maps, y, components=2, boots=6, seed=1, scheme=scheme)
        assert boot.shape == (3, 6)
        assert np.all(boot[1] == 0.0)
        assert np.all((boot >= 0) & (boot <= 1))
        again = bootstrap_values(maps.float(), y, components=2, boots=6, seed=1, scheme=scheme,
                                 chunk=1)  # one replicate per call
        np.testing.assert_allclose(boot, again, atol=1e-4)
        # the same resample for every channel: identical channels, identical replicates
        twin = torch.cat([maps[:, :1], maps[:, :1]], dim=1)
        tb = bootstrap_values(twin, y, components=2, boots=4, seed=2, scheme=scheme)
        np.testing.assert_array_equal(tb[0], tb[1])
    half = bootstrap_values(maps, y, components=2, boots=6, seed=1)
    assert not np.allclose(half, bootstrap_values(maps, y, components=2, boots=6, seed=1,
                                                  scheme="replacement"))


def test_half_samples_are_distinct_halves():
    """Replicate b is PCACE on N // 2 distinct images: the seed's b-th permutation, cut."""
    from pcace.reduce.pca import principal_components

    rng = np.random.default_rng(4)
    maps, y = _planted(rng, 41, 2, 0.5)
    boot = bootstrap_values(maps, y, components=3, boots=3, seed=9)
    draw = np.random.default_rng(9)
    for b in range(3):
        idx = draw.permutation(41)[:20]
        assert np.unique(idx).size == 20
        red = principal_components(maps[torch.as_tensor(idx)], 3)
        np.testing.assert_allclose(boot[:, b], _observed(red.scores.numpy(), y[idx]), atol=1e-8)


def test_bootstrap_bad_arguments():
    maps = torch.randn(30, 2, 3, 3)
    y = np.random.default_rng(0).normal(size=30)
    with pytest.raises(ValueError, match="boots"):
        bootstrap_values(maps, y, boots=0)
    with pytest.raises(ValueError, match="one per image"):
        bootstrap_values(maps, y[:20])
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        bootstrap_values(maps[:, 0, 0], y)
    with pytest.raises(ValueError, match="scheme must be one of"):
        bootstrap_values(maps, y, scheme="jackknife")
    with pytest.raises(ValueError, match="half-sample bootstrap needs at least 20 images"):
        bootstrap_values(maps[:15], y[:15])
    assert bootstrap_values(maps[:15], y[:15], boots=2, scheme="replacement").shape == (2, 2)
    with pytest.raises(ValueError, match="level"):
        bootstrap_summary([0.1], [[0.1, 0.2]], level=1.5)
    with pytest.raises(ValueError, match="interval method must be one of"):
        bootstrap_summary([0.1], [[0.1, 0.2]], method="bca")
    with pytest.raises(ValueError, match="B >= 2"):
        bootstrap_summary([0.1], [[0.1]])
    with pytest.raises(ValueError, match="interval method"):
        interval_scheme("half")
    assert [interval_scheme(m) for m in ("half-sample", "basic", "percentile")] == [
        "half-sample", "replacement", "replacement"]


@pytest.mark.parametrize("rho", [0.0, 0.6])
def test_half_sample_intervals_cover_a_known_maximal_correlation(rho):
    """95% and 80% intervals cover the true maximal correlation near their nominal rate.

    100 planted channels (k = 3, n = 100) share one score; the truth is known by
    construction. At rho = 0 what matters is that the interval reaches down to 0.
    """
    cover, width = _coverage(rho, 100, channels=100, draws=1, boots=60, seed=1)
    assert 0.88 <= cover, cover
    assert width < 0.7
    cover_80, width_80 = _coverage(rho, 100, channels=100, draws=1, boots=60, seed=1,
                                   level=0.8)
    assert width_80 < width
    if rho > 0:
        assert 0.65 <= cover_80 <= 0.95, cover_80
    # the oracle bites: with-replacement percentile intervals of the same problem do not cover
    bad, _ = _coverage(rho, 100, channels=30, draws=1, boots=40, seed=1, method="percentile")
    assert bad < 0.5, bad


def test_half_sample_intervals_shrink_with_n():
    _, width_100 = _coverage(0.6, 100, channels=30, draws=1, boots=40, seed=3)
    _, width_300 = _coverage(0.6, 300, channels=30, draws=1, boots=40, seed=3)
    assert width_300 < 0.7 * width_100


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["gauss", "abs"])
def test_bootstrap_coverage_table(shape):
    """Coverage of 95% half-sample intervals within 7 points of nominal at n = 100.

    300 planted channels per cell (6 scores x 50), B = 60; about 10 s per case on one
    idle core. The full table (n = 100 and 300, B = 200) is in benchmarks/README.md.
    """
    for rho in (0.3, 0.6, 0.9):
        cover, width = _coverage(rho, 100, channels=50, draws=6, boots=60, seed=int(100 * rho),
                                 shape=shape)
        print(f"half-sample {shape} n=100 rho={rho}: coverage {cover:.3f} width {width:.3f}")
        assert 0.88 <= cover <= 1.0, (rho, cover)
    cover0, _ = _coverage(0.0, 100, channels=50, draws=2, boots=60, seed=7, shape=shape)
    print(f"half-sample {shape} n=100 rho=0: coverage {cover0:.3f}")
    assert cover0 >= 0.9, cover0


def test_bootstrap_summary_ranks_and_intervals():
    boot = np.array([[0.9, 0.8, 0.95, 0.85],
                     [0.5, 0.85, 0.4, 0.9],
                     [0.1, 0.2, 0.1, 0.3]])
    s = bootstrap_summary([0.9, 0.6, 0.2], boot, level=0.5, channels=[10, 11, 12],
                          method="percentile")
    assert s.channel.tolist() == [10, 11, 12]
    assert s["rank"].tolist() == [1, 2, 3]
    np.testing.assert_allclose(s.ci_low, np.quantile(boot, 0.25, axis=1))
    np.testing.assert_allclose(s.ci_high, np.quantile(boot, 0.75, axis=1))
    # channel 11 is first in two of the four replicates, second in the others
    assert s.rank_low.tolist() == [1, 1, 3]
    assert s.rank_high.tolist() == [2, 2, 3]
    basic = bootstrap_summary([0.9, 0.6, 0.2], boot, level=0.5, method="basic")
    np.testing.assert_allclose(basic.ci_low, np.clip(2 * np.array([0.9, 0.6, 0.2])
                                                     - s.ci_high, 0, 1))
    assert (s.bias == s.boot_mean - s.pcace).all()
    # rank intervals do not depend on the value interval's method
    half = bootstrap_summary([0.9, 0.6, 0.2], boot, level=0.5)
    assert half.rank_low.tolist() == s.rank_low.tolist()
    assert half.rank_high.tolist() == s.rank_high.tolist()


def test_half_sample_interval_properties():
    rng = np.random.default_rng(0)
    obs = np.array([0.3, 0.6, 0.9, 0.0])
    spread = 0.03 * rng.normal(size=(4, 200))
    unbiased = obs[:, None] + spread
    unbiased[3] = 0.0  # a dead channel
    s95 = bootstrap_summary(obs, unbiased)
    s80 = bootstrap_summary(obs, unbiased, level=0.8)
    # no excess in the half-samples: the interval is about the value +- 2 sd
    assert ((s95.ci_low < obs) & (obs < s95.ci_high))[:3].all()
    np.testing.assert_allclose((s95.ci_high - s95.ci_low)[:3], 4 * 0.03, rtol=0.2)
    assert s95.ci_low[3] == s95.ci_high[3] == 0.0
    # a lower level gives a nested, narrower interval
    assert ((s95.ci_low <= s80.ci_low) & (s80.ci_high <= s95.ci_high)).all()
    assert ((s80.ci_high - s80.ci_low)[:3] < (s95.ci_high - s95.ci_low)[:3]).all()
    # half-samples that sit higher (more overfitting) move the interval down and widen it
    biased = bootstrap_summary(obs, unbiased + 0.1)
    assert (biased.ci_high[:3] < s95.ci_high[:3]).all()
    assert (biased.ci_high - biased.ci_low)[:3].gt((s95.ci_high - s95.ci_low)[:3]).all()
    # a value at the null level (half-samples well above it) gives an interval from 0
    null_like = bootstrap_summary([0.25], 0.4 + 0.05 * rng.normal(size=(1, 200)))
    assert null_like.ci_low[0] == 0.0 and 0 < null_like.ci_high[0] < 0.25


def test_layer_stability():
    rng = np.random.default_rng(0)
    obs = np.linspace(1.0, 0.0, 30)
    stable = layer_stability(obs, obs[:, None] + 1e-3 * rng.normal(size=(30, 40)), top=10)
    assert stable["spearman_mean"] > 0.99
    assert stable["top"] == list(range(10))
    assert stable["top_retention"] == pytest.approx(1.0, abs=0.05)
    noisy = layer_stability(obs, rng.uniform(size=(30, 200)), top=10,
                            channels=list(range(100, 130)))
    assert abs(noisy["spearman_mean"]) < 0.05
    assert 0.2 < noisy["top_retention"] < 0.47  # chance level is 10/30
    assert set(noisy["top_share"]) == set(range(100, 110))
    assert layer_stability(obs[:3], np.tile(obs[:3, None], (1, 5)), top=10)["top_size"] == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_null_on_cuda_matches_cpu():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(3, 60, 3))
    y = rng.normal(size=60)
    cpu = permutation_null(z, y, permutations=10)
    gpu = permutation_null(torch.as_tensor(z, device="cuda"), y, permutations=10)
    np.testing.assert_allclose(cpu, gpu, atol=1e-6)
