"""Many targets per pass and per-label image groups (issue 14).

Each multi-target or per-label run is checked against the runs it replaces: one run per
target, and one run per label over that label's images only.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from test_rank import PlantedNet, planted_images
from torch import nn

import pcace
from pcace.inputs.targets import CustomTarget, RegressionOutput, TargetSet, resolve_targets

SHARED_COLUMNS = ["layer", "channel", "pcace", "rank", "n_components", "explained_variance",
                  "dead"]
STAT_COLUMNS = ["null_mean", "p_value", "q_value", "pcace_adj", "ci_low", "ci_high",
                "rank_low", "rank_high"]


def _negated_root(out: torch.Tensor) -> torch.Tensor:
    return -out[:, 0].abs().sqrt()


NEG = CustomTarget(_negated_root, name="neg")


class ThreeScores(nn.Module):
    """Three class outputs, each read from one channel's latent (0, 1, 2) of ``features``."""

    def __init__(self, pattern: torch.Tensor):
        super().__init__()
        self.features = nn.Identity()
        self.register_buffer("pattern", pattern)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.features(x)
        u = (a[:, :3] * self.pattern).sum((2, 3)) / self.pattern.pow(2).sum()
        return torch.stack([u[:, 0] ** 2, torch.exp(u[:, 1]), torch.sin(2 * u[:, 2])], dim=1)


def _assert_same_rows(part: pd.DataFrame, single: pd.DataFrame, columns: list[str],
                      atol: float = 0.0) -> None:
    part = part.reset_index(drop=True)
    single = single.reset_index(drop=True)
    assert len(part) == len(single)
    for col in columns:
        if atol == 0.0 or part[col].dtype.kind not in "fc":
            np.testing.assert_array_equal(part[col].to_numpy(), single[col].to_numpy(),
                                          err_msg=col)
        else:
            np.testing.assert_allclose(part[col].to_numpy(), single[col].to_numpy(),
                                       atol=atol, rtol=0, err_msg=col)


# --- targets ------------------------------------------------------------------------------------

def test_resolve_targets_lists_all_and_duplicates():
    cats = ["plane", "car", "bird", "cat"]
    ts = resolve_targets([3, "prob:cat", "output:1"], categories=cats)
    assert ts.labels == ["cat", "prob:cat", "output:1"]
    out = torch.randn(5, 4)
    np.testing.assert_array_equal(ts(out)[:, 0].numpy(), out[:, 3].numpy())
    every = resolve_targets("all", categories=cats)
    assert every(out).shape == (5, 4) and every.labels == cats
    assert resolve_targets(3).labels == ["3"] and len(resolve_targets(3)) == 1
    with pytest.raises(ValueError, match="twice"):
        resolve_targets([3, "cat"], categories=cats)
    with pytest.raises(ValueError, match="combined"):
        resolve_targets(["all", 3])
    with pytest.raises(ValueError, match="empty"):
        TargetSet([])


def test_bootstrap_with_several_scores_equals_one_at_a_time():
    g = torch.Generator().manual_seed(1)
    maps = torch.randn(60, 3, 4, 4, generator=g, dtype=torch.float64)
    y = maps[:, 0].flatten(1).mean(1).numpy()
    y2 = np.cos(3 * maps[:, 1].flatten(1).mean(1).numpy())
    both = pcace.stats.bootstrap_values(maps, np.stack([y, y2], 1), components=2,
                                                   boots=6)
    for j, s in enumerate((y, y2)):
        one = pcace.stats.bootstrap_values(maps, s, components=2, boots=6)
        np.testing.assert_array_equal(both[:, j], one)


# --- many targets in one pass -------------------------------------------------------------------

@pytest.fixture(scope="module")
def planted():
    x, pattern = planted_images(n=150)
    return PlantedNet(pattern), x


@pytest.fixture(scope="module")
def multi(planted):
    model, x = planted
    return pcace.rank(model, x, [RegressionOutput(), NEG], layers=["features"], progress=False,
                      permutations=39, bootstrap=6, split_half=4)


