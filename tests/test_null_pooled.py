"""The pooled permutation null: calibration on independent data, power, pools, columns."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pcace import ace
from pcace.engines.engine import LocalEngine
from pcace.stats.null import null_summary
from pcace.stats.pooled import PooledNull, pool_plan, pooled_null, pooled_summary


def test_calibrated_on_independent_channels():
    """No channel relates to the score: p <= 0.05 for about 5% of 600 tests, p <= 0.2 for
    about 20%; the bounds are loose (4 standard errors) but a biased pool fails them."""
    rng = np.random.default_rng(11)
    p = []
    for layer in range(50):
        z = rng.normal(size=(12, 60, 2))
        y = rng.normal(size=60)
        null = pooled_null(z, y, pool=240, min_per_channel=20, seed=layer)
        p.append(pooled_summary(ace(z, y).rho, null).p_value.to_numpy())
    p = np.concatenate(p)
    assert 0.05 - 4 * 0.0089 < np.mean(p <= 0.05) < 0.05 + 4 * 0.0089
    assert 0.20 - 4 * 0.0163 < np.mean(p <= 0.20) < 0.20 + 4 * 0.0163
    assert abs(p.mean() - 0.5) < 4 * 0.0118


def test_planted_channel_found_and_lone_discovery_resolved():
    """A lone strong channel of 40 gets p = 1 / (M + 1) with M >= 20 C, so q <= 0.05."""
    rng = np.random.default_rng(2)
    z = rng.normal(size=(40, 80, 1))
    y = np.sin(2 * z[7, :, 0]) + 0.2 * rng.normal(size=80)
    null = pooled_null(z, y, pool=100, min_per_channel=20, seed=3)
    assert null.problems == 800
    t = pooled_summary(ace(z, y).rho, null)
    assert t.p_value[7] == pytest.approx(1 / 801)
    assert t.q_value[7] <= 0.05
    assert (t.q_value.drop(index=7) > 0.05).all()


def test_p_value_is_the_pooled_count():
    """p = (1 + #{pool >= observed}) / (M + 1) over every channel's values of the pool."""
    values = np.array([[0.1, 0.2, np.nan], [0.3, 0.4, np.nan], [0.5, 0.6, 0.7]])
    null = PooledNull(values, np.array([2, 2, 1]))
    t = pooled_summary([0.25, 0.05, 0.65], null)
    assert t.p_value.tolist() == pytest.approx([3 / 5, 5 / 5, 2 / 4])
    assert t.null_mean.tolist() == pytest.approx([0.25, 0.25, 0.6])
    mean_sq = np.mean([0.01, 0.04, 0.09, 0.16])
    a = (0.25**2 - mean_sq) / (1 - mean_sq)            # below the null: negative
    assert t.pcace_adj[0] == pytest.approx(-np.sqrt(-a))


def test_pools_follow_nonzero_components_and_dead_channels_are_skipped():
    rng = np.random.default_rng(4)
    z = rng.normal(size=(5, 50, 3))
    z[3, :, 2] = 0        # two components: a pool of its own
    z[4] = 0              # dead
    null = pooled_null(z, rng.normal(size=50), pool=60, min_per_channel=5, seed=0)
    assert null.groups.tolist() == [30, 30, 30, 20, -1]
    assert np.isfinite(null.values).sum(axis=1).tolist() == [20, 20, 20, 60, 0]
    assert null.problems == 120
    t = pooled_summary(np.r_[ace(z[:4], rng.normal(size=50)).rho, 0.0], null)
    assert t.p_value[4] == 1.0 and t.null_mean[4] == 0.0 and t.pcace_adj[4] == 0.0


def test_pool_plan_small_pools_get_more_permutations():
    groups = np.array([0] * 64 + [1] * 10 + [-1])
    per = pool_plan(groups, pool=1000, min_per_channel=20)
    assert per[:64].tolist() == [20] * 64 and per[64:74].tolist() == [100] * 10 and per[-1] == 0


def test_same_columns_as_the_exact_summary_and_chunk_does_not_matter():
    rng = np.random.default_rng(5)
    z = rng.normal(size=(6, 40, 2))
    y = rng.normal(size=40)
    a = pooled_null(z, y, pool=60, min_per_channel=4, seed=9)
    b = pooled_null(z, y, pool=60, min_per_channel=4, seed=9, chunk=7, engine=LocalEngine())
    np.testing.assert_array_equal(a.values, b.values)
    obs = ace(z, y).rho
    exact = null_summary(obs, np.zeros((6, 5)) + 0.1)
    assert list(pooled_summary(obs, a).columns) == list(exact.columns)
    assert isinstance(pooled_summary(obs, a, channels=range(10, 16)), pd.DataFrame)


def test_values_are_ace_against_permutations_of_the_score():
    """Every value is some channel's maximal correlation with a permuted score: a
    perfectly related channel's null is far below its observed value."""
    rng = np.random.default_rng(6)
    y = rng.normal(size=100)
    z = np.stack([np.c_[y ** 3], rng.normal(size=(100, 1))])
    null = pooled_null(z, y, pool=40, min_per_channel=20, seed=1)
    assert ace(z, y).rho[0] > 0.99
    assert np.nanmax(null.values) < 0.6


@pytest.mark.parametrize("bad, message", [
    (dict(pool=0), "pool"), (dict(min_per_channel=0), "min_per_channel"),
    (dict(z=np.zeros((2, 5, 1))), "at least 10"), (dict(z=np.zeros((2, 30))), "shape"),
])
def test_bad_input_named(bad, message):
    args = dict(z=np.ones((2, 30, 1)), scores=np.arange(30.0), pool=10)
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        pooled_null(**args)


def test_summary_checks_its_inputs():
    null = PooledNull(np.zeros((2, 3)), np.array([1, 1]))
    with pytest.raises(ValueError, match="one value per channel"):
        pooled_summary([0.1, 0.2, 0.3], null)
    with pytest.raises(TypeError, match="PooledNull"):
        pooled_summary([0.1, 0.2], np.zeros((2, 3)))


def test_null_table_runs_either_method_with_the_same_columns():
    from pcace.stats.nulls import null_table

    rng = np.random.default_rng(8)
    z = rng.normal(size=(5, 50, 2))
    z[4] = 0
    y = z[0, :, 0] + 0.5 * rng.normal(size=50)
    obs = np.r_[ace(z[:4], y).rho, 0.0]
    pooled, rec = null_table(obs, z, y, pool=120, min_per_channel=10, seed=1)
    exact, rec_exact = null_table(obs, z, y, method="exact", permutations=120, seed=1)
    assert list(pooled.columns) == list(exact.columns)
    assert rec["null"] == "pooled" and rec["ace_problems"] == 120 and rec["pool_size"] == 120
    assert 0 <= rec["heterogeneity_p"] <= 1
    assert rec_exact == {"null": "exact", "ace_problems": 480, "permutations": 120}
    assert pooled.q_value[0] <= 0.05 and exact.q_value[0] <= 0.05
    assert pooled.p_value[4] == 1.0 and exact.p_value[4] == 1.0
    with pytest.raises(ValueError, match="method must be one of 'shared', 'pooled', 'exact'"):
        null_table(obs, z, y, method="fast")


def test_channels_silent_on_many_images_get_their_own_pool():
    """Ties make ACE fit less: channels silent on half the images have a smaller null
    and are pooled apart from continuous ones (whose p-values they would otherwise make
    too small)."""
    from pcace.stats.pooled import channel_groups, tie_fraction

    rng = np.random.default_rng(9)
    z = rng.normal(size=(6, 120, 2))
    z[3:, :60] = 0.0                                   # silent on the first 60 images
    np.testing.assert_allclose(tie_fraction(z), [0.0] * 3 + [59 / 120] * 3)
    assert channel_groups(z).tolist() == [20] * 3 + [22] * 3
    null = pooled_null(z, rng.normal(size=120), pool=300, min_per_channel=10, seed=2)
    assert np.median(null.pool(22)) < np.median(null.pool(20))
