"""The plain-text account of a run: ``print(result)``, ``result.summary()`` and what the
``pcace`` command prints.

The default account (:func:`brief_summary`) leads with the answer: the layers with
strong evidence and their top channels, then one line per group of the other layers
(names compressed to ranges, with the reason and the thresholds it was judged by), the
cost per stage and where to look next; a 55-layer network fits on one screen. The full
account (:func:`text_summary`, ``--verbose``, ``pcace show``) lists every layer: the
share of channels that beat the permutation null, the median null-corrected value, how
reproducible the ranking is between two halves of the images, and a verdict, then the
top channels of the layers that carry evidence.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from ..core.voice import option

__all__ = ["brief_summary", "many_summary", "summary_text", "text_summary"]

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
                     f"({_null_words(result.manifest)}, BH q <= 0.05; split-half "
                     "reproducibility).")
    elif not has_null:
        lines.append(f"No permutation null was computed ({option('permutations', 0)}): "
                     "these values are "
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
    exact = result.manifest.get("null", "exact") == "exact"
    if has_null and exact and b and 1 / (b + 1) > 0.01:
        lines.append(f"Note: {b} permutations give p-values no smaller than 1/{b + 1} = "
                     f"{1 / (b + 1):.3f}; after Benjamini-Hochberg over a layer's channels, few "
                     "permutations can leave no channel beating chance in a layer where all "
                     "carry information (use 100 or more).")
    return "\n".join(lines)


# ------------------------------------------------------------ the account that leads


#: Strong layers shown with their top channels by default; the others are counted.
MAX_STRONG_SHOWN = 8


def _thresholds(alpha: float) -> dict[str, str]:
    """The verdict's thresholds in words (the rules of :func:`pcace.stats.evidence.verdict`)."""
    from ..stats.evidence import NOT_REPRODUCIBLE, REPRODUCIBLE, REPRODUCIBLE_LOW

    return {"strong": f"strong = at least half of the channels beat chance (q <= {alpha:g}) "
                      f"and the split-half Spearman is >= {REPRODUCIBLE:.2f} with its 95% "
                      f"interval's low end >= {REPRODUCIBLE_LOW:.2f}",
            "partly": f"reproducible needs >= {REPRODUCIBLE:.2f} with the low end >= "
                      f"{REPRODUCIBLE_LOW:.2f}",
            "not": f"below {NOT_REPRODUCIBLE:.2f}, or an interval reaching 0, is not "
                   "reproducible"}


def _reading(rho: float, low: float) -> str:
    """not / partly / reproducible / unknown, by the thresholds of :mod:`pcace.stats.evidence`."""
    from ..stats.evidence import NOT_REPRODUCIBLE, REPRODUCIBLE, REPRODUCIBLE_LOW

    if not math.isfinite(rho):
        return "unknown"
    if rho < NOT_REPRODUCIBLE or (math.isfinite(low) and low <= 0.0):
        return "not"
    if rho >= REPRODUCIBLE and (not math.isfinite(low) or low >= REPRODUCIBLE_LOW):
        return "reproducible"
    return "partly"


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _share_class(share: float) -> str:
    if not math.isfinite(share):
        return "no null"
    return "none" if share == 0 else "most" if share >= 0.5 else "some"


def _span(values: list[float], fmt: str) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "-"
    low, high = min(finite), max(finite)
    return format(low, fmt) if format(low, fmt) == format(high, fmt) else \
        f"{format(low, fmt)} to {format(high, fmt)}"


