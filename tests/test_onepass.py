"""The sampled basis inside pcace.rank (issue 24): one pass, the images' own order, the
exact route one option away, the self-check."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

import pcace
from pcace.reduce.sampled import SampledBasisWarning

KW = dict(target="output:0", progress=False, device="cpu", permutations=0, split_half=0,
          batch_size=32)


class _Planted(nn.Module):
    """A conv whose channels' maps have a few strong spatial modes; the output reads one."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.head = nn.Linear(6, 1)

    def forward(self, x):
        y = self.conv(x)
        return self.head(torch.relu(y).mean((2, 3))) + y[:, 0, 2, 2:3]


def _images(n: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    modes = torch.randn(3, 4, 8, 8, generator=gen)
    weights = torch.randn(n, 3, generator=gen) * torch.tensor([4.0, 2.0, 1.0])
    return torch.einsum("nm,mchw->nchw", weights, modes) + \
        0.3 * torch.randn(n, 4, 8, 8, generator=gen)


def test_at_most_the_sample_is_the_exact_route():
    net, x = _Planted(), _images(300)
    exact = pcace.rank(net, x, basis="exact", **KW)
    small = pcace.rank(net, x, basis="sample", sample_size=300, **KW)
    assert {r["route"] for r in small.manifest["routes"].values()} != {"sample"}
    np.testing.assert_array_equal(small.channels.pcace, exact.channels.pcace)


def test_sampled_basis_close_to_exact_and_in_image_order():
    """600 images, a random sample of 200 passed first: the components come back in the
    images' own order (the scores equal the exact run's exactly) and the values are close."""
    net, x = _Planted(), _images(600)
    exact = pcace.rank(net, x, basis="exact", **KW)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SampledBasisWarning)  # a good sample: no warning
        got = pcace.rank(net, x, basis="sample", sample_size=200, **KW)
    np.testing.assert_array_equal(got.scores, exact.scores)
    route = got.manifest["routes"]["conv"]
    assert route["route"] == "sample" and route["sample"]["size"] == 200
    assert "random sample of 200 of the 600" in route["sample"]["drawn"]
    assert route["sample"]["axes"].startswith(("exact", "randomized"))
    assert route["check"]["ratio_min"] >= 0.9
    assert got.manifest["basis"]["basis"] == "sample"
    a, b = got.channels.pcace.to_numpy(), exact.channels.pcace.to_numpy()
    assert spearmanr(a, b)[0] >= 0.9
    assert np.abs(a - b).max() <= 0.02
    # the components themselves: each agrees with the exact one up to sign
    za, zb = got.components["conv"], exact.components["conv"]
    for c in range(za.shape[0]):
        cos = torch.nn.functional.cosine_similarity(za[c, :, 0].double(),
                                                    zb[c, :, 0].double(), dim=0)
        assert abs(float(cos)) > 0.99, c


def _loader(x: torch.Tensor, batch_size: int) -> torch.utils.data.DataLoader:
    """A loader pcace cannot reorder (its own collate function): read as it comes."""
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x),
                                       batch_size=batch_size,
                                       collate_fn=lambda items: torch.stack([i[0] for i in items]))


def test_input_that_cannot_be_indexed_takes_the_first_images():
    net, x = _Planted(), _images(400)
    got = pcace.rank(net, _loader(x, 32), basis="sample", sample_size=100, **KW)
    route = got.manifest["routes"]["conv"]
    assert route["route"] == "sample" and "first 100 images" in route["sample"]["drawn"]
    assert len(got.scores) == 400


def test_the_self_check_warns_on_a_poor_sample():
    """The first images (the sample, for an input read once) vary in one pattern only; the
    rest in others: the components found on the sample capture little of the whole."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Flatten(), nn.Linear(2 * 64, 1))
    gen = torch.Generator().manual_seed(3)
    first = torch.randn(100, 1, 1, 1, generator=gen) * torch.ones(1, 1, 8, 8)  # flat maps
    rest = torch.randn(400, 1, 8, 8, generator=gen)  # every pixel on its own
    x = torch.cat([first, rest])
    with pytest.warns(SampledBasisWarning, match="sampled basis"):
        got = pcace.rank(net, _loader(x, 50), basis="sample", sample_size=100, **KW)
    assert got.manifest["routes"]["0"]["check"]["poor_channels"]


def test_bad_basis_is_refused():
    with pytest.raises(ValueError, match="basis must be one of"):
        pcace.rank(_Planted(), _images(50), basis="approximate", **KW)
    with pytest.raises(ValueError, match="sample_size"):
        pcace.rank(_Planted(), _images(50), sample_size=0, **KW)


def test_nan_on_the_sampled_route_names_the_layer_and_channel():
    class SideNan(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.side, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Identity(), \
                nn.Linear(8, 1)

        def forward(self, x):
            y = self.conv(x)
            bad = y.clone()
            bad[:, 5] = float("nan")
            return self.head(y.mean((2, 3))) + 0 * self.side(bad).nan_to_num().sum()

    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"layer 'side' produced NaN or inf in channel\(s\) "
                                         r"\[5\]"):
        pcace.rank(SideNan(), torch.randn(120, 3, 8, 8), layers=["side"], basis="sample",
                   sample_size=50, **KW)
