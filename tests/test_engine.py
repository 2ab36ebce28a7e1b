"""The engine interface: problems by index, the local engine, and what rank records."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pcace.engines.engine import Engine, LocalEngine, Problems
from pcace.engines.select import resolve_engine
from pcace.maxcorr.scoring import channel_values
from pcace.stats import permutation_null
from pcace.stats.evidence import split_half


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(6, 80, 2))
    y = z[1, :, 0] ** 2 + rng.normal(size=80)
    return z, y, rng


def test_problem_orders_match_direct_calls(data):
    z, y, rng = data
    ys = np.stack([rng.permutation(y) for _ in range(3)])
    live = np.array([0, 2, 5])
    by_channel = Problems(z, ys, live, order="channel")
    assert len(by_channel) == 9
    ch, rows = by_channel.index(0, 9)
    assert ch.tolist() == [0, 0, 0, 2, 2, 2, 5, 5, 5] and rows.tolist() == [0, 1, 2] * 3
    by_row = Problems(z, ys, live, order="row")
    ch, rows = by_row.index(0, 9)
    assert ch.tolist() == [0, 2, 5] * 3 and rows.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    expected = channel_values(z[ch], ys[rows])
    np.testing.assert_array_equal(by_row.solve(0, 9), expected)
    images = np.stack([np.sort(rng.permutation(80)[:40]) for _ in range(3)])
    subset = Problems(z, y[images], live, order="row", images=images)
    np.testing.assert_array_equal(subset.solve(0, 9),
                                  channel_values(z[ch[:, None], images[rows]], y[images][rows]))
    paired = Problems(z, ys, np.array([4, 1, 3]), order="paired")
    np.testing.assert_array_equal(paired.solve(0, 3), channel_values(z[[4, 1, 3]], ys))


def test_problems_refuse_bad_shapes(data):
    z, y, _ = data
    with pytest.raises(ValueError, match="order"):
        Problems(z, y[None], np.arange(2), order="diagonal")
    with pytest.raises(ValueError, match="one score row per channel"):
        Problems(z, y[None], np.arange(2), order="paired")
    with pytest.raises(ValueError, match="images"):
        Problems(z, y[None], np.arange(2), images=np.zeros((2, 3), dtype=int))


def test_values_do_not_depend_on_chunks(data):
    z, y, rng = data
    ys = np.stack([rng.permutation(y) for _ in range(7)])
    problems = Problems(z, ys, np.arange(6))
    engine = LocalEngine()
    whole = engine.values(problems, chunk=10_000, stage="a")
    for chunk in (1, 5, 13):
        np.testing.assert_array_equal(engine.values(problems, chunk=chunk, stage="b"), whole)
    assert set(engine.describe()["stage_seconds"]) == {"a", "b"}


def test_statistics_take_an_engine(data):
    z, y, _ = data
    engine = LocalEngine()
    np.testing.assert_array_equal(permutation_null(z, y, 20, seed=2, engine=engine),
                                  permutation_null(z, y, 20, seed=2, chunk=7))
    a = split_half(z, y, splits=3, engine=engine)
    b = split_half(z, y, splits=3, chunk=5)
    np.testing.assert_array_equal(a["values_a"], b["values_a"])
    assert {"null", "split_half"} <= set(engine.stage_seconds)


def test_resolve_engine():
    engine, owned = resolve_engine("local")
    assert isinstance(engine, LocalEngine) and owned
    mine = LocalEngine()
    assert resolve_engine(mine) == (mine, False)
    with pytest.raises(ValueError, match="engine must be"):
        resolve_engine("dask")
    with pytest.raises(ValueError, match="ray_address"):
        resolve_engine("local", "auto")


class _Counting(LocalEngine):
    calls: int = 0

    def _solve(self, problems, chunk, score, options, progress):
        self.calls += 1
        return super()._solve(problems, chunk, score, options, progress)


def test_rank_runs_every_ace_problem_on_its_engine():
    import pcace
    from pcace.zoo import mnist_cnn

    torch.manual_seed(0)
    model, images = mnist_cnn(), torch.rand(40, 1, 28, 28)
    engine = _Counting()
    res = pcace.rank(model, images, target=3, progress=False, permutations=5, split_half=2,
                     engine=engine)
    plain = pcace.rank(model, images, target=3, progress=False, permutations=5, split_half=2)
    assert engine.calls > 0
    assert set(engine.stage_seconds) == {"observed", "null", "split_half"}
    assert res.manifest["engine"]["name"] == "local"
    pd_cols = ["pcace", "p_value", "pcace_adj"]
    np.testing.assert_array_equal(res.channels[pd_cols].to_numpy(),
                                  plain.channels[pd_cols].to_numpy())
    assert isinstance(engine, Engine)
