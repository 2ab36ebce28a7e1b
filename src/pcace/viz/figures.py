"""Figures drawn from a run's tables: the layer overview, a layer's ranking, ACE transforms.

Each function returns a :class:`matplotlib.figure.Figure` (no pyplot state is touched), so
the figures display in a notebook and save with ``fig.savefig(path)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from ._common import FULL_WIDTH, new_figure
from .evidence import significance

#: At most this many jittered points per layer in the overview (a random, seeded subset).
MAX_POINTS = 400
ACCENT = "#d95f02"
TOP_COLOUR = "#1b9e77"
NULL_COLOUR = "#bbbbbb"
#: Channels that do not beat the permutation null.
CHANCE_COLOUR = "#c8c8c8"


def _layers_in_order(result: Any) -> list[str]:
    layers = result.layers
    if layers is not None and not layers.empty:
        return layers.sort_values("order").layer.tolist()
    ch = result.channels
    order = ch.groupby("layer").layer_order.first().sort_values() if "layer_order" in ch \
        else pd.Series(range(ch.layer.nunique()), index=ch.layer.unique())
    return order.index.tolist()


def _null_band(result: Any, layer: str) -> tuple[float, float] | None:
    """Mean null value and null 95th percentile of a layer, when the run computed a null."""
    ch = result.channels
    if {"null_mean", "null_q95"} <= set(ch.columns):
        sub = ch[ch.layer == layer]
        lo, hi = sub.null_mean.mean(), sub.null_q95.mean()
        if np.isfinite(lo) and np.isfinite(hi):
            return float(lo), float(hi)
    ly = result.layers
    if ly is not None and {"null_mean", "null_q95"} <= set(ly.columns):
        row = ly[ly.layer == layer]
        if not row.empty:
            lo, hi = float(row.null_mean.iloc[0]), float(row.null_q95.iloc[0])
            if np.isfinite(lo) and np.isfinite(hi):
                return lo, hi
    return None


def layer_overview(result: Any, *, seed: int = 0) -> Figure:
    """Distribution of the channels' PCACE values of every ranked layer, in network order.

    One row per layer (first layer at the top): a box plot of its channels' values with
    each channel as a jittered point, the median marked, and -- when the run computed a
    permutation null -- a grey band from the layer's mean null value to its null 95th
    percentile (values inside the band are what independent data would give).

    Parameters
    ----------
    result : PCACEResult
        A run (from :func:`pcace.rank` or :func:`pcace.load`).
    seed : int
        Seed of the jitter and of the point subsample of large layers.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> from pcace.viz import layer_overview
    >>> fig = layer_overview(result)  # doctest: +SKIP
    >>> fig.savefig("overview.png")  # doctest: +SKIP
    """
    names = _layers_in_order(result)
    if not names:
        raise ValueError("the run has no ranked layers to draw")
    ch = result.channels
    sig_all = significance(ch)
    rng = np.random.default_rng(seed)
    top_in, bottom_in = 0.85, 0.6
    per_row = 0.5 if len(names) <= 12 else 0.3
    height = min(top_in + bottom_in + max(1.2, per_row * len(names)), 40.0)
    fig = new_figure(FULL_WIDTH * 0.82, height)
    ax = fig.add_axes((0.2, bottom_in / height, 0.76, 1.0 - (top_in + bottom_in) / height))
    ys = np.arange(len(names))[::-1]
    has_null = False
    for y, name in zip(ys, names, strict=True):
        mask = (ch.layer == name).to_numpy()
        values = ch.loc[mask, "pcace"].to_numpy(dtype=float)
        sig = sig_all.to_numpy()[mask] if sig_all is not None else np.ones(values.size, bool)
        band = _null_band(result, name)
        if band is not None:
            has_null = True
            ax.fill_betweenx([y - 0.42, y + 0.42], band[0], band[1], color=NULL_COLOUR,
                             alpha=0.6, lw=0, zorder=0)
        if values.size == 0:
            continue
        ax.boxplot(values, positions=[y], orientation="horizontal", widths=0.6,
                   showfliers=False, patch_artist=True, zorder=1,
                   boxprops={"facecolor": "#e8eef7", "edgecolor": "#4a6fa5"},
                   whiskerprops={"color": "#4a6fa5"}, capprops={"color": "#4a6fa5"},
                   medianprops={"color": ACCENT, "lw": 2.5})
        pick = np.arange(values.size) if values.size <= MAX_POINTS else \
            rng.choice(values.size, MAX_POINTS, replace=False)
        jitter = rng.uniform(-0.22, 0.22, pick.size)
        colours = np.where(sig[pick], "#333333", CHANCE_COLOUR)
        ax.scatter(values[pick], y + jitter, s=9 if len(names) <= 12 else 6, c=colours,
                   alpha=0.6, lw=0, zorder=2)
    labels = [f"{n}  ({int((ch.layer == n).sum())} ch)" for n in names]
    ax.set_yticks(ys, labels, fontsize=9 if len(names) <= 24 else 7)
    ax.set_ylim(-0.7, len(names) - 0.3)
    ax.set_xlim(-0.02, 1.02)
    ax.set_xlabel("PCACE (maximal correlation of a channel's maps with the score)")
    ax.grid(axis="x", color="#dddddd", lw=0.6)
    ax.set_axisbelow(True)
    _overview_legend(fig, height, sig_all is not None, has_null)
    fig.suptitle("PCACE of each layer's channels (network order, first layer at the top)",
                 fontsize=11, x=0.02, ha="left", y=1 - 0.08 / height, va="top")
    return fig


def _overview_legend(fig: Figure, height: float, has_significance: bool,
                     has_null: bool) -> None:
    """The overview's legend: box, median, channel dots and, when drawn, the null band."""
    handles = [Patch(facecolor="#e8eef7", edgecolor="#4a6fa5", label="quartiles (box)"),
               Line2D([], [], color=ACCENT, lw=2.5, label="median"),
               Line2D([], [], marker="o", ls="", color="#333333", ms=4, label="one channel")]
    if has_significance:
        handles[-1].set_label("channel beating the null")
        handles.append(Line2D([], [], marker="o", ls="", color=CHANCE_COLOUR, ms=4,
                              label="not beating it"))
    if has_null:
        handles.append(Patch(facecolor=NULL_COLOUR, label="null: mean to 95th pct"))
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.2, 1 - 0.36 / height),
               ncols=min(len(handles), 5), fontsize=8, frameon=False, borderaxespad=0)


