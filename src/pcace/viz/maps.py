"""Figures drawn from saved assets: activation maps, overlays, weighted map vs CAM, feature
visualisations.

Each function takes an :class:`~pcace.viz.assets.Assets` (or a run directory holding
one) and returns a :class:`matplotlib.figure.Figure`.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.gridspec import GridSpec

from ._common import FULL_WIDTH, bare, grey, map_norm, new_figure, resize, show_image, unit_scale
from .assets import Assets, load_assets
from .featurevis import CLEAR_FACTOR, why_not_shown

TOP_COLOUR = "#1b9e77"
BOTTOM_COLOUR = "#7570b3"
OVERLAY_ALPHA = 0.55
OVERLAY_CMAP = "inferno"
#: Titles and frames of top channels that do not beat the permutation null.
CHANCE_COLOUR = "#9a9a9a"


def _as_assets(assets: Assets | str | Path) -> Assets:
    if isinstance(assets, Assets):
        return assets
    loaded = load_assets(assets)
    if loaded is None:
        raise FileNotFoundError(f"{assets} holds no assets (run_dir/assets/index.json); "
                                "collect them with pcace.viz.collect_assets")
    return loaded


def _input_panel(ax: Any, a: Any, r: int) -> Any:
    """Draw example image ``r`` with its row label; return the image."""
    image = a.images[r]
    show_image(ax, image)
    ax.set_title("input", fontsize=8)
    ax.set_ylabel(_row_label(a.examples[r]), fontsize=8, rotation=0, ha="right", va="center",
                  labelpad=6)
    return image


def _row_label(example: dict) -> str:
    score = example["score"]
    value = "" if score is None or not np.isfinite(score) else f"\nscore {score:.3g}"
    return f"{example['label']}{value}\n(image #{example['index']})"


def _map_grid(assets: Assets, layer: str, overlay: bool) -> Figure:
    a = _as_assets(assets)
    entry = a.layer(layer)
    maps = a.array(layer, "maps")
    n_img, n_maps = maps.shape[:2]
    groups = entry["groups"]
    n_top = groups.count("top")
    n_bottom = n_maps - n_top
    cell = min(1.15, (FULL_WIDTH - 2.2) / max(1, n_maps + 1))
    width = 1.6 + cell * (n_maps + 1) + 0.9
    height = 0.95 + n_img * (cell + 0.5)
    fig = new_figure(width, height)
    ratios = [1.0, 0.12] + [1.0] * n_top + ([0.22] if n_bottom else []) + [1.0] * n_bottom \
        + [0.1, 0.07]
    gs = GridSpec(n_img, len(ratios), figure=fig, width_ratios=ratios, wspace=0.06,
                  hspace=0.55, left=1.45 / width, right=1 - 0.55 / width,
                  top=1 - 0.85 / height, bottom=0.25 / height)
    cols = [2 + i for i in range(n_top)] + [3 + n_top + i for i in range(n_bottom)] \
        if n_bottom else [2 + i for i in range(n_top)]
    size = a.images.shape[1:3]
    for r in range(n_img):
        image = _input_panel(fig.add_subplot(gs[r, 0]), a, r)
        row = maps[r]
        norm, cmap = map_norm(row)
        if overlay:  # a sequential scale: a diverging one's white centre washes the image out
            lo, hi = float(row.min()), float(row.max())
            norm, cmap = Normalize(lo, max(hi, lo + 1e-12)), \
                OVERLAY_CMAP
        for j in range(n_maps):
            ax = fig.add_subplot(gs[r, cols[j]])
            channel, value = entry["channels"][j], entry["pcace"][j]
            if overlay:
                ax.imshow(grey(image), cmap="gray", vmin=0, vmax=1)
                im = ax.imshow(resize(row[j], size), cmap=cmap, norm=norm, alpha=OVERLAY_ALPHA)
            else:
                im = ax.imshow(row[j], cmap=cmap, norm=norm, interpolation="nearest")
            colour = TOP_COLOUR if groups[j] == "top" else BOTTOM_COLOUR
            dead = entry.get("dead") and entry["dead"][j]
            chance = entry.get("significant") is not None and not entry["significant"][j]
            if chance and groups[j] == "top":
                colour = CHANCE_COLOUR
            ax.set_title(f"ch {channel}\nPCACE {value:.2f}" + (" (dead)" if dead else "")
                         + (" n.s." if chance else ""), fontsize=8, color=colour)
            bare(ax)
            for spine in ax.spines.values():
                spine.set_visible(True)
                spine.set_color(colour)
                spine.set_linewidth(1.5)
        cax = fig.add_subplot(gs[r, len(ratios) - 1])
        bar = fig.colorbar(im, cax=cax)
        bar.ax.tick_params(labelsize=7)
        bar.set_label("activation", fontsize=7)
    first = fig.axes[1].get_position() if n_top else None
    if first is not None:
        x_top = (fig.axes[1].get_position().x0 + fig.axes[n_top].get_position().x1) / 2
        fig.text(x_top, 1 - 0.5 / height, f"top {n_top} by PCACE", ha="center", fontsize=9,
                 color=TOP_COLOUR, fontweight="bold")
    if n_bottom:
        x_bot = (fig.axes[n_top + 1].get_position().x0 + fig.axes[n_maps].get_position().x1) / 2
        fig.text(x_bot, 1 - 0.5 / height, bottom_label(entry), ha="center",
                 fontsize=9, color=BOTTOM_COLOUR, fontweight="bold")
    what = "overlaid on the input (upsampled)" if overlay else "activation maps"
    if entry.get("significant") is not None and not all(entry["significant"]):
        what += "; grey 'n.s.': does not beat the permutation null"
    fig.suptitle(f"{layer}: {what}; one colour scale per row", x=0.01, ha="left",
                 y=1 - 0.12 / height, va="top", fontsize=11)
    return fig


def bottom_label(entry: dict) -> str:
    """The heading of a layer's bottom channels in the map figures, honest about chance.

    When the bottom channels beat the permutation null too, they are not channels that do
    not matter but the weakest of those that do, and the heading says so.

    Parameters
    ----------
    entry : dict
        A layer's assets entry (:meth:`Assets.layer`).

    Returns
    -------
    str

    Examples
    --------
    >>> bottom_label({"groups": ["top", "bottom"], "significant": [True, True],
    ...               "n_significant": 16, "n_channels": 16})
    'the weakest 1 of 16 channels, all beating chance'
    >>> bottom_label({"groups": ["top", "bottom"], "significant": [True, False]})
    'bottom 1 by PCACE'
    """
    groups = entry["groups"]
    n_bottom = len(groups) - groups.count("top")
    sig = entry.get("significant")
    if not sig or not all(s for s, g in zip(sig, groups, strict=True) if g == "bottom"):
        return f"bottom {n_bottom} by PCACE"
    n_sig, n_all = entry.get("n_significant"), entry.get("n_channels")
    if n_sig is not None and n_sig == n_all:
        return f"the weakest {n_bottom} of {n_all} channels, all beating chance"
    if n_sig is not None:
        return f"the weakest {n_bottom} of the {n_sig} channels beating chance"
    return f"bottom {n_bottom} by PCACE (these beat chance too)"


def bottom_note(entry: dict) -> str:
    """A caption sentence when a layer's bottom channels beat chance too, else empty.

    Examples
    --------
    >>> bottom_note({"groups": ["top", "bottom"], "significant": [True, True],
    ...              "n_significant": 8, "n_channels": 8})[:40]
    'The purple channels beat chance as well:'
    """
    label = bottom_label(entry)
    if label.startswith("bottom ") and "beat chance" not in label:
        return ""
    return ("The purple channels beat chance as well: they are the weakest of the channels "
            "that relate to the score, not channels that do not, so the contrast with the "
            "green ones is one of degree.")


def activation_maps(assets: Assets | str | Path, layer: str) -> Figure:
    """The maps of a layer's top and bottom channels on each example image.

    One row per example image (highest, middle, lowest score): the input, then the top
    channels' maps (green) and the bottom channels' maps (purple), all on one colour
    scale per row -- diverging and centred at 0 when the maps take both signs -- shown
    by the row's colour bar. Titles give the channel and its PCACE value.

    Parameters
    ----------
    assets : Assets, str or Path
        Saved assets, or a run directory holding them.
    layer : str
        A layer with assets.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> from pcace.viz import activation_maps, load_assets
    >>> fig = activation_maps(load_assets("runs/cat"), "layer3.2.conv2")  # doctest: +SKIP
    """
    return _map_grid(assets, layer, overlay=False)


def overlay_maps(assets: Assets | str | Path, layer: str) -> Figure:
    """The same maps as :func:`activation_maps`, upsampled and laid over the (grey) input.

    Examples
    --------
    >>> from pcace.viz import overlay_maps
    >>> fig = overlay_maps("runs/cat", "layer3.2.conv2")  # doctest: +SKIP
    """
    return _map_grid(assets, layer, overlay=True)


def weighted_vs_cam(assets: Assets | str | Path, layers: list[str] | None = None,
                    max_layers: int = 4) -> Figure:
    """PCACE-weighted maps beside CAM (or Grad-CAM) for each example image.

    A layer's PCACE-weighted map is the sum of all its channels' maps weighted by their
    PCACE values, upsampled to the image; CAM weights the last block's maps by the final
    linear layer's weights of the target class (Grad-CAM: by the score's mean gradient).
    Every map is min-max scaled to [0, 1] per image and overlaid on the grey input, so
    the figure compares where each one is high, not magnitudes.

    Parameters
    ----------
    assets : Assets, str or Path
        Saved assets, or a run directory holding them.
    layers : list of str, optional
        Layers whose weighted maps to show; default the ``max_layers`` deepest.
    max_layers : int
        Cap on the default layer choice.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> from pcace.viz import weighted_vs_cam
    >>> fig = weighted_vs_cam("runs/cat")  # doctest: +SKIP
    """
    a = _as_assets(assets)
    names = list(layers) if layers is not None else a.layers[-max_layers:]
    cam = a.arrays.get("cam")
    n_img = len(a.examples)
    n_cols = 1 + len(names) + (1 if cam is not None else 0)
    cell = min(1.7, (FULL_WIDTH - 2.6) / n_cols)
    width = 1.6 + cell * n_cols + 1.0
    height = 1.0 + n_img * (cell + 0.55)
    fig = new_figure(width, height)
    gs = GridSpec(n_img, n_cols + 2, figure=fig, width_ratios=[1.0] * n_cols + [0.08, 0.06],
                  wspace=0.08, hspace=0.5, left=1.45 / width, right=1 - 0.55 / width,
                  top=1 - 0.75 / height, bottom=0.2 / height)
    norm = Normalize(0.0, 1.0)
    im = None
    for r in range(n_img):
        image = _input_panel(fig.add_subplot(gs[r, 0]), a, r)
        panels = [(f"PCACE-weighted\n{name}", a.array(name, "weighted")[r]) for name in names]
        if cam is not None:
            info = a.index["cam"]
            panels.append((f"{info['method']} ({info['layer']})\n{info['what']}", cam[r]))
        for j, (title, m) in enumerate(panels):
            ax = fig.add_subplot(gs[r, 1 + j])
            ax.imshow(grey(image), cmap="gray", vmin=0, vmax=1)
            im = ax.imshow(unit_scale(m), cmap=OVERLAY_CMAP, norm=norm, alpha=OVERLAY_ALPHA)
            ax.set_title(title, fontsize=8)
            bare(ax)
        if im is not None:
            bar = fig.colorbar(im, cax=fig.add_subplot(gs[r, n_cols + 1]))
            bar.ax.tick_params(labelsize=7)
            bar.set_label("scaled per map", fontsize=7)
    subtitle = "PCACE-weighted maps vs " + (a.index["cam"]["method"] if cam is not None
                                            else "CAM (not available for this run)")
    fig.suptitle(subtitle + "; each map min-max scaled to [0, 1]", x=0.01, ha="left",
                 y=1 - 0.12 / height, va="top", fontsize=11)
    return fig


def _excitation_text(info: dict, j: int) -> str:
    if info.get("excitation") and info.get("best_image_excitation"):
        reached, best = info["excitation"][j], info["best_image_excitation"][j]
        ratio = f" ({reached / best:.1f}x)" if best > 0 else ""
        return f"\nexcites {reached:.2g} vs {best:.2g}{ratio}"
    if info.get("activation") and info.get("example_activation"):  # assets of older runs
        return (f"\nmean act. {info['activation'][j]:.2g} "
                f"(images {info['example_activation'][j]:.2g})")
    return ""


def featurevis_reasons(info: dict) -> list[str | None]:
    """Per channel of a layer's saved feature visualisations: None where its picture is
    shown, else why not (:func:`pcace.viz.featurevis.why_not_shown`, both numbers).

    Assets of older runs, which did not record the excitations, show every picture.

    Examples
    --------
    >>> featurevis_reasons({"channels": [3, 5], "excitation": [2.0, 0.5],
    ...                     "best_image_excitation": [1.0, 1.0]})
    [None, 'excites it to 0.5, the strongest image to 1 (0.5x; shown from 1.5x)']
    """
    reached, best = info.get("excitation"), info.get("best_image_excitation")
    if not reached or not best:
        return [None] * len(info["channels"])
    variation = info.get("variation") or [None] * len(reached)
    return [why_not_shown(r, b, v) for r, b, v in zip(reached, best, variation, strict=True)]


def feature_visualisations(assets: Assets | str | Path, layer: str) -> Figure:
    """Synthetic inputs that maximise each of the layer's top channels.

    A picture is drawn only where it excites its channel clearly more than the strongest
    reference image (:func:`featurevis_reasons`); for the other channels the panel says
    why, with both numbers.

    Examples
    --------
    >>> from pcace.viz import feature_visualisations
    >>> fig = feature_visualisations("runs/cat", "layer3.2.conv2")  # doctest: +SKIP
    """
    a = _as_assets(assets)
    entry = a.layer(layer)
    images = a.array(layer, "featurevis")
    info = entry.get("featurevis")
    if images is None or info is None:
        raise ValueError(f"no feature visualisations saved for layer {layer!r}")
    reasons = featurevis_reasons(info)
    n = len(images)
    cell = min(2.0, (FULL_WIDTH - 1.0) / max(n, 1))
    width = max(0.6 + cell * n, 6.5)
    height = 0.1 + 0.92 * cell + 0.75 + 0.55
    fig = new_figure(width, height)
    left = 0.3 / width
    for j in range(n):
        ax = fig.add_axes((left + j * cell / width + 0.04 * cell / width, 0.1 / height,
                           0.92 * cell / width, 0.92 * cell / height))
        head = f"ch {info['channels'][j]}\nPCACE {info['pcace'][j]:.2f}"
        if reasons[j] is None:
            show_image(ax, images[j], interpolation="nearest")
            ax.set_title(head + _excitation_text(info, j), fontsize=8, color=TOP_COLOUR)
        else:
            bare(ax)
            ax.set_title(head, fontsize=8, color=CHANCE_COLOUR)
            ax.text(0.5, 0.5, "not shown: the synthetic input\n"
                    + textwrap.fill(reasons[j], 30), ha="center", va="center", fontsize=7.5,
                    color="#555555", transform=ax.transAxes, wrap=True)
    fig.suptitle(f"{layer}: inputs synthesised to excite each top channel (decorrelated "
                 f"Fourier image, jitter/scale robust, {info['steps']} steps, seed "
                 f"{info['seed']});\n'excites': its response vs the strongest of the "
                 f"reference images; drawn only from {CLEAR_FACTOR:g}x",
                 x=0.01, ha="left", y=1 - 0.06 / height, va="top", fontsize=9)
    return fig