def test_multi_target_equals_single_target_runs(planted, multi):
    model, x = planted
    assert multi.targets == ["output", "neg"]
    assert list(multi.layers.target) == ["output", "neg"]
    for name, target in (("output", RegressionOutput()), ("neg", NEG)):
        single = pcace.rank(model, x, target, layers=["features"], progress=False,
                            permutations=39, bootstrap=6, split_half=4)
        part = multi.channels[multi.channels.target == name]
        _assert_same_rows(part, single.channels, SHARED_COLUMNS + STAT_COLUMNS)
        row = multi.layers[multi.layers.target == name].drop(columns="target")
        cols = [c for c in single.layers.columns if c != "target"]
        _assert_same_rows(row[cols], single.layers[cols], cols)
        assert single.targets == [name] and single.scores.ndim == 1
    assert multi.scores.shape == (150, 2)
    assert set(multi.manifest["stability"]["features"]) == {"output", "neg"}


def test_single_target_tables_keep_their_form(planted):
    model, x = planted
    res = pcace.rank(model, x, RegressionOutput(), layers=["features"], progress=False,
                     bootstrap=4)
    assert (res.channels.target == "output").all()
    assert res.manifest["target"] == {"kind": "regression_output", "index": None}
    assert "spearman_mean" in res.manifest["stability"]["features"]  # not nested by target
    assert res.scores.shape == (150,)


def test_top_save_and_load_with_targets(multi, tmp_path):
    top = multi.top("features", 2)
    assert list(top.target) == ["output", "output", "neg", "neg"]
    assert set(top.channel) == {0, 1}
    neg = multi.top("features", 3, target="neg")
    assert (neg.target == "neg").all() and list(neg["rank"]) == [1, 2, 3]
    with pytest.raises(ValueError, match="no target"):
        multi.top("features", target="dog")
    multi.save(tmp_path / "run")
    back = pcace.load(tmp_path / "run")
    assert back.targets == ["output", "neg"]
    assert [t["kind"] for t in back.manifest["targets"]] == ["regression_output", "callable"]
    pd.testing.assert_frame_equal(back.channels, multi.channels, check_dtype=False)
    np.testing.assert_allclose(back.scores, multi.scores, rtol=1e-15)


def test_resume_keeps_every_target(planted, tmp_path):
    model, x = planted
    kwargs = dict(layers=["features"], progress=False, permutations=9, bootstrap=3)
    first = pcace.rank(model, x, [RegressionOutput(), NEG], checkpoint_dir=tmp_path, **kwargs)
    again = pcace.rank(model, x, [RegressionOutput(), NEG], checkpoint_dir=tmp_path,
                       resume=True, **kwargs)
    assert again.manifest["resumed_layers"] == ["features"]
    assert again.manifest["forward_calls"] == 0
    pd.testing.assert_frame_equal(again.channels, first.channels)
    pd.testing.assert_frame_equal(again.layers, first.layers)
    assert again.manifest["stability"] == first.manifest["stability"]


# --- per-label groups ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def labelled():
    x, pattern = planted_images(n=180, seed=3)
    labels = torch.arange(180) % 3
    return ThreeScores(pattern), x, labels


def test_per_label_own_class_equals_separate_runs(labelled):
    model, x, labels = labelled
    kwargs = dict(layers=["features"], progress=False, pca_dtype=torch.float64,
                  permutations=19)
    atlas = pcace.rank(model, (x, labels), per_label=True, **kwargs)
    assert sorted(atlas.channels.label.unique()) == [0, 1, 2]
    assert atlas.manifest["data"]["labels"] == {"0": 60, "1": 60, "2": 60}
    for c in range(3):
        alone = pcace.rank(model, (x, labels), target=c, label=c, **kwargs)
        part = atlas.channels[atlas.channels.label == c]
        assert (part.target == str(c)).all()
        _assert_same_rows(part, alone.channels, SHARED_COLUMNS + STAT_COLUMNS[:4], atol=1e-9)
        # the class's own channel carries its score
        assert atlas.top("features", 1, label=c).channel.item() == c
    assert atlas.labels.tolist() == labels.tolist()
    assert set(atlas.components) == {("features", 0), ("features", 1), ("features", 2)}


def test_per_label_with_targets_scores_every_label_on_each(labelled):
    model, x, labels = labelled
    atlas = pcace.rank(model, (x, labels), target=[0, 2], per_label=True,
                       layers=["features"], progress=False)
    assert len(atlas.channels) == 3 * 2 * 12
    assert len(atlas.layers) == 6 and {"label", "target"} <= set(atlas.layers.columns)
    alone = pcace.rank(model, (x, labels), target=2, label=1, layers=["features"],
                       progress=False)
    part = atlas.channels[(atlas.channels.label == 1) & (atlas.channels.target == "2")]
    _assert_same_rows(part, alone.channels, SHARED_COLUMNS, atol=1e-6)


