"""The report in plain words: per-layer evidence, greyed chance channels, size of big runs.

Results are built by hand (the tables of a run, with or without the null and the
reproducibility columns), so each case is exact and fast; the demo and a many-layer
network give the end-to-end checks.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch

from pcace.results.result import PCACEResult
from pcace.viz import channel_ranking, layer_overview, result_html, run_evidence, write_report
from pcace.viz.figures import CHANCE_COLOUR

pytestmark = pytest.mark.usefixtures("one_thread")


def hand_result(layers: list[str], channels: int = 12, *, null: bool = True,
                evidence: bool = True, significant_col: bool = True, seed: int = 0,
                strong: tuple[str, ...] = ()) -> PCACEResult:
    """A run's tables by hand: layers in ``strong`` have most channels beating the null."""
    rng = np.random.default_rng(seed)
    rows = []
    for order, layer in enumerate(layers):
        values = np.sort(rng.uniform(0.2, 0.5, channels))[::-1]
        q = np.full(channels, 0.6)
        if layer in strong:
            values = np.sort(rng.uniform(0.6, 0.9, channels))[::-1]
            q = np.where(np.arange(channels) < channels - 3, 0.01, 0.3)
        for i, (v, qv) in enumerate(zip(values, q, strict=True)):
            row = {"layer": layer, "layer_order": order, "channel": (i * 5) % channels,
                   "pcace": v, "rank": i + 1, "n_components": 3, "explained_variance": 0.5,
                   "dead": False}
            if null:
                row.update(null_mean=0.3, null_q95=0.42, p_value=qv, q_value=qv,
                           pcace_adj=max(0.0, v - 0.3))
                if significant_col:
                    row["significant"] = qv <= 0.05
            rows.append(row)
    ch = pd.DataFrame(rows)
    ly = ch.groupby("layer", sort=False).pcace.agg(["mean", "median", "max"]).reset_index()
    ly["order"] = range(len(ly))
    ly["channels"] = channels
    ly["height"] = ly["width"] = 8
    ly["q90"] = ly["max"]
    ly["dead"] = 0
    ly["top_channels"] = [" ".join(map(str, ch[ch.layer == n].channel.head(5))) for n in ly.layer]
    if null and evidence:
        share = ch.groupby("layer", sort=False).q_value.apply(lambda q: float((q <= 0.05).mean()))
        ly["significant_share"] = ly.layer.map(share)
        ly["median_adj"] = ly.layer.map(ch.groupby("layer").pcace_adj.median())
        ly["split_half_spearman"] = [0.87 if n in strong else 0.05 for n in ly.layer]
        ly["split_half_spearman_low"] = ly.split_half_spearman - 0.1
        ly["split_half_spearman_high"] = ly.split_half_spearman + 0.05
        ly["split_half_top10"] = [0.8 if n in strong else 0.1 for n in ly.layer]
        ly["evidence"] = ["strong" if n in strong else "none" for n in ly.layer]
        ly["evidence_text"] = [f"hand-written sentence for {n}" for n in ly.layer]
    manifest = {"model": {"class": "Toy"}, "target": {"kind": "class_logit", "index": 3},
                "data": {"n_images": 300}, "pcace_version": "test", "created": "now"}
    return PCACEResult(ch, ly, manifest, scores=rng.normal(size=300))


LAYERS = ["conv1", "layer1.0.conv1", "layer2.0.conv1", "layer3.0.conv1"]


def test_report_names_share_and_reproducibility_of_every_layer(tmp_path):
    result = hand_result(LAYERS, strong=("layer3.0.conv1",))
    result.save(tmp_path)
    html = write_report(tmp_path, progress=False).read_text(encoding="utf-8")
    for rec in result.layers.to_dict("records"):
        row = re.search(rf'<tr[^>]*data-layer-row="{re.escape(rec["layer"])}".*?</tr>', html)
        assert row, rec["layer"]
        text = row.group(0)
        assert f"{rec['significant_share']:.0%}" in text
        assert f"{rec['split_half_spearman']:.2f}" in text
        assert rec["evidence"] in text and rec["evidence_text"] in text
    # the layer with evidence has a full section, the others a row only
    assert 'id="layer-layer3-0-conv1" class="layer"' in html
    assert 'class="layer" data-layer="conv1"' not in html
    assert "1 of 4 layers carries strong evidence" in html
    assert "more images are needed" in html


def test_layer_without_evidence_says_more_images_are_needed(tmp_path):
    result = hand_result(LAYERS, evidence=False)  # the layer columns are derived
    ev = run_evidence(result)
    assert ev.evidence.tolist() == ["none"] * 4
    # derived with pcace.stats.evidence's rules, the same that rank applies
    assert all("use more images" in t for t in ev.evidence_text)
    assert all("N = 300" in t for t in ev.evidence_text)
    result.save(tmp_path)
    html = write_report(tmp_path, progress=False).read_text(encoding="utf-8")
    assert "No layer carries evidence" in html
    assert html.count('class="layer"') == 3  # the best few, drawn for orientation


