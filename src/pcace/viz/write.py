"""Write a run directory's report: one page for a run of one target, an atlas for several.

Examples
--------
>>> from pcace.viz import write_report
>>> write_report("runs/demo")  # doctest: +SKIP
PosixPath('runs/demo/report.html')
"""

from __future__ import annotations

from pathlib import Path

from ..results.result import load
from .atlas_report import write_atlas_report
from .report import write_target_report

__all__ = ["write_report"]


def write_report(run_dir: str | Path, *, title: str | None = None, top: int = 10,
                 layers: list[str] | None = None, progress: bool = False) -> Path:
    """Write ``run_dir/report.html`` (self-contained) and ``run_dir/figures/``.

    A run with several targets (or one per label) gets an overview page (the class atlas
    and one row per target) and one page per target, ``report-<target>.html``, each the
    report of a one-target run (:meth:`pcace.PCACEResult.subset`).

    The page says per layer whether its ranking carries evidence (share of channels that
    beat the permutation null, median null-corrected value, split-half reproducibility);
    layers with evidence get full sections with maps and pictures, the others a compact
    row in the layer table (when no layer has evidence, the best few are drawn in full).

    Parameters
    ----------
    run_dir : path
        A run directory; assets (``run_dir/assets``, from :func:`collect_assets`) add the
        activation maps, CAM comparison, ACE transforms and feature visualisations.
    title : str, optional
        Page title; default names the model and the target.
    top : int
        Channels labelled in the ranking figures.
    layers : list of str, optional
        Layers drawn in full; default :func:`~pcace.viz.evidence.full_layers`.
    progress : bool
        Show a progress bar on stderr while the figures are drawn.

    Returns
    -------
    pathlib.Path
        The report's path.

    Examples
    --------
    >>> from pcace.viz import write_report
    >>> write_report("runs/demo")  # doctest: +SKIP
    PosixPath('runs/demo/report.html')
    """
    root = Path(run_dir)
    result = load(root)
    known = list(result.layers.layer)
    if layers is not None and (unknown := [n for n in layers if n not in known]):
        names = ", ".join(repr(n) for n in unknown)
        raise ValueError(f"the run in {root} has no layer{'s' if len(unknown) > 1 else ''} "
                         f"{names}; its layers: {known}")
    if len(result.targets) > 1 or result.manifest.get("per_label"):
        return write_atlas_report(root, result, top=top, progress=progress)
    return write_target_report(root, result, title=title, top=top, layers=layers,
                               progress=progress)