def channel_ranking(result: Any, layer: str, top: int = 10) -> Figure:
    """A layer's channels sorted by PCACE, with the ``top`` channels labelled.

    Left: every channel of the layer, sorted, the top ones in colour (the permutation
    null's 95th percentile as a dashed line when the run has one). Channels that do not
    beat the null (``significant`` false, or ``q_value > 0.05``) are light grey, dead ones
    grey, and the "top" shading covers only the leading channels that do beat it.
    Right: the top channels as labelled bars with their values (grey bars: not beating the
    null). Error bars show the bootstrap interval (``ci_low``, ``ci_high``) when the run
    computed one; being bias-corrected, it can lie below the raw value.

    Parameters
    ----------
    result : PCACEResult
        A run.
    layer : str
        One of the run's layers.
    top : int
        How many channels to label.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> from pcace.viz import channel_ranking
    >>> fig = channel_ranking(result, "conv2", top=5)  # doctest: +SKIP
    """
    sub = result.channels[result.channels.layer == layer]
    if sub.empty:
        raise ValueError(f"no layer {layer!r} in this run; layers: {_layers_in_order(result)}")
    sub = sub.sort_values("pcace", ascending=False).reset_index(drop=True)
    top = max(1, min(int(top), len(sub)))
    has_ci = {"ci_low", "ci_high"} <= set(sub.columns) and sub.ci_low.notna().any()
    fig = new_figure(FULL_WIDTH, 3.6)
    ax_all = fig.add_axes((0.07, 0.16, 0.5, 0.7))
    ax_top = fig.add_axes((0.71, 0.16, 0.26, 0.7))
    sig_col = significance(sub)
    sig = np.ones(len(sub), bool) if sig_col is None else sig_col.to_numpy(dtype=bool)
    _sorted_channels_panel(ax_all, sub, layer, top, sig, sig_col is not None, has_ci)
    _top_channels_panel(ax_top, sub.head(top), sig[:top], has_ci)
    return fig


