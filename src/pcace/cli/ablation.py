"""``pcace ablate``: is a run's ranking faithful? Its top, bottom and random channels of one
layer ablated, against the baseline rankings; the curves and the summary saved in the run.

Examples
--------
>>> ablation_files("layer3.2.conv2", "", "mean")
['ablation_layer3.2.conv2.csv', 'faithfulness_layer3.2.conv2.csv']
>>> ablation_files("layer3.2.conv2", "_cat", "resample")[1]
'faithfulness_layer3.2.conv2_cat_resample.csv'
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..core.voice import action
from .common import existing_run, locked, rounded_table

__all__ = ["ABLATION_COLUMNS", "ablation_files", "cmd_ablate", "default_metric"]

#: What each mode does to the ablated channels, for the print-out.
MODE_TEXT = {
    "mean": "replaced by their mean map over the images",
    "zero": "set to 0",
    "resample": ("taken, for every image, from another image of the set (the same channels "
                 "of a donor; {resamples} random derangements averaged)"),
}

ABLATION_COLUMNS = """\
How to read it: each ranking's top m channels (and its bottom m) are {what},
for each size m, and compared with random sets of m channels.{meaning}
  area               {metric} of the top m minus that of random sets, integrated over
                     log2 m: larger = the ranking's top channels matter more than chance
  mean_gap           the same as an average excess per size, in the metric's units
  mean_gap_sd_units  that excess in standard deviations of the random sets (above ~2: clear)
  bottom_mean_gap    the same for the bottom m channels (negative: they matter less than
                     random ones, as a faithful ranking's bottom should)
  top_minus_bottom   mean_gap - bottom_mean_gap
  accuracy_mean_gap  the excess accuracy lost (with labels)"""

METRIC_TEXT = {
    "score_change": "how far each image's score moves (mean |change|)",
    "score_drop": "how much the mean score falls",
    "accuracy_drop": "how much top-1 accuracy falls",
    "variance_share": ("the share of the score's variance across the images that runs "
                       "through the channels (0: none, 1: all)"),
}


def default_metric(mode: str) -> str:
    """The summary's metric when ``--metric`` is not given: ``variance_share`` for resample
    ablation (the question it asks), ``score_change`` for the others.

    Examples
    --------
    >>> default_metric("resample"), default_metric("mean")
    ('variance_share', 'score_change')
    """
    return "variance_share" if mode == "resample" else "score_change"


def ablation_files(layer: str, part: str, mode: str) -> list[str]:
    """The names of the curves and of the summary in the run directory (mean ablation keeps
    the names it always had; the other modes add theirs, so that each mode's files stay)."""
    suffix = "" if mode == "mean" else f"_{mode}"
    return [f"ablation_{layer}{part}{suffix}.csv", f"faithfulness_{layer}{part}{suffix}.csv"]


def cmd_ablate(args: argparse.Namespace) -> int:
    existing_run(args.run_dir)
    with locked(args.run_dir):
        return _ablate(args)


def _ablate(args: argparse.Namespace) -> int:
    from ..core.files import safe_name
    from ..inputs.targets import target_from_dict
    from ..stats.ablate import ablate, faithfulness_summary

    run, whole, model, images, labels, origin = _load_ablated(args)
    metric = args.metric or default_metric(args.mode)
    if metric == "accuracy_drop" and labels is None:
        raise ValueError(f"--metric accuracy_drop needs each image's class: {origin}; use "
                         "score_change or score_drop")
    target = target_from_dict(run.manifest["target"])
    table = run.channels[run.channels.layer == args.layer]
    rankings = {"pcace": table.sort_values("rank").channel.to_numpy()}
    if "pcace_adj" in table.columns:
        rankings["pcace_adj"] = table.sort_values("pcace_adj", ascending=False).channel.to_numpy()
    curves = ablate(model, images, target, args.layer, rankings,
                    sizes=args.sizes, mode=args.mode, repeats=args.repeats, labels=labels,
                    batch_size=args.batch_size, device=args.device, seed=args.seed,
                    baselines=not args.no_baselines, resamples=args.resamples,
                    progress=not args.no_progress)
    summary = faithfulness_summary(curves, metric=metric)
    root = Path(args.run_dir)
    part = "" if run is whole else f"_{safe_name(run.targets[0])}"
    names = ablation_files(args.layer, part, args.mode)
    interrupted = _save(root, names, curves.assign(mode=args.mode),
                        summary.assign(mode=args.mode, metric=metric))
    _print_ablation(args, run, curves, summary, metric, len(images), origin)
    print(f"wrote {root / names[0]} (the curves) and {root / names[1]} (this table)")
    if interrupted is not None:
        print("pcace: interrupted; the ablation was finished and saved first", file=sys.stderr)
        return interrupted
    return 0


def _save(root: Path, names: list[str], curves: Any, summary: Any) -> int | None:
    """Write both tables and list them in ``run.json``, all of it even if Ctrl-C arrives
    meanwhile (each file atomically); the exit code of a signal received, else None."""
    from ..core.files import atomic_write
    from ..core.interrupts import deferred_signals
    from ..results.rundir import add_files

    with deferred_signals(message=False) as guard:
        atomic_write(root / names[0], curves.to_csv(index=False))
        atomic_write(root / names[1], summary.to_csv(index=False))
        add_files(root, names)
    return guard.exit_code


def _load_ablated(args: argparse.Namespace) -> tuple[Any, Any, Any, Any, Any, str]:
    """The part of the run tested, the whole run, the rebuilt model, the images and their
    labels (and where the labels came from)."""
    from ..inputs.data import open_dataset, stack_images
    from ..inputs.rebuild import rebuild_model
    from ..results.result import load

    whole = load(args.run_dir)
    run, label_value = _ablated_part(whole, args.target, args.label)
    manifest = whole.manifest
    layers = list(run.layers.layer)
    if args.layer not in layers:
        raise ValueError(f"layer {args.layer!r} is not in this run; its layers: {layers}")
    recorded = manifest.get("model") or {}
    dspec = (manifest.get("data") or {}).get("spec")
    if not recorded.get("spec") or not dspec or "path" not in dspec:
        raise ValueError("this run does not record how its model and data were loaded (it was "
                         f"made from Python); {action('ablate_from_python')}")
    loaded = rebuild_model(recorded, model=args.model, checkpoint=args.checkpoint,
                           weights=args.weights)
    ds, classes = open_dataset(dict(dspec), loaded.transform)
    label = dspec.get("label") if dspec.get("kind") == "csv" else None
    images, raw = stack_images(ds, label=label)
    labels, origin, groups = _model_labels(raw, dspec, classes, manifest, loaded, images)
    if label_value is not None:
        keep = None if groups is None else groups == label_value
        if keep is None or not bool(keep.any()):
            raise ValueError(f"the images of label {label_value!r} are not in the run's data "
                             f"any more ({dspec['path']}); was it changed since the run?")
        images = images[keep]
        labels = None if labels is None else labels[keep]
    return run, whole, loaded.model, images, labels, origin


def _ablated_part(run: Any, target: str | None, label: str | None) -> tuple[Any, Any]:
    """The one-target part of a run that ``pcace ablate`` tests, and its label (or None).

    A run of several targets (or one image set per class) needs ``--target``; this is
    decided from the run's tables alone, before any model or image is loaded.
    """
    per_label = "label" in run.channels.columns
    present = ([str(t) for t in dict.fromkeys(run.channels.target)]
               if "target" in run.channels.columns else run.targets)
    several = len(present) > 1
    if not several and not per_label:
        if target is not None and str(target) not in run.targets:
            raise ValueError(f"--target {target}: this run has one target, {run.targets[0]}")
        return run, None
    if target is None:
        kind = "one image set per class" if per_label else f"{len(present)} targets"
        raise ValueError(f"this run has {kind}; name the one to test with --target "
                         f"(one of: {', '.join(present)})")
    name = str(target)
    if name not in present:
        raise ValueError(f"--target {target}: no such target in this run; its targets: "
                         f"{', '.join(present)}")
    if not per_label:
        return run.subset(target=name), None
    rows = run.channels[run.channels.target.astype(str) == name]
    found = list(dict.fromkeys(rows.label.tolist()))
    if label is not None:
        chosen = [v for v in found if str(v) == str(label)]
        if not chosen:
            raise ValueError(f"--label {label}: target {name} was ranked on the images of "
                             f"label{'s' if len(found) > 1 else ''} "
                             f"{', '.join(map(str, found))}")
        found = chosen
    if len(found) > 1:
        raise ValueError(f"target {name} was ranked on the images of each of the labels "
                         f"{', '.join(map(str, found))}; name one with --label")
    return run.subset(target=name, label=found[0]), found[0]


def _model_labels(raw: Any, dspec: dict, classes: list[str] | None, manifest: dict,
                  loaded: Any, images: Any) -> tuple[Any, str, Any]:
    """Each image's class in the model's numbering (None where unknown) and where it came
    from; and the labels the run grouped the images by (``--per-class``)."""
    from ..inputs.categories import Categories, choose_categories, folder_classes
    from ..inputs.models import output_size

    if raw is None:
        return None, "the images have no labels, so no accuracy", None
    n_outputs = output_size(loaded.model, tuple(images.shape[1:]))
    kind = dspec.get("kind")
    if kind != "image_folder":
        what = "the CSV's label column" if kind == "csv" else "the MNIST labels"
        labels, origin, groups = raw, f"{what}, taken as the model's class indices", raw
    else:
        recorded = manifest.get("categories")
        cats = (Categories(tuple(recorded["names"]), recorded["source"]) if recorded else
                choose_categories(loaded.categories, None, classes, n_outputs))
        matched = folder_classes(classes or [], cats, n_outputs)
        if matched.indices is None:
            origin = f"each image's class is unknown ({matched.reason}), so no accuracy"
            labels, groups = None, raw
        else:
            labels = raw.new_tensor(matched.indices)[raw.long()]
            origin, groups = f"class folders ({matched.reason})", labels
    if n_outputs is not None and n_outputs < 2:
        labels, origin = None, f"the model has {n_outputs} output, so no accuracy"
    return labels, origin, groups


def _print_ablation(args: argparse.Namespace, run: Any, curves: Any, summary: Any,
                    metric: str, n: int, origin: str) -> None:
    base = f"unablated mean score {curves.attrs['base_score']:.4g}"
    if curves.attrs.get("base_accuracy") is not None:
        base += f", accuracy {curves.attrs['base_accuracy']:.1%}"
    print(f"ablation of {args.layer} ({args.mode} ablation), target {run.targets[0]}, {n} "
          f"images, metric {metric}")
    print(f"{base}; labels: {origin}")
    print(rounded_table(summary))
    what = MODE_TEXT[args.mode].format(resamples=args.resamples)
    print(ABLATION_COLUMNS.format(metric=metric, what=what,
                                  meaning=f"\n  {metric}: {METRIC_TEXT[metric]}"))
