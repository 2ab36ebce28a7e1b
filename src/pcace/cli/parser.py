"""The ``pcace`` command's parser: its subcommands and their options.

Examples
--------
>>> build_parser().parse_args(["layers", "--model", "pcace.zoo:mnist_cnn"]).command
'layers'
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

__all__ = ["build_parser", "parse_size"]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str) -> int:
    """``"2GiB"``, ``"512M"``, ``"1e9"`` -> bytes."""
    m = _SIZE.match(text)
    if not m:
        try:
            return int(float(text))
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 2GiB or 512MiB)") from None
    unit = (m.group(2) or "").lower()[:1]
    return int(float(m.group(1)) * _UNITS[unit])


def _budget(text: str) -> int | str:
    return "auto" if text.strip().lower() == "auto" else parse_size(text)


def _sample_size(text: str) -> str | int:
    return "auto" if text.strip().lower() == "auto" else int(text)


def _bins(text: str) -> str | int | None:
    low = text.strip().lower()
    return None if low == "none" else "auto" if low == "auto" else int(low)


def _model_arg(text: str) -> tuple[str, Any]:
    """``name=value`` -> (name, value), the value read as JSON when it parses (3, 0.5, true)."""

    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"not NAME=VALUE: {text!r} (e.g. num_classes=10)")
    try:
        return name, json.loads(value)
    except ValueError:
        return name, value


def _model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required,
                   help="torchvision:NAME (e.g. torchvision:resnet18), timm:NAME, an exported "
                   "program file (.pt2, from torch.export.save), or package.module:factory "
                   "(a function returning an nn.Module; the module must be importable: "
                   "installed, or on PYTHONPATH)")
    p.add_argument("--weights", help="torchvision weights name (DEFAULT, IMAGENET1K_V1), 'none' "
                   "for an untrained network, or a state-dict file")
    p.add_argument("--checkpoint", help="state-dict file for a package.module:factory model "
                   "(loaded with weights_only=True)")
    p.add_argument("--model-arg", dest="model_args", action="append", type=_model_arg,
                   default=[], metavar="NAME=VALUE",
                   help="keyword argument for the model's factory, repeatable "
                   "(e.g. --model-arg num_classes=10); values are read as JSON when they parse")
    p.add_argument("--random-weights", action="store_true",
                   help="allow a model with no trained weights (a factory without "
                   "--checkpoint); its initialisation is seeded by --init-seed")
    p.add_argument("--init-seed", type=int, default=0,
                   help="seed of a random initialisation (with --random-weights; default 0)")


def build_parser() -> argparse.ArgumentParser:
    """The ``pcace`` command's parser: one subcommand per job."""
    parser = argparse.ArgumentParser(prog="pcace", description="Rank the channels and layers of "
                                     "a CNN by PCACE (maximal correlation with an output).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("layers", help="list the modules with a 4-D output")
    _model_args(p)
    p.add_argument("--input-shape", type=int, nargs=3, metavar=("C", "H", "W"),
                   help="input size for the dummy pass (default: the model's own when known, "
                   "else 3 224 224)")

    p = sub.add_parser("rank", help="rank the channels of some layers over a set of images")
    for group in (_rank_data_args, _rank_method_args, _rank_image_args,
                  _rank_statistics_args, _rank_run_args):
        group(p)

    p = sub.add_parser("report", help="write RUN_DIR/report.html (and figures/*.png)")
    p.add_argument("run_dir")
    p.add_argument("--layers", nargs="+", help="layers drawn in full (default: those with "
                   "evidence, the strongest first)")

    p = sub.add_parser("show", help="print a saved run's tables (every layer; --brief: the "
                       "account rank prints)")
    p.add_argument("run_dir")
    p.add_argument("--top", type=int, default=5, help="channels to print per layer")
    p.add_argument("--brief", action="store_true",
                   help="strong layers first and one line per group of the others")

    p = sub.add_parser("ablate", help="faithfulness: ablate a run's top/bottom/random channels "
                       "and compare with baseline rankings")
    p.add_argument("run_dir")
    p.add_argument("--layer", required=True, help="a layer of the run")
    _model_args(p, required=False)
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16],
                   help="numbers of channels ablated")
    p.add_argument("--mode", choices=["mean", "zero", "resample"], default="mean",
                   help="replace ablated channels by their mean map (default), by 0, or "
                   "(resample) by the same channels of another image of the set: the "
                   "ablation that asks how much of the score's variation runs through them, "
                   "PCACE's question; costs --resamples + 1 passes per set")
    p.add_argument("--resamples", type=int, default=5,
                   help="with --mode resample: random derangements of the images (donors) "
                   "averaged; their spread goes to the curves (default 5)")
    p.add_argument("--repeats", type=int, default=10, help="random sets per size")
    p.add_argument("--metric",
                   choices=["score_change", "score_drop", "accuracy_drop", "variance_share"],
                   default=None,
                   help="what the summary compares: score_change (default with mean and zero: "
                   "how far each image's score moves), variance_share (default with "
                   "resample: the share of the score's variance that runs through the "
                   "channels), score_drop (how much the mean score falls) or accuracy_drop")
    p.add_argument("--no-baselines", action="store_true",
                   help="skip the baseline rankings (activation, weight L1, Taylor, ...)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, ...")
    p.add_argument("--seed", type=int, default=0, help="seed of the random channel sets")
    p.add_argument("--target", help="which target of a run with several targets (or of a "
                   "--per-class run) to test, on the images it was ranked on")
    p.add_argument("--label", help="with --target on a per-class run whose targets were each "
                   "ranked on every class's images: which class's images")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("demo", help="train a small MNIST CNN and rank its two conv layers")
    p.add_argument("--out", default="pcace-demo", help="run directory (default pcace-demo)")
    p.add_argument("--data", help="folder with MNIST IDX files (default: scikit-learn digits)")
    p.add_argument("--digit", type=int, default=3, help="the digit whose logit is the score "
                   "(over the images of every digit)")
    p.add_argument("--epochs", type=int, default=8, help="training epochs")
    p.add_argument("--top", type=int, default=5, help="channels to print per layer shown")
    p.add_argument("--verbose", action="store_true", help="print the full tables")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _rank_data_args(p: argparse.ArgumentParser) -> None:
    """What to rank: the model, the images and the score."""
    _model_args(p)
    p.add_argument("--data", required=True, help="image folder (one subfolder per class; or "
                   "a flat folder of images, ranked as one group), CSV of image paths, or a "
                   "folder/file of MNIST IDX data")
    p.add_argument("--class", dest="class_name", action="append",
                   help="keep the images of this subfolder of --data only (once; for several "
                   "classes, a --data folder holding only their subfolders)")
    p.add_argument("--label", type=int, help="keep the images of this label (CSV, MNIST)")
    p.add_argument("--target", action="append", help="what the score is: a class index (its "
                   "logit), a class name of the model, prob:C (softmax probability), output:I "
                   "or output (a regression output); 'all' for every class logit. Repeat it "
                   "for several targets, ranked from one forward pass")
    p.add_argument("--per-class", action="store_true",
                   help="rank each class's images of --data (a folder of all classes) "
                   "separately, from one forward pass (class by class when the maps of all "
                   "images exceed --memory-budget); without --target each class on its own "
                   "logit (folders matched by name to the model's classes: --categories "
                   "when the model does not name them)")
    p.add_argument("--categories", help="the model's class names in output order: a file with "
                   "one name per line, or a comma-separated list (needed for class-name "
                   "targets when the model does not declare its classes)")