def _sorted_channels_panel(ax: Any, sub: pd.DataFrame, layer: str, top: int, sig: np.ndarray,
                           has_null: bool, has_ci: bool) -> None:
    """:func:`channel_ranking`'s left panel: all channels of ``sub`` (sorted best first)."""
    x = np.arange(1, len(sub) + 1)
    values = sub.pcace.to_numpy(dtype=float)
    dead = sub.dead.to_numpy(dtype=bool) if "dead" in sub else np.zeros(len(sub), bool)
    colours = np.where(x <= top, TOP_COLOUR, "#4a6fa5")
    colours = np.where(sig, colours, CHANCE_COLOUR)
    colours = np.where(dead, NULL_COLOUR, colours)
    # "top" shading only over the leading run of channels that beat the null
    shaded = int(np.argmin(sig[:top])) if not sig[:top].all() else top
    if has_ci:  # drawn as segments: a bias-corrected interval may lie wholly below the value
        ax.vlines(x, sub.ci_low.to_numpy(float), sub.ci_high.to_numpy(float),
                  color="#999999", lw=0.8, zorder=1)
    ax.scatter(x, values, c=colours, s=14 if len(sub) <= 128 else 6, zorder=2, lw=0)
    ax.plot(x, values, color="#4a6fa5", lw=0.6, alpha=0.5, zorder=1)
    if "null_q95" in sub and sub.null_q95.notna().any():
        ax.axhline(float(sub.null_q95.mean()), ls="--", color="#777777", lw=1,
                   label="null 95th percentile (mean)")
        ax.legend(fontsize=8, loc="lower left", frameon=False)
    if shaded:
        ax.axvspan(0.5, shaded + 0.5, color=TOP_COLOUR, alpha=0.08, lw=0)
    ax.set_xlim(0, len(sub) + 1)
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel("rank within the layer")
    ax.set_ylabel("PCACE")
    if not has_null:
        what = f"top {top} shaded; no permutation null computed"
    else:
        what = (f"{int(sig.sum())} beat the null (q \u2264 0.05), "
                + (f"top {shaded} of them shaded" if shaded else "none in the top")
                + "; the others light grey")
    ax.set_title(f"{layer}: all {len(sub)} channels, sorted;\n{what}"
                 + (f"; {int(dead.sum())} dead" if dead.any() else ""),
                 fontsize=10, loc="left")
    ax.grid(color="#eeeeee", lw=0.6)
    ax.set_axisbelow(True)


def _top_channels_panel(ax: Any, best: pd.DataFrame, sig: np.ndarray, has_ci: bool) -> None:
    """:func:`channel_ranking`'s right panel: the ``best`` channels as labelled bars."""
    top = len(best)
    ys = np.arange(top)[::-1]
    ax.barh(ys, best.pcace, color=np.where(sig, TOP_COLOUR, CHANCE_COLOUR), height=0.7)
    if has_ci:
        lo, hi = best.ci_low.to_numpy(float), best.ci_high.to_numpy(float)
        ax.hlines(ys, lo, hi, color="#555555", lw=0.9)
        ax.plot(np.r_[lo, hi], np.r_[ys, ys], "|", color="#555555", ms=5)
    ax.set_yticks(ys, [f"ch {c}" for c in best.channel], fontsize=8)
    for label, ok in zip(ax.get_yticklabels(), sig, strict=True):
        label.set_color("#222222" if ok else "#999999")
    for y, v in zip(ys, best.pcace, strict=True):
        ax.text(0.02, y, f"{v:.3f}", va="center", ha="left", fontsize=7, color="white",
                fontweight="bold")
    ax.set_xlim(0, 1.0)
    ax.set_xlabel("PCACE")
    ax.set_title(f"top {top} channels" + (" (bootstrap CI)" if has_ci else "")
                 + ("" if sig.all() else "\ngrey: not beating the null"),
                 fontsize=10, loc="left")