def _group_reason(rows: list[pd.Series], alpha: float) -> str:
    """Why the layers of a group got their verdict, with the numbers and the thresholds."""
    share = _share_class(_float(rows[0].get("significant_share")))
    reading = _reading(_float(rows[0].get("split_half_spearman")),
                       _float(rows[0].get("split_half_spearman_low")))
    shares = [_float(r.get("significant_share")) for r in rows]
    rhos = [_float(r.get("split_half_spearman")) for r in rows]
    split = _span(rhos, "+.2f")
    if len(rows) == 1 and math.isfinite(_float(rows[0].get("split_half_spearman_low"))):
        split += (f" [{_number(rows[0].get('split_half_spearman_low'), '.2f')}, "
                  f"{_number(rows[0].get('split_half_spearman_high'), '.2f')}]")
    parts = {"no null": "no permutation null was computed",
             "none": f"no channel beats chance (q <= {alpha:g})"}
    first = parts.get(share, f"{_span(shares, '.0%')} of the channels beat chance")
    words = _thresholds(alpha)
    second = {"unknown": "reproducibility not measured",
              "reproducible": f"order reproducible (split-half {split})",
              "partly": f"order partly reproducible (split-half {split}; {words['partly']})",
              "not": f"order not reproducible (split-half {split}; {words['not']})"}[reading]
    advice = ": more images would tell" if reading in ("not", "partly") or share == "none" \
        else ""
    return f"{first}, {second}{advice}"


def compress_names(names: list[str], order: list[str], most: int = 3) -> str:
    """Layer names as ranges of neighbours in network order: ``"a-c, e"``.

    Parameters
    ----------
    names : list of str
        The layers to name.
    order : list of str
        Every layer of the run, in network order.
    most : int
        Ranges written out; the rest are counted.

    Returns
    -------
    str

    Examples
    --------
    >>> compress_names(["b", "c", "d", "f"], list("abcdefg"))
    'b-d, f'
    """
    position = {name: i for i, name in enumerate(order)}
    runs: list[list[str]] = []
    for name in sorted(names, key=lambda n: position.get(n, len(order))):
        if runs and position.get(name, -9) == position.get(runs[-1][-1], -9) + 1:
            runs[-1].append(name)
        else:
            runs.append([name])
    texts = [run[0] if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs]
    more = len(texts) - most
    return ", ".join(texts[:most]) + (f" and {more} more range(s)" if more > 0 else "")


def _strong_lines(result: Any, strong: pd.DataFrame, top: int) -> list[str]:
    shown = strong
    if len(strong) > MAX_STRONG_SHOWN:  # the clearest ones, in network order
        keep = strong.sort_values(["significant_share", "split_half_spearman"],
                                  ascending=False).head(MAX_STRONG_SHOWN).index
        shown = strong.loc[sorted(keep)]
    width = max(len(str(n)) for n in shown.layer)
    lines = []
    for _, layer in shown.iterrows():
        rows = result.channels[result.channels.layer == layer["layer"]].sort_values("rank")
        share = _number(layer.get("significant_share"), ".0%")
        low, high = layer.get("split_half_spearman_low"), layer.get("split_half_spearman_high")
        interval = f" [{_number(low, '.2f')}, {_number(high, '.2f')}]" if not pd.isna(low) \
            else ""
        lines.append(f"  {layer['layer']:<{width}}  {int(layer['channels'])} channels, {share} "
                     f"beat chance, split-half "
                     f"{_number(layer.get('split_half_spearman'), '+.2f')}{interval}")
        lines.append(f"  {'':<{width}}  top: {_channels(rows.head(top))}")
    if len(strong) > len(shown):
        lines.append(f"  and {len(strong) - len(shown)} more strong layer(s): see the full "
                     "tables")
    return lines


def _rest_lines(layers: pd.DataFrame, alpha: float) -> list[str]:
    """One entry per group of non-strong layers with the same verdict and reason."""
    order = [str(n) for n in layers.layer]
    groups: dict[tuple, list[pd.Series]] = {}
    for _, layer in layers[layers.evidence != "strong"].iterrows():
        key = (layer["evidence"], _share_class(_float(layer.get("significant_share"))),
               _reading(_float(layer.get("split_half_spearman")),
                        _float(layer.get("split_half_spearman_low"))))
        groups.setdefault(key, []).append(layer)
    lines = []
    for (evidence, _, _), rows in sorted(groups.items(),
                                         key=lambda kv: (kv[0][0] != "weak", -len(kv[1]))):
        names = compress_names([str(r["layer"]) for r in rows], order)
        count = f"{len(rows)} layers, " if len(rows) > 1 else ""
        lines.append(f"  {names}: {count}{evidence}")
        lines.append(f"      {_group_reason(rows, alpha)}")
    return lines


