"""One self-contained HTML file per run: summary, figures, a sortable channel table.

:func:`write_report` reads a run directory (``run.json``, the CSV tables and, when
present, ``assets/``), draws the figures, writes them to ``figures/`` (palette PNGs, or
JPEGs for figures with photographs where smaller), and writes ``report.html`` with the same
figures embedded as base64. It says per layer whether the ranking carries evidence, and
draws full sections only for layers that do (or the best few when none does); the rest are
rows of the layer table. The page is rendered from the package's templates
(:mod:`pcace.viz.pages`): inline CSS, a small inline script (sorting and filtering of the
channel table) and nothing that refers outside itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from ..core.files import atomic_write, safe_name
from ._common import figure_bytes
from .assets import Assets, load_assets
from .evidence import full_layers, run_evidence, significance
from .featurevis import CLEAR_FACTOR
from .figures import ace_transforms, channel_ranking, layer_overview
from .maps import (
    activation_maps,
    bottom_note,
    feature_visualisations,
    featurevis_reasons,
    overlay_maps,
    weighted_vs_cam,
)
from .pages import figure_view, render_page, static_text, write_page
from .report_view import (
    CI_SENTENCE,
    evidence_images,
    layer_table_view,
    page_context,
    verdict_view,
)

REPORT_FILE = "report.html"
FIGURE_DIR = "figures"


@dataclass
class RenderedFigure:
    """A figure of the report: where it belongs, its encoded bytes and file."""

    section: str
    name: str
    caption: str
    data: bytes
    path: Path
    format: str = "png"

    @property
    def png(self) -> bytes:
        """The encoded bytes (kept under this name for older callers; see ``format``)."""
        return self.data


@dataclass
class _Job:
    section: str
    name: str
    caption: str
    draw: Callable[[], Figure]
    photo: bool = False


GREY_SENTENCE = ("Channels that do not beat the permutation null (q > 0.05) are grey; "
                 "the top channels that do are green.")


def _figure_jobs(result: Any, assets: Assets | None, full: list[str], top: int,
                 sig: bool) -> list[_Job]:
    """Every figure the report shows, in order, not yet drawn."""
    grey = f" {GREY_SENTENCE}" if sig else ""
    jobs = [_Job("overview", "overview", "Each dot is one channel; boxes span the quartiles, the "
                 "orange line is the median. A grey band (when the run computed a permutation "
                 "null) spans the null's mean to its 95th percentile: values inside it are what "
                 "unrelated data give." + (" Dots of channels that do not beat the null are "
                                           "light grey." if sig else ""),
                 lambda: layer_overview(result))]
    if assets is not None and assets.layers:
        cam = assets.index.get("cam")
        shown = [n for n in full if n in assets.layers][-4:] or None
        jobs.append(_Job(
            "cam", "weighted_vs_cam", "Where the maps are high on each example image. "
            "PCACE-weighted: all channels of a layer, weighted by their PCACE value. "
            + (f"{cam['method']} of the {cam['layer']} output for {cam['what']}. " if cam else "")
            + "Each map is min-max scaled on its own.",
            lambda: weighted_vs_cam(assets, layers=shown), photo=True))
    ci = "ci_low" in result.channels
    for layer in full:
        jobs += _layer_jobs(result, assets, layer, top, grey, ci)
    return jobs


def _layer_jobs(result: Any, assets: Assets | None, layer: str, top: int, grey: str,
                ci: bool) -> list[_Job]:
    stem = safe_name(layer)
    shown = min(top, int((result.channels.layer == layer).sum()))
    jobs = [_Job(layer, f"ranking_{stem}", f"{layer}: channels sorted by PCACE; the top {shown} "
                 f"named at right{' with bootstrap intervals' if ci else ''}.{grey}"
                 + (f" {CI_SENTENCE}" if ci else ""),
                 lambda: channel_ranking(result, layer, top=top))]
    if assets is None or layer not in assets.layers:
        return jobs
    entry = assets.layer(layer)
    honest = bottom_note(entry)
    some_ns = entry.get("significant") is not None and not all(entry["significant"])
    jobs.append(_Job(layer, f"maps_{stem}", "Activation maps of the top (green) and bottom "
                     "(purple) channels on the example images; one colour scale per row "
                     "(colour bar at right)." + (f" {honest}" if honest else "")
                     + (" Titles of channels that do not beat the null are grey."
                        if grey and some_ns else ""),
                     lambda: activation_maps(assets, layer), photo=True))
    jobs.append(_Job(layer, f"overlay_{stem}", "The same maps upsampled to the image and laid "
                     "over it (same colour scale per row).", lambda: overlay_maps(assets, layer),
                     photo=True))
    if entry.get("ace") and assets.array(layer, "ace_theta") is not None:
        ace = entry["ace"]
        jobs.append(_Job(
            layer, f"ace_{stem}", "ACE transforms of the top channel: the transform of the "
            "score and of each principal component of the channel's maps; their correlation "
            "is the channel's PCACE value.",
            lambda: ace_transforms(
                assets.array(layer, "ace_theta"), assets.array(layer, "ace_phi"),
                assets.arrays["scores"], assets.array(layer, "ace_z"),
                f"{layer}, channel {ace['channel']}: ACE transforms", rho=ace["rho"])))
    if entry.get("featurevis") and assets.array(layer, "featurevis") is not None and \
            any(r is None for r in featurevis_reasons(entry["featurevis"])):
        jobs.append(_Job(layer, f"featurevis_{stem}", FEATUREVIS_CAPTION,
                         lambda: feature_visualisations(assets, layer), photo=True))
    return jobs


FEATUREVIS_CAPTION = (
    "Inputs synthesised to excite each top channel: gradient ascent on a Fourier-space "
    "image (1/f-scaled frequencies, colours decorrelated with the images' own colour "
    "correlation), robust to random jitter and scaling. 'excites' compares the channel's "
    "response to the synthetic input with the strongest response among the reference "
    f"images; a picture is drawn only where it is at least {CLEAR_FACTOR:g} times that "
    "(and above zero), else the panel gives the two numbers.")


def render_figures(run_dir: str | Path, result: Any = None,
                   assets: Assets | None = None, top: int = 10, *,
                   layers: list[str] | None = None,
                   progress: bool = False, figure_dir: str = "",
                   use_assets: bool = True) -> list[RenderedFigure]:
    """Draw the report's figures and write each to ``run_dir/figures/``.

    Only the layers that carry evidence get full sections (ranking, maps, overlays, ACE
    transforms, feature visualisations); when none does, the best few do (see
    :func:`pcace.viz.evidence.full_layers`). Charts are written as palette PNGs, figures
    with photographs or colour maps as the smaller of a palette PNG and a JPEG.

    Parameters
    ----------
    run_dir : path
        A run directory (from :meth:`PCACEResult.save`).
    result : PCACEResult, optional
        The run; read from ``run_dir`` when None.
    assets : Assets, optional
        Read from ``run_dir/assets`` when None (figures needing them are skipped if absent).
    top : int
        Channels labelled in the ranking figures.
    layers : list of str, optional
        Layers drawn in full; default :func:`~pcace.viz.evidence.full_layers`.
    progress : bool
        Show a progress bar on stderr.
    figure_dir : str
        Folder of the figures under ``run_dir`` (default ``figures``).
    use_assets : bool
        False: draw only the figures that need no assets (one target of a run with
        several, whose assets belong to no target in particular).

    Returns
    -------
    list of RenderedFigure
        In report order: ``overview``, ``cam``, then per layer.

    Examples
    --------
    >>> from pcace.viz import render_figures
    >>> [f.path.name for f in render_figures("runs/demo")][:2]  # doctest: +SKIP
    ['overview.png', 'weighted_vs_cam.jpeg']
    """
    from ..core.progress import progress_bar
    from ..results.result import load

    root = Path(run_dir)
    result = load(root) if result is None else result
    assets = (load_assets(root) if assets is None else assets) if use_assets else None
    full = full_layers(result) if layers is None else list(layers)
    sig = significance(result.channels) is not None
    out_dir = root / (figure_dir or FIGURE_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*"):
        if old.suffix in (".png", ".jpeg", ".jpg") and old.is_file():
            old.unlink()
    rendered: list[RenderedFigure] = []
    jobs = _figure_jobs(result, assets, full, top, sig)
    for job in progress_bar(jobs, desc="report figures", unit="fig", disable=not progress):
        data, fmt = figure_bytes(job.draw(), photo=job.photo)
        path = atomic_write(out_dir / f"{job.name}.{fmt}", data)
        rendered.append(RenderedFigure(job.section, job.name, job.caption, data, path, fmt))
    return rendered


def write_target_report(root: Path, result: Any, *, title: str | None = None, top: int = 10,
                        layers: list[str] | None = None, progress: bool = False) -> Path:
    """Write the one-target report of a loaded run: ``root/report.html`` and its figures
    (:func:`pcace.viz.write_report` chooses it for a run of one target)."""
    assets = load_assets(root)
    full = full_layers(result) if layers is None else list(layers)
    figures = render_figures(root, result, assets, top=top, layers=full, progress=progress)
    page = render_page("report.html", **page_context(result, assets, figures, title, full))
    return write_page(root / REPORT_FILE, page)


def result_html(result: Any, *, overview: bool = True) -> str:
    """A PCACE result as an HTML fragment for a notebook: the layer table and the overview.

    The layer table says per layer whether its ranking carries evidence (share of channels
    beating the permutation null, median null-corrected value, split-half
    reproducibility) in plain words; the overview figure is embedded as an image.
    Nothing outside the fragment is referred to.

    Parameters
    ----------
    result : PCACEResult
        A run.
    overview : bool
        Embed the overview figure (off: the table only, instant).

    Returns
    -------
    str
        HTML (a ``<div>`` with a scoped style block).

    Examples
    --------
    >>> from pcace.viz import result_html
    >>> html = result_html(result)  # doctest: +SKIP
    >>> from IPython.display import HTML; HTML(html)  # doctest: +SKIP
    """
    evidence = run_evidence(result)
    view = None
    if overview and not result.channels.empty:
        data, fmt = figure_bytes(layer_overview(result))
        view = figure_view(RenderedFigure("overview", "overview", "", data, Path(), fmt))
    full = evidence.layer[evidence.evidence.isin(("strong", "weak"))].tolist()
    return render_page("fragment.html", css=static_text("notebook.css"),
                       n_layers=len(evidence), n_channels=len(result.channels),
                       n_images=evidence_images(result), overview=view,
                       summary_verdict=verdict_view(result, evidence, full),
                       layers=layer_table_view(result, evidence, full)).rstrip("\n")