def ace_transforms(theta: Any, phi: Any, scores: Any, components: Any, title: str, *,
                   rho: float | None = None) -> Figure:
    """The ACE transforms of one channel: theta(score) and each phi_j(PC j).

    ACE finds theta and phi_1..phi_k maximising ``corr(theta(score), sum_j phi_j(PC_j))``;
    plotting each against its argument shows the shape of the relationship (monotone,
    U-shaped, saturating, ...) that PCACE measured.

    Parameters
    ----------
    theta : array_like, shape (N,)
        The score's transform.
    phi : array_like, shape (N, k)
        The principal components' transforms.
    scores : array_like, shape (N,)
        The network's score per image.
    components : array_like, shape (N, k)
        The channel's principal-component scores.
    title : str
        Figure title (name the layer and channel).
    rho : float, optional
        The maximal correlation, added to the title.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import numpy as np, pcace
    >>> z = np.random.default_rng(0).normal(size=(200, 2))
    >>> s = z[:, 0] ** 2
    >>> r = pcace.ace(z, s)
    >>> fig = ace_transforms(r.theta, r.phi, s, z, "toy", rho=float(r.rho))
    >>> len(fig.axes)
    3
    """
    theta = np.asarray(theta, dtype=float).reshape(-1)
    scores = np.asarray(scores, dtype=float).reshape(-1)
    phi = np.asarray(phi, dtype=float)
    z = np.asarray(components, dtype=float)
    if not (len(scores) == len(theta) == len(phi) == len(z)):
        raise ValueError("theta, phi, scores and components need the same number of images; "
                         f"got {len(theta)}, {len(phi)}, {len(scores)}, {len(z)}")
    phi = phi.reshape(len(theta), -1)
    z = z.reshape(len(theta), -1)
    if phi.shape != z.shape:
        raise ValueError(f"phi and components must have the same shape; got {phi.shape} and "
                         f"{z.shape}")
    k = phi.shape[1]
    n_panels = 1 + k
    fig = new_figure(min(FULL_WIDTH, 2.9 * n_panels + 0.6), 3.1)
    width = 0.86 / n_panels
    axes = [fig.add_axes((0.07 + i * (width + 0.02), 0.17, width - 0.05, 0.62))
            for i in range(n_panels)]
    _transform_panel(axes[0], scores, theta, "score", "θ(score)", ACCENT)
    for j in range(k):
        _transform_panel(axes[1 + j], z[:, j], phi[:, j], f"PC {j + 1}", f"φ{j + 1}(PC {j + 1})",
                         "#4a6fa5")
    full = title if rho is None else f"{title}   (maximal correlation {rho:.3f})"
    fig.suptitle(full, fontsize=11, x=0.02, ha="left", y=0.97)
    fig.text(0.02, 0.87, "each dot is one image; the line is the fitted transform",
             fontsize=8, color="#555555")
    return fig


def _transform_panel(ax, x: np.ndarray, fx: np.ndarray, xlabel: str, title: str,
                     colour: str) -> None:
    order = np.argsort(x, kind="stable")
    ax.scatter(x, fx, s=6, color="#999999", alpha=0.6, lw=0)
    ax.plot(x[order], fx[order], color=colour, lw=1.6)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_title(title, fontsize=10)
    ax.tick_params(labelsize=8)
    ax.grid(color="#eeeeee", lw=0.6)
    ax.set_axisbelow(True)