def _rank_method_args(p: argparse.ArgumentParser) -> None:
    """How: layers, components, the basis, memory, the device."""
    p.add_argument("--layers", nargs="+", help="module names (default: every Conv2d); list them "
                   "with `pcace layers`")
    p.add_argument("--components", type=float, default=3,
                   help="k principal components per channel (default 3), or a fraction in "
                   "(0, 1) of explained variance")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, ...")
    p.add_argument("--memory-budget", type=_budget, default="auto",
                   help="RAM for activations and the work on them, e.g. 2GiB; 'auto' (default): "
                   "1 GiB where every layer fits it (kept, or streamed in two passes), else a "
                   "quarter of the machine's memory. Layers beyond it are spilled to disk")
    p.add_argument("--spill-dir", help="where spilled layers go (default: the system's "
                   "temporary directory); leftovers of killed runs there are removed")
    p.add_argument("--score", choices=["maximal", "first-component"], default="maximal",
                   help="maximal: PCACE (default); first-component: the published scripts' "
                   "|corr(phi_1, theta)|, for comparison only")


def _rank_image_args(p: argparse.ArgumentParser) -> None:
    """How the images are read and normalised."""
    p.add_argument("--limit", type=int, help="use at most this many images")
    p.add_argument("--resize", type=int, help="resize the shorter side of each image to this "
                   "many pixels (default: the model's own preprocessing when known)")
    p.add_argument("--crop", type=int, help="center-crop each image to this size")
    p.add_argument("--mean", type=float, nargs="+", help="per-channel mean for normalisation "
                   "(one value per input channel, e.g. 0.485 0.456 0.406)")
    p.add_argument("--std", type=float, nargs="+", help="per-channel standard deviation for "
                   "normalisation (one per input channel)")
    p.add_argument("--path-column", default="path", help="CSV data: the column of image paths")
    p.add_argument("--label-column", help="CSV data: the column of class labels (for --label)")