def test_per_label_needs_labels_and_class_indices(labelled):
    model, x, labels = labelled
    with pytest.raises(ValueError, match="labelled images"):
        pcace.rank(model, x, per_label=True, layers=["features"], progress=False)
    with pytest.raises(ValueError, match="class index"):
        pcace.rank(model, (x, labels + 5), per_label=True, layers=["features"],
                   progress=False)
    with pytest.raises(ValueError, match="label="):
        pcace.rank(model, (x, labels), per_label=True, label=1, layers=["features"],
                   progress=False)


def test_per_label_resume(labelled, tmp_path):
    model, x, labels = labelled
    kwargs = dict(per_label=True, layers=["features"], progress=False)
    first = pcace.rank(model, (x, labels), checkpoint_dir=tmp_path, **kwargs)
    again = pcace.rank(model, (x, labels), checkpoint_dir=tmp_path, resume=True, **kwargs)
    pd.testing.assert_frame_equal(again.channels, first.channels)
    assert set(again.components) == set(first.components)


# --- the shared CIFAR ResNet-20 -----------------------------------------------------------------

LAYERS = ["layer1.0.conv1", "layer3.2.conv2"]


@pytest.fixture(scope="module")
def cifar(shared_dir):
    from torchvision import transforms

    from pcace.inputs.data import image_folder
    from pcace.inputs.models import load_model
    from pcace.zoo import CIFAR_MEAN, CIFAR_STD

    loaded = load_model("pcace.zoo:cifar_resnet20",
                        checkpoint=shared_dir / "data/cifar10/resnet20-12fca82f.th")
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(CIFAR_MEAN, CIFAR_STD)])
    ds = image_folder(shared_dir / "data/cifar10/test", transform=tf)
    keep = [i for i, (_, y) in enumerate(ds.samples) if y in (3, 5, 7)]
    rng = np.random.default_rng(0)
    keep = sorted(rng.choice(keep, size=120, replace=False).tolist())
    x = torch.stack([ds[i][0] for i in keep])
    y = torch.tensor([ds.samples[i][1] for i in keep])
    return loaded.model, x, y, list(ds.classes)


def test_resnet20_all_classes_equal_single_runs(cifar):
    model, x, y, classes = cifar
    cats = x[y == 3]
    cheap = dict(permutations=0, split_half=0)  # the statistics are checked on planted data
    every = pcace.rank(model, cats, "all", layers=LAYERS, categories=classes, progress=False,
                       device="cpu", **cheap)
    assert every.targets == classes and every.manifest["forward_calls"] == 1
    for index in (3, 5):
        single = pcace.rank(model, cats, index, layers=LAYERS, categories=classes,
                            progress=False, device="cpu", **cheap)
        part = every.channels[every.channels.target == classes[index]]
        _assert_same_rows(part, single.channels, SHARED_COLUMNS)


def test_resnet20_per_class_equals_separate_runs(cifar):
    model, x, y, classes = cifar
    # one image per batch: each image's activations do not depend on its batch-mates
    cheap = dict(permutations=0, split_half=0)
    atlas = pcace.rank(model, (x, y), per_label=True, layers=LAYERS, categories=classes,
                       batch_size=1, progress=False, device="cpu", **cheap)
    for c in (3, 5, 7):
        alone = pcace.rank(model, (x, y), c, label=c, layers=LAYERS, categories=classes,
                           batch_size=1, progress=False, device="cpu", **cheap)
        part = atlas.channels[atlas.channels.label == c]
        assert (part.target == classes[c]).all()
        _assert_same_rows(part, alone.channels, SHARED_COLUMNS, atol=1e-6)


# --- the class atlas ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def atlas_run(labelled):
    model, x, labels = labelled
    return pcace.rank(model, (x, labels), per_label=True, layers=["features"],
                      progress=False, permutations=299)  # B + 1 >= C / alpha


