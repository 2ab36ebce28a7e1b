"""Figures, assets and the HTML report, built from real runs.

Two runs, each made once per module: the demo (a small CNN trained on scikit-learn's digits,
both conv layers, with a permutation null) and the shared pretrained CIFAR ResNet-20 on 60
cat images (three layers, with a null and a bootstrap). Each figure is checked for what a
reader needs from it: the panels, titles naming layer and channel, colour bars, images in
[0, 1]; the report for being one self-contained file.
"""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch

from pcace.viz import (
    ace_transforms,
    activation_maps,
    channel_ranking,
    collect_assets,
    feature_visualisations,
    layer_overview,
    load_assets,
    overlay_maps,
    weighted_vs_cam,
    write_report,
)
from pcace.viz.assets import display_images, pick_examples
from pcace.viz.cam import explain, find_cam_layer, resolve_cam_target

CIFAR_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = (0.229, 0.224, 0.225)
CIFAR_LAYERS = ["conv1", "layer2.0.conv2", "layer3.2.conv2"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo run with assets and report: (run_dir, result, assets, images)."""
    from pcace.cli.demo import run_demo
    from pcace.inputs.data import sklearn_digits
    from pcace.zoo import mnist_cnn

    run = tmp_path_factory.mktemp("demo")
    result = run_demo(out=run, progress=False, epochs=3, images=120, permutations=19)
    model = mnist_cnn()
    model.load_state_dict(torch.load(run / "model.pt", weights_only=True))
    x, y = sklearn_digits().tensors
    images = x[y == 3][:120]
    return run, result, load_assets(run), images


@pytest.fixture(scope="module")
def cifar_model(shared_dir):
    """The shared pretrained CIFAR ResNet-20, in eval mode."""
    from pcace.zoo import cifar_resnet20

    checkpoint = shared_dir / "data" / "cifar10" / "resnet20-12fca82f.th"
    if not checkpoint.exists():
        pytest.skip("shared CIFAR-10 checkpoint missing")
    state = torch.load(checkpoint, weights_only=True, map_location="cpu")["state_dict"]
    model = cifar_resnet20()
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    return model.eval()


@pytest.fixture(scope="module")
def cifar(shared_dir, cifar_model, tmp_path_factory):
    """ResNet-20 on 60 cat images: (run_dir, result, assets, images)."""
    from PIL import Image
    from torchvision import transforms

    import pcace
    from pcace.inputs.targets import ClassLogit

    folder = shared_dir / "data" / "cifar10" / "test" / "cat"
    if not folder.is_dir():
        pytest.skip("shared CIFAR-10 images missing")
    model = cifar_model
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(CIFAR_MEAN, CIFAR_STD)])
    files = sorted(folder.glob("*.jpg"))[:60]
    images = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
    result = pcace.rank(model, images, ClassLogit(3, "cat"), layers=CIFAR_LAYERS,
                        progress=False, device="cpu", permutations=9)
    run = tmp_path_factory.mktemp("cifar")
    result.save(run)
    assets = collect_assets(run, model, images, result, mean=CIFAR_MEAN, std=CIFAR_STD,
                            featurevis_steps=64, progress=False)
    write_report(run, progress=False)
    return run, result, assets, images


@pytest.fixture(scope="module", params=["demo", "cifar"])
def run(request):
    return request.getfixturevalue(request.param)


def title(ax) -> str:
    return ax.get_title() or ax.get_title(loc="left")


def titles(fig) -> list[str]:
    return [title(ax) for ax in fig.axes]


def colorbar_axes(fig) -> list:
    return [ax for ax in fig.axes if getattr(ax, "_colorbar", None) is not None]


# ------------------------------------------------------------------ figures from tables

def test_layer_overview_shows_every_layer_in_order(run):
    _, result, _, _ = run
    fig = layer_overview(result)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    names = result.layers.sort_values("order").layer.tolist()
    assert [lab.split()[0] for lab in labels] == names  # first layer at the top
    points = [c for c in ax.collections if c.get_offsets().shape[0] > 0
              and type(c).__name__ == "PathCollection"]
    assert sum(len(c.get_offsets()) for c in points) == len(result.channels)
    bands = [c for c in ax.collections if type(c).__name__ in ("PolyCollection",
                                                                "FillBetweenPolyCollection")]
    assert len(bands) == len(names)  # the permutation null, one band per layer
    assert "median" in [t.get_text() for t in fig.legends[0].get_texts()]


def test_channel_ranking_labels_the_top_channels(run):
    _, result, _, _ = run
    layer = result.layers.layer.iloc[-1]
    fig = channel_ranking(result, layer, top=5)
    ax_all, ax_top = fig.axes
    assert layer in title(ax_all)
    best = result.channels[result.channels.layer == layer].sort_values("pcace",
                                                                       ascending=False)
    expected = [f"ch {c}" for c in best.channel.head(5)]
    assert [t.get_text() for t in ax_top.get_yticklabels()] == expected
    bars = [c for c in ax_top.containers if type(c).__name__ == "BarContainer"]
    assert len(bars) == 1 and len(bars[0]) == 5
    assert not ax_top.collections  # no interval segments: no bootstrap in these runs
    with pytest.raises(ValueError, match="no layer"):
        channel_ranking(result, "nonexistent")


def test_channel_ranking_draws_intervals_where_they_are(demo):
    """Bias-corrected intervals can lie wholly below the value: drawn as they are."""
    _, result, _, _ = demo
    with_ci = copy.copy(result)
    with_ci.channels = result.channels.assign(ci_low=(result.channels.pcace - 0.3).clip(0, 1),
                                              ci_high=(result.channels.pcace - 0.1).clip(0, 1))
    fig = channel_ranking(with_ci, "conv2", top=3)
    ax_all, ax_top = fig.axes
    assert "bootstrap CI" in title(ax_top)
    best = with_ci.channels[with_ci.channels.layer == "conv2"].sort_values(
        "pcace", ascending=False).head(3)
    segments = ax_top.collections[0].get_segments()
    assert len(segments) == 3
    np.testing.assert_allclose(sorted(s[:, 0].max() for s in segments),
                               sorted(best.ci_high), atol=1e-12)
    np.testing.assert_allclose(sorted(s[:, 0].min() for s in segments),
                               sorted(best.ci_low), atol=1e-12)
    n = int((with_ci.channels.layer == "conv2").sum())
    assert len(ax_all.collections[0].get_segments()) == n


def test_ace_transforms_panel_per_component():
    from pcace import ace

    rng = np.random.default_rng(0)
    z = rng.normal(size=(150, 3))
    s = np.sin(z[:, 0]) + 0.1 * rng.normal(size=150)
    r = ace(z, s)
    fig = ace_transforms(r.theta, r.phi, s, z, "conv2, channel 7", rho=float(r.rho))
    assert len(fig.axes) == 4
    assert titles(fig) == ["θ(score)", "φ1(PC 1)", "φ2(PC 2)", "φ3(PC 3)"]
    assert "conv2, channel 7" in fig._suptitle.get_text()
    with pytest.raises(ValueError, match="same number"):
        ace_transforms(r.theta[:-1], r.phi, s, z, "bad")


# ------------------------------------------------------------------ assets

def test_assets_examples_and_display_images(run):
    run_dir, result, assets, images = run
    loaded = load_assets(run_dir)
    assert loaded is not None and loaded.layers == result.layers.layer.tolist()
    scores = [e["score"] for e in assets.examples]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] == pytest.approx(result.scores.max())
    assert scores[-1] == pytest.approx(result.scores.min())
    shown = loaded.images
    assert shown.shape == (3, *images.shape[2:], images.shape[1])
    assert shown.min() >= 0.0 and shown.max() <= 1.0
    assert not any("differ" in note for note in assets.index["notes"])
    for layer in assets.layers:
        entry = assets.layer(layer)
        table = result.channels[result.channels.layer == layer]
        best = table.sort_values("pcace", ascending=False).channel.head(4).tolist()
        assert entry["channels"][:4] == best
        assert assets.array(layer, "maps").shape[:2] == (3, len(entry["channels"]))
        assert assets.array(layer, "weighted").shape == (3, *images.shape[2:])
        assert entry["ace"]["channel"] == best[0]
        top_value = float(table.pcace.max())
        assert entry["ace"]["rho"] == pytest.approx(top_value, abs=1e-6)
        fv = assets.array(layer, "featurevis")
        assert fv.min() >= 0.0 and fv.max() <= 1.0


def test_cifar_images_are_denormalised(cifar):
    _, _, assets, images = cifar
    i = assets.examples[0]["index"]
    expected = (images[i] * torch.tensor(CIFAR_STD)[:, None, None]
                + torch.tensor(CIFAR_MEAN)[:, None, None]).clamp(0, 1).permute(1, 2, 0)
    np.testing.assert_allclose(assets.images[0], expected.numpy(), atol=1e-6)
    assert assets.index["cam"]["method"] == "CAM"
    assert assets.index["cam"]["layer"] == "layer3"


def test_display_images_min_max_without_normalisation():
    x = torch.tensor([[[[-2.0, 0.0], [1.0, 2.0]]]])
    np.testing.assert_allclose(display_images(x)[0, ..., 0], [[0.0, 0.5], [0.75, 1.0]])
    with pytest.raises(ValueError, match="both"):
        display_images(x, mean=(0.5,))


def test_pick_examples_spread_over_the_score():
    picked = pick_examples(np.array([3.0, 9.0, 1.0, 5.0, 7.0]), 3)
    assert [p["index"] for p in picked] == [1, 3, 2]
    assert [p["label"] for p in picked] == ["highest score", "middle score", "lowest score"]


def test_cam_targets_and_grad_cam_for_regression():
    assert resolve_cam_target({"kind": "logit", "index": 2}).index == 2
    assert resolve_cam_target({"kind": "class_logit"}) is None  # no index: nothing to explain
    assert resolve_cam_target({"callable": "my_score"}) is None
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 1)).eval()
    x = torch.rand(2, 1, 8, 8)
    assert find_cam_layer(net, x) is None
    e = explain(net, x, {"kind": "regression_output", "index": None})
    assert e.method == "Grad-CAM" and e.maps.shape == (2, 8, 8) and e.layer == "1"
    assert (e.maps >= 0).all()


def test_run_without_rebuildable_target_has_no_cam(demo, tmp_path):
    _, result, _, images = demo
    from pcace.zoo import mnist_cnn

    result.manifest = {**result.manifest, "target": {"callable": "my_score"}}
    try:
        assets = collect_assets(tmp_path, mnist_cnn().eval(), images, result, featurevis=False,
                                progress=False,
                                n_examples=2)
    finally:
        result.manifest = {**result.manifest, "target": {"kind": "class_logit", "index": 3}}
    assert assets.index["cam"] is None
    assert any("CAM" in note for note in assets.index["notes"])
    fig = weighted_vs_cam(assets)
    assert not any("CAM (" in t for t in titles(fig))
    assert len(assets.examples) == 2


# ------------------------------------------------------------------ figures from assets

@pytest.mark.parametrize("draw", [activation_maps, overlay_maps])
def test_map_grid_panels_titles_colour_bars(run, draw):
    _, _, assets, _ = run
    layer = assets.layers[-1]
    entry = assets.layer(layer)
    n_maps, n_rows = len(entry["channels"]), len(assets.examples)
    fig = draw(assets, layer)
    bars = colorbar_axes(fig)
    assert len(bars) == n_rows  # one colour scale per row
    assert len(fig.axes) == n_rows * (1 + n_maps + 1)
    assert layer in fig._suptitle.get_text()
    map_titles = [t for t in titles(fig) if t.startswith("ch ")]
    assert len(map_titles) == n_rows * n_maps
    for channel, value in zip(entry["channels"], entry["pcace"], strict=True):
        assert any(t.startswith(f"ch {channel}\nPCACE {value:.2f}") for t in map_titles)
    if entry.get("significant") is not None:  # chance channels say so in their titles
        assert sum(t.endswith(" n.s.") for t in map_titles) == \
            n_rows * (len(entry["significant"]) - sum(entry["significant"]))
    assert titles(fig).count("input") == n_rows
    for r in range(n_rows):  # all maps of a row share the colour bar's scale
        row_axes = fig.axes[r * (n_maps + 2) + 1: r * (n_maps + 2) + 1 + n_maps]
        limits = {(round(ax.images[-1].norm.vmin, 6), round(ax.images[-1].norm.vmax, 6))
                  for ax in row_axes}
        assert len(limits) == 1
    inputs = [ax.images[0].get_array() for ax in fig.axes if ax.get_title() == "input"]
    assert all(float(np.min(a)) >= 0.0 and float(np.max(a)) <= 1.0 for a in inputs)


def test_weighted_vs_cam(run):
    _, _, assets, _ = run
    fig = weighted_vs_cam(assets)
    n_rows = len(assets.examples)
    method = assets.index["cam"]["method"]
    cam_titles = [t for t in titles(fig) if t.startswith(f"{method} (")]
    weighted = [t for t in titles(fig) if t.startswith("PCACE-weighted")]
    assert len(cam_titles) == n_rows
    assert len(weighted) == n_rows * len(assets.layers)
    assert len(colorbar_axes(fig)) == n_rows
    assert method in fig._suptitle.get_text()


def test_feature_visualisations(run):
    _, _, assets, _ = run
    layer = assets.layers[0]
    info = assets.layer(layer)["featurevis"]
    fig = feature_visualisations(assets, layer)
    assert len(fig.axes) == len(info["channels"]) == 4
    assert [t.split("\n")[0] for t in titles(fig)] == [f"ch {c}" for c in info["channels"]]
    assert layer in fig._suptitle.get_text()


# ------------------------------------------------------------------ the report

REMOTE = re.compile(r"""(?:src|href|action|poster|data)\s*=\s*["']?\s*(?:https?:)?//"""
                    r"""|url\(\s*["']?\s*(?:https?:)?//|@import|https?://""", re.I)


def test_report_is_self_contained(run):
    run_dir, result, _, _ = run
    html = (run_dir / "report.html").read_text(encoding="utf-8")
    assert not REMOTE.search(html), REMOTE.search(html)
    assert "<link" not in html and "<script src" not in html
    pngs = sorted((run_dir / "figures").glob("*.*"))
    assert {p.suffix for p in pngs} <= {".png", ".jpeg"}
    assert len(pngs) >= 2 + 3 * len(result.layers)
    embedded = re.findall(r'<img src="data:image/(?:png|jpeg);base64,[A-Za-z0-9+/=]+" '
                          r'alt="([^"]+)"', html)
    assert sorted(embedded) == sorted(p.stem for p in pngs)
    assert html.count("<tr data-layer=") == len(result.channels)
    manifest = json.loads((run_dir / "run.json").read_text())
    assert f"<dd>{manifest['created']}</dd>" in html
    assert f"<dd>{manifest['pcace_version']}</dd>" in html
    for layer in result.layers.layer:  # every section drawn from the run directory's files
        assert f'data-layer="{layer}"' in html
        stem = layer
        for kind in ("ranking", "maps", "overlay", "ace"):
            assert f'alt="{kind}_{stem}"' in html
        # feature visualisations: drawn, or a note on why not (see the test below)
        assert f'alt="featurevis_{stem}"' in html or "Feature visualisations not shown" in html
    assert 'alt="weighted_vs_cam"' in html and 'alt="overview"' in html


def test_report_without_assets_says_so(demo, tmp_path):
    _, result, _, _ = demo
    result.save(tmp_path)
    path = write_report(tmp_path)
    html = path.read_text(encoding="utf-8")
    assert "saved without assets" in html
    assert sorted(p.name for p in (tmp_path / "figures").glob("*.*")) == sorted(
        ["overview.png"] + [f"ranking_{layer}.png" for layer in result.layers.layer])
    assert not REMOTE.search(html)


def test_feature_visualisations_are_drawn_only_where_they_clear_the_bar(run):
    """A saved picture is drawn only when it excites its channel at least CLEAR_FACTOR times
    as much as the strongest reference image (and above zero) and is not flat; the other
    panels say why, and the layer's section says so when no picture is drawn."""
    from pcace.viz.featurevis import CLEAR_FACTOR, MIN_VARIATION
    from pcace.viz.maps import featurevis_reasons

    run_dir, _, assets, _ = run
    html = (run_dir / "report.html").read_text(encoding="utf-8")
    checked = 0
    for layer in assets.layers:
        info = assets.layer(layer)["featurevis"]
        if info is None:
            continue
        reasons = featurevis_reasons(info)
        excitation = np.array(info["excitation"])
        best = np.array(info["best_image_excitation"])
        clear = (excitation > 0) & (excitation >= CLEAR_FACTOR * np.maximum(best, 0)) & \
            (np.array(info["variation"]) >= MIN_VARIATION)
        assert [r is None for r in reasons] == clear.tolist(), (layer, excitation, best)
        fig = feature_visualisations(assets, layer)
        drawn = [title(ax).split("\n")[0] for ax in fig.axes if ax.images]
        assert drawn == [f"ch {c}" for c, ok in zip(info["channels"], clear, strict=True) if ok]
        shown = assets.array(layer, "featurevis")[clear]
        assert (shown.reshape(len(shown), -1).std(1) > 0.05).all()  # not flat on screen
        assert (f'alt="featurevis_{layer}"' in html) == bool(clear.any())
        checked += 1
    assert checked >= 1


def test_featurevis_on_a_pretrained_deep_layer(cifar, cifar_model):
    """A deep layer of the pretrained ResNet-20 with the default settings: every picture
    clears the bar, and it is smooth as photographs are (the 1/f Fourier image and the
    jitter and scaling), not pixel noise; a flat image measures no variation."""
    from pcace.viz.featurevis import spatial_variation, visualise_channels, why_not_shown

    def high_frequency_share(x):
        x = x - x.mean(dim=(-2, -1), keepdim=True)
        power = torch.fft.fft2(x).abs() ** 2
        fy, fx = torch.fft.fftfreq(x.shape[-2])[:, None], torch.fft.fftfreq(x.shape[-1])[None]
        high = (fx ** 2 + fy ** 2).sqrt() > 0.25
        return float((power[..., high].sum(-1) / power.sum((-2, -1))).mean())

    _, result, _, images = cifar
    top = result.top("layer3.2.conv2", 2).channel.tolist()
    fv = visualise_channels(cifar_model, "layer3.2.conv2", top, images)
    assert all(why_not_shown(e, b, v) is None for e, b, v in
               zip(fv.excitation, fv.best_image_excitation, fv.variation, strict=True))
    assert high_frequency_share(torch.randn(8, 3, 32, 32)) > 0.7  # white noise
    assert high_frequency_share(fv.inputs) < 0.4
    assert spatial_variation(torch.zeros(1, 3, 8, 8), images).tolist() == [0.0]
    assert all(p.requires_grad for p in cifar_model.parameters())  # restored
