"""The result of a PCACE run: its tables, manifest and scores, saved and loaded.

:class:`PCACEResult` is what :func:`pcace.rank` returns; :func:`load` reads a run
directory back (checked against its ``run.json``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

__all__ = ["PCACEResult", "load"]


@dataclass
class PCACEResult:
    """Channel and layer tables of a PCACE run, with the run's manifest.

    Attributes
    ----------
    channels : pandas.DataFrame
        One row per channel: ``layer``, ``channel``, ``pcace``, ``rank`` (1 = highest within
        its layer), ``n_components``, ``explained_variance``, ``dead``; more columns when the
        run computed a null or a bootstrap.
    layers : pandas.DataFrame
        One row per layer in network order: channel count, map size and the distribution of
        its channels' values (mean, median, 90th percentile, max) with the top channels.
    manifest : dict
        What produced the numbers: pcace version, model, weights hash, N, target, k, device,
        seed, timings and library versions (written as ``run.json``).
    components : dict
        Per layer, the principal-component scores (C, N, k) the values were computed from
        (kept in memory for follow-up statistics; not saved); float64, or float32 for a
        layer streamed in two passes with ``pca_dtype=torch.float32`` (its scores are rounded
        to float32 there, as the in-memory route's products are). A ``per_label`` run keys
        them by ``(layer, label)``.
    scores : numpy.ndarray, optional
        The score per image, ``(N,)``; ``(N, T)`` (one column per target, in the order of
        ``manifest["target_labels"]``) for a run with several targets or ``per_label``.
    labels : numpy.ndarray, optional
        The label of each image of a ``per_label`` run.
    """

    channels: pd.DataFrame
    layers: pd.DataFrame
    manifest: dict
    components: dict[Any, torch.Tensor] = field(default_factory=dict, repr=False)
    scores: np.ndarray | None = field(default=None, repr=False)
    labels: np.ndarray | None = field(default=None, repr=False)
    #: Where the run was saved or loaded from (None for one only in memory).
    run_dir: Path | None = field(default=None, repr=False, compare=False)

    @property
    def complete(self) -> bool:
        """False when the run was interrupted before every layer was scored."""
        return bool(self.manifest.get("complete", not self.manifest.get("interrupted", False)))

    @property
    def targets(self) -> list[str]:
        """The run's targets, as named in the ``target`` column (one for a plain run)."""
        names = self.manifest.get("target_labels")
        if names:
            return list(names)
        if "target" in self.channels.columns:
            return list(pd.unique(self.channels.target))
        return []

    def top(self, layer: str | None = None, n: int = 10, target: Any = None,
            label: Any = None) -> pd.DataFrame:
        """The ``n`` highest-ranked channels of ``layer`` (or of each layer when None).

        Ranks are within (layer, target) (and label, for a ``per_label`` run): with several
        targets and no ``target`` given, the top ``n`` of each target are returned.

        Examples
        --------
        >>> res.top("layer3.2.conv2", 5, target="cat")  # doctest: +SKIP
        """
        table = self.channels
        if target is not None:
            table = table[table.target.astype(str) == _target_name(target, self.targets)]
        if label is not None:
            if "label" not in table.columns:
                raise ValueError("label= needs a per_label run")
            table = table[table.label == label]
            if table.empty:
                raise ValueError(f"no label {label!r} in this run; labels: "
                                 f"{sorted(pd.unique(self.channels.label))}")
        keys = [k for k in ("label", "target") if k in table.columns]
        order = {t: i for i, t in enumerate(self.targets)}

        def run_order(col: pd.Series) -> pd.Series:
            return col.astype(str).map(order) if col.name == "target" else col

        if layer is None:
            best = table[table["rank"] <= n]
            return best.sort_values(["layer_order", *keys, "rank"], kind="stable",
                                    key=run_order)
        table = table[table.layer == layer]
        if table.empty:
            raise ValueError(f"no layer {layer!r} in this run; layers: "
                             f"{list(pd.unique(self.layers.layer))}")
        keys = [k for k in keys if table[k].nunique() > 1]
        return table[table["rank"] <= n].sort_values([*keys, "rank"], kind="stable",
                                                     key=run_order)

    def subset(self, target: Any = None, label: Any = None) -> PCACEResult:
        """The run as a plain one-target run: the rows of one target (and label).

        For a run with several targets (or a ``per_label`` run) this is what a run of that
        target alone (on that label's images) would have given: the same values, ranks and
        statistics, a manifest naming that target, its score column. Reports and figures
        made for one target take it.

        Examples
        --------
        >>> cat = res.subset("cat")  # doctest: +SKIP
        >>> cat.manifest["target"]  # doctest: +SKIP
        {'kind': 'class_logit', 'index': 3, 'name': 'cat'}
        """
        names = self.targets
        channels, layers = self.channels, self.layers
        manifest = dict(self.manifest)
        columns = list(range(len(names)))
        if label is not None:
            if "label" not in channels.columns:
                raise ValueError("label= needs a per_label run")
            keep = channels.label == label
            if not keep.any():
                raise ValueError(f"no label {label!r} in this run; labels: "
                                 f"{sorted(pd.unique(channels.label))}")
            channels = channels[keep]
            layers = layers[layers.label == label] if "label" in layers.columns else layers
        if "target" in channels.columns:
            if target is None:
                present = list(pd.unique(channels.target.astype(str)))
                if len(present) != 1:
                    raise ValueError(f"this run has several targets ({', '.join(present)}); "
                                     "name one")
                target = present[0]
            name = _target_name(target, names)
            if name not in names:
                raise ValueError(f"no target {target!r} in this run; targets: {names}")
            channels = channels[channels.target.astype(str) == name]
            if "target" in layers.columns:
                layers = layers[layers.target.astype(str) == name]
            i = names.index(name)
            columns = [i]
            described = (manifest.get("targets") or [None] * len(names))[i]
            manifest.update(target=described if described is not None else name,
                            target_labels=[name], target_description=name, targets=[described])
        channels = channels.drop(columns=[c for c in ("target", "label") if c in channels])
        layers = layers.drop(columns=[c for c in ("target", "label") if c in layers])
        scores, labels = self.scores, self.labels
        if scores is not None and scores.ndim == 2:
            rows = slice(None) if label is None or labels is None else labels == label
            scores = scores[rows][:, columns[0]] if len(columns) == 1 else scores[rows]
        if label is not None:
            manifest["per_label"] = False
            manifest["data"] = {**manifest.get("data", {}), "label": label,
                                "n_images": int(np.sum(labels == label)) if labels is not None
                                else manifest.get("data", {}).get("n_images")}
        comps = self.components or {}
        if label is not None:  # a per_label run keys them by (layer, label)
            comps = {k[0]: v for k, v in comps.items()
                     if isinstance(k, tuple) and len(k) == 2 and k[1] == label}
        else:  # the same components serve every target
            comps = {k: v for k, v in comps.items() if not isinstance(k, tuple)}
        return PCACEResult(channels.reset_index(drop=True), layers.reset_index(drop=True),
                           manifest, comps, scores, None)

    def save(self, path: str | Path) -> Path:
        """Write the run to ``path``: channels, layers and scores CSVs, and ``run.json``.

        Each file is written under a temporary name and renamed into place, ``run.json``
        last; it lists every file with its size and SHA-256 and says whether the run is
        complete (:func:`pcace.results.rundir.save_run`). Files an earlier pcace run wrote to
        ``path`` and this one does not (an old report) are removed; files pcace did not
        write are never overwritten.
        """
        from .rundir import save_run

        files: dict[str, Any] = {"channels.csv": self.channels, "layers.csv": self.layers}
        if self.scores is not None:
            files["scores.csv"] = _score_frame(self.scores, self.targets, self.labels)
        self.manifest = save_run(path, files, self.manifest, complete=self.complete)
        self.run_dir = Path(path)
        return Path(path)

    def summary(self, top: int = 5, verbose: bool = False) -> str:
        """The run in words, leading with the answer (what ``print(result)`` shows).

        Parameters
        ----------
        top : int
            Channels listed per layer shown.
        verbose : bool
            Every layer's row and the top channels of every layer with evidence, instead
            of the strong layers first and one line per group of the others.

        Returns
        -------
        str

        Examples
        --------
        >>> import torch, pcace
        >>> from pcace.zoo import mnist_cnn
        >>> res = pcace.rank(mnist_cnn(), torch.rand(40, 1, 28, 28), 3, progress=False,
        ...                  permutations=20)
        >>> print(res.summary())  # doctest: +ELLIPSIS
        PCACE over 40 images, score: logit of class 3
        Answer: ... of 2 layers strong at N = 40.
        ...
        """
        from .printout import summary_text

        return summary_text(self, top=top, verbose=verbose, run_dir=self.run_dir)

    def __str__(self) -> str:
        return self.summary()

    def _repr_html_(self) -> str:
        """A notebook's view: the layer table with its evidence in words (instant; for the
        overview figure as well, display :func:`pcace.viz.result_html` of the result)."""
        return layers_html(self)


def load(path: str | Path) -> PCACEResult:
    """Read a run directory written by :meth:`PCACEResult.save`, checking its files.

    Every file ``run.json`` lists must match its recorded size and SHA-256; a directory
    that does not (a truncated or edited file) is refused with
    :class:`pcace.results.rundir.RunDirError`. An interrupted run loads with ``complete`` False
    and a warning.

    Examples
    --------
    >>> import pcace  # doctest: +SKIP
    >>> res = pcace.load("runs/cat")  # doctest: +SKIP
    >>> res.layers[["layer", "median"]]  # doctest: +SKIP
    """
    from .rundir import read_run

    root = Path(path)
    run = read_run(root)
    if not run.complete:
        warnings.warn(f"{root}: {run.label}", stacklevel=2)
    scores = labels = None
    if (root / "scores.csv").exists():
        scores, labels = _read_scores(pd.read_csv(root / "scores.csv"))
    return PCACEResult(
        channels=pd.read_csv(root / "channels.csv"),
        layers=pd.read_csv(root / "layers.csv"),
        manifest=dict(run.manifest),
        scores=scores,
        labels=labels,
        run_dir=root,
    )


def _target_name(target: Any, names: list[str]) -> str:
    """A target given as its column name, a class index or a Target -> its column name."""
    from ..inputs.targets import Target, target_label

    text = target_label(target) if isinstance(target, Target) else str(target)
    if text not in names:
        raise ValueError(f"no target {target!r} in this run; targets: {names}")
    return text


def _score_frame(scores: np.ndarray, targets: list[str], labels: np.ndarray | None
                 ) -> pd.DataFrame:
    """``scores.csv``: ``score`` for one target, ``score:<target>`` columns for several."""
    if scores.ndim == 1:
        frame = pd.DataFrame({"score": scores})
    else:
        frame = pd.DataFrame({f"score:{t}": scores[:, j] for j, t in enumerate(targets)})
    if labels is not None:
        frame.insert(0, "label", labels)
    return frame


def _read_scores(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray | None]:
    labels = frame["label"].to_numpy() if "label" in frame.columns else None
    if "score" in frame.columns:
        return frame["score"].to_numpy(), labels
    return frame[[c for c in frame.columns if c.startswith("score:")]].to_numpy(), labels


#: The layer table's columns a notebook shows, and their headers.
NOTEBOOK_COLUMNS = {"layer": "layer", "target": "target", "label": "label",
                    "evidence": "evidence", "channels": "channels",
                    "median": "median PCACE", "max": "max",
                    "significant_share": "beat null", "median_adj": "median adj.",
                    "split_half_spearman": "split-half Spearman",
                    "top_channels": "top channels", "evidence_text": "what it supports"}


def layers_html(result: PCACEResult) -> str:
    """The layer table with its evidence as an HTML fragment (no figure, no script).

    Examples
    --------
    >>> import pandas as pd
    >>> res = PCACEResult(pd.DataFrame(), pd.DataFrame({"layer": ["c"], "channels": [4],
    ...                   "median": [0.31], "max": [0.5], "top_channels": ["2 0"]}), {})
    >>> "<table" in layers_html(res) and "median PCACE" in layers_html(res)
    True
    """
    layers = result.layers
    n = result.manifest.get("data", {}).get("n_images")
    head = (f"<p><b>PCACE</b>: {len(layers)} layer rows, {len(result.channels)} channel rows"
            f"{f' over {n} images' if n else ''}.</p>")
    if layers.empty:
        return f'<div class="pcace-result">{head}</div>'
    shown = layers[[c for c in NOTEBOOK_COLUMNS if c in layers.columns]].copy()
    if "significant_share" in shown:
        shown["significant_share"] = shown.significant_share.map(
            lambda v: f"{v:.0%}" if pd.notna(v) else "")
    table = shown.rename(columns=NOTEBOOK_COLUMNS).to_html(
        index=False, float_format=lambda v: f"{v:.3f}", na_rep="", border=0,
        classes="pcace-layers")
    return f'<div class="pcace-result">{head}{table}</div>'
