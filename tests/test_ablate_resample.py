"""Tests of resample ablation and ``variance_share`` (issue 29), against closed forms.

On a score that is linear in channels varying independently, the share of the score's
variance that runs through a set of channels is the sum of their weighted variances over
the total: every mode must find it within sampling error, and resample mode must take each
image's channels from another image, never from itself.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from pcace.core.voice import speaking_cli
from pcace.stats.ablate import ablate, faithfulness_summary
from pcace.stats.ablators import derangements

WEIGHTS = np.array([3.0, 2.0, 2.0, 1.0, 1.0, 0.5, 0.5, 0.25])
SDS = np.array([1.0, 1.5, 0.5, 2.0, 1.0, 1.0, 3.0, 1.0])
N = 20_000


class LinearHead(nn.Module):
    """``feat`` passes its input through; the score is a weighted sum of its channels."""

    def __init__(self, weights: np.ndarray):
        super().__init__()
        self.feat = nn.Identity()
        self.head = nn.Linear(len(weights), 1)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor(weights, dtype=torch.float32).view(1, -1))
            self.head.bias.fill_(0.7)

    def forward(self, x):
        return self.head(self.feat(x).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def linear():
    gen = torch.Generator().manual_seed(29)
    means = torch.linspace(-1.0, 2.0, len(WEIGHTS)).view(1, -1, 1, 1)
    x = means + torch.tensor(SDS, dtype=torch.float32).view(1, -1, 1, 1) * torch.randn(
        N, len(WEIGHTS), 1, 1, generator=gen)
    return LinearHead(WEIGHTS).eval(), x


def closed_form(channels) -> float:
    part = WEIGHTS ** 2 * SDS ** 2
    return float(part[list(channels)].sum() / part.sum())


def tolerance(share: float) -> float:
    """Four standard errors of the estimate: the numerator's relative error is at most
    sqrt(2 / N) (a mean of chi-square(1) terms), the variance's sqrt(2 / N)."""
    return 4 * share * 2 * np.sqrt(2 / N) + 1e-3


@pytest.mark.parametrize("mode", ["resample", "mean", "zero"])
def test_variance_share_of_a_linear_head_is_the_closed_form(linear, mode):
    model, x = linear
    order = list(np.argsort(-(WEIGHTS ** 2 * SDS ** 2), kind="stable"))
    curves = ablate(model, x, 0, "feat", order, sizes=(1, 2, 3), mode=mode, repeats=30,
                    batch_size=4096, seed=3)
    rows = curves.set_index(["selection", "m"])
    for m in (1, 2, 3):
        for selection, channels in (("top", order[:m]), ("bottom", order[-m:])):
            want = closed_form(channels)
            got = rows.loc[(selection, m), "variance_share"]
            assert got == pytest.approx(want, abs=tolerance(want)), (mode, selection, m)
        # random sets: each channel is in a random m-set with probability m / C
        rand = rows.loc[("random", m)]
        want = m / len(WEIGHTS)
        spread = 4 * rand.variance_share_sd / np.sqrt(rand.n_sets)
        assert rand.variance_share == pytest.approx(want, abs=spread + tolerance(want))
    whole = ablate(model, x, 0, "feat", order, sizes=(8,), mode=mode, repeats=1,
                   batch_size=4096)  # the score runs through this layer alone
    assert whole.variance_share.iloc[0] == pytest.approx(1.0, abs=tolerance(1.0))
    summary = faithfulness_summary(curves, metric="variance_share")
    assert summary.attrs == {"metric": "variance_share", "mode": mode}
    assert summary.mean_gap[0] > 0 > summary.bottom_mean_gap[0]
    if mode == "resample":
        assert curves.attrs["resamples"] == 5
        assert (curves.variance_share_perm_sd > 0).all()
        assert {"score_drop_perm_sd", "score_change_perm_sd"} <= set(curves.columns)
    else:
        assert not any(c.endswith("_perm_sd") for c in curves.columns)


def test_resample_keeps_the_mean_score_of_a_linear_head(linear):
    model, x = linear  # a donor's channels have the same distribution: the mean score stays
    curves = ablate(model, x[:4000], 0, "feat", list(range(8)), sizes=(4,), repeats=2,
                    mode="resample", batch_size=4096)
    sd = np.sqrt(curves.attrs["base_variance"] / 4000)
    assert (curves.score_drop.abs() < 4 * 2 * sd).all()


