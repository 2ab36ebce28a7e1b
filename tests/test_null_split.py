"""The adaptive split-half check: as many splits as the interval of their average needs."""

from __future__ import annotations

import numpy as np
import pytest

from pcace.stats.evidence import split_half, split_half_table


def graded(n: int, c: int, seed: int, strength: float) -> tuple[np.ndarray, np.ndarray]:
    """Channel j's first component is score / (strength * 1.3^j) plus noise: a known order."""
    rng = np.random.default_rng(seed)
    y = rng.normal(size=n)
    z = rng.normal(size=(c, n, 2))
    z[:, :, 0] += y / (strength * 1.3 ** np.arange(c))[:, None]
    return z, y


def test_clear_case_stops_after_the_first_splits():
    z, y = graded(300, 12, 0, 0.2)
    s = split_half(z, y, splits=10, seed=1, width=0.05)
    assert s["splits"] == 4 and s["reading"] == "reproducible"
    assert s["values_a"].shape == (4, 12)


def test_borderline_case_runs_every_split():
    """Noise channels: the halves' agreement varies from split to split, so the
    interval of its average stays wide and all splits run."""
    rng = np.random.default_rng(3)
    z, y = rng.normal(size=(12, 80, 2)), rng.normal(size=80)
    s = split_half(z, y, splits=8, seed=2, width=0.05)
    assert s["splits"] == 8
    full = split_half(z, y, splits=8, seed=2)
    for key in ("spearman", "spearman_low", "spearman_high", "top_overlap"):
        assert s[key] == full[key]


def test_adaptive_runs_the_first_splits_of_the_full_run():
    z, y = graded(200, 10, 4, 0.6)
    short = split_half(z, y, splits=10, seed=5, width=0.5)
    full = split_half(z, y, splits=10, seed=5)
    s = short["splits"]
    assert 4 <= s < 10
    np.testing.assert_array_equal(short["values_a"], full["values_a"][:s])
    np.testing.assert_array_equal(short["values_b"], full["values_b"][:s])


def test_width_gives_the_mean_to_within_width():
    """Stopping rule against its promise: the stopped average is within about the
    width of the average of many splits (here 0.1 wide, checked within 0.05)."""
    z, y = graded(300, 16, 6, 0.3)
    stop = split_half(z, y, splits=30, seed=7, width=0.1)
    many = split_half(z, y, splits=30, seed=7)
    assert stop["splits"] < 30
    assert abs(stop["spearman"] - many["spearman"]) < 0.05


def test_table_reports_the_splits_run():
    z, y = graded(300, 12, 0, 0.2)
    rng = np.random.default_rng(1)
    t = split_half_table({"clear": z, "noise": rng.normal(size=(12, 300, 2))}, y, splits=6,
                         seed=1, width=0.05)
    assert t.split_half_splits.tolist() == [4, 6]


@pytest.mark.parametrize("bad, message", [(dict(width=0), "width"),
                                          (dict(width=0.1, min_splits=1), "min_splits")])
def test_bad_width_named(bad, message):
    z, y = graded(60, 6, 0, 1.0)
    with pytest.raises(ValueError, match=message):
        split_half(z, y, splits=4, **bad)


def test_settled_stops_a_plainly_unreproducible_ranking_early():
    """Noise channels: with ``settled`` the check stops once the interval's upper end is
    below 0.5 (no number of splits could read the ranking as reproducible); without it,
    every split runs, and both read "not reproducible" from the same first splits."""
    rng = np.random.default_rng(8)
    z, y = rng.normal(size=(60, 200, 2)), rng.normal(size=200)
    quick = split_half(z, y, splits=10, seed=3, width=0.05, settled=True)
    full = split_half(z, y, splits=10, seed=3, width=0.05)
    assert quick["splits"] == 4 and full["splits"] == 10
    assert quick["reading"] == full["reading"] == "not reproducible"
    np.testing.assert_array_equal(quick["values_a"], full["values_a"][:4])


def test_settled_does_not_stop_a_reproducible_ranking_early():
    z, y = graded(300, 16, 6, 0.3)
    with_rule = split_half(z, y, splits=12, seed=7, width=0.01, settled=True)
    without = split_half(z, y, splits=12, seed=7, width=0.01)
    assert with_rule["splits"] == without["splits"] == 12


def test_resampled_spearman_equals_ranking_each_resample():
    """The counting shortcut of the channel bootstrap against scipy's spearmanr on every
    resample drawn out, with tied values (dead channels at 0, a repeated value)."""
    from scipy.stats import spearmanr

    from pcace.stats.halves import _resampled_spearman

    rng = np.random.default_rng(4)
    c = 40
    va = rng.normal(size=(3, c))
    vb = va + rng.normal(size=(3, c))
    va[:, :4] = 0.0
    vb[:, 2:7] = 0.0
    va[1, 10:13] = 0.25
    pick = rng.integers(0, c, size=(60, c))
    pick[0] = 0  # one channel only: constant, NaN
    got = _resampled_spearman(va, vb, pick)
    for r in range(pick.shape[0]):
        for s in range(3):
            a, b = va[s, pick[r]], vb[s, pick[r]]
            if np.ptp(a) == 0 or np.ptp(b) == 0:
                assert np.isnan(got[r, s])
            else:
                assert got[r, s] == pytest.approx(spearmanr(a, b)[0], abs=1e-12)
