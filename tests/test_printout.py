"""The account of a run leads with the answer and fits on a screen (issue 27)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pcace.core.voice import speaking_cli
from pcace.results.printout import brief_summary, compress_names, summary_text
from pcace.results.result import PCACEResult


def _resnet56_like(tmp_path=None) -> PCACEResult:
    """55 layers as a ResNet-56 names them: 4 strong, 21 weak, 30 none."""
    names = ["conv1"] + [f"layer{s}.{b}.conv{c}" for s in (1, 2, 3) for b in range(9)
                         for c in (1, 2)]
    assert len(names) == 55
    rng = np.random.default_rng(0)
    layers, channels = [], []
    for i, name in enumerate(names):
        if i >= 51:
            kind = ("strong", 0.9, 0.92, 0.85, 0.97)
        elif i >= 30:
            kind = ("weak", 1.0, 0.31, 0.06, 0.51)
        else:
            kind = ("none", 0.0, 0.1, -0.3, 0.4)
        evidence, share, rho, low, high = kind
        c = 64 if i > 36 else 16
        layers.append({"layer": name, "channels": c, "median": 0.4, "median_adj": 0.1,
                       "significant_share": share, "split_half_spearman": rho,
                       "split_half_spearman_low": low, "split_half_spearman_high": high,
                       "evidence": evidence, "evidence_text": f"{evidence} at N = 300"})
        values = np.sort(rng.uniform(0.2, 0.9, c))[::-1]
        for r, v in enumerate(values):
            channels.append({"layer": name, "channel": int(rng.integers(c)), "pcace": v,
                             "rank": r + 1, "significant": share > 0})
    manifest = {"data": {"n_images": 300, "skipped_images": 2}, "permutations": 199,
                "alpha": 0.05, "target_description": "logit of class 5 (dog)",
                "timings": {"total": 312.0, "stages": {"forward_and_capture": 40.0,
                                                       "reduce": 100.0, "ace": 150.0,
                                                       "null": 10.0, "split_half": 12.0}}}
    return PCACEResult(pd.DataFrame(channels), pd.DataFrame(layers), manifest,
                       run_dir=tmp_path)


def test_a_55_layer_account_fits_a_screen_and_names_the_report(tmp_path):
    (tmp_path / "report.html").write_text("<html></html>")
    result = _resnet56_like(tmp_path)
    text = str(result)
    lines = text.splitlines()
    assert len(lines) <= 35, text
    assert lines[0] == "PCACE over 300 images (2 unreadable images skipped), score: logit of " \
        "class 5 (dog)"
    assert lines[1] == "Answer: 4 of 55 layers strong at N = 300."
    # the strong layers come before the groups of the others
    assert text.index("layer3.8.conv2") < text.index("30 layers, none")
    assert "conv1-layer2.5.conv1: 30 layers, none" in text
    assert "layer2.5.conv2-layer3.6.conv2: 21 layers, weak" in text
    assert "below 0.50, or an interval reaching 0, is not reproducible" in text  # thresholds
    assert text.splitlines()[-1] == f"Report: {tmp_path / 'report.html'} (open it in a browser)"
    assert "Cost: forward pass 40 s, reduce 100 s, ace 2.5 min" in text
    full = summary_text(result, verbose=True)
    assert len(full.splitlines()) > 55  # every layer's row


def test_pointers_are_in_the_callers_words(tmp_path):
    result = _resnet56_like(tmp_path)
    api = brief_summary(result, run_dir=tmp_path)
    assert "result.summary(verbose=True)" in api and "pcace.viz.write_report(" in api
    assert "--verbose" not in api
    with speaking_cli():
        cli = brief_summary(result, run_dir=tmp_path)
    assert f"`pcace show {tmp_path}`" in cli and f"`pcace report {tmp_path}`" in cli
    assert "pcace.viz" not in cli and "verbose=True" not in cli


def test_names_compress_to_ranges():
    order = [f"l{i}" for i in range(10)]
    assert compress_names(["l0", "l1", "l2", "l5"], order) == "l0-l2, l5"
    assert compress_names(["l0", "l2", "l4", "l6", "l8"], order) == \
        "l0, l2, l4 and 2 more range(s)"
