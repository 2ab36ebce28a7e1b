"""Feature visualisations shown only where they say something (issue 27), the map figures'
honest headings, and the report's count of skipped images.

Cheap: hand-made assets and a randomly initialised MNIST CNN; the pictures of a pretrained
network are checked in test_viz.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pcace.viz import activation_maps, feature_visualisations
from pcace.viz.assets import Assets
from pcace.viz.featurevis import CLEAR_FACTOR, MIN_VARIATION, visualise_channels, why_not_shown
from pcace.viz.maps import bottom_label

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_picture_is_shown_only_when_it_clearly_beats_the_data():
    assert why_not_shown(2.0, 1.0, 1.0) is None
    assert why_not_shown(CLEAR_FACTOR * 1.0, 1.0) is None
    near = why_not_shown(1.3, 1.0)  # beats the data, but not clearly
    assert "1.3" in near and "1" in near and f"{CLEAR_FACTOR:g}x" in near
    silent = why_not_shown(-0.03, -0.07)  # no image and no picture makes it fire
    assert "-0.03" in silent and "-0.07" in silent and "above zero" in silent
    assert "above zero" in why_not_shown(-0.01, 0.2)
    assert "flat" in why_not_shown(5.0, 1.0, MIN_VARIATION / 2)
    assert why_not_shown(0.2, -0.5) is None  # fires where no image does


def _assets(excitation, best, significant=(True,) * 4, n_significant=16) -> Assets:
    """A layer with two top and two bottom channels and two feature visualisations."""
    rng = np.random.default_rng(0)
    entry = {"name": "conv2", "key": "L0", "channels": [3, 5, 9, 11],
             "groups": ["top", "top", "bottom", "bottom"], "pcace": [0.9, 0.8, 0.3, 0.2],
             "significant": list(significant), "n_significant": n_significant,
             "n_channels": 16, "dead": None, "map_size": [7, 7], "ace": None,
             "featurevis": {"channels": [3, 5], "pcace": [0.9, 0.8], "excitation": excitation,
                            "best_image_excitation": best, "variation": [1.0, 1.0],
                            "reference_images": 64, "steps": 8, "seed": 0}}
    arrays = {"images": rng.random((2, 14, 14, 1), dtype=np.float32),
              "scores": np.array([1.0, -1.0]),
              "L0_maps": rng.standard_normal((2, 4, 7, 7)).astype(np.float32),
              "L0_featurevis": rng.random((2, 14, 14, 1), dtype=np.float32)}
    index = {"examples": [{"index": 0, "score": 1.0, "label": "highest score"},
                          {"index": 1, "score": -1.0, "label": "lowest score"}],
             "layers": [entry], "cam": None}
    return Assets(index, arrays)


def test_the_figure_draws_only_the_pictures_that_clear_the_bar():
    fig = feature_visualisations(_assets([3.0, 0.11], [1.0, 0.1]), "conv2")
    drawn = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title().split("\n")[0] for ax in drawn] == ["ch 3"]
    said = " ".join(t.get_text() for ax in fig.axes for t in ax.texts)
    assert "not shown" in said and "0.11" in said and "0.1" in said


def test_the_report_says_why_no_picture_is_shown(tmp_path):
    from pcace.viz.report_view import _featurevis_note

    note = _featurevis_note(_assets([-0.04, 0.12], [-0.07, 0.1]).layer("conv2")["featurevis"])
    assert note.startswith("Feature visualisations not shown")
    assert "Channel 3" in note and "-0.04" in note and "-0.07" in note
    assert "channel 5" in note and "0.12" in note
    skipped = _featurevis_note(None, ["layer4.0.conv2", "layer4.1.conv2"])
    assert "made for 2 layers only" in skipped and "layer4.1.conv2" in skipped


def test_bottom_channels_that_beat_chance_are_called_the_weakest_of_them():
    every = _assets([3.0, 3.0], [1.0, 1.0])
    assert bottom_label(every.layer("conv2")) == "the weakest 2 of 16 channels, all beating chance"
    some = _assets([3.0, 3.0], [1.0, 1.0], n_significant=12)
    assert bottom_label(some.layer("conv2")) == "the weakest 2 of the 12 channels beating chance"
    chance = _assets([3.0, 3.0], [1.0, 1.0], significant=(True, True, False, False))
    assert bottom_label(chance.layer("conv2")) == "bottom 2 by PCACE"
    headings = [t.get_text() for t in activation_maps(every, "conv2").texts]
    assert "the weakest 2 of 16 channels, all beating chance" in headings
    assert not any(h.startswith("bottom") for h in headings)


def test_visualisations_are_deterministic_per_seed():
    from pcace.zoo import mnist_cnn

    torch.manual_seed(0)
    model = mnist_cnn().eval()
    ref = torch.rand(16, 1, 28, 28)
    a = visualise_channels(model, "conv2", [0, 1], ref, steps=6, seed=3)
    b = visualise_channels(model, "conv2", [0, 1], ref, steps=6, seed=3)
    c = visualise_channels(model, "conv2", [0, 1], ref, steps=6, seed=4)
    assert torch.equal(a.inputs, b.inputs)
    assert not torch.equal(a.inputs, c.inputs)
    assert float(a.inputs.min()) >= float(ref.min()) and float(a.inputs.max()) <= float(ref.max())


def test_the_report_counts_skipped_images():
    from types import SimpleNamespace

    import pandas as pd

    from pcace.viz.report_view import summary_items

    manifest = {"data": {"n_images": 28, "skipped_images": 2,
                         "skipped_files": ["/data/dogs/broken.jpg", "/data/dogs/empty.png"]}}
    result = SimpleNamespace(manifest=manifest, scores=None,
                             channels=pd.DataFrame({"layer": ["a"], "channel": [0]}),
                             layers=pd.DataFrame({"layer": ["a"]}))
    items = dict(summary_items(result))
    assert items["images N"] == "28 (2 unreadable images skipped: broken.jpg, empty.png)"
    result.manifest = {"data": {"n_images": 28, "skipped_images": 0}}
    assert dict(summary_items(result))["images N"] == "28"


def test_large_images_are_synthesised_at_128_pixels_unless_the_model_refuses():
    from torch import nn

    class Fixed(nn.Module):
        """Takes 160 x 200 inputs only (a size check before its convolution)."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            if tuple(x.shape[-2:]) != (160, 200):
                raise RuntimeError("expected 160 x 200 inputs")
            return self.conv(x)

    torch.manual_seed(0)
    ref = torch.rand(4, 3, 160, 200)
    free = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    small = visualise_channels(free, "0", [1], ref, steps=2)
    assert tuple(small.inputs.shape[-2:]) == (102, 128)  # the longer side 128, same shape
    assert tuple(visualise_channels(free, "0", [1], ref, steps=2, size=None)
                 .inputs.shape[-2:]) == (160, 200)
    fixed = visualise_channels(Fixed().eval(), "conv", [1], ref, steps=2)
    assert tuple(fixed.inputs.shape[-2:]) == (160, 200)
