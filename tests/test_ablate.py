"""Tests of pcace.stats.ablate: channel ablation curves, baseline rankings, faithfulness."""

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from pcace.stats.ablate import ablate, baseline_importance, baseline_rankings, faithfulness_summary
from pcace.zoo import CIFAR_MEAN, CIFAR_STD, cifar_resnet20

# ------------------------------------------------------------------ a toy model


class Toy(nn.Module):
    """A 1x1 conv with 4 channels whose pooled outputs enter the score with weights 4..1."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 1, bias=False)
        self.head = nn.Linear(4, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, 0.5, 2.0, 1.0]).view(4, 1, 1, 1))
            self.head.weight.copy_(torch.tensor([[4.0, 3.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0]]))

    def forward(self, x):
        return self.head(self.conv(x).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def toy():
    gen = torch.Generator().manual_seed(0)
    return Toy().eval(), torch.rand(24, 1, 5, 5, generator=gen) + 0.5


def test_toy_curves_follow_the_true_importance(toy):
    model, x = toy
    # contribution of channel c to the score: head weight * conv weight * mean input
    true_order = [2, 0, 1, 3]  # 4, 1.5, 4 * 1, 1 -> 2 (4), 0 (4), 1 (1.5), 3 (1): ties by id
    curves = ablate(model, x, 0, "conv", [0, 2, 1, 3], sizes=(1, 2, 4), mode="zero", repeats=6,
                    baselines={"worst": true_order[::-1]})
    assert set(curves.columns) >= {"ranking", "selection", "m", "score_drop", "score_drop_sd",
                                   "n_sets"}
    assert "accuracy_drop" not in curves.columns
    top = curves[(curves.ranking == "pcace") & (curves.selection == "top")].set_index("m")
    bottom = curves[(curves.ranking == "pcace") & (curves.selection == "bottom")].set_index("m")
    rand = curves[curves.selection == "random"].set_index("m")
    base = curves.attrs["base_score"]
    mean_in = x.mean().item()
    assert top.score_drop[1] == pytest.approx(4.0 * mean_in, rel=1e-5)
    assert bottom.score_drop[1] == pytest.approx(1.0 * mean_in, rel=1e-5)
    assert top.score_drop[4] == pytest.approx(base, rel=1e-5)  # everything zeroed
    assert top.score_drop[2] > rand.score_drop[2] > bottom.score_drop[2]
    assert np.isnan(top.score_drop_sd).all() and (rand.score_drop_sd[[1, 2]] > 0).all()
    assert rand.score_drop_sd[4] == 0.0
    summary = faithfulness_summary(curves)
    assert summary.ranking.tolist() == ["pcace", "worst"]
    assert summary.mean_gap[0] > 0 > summary.mean_gap[1]
    assert summary.bottom_mean_gap[0] < 0


def test_toy_mean_mode_and_reference(toy):
    model, x = toy
    # mean ablation on the same images leaves the mean score unchanged for a linear model
    # ... while every image's score moves: score_change sees it
    curves = ablate(model, x, 0, "conv", [0, 1, 2, 3], sizes=(1, 2), repeats=2)
    np.testing.assert_allclose(curves.score_drop, 0.0, atol=1e-5)
    assert (curves.score_change > 0.01).all()
    top = curves[(curves.selection == "top") & (curves.m == 1)]
    dev = (x - x.mean()).mean(dim=(1, 2, 3)).abs().mean().item()  # channel 0: weight 4 * 1
    assert top.score_change.iloc[0] == pytest.approx(4.0 * dev, rel=1e-4)
    change = faithfulness_summary(curves, metric="score_change")
    assert change.attrs["metric"] == "score_change" and len(change) == 1
    with pytest.raises(ValueError, match="metric"):
        faithfulness_summary(curves, metric="auc")
    with pytest.raises(ValueError, match="accuracy needs labels"):
        faithfulness_summary(curves, metric="accuracy_drop")
    ref = torch.zeros(5, 1, 5, 5)  # a reference whose mean map is 0 acts like zero ablation
    with_ref = ablate(model, x, 0, "conv", [0, 1, 2, 3], sizes=(2,), repeats=2, reference=ref)
    zero = ablate(model, x, 0, "conv", [0, 1, 2, 3], sizes=(2,), repeats=2, mode="zero")
    np.testing.assert_allclose(with_ref.score_drop, zero.score_drop, rtol=1e-6)
    assert with_ref.attrs["n_reference"] == 5


def test_toy_baselines(toy):
    model, x = toy
    values = baseline_importance(model, x, 0, "conv",
                                 methods=["mean_abs_activation", "weight_l1", "taylor"])
    np.testing.assert_allclose(values["weight_l1"], [1.0, 0.5, 2.0, 1.0])
    np.testing.assert_allclose(values["mean_abs_activation"],
                               np.array([1.0, 0.5, 2.0, 1.0]) * x.mean().item(), rtol=1e-5)
    # Taylor: |sum_pixels a * dS/da| = |head_c * conv_c * mean input|
    np.testing.assert_allclose(values["taylor"],
                               np.array([4.0, 1.5, 4.0, 1.0]) * x.mean(dim=(1, 2, 3)).mean().item(),
                               rtol=1e-5)
    orders = baseline_rankings(model, x, 0, "conv", methods=["taylor"])
    assert orders["taylor"].tolist() == [0, 2, 1, 3]


def test_ranking_inputs_and_errors(toy):
    model, x = toy
    df = pd.DataFrame({"layer": ["conv"] * 4 + ["other"], "channel": [3, 1, 0, 2, 0],
                       "rank": [1, 2, 3, 4, 1]})
    a = ablate(model, x, 0, "conv", df, sizes=(1,), repeats=1, mode="zero")
    b = ablate(model, x, 0, "conv", [3, 1, 0, 2], sizes=(1,), repeats=1, mode="zero")
    pd.testing.assert_frame_equal(a, b)
    with pytest.raises(ValueError, match="once each"):
        ablate(model, x, 0, "conv", [0, 1, 2], sizes=(1,))
    with pytest.raises(ValueError, match="once each"):
        ablate(model, x, 0, "conv", [0, 1, 2, 2], sizes=(1,))
    with pytest.raises(ValueError, match="mode"):
        ablate(model, x, 0, "conv", [0, 1, 2, 3], mode="noise")
    with pytest.raises(ValueError, match="unknown layer 'cnv'. Valid names, closest first: conv"):
        ablate(model, x, 0, "cnv", [0, 1, 2, 3])
    with pytest.raises(ValueError, match="labels"):
        ablate(model, x, 0, "conv", [0, 1, 2, 3], labels=[0, 1])
    with pytest.raises(ValueError, match="repeats"):
        ablate(model, x, 0, "conv", [0, 1, 2, 3], repeats=0)
    with pytest.raises(ValueError, match="reserved"):
        ablate(model, x, 0, "conv", {"random": [0, 1, 2, 3]})
    with pytest.warns(UserWarning, match="exceed"):
        c = ablate(model, x, 0, "conv", [0, 1, 2, 3], sizes=(1, 8), repeats=1)
    assert c.m.unique().tolist() == [1]
    with pytest.raises(ValueError, match="no size"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ablate(model, x, 0, "conv", [0, 1, 2, 3], sizes=(8,))
    with pytest.raises(ValueError, match="baseline"):
        baseline_rankings(model, x, 0, "conv", methods=["grad_cam"])
    with pytest.raises(ValueError, match="curves"):
        faithfulness_summary(pd.DataFrame({"a": [1]}))


def test_weight_l1_skipped_without_conv_weight():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    x = torch.rand(6, 1, 6, 6)
    model(x)
    with pytest.warns(UserWarning, match="no convolution weight"):
        orders = baseline_rankings(model, x, 0, "1", methods=["weight_l1", "mean_abs_activation"])
    assert list(orders) == ["mean_abs_activation"]


def test_layer_conductance_with_captum(toy):
    pytest.importorskip("captum")
    model, x = toy
    values = baseline_importance(model, x[:6], 0, "conv", methods=["layer_conductance"],
                                 conductance_steps=8)
    # the toy is linear: conductance is proportional to activation * gradient (Taylor); the
    # factor is 1 up to the quadrature, whose nodes do not reach the ends of the path
    taylor = baseline_importance(model, x[:6], 0, "conv", methods=["taylor"])["taylor"]
    ratio = values["layer_conductance"] / taylor
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-4)
    assert 0.9 < ratio[0] <= 1.0


# ---------------------------------------------------------- the shared ResNet-20


def _load_class(shared_dir, name, count):
    from pcace.inputs.data import default_transform, image_folder

    ds = image_folder(shared_dir / "data" / "cifar10" / "test", name,
                      default_transform(mean=CIFAR_MEAN, std=CIFAR_STD))
    items = [ds[i] for i in range(min(count, len(ds)))]
    return torch.stack([i[0] for i in items]), torch.tensor([i[1] for i in items])


@pytest.fixture(scope="module")
def resnet(shared_dir):
    ck = torch.load(shared_dir / "data" / "cifar10" / "resnet20-12fca82f.th",
                    weights_only=True, map_location="cpu")
    model = cifar_resnet20()
    model.load_state_dict({k.removeprefix("module."): v for k, v in ck["state_dict"].items()})
    return model.eval()


@pytest.fixture(scope="module")
def cats(shared_dir):
    return _load_class(shared_dir, "cat", 100)


def test_resnet_ablation_runs_with_baselines(resnet, cats):
    x, y = cats
    layer = "layer2.0.conv1"
    orders = baseline_rankings(resnet, x, 3, layer,
                               methods=["mean_abs_activation", "weight_l1", "taylor"])
    assert set(orders) == {"mean_abs_activation", "weight_l1", "taylor"}
    for order in orders.values():
        assert sorted(order.tolist()) == list(range(32))
    curves = ablate(resnet, x, 3, layer, orders["taylor"], sizes=(1, 4, 32), repeats=3,
                    labels=y, baselines={k: v for k, v in orders.items() if k != "taylor"})
    assert len(curves) == 3 * 3 * 2 + 3
    assert curves.attrs["n_channels"] == 32 and curves.attrs["n_images"] == 100
    assert 0.4 < curves.attrs["base_accuracy"] <= 1.0
    full = curves[curves.m == 32]  # all channels ablated: every selection is the same set
    np.testing.assert_allclose(full.score_drop, full.score_drop.iloc[0])
    summary = faithfulness_summary(curves)
    assert len(summary) == 3 and np.isfinite(summary[["area", "mean_gap"]].to_numpy()).all()
    assert "accuracy_mean_gap" in summary.columns


def test_resnet_zero_ablation_of_all_channels_drops_the_score(resnet, cats):
    x, y = cats
    curves = ablate(resnet, x, 3, "layer3.2.relu2", list(range(64)), sizes=(64,),
                    mode="zero", repeats=1, labels=y)
    base = curves.attrs["base_score"]
    assert base > 5.0
    assert (curves.score_drop > 0.8 * base).all()  # the cat logit falls to the bias


def test_resnet_random_ablation_curve_is_monotone(resnet, shared_dir):
    """Removing more random channels does not help on average (within noise).

    Automobile images, whose class the network gets right 76% of the time. On cat images
    (69%) ablating early channels raises the cat logit instead: see benchmarks/README.md.
    """
    x, y = _load_class(shared_dir, "automobile", 100)
    curves = ablate(resnet, x, 1, "layer2.0.conv2", list(range(32)), sizes=(1, 4, 16, 32),
                    mode="zero", repeats=4, labels=y, seed=1)
    rand = curves[curves.selection == "random"].sort_values("m")
    drop = rand.score_drop.to_numpy()
    se = rand.score_drop_sd.to_numpy() / np.sqrt(rand.n_sets.to_numpy())
    for i in range(len(drop) - 1):
        assert drop[i + 1] >= drop[i] - 2 * np.hypot(se[i], se[i + 1]), rand
    assert drop[-1] > drop[0] + 5.0
    print("random score drop (mean, sd) by m:",
          rand[["m", "score_drop", "score_drop_sd"]].round(2).values.tolist())