def _unjudged_lines(result: Any, top: int) -> list[str]:
    """Without any check of the values: the layers with the highest medians."""
    layers = result.layers
    best = layers.sort_values("median", ascending=False).head(MAX_STRONG_SHOWN)
    lines = [f"Highest median PCACE ({len(best)} of {len(layers)} layers), top channels:"]
    width = max(len(str(n)) for n in best.layer)
    for _, layer in best.iterrows():
        rows = result.channels[result.channels.layer == layer["layer"]].sort_values("rank")
        lines.append(f"  {layer['layer']:<{width}}  median {layer['median']:.3f}  top: "
                     f"{_channels(rows.head(top))}")
    return lines


def _header(result: Any) -> str:
    data = result.manifest.get("data", {}) or {}
    n = data.get("n_images")
    skipped = int(data.get("skipped_images") or 0)
    gone = f" ({skipped} unreadable image{'s' if skipped != 1 else ''} skipped)" \
        if skipped else ""
    target = result.manifest.get("target_description") or result.manifest.get("target")
    return f"PCACE over {n} images{gone}, score: {target}"


def _cost_line(result: Any) -> str | None:
    timings = result.manifest.get("timings") or {}
    stages = timings.get("stages") or {}
    names = {"forward_and_capture": "forward pass", "split_half": "split halves"}
    parts = [f"{names.get(k, k.replace('_', ' '))} {_seconds(v)}" for k, v in stages.items()
             if isinstance(v, int | float) and v >= 0.05]
    total = timings.get("total")
    if not parts and total is None:
        return None
    end = f" (total {_seconds(total)})" if isinstance(total, int | float) else ""
    return "Cost: " + (", ".join(parts) or "-") + end


def _seconds(value: float) -> str:
    value = float(value)
    if value >= 120:
        return f"{value / 60:.1f} min"
    return f"{value:.1f} s" if value < 10 else f"{value:.0f} s"


def _next_lines(result: Any, run_dir: Any, report: Any) -> list[str]:
    from pathlib import Path

    from ..core.voice import action

    demo = result.manifest.get("demo") if isinstance(result.manifest, dict) else None
    if report is None and isinstance(demo, dict) and demo.get("report"):
        report = demo["report"]
    if report is None and run_dir is not None and (Path(run_dir) / "report.html").is_file():
        report = Path(run_dir) / "report.html"
    where = {"run_dir": run_dir} if run_dir is not None else {}
    lines = [f"Full tables: {action('full_tables', **where)}"]
    if report is not None:
        lines.append(f"Report: {report} (open it in a browser)")
    elif run_dir is not None:
        lines.append(f"Report: not written; {action('write_report', run_dir=run_dir)} "
                     "writes it")
    return lines


