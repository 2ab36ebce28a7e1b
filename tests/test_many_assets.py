"""Pictures for every target of a run with several targets, or one image set per label."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pcace
from pcace.viz import collect_assets, load_assets, write_report
from pcace.zoo import mnist_cnn


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return mnist_cnn().eval()


@pytest.fixture(scope="module")
def images():
    return torch.rand(48, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def test_each_target_gets_the_assets_a_run_of_it_alone_gets(model, images, tmp_path):
    res = pcace.rank(model, images, [1, 7], progress=False, permutations=9, split_half=2)
    res.save(tmp_path)
    made = collect_assets(tmp_path, model, images, res, featurevis_steps=4)
    assert sorted(made) == ["1", "7"]
    for column, name in enumerate(["1", "7"]):
        assets = load_assets(tmp_path, part=name)
        assert assets is not None and assets.layers == ["conv1", "conv2"]
        # the examples are spread over this target's own scores
        picked = [e["index"] for e in assets.examples]
        np.testing.assert_allclose([e["score"] for e in assets.examples],
                                   res.scores[picked, column])
        alone = res.subset(target=name)
        assert assets.index["target"] == alone.manifest["target"]
        assert "ace" in assets.layer("conv2")  # the components travel with the subset
    write_report(tmp_path, progress=False)
    for name in ("1", "7"):
        page = (tmp_path / f"report-{name}.html").read_text()
        assert "saved without assets" not in page
        assert (tmp_path / "figures" / name / "maps_conv2.png").exists()


def test_each_label_gets_assets_from_its_own_images(model, images, tmp_path):
    labels = torch.tensor([3, 5] * 24)
    res = pcace.rank(model, (images, labels), None, per_label=True, progress=False,
                     permutations=9, split_half=2)
    collect_assets(tmp_path, model, images, res, featurevis=False)
    for label in (3, 5):
        assets = load_assets(tmp_path, part=str(label))
        rows = np.flatnonzero(labels.numpy() == label)
        scores = res.scores[rows, label]  # this label's images, on its own class logit
        got = [e["score"] for e in assets.examples]
        assert set(np.round(got, 6)) <= set(np.round(scores, 6))
        assert max(got) == pytest.approx(scores.max())


def test_assets_of_several_targets_need_the_ranked_images(model, images, tmp_path):
    res = pcace.rank(model, images, [1, 7], progress=False, permutations=0, split_half=0)
    with pytest.raises(ValueError, match="same preprocessed images"):
        collect_assets(tmp_path, model, images[:10], res, featurevis=False)