def test_donors_are_other_images_from_the_whole_set():
    n, batch = 10, 4

    class Ids(nn.Module):
        def __init__(self):
            super().__init__()
            self.feat = nn.Identity()

        def forward(self, x):
            return self.feat(x).flatten(1)

    seen: list[torch.Tensor] = []

    def score(out):
        seen.append(out[:, 0].clone())
        return out[:, 0]

    ids = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
    ablate(Ids(), ids, score, "feat", [0], sizes=(1,), repeats=1, mode="resample",
           resamples=4, batch_size=batch)
    passes = torch.cat(seen).long().view(-1, n)  # the unablated pass, then one per derangement
    assert passes[0].tolist() == list(range(n))
    donors = passes[1:]
    assert len(donors) == 4
    for perm in donors.tolist():
        assert sorted(perm) == list(range(n))           # every image donates once
        assert all(d != i for i, d in enumerate(perm))   # never to itself
    own_batch = donors // batch == torch.arange(n) // batch
    assert not own_batch.all()                           # donors cross batches
    assert len({tuple(p) for p in donors.tolist()}) > 1  # several derangements


def test_derangements_are_uniform_over_the_derangements_of_three():
    # the derangements of 3 are the two 3-cycles
    d = derangements(3, 4000, seed=0)
    assert (d != np.arange(3)).all()
    share = float((d[:, 0] == 1).mean())  # [1, 2, 0] against [2, 0, 1]
    assert share == pytest.approx(0.5, abs=4 * np.sqrt(0.25 / 4000))
    with pytest.raises(ValueError, match="at least 2"):
        derangements(1, 1)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 1)
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.head.weight[1].zero_()  # output 1 ignores the image: a constant score

    def forward(self, x):
        return self.head(self.conv(x).mean(dim=(2, 3)))


def test_bad_input_is_refused_in_the_callers_words():
    model, x = Toy().eval(), torch.rand(6, 1, 5, 5)
    with pytest.raises(ValueError, match="at least two images") as info:
        ablate(model, x[:1], 0, "conv", [0, 1, 2, 3], mode="resample")
    assert "mode=resample" in str(info.value)
    with speaking_cli(), pytest.raises(ValueError, match="at least two images") as info:
        ablate(model, x[:1], 0, "conv", [0, 1, 2, 3], mode="resample")
    assert "--mode resample" in str(info.value)

    with pytest.raises(ValueError, match="the same for all 6 images") as info:
        ablate(model, x, 1, "conv", [0, 1, 2, 3], mode="resample")
    assert "mode=mean" in str(info.value)
    with speaking_cli(), pytest.raises(ValueError, match="variance is 0") as info:
        ablate(model, x, 1, "conv", [0, 1, 2, 3], mode="resample")
    assert "--mode mean" in str(info.value) and "mode=" not in str(info.value)
    with pytest.warns(UserWarning, match="variance_share is NaN"):
        flat = ablate(model, x, 1, "conv", [0, 1, 2, 3], sizes=(1, 2), repeats=2)
    assert flat.variance_share.isna().all() and (flat.score_drop.abs() < 1e-6).all()
    with pytest.raises(ValueError, match="score_drop"):
        faithfulness_summary(flat, metric="variance_share")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="no size is at most the 4 channels") as info:
            ablate(model, x, 0, "conv", [0, 1, 2, 3], sizes=(8,), mode="resample")
        assert "sizes=(8,)" in str(info.value)
        with speaking_cli(), pytest.raises(ValueError, match="4 channels") as info:
            ablate(model, x, 0, "conv", [0, 1, 2, 3], sizes=(8, 16), mode="resample")
        assert "--sizes 8 16" in str(info.value)
    with pytest.raises(ValueError, match="resamples"):
        ablate(model, x, 0, "conv", [0, 1, 2, 3], mode="resample", resamples=0)


def test_existing_modes_keep_their_columns():
    model, x = Toy().eval(), torch.rand(6, 1, 5, 5)
    for mode in ("mean", "zero"):
        curves = ablate(model, x, 0, "conv", [0, 1, 2, 3], sizes=(1, 2), repeats=2, mode=mode,
                        labels=[0, 1, 0, 1, 0, 1])
        assert list(curves.columns) == [
            "ranking", "selection", "m", "score", "score_drop", "score_drop_sd",
            "score_change", "score_change_sd", "accuracy_drop", "accuracy_drop_sd",
            "variance_share", "variance_share_sd", "n_sets"]
        assert isinstance(curves, pd.DataFrame) and curves.attrs["resamples"] is None