def brief_summary(result: Any, top: int = 5, run_dir: Any = None, report: Any = None) -> str:
    """The account that leads with the answer (the default of ``print(result)``).

    Strong layers with their top ``top`` channels first, then one entry per group of the
    other layers (names as ranges, the verdict, its reason and thresholds), the cost per
    stage, and where the full tables and the report are.

    Parameters
    ----------
    result : PCACEResult
    top : int
        Channels listed per strong layer.
    run_dir : path, optional
        Where the run is saved (named in the pointers to the full tables and report).
    report : path, optional
        The report's page, when one was written.

    Returns
    -------
    str

    Examples
    --------
    >>> import torch, pcace
    >>> from pcace.zoo import mnist_cnn
    >>> res = pcace.rank(mnist_cnn(), torch.rand(40, 1, 28, 28), 3, progress=False,
    ...                  permutations=20)
    >>> brief_summary(res).splitlines()[0]
    'PCACE over 40 images, score: logit of class 3'
    """
    layers = result.layers
    alpha = float(result.manifest.get("alpha", 0.05) or 0.05)
    lines = [_header(result)]
    if "evidence" not in layers:
        lines.append("No permutation null or split-half check was computed: the values are "
                     "biased upwards by an amount that depends on N and k; read them as an "
                     "order within each layer, not as evidence.")
        lines += _unjudged_lines(result, top)
    else:
        strong = layers[layers.evidence == "strong"]
        n = result.manifest.get("data", {}).get("n_images")
        lines.append(f"Answer: {len(strong)} of {len(layers)} layers strong at N = {n}.")
        lines.append(f"  ({_thresholds(alpha)['strong']})")
        if len(strong):
            note = f" (* beats chance, q <= {alpha:g})" if "significant" in result.channels \
                else ""
            lines.append(f"Strong layers, top {top} channels{note}:")
            lines += _strong_lines(result, strong, top)
        if len(strong) < len(layers):
            lines.append("The other layers (their rankings are in channels.csv):")
            lines += _rest_lines(layers, alpha)
    b = int(result.manifest.get("permutations", 0) or 0)
    if "significant_share" in layers and b and 1 / (b + 1) > alpha / 5:
        lines.append(f"Note: {b} permutations give p-values no smaller than 1/{b + 1}; use 100 "
                     "or more before reading 'no channel beats chance'.")
    cost = _cost_line(result)
    if cost:
        lines.append(cost)
    lines += _next_lines(result, run_dir, report)
    return "\n".join(lines)


def many_summary(result: Any, top: int = 3) -> str:
    """Per (label, target) its verdict: the ones with strong layers first, with the best
    strong layer and its top channels; the others in one line each, not as findings.

    A run without the checks (no null, no split halves) lists each target's layer of
    highest median PCACE instead, said to be unjudged.

    Examples
    --------
    >>> import pandas as pd
    >>> from pcace.results.result import PCACEResult
    >>> layers = pd.DataFrame({"layer": ["a", "a"], "target": ["x", "y"], "median": [.2, .3],
    ...                        "evidence": ["weak", "strong"], "channels": [1, 1],
    ...                        "significant_share": [0.0, 1.0], "split_half_spearman": [.1, .9]})
    >>> chans = pd.DataFrame({"layer": ["a"] * 2, "target": ["x", "y"], "channel": [0, 0],
    ...                       "rank": [1, 1], "pcace": [.2, .3]})
    >>> print(many_summary(PCACEResult(chans, layers, {})))  # doctest: +ELLIPSIS
    Answer per target: 1 of 2 have a strong layer.
      (strong = at least half of the channels beat chance (q <= 0.05) and ...)
      target y  1 of 1 layers strong; best a: 100% beat chance, split-half +0.90; top 0:0.300
      target x  no strong layer (1 weak): its rankings are not findings
    """
    layers = result.layers
    keys = [k for k in ("label", "target") if k in layers.columns]
    groups = layers.groupby(keys, sort=False)
    if "evidence" not in layers.columns:
        return _many_unjudged(result, keys, groups, top)
    alpha = float(result.manifest.get("alpha", 0.05) or 0.05)
    entries = []
    for key, sub in groups:
        key = key if isinstance(key, tuple) else (key,)
        name = " / ".join(f"{k} {v}" for k, v in zip(keys, key, strict=True))
        strong = sub[sub.evidence == "strong"]
        if len(strong):
            best = strong.sort_values(["significant_share", "split_half_spearman"],
                                      ascending=False).iloc[0]
            rows = _group_channels(result.channels, keys, key, best.layer).head(top)
            text = (f"{len(strong)} of {len(sub)} layers strong; best {best.layer}: "
                    f"{_number(best.get('significant_share'), '.0%')} beat chance, split-half "
                    f"{_number(best.get('split_half_spearman'), '+.2f')}; top {_channels(rows)}")
        else:
            counts = sub.evidence.value_counts()
            text = ("no strong layer (" + ", ".join(f"{c} {e}" for e, c in counts.items())
                    + "): its rankings are not findings")
        entries.append((-len(strong), name, text))
    entries.sort(key=lambda e: e[0])  # stable: strong ones first, then the run's order
    width = max(len(e[1]) for e in entries)
    with_strong = sum(e[0] < 0 for e in entries)
    lines = [f"Answer per {' and '.join(keys)}: {with_strong} of {len(entries)} have a strong "
             "layer.", f"  ({_thresholds(alpha)['strong']})"]
    lines += [f"  {name:<{width}}  {text}" for _, name, text in entries]
    return "\n".join(lines)