def _rank_statistics_args(p: argparse.ArgumentParser) -> None:
    """What the ranking is worth: null, split halves, bootstrap."""
    p.add_argument("--permutations", type=int, default=100,
                   help="a permutation null: p- and q-values, pcace_adj, which channels beat "
                   "chance (0: none); with --null exact, B permutations per channel (1000 for "
                   "claims about single channels)")
    p.add_argument("--null", choices=["shared", "pooled", "exact"], default="shared",
                   help="shared (default): a few permutations per channel, pooled over the "
                   "channels of all layers; pooled: the same within each layer; exact: "
                   "--permutations of its own for every channel")
    p.add_argument("--basis", choices=["sample", "exact"], default="sample",
                   help="sample (default): principal axes from --sample-size images, refined "
                   "over all in one pass, where there are more; exact: the exact PCA")
    p.add_argument("--ace-bins", type=_bins, default="auto",
                   help="ACE at large N on binned variables: auto (default: 1,000 bins from "
                   "n = 2,500 observations on), none (always exact), or a number of bins")
    p.add_argument("--sample-size", type=_sample_size, default="auto",
                   help="images the sampled basis takes its axes from (default auto: "
                   "min(N, max(2000, N / 10)), as memory allows)")
    p.add_argument("--split-half", type=int, default=10,
                   help="random splits of the images into halves for each layer's "
                   "reproducibility check (default 10; 0: none)")
    p.add_argument("--bootstrap", type=int, default=0,
                   help="B bootstrap resamples of the images for intervals and rank stability")
    p.add_argument("--level", type=float, default=0.95, help="bootstrap interval level")
    p.add_argument("--interval", choices=["half-sample", "basic", "percentile"],
                   default="half-sample",
                   help="bootstrap interval: half-samples without replacement with a bias "
                   "correction (default; near-nominal coverage in our simulations), or the "
                   "classical with-replacement basic/percentile intervals")


def _rank_run_args(p: argparse.ArgumentParser) -> None:
    """The run directory, its output and where the work runs."""
    p.add_argument("--seed", type=int, default=0, help="seed of permutations and resamples")
    p.add_argument("--out", required=True, help="run directory to write (new or empty; see "
                   "--force and --resume)")
    p.add_argument("--force", action="store_true", help="replace an earlier pcace run in --out "
                   "(only the files it wrote are removed)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out "
                   "from its last finished layer (same command line otherwise)")
    p.add_argument("--top", type=int, default=5, help="channels to print per layer shown")
    p.add_argument("--verbose", action="store_true", help="print every layer's row and the "
                   "top channels of every layer with evidence (default: the strong layers "
                   "first, one line per group of the others)")
    p.add_argument("--report", action="store_true",
                   help="also save the figures' material and write OUT/report.html")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="where the work runs: local (default, this process) or ray (the ACE "
                   "problems as Ray tasks, and the forward passes of layers reduced in two "
                   "passes on Ray actors; pip install 'pcace[ray]'); same results")
    p.add_argument("--ray-address", help="with --engine ray: the cluster to join ('auto': the "
                   "one started on this machine with `ray start`; HOST:PORT; ray://HOST:PORT); "
                   "default: start a local one for the run")
