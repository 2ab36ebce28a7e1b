"""Pictures of a PCACE run: figures, saved assets, and a self-contained HTML report.

- From a run's tables: :func:`layer_overview`, :func:`channel_ranking`,
  :func:`ace_transforms`; :func:`class_atlas` for a run with many classes.
- At rank time, with the model and the images: :func:`collect_assets` saves example
  activation maps, CAM/Grad-CAM, ACE transforms and feature visualisations to
  ``run_dir/assets/``; :func:`load_assets` reads them back.
- From assets: :func:`activation_maps`, :func:`overlay_maps`, :func:`weighted_vs_cam`,
  :func:`feature_visualisations`.
- :func:`write_report` writes ``run_dir/report.html`` and ``run_dir/figures/``;
  :func:`result_html` gives a notebook fragment (layer table with evidence, overview).
- :func:`run_evidence` says per layer whether its ranking carries evidence.

All figures are :class:`matplotlib.figure.Figure` objects drawn without pyplot (Agg).

Examples
--------
>>> from pcace.viz import collect_assets, write_report
>>> res = pcace.rank(model, images, target=3)  # doctest: +SKIP
>>> res.save("runs/three")  # doctest: +SKIP
>>> collect_assets("runs/three", model, images, res)  # doctest: +SKIP
>>> write_report("runs/three")  # doctest: +SKIP
PosixPath('runs/three/report.html')
"""

from .assets import Assets, collect_assets, display_images, load_assets
from .evidence import run_evidence, significance
from .figures import ace_transforms, channel_ranking, class_atlas, layer_overview
from .maps import activation_maps, feature_visualisations, overlay_maps, weighted_vs_cam
from .report import render_figures, result_html
from .write import write_report

__all__ = [
    "Assets",
    "ace_transforms",
    "activation_maps",
    "channel_ranking",
    "class_atlas",
    "collect_assets",
    "display_images",
    "feature_visualisations",
    "run_evidence",
    "layer_overview",
    "load_assets",
    "overlay_maps",
    "render_figures",
    "result_html",
    "significance",
    "weighted_vs_cam",
    "write_report",
]