# ------------------------------------------------------------------ the command line

@pytest.fixture(scope="module")
def cat_run(shared_dir, tmp_path_factory):
    from pcace.cli.main import main

    out = tmp_path_factory.mktemp("resample") / "run"
    cifar = shared_dir / "data/cifar10"
    assert main(["rank", "--model", "pcace.zoo:cifar_resnet20", "--checkpoint",
                 str(cifar / "resnet20-12fca82f.th"), "--data", str(cifar / "test"),
                 "--class", "cat", "--mean", "0.485", "0.456", "0.406", "--std", "0.229",
                 "0.224", "0.225", "--target", "cat", "--limit", "40", "--layers",
                 "layer3.2.conv2", "--permutations", "0", "--split-half", "0",
                 "--no-progress", "--out", str(out)]) == 0
    return out


def test_cli_resample_ablation_names_its_mode_and_metric(cat_run, capsys):
    from pcace.cli.main import main

    capsys.readouterr()
    assert main(["ablate", str(cat_run), "--layer", "layer3.2.conv2", "--mode", "resample",
                 "--sizes", "1", "4", "--repeats", "2", "--resamples", "2", "--no-baselines",
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "(resample ablation)" in text and "metric variance_share" in text
    assert "2 random derangements" in text
    curves = pd.read_csv(cat_run / "ablation_layer3.2.conv2_resample.csv")
    summary = pd.read_csv(cat_run / "faithfulness_layer3.2.conv2_resample.csv")
    assert set(curves["mode"]) == {"resample"} and "variance_share_perm_sd" in curves.columns
    assert summary[["mode", "metric"]].values.tolist() == [["resample", "variance_share"]]
    assert ((curves.variance_share >= 0) & (curves.variance_share < 1.5)).all()
    listed = (cat_run / "run.json").read_text()
    assert "faithfulness_layer3.2.conv2_resample.csv" in listed
    assert not [p for p in cat_run.iterdir() if ".tmp-" in p.name]


def test_cli_errors_speak_the_command_line(cat_run, capsys):
    from pcace.cli.main import main

    capsys.readouterr()
    assert main(["ablate", str(cat_run), "--layer", "layer3.2.conv2", "--mode", "resample",
                 "--sizes", "128", "--no-baselines", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--sizes 128" in err and "64 channels" in err and "sizes=" not in err, err
    assert main(["ablate", str(cat_run), "--layer", "layer3.2.conv2", "--mode", "resample",
                 "--resamples", "0", "--no-baselines", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--resamples 0" in err and "resamples=" not in err, err
    assert main(["ablate", str(cat_run), "--layer", "layer3.2.conv2", "--mode", "zero",
                 "--sizes", "65", "--no-baselines", "--no-progress"]) == 2
    assert "--sizes 65" in capsys.readouterr().err
    assert not list(cat_run.glob("*_zero.csv"))  # a refused ablation writes nothing


def test_cli_ctrl_c_while_saving_leaves_whole_files(cat_run, capsys, monkeypatch):
    import os
    import signal

    import pcace.core.files as files
    from pcace.cli.main import main

    real, written = files.atomic_write, []

    def write_then_interrupt(path, data):
        if not written:  # Ctrl-C between the two files
            os.kill(os.getpid(), signal.SIGINT)
        written.append(path)
        return real(path, data)

    monkeypatch.setattr(files, "atomic_write", write_then_interrupt)
    capsys.readouterr()
    assert main(["ablate", str(cat_run), "--layer", "layer3.2.conv2", "--sizes", "1",
                 "--repeats", "1", "--no-baselines", "--no-progress"]) == 130
    assert "interrupted" in capsys.readouterr().err
    names = ["ablation_layer3.2.conv2.csv", "faithfulness_layer3.2.conv2.csv"]
    assert [p.name for p in written] == names
    summary = pd.read_csv(cat_run / names[1])
    assert summary[["mode", "metric"]].values.tolist() == [["mean", "score_change"]]
    listed = (cat_run / "run.json").read_text()
    assert all(name in listed for name in names)
    assert not [p for p in cat_run.iterdir() if ".tmp-" in p.name]
