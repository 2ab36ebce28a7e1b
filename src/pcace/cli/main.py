"""The ``pcace`` command: a thin layer over the public Python functions."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from ..core.errors import first_line
from ..core.voice import speaking_cli
from .ablation import cmd_ablate
from .common import existing_run as _existing_run
from .common import locked as _locked
from .common import rounded_table as rounded_table  # the tests and the docs use it here
from .parser import build_parser


def _load(args: argparse.Namespace, random_ok: bool = False) -> Any:
    from ..inputs.models import load_model

    return load_model(args.model, weights=args.weights, checkpoint=args.checkpoint,
                      model_kwargs=dict(args.model_args) or None,
                      random_weights=random_ok or args.random_weights, seed=args.init_seed)


def cmd_layers(args: argparse.Namespace) -> int:
    from ..inputs.layers import describe_layers

    loaded = _load(args, random_ok=True)  # listing layers needs no trained weights
    shape = tuple(args.input_shape or loaded.input_shape or (3, 224, 224))
    try:
        table = describe_layers(loaded.model, (1, *shape))
    except (RuntimeError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        given = "given with --input-shape" if args.input_shape else \
            "assumed: the model does not record its input"
        raise ValueError(f"the model cannot take an input of shape {shape} ({given}): {first}. "
                         "Give the shape of one image as --input-shape C H W (e.g. "
                         "--input-shape 1 28 28 for grey 28 px images)") from None
    print(f"{loaded.description}: {len(table)} modules with a 4-D output for input {shape}")
    print(table.to_string(index=False))
    return 0


def _data_spec(args: argparse.Namespace) -> dict:
    from ..inputs.data import DATA_OPTIONS, describe_data

    chosen = getattr(args, "class_name", None)
    if isinstance(chosen, list):
        if len(chosen) > 1:
            raise ValueError(f"--class is given {len(chosen)} times ({', '.join(chosen)}); it "
                             "keeps one subfolder. For several classes point --data at a "
                             "folder holding only their subfolders (links will do)")
        args.class_name = chosen[0]
    return describe_data(args.data, **{key: getattr(args, key, None) for key in DATA_OPTIONS})


def _categories(text: str | None) -> list[str] | None:
    if not text:
        return None
    path = Path(text)
    if path.is_file():
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError(f"--categories {text!r} names no classes")
    return names


def _first_image_shape(ds: Any) -> tuple[int, ...] | None:
    from ..inputs.data import as_batches

    try:
        first = next(iter(as_batches(ds, 1)))
    except StopIteration:
        raise ValueError("the data holds no images; check --data, --class and --label") from None
    return tuple(first.shape[1:])


def cmd_rank(args: argparse.Namespace) -> int:
    existed = Path(args.out).exists()
    try:
        with _locked(args.out):  # one run at a time in --out, for the whole command
            return _rank(args)
    except BaseException:
        _leave_nothing_empty(Path(args.out), existed)
        raise


def _leave_nothing_empty(out: Path, existed: bool) -> None:
    """A run that saved nothing leaves no checkpoints/ folder, nor an --out it created."""
    from ..results.checkpoints import remove_checkpoints
    from .guard import checkpointed_layers

    try:
        if not out.is_dir() or (out / "run.json").exists() or checkpointed_layers(out)[0]:
            return
        remove_checkpoints(out)  # the state of a run with no finished layer
        if not existed and not any(out.iterdir()):
            out.rmdir()
    except OSError:  # leave it as it is; the error being reported matters more
        pass


def _say_resumed(out: Path) -> None:
    """What --resume found in ``out``: the layers done and those left."""
    from .guard import checkpointed_layers, checkpointed_names

    done, total = checkpointed_layers(out)
    if not done:
        print(f"pcace: --resume: no finished layer in {out}; starting the run's work again",
              file=sys.stderr)
        return
    names = checkpointed_names(out)
    torn = ""
    if names and len(names) < done:  # unreadable ones are scored again
        torn = f" ({done - len(names)} unreadable checkpoint(s) to score again)"
        done = len(names)
    left = f"; {total - done} left{torn}" if total is not None and done <= total else torn
    of = f" of {total}" if total is not None and done <= total else ""
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    print(f"pcace: --resume: {done}{of} layers done in {out} ({shown}){left}",
          file=sys.stderr)


def _rank(args: argparse.Namespace) -> int:
    from ..capture.spill import clean_stale_spills
    from ..core.interrupts import deferred_signals
    from ..inputs.data import open_dataset
    from ..inputs.layers import resolve_layers
    from ..inputs.models import output_size
    from ..results.checkpoints import remove_checkpoints
    from ..results.rundir import RunDirError, prepare_run_dir
    from ..run.rank import rank

    out = prepare_run_dir(args.out, force=args.force, resume=args.resume)
    if args.resume:
        _say_resumed(out)
    for left in clean_stale_spills(args.spill_dir):
        print(f"pcace: removed {left} (spilled activations of a run that was killed)",
              file=sys.stderr)
    loaded = _load(args)
    resolve_layers(loaded.model, args.layers)  # an unknown name fails before any work
    spec = _data_spec(args)
    ds, classes = open_dataset(spec, loaded.transform)
    shape = _first_image_shape(ds)
    _check_input(loaded.model, shape, args)
    n_outputs = output_size(loaded.model, shape)
    target, cats = _resolve_targets(args, loaded, classes, n_outputs)
    if args.per_class:
        _match_class_folders(ds, spec, classes, cats, n_outputs, own_class=not args.target)
    print(f"pcace: score = {_describe_targets(target, cats, args.per_class)}; "
          f"{loaded.description}", file=sys.stderr)
    components: int | float = args.components
    if float(components).is_integer() and components >= 1:
        components = int(components)
    label = args.label if spec.get("kind") == "csv" else None
    with deferred_signals() as guard, warnings.catch_warnings():
        # an interrupted run is reported below, in the command's own words
        warnings.filterwarnings("ignore", message="interrupted:", category=UserWarning)
        result = rank(loaded.model, ds, target, layers=args.layers, components=components,
                      batch_size=args.batch_size, device=args.device,
                      memory_budget=args.memory_budget, score=args.score, label=label,
                      per_label=args.per_class,
                      categories=list(cats.names) if cats else None, seed=args.seed,
                      progress=not args.no_progress, permutations=args.permutations,
                      null=args.null, basis=args.basis, sample_size=args.sample_size,
                      ace_options={"bins": args.ace_bins},
                      split_half=args.split_half, bootstrap=args.bootstrap, level=args.level,
                      interval=args.interval,
                      spill_dir=args.spill_dir, checkpoint_dir=out, resume=args.resume,
                      on_step=guard.check, engine=args.engine,
                      ray_address=args.ray_address)
    files = getattr(ds, "dataset", ds)
    skipped = getattr(files, "skipped", 0)
    result.manifest["model"]["spec"] = loaded.spec
    result.manifest["data"].update(spec=spec, skipped_images=int(skipped or 0),
                                   skipped_files=list(getattr(files, "skipped_files", []))[:20])
    result.manifest["categories"] = ({"names": list(cats.names), "source": cats.source}
                                     if cats else None)
    try:
        result.save(out)
    except RunDirError as err:  # a full disk: the checkpoints hold the run
        raise RunDirError(f"{err}{_kept(args)}") from None
    if not result.complete:
        return _stopped_early(result, out)
    remove_checkpoints(out)
    report = _rank_report(args, out, result, ds, spec, loaded, label) if args.report else None
    _print_summary(result, args, run_dir=out, report=report)
    written = "channels.csv, layers.csv, run.json" + (", report.html" if report else "")
    print(f"wrote {out}/ ({written})")
    return 0


def _match_class_folders(ds: Any, spec: dict, classes: list[str] | None, cats: Any,
                         n_outputs: int | None, own_class: bool) -> None:
    """--per-class: each class folder's images labelled with the model's index of the class.

    A folder's position among the folders (``cat/``, ``dog/``: 0, 1) is the model's class
    index only when the folders are all its classes; they are matched by name instead.
    """
    from ..inputs.categories import folder_classes
    from ..inputs.datasets import relabel

    if spec.get("kind") != "image_folder" or not classes:
        return
    matched = folder_classes(classes, cats, n_outputs)
    if matched.indices is None and not own_class:
        return  # the labels only group the images; the targets were named
    if matched.indices is None:
        raise ValueError(f"--per-class scores each class folder's images on the model's logit "
                         f"of that class, but {matched.reason}. Name the folders after the "
                         "model's classes, or give --categories (the model's class names in "
                         "output order)")
    if not matched.identity:
        relabel(ds, matched.indices, cats.names)


def _stopped_early(result: Any, out: Path) -> int:
    """Say what an interrupted run (a signal, a lost cluster) kept; its exit code."""
    manifest = result.manifest
    runs = manifest.get("per_label_runs")
    if runs:  # labels ranked in turn
        done = sum(bool(r.get("complete")) for r in runs.values())
        what = f"{done} of {len(manifest['data'].get('labels', runs))} labels are"
    else:
        done = len(manifest.get("layers_done", []))
        what = f"{done} of {len(manifest['layers'])} layers are"
    engine = manifest.get("engine") or {}
    if manifest.get("interrupt_signal") is None and engine.get("connected") is False:
        print(f"pcace: the Ray cluster at {engine.get('address', '?')} was lost (it stopped "
              f"answering); {what} saved in {out} (marked incomplete). Continue with the same "
              "command and --resume: on the cluster once it is back, on a new one "
              "(--ray-address), or here with --engine local", file=sys.stderr)
        return LOST_CLUSTER
    code = 143 if manifest.get("interrupt_signal") == 15 else 130
    print(f"pcace: interrupted; {what} saved in {out} (marked incomplete). Continue with "
          "the same command and --resume", file=sys.stderr)
    return code


def _rank_report(args: argparse.Namespace, out: Path, result: Any, ds: Any, spec: dict,
                 loaded: Any, label: Any) -> Path:
    from ..inputs.data import normalisation, stack_images
    from ..results.rundir import add_files
    from ..viz import collect_assets, write_report

    # several targets (or --per-class): each target's own assets, from its images and score
    images, _ = stack_images(ds, label=label)
    mean, std = normalisation(spec, loaded.transform)
    collect_assets(out, loaded.model, images, result, mean=mean, std=std,
                   device=result.manifest["device"], progress=not args.no_progress)
    report = write_report(out, progress=not args.no_progress)
    add_files(out, _report_files(out))
    return report


def _report_files(out: Path) -> list[str]:
    """What a report wrote into a run directory (assets, figures, the page or pages)."""
    pages = sorted(p.name for p in out.glob("report-*.html"))
    return [p for p in ("assets", "figures", "report.html") if (out / p).exists()] + pages


def _check_input(model: Any, shape: tuple[int, ...] | None, args: argparse.Namespace) -> None:
    """One image through the model: a wrong normalisation or size fails here, in one line."""
    import torch

    from ..inputs.hooks import evaluating

    if shape is None:
        return
    for name in ("mean", "std"):
        values = getattr(args, name, None)
        if values is not None and len(values) not in (1, shape[0]):
            raise ValueError(f"--{name} has {len(values)} values but the images have "
                             f"{shape[0]} channels; give one value per channel")
    try:
        with evaluating(model), torch.no_grad():
            model(torch.zeros((2, *shape)))
    except RuntimeError as err:
        first = first_line(err)
        raise ValueError(f"the model cannot take the images as preprocessed (shape "
                         f"{tuple(shape)}): {first}. Check --resize/--crop, --mean/--std and "
                         "that the data suits the model") from None


def _resolve_targets(args: argparse.Namespace, loaded: Any, classes: list[str] | None,
                     n_outputs: int | None) -> tuple[Any, Any]:
    """The --target values (or, with --per-class and none, each class's own logit)."""
    from ..inputs.categories import choose_categories, resolve_target_for_model
    from ..inputs.targets import ClassLogit, TargetSet

    specs = args.target or []
    declared = _categories(args.categories)
    if not specs and not args.per_class:
        raise ValueError("give --target (a class index or name, prob:C, output, or all), "
                         "or --per-class")
    if args.per_class and getattr(args, "class_name", None):
        raise ValueError("--per-class ranks every class folder of --data; do not also give "
                         "--class")
    if not specs:
        return None, choose_categories(loaded.categories, declared, classes, n_outputs)
    lowered = [s.strip().lower() for s in specs]
    if "all" in lowered and len(lowered) > 1:
        raise ValueError("--target all means every class logit and cannot be combined with "
                         "other --target values; give all alone, or name each target")
    if lowered == ["all"]:
        cats = choose_categories(loaded.categories, declared, classes, n_outputs)
        if n_outputs is None:
            raise ValueError("--target all needs a model with class outputs")
        names = list(cats.names) if cats else None
        return TargetSet([ClassLogit(i, names[i] if names else None)
                          for i in range(n_outputs)]), cats
    targets, cats = [], None
    for spec in specs:
        one, cats = resolve_target_for_model(
            spec, model_categories=loaded.categories, declared=declared,
            data_classes=classes, n_outputs=n_outputs)
        targets.append(one)
    return (targets[0] if len(targets) == 1 else TargetSet(targets)), cats


def _describe_targets(target: Any, cats: Any, per_class: bool) -> str:
    from ..inputs.categories import describe_resolved
    from ..inputs.targets import TargetSet

    if target is None:
        return "each class's own logit, on that class's images (--per-class)"
    if isinstance(target, TargetSet):
        text = target.describe()
        return text + (" (each on every class's images)" if per_class else "")
    return describe_resolved(target, cats)


def _print_summary(result: Any, args: argparse.Namespace, run_dir: Any = None,
                   report: Any = None) -> None:
    from .printout import summary_text

    print(summary_text(result, top=args.top, verbose=args.verbose, run_dir=run_dir,
                       report=report))


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    with _locked(args.out):
        result = run_demo(out=args.out, data=args.data, digit=args.digit, epochs=args.epochs,
                          progress=not args.no_progress)
    demo = result.manifest["demo"]
    print(f"trained the two-conv CNN: held-out accuracy {demo['held_out_accuracy']:.1%}")
    _print_summary(result, args, run_dir=args.out, report=demo.get("report"))
    written = "channels.csv, layers.csv, run.json, model.pt"
    if demo.get("report"):
        written += ", report.html"
    print(f"wrote {args.out}/ ({written}) in {demo['seconds']:.0f} s"
          + (f"; open {demo['report']}" if demo.get("report") else ""))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """Print a saved run's account (the full tables unless --brief)."""
    from ..results.result import load

    _existing_run(args.run_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an incomplete run says so below
        result = load(args.run_dir)
    if not result.complete:
        print(f"pcace: note: {args.run_dir} holds an interrupted run (marked incomplete); "
              "these are the layers it finished", file=sys.stderr)
    args.verbose = not args.brief
    _print_summary(result, args, run_dir=args.run_dir)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ..results.result import load
    from ..results.rundir import add_files
    from ..viz import write_report

    _existing_run(args.run_dir)
    with _locked(args.run_dir):
        load(args.run_dir)  # a clear error when this is not a (trustworthy) run directory
        report = write_report(args.run_dir, layers=args.layers, progress=True)
        root = Path(args.run_dir)
        add_files(root, [p for p in _report_files(root) if p != "assets"])
    pages = sorted(root.glob("report-*.html"))
    print(f"wrote {report}" + (f" (the overview) and {len(pages)} target pages, "
                               f"{root}/report-*.html" if pages else ""))
    return 0


COMMANDS = {"layers": cmd_layers, "rank": cmd_rank, "demo": cmd_demo, "report": cmd_report,
            "ablate": cmd_ablate, "show": cmd_show}


#: Exit code of a run whose Ray cluster was lost (EX_TEMPFAIL: try again, with --resume).
LOST_CLUSTER = 75


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pcace`` command (set PCACE_DEBUG=1 to see tracebacks)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # this command owns its process: keep the forward pass's freed memory in the heap
    # (faster on glibc; a library call leaves malloc alone unless asked)
    os.environ.setdefault("PCACE_TUNE_MALLOC", "1")
    if argv is None and args.command == "rank":  # the command line: a word even if killed
        from .guard import start_watcher

        start_watcher(args.out)
    return _run_command(args)


def debugging() -> bool:
    """Whether PCACE_DEBUG asks for tracebacks (unset, empty, 0, false, no, off: no).

    Examples
    --------
    >>> import os
    >>> os.environ["PCACE_DEBUG"] = "0"; debugging()
    False
    >>> os.environ["PCACE_DEBUG"] = "1"; debugging()
    True
    >>> del os.environ["PCACE_DEBUG"]
    """
    value = os.environ.get("PCACE_DEBUG", "").strip().lower()
    return value not in ("", "0", "false", "no", "off")


def _run_command(args: argparse.Namespace) -> int:
    from ..core.interrupts import Interrupted
    from ..engines.engine import EngineLost

    try:
        with speaking_cli(), warnings.catch_warnings():  # flags and commands; plain warnings
            warnings.showwarning = _one_line_warning
            return COMMANDS[args.command](args)
    except EngineLost as err:  # e.g. while joining the cluster or in a forward pass on it
        if debugging():
            raise
        print(f"pcace: {_one_line(err)}{_kept(args)}", file=sys.stderr)
        return LOST_CLUSTER
    except (ValueError, FileNotFoundError, TypeError, ImportError) as err:
        if debugging():
            raise
        print(f"pcace: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # a full or failing disk, mid-run too
        if debugging():
            raise
        print(f"pcace: error: {_one_line(err)}{_kept(args)}", file=sys.stderr)
        return 2
    except Interrupted as err:
        print(f"pcace: {err}; nothing was finished, so nothing was saved", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("pcace: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - never a bare traceback: one line, and the way on
        if debugging():
            raise
        print(f"pcace: error: unexpected {type(err).__name__}: {_one_line(err)} (set "
              f"PCACE_DEBUG=1 to see where; please report it){_kept(args)}", file=sys.stderr)
        return 1


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str,
                      lineno: int, file: Any = None, line: str | None = None) -> None:
    """A warning under the command: one line of its own words, no source line."""
    text = " ".join(str(message).split())
    print(f"pcace: warning: {text}", file=sys.stderr if file is None else file)


def _kept(args: argparse.Namespace) -> str:
    """What a failed ``rank`` leaves to resume from (empty for other commands)."""
    from .guard import checkpointed_layers

    out = getattr(args, "out", None)
    if args.command != "rank" or not out:
        return ""
    done, total = checkpointed_layers(out)
    if not done:
        return ""
    of = f" of {total}" if total is not None and done <= total else ""
    return (f". {done}{of} layers {'was' if done == 1 else 'were'} finished and checkpointed "
            f"in {out}: once this is fixed, run the same command with --resume to continue "
            "from them")


def _one_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    if isinstance(err, OSError) and err.strerror and err.filename:
        text = f"{err.strerror}: {err.filename}"
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
