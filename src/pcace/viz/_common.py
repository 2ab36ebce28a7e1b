"""Small helpers shared by the figure modules: figure creation, colour scales, resizing."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

#: Width of a full-width figure in inches; at 100 dpi it fills a ~1100 px report column.
FULL_WIDTH = 11.0
DPI = 100


def new_figure(width: float, height: float) -> Figure:
    """A pyplot-free figure (no global state, safe in scripts, servers and notebooks)."""
    return Figure(figsize=(width, height), dpi=DPI, layout=None)


def map_norm(values: np.ndarray) -> tuple[Normalize, str]:
    """One colour scale for a set of activation maps, and its colour map name.

    Maps with both signs get a diverging scale symmetric about 0 (white = 0, so sign and
    magnitude read the same on both sides); non-negative (e.g. after a ReLU) or non-positive
    maps get a sequential one from their minimum to their maximum.
    """
    finite = values[np.isfinite(values)]
    lo = float(finite.min()) if finite.size else 0.0
    hi = float(finite.max()) if finite.size else 1.0
    if lo < 0.0 < hi:
        m = max(-lo, hi)
        return Normalize(vmin=-m, vmax=m), "RdBu_r"
    if hi <= lo:
        hi = lo + 1e-12
    return Normalize(vmin=lo, vmax=hi), "viridis"


def resize(maps: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Bilinear resize of the last two axes of ``maps`` to ``size`` (height, width)."""
    arr = np.asarray(maps, dtype=np.float32)
    lead = arr.shape[:-2]
    t = torch.from_numpy(arr.reshape(-1, 1, *arr.shape[-2:]))
    out = F.interpolate(t, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)
    return out.reshape(*lead, *out.shape[-2:]).numpy()


def unit_scale(a: np.ndarray) -> np.ndarray:
    """Min-max scale each map (last two axes) to [0, 1]; a constant map becomes 0."""
    arr = np.asarray(a, dtype=np.float32)
    lo = arr.min(axis=(-2, -1), keepdims=True)
    span = arr.max(axis=(-2, -1), keepdims=True) - lo
    return np.where(span > 0, (arr - lo) / np.where(span > 0, span, 1.0), 0.0).astype(np.float32)


def show_image(ax, image: np.ndarray, **kwargs) -> None:
    """Draw an (H, W, C) display image in [0, 1]: RGB as is, one channel in grey."""
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 2:
        ax.imshow(img, cmap="gray", vmin=0.0, vmax=1.0, **kwargs)
    else:
        ax.imshow(np.clip(img, 0.0, 1.0), **kwargs)
    ax.set_xticks([])
    ax.set_yticks([])


def grey(image: np.ndarray) -> np.ndarray:
    """Luminance of an (H, W, C) display image, shape (H, W)."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 2:
        return img
    if img.shape[-1] == 3:
        return img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return img.mean(-1)


def bare(ax) -> None:
    """Remove ticks and frame from an image axis."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def figure_bytes(fig: Figure, photo: bool = False) -> tuple[bytes, str]:
    """A figure as compact image bytes and their format (``"png"`` or ``"jpeg"``).

    Charts become palette PNGs (256 colours, lossless to the eye for lines and text, a
    third of a full-colour PNG). Figures with photographs or smooth colour maps
    (``photo=True``) are encoded both as a palette PNG and as a JPEG, and the smaller wins.
    """
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.12,
                facecolor="white")
    rgb = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    palette = io.BytesIO()
    rgb.quantize(256, method=Image.Quantize.FASTOCTREE,
                 dither=Image.Dither.FLOYDSTEINBERG if photo else Image.Dither.NONE
                 ).save(palette, "PNG", optimize=True)
    best = (palette.getvalue(), "png")
    if photo:
        jpeg = io.BytesIO()
        rgb.save(jpeg, "JPEG", quality=85, subsampling=0, optimize=True)
        if len(jpeg.getvalue()) < len(best[0]):
            best = (jpeg.getvalue(), "jpeg")
    return best
