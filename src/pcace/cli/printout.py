"""The plain-text account of a run that the ``pcace`` command prints.

It leads with what the numbers are worth: per layer the share of channels that beat the
permutation null, the median null-corrected value, how reproducible the ranking is
between two halves of the images, and a verdict. Top channels are listed only for layers
that carry evidence, and channels that do not beat chance are marked; for a layer without
evidence it says that more images are needed instead of showing a ranking as if it meant
something.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

__all__ = ["text_summary"]

_MARK = "*"


def _number(value: Any, fmt: str) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "-"
    return "-" if math.isnan(v) else format(v, fmt)


def _channels(rows: pd.DataFrame) -> str:
    marked = "significant" in rows
    parts = []
    for _, row in rows.iterrows():
        mark = _MARK if marked and bool(row["significant"]) else ""
        parts.append(f"{int(row['channel'])}:{row['pcace']:.3f}{mark}")
    return "  ".join(parts)


def _layer_line(layer: pd.Series) -> str:
    split = ""
    if "split_half_spearman" in layer:
        low, high = layer.get("split_half_spearman_low"), layer.get("split_half_spearman_high")
        interval = f" [{_number(low, '.2f')}, {_number(high, '.2f')}]" \
            if not pd.isna(low) else ""
        split = f"{_number(layer['split_half_spearman'], '+.2f')}{interval}"
    share = _number(layer.get("significant_share"), ".0%")
    return (f"{layer['layer']:<22} {int(layer['channels']):>4}  {layer['median']:.3f}  "
            f"{_number(layer.get('median_adj'), '+.3f'):>6}  {share:>4}  {split:<22} "
            f"{layer.get('evidence', '-')}")


def text_summary(result: Any, top: int = 5) -> str:
    """Per layer its evidence, then the top channels of the layers that carry some.

    Parameters
    ----------
    result : PCACEResult
    top : int
        Channels listed per layer with evidence.

    Returns
    -------
    str

    Examples
    --------
    >>> import torch, pcace
    >>> from pcace.zoo import mnist_cnn
    >>> res = pcace.rank(mnist_cnn(), torch.rand(40, 1, 28, 28), 3, progress=False,
    ...                  permutations=20)
    >>> "evidence" in text_summary(res)
    True
    """
    layers = result.layers
    n = result.manifest.get("data", {}).get("n_images")
    b = result.manifest.get("permutations", 0)
    lines = []
    has_null = "significant_share" in layers
    has_verdict = "evidence" in layers
    if has_verdict:
        counts = layers.evidence.value_counts()
        lines.append(f"Evidence at N = {n}: {counts.get('strong', 0)} layer(s) strong, "
                     f"{counts.get('weak', 0)} weak, {counts.get('none', 0)} none "
                     f"(null of {b} permutations, BH q <= 0.05; split-half reproducibility).")
    elif not has_null:
        lines.append("No permutation null was computed (--permutations 0): these values are "
                     "biased upwards by an amount that depends on N and k, so read them as an "
                     "order within each layer, not as evidence.")
    lines.append(f"{'layer':<22} {'ch':>4}  median  {'adj':>6}  {'sig':>4}  "
                 f"{'split-half [95%]':<22} evidence")
    for _, layer in layers.iterrows():
        lines.append(_layer_line(layer))
    shown, hidden = [], []
    for _, layer in layers.iterrows():
        if has_verdict and layer.get("evidence") == "none":
            hidden.append(layer)
        else:
            shown.append(layer)
    if shown:
        note = f" ({_MARK} beats chance, q <= 0.05)" if "significant" in result.channels else ""
        lines.append(f"Top channels{note}:")
        for layer in shown:
            rows = result.channels[result.channels.layer == layer["layer"]].sort_values("rank")
            lines.append(f"  {layer['layer']:<22} {_channels(rows.head(top))}")
            text = layer.get("evidence_text")
            if isinstance(text, str) and text and layer.get("evidence") != "strong":
                lines.append(f"  {'':<22} {text}")
    if hidden:
        # grouped by what each layer's verdict says (a check that was not run is not
        # reported as failed)
        reasons: dict[str, list[str]] = {}
        for layer in hidden:
            text = layer.get("evidence_text")
            reasons.setdefault(text if isinstance(text, str) and text else
                               "no evidence", []).append(str(layer["layer"]))
        for text, group in reasons.items():
            names = ", ".join(group[:6]) + (f" and {len(group) - 6} more" if len(group) > 6
                                            else "")
            lines.append(f"No evidence in {len(group)} layer(s) ({names}): {text}.")
        lines.append("Their rankings are not shown (channels.csv has them); a few thousand "
                     "images typically make rankings reproducible.")
    if has_null and b and 1 / (b + 1) > 0.01:
        lines.append(f"Note: {b} permutations give p-values no smaller than 1/{b + 1} = "
                     f"{1 / (b + 1):.3f}; after Benjamini-Hochberg over a layer's channels, few "
                     "permutations can leave no channel beating chance in a layer where all "
                     "carry information (use 100 or more).")
    return "\n".join(lines)
