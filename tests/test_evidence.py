"""Tests of pcace.stats.evidence: split-half reproducibility and the per-layer verdict.

Truth comes from the simulations themselves: channels whose relation to the score is
planted (known order), pure-noise channels (true agreement 0), and fresh independent
samples from the same generating process (the agreement a second draw of images gives).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from pcace.stats.evidence import (
    EVIDENCE,
    layer_evidence,
    significant,
    spearman_brown,
    split_half,
    split_half_table,
)


def graded_layer(n: int, c: int = 12, seed: int = 0, noise: float = 1.0):
    """Channel j's first component is score + noise of sd 0.3 * 1.35^j: a known order."""
    rng = np.random.default_rng(seed)
    y = rng.normal(size=n)
    z = rng.normal(size=(c, n, 3))
    z[:, :, 0] = y + noise * 0.3 * 1.35 ** np.arange(c)[:, None] * rng.normal(size=(c, n))
    return z, y


def noise_layer(n: int, c: int = 20, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(c, n, 3)), rng.normal(size=n)


# ------------------------------------------------------------------------- split half

def test_planted_order_is_reproducible():
    z, y = graded_layer(300)
    s = split_half(z, y, splits=5, seed=3)
    assert s["reading"] == "reproducible"
    assert s["spearman"] > 0.9 and s["spearman_low"] > 0.7
    assert s["spearman_low"] <= s["spearman"] <= s["spearman_high"]
    # the halves' values follow the planted order: channel 0 best in every half
    assert (s["values_a"].argmax(1) == 0).all() and (s["values_b"].argmax(1) == 0).all()
    assert s["top_overlap"] > s["top_chance"]


def test_pure_noise_is_not_reproducible_and_interval_covers_zero():
    covered, readings, means = 0, [], []
    for seed in range(12):
        z, y = noise_layer(120, seed=seed)
        s = split_half(z, y, splits=4, seed=seed, level=0.9)
        covered += s["spearman_low"] <= 0.0 <= s["spearman_high"]
        readings.append(s["reading"])
        means.append(s["spearman_half"])
    # nominal 90%: 12 of 12 expected near 11; fewer than 9 would mean a badly narrow interval
    assert covered >= 9
    assert readings.count("not reproducible") >= 10
    assert abs(np.mean(means)) < 0.15


def test_one_planted_channel_among_noise_is_found_by_the_top_set():
    rng = np.random.default_rng(5)
    n = 300
    y = rng.normal(size=n)
    z = rng.normal(size=(30, n, 3))
    z[7, :, 1] = np.sin(2 * y) + 0.2 * rng.normal(size=n)  # non-monotone, second component
    s = split_half(z, y, splits=4, seed=0, top=1)
    assert s["top_size"] == 1
    assert s["top_overlap"] == 1.0
    assert (s["values_a"].argmax(1) == 7).all()


def test_projection_matches_agreement_of_two_fresh_samples():
    """Spearman-Brown projected split-half agreement vs two independent samples of N."""
    from scipy.stats import spearmanr

    from pcace import ace

    n, reps = 200, 6
    direct, projected, raw = [], [], []
    for rep in range(reps):
        # a layer whose channels differ little, so that N = 200 ranks them imperfectly
        z1, y1 = graded_layer(n, c=16, seed=100 + rep, noise=2.5)
        z2, y2 = graded_layer(n, c=16, seed=200 + rep, noise=2.5)
        v1 = np.clip(ace(z1, y1).rho, 0, 1)
        v2 = np.clip(ace(z2, y2).rho, 0, 1)
        direct.append(spearmanr(v1, v2).statistic)
        s = split_half(z1, y1, splits=6, seed=rep)
        projected.append(s["spearman"])
        raw.append(s["spearman_half"])
    d, p, r = np.mean(direct), np.mean(projected), np.mean(raw)
    assert 0.3 < d < 0.95  # the regime where the projection matters
    assert abs(p - d) < abs(r - d)  # the projection is closer to the truth than the raw halves
    assert abs(p - d) < 0.12


def test_dead_channels_score_zero_and_do_not_break():
    z, y = graded_layer(200, c=8)
    z[[2, 5]] = 0.0
    s = split_half(z, y, splits=3)
    assert s["live_channels"] == 6
    assert (s["values_a"][:, [2, 5]] == 0).all() and (s["values_b"][:, [2, 5]] == 0).all()
    assert math.isfinite(s["spearman"])


def test_all_dead_and_single_channel_give_nan_not_errors():
    rng = np.random.default_rng(0)
    y = rng.normal(size=60)
    dead = split_half(np.zeros((6, 60, 3)), y, splits=2)
    assert math.isnan(dead["spearman"]) and dead["reading"] == "unknown"
    one = split_half(rng.normal(size=(1, 60, 3)), y, splits=2)
    assert math.isnan(one["spearman"]) and math.isnan(one["top_overlap"])
    assert one["top_size"] == 0 and one["reading"] == "unknown"
    few = split_half(rng.normal(size=(4, 60, 3)), y, splits=2)  # spearman, no interval
    assert math.isfinite(few["spearman"]) and math.isnan(few["spearman_low"])