def _group_channels(channels: pd.DataFrame, keys: list[str], key: tuple,
                    layer: Any) -> pd.DataFrame:
    mask = channels.layer == layer
    for k, v in zip(keys, key, strict=True):
        mask &= channels[k] == v
    return channels[mask].sort_values("rank")


def _many_unjudged(result: Any, keys: list[str], groups: Any, top: int) -> str:
    lines = [f"per {' and '.join(keys)} ({groups.ngroups}): the layer with the highest median "
             f"PCACE and its top {top} channels (unjudged: no null or split-half check ran)"]
    for key, sub in groups:
        key = key if isinstance(key, tuple) else (key,)
        best = sub.sort_values("median", ascending=False).iloc[0]
        name = " / ".join(f"{k} {v}" for k, v in zip(keys, key, strict=True))
        rows = _group_channels(result.channels, keys, key, best.layer).head(top)
        lines.append(f"  {name:<28} {best.layer:<20} median {best['median']:.3f}  top "
                     f"{_channels(rows)}")
    return "\n".join(lines)


def summary_text(result: Any, top: int = 5, verbose: bool = False, run_dir: Any = None,
                 report: Any = None) -> str:
    """The account of a run: brief by default, every layer with ``verbose``.

    A run with several targets or labels gets one line per (label, target).

    Parameters
    ----------
    result : PCACEResult
    top : int
        Channels listed per layer shown.
    verbose : bool
        The full tables (:func:`text_summary`) instead of :func:`brief_summary`.
    run_dir, report : path, optional
        Where the run and its report are.

    Returns
    -------
    str

    Examples
    --------
    >>> import torch, pcace
    >>> from pcace.zoo import mnist_cnn
    >>> res = pcace.rank(mnist_cnn(), torch.rand(40, 1, 28, 28), 3, progress=False,
    ...                  permutations=20)
    >>> "split-half [95%]" in summary_text(res, verbose=True)
    True
    """
    if len(result.targets) > 1 or "label" in result.channels.columns:
        text = _header(result) + "\n" + many_summary(result, top=min(top, 3))
        return "\n".join([text, *_next_lines(result, run_dir, report)])
    if not verbose:
        return brief_summary(result, top=top, run_dir=run_dir, report=report)
    return "\n".join([_header(result), text_summary(result, top=top),
                      *filter(None, [_cost_line(result)]),
                      *_next_lines(result, run_dir, report)[1:]])


def _null_words(manifest: dict) -> str:
    """How the run's permutation null was made, in a few words."""
    method = manifest.get("null", "exact")
    if method == "exact":
        return f"null of {manifest.get('permutations', 0)} permutations per channel"
    sizes = [record.get("pool_size", 0) for per_layer in (manifest.get("nulls") or {}).values()
             for record in per_layer.values() if isinstance(record, dict)]
    size = f" of {min(sizes):,} values" if sizes else ""
    if method == "shared":
        return f"a permutation null{size} shared by all layers"
    return f"a permutation null{size} pooled within each layer"