def test_null_channel_is_greyed_in_table_and_figures(tmp_path):
    result = hand_result(LAYERS[:2], strong=("conv1",), significant_col=False)  # from q_value
    result.save(tmp_path)
    html = write_report(tmp_path, progress=False).read_text(encoding="utf-8")
    ch = result.channels
    for rec in ch.to_dict("records"):
        row = re.search(rf'<tr data-layer="{rec["layer"]}" data-channel="{rec["channel"]}"'
                        r'( class="([^"]*)")?>', html)
        classes = (row.group(2) or "").split()
        assert ("ns" in classes) == (rec["q_value"] > 0.05), rec
        if rec["q_value"] <= 0.05 and rec["rank"] <= 10:
            assert "top" in classes
    fig = channel_ranking(result, "conv1", top=12)
    ax_all, ax_top = fig.axes
    colours = ax_all.collections[-1].get_facecolors()
    grey = np.array(__import__("matplotlib").colors.to_rgba(CHANCE_COLOUR))
    chance = (ch[ch.layer == "conv1"].sort_values("pcace", ascending=False).q_value > 0.05)
    is_grey = np.isclose(colours, grey).all(1)
    assert is_grey.tolist() == chance.tolist()
    assert "9 beat the null" in ax_all.get_title(loc="left")
    bars = [p.get_facecolor() for p in ax_top.patches]
    assert [np.allclose(b, grey) for b in bars] == chance.tolist()
    over = layer_overview(result).axes[0]
    points = [c for c in over.collections if type(c).__name__ == "PathCollection"]
    assert any(np.isclose(c.get_facecolors()[:, :3], grey[:3]).all(1).any() for c in points)


def test_run_without_null_says_none_was_computed(tmp_path):
    result = hand_result(LAYERS, null=False)
    assert run_evidence(result).evidence.tolist() == ["unknown"] * 4
    result.save(tmp_path)
    html = write_report(tmp_path, progress=False).read_text(encoding="utf-8")
    assert "No permutation null was computed" in html
    assert 'class="ns"' not in html and "beats null" not in html


def test_bootstrap_sentence_beside_the_ranking(tmp_path):
    result = hand_result(LAYERS[:1], strong=("conv1",))
    result.channels = result.channels.assign(ci_low=result.channels.pcace - 0.3,
                                             ci_high=result.channels.pcace - 0.05)
    result.save(tmp_path)
    html = write_report(tmp_path, progress=False).read_text(encoding="utf-8")
    caption = re.search(r'<figure id="fig-ranking_conv1">.*?</figure>', html).group(0)
    assert "lies below the raw PCACE value" in caption


def test_result_html_for_notebooks():
    result = hand_result(LAYERS, strong=("layer3.0.conv1",))
    html = result_html(result)
    assert html.startswith('<div class="pcace-result">') and html.endswith("</div>")
    assert html.count("data-layer-row=") == len(LAYERS)
    assert "hand-written sentence for conv1" in html and "<img" in html
    assert "http" not in html and "<script" not in html and "href=" not in html
    assert "<img" not in result_html(result, overview=False)


def test_many_layer_report_stays_small(tmp_path):
    """A 55-layer CIFAR ResNet-56 (random weights) with assets: the report stays under
    10 MB, draws only the best few layers in full, and its navigation wraps."""
    from pcace.viz import collect_assets
    from pcace.zoo import CifarResNet

    torch.manual_seed(0)
    model = CifarResNet(blocks_per_stage=9).eval()
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 55
    result = hand_result(convs, channels=16)
    images = torch.randn(24, 3, 32, 32)
    result.scores = model(images)[:, 3].detach().double().numpy()
    result.save(tmp_path)
    collect_assets(tmp_path, model, images, result, featurevis_steps=4, progress=False)
    path = write_report(tmp_path, progress=False)
    html = path.read_text(encoding="utf-8")
    assert path.stat().st_size < 10e6
    assert html.count('class="layer"') == 3
    assert html.count("data-layer-row=") == 55
    assert html.count('class="chip ') == 55
    # overview, CAM; per full layer ranking, maps, overlay (no ACE: a hand-built result holds
    # no principal components), and feature visualisations where one clears the bar, else a
    # note with the numbers
    figures = sorted(p.name for p in (tmp_path / "figures").iterdir())
    pictures = [f for f in figures if f.startswith("featurevis_")]
    assert len(figures) == 2 + 3 * 3 + len(pictures)
    assert html.count("Feature visualisations not shown") == 3 - len(pictures)


def test_demo_report_has_activation_maps(tmp_path):
    from pcace.cli.demo import run_demo, summary

    result = run_demo(out=tmp_path, progress=False, epochs=1, images=60, permutations=19)
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    for layer in ("conv1", "conv2"):
        for kind in ("maps", "overlay", "ace"):
            assert f'alt="{kind}_{layer}"' in html
    # feature visualisations: a figure, or a note saying why not with the numbers
    pictures = sum(f'alt="featurevis_{layer}"' in html for layer in ("conv1", "conv2"))
    assert html.count("Feature visualisations not shown") == 2 - pictures
    assert 'alt="weighted_vs_cam"' in html
    assert result.manifest["demo"]["report"] == str(tmp_path / "report.html")
    assert f"Report: {tmp_path / 'report.html'} (open it in a browser)" in summary(result)


def test_full_sections_are_capped_to_the_strongest_layers():
    from pcace.viz.evidence import MAX_FULL, full_layers

    names = [f"block{i}.conv" for i in range(20)]
    result = hand_result(names, strong=tuple(names[5:]))
    chosen = full_layers(result)
    assert len(chosen) == MAX_FULL
    assert chosen == [n for n in names if n in chosen]  # network order
    assert set(chosen) <= set(names[5:])


def test_the_demo_shows_a_finding():
    # the logit of 3 over all 1,797 digits (it varies most there): at least one layer's
    # ranking is strong, and the print-out leads with it
    from pcace.cli.demo import run_demo, summary

    result = run_demo(out=None, progress=False, report=False)
    assert result.manifest["data"]["n_images"] == 1797
    assert (result.layers.evidence == "strong").any()
    text = summary(result)
    assert "Strong layers" in text and "Answer: 0 of" not in text