def test_tiny_n_and_bad_input():
    rng = np.random.default_rng(0)
    z, y = rng.normal(size=(5, 20, 2)), rng.normal(size=20)
    assert split_half(z, y, splits=1)["half_size"] == 10
    with pytest.raises(ValueError, match="at least 20 images"):
        split_half(z[:, :19], y[:19])
    with pytest.raises(ValueError, match="constant"):
        split_half(z, np.ones(20))
    with pytest.raises(ValueError, match=r"shape \(C, N, k\)"):
        split_half(z[0], y)
    with pytest.raises(ValueError, match="scores must have shape"):
        split_half(z, y[:-1])
    bad = z.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        split_half(bad, y)
    with pytest.raises(ValueError, match="splits"):
        split_half(z, y, splits=0)


def test_halves_are_disjoint_and_scores_constant_on_a_half_are_redrawn():
    # scores take two values, one of them on only 2 images: many halves see one value only
    rng = np.random.default_rng(1)
    y = np.zeros(40)
    y[[3, 30]] = 1.0
    z = rng.normal(size=(4, 40, 2))
    s = split_half(z, y, splits=5, seed=2)
    assert s["values_a"].shape == (5, 4)


def test_deterministic_and_torch_input_agrees_with_numpy():
    z, y = graded_layer(120, c=8, seed=4)
    a = split_half(z, y, splits=3, seed=9)
    b = split_half(torch.as_tensor(z), torch.as_tensor(y), splits=3, seed=9)
    np.testing.assert_allclose(a["values_a"], b["values_a"], rtol=0, atol=1e-12)
    assert a["spearman"] == b["spearman"] and a["spearman_low"] == b["spearman_low"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_components_agree_with_cpu():
    z, y = graded_layer(200, c=8, seed=4)
    a = split_half(z, y, splits=2, seed=1)
    b = split_half(torch.as_tensor(z, device="cuda"), y, splits=2, seed=1)
    np.testing.assert_allclose(a["values_a"], b["values_a"], atol=1e-6)


def test_spearman_brown_formula():
    # two halves correlating r: full-length reliability 2r/(1+r) (Brown 1910, Spearman 1910)
    assert spearman_brown(1 / 3) == pytest.approx(0.5)
    assert spearman_brown(1.0) == 1.0 and spearman_brown(0.0) == 0.0
    assert spearman_brown(-0.3) == -0.3
    np.testing.assert_allclose(spearman_brown(np.array([0.6, np.nan])), [0.75, np.nan])


def test_split_half_table_one_row_per_layer():
    za, y = graded_layer(100, c=6, seed=1)
    zb, _ = noise_layer(100, c=7, seed=2)
    t = split_half_table({"good": za, "noise": zb}, y, splits=2)
    assert list(t.layer) == ["good", "noise"]
    for col in ("split_half_spearman", "split_half_spearman_low", "split_half_spearman_high",
                "split_half_top10", "n_images"):
        assert col in t.columns
    assert (t.n_images == 100).all()
    assert t.split_half_spearman[0] > t.split_half_spearman[1]


# ---------------------------------------------------------------------------- verdict

def test_significant_flags():
    np.testing.assert_array_equal(significant([0.0, 0.05, 0.051, np.nan], 0.05),
                                  [True, True, False, False])
    np.testing.assert_array_equal(significant([0.09], alpha=0.1), [True])
    with pytest.raises(ValueError):
        significant([0.1], alpha=1.5)


def _channels(layer_q: dict[str, list[float]]) -> pd.DataFrame:
    rows = [{"layer": name, "channel": i, "pcace": 0.5, "q_value": q, "pcace_adj": 0.1 * i}
            for name, qs in layer_q.items() for i, q in enumerate(qs)]
    return pd.DataFrame(rows)


def _split(rows: dict[str, tuple[float, float, float]], n: int = 300) -> pd.DataFrame:
    return pd.DataFrame([{"layer": k, "split_half_spearman": r, "split_half_spearman_low": lo,
                          "split_half_spearman_high": hi, "split_half_top10": 0.5,
                          "n_images": n} for k, (r, lo, hi) in rows.items()])


def test_verdict_rules():
    ch = _channels({
        "noise": [0.4, 0.9, 1.0, 0.7],            # nothing significant
        "strong": [0.01, 0.02, 0.04, 0.3],        # 75% significant
        "unordered": [0.01, 0.01, 0.01, 0.01],    # all significant, order is noise
        "few": [0.01, 0.5, 0.6, 0.7],             # 25% significant, reproducible
        "orderedbias": [0.5, 0.6, 0.7, 0.8],      # reproducible order, nothing significant
        "wide": [0.01, 0.02, 0.03, 0.5],          # high point estimate, interval too wide
    })
    sp = _split({"noise": (0.05, -0.5, 0.5), "strong": (0.92, 0.8, 0.97),
                 "unordered": (0.2, -0.3, 0.6), "few": (0.9, 0.7, 0.95),
                 "orderedbias": (0.9, 0.6, 0.95), "wide": (0.85, 0.3, 0.95)})
    v = layer_evidence(ch, sp).set_index("layer")
    assert v.loc["noise", "evidence"] == "none"
    assert "no channel beats chance" in v.loc["noise", "evidence_text"]
    assert "N = 300" in v.loc["noise", "evidence_text"]
    assert v.loc["strong", "evidence"] == "strong"
    assert v.loc["unordered", "evidence"] == "weak"
    assert "not reproducible" in v.loc["unordered", "evidence_text"]
    assert v.loc["few", "evidence"] == "weak"
    assert v.loc["orderedbias", "evidence"] == "weak"
    assert v.loc["wide", "evidence"] == "weak"
    assert v.loc["strong", "significant_share"] == 0.75
    assert v.loc["noise", "significant_share"] == 0.0
    assert v.loc["strong", "median_adj"] == pytest.approx(0.15)
    assert set(v.evidence) <= set(EVIDENCE)


def test_verdict_columns_and_order():
    ch = _channels({"b": [0.5, 0.5], "a": [0.01, 0.01]})
    v = layer_evidence(ch, _split({"a": (0.9, 0.8, 1.0), "b": (0.0, -0.5, 0.5)}))
    assert list(v.columns) == ["layer", "channels", "significant_share", "median_adj",
                               "split_half_spearman", "split_half_spearman_low",
                               "split_half_spearman_high", "split_half_top10", "evidence",
                               "evidence_text"]
    assert list(v.layer) == ["b", "a"]  # the channels table's order, not alphabetical


def test_verdict_with_missing_pieces():
    no_null = pd.DataFrame({"layer": ["a", "a", "b", "b"], "pcace": [0.3, 0.2, 0.9, 0.1]})
    sp = _split({"a": (0.1, -0.4, 0.5), "b": (0.95, 0.9, 0.99)})
    v = layer_evidence(no_null, sp).set_index("layer")
    assert v.loc["a", "evidence"] == "none"
    assert v.loc["b", "evidence"] == "weak"  # one check alone never gives "strong"
    assert math.isnan(v.loc["b", "significant_share"]) and math.isnan(v.loc["b", "median_adj"])
    only_null = layer_evidence(_channels({"a": [0.5, 0.6], "b": [0.01, 0.01]})).set_index("layer")
    assert only_null.loc["a", "evidence"] == "none"
    assert only_null.loc["b", "evidence"] == "weak"
    assert math.isnan(only_null.loc["b", "split_half_spearman"])
    nothing = layer_evidence(pd.DataFrame({"pcace": [0.1, 0.2]}))
    assert nothing.evidence.tolist() == ["none"] and nothing.layer.tolist() == [""]


def test_verdict_end_to_end_on_planted_and_noise_layers():
    """Permutation null + split half on a planted layer and a noise layer (N = 300)."""
    from pcace import ace
    from pcace.stats import null_summary, permutation_null

    zg, y = graded_layer(300, c=12, seed=7)
    zn = np.random.default_rng(8).normal(size=(12, 300, 3))
    tables = []
    for name, z in (("planted", zg), ("noise", zn)):
        t = null_summary(np.clip(ace(z, y).rho, 0, 1), permutation_null(z, y, 99, seed=1))
        t.insert(0, "layer", name)
        tables.append(t)
    sp = split_half_table({"planted": zg, "noise": zn}, y, splits=4, seed=2)
    v = layer_evidence(pd.concat(tables), sp).set_index("layer")
    assert v.loc["planted", "evidence"] == "strong"
    # channels 0-8 have true correlations >= 0.29; 10 and 11 (0.16, 0.12) may drown at N = 300
    assert v.loc["planted", "significant_share"] >= 9 / 12
    assert v.loc["noise", "evidence"] == "none"


def test_summary_does_not_report_an_unrun_check_as_failed():
    """Without a split-half check, layers with no evidence are not called "not
    reproducible" (the old summary line said so whatever was measured); a null too small
    to reach q <= 0.05 says so."""
    import torch

    import pcace
    from pcace.cli.printout import text_summary
    from pcace.zoo import mnist_cnn

    torch.manual_seed(0)
    res = pcace.rank(mnist_cnn(), torch.rand(60, 1, 28, 28), 3, progress=False,
                     permutations=9, null="exact", split_half=0, seed=0)
    assert (res.layers.evidence == "none").all()  # 1/10 > 0.05: nothing can pass
    text = text_summary(res)
    assert "No evidence in" in text
    assert "not reproducible" not in text
    assert "9 permutations give p-values no smaller than 1/10" in text
