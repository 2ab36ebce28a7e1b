"""Tests of binned ACE (:mod:`pcace.maxcorr.binned`, ``pcace.ace(..., bins=...)``).

Oracles: the exact engine (itself held to R's acepack by tests/test_ace_acepack.py) where
binning changes nothing (one bin per observation), acepack's answers on the shared
fixtures, closed forms (the maximal correlation of a Gaussian pair), and properties that
hold by construction (ties share a value, bins never split ties).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import norm

from pcace import ace
from pcace.maxcorr import binned, binning, kernels
from pcace.maxcorr.ace import ace_shared

# the error binned ACE promises against exact ACE (benchmarks/README.md, "Binned ACE")
TOLERANCE = 0.005


def exact_and_binned(x, y, nbins, cells, x_kind=0, y_kind=0):
    """rho, theta, phi of the exact engine and of the binned one with the given bins."""
    x = np.ascontiguousarray(x[None], dtype=np.float64)
    y = np.ascontiguousarray(y[None], dtype=np.float64)
    codes = np.full(x.shape[2], x_kind, dtype=np.int64)
    exact = kernels.ace_batch(x, y, codes, y_kind, 0.01, 20, 5.0)
    bins = binned.ace_batch(x, y, codes, y_kind, nbins, cells, 0.01, 20, 5.0)
    return exact, bins


# ----------------------------------------------------------------------------------------
# One bin per observation: binning changes nothing
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ordered", "monotone"])
def test_one_bin_per_observation_is_the_exact_engine(kind):
    rng = np.random.default_rng(1)
    n = 400
    x = rng.normal(size=(n, 3))
    y = np.exp(np.sin(2 * x[:, 0]) + 0.5 * x[:, 1] + 0.3 * rng.normal(size=n))
    code = kernels.KIND_CODES[kind]
    exact, bins = exact_and_binned(x, y, n, 0, code, code)
    for a, b in zip(exact[:4], bins[:4], strict=True):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["linear", "categorical"])
def test_linear_and_categorical_variables_are_never_merged(kind):
    # their bins are the groups of equal values at any bin count: the answers are exact
    rng = np.random.default_rng(2)
    n = 600
    x = rng.integers(0, 7, size=(n, 2)).astype(float)
    y = np.round((x[:, 0] - 3) ** 2 + x[:, 1] + rng.normal(size=n), 1)
    code = kernels.KIND_CODES[kind]
    exact, bins = exact_and_binned(x, y, 20, 20, code, code)
    for a, b in zip(exact[:4], bins[:4], strict=True):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-10)


def test_one_bin_per_observation_reproduces_acepack(shared_dir):
    import json

    import pandas as pd

    root = shared_dir / "fixtures" / "acepack"
    answers = pd.read_csv(root / "acepack.csv").set_index("file")
    checked = 0
    for case in json.loads((root / "cases.json").read_text()):
        data = np.loadtxt(root / case["file"], delimiter=",", ndmin=2)
        if len(np.unique(data, axis=0)) < len(data) or any(
                len(np.unique(col)) < len(col) for col in data.T):
            continue  # ties: exact ACE splits tie groups across windows, bins never do
        x, y = np.ascontiguousarray(data[None, :, :-1]), np.ascontiguousarray(data[None, :, -1])
        codes = np.zeros(x.shape[2], dtype=np.int64)
        rho = binned.ace_batch(x, y, codes, 0, len(data), 0, 0.01, 20, 5.0)[0][0]
        assert abs(rho - answers.loc[case["file"], "rho"]) < 1e-6, case
        checked += 1
    assert checked >= 20


# ----------------------------------------------------------------------------------------
# Binned against exact, and against known answers
# ----------------------------------------------------------------------------------------


def gaussian_pair(rng, n, sigma):
    """x_1 uniform, y = exp(Phi^-1(x_1) + sigma e), two noise columns: rho = 1/sqrt(1+s^2)."""
    x = rng.uniform(size=(n, 3))
    y = np.exp(norm.ppf(x[:, 0]) + sigma * rng.normal(size=n))
    return x, y


def test_default_bins_close_to_exact_and_to_the_known_maximal_correlation():
    rng = np.random.default_rng(3)
    n = 6000
    x, y = gaussian_pair(rng, n, 0.5)
    exact, default = ace(x, y, bins=None), ace(x, y)
    assert abs(default.rho - exact.rho) <= TOLERANCE
    assert abs(default.rho - 1 / np.sqrt(1.25)) <= 0.01
    assert np.corrcoef(default.theta, np.log(y))[0, 1] > 0.98  # theta is about the log


@pytest.mark.parametrize("family", ["sine", "heavy_tails", "null", "product"])
def test_binned_close_to_exact_on_problems_of_known_structure(family):
    rng = np.random.default_rng(4)
    n = 6000
    x = rng.normal(size=(n, 3))
    if family == "sine":
        y = np.sin(2 * x[:, 0]) + 0.5 * x[:, 1] ** 2 + 0.5 * rng.normal(size=n)
    elif family == "heavy_tails":
        x = rng.standard_t(2, size=(n, 3))
        y = x[:, 0] + np.abs(x[:, 1]) + rng.standard_t(3, size=n)
    elif family == "null":
        y = rng.normal(size=n)
    else:
        y = x[:, 0] * x[:, 1] + 0.5 * rng.normal(size=n)
    exact, binned_600 = ace(x, y, bins=None), ace(x, y, bins=600)
    assert abs(binned_600.rho - exact.rho) <= TOLERANCE


def test_small_n_is_unchanged_bit_for_bit():
    rng = np.random.default_rng(5)
    n = binning.AUTO_MIN_N - 1
    x, y = rng.normal(size=(n, 2)), rng.normal(size=n)
    y += np.sin(x[:, 0])
    default, exact = ace(x, y), ace(x, y, bins=None)
    assert default.rho == exact.rho
    np.testing.assert_array_equal(default.phi, exact.phi)
    np.testing.assert_array_equal(default.theta, exact.theta)


def test_auto_bins_from_the_stated_n():
    assert binning.resolve_bins("auto", binning.AUTO_MIN_N - 1) is None
    assert binning.resolve_bins("auto", binning.AUTO_MIN_N) == binning.AUTO_BINS


# ----------------------------------------------------------------------------------------
# Ties
# ----------------------------------------------------------------------------------------


def test_tied_values_share_their_transformed_value():
    rng = np.random.default_rng(6)
    n = 3000
    x = rng.normal(size=(n, 2))
    x[: n // 3, 0] = 0.0                      # a large tied block (a ReLU's zeros)
    x[:, 1] = np.round(x[:, 1], 1)            # many small tied groups
    y = np.round(np.maximum(x[:, 0], 0) + x[:, 1] ** 2 + rng.normal(size=n), 1)
    r = ace(x, y, bins=100)
    for values, transformed in ((x[:, 0], r.phi[:, 0]), (x[:, 1], r.phi[:, 1]),
                                (y, r.theta)):
        for v in np.unique(values):
            group = transformed[values == v]
            assert group.max() == group.min()


def test_bins_never_split_tied_values_and_isolate_sparse_tails():
    rng = np.random.default_rng(7)
    xs = np.sort(np.concatenate([np.round(rng.normal(size=5000), 2), [40.0, 80.0]]))
    edges = binning.bin_edges(xs, 100, 100, True)
    assert edges[0] == 0 and edges[-1] == xs.size
    assert np.all(np.diff(edges) > 0) and edges.size - 1 <= 200
    inner = edges[1:-1]
    assert np.all(xs[inner] > xs[inner - 1])  # each edge starts a new value
    counts = np.diff(edges)
    assert counts[:-2].max() <= 3 * xs.size / 100  # the bulk: about equal counts
    assert counts[-1] == 1 and counts[-2] == 1  # the two outliers: bins of their own


def test_one_bin_per_value_without_merging():
    xs = np.array([0.0, 0, 1, 2, 2, 2, 5])
    assert binning.bin_edges(xs, 3, 3, False).tolist() == [0, 2, 3, 6, 7]


def test_monotone_kind_stays_monotone_when_binned():
    rng = np.random.default_rng(8)
    n = 4000
    x = rng.normal(size=(n, 2))
    y = np.exp(x[:, 0]) + np.sin(3 * x[:, 1]) + 0.3 * rng.normal(size=n)
    r = ace(x, y, x_kind=["monotone", "ordered"], y_kind="monotone", bins=200)
    phi0 = r.phi[np.argsort(x[:, 0]), 0]
    theta = r.theta[np.argsort(y)]
    assert np.all(np.diff(phi0) >= -1e-12) or np.all(np.diff(phi0) <= 1e-12)
    assert np.all(np.diff(theta) >= -1e-12) or np.all(np.diff(theta) <= 1e-12)


# ----------------------------------------------------------------------------------------
# The option, through every entry point
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, message", [("fast", "'auto', None or an int"),
                                          (5, "at least 20"),
                                          (True, "'auto', None or an int"),
                                          (100.0, "'auto', None or an int")])
def test_bad_bins_are_rejected_with_the_fix(bad, message):
    rng = np.random.default_rng(9)
    x, y = rng.normal(size=(500, 2)), rng.normal(size=500)
    with pytest.raises(ValueError, match=message):
        ace(x, y, bins=bad)
    with pytest.raises(ValueError, match=message):
        ace_shared(x[None], y[None], np.array([0]), np.array([0]), bins=bad)


def test_explicit_bins_need_the_compiled_engine():
    x, y = torch.randn(500, 2, dtype=torch.float64), torch.randn(500, dtype=torch.float64)
    with pytest.raises(ValueError, match="compiled engine"):
        ace(x, y, bins=100)
    assert ace(x, y, bins="auto").rho == ace(x, y, bins=None).rho


def test_ace_shared_binned_equals_ace_binned_on_the_gathered_problems():
    rng = np.random.default_rng(10)
    n = 2000
    z = rng.normal(size=(2, n, 2))
    y = np.sin(z[0, :, 0]) + rng.normal(size=n)
    ys = np.stack([y, y[rng.permutation(n)], y[rng.permutation(n)]])
    channels, rows = np.repeat([0, 1], 3), np.tile([0, 1, 2], 2)
    rho, _ = ace_shared(z, ys, channels, rows, bins=150)
    np.testing.assert_array_equal(rho, ace(z[channels], ys[rows], bins=150).rho)
    assert not np.array_equal(rho, ace_shared(z, ys, channels, rows, bins=None)[0])


def test_problems_pass_bins_to_the_solver():
    from pcace.engines.engine import Problems

    rng = np.random.default_rng(11)
    n = 1500
    z = rng.normal(size=(2, n, 2))
    ys = np.stack([np.cos(z[1, :, 1]) + rng.normal(size=n), rng.normal(size=n)])
    problems = Problems(z, ys, np.arange(2), order="channel")
    values = problems.solve(0, 4, ace_options={"bins": 100})
    expected = np.clip(ace(z[[0, 0, 1, 1]], ys[[0, 1, 0, 1]], bins=100).rho, 0, 1)
    np.testing.assert_array_equal(values, expected)


def test_a_response_spanning_sixteen_orders_of_magnitude_keeps_its_precision():
    # acepack's answer (tests/fixtures/binned/README.md); the same in both directions
    from pathlib import Path

    data = np.loadtxt(Path(__file__).parent / "fixtures" / "binned" / "wide_range.csv",
                      delimiter=",")
    codes = np.zeros(2, dtype=np.int64)
    for sign in (1.0, -1.0):
        x = np.ascontiguousarray(sign * data[None, :, :2])
        y = np.ascontiguousarray(sign * data[None, :, 2])
        rho = binned.ace_batch(x, y, codes, 0, len(data), 0, 0.01, 20, 5.0)[0][0]
        assert abs(rho - 0.9722067146) < 1e-6