def class_atlas(result: Any, layer: str | None = None, *, alpha: float = 0.05) -> Figure:
    """Layers x classes evidence of a many-class run, and one layer's channel selectivity.

    For a run with several targets (``target="all"``) or one per label
    (``per_label=True``). Left: one cell per (layer, class), the share of the layer's
    channels with ``q <= alpha`` when the run has a permutation null, else the median
    null-corrected value (``pcace_adj``), else the median raw value
    (:func:`pcace.stats.atlas.class_evidence`). Right: for ``layer`` (default the last), one
    row per channel, its value for each class, channels grouped by the class they carry
    most information about; dots mark ``q <= alpha`` (:func:`pcace.stats.atlas.selectivity`).

    Parameters
    ----------
    result : PCACEResult
        A run with several targets or classes.
    layer : str, optional
        The layer whose channels are shown on the right (default: the last layer).
    alpha : float
        False-discovery rate for "significant".

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> from pcace.viz import class_atlas
    >>> atlas = pcace.rank(model, (images, labels), per_label=True)  # doctest: +SKIP
    >>> class_atlas(atlas).savefig("atlas.png")  # doctest: +SKIP
    """
    from ..stats.atlas import class_evidence, selectivity

    evidence, measure = class_evidence(result, alpha)
    names = list(evidence.index)
    if not names:
        raise ValueError("the run has no scored layers")
    layer = layer or names[-1]
    table = selectivity(result, layer, alpha)
    classes = list(evidence.columns)
    values = table[classes].to_numpy(dtype=float)
    fig = new_figure(FULL_WIDTH, max(3.6, 0.28 * len(names) + 1.6))
    ax_ev = fig.add_axes((0.17, 0.2, 0.36, 0.68))
    ax_ch = fig.add_axes((0.63, 0.2, 0.3, 0.68))
    share = measure.startswith("share")
    image = ax_ev.imshow(evidence.to_numpy(dtype=float), aspect="auto", cmap="viridis",
                         vmin=0, vmax=1 if share else None, interpolation="nearest")
    ax_ev.set_yticks(range(len(names)), names, fontsize=7)
    ax_ev.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=7)
    ax_ev.set_title(f"layers x classes: {measure}", fontsize=9, loc="left")
    b = int(result.manifest.get("permutations") or 0)
    if share and b:
        # with B permutations the smallest p is 1 / (B + 1): BH over a layer of C channels
        # passes any of them only when about C / (alpha (B + 1)) beat the whole null
        least = min(1.0, 1.0 / (alpha * (b + 1)))
        ax_ev.set_xlabel(f"B = {b} permutations: a layer shows significant channels only "
                         f"when at least ~{least:.0%} of them beat every permutation",
                         fontsize=7)
    fig.colorbar(image, ax=ax_ev, fraction=0.05, pad=0.02)
    scaled = "pcace_adj" if "pcace_adj" in result.channels.columns else "PCACE"
    grid = ax_ch.imshow(values, aspect="auto", cmap="magma", interpolation="nearest",
                        vmin=min(0.0, float(np.nanmin(values))), vmax=1)
    if "q_value" in result.channels.columns:
        marked = [(i, j) for i, row in enumerate(table.classes) for j, c in enumerate(classes)
                  if c in row.split()]
        if marked:
            rows, cols = zip(*marked, strict=True)
            ax_ch.scatter(cols, rows, s=4, c="white", lw=0)
    ax_ch.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=7)
    ax_ch.set_ylabel(f"{len(table)} channels, grouped by best class", fontsize=8)
    ax_ch.set_yticks([])
    ax_ch.set_title(f"{layer}: {scaled} per channel and class", fontsize=9, loc="left")
    fig.colorbar(grid, ax=ax_ch, fraction=0.05, pad=0.02)
    return fig
