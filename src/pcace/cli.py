"""The ``pcace`` command: a thin layer over the public Python functions."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

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


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="torchvision:NAME, timm:NAME, a TorchScript file, or "
                   "package.module:factory")
    p.add_argument("--weights", help="torchvision weights name (DEFAULT, IMAGENET1K_V1), 'none', "
                   "or a state-dict file")
    p.add_argument("--checkpoint", help="state-dict file for a package.module:factory model")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pcace", description="Rank the channels and layers of "
                                     "a CNN by PCACE (maximal correlation with an output).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("layers", help="list the modules with a 4-D output")
    _model_args(p)
    p.add_argument("--input-shape", type=int, nargs=3, metavar=("C", "H", "W"),
                   help="input size for the dummy pass (default: the model's own, else 3 224 224)")

    p = sub.add_parser("rank", help="rank the channels of some layers over a set of images")
    _model_args(p)
    p.add_argument("--data", required=True, help="image folder (ImageFolder layout), CSV of image "
                   "paths, or a folder/file of MNIST IDX data")
    p.add_argument("--class", dest="class_name", help="keep the images of this class only")
    p.add_argument("--label", type=int, help="keep the images of this label (CSV, MNIST)")
    p.add_argument("--target", required=True, help="class index, class name, prob:C, output:I, "
                   "or output")
    p.add_argument("--layers", nargs="+", help="module names (default: every Conv2d)")
    p.add_argument("--components", type=float, default=3,
                   help="k per channel, or a fraction in (0, 1) of explained variance")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--memory-budget", type=_budget, default="auto",
                   help="RAM for activations, e.g. 2GiB; 'auto' (default): a quarter of the "
                   "machine's memory. Layers beyond it are spilled to disk")
    p.add_argument("--score", choices=["maximal", "first-component"], default="maximal")
    p.add_argument("--limit", type=int, help="use at most this many images")
    p.add_argument("--resize", type=int)
    p.add_argument("--crop", type=int)
    p.add_argument("--mean", type=float, nargs="+")
    p.add_argument("--std", type=float, nargs="+")
    p.add_argument("--path-column", default="path")
    p.add_argument("--label-column")
    p.add_argument("--target-column")
    p.add_argument("--permutations", type=int, default=0,
                   help="B permutations of the score for a null, p- and q-values, pcace_adj")
    p.add_argument("--bootstrap", type=int, default=0,
                   help="B bootstrap resamples of the images for intervals and rank stability")
    p.add_argument("--level", type=float, default=0.95, help="bootstrap interval level")
    p.add_argument("--interval", choices=["half-sample", "basic", "percentile"],
                   default="half-sample",
                   help="bootstrap interval: half-samples without replacement with a bias "
                   "correction (default; near-nominal coverage in our simulations), or the "
                   "classical with-replacement basic/percentile intervals")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--top", type=int, default=5, help="channels to print per layer")
    p.add_argument("--report", action="store_true",
                   help="also save the figures' material and write OUT/report.html")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("report", help="write RUN_DIR/report.html (and figures/*.png)")
    p.add_argument("run_dir")

    p = sub.add_parser("ablate", help="faithfulness: ablate a run's top/bottom/random channels "
                       "and compare with baseline rankings")
    p.add_argument("run_dir")
    p.add_argument("--layer", required=True, help="a layer of the run")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--mode", choices=["mean", "zero"], default="mean")
    p.add_argument("--repeats", type=int, default=10, help="random sets per size")
    p.add_argument("--no-baselines", action="store_true",
                   help="skip the baseline rankings (activation, weight L1, Taylor, ...)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("demo", help="train a small MNIST CNN and rank its two conv layers")
    p.add_argument("--out", default="pcace-demo")
    p.add_argument("--data", help="folder with MNIST IDX files (default: scikit-learn digits)")
    p.add_argument("--digit", type=int, default=3)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--no-progress", action="store_true")
    return parser


def _load(args: argparse.Namespace) -> Any:
    from .models import load_model

    return load_model(args.model, weights=args.weights, checkpoint=args.checkpoint)


def cmd_layers(args: argparse.Namespace) -> int:
    from .layers import describe_layers

    loaded = _load(args)
    shape = tuple(args.input_shape or loaded.input_shape or (3, 224, 224))
    table = describe_layers(loaded.model, (1, *shape))
    print(f"{loaded.description}: {len(table)} modules with a 4-D output for input {shape}")
    print(table.to_string(index=False))
    return 0


def _data_spec(args: argparse.Namespace) -> dict:
    from .data import DATA_OPTIONS, describe_data

    return describe_data(args.data, **{key: getattr(args, key, None) for key in DATA_OPTIONS})


def cmd_rank(args: argparse.Namespace) -> int:
    from .data import normalisation, open_dataset, stack_images
    from .rank import rank

    loaded = _load(args)
    spec = _data_spec(args)
    ds, classes = open_dataset(spec, loaded.transform)
    components: int | float = args.components
    if float(components).is_integer() and components >= 1:
        components = int(components)
    label = args.label if spec.get("kind") == "csv" else None
    result = rank(loaded.model, ds, args.target, layers=args.layers, components=components,
                  batch_size=args.batch_size, device=args.device,
                  memory_budget=args.memory_budget, score=args.score, label=label,
                  categories=loaded.categories or classes, seed=args.seed,
                  progress=not args.no_progress, permutations=args.permutations,
                  bootstrap=args.bootstrap, level=args.level, interval=args.interval)
    skipped = getattr(getattr(ds, "dataset", ds), "skipped", 0)
    result.manifest["model"]["spec"] = loaded.spec
    result.manifest["data"].update(spec=spec, skipped_images=int(skipped or 0))
    out = result.save(args.out)
    _print_summary(result, args.top)
    print(f"wrote {out}/ (channels.csv, layers.csv, run.json)")
    if args.report and result.complete:
        from .viz import collect_assets, write_report

        images, _ = stack_images(ds, label=label)
        mean, std = normalisation(spec, loaded.transform)
        collect_assets(out, loaded.model, images, result, mean=mean, std=std,
                       device=result.manifest["device"])
        print(f"wrote {write_report(out)}")
    if not result.complete:
        print("pcace: interrupted; the run directory holds the layers finished so far",
              file=sys.stderr)
        return 130
    return 0


def _print_summary(result: Any, top: int) -> None:
    from .demo import summary

    n = result.manifest["data"]["n_images"]
    target = result.manifest.get("target_description") or result.manifest["target"]
    print(f"PCACE over {n} images, score: {target}")
    print(summary(result, top=top))


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(out=args.out, data=args.data, digit=args.digit, epochs=args.epochs,
                      progress=not args.no_progress)
    acc = result.manifest["demo"]["held_out_accuracy"]
    print(f"trained the two-conv CNN: held-out accuracy {acc:.1%}")
    _print_summary(result, 5)
    print(f"wrote {args.out}/ (channels.csv, layers.csv, run.json, model.pt) in "
          f"{result.manifest['demo']['seconds']:.0f} s")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .rank import load
    from .viz import write_report

    load(args.run_dir)  # a clear error when this is not a run directory
    print(f"wrote {write_report(args.run_dir)}")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from .ablate import ablate, faithfulness_summary
    from .data import open_dataset, stack_images
    from .models import load_model
    from .rank import load
    from .targets import target_from_dict

    run = load(args.run_dir)
    manifest = run.manifest
    layers = list(run.layers.layer)
    if args.layer not in layers:
        raise ValueError(f"layer {args.layer!r} is not in this run; its layers: {layers}")
    spec = (manifest.get("model") or {}).get("spec")
    dspec = (manifest.get("data") or {}).get("spec")
    if not spec or not dspec or "path" not in dspec:
        raise ValueError("this run does not record how its model and data were loaded (it was "
                         "made from Python); call pcace.ablate(...) from Python instead")
    loaded = load_model(spec)
    ds, _ = open_dataset(dict(dspec), loaded.transform)
    label = dspec.get("label") if dspec.get("kind") == "csv" else None
    images, labels = stack_images(ds, label=label)
    target = target_from_dict(manifest["target"])
    table = run.channels[run.channels.layer == args.layer]
    rankings = {"pcace": table.sort_values("rank").channel.to_numpy()}
    if "pcace_adj" in table.columns:
        rankings["pcace_adj"] = table.sort_values("pcace_adj", ascending=False).channel.to_numpy()
    curves = ablate(loaded.model, images, target, args.layer, rankings, sizes=args.sizes,
                    mode=args.mode, repeats=args.repeats, labels=labels,
                    batch_size=args.batch_size, device=args.device,
                    seed=args.seed, baselines=not args.no_baselines)
    out = Path(args.run_dir) / f"ablation_{args.layer}.csv"
    curves.to_csv(out, index=False)
    summary = faithfulness_summary(curves)
    summary.to_csv(Path(args.run_dir) / f"faithfulness_{args.layer}.csv", index=False)
    print(f"ablation of {args.layer} ({args.mode}), {len(images)} images")
    print(summary.to_string(index=False))
    print(f"wrote {out}")
    return 0


COMMANDS = {"layers": cmd_layers, "rank": cmd_rank, "demo": cmd_demo, "report": cmd_report,
            "ablate": cmd_ablate}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pcace`` command (set PCACE_DEBUG=1 to see tracebacks)."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    # this command owns its process: keep the forward pass's freed memory in the heap
    # (faster on glibc; a library call leaves malloc alone unless asked)
    os.environ.setdefault("PCACE_TUNE_MALLOC", "1")
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, TypeError, ImportError) as err:
        if os.environ.get("PCACE_DEBUG"):
            raise
        print(f"pcace: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pcace: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
