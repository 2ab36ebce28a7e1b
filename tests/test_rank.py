"""End-to-end tests of pcace.rank on planted networks and the shared CIFAR ResNet-20."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import pcace
from pcace.inputs.targets import RegressionOutput

N_PLANTED = 200


class PlantedNet(nn.Module):
    """Channels 0 and 1 of ``features`` determine the output; channels 2.. are noise.

    Each channel's maps are a latent value per image times a fixed spatial pattern, plus noise,
    so the channel's first principal component recovers its latent. The output depends on
    channel 0's latent through a non-monotone function (a square) and on channel 1's through a
    monotone non-linear one (exp); the other channels' latents are unrelated to it.
    """

    def __init__(self, pattern: torch.Tensor):
        super().__init__()
        self.features = nn.Identity()
        self.register_buffer("pattern", pattern)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.features(x)
        norm = self.pattern.pow(2).sum()
        u = (a[:, 0] * self.pattern).sum((1, 2)) / norm
        v = (a[:, 1] * self.pattern).sum((1, 2)) / norm
        return (u**2 + 0.7 * torch.exp(v))[:, None]


def planted_images(n: int = N_PLANTED, channels: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pattern = torch.randn(6, 6, generator=g)
    latents = torch.randn(n, channels, 1, 1, generator=g)
    x = latents * pattern + 0.3 * torch.randn(n, channels, 6, 6, generator=g)
    return x, pattern


@pytest.fixture(scope="module")
def planted_result():
    x, pattern = planted_images()
    model = PlantedNet(pattern)
    return pcace.rank(model, x, RegressionOutput(), layers=["features"], progress=False)


def test_planted_channels_rank_on_top(planted_result):
    ch = planted_result.channels.sort_values("rank")
    assert set(ch.channel.head(2)) == {0, 1}
    planted = ch[ch.channel.isin([0, 1])].pcace
    noise = ch[~ch.channel.isin([0, 1])].pcace
    assert planted.min() > noise.max() + 0.2


def test_non_monotone_channel_found_where_pearson_fails(planted_result):
    # the square of a symmetric latent has ~0 linear correlation with it
    x, pattern = planted_images()
    u = (x[:, 0] * pattern).sum((1, 2)) / pattern.pow(2).sum()
    pearson = np.corrcoef(u.numpy(), (u**2).numpy())[0, 1]
    assert abs(pearson) < 0.3
    value = planted_result.channels.set_index("channel").loc[0, "pcace"]
    assert value > 0.6


def test_malloc_tuning_does_not_change_results(planted_result, monkeypatch):
    monkeypatch.setenv("PCACE_TUNE_MALLOC", "0")
    x, pattern = planted_images()
    plain = pcace.rank(PlantedNet(pattern), x, RegressionOutput(), layers=["features"],
                       progress=False)
    np.testing.assert_array_equal(plain.channels.pcace.to_numpy(),
                                  planted_result.channels.pcace.to_numpy())


def test_tables_have_documented_columns(planted_result):
    for col in ("layer", "channel", "pcace", "rank", "n_components", "explained_variance",
                "dead"):
        assert col in planted_result.channels.columns
    for col in ("layer", "channels", "height", "width", "mean", "median", "q90", "max",
                "top_channels"):
        assert col in planted_result.layers.columns
    assert planted_result.channels.pcace.between(0, 1).all()
    assert (planted_result.channels.n_components == 3).all()


def test_dead_channel_scores_zero():
    x, pattern = planted_images()
    x[:, 5] = 0.25  # constant over all images
    res = pcace.rank(PlantedNet(pattern), x, RegressionOutput(), layers=["features"],
                     progress=False)
    row = res.channels.set_index("channel").loc[5]
    assert bool(row.dead) and row.pcace == 0.0


def test_fraction_of_variance_records_k():
    x, pattern = planted_images()
    res = pcace.rank(PlantedNet(pattern), x, RegressionOutput(), layers=["features"],
                     components=0.5, progress=False)
    # one latent per channel explains most of its variance: one component suffices
    assert (res.channels.n_components == 1).all()
    assert (res.channels.explained_variance >= 0.5).all()


def test_first_component_score_is_reference_option():
    x, pattern = planted_images()
    model = PlantedNet(pattern)
    a = pcace.rank(model, x, RegressionOutput(), layers=["features"], progress=False)
    b = pcace.rank(model, x, RegressionOutput(), layers=["features"], progress=False,
                   score="first-component")
    assert b.manifest["score"] == "first-component"
    # |corr(phi_1, theta)| never exceeds the maximal correlation over all components by much
    assert (b.channels.pcace.to_numpy() <= a.channels.pcace.to_numpy() + 0.05).all()


def test_one_forward_pass_per_batch_and_hooks_removed():
    x, pattern = planted_images(n=100)
    model = PlantedNet(pattern)
    calls = []
    model.register_forward_pre_hook(lambda m, i: calls.append(i[0].shape[0]))
    pcace.rank(model, x, RegressionOutput(), layers=["features"], batch_size=32, progress=False)
    # one single-image probe (pcace.inputs.layers.describe_layers) gives the layer shapes for the
    # route decision (pcace.reduce.plan.MemoryPlan.routes), then one call per batch
    assert calls == [1, 32, 32, 32, 4]
    assert len(model.features._forward_hooks) == 0


def test_hooks_removed_after_error():
    x, pattern = planted_images(n=50)
    model = PlantedNet(pattern)

    def broken(output):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        pcace.rank(model, x, broken, layers=["features"], progress=False)
    assert len(model.features._forward_hooks) == 0


def test_spilled_run_equals_in_memory_run(tmp_path):
    x, pattern = planted_images()
    model = PlantedNet(pattern)
    a = pcace.rank(model, x, RegressionOutput(), layers=["features"], progress=False)
    b = pcace.rank(model, x, RegressionOutput(), layers=["features"], progress=False,
                   memory_budget=1024, spill_dir=tmp_path)
    assert b.manifest["spilled_layers"] == ["features"]
    np.testing.assert_array_equal(a.channels.pcace.to_numpy(), b.channels.pcace.to_numpy())


def test_save_and_load_round_trip(planted_result, tmp_path):
    planted_result.save(tmp_path / "run")
    back = pcace.load(tmp_path / "run")
    np.testing.assert_allclose(back.channels.pcace, planted_result.channels.pcace, rtol=1e-12)
    assert back.manifest["data"]["n_images"] == N_PLANTED
    for key in ("pcace_version", "model", "target", "components", "device", "seed", "timings",
                "versions"):
        assert key in back.manifest


def test_load_rejects_non_run_directory(tmp_path):
    with pytest.raises(ValueError, match="not a pcace run directory"):
        pcace.load(tmp_path)


# --- bad input through the API ---------------------------------------------------------------

def test_unknown_layer_lists_valid_names():
    x, pattern = planted_images(n=30)
    with pytest.raises(ValueError, match="featurez") as err:
        pcace.rank(PlantedNet(pattern), x, RegressionOutput(), layers=["featurez"],
                   progress=False)
    assert "features" in str(err.value)


def test_target_outside_output():
    x, pattern = planted_images(n=30)
    with pytest.raises(ValueError, match="5"):
        pcace.rank(PlantedNet(pattern), x, 5, layers=["features"], progress=False)


def test_too_few_images():
    x, pattern = planted_images(n=8)
    with pytest.raises(ValueError, match="at least 10"):
        pcace.rank(PlantedNet(pattern), x, RegressionOutput(), layers=["features"],
                   progress=False)


def test_score_that_does_not_vary():
    x, pattern = planted_images(n=30)

    def constant(output):
        return torch.ones(output.shape[0])

    with pytest.raises(ValueError, match="does not vary"):
        pcace.rank(PlantedNet(pattern), x, constant, layers=["features"], progress=False)


def test_nan_in_activations_names_layer():
    x, pattern = planted_images(n=30)
    x[3, 2, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="features"):
        pcace.rank(PlantedNet(pattern), x, RegressionOutput(), layers=["features"],
                   progress=False)


class _PassThrough(nn.Module):
    """A 'layer' that is the input itself; the score reads channels 0 and 1 only."""

    def __init__(self):
        super().__init__()
        self.features = nn.Identity()

    def forward(self, x):
        return self.features(x)[:, :2].mean(dim=(1, 2, 3))[:, None]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_activation_names_layer_channel_and_image(bad):
    x = torch.randn(40, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    x[5, 2, 1, 1] = bad  # the score stays finite
    with pytest.raises(ValueError, match=r"'features'.*channel\(s\) \[2\].*image\(s\) \[5\]"):
        pcace.rank(_PassThrough(), x, RegressionOutput(), layers=["features"], progress=False)
    with pytest.raises(ValueError, match=r"'features'.*channel\(s\) \[2\].*image\(s\) \[5\]"):
        pcace.rank(_PassThrough(), x, RegressionOutput(), layers=["features"], progress=False,
                   memory_budget=0)  # spilled: the check runs on the block read back


def test_bad_components():
    x, pattern = planted_images(n=30)
    for bad in (0, 1.5, "three"):
        with pytest.raises(ValueError, match="components"):
            pcace.rank(PlantedNet(pattern), x, RegressionOutput(), layers=["features"],
                       components=bad, progress=False)


# --- the shared pretrained CIFAR ResNet-20 -----------------------------------------------------

@pytest.fixture(scope="module")
def cifar(cifar_cats):
    return cifar_cats(120)


@pytest.fixture(scope="module")
def cifar_result(cifar):
    model, images = cifar
    return pcace.rank(model, images, target=3, progress=False, device="cpu")


def test_resnet20_every_layer_ranked(cifar_result, cifar):
    model, _ = cifar
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert list(cifar_result.layers.layer) == convs
    assert len(cifar_result.channels) == sum(
        m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))
    assert cifar_result.channels.pcace.between(0, 1).all()
    # last-stage channels carry more class information than the first conv's (paper's finding)
    med = cifar_result.layers.set_index("layer")["median"]
    assert med["layer3.2.conv2"] > med["conv1"]


def test_resnet20_deterministic(cifar, cifar_result):
    model, images = cifar
    again = pcace.rank(model, images, target=3, layers=["conv1", "layer3.2.conv2"],
                       progress=False, device="cpu")
    mine = cifar_result.channels[cifar_result.channels.layer.isin(["conv1", "layer3.2.conv2"])]
    np.testing.assert_array_equal(again.channels.pcace.to_numpy(), mine.pcace.to_numpy())


def test_resnet20_matches_independent_computation(cifar, cifar_result):
    """Hook + plain NumPy standardise/SVD + single-problem ACE, channel by channel."""
    model, images = cifar
    layer = "layer2.1.conv1"
    store = {}
    handle = dict(model.named_modules())[layer].register_forward_hook(
        lambda m, i, o: store.__setitem__("a", o.detach().float()))
    with torch.no_grad():
        logits = model(images)
    handle.remove()
    acts = store["a"].double().numpy()
    score = logits[:, 3].double().numpy()
    table = cifar_result.channels.set_index(["layer", "channel"])
    for c in (0, 7, 19, 31):
        m = acts[:, c].reshape(len(images), -1)
        sd = m.std(axis=0)
        keep = sd > 1e-12 * np.maximum(1.0, np.abs(m).max(axis=0))
        z = (m[:, keep] - m[:, keep].mean(axis=0)) / sd[keep]
        u, s, _ = np.linalg.svd(z, full_matrices=False)
        pcs = u[:, :3] * s[:3]
        expected = pcace.ace(pcs, score).rho
        assert table.loc[(layer, c), "pcace"] == pytest.approx(expected, abs=1e-6)


def test_null_and_bootstrap_columns_through_rank():
    x, pattern = planted_images(n=150)
    res = pcace.rank(PlantedNet(pattern), x, RegressionOutput(), layers=["features"],
                     permutations=199, null="exact", bootstrap=20, progress=False)
    ch = res.channels.set_index("channel")
    for col in ("null_mean", "p_value", "q_value", "pcace_adj", "ci_low", "ci_high",
                "rank_low", "rank_high"):
        assert col in ch.columns
    # the planted channels beat every one of the 199 permutations; noise channels do not
    assert (ch.loc[[0, 1], "p_value"] == 1 / 200).all()
    assert (ch.drop([0, 1]).p_value > 0.01).mean() > 0.7
    assert (ch.ci_low <= ch.ci_high).all()
    layer = res.layers.iloc[0]
    assert 0 < layer.significant_share <= 1 and "rank_spearman" in res.layers.columns
    assert res.manifest["permutations"] == 199 and res.manifest["interval"] == "half-sample"
    with pytest.raises(ValueError, match="interval method"):
        pcace.rank(PlantedNet(pattern), x, RegressionOutput(), layers=["features"],
                   bootstrap=5, interval="bca", progress=False)


def test_top_channels(planted_result):
    top = planted_result.top("features", 2)
    assert list(top["rank"]) == [1, 2] and set(top.channel) == {0, 1}
    assert len(planted_result.top(n=3)) == 3
    with pytest.raises(ValueError, match="features"):
        planted_result.top("nope")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rank_on_cuda_matches_cpu(planted_result):
    """The device path (torch standardisation, Gram, eigen iteration and ACE on the GPU)."""
    x, pattern = planted_images()
    on_gpu = pcace.rank(PlantedNet(pattern), x, RegressionOutput(), layers=["features"],
                        progress=False, device="cuda")
    np.testing.assert_allclose(on_gpu.channels.pcace, planted_result.channels.pcace,
                               atol=1e-4, rtol=0)
    assert set(on_gpu.top("features", 2).channel) == {0, 1}
    assert on_gpu.manifest["device"].startswith("cuda")
    assert on_gpu.manifest["device_layers"] == ["features"]  # kept in the GPU's memory
    in_ram = pcace.rank(PlantedNet(pattern), x, RegressionOutput(), layers=["features"],
                        progress=False, device="cuda", device_memory_budget=0)
    assert in_ram.manifest["device_layers"] == []
    np.testing.assert_allclose(in_ram.channels.pcace, on_gpu.channels.pcace, atol=1e-6,
                               rtol=0)