def test_class_evidence_and_selectivity(atlas_run):
    from pcace.stats import share_significant
    from pcace.stats.atlas import class_evidence, selectivity

    table, measure = class_evidence(atlas_run)
    assert measure.startswith("share") and list(table.columns) == ["0", "1", "2"]
    ch = atlas_run.channels
    for c in range(3):
        q = ch[ch.label == c].q_value.to_numpy()
        assert table.loc["features", str(c)] == pytest.approx(share_significant(q))
    sel = selectivity(atlas_run, "features")
    assert len(sel) == 12
    for c in range(3):  # channel c carries class c's score, and only it
        assert sel.loc[c, "best_class"] == str(c) and sel.loc[c, "classes"] == str(c)
    assert (sel.drop([0, 1, 2]).n_classes <= 1).all()


def test_class_atlas_figure(atlas_run):
    from pcace.viz import class_atlas

    fig = class_atlas(atlas_run)
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    assert any("layers x classes" in t for t in titles)
    assert any(t.startswith("features:") for t in titles)
    with pytest.raises(ValueError, match="no layer"):
        class_atlas(atlas_run, layer="nope")


def test_per_label_in_turn_when_the_maps_do_not_fit(labelled, monkeypatch):
    """A budget too small for all labels' maps: the labels are ranked in turn (each over
    its own images, by the two-pass route here) and the atlas equals the one-pass atlas."""
    from pcace.reduce.plan import MemoryPlan

    model, x, labels = labelled
    kwargs = dict(layers=["features"], progress=False, pca_dtype=torch.float64,
                  permutations=19, split_half=2)
    one_pass = pcace.rank(model, (x, labels), per_label=True, **kwargs)
    assert "per_label_passes" not in one_pass.manifest
    maps = 4 * 12 * 8 * 8 * 180  # features: 12 channels of 8 x 8 over 180 images
    monkeypatch.setattr(MemoryPlan, "store_bytes", property(lambda self: maps // 2))
    turn = pcace.rank(model, (x, labels), per_label=True, **kwargs)
    assert turn.manifest["per_label_passes"]["mode"] == "in turn"
    assert set(turn.manifest["per_label_runs"]) == {"0", "1", "2"}
    assert list(turn.channels.columns) == list(one_pass.channels.columns)
    assert list(turn.layers.columns) == list(one_pass.layers.columns)
    for c in range(3):
        a = one_pass.channels[one_pass.channels.label == c]
        b = turn.channels[turn.channels.label == c]
        _assert_same_rows(b, a, SHARED_COLUMNS + STAT_COLUMNS[:4], atol=1e-9)
        own = turn.scores[labels.numpy() == c, turn.targets.index(str(c))]
        np.testing.assert_allclose(own, one_pass.scores[labels.numpy() == c, c], atol=1e-6)
    assert set(turn.components) == set(one_pass.components)
    assert turn.labels.tolist() == labels.tolist()
    assert turn.complete


def test_per_label_in_turn_resumes_after_an_interrupt(labelled, monkeypatch, tmp_path):
    """Interrupted while the second label runs: the first label is kept, a resume restores
    it, continues, and ends equal to an uninterrupted run; the checkpoints (one folder per
    label inside the run's own) go with remove_checkpoints."""
    from pcace.reduce.plan import MemoryPlan
    from pcace.results.checkpoints import remove_checkpoints

    model, x, labels = labelled
    kwargs = dict(layers=["features"], progress=False, pca_dtype=torch.float64,
                  permutations=9, split_half=0)
    monkeypatch.setattr(MemoryPlan, "store_bytes", property(lambda self: 1000))
    whole = pcace.rank(model, (x, labels), per_label=True, **kwargs)
    def stop_in_second_label():
        if (tmp_path / "checkpoints" / "label-1").exists():
            raise KeyboardInterrupt

    first = pcace.rank(model, (x, labels), per_label=True, checkpoint_dir=tmp_path,
                       on_step=stop_in_second_label, **kwargs)
    assert not first.complete and set(first.channels.label) == {0}
    assert (tmp_path / "checkpoints" / "label-0" / "checkpoints" / "state.json").is_file()
    again = pcace.rank(model, (x, labels), per_label=True, checkpoint_dir=tmp_path,
                       resume=True, **kwargs)
    assert again.complete
    assert again.manifest["per_label_runs"]["0"]["complete"]
    pd.testing.assert_frame_equal(
        again.channels[SHARED_COLUMNS + ["label"]].reset_index(drop=True),
        whole.channels[SHARED_COLUMNS + ["label"]].reset_index(drop=True))
    removed = remove_checkpoints(tmp_path)
    assert any(r.startswith("checkpoints/label-1/") for r in removed)
    assert not (tmp_path / "checkpoints").exists()
