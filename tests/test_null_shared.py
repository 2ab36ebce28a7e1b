"""The shared permutation null: one pool for the channels of every layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pcace
from pcace import ace
from pcace.stats.nulls import null_table, shared_null_tables
from pcace.stats.pooled import pooled_summary, shared_null, shared_plan


def test_calibrated_on_independent_channels_of_many_layers():
    """Nothing relates to the score: p <= 0.05 for about 5% of 720 tests over layers of
    different sizes sharing one pool (bounds: 4 standard errors)."""
    rng = np.random.default_rng(21)
    p = []
    for rep in range(10):
        y = rng.normal(size=60)
        layers = {f"l{i}": rng.normal(size=(c, 60, 2)) for i, c in enumerate((8, 16, 24, 24))}
        nulls = shared_null(layers, y, pool=200, min_per_channel=10, seed=rep)
        p += [pooled_summary(ace(z, y).rho, nulls[name]).p_value.to_numpy()
              for name, z in layers.items()]
    p = np.concatenate(p)
    assert p.size == 720
    se = np.sqrt(0.05 * 0.95 / p.size)
    assert 0.05 - 4 * se < np.mean(p <= 0.05) < 0.05 + 4 * se
    assert abs(p.mean() - 0.5) < 4 * np.sqrt(1 / 12 / p.size)


def test_bank_size_and_even_spread():
    """Each group's bank holds max(pool, min_per_channel * largest layer) values, spread
    over the channels of all layers to within one; dead channels get none."""
    groups = {"a": np.array([20] * 5), "b": np.array([20] * 12 + [-1]), "c": np.array([30] * 3)}
    sizes = {"a": 5, "b": 13, "c": 3}
    plan = shared_plan(groups, sizes, pool=100, min_per_channel=20, seed=0)
    g20 = np.concatenate([plan["a"], plan["b"][:12]])
    assert g20.sum() == 20 * 13 and g20.max() - g20.min() <= 1
    assert plan["b"][12] == 0
    assert plan["c"].sum() == 100 and plan["c"].max() - plan["c"].min() <= 1


def test_lone_strong_channel_reaches_bh_in_the_largest_layer():
    """A planted channel in a layer of 40 gets p = 1 / (M + 1) with M = 20 * 40."""
    rng = np.random.default_rng(5)
    y = rng.normal(size=80)
    layers = {"small": rng.normal(size=(6, 80, 1)), "big": rng.normal(size=(40, 80, 1))}
    layers["big"][7, :, 0] = y + 0.2 * rng.normal(size=80)
    obs = {name: ace(z, y).rho for name, z in layers.items()}
    tables, records = shared_null_tables(obs, layers, y, pool=100, seed=2)
    assert sum(r["ace_problems"] for r in records.values()) == 800
    assert records["small"]["pool_size"] == records["big"]["pool_size"] == 800
    big = tables["big"]
    assert big.p_value[7] == pytest.approx(1 / 801)
    assert big.q_value[7] <= 0.05 and (big.q_value.drop(index=7) > 0.05).all()


def test_values_are_ace_against_permutations_of_the_score():
    """Every value in the bank is some channel's ACE against a permutation of y."""
    rng = np.random.default_rng(9)
    y = rng.normal(size=50)
    layers = {"a": rng.normal(size=(2, 50, 1)), "b": rng.normal(size=(3, 50, 1))}
    nulls = shared_null(layers, y, pool=10, min_per_channel=1, seed=4)
    bank = nulls["a"].pool(10)
    assert bank.size == 10 and np.all(np.diff(bank) >= 0)
    np.testing.assert_array_equal(bank, nulls["b"].pool(10))
    # the values are maximal correlations of noise: between 0 and 1, and far from the
    # observed value of a channel that is the score itself
    assert (bank > 0).all() and (bank < 0.9).all()


def test_one_layer_through_null_table():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(5, 70, 2))
    y = z[0, :, 0] + 0.3 * rng.normal(size=70)
    table, record = null_table(ace(z, y).rho, z, y, method="shared", pool=100,
                               min_per_channel=10)
    assert record["null"] == "shared" and record["ace_problems"] == 100
    assert table.q_value[0] <= 0.05 and list(table.channel) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("bad, message", [
    ({}, "layers is empty"),
    ({"a": np.zeros((2, 30, 1)), "b": np.zeros((2, 40, 1))}, "same images"),
])
def test_bad_input_named(bad, message):
    with pytest.raises(ValueError, match=message):
        shared_null(bad, np.arange(30.0))


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3), torch.nn.ReLU(), torch.nn.Conv2d(6, 10, 3),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(10, 2))


@pytest.mark.filterwarnings("ignore:interrupted")
def test_rank_default_null_is_shared_and_resumes_to_the_same_tables(tmp_path):
    """The default run's null is one for all layers; a run stopped after its first layer
    and resumed from the checkpoints gives the uninterrupted run's tables."""
    x = torch.randn(80, 3, 10, 10, generator=torch.Generator().manual_seed(1))
    full = pcace.rank(_model(), x, target=0, split_half=0, progress=False)
    records = full.manifest["nulls"]
    assert full.manifest["null"] == "shared"
    assert {r["0"]["shared_by"] for r in records.values()} == {2}
    assert sum(r["0"]["ace_problems"] for r in records.values()) == 1000

    def stop_after_first_layer() -> None:
        if any(tmp_path.rglob("*.npz")):       # the first layer's checkpoint is saved
            raise KeyboardInterrupt

    part = pcace.rank(_model(), x, target=0, split_half=0, progress=False,
                      checkpoint_dir=tmp_path, on_step=stop_after_first_layer)
    assert not part.manifest["complete"] and len(part.manifest["layers_done"]) == 1
    again = pcace.rank(_model(), x, target=0, split_half=0, progress=False,
                       checkpoint_dir=tmp_path, resume=True)
    assert again.manifest["resumed_layers"]
    pd_cols = ["layer", "channel", "pcace", "p_value", "q_value", "pcace_adj"]
    np.testing.assert_allclose(again.channels[pd_cols[2:]].to_numpy(float),
                               full.channels[pd_cols[2:]].to_numpy(float))
