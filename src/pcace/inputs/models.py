"""Load a trained CNN from a short text spec.

Accepted specs (:func:`load_model`):

- ``torchvision:NAME`` -- a torchvision architecture, e.g. ``torchvision:resnet18``;
  ``weights`` is a torchvision weights name (``"DEFAULT"``, ``"IMAGENET1K_V1"`` or
  ``"ResNet18_Weights.IMAGENET1K_V1"``), ``"none"``/``None`` for random
  initialisation, or a state-dict file.
- ``timm:NAME`` -- a timm architecture (needs ``pip install timm``).
- an exported program (``torch.export.save`` output, ``.pt2``), exported with a dynamic
  batch dimension; it is loaded with ``torch.export.load`` and unflattened so that its
  layers accept hooks. Like a factory, such a file is trusted as code.
- ``package.module:factory`` -- a function or class that builds the network, e.g.
  ``pcace.zoo:cifar_resnet20``; ``checkpoint`` is a state-dict file for it.

A network is never built on random weights silently: without weights or a checkpoint,
``random_weights=True`` must say so, and the initialisation is then seeded (``seed``,
recorded in the spec), so two loads give the same network. TorchScript files are refused:
PyTorch does not run forward hooks on ScriptModules or their submodules.

State-dict files are read with ``torch.load(..., weights_only=True)``: no pickled code
runs. :func:`rebuild_model` reloads the model a run directory records (for ``pcace
ablate``) through known builders only, and checks its weights against the recorded hash.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import first_line
from ..core.voice import option

__all__ = [
    "LoadedModel",
    "count_parameters",
    "load_model",
    "load_state_dict_file",
    "output_size",
    "resolve_torchvision_weights",
    "weights_hash",
]

def _spec_forms() -> str:
    """The model specs pcace reads, in the caller's words."""
    return ("'torchvision:NAME' (e.g. torchvision:resnet18), 'timm:NAME', "
            "an exported program (torch.export.save, .pt2), or 'package.module:factory' "
            f"(e.g. pcace.zoo:cifar_resnet20) with {option('checkpoint', 'FILE')}")


def _export_hint() -> str:
    """How to turn a model pcace cannot hook into one it can, in the caller's words."""
    return ("export the model instead (in Python): torch.export.save(torch.export.export("
            "model, (x,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},)), 'model.pt2'), or "
            "give its architecture as 'package.module:factory' with "
            f"{option('checkpoint', 'FILE')}")
KNOWN_BUILDERS = ("torchvision", "timm", "pcace.zoo")
_NO_WEIGHTS = {"", "none", "random", "null"}


@dataclass
class LoadedModel:
    """A network in eval mode with what is known about its inputs and outputs.

    Attributes
    ----------
    model : torch.nn.Module
        The network, in eval mode, on the CPU.
    description : str
        One line for humans: architecture, weights, parameter count.
    categories : list of str or None
        Class names in output order, when known.
    transform : callable or None
        PIL image -> tensor preprocessing the network expects, when known.
    input_shape : tuple of int or None
        ``(C, H, W)`` of one input, when known.
    spec : dict
        JSON-serialisable description (``kind``, ``spec``, ``weights``, ``checkpoint``
        as an absolute path, ``model_kwargs``); ``load_model(loaded.spec)`` reloads
        the same model.
    """

    model: nn.Module
    description: str
    categories: list[str] | None = None
    transform: Callable[[Any], torch.Tensor] | None = None
    input_shape: tuple[int, ...] | None = None
    spec: dict[str, Any] = field(default_factory=dict)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not) of ``model``.

    Examples
    --------
    >>> from torch import nn
    >>> count_parameters(nn.Linear(3, 2))
    8
    """
    return sum(p.numel() for p in model.parameters())


def weights_hash(model: nn.Module) -> str:
    """First 16 hex digits of the SHA-256 of the state-dict tensors, in key order.

    Two models with the same weights and buffers give the same hash whatever their
    class or key names.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0) and None
    >>> a = nn.Linear(3, 2); b = nn.Linear(3, 2); b.load_state_dict(a.state_dict())
    <All keys matched successfully>
    >>> weights_hash(a) == weights_hash(b)
    True
    """
    digest = hashlib.sha256()
    for value in model.state_dict().values():
        if isinstance(value, torch.Tensor):
            flat = value.detach().to("cpu").contiguous().reshape(-1)
            digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a checkpoint file, safely.

    Accepts a bare state dict or a dict holding one under ``"state_dict"``,
    ``"model_state_dict"`` or ``"model"``; strips a ``module.`` prefix (left by
    ``DataParallel``).

    Parameters
    ----------
    path : str or Path
        A file written by ``torch.save``.

    Returns
    -------
    dict
        Parameter and buffer names -> tensors.

    Examples
    --------
    >>> sd = load_state_dict_file("resnet20.th")  # doctest: +SKIP
    """
    path = _existing_file(path, "checkpoint")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure gets one message
        first = first_line(err)
        raise ValueError(
            f"cannot read {path} as a weights-only checkpoint ({first}); save it with "
            "torch.save(model.state_dict(), path)"
        ) from None
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in obj.values()
    ):
        raise ValueError(
            f"{path} holds no state dict (a dict of tensors, possibly under 'state_dict' or "
            "'model_state_dict'); save it with torch.save(model.state_dict(), path)"
        )
    prefix = "module."
    if obj and all(k.startswith(prefix) for k in obj):
        obj = {k[len(prefix):]: v for k, v in obj.items()}
    return dict(obj)


def _existing_file(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what} file not found: {p}; check the path")
    return p


def _brief(keys: list[str], n: int = 5) -> str:
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    # BatchNorm fills in a missing num_batches_tracked itself; do not complain about it.
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_brief(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_brief(unexpected)}")
        raise ValueError(
            f"{source} does not match the architecture ({'; '.join(parts)}); check that "
            "the spec names the architecture the checkpoint was trained with"
        )
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln]
        raise ValueError(
            f"{source} does not match the architecture ({_brief(lines, 2)}); "
            "pass model_kwargs such as {'num_classes': ...} that match the checkpoint"
        ) from None


def _path_str(path: str | Path | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


def _is_file_weights(weights: str | None) -> bool:
    if weights is None or weights.lower() in _NO_WEIGHTS:
        return False
    p = Path(weights).expanduser()
    return p.is_file() or p.suffix.lower() in {".pt", ".pth", ".th", ".bin", ".ckpt", ".tar"}


def resolve_torchvision_weights(name: str, weights: str) -> Any:
    """Resolve a torchvision weights name for architecture ``name`` without downloading.

    Parameters
    ----------
    name : str
        A torchvision model name, e.g. ``"resnet18"``.
    weights : str
        ``"DEFAULT"``, an entry name such as ``"IMAGENET1K_V1"`` (case-insensitive),
        or a full name such as ``"ResNet18_Weights.IMAGENET1K_V1"``.

    Returns
    -------
    torchvision.models.WeightsEnum
        The weights entry; its ``transforms()`` and ``meta`` need no download.

    Examples
    --------
    >>> resolve_torchvision_weights("resnet18", "DEFAULT")
    ResNet18_Weights.IMAGENET1K_V1
    """
    import torchvision.models as tvm

    enum_cls = tvm.get_model_weights(name)
    entries = {w.name.upper(): w for w in enum_cls}
    key = weights.split(".")[-1].upper()
    if "." in weights and weights.split(".")[0] != enum_cls.__name__:
        raise ValueError(
            f"weights {weights!r} are not for {name}; use one of "
            f"{['DEFAULT', *entries]} ({enum_cls.__name__})"
        )
    if key == "DEFAULT":
        return enum_cls.DEFAULT
    if key not in entries:
        raise ValueError(
            f"unknown weights {weights!r} for torchvision:{name}; use one of "
            f"{['DEFAULT', *(w.name for w in enum_cls)]}, 'none', or a state-dict file"
        )
    return entries[key]


def _torchvision_name(name: str) -> str:
    import torchvision.models as tvm

    available = tvm.list_models()
    if name in available:
        return name
    lower = {m.lower(): m for m in available}
    if name.lower() in lower:
        return lower[name.lower()]
    close = difflib.get_close_matches(name.lower(), list(lower), n=5, cutoff=0.5)
    hint = f"did you mean {', '.join(lower[c] for c in close)}?" if close else (
        "see torchvision.models.list_models()")
    raise ValueError(f"unknown torchvision model {name!r}; {hint}")


def _input_shape_from_transform(transform: Any, channels: int = 3) -> tuple[int, ...] | None:
    crop = getattr(transform, "crop_size", None)
    if not crop:
        return None
    h = crop[0]
    w = crop[1] if len(crop) > 1 else crop[0]
    return (channels, int(h), int(w))


def _no_weights_error(spec: str, *ways: tuple[str, str]) -> ValueError:
    """No trained weights were named: the ways to name them, in the caller's words."""
    from ..core.voice import option

    named = " or ".join(option(name, value) for name, value in ways)
    return ValueError(f"{spec} has no trained weights (give {named}); without them it would "
                      f"run on random weights: pass them, or {option('random_weights')} to "
                      "analyse an untrained network on purpose")


def _download_weights(build: Callable[[], nn.Module], name: str, entry: Any) -> nn.Module:
    """Build a torchvision model with its weights; a failed download says what to do."""
    from urllib.error import URLError

    from ..core.voice import option

    try:
        return build()
    except (URLError, OSError) as err:
        reason = getattr(err, "reason", None) or err
        url = getattr(entry, "url", "?")
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise ValueError(f"downloading the weights {entry} of {name} failed ({reason}) from "
                         f"{url}. Offline: fetch that file on a machine with network access "
                         f"and give it with {option('checkpoint', 'FILE')}, or put it in "
                         f"{cache}") from None


def _seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Build a randomly initialised network from ``seed``, leaving the global RNG alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return build()


def _load_torchvision(name: str, weights: str | None, checkpoint: str | None,
                      model_kwargs: dict[str, Any], random_weights: bool = False,
                      seed: int = 0) -> LoadedModel:
    import torchvision.models as tvm

    name = _torchvision_name(name)
    if checkpoint is not None and weights is not None and weights.lower() not in _NO_WEIGHTS:
        raise ValueError("give either weights or checkpoint for a torchvision model, not both")
    file = checkpoint if checkpoint is not None else (
        weights if _is_file_weights(weights) else None)
    default_tf = None
    try:
        default_tf = tvm.get_model_weights(name).DEFAULT.transforms()
    except (ValueError, KeyError, AttributeError):
        default_tf = None

    if file is not None:
        state = load_state_dict_file(file)
        model = tvm.get_model(name, weights=None, **model_kwargs)
        _load_strict(model, state, str(file))
        spec = {"kind": "torchvision", "name": name, "weights": None,
                "checkpoint": _path_str(file)}
        what, categories, transform = f"weights from {Path(file).name}", None, default_tf
    elif weights is None or weights.lower() in _NO_WEIGHTS:
        if weights is None and not random_weights:
            raise _no_weights_error(f"torchvision:{name}", ("weights", "DEFAULT"),
                                    ("weights", "FILE"))
        model = _seeded(lambda: tvm.get_model(name, weights=None, **model_kwargs), seed)
        spec = {"kind": "torchvision", "name": name, "weights": None, "checkpoint": None,
                "random_weights": True, "seed": int(seed)}
        what, categories, transform = f"random weights (seed {seed})", None, default_tf
    else:
        entry = resolve_torchvision_weights(name, weights)
        model = _download_weights(lambda: tvm.get_model(name, weights=entry, **model_kwargs),
                                  name, entry)
        spec = {"kind": "torchvision", "name": name, "weights": str(entry), "checkpoint": None}
        what = f"weights {entry}"
        categories = list(entry.meta.get("categories") or []) or None
        transform = entry.transforms()
    spec["spec"] = f"torchvision:{name}"
    return _finish(model, f"torchvision {name}, {what}", categories, transform,
                   _input_shape_from_transform(transform), spec, model_kwargs)


def _load_timm(name: str, weights: str | None, checkpoint: str | None,
               model_kwargs: dict[str, Any], random_weights: bool = False,
               seed: int = 0) -> LoadedModel:
    try:
        import timm
    except ImportError:
        raise ValueError(f"timm:{name} needs the timm package; pip install timm") from None
    file = checkpoint if checkpoint is not None else (
        weights if _is_file_weights(weights) else None)
    pretrained = file is None and weights is not None and weights.lower() not in _NO_WEIGHTS
    unweighted = file is None and not pretrained
    if unweighted and weights is None and not random_weights:
        raise _no_weights_error(f"timm:{name}", "weights=pretrained or a state-dict file")
    try:
        model = _seeded(lambda: timm.create_model(name, pretrained=pretrained, **model_kwargs),
                        seed)
    except RuntimeError as err:
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models()"
        raise ValueError(f"timm cannot build {name!r} ({err}); {hint}") from None
    if file is not None:
        _load_strict(model, load_state_dict_file(file), str(file))
    transform = None
    input_shape = None
    try:
        config = timm.data.resolve_data_config({}, model=model)
        transform = timm.data.create_transform(**config)
        input_shape = tuple(int(v) for v in config["input_size"])
    except Exception:  # noqa: BLE001 - preprocessing is optional metadata
        transform = None
    what = ("pretrained weights" if pretrained else
            f"weights from {Path(file).name}" if file else f"random weights (seed {seed})")
    spec = {"kind": "timm", "spec": f"timm:{name}", "name": name,
            "weights": "pretrained" if pretrained else None, "checkpoint": _path_str(file)}
    if unweighted:
        spec.update(random_weights=True, seed=int(seed))
    return _finish(model, f"timm {name}, {what}", None, transform, input_shape, spec,
                   model_kwargs)


def _archive_kind(path: Path) -> str | None:
    """``"torchscript"``, ``"exported"`` or None, from the members of a zip archive."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if any("/code/__torch__" in n for n in names):
        return "torchscript"
    if any(n.endswith(("/models/model.json", "serialized_exported_program.json",
                       "/archive_format")) for n in names):
        return "exported"
    return None


def _load_file(path: Path) -> LoadedModel:
    kind = _archive_kind(path)
    if kind == "torchscript":
        raise ValueError(f"{path} is a TorchScript model: PyTorch runs no forward hooks on "
                         f"ScriptModules or their submodules, which pcace needs; {_export_hint()}")
    if kind != "exported":
        raise ValueError(f"{path} is not an exported program (torch.export.save); a state dict "
                         f"needs its architecture: 'package.module:factory' with "
                         f"{option('checkpoint', path.name, python=repr(path.name))}; or "
                         f"{_export_hint()}")
    return _load_exported(path)


def _load_exported(path: Path) -> LoadedModel:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.load(str(path))
    except Exception as err:  # noqa: BLE001 - torch.export raises many types
        first = first_line(err)
        raise ValueError(f"cannot load the exported program {path} ({first}); export it again "
                         "with this version of torch") from None
    shapes = [n.meta["val"].shape for n in program.graph.nodes if n.op == "placeholder"
              and n.name in program.graph_signature.user_inputs and "val" in n.meta]
    if len(shapes) != 1:
        raise ValueError(f"{path} takes {len(shapes)} inputs; pcace feeds one image batch: "
                         "export a model with a single input")
    if isinstance(shapes[0][0], int):
        raise ValueError(f"{path} was exported for batches of exactly {shapes[0][0]}; export it "
                         "with a dynamic batch dimension: dynamic_shapes=({0: "
                         "torch.export.Dim.DYNAMIC},)")
    dims = shapes[0][1:]
    input_shape = tuple(int(d) for d in dims) if all(isinstance(d, int) for d in dims) else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torch.export.unflatten(program)  # submodules that run hooks
    spec = {"kind": "exported", "spec": _path_str(path), "weights": None, "checkpoint": None}
    return _finish(model, f"exported program {path.name}", None, None, input_shape, spec, {})


def _import_factory(spec: str) -> Callable[..., Any]:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(
            f"cannot import {module_name!r} for {spec!r} ({err}); check the module is "
            "installed or on PYTHONPATH"
        ) from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(module) if not n.startswith("_")]
            close = difflib.get_close_matches(attr, names, n=5, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"{module_name} has no attribute {attr!r}{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{spec} is not callable; name a function or class that builds the model")
    return obj


def _load_factory(spec: str, checkpoint: str | None, model_kwargs: dict[str, Any],
                  random_weights: bool = False, seed: int = 0) -> LoadedModel:
    factory = _import_factory(spec)
    if checkpoint is None and not random_weights:
        raise _no_weights_error(spec, ("checkpoint", "FILE"))
    try:
        model = _seeded(lambda: factory(**model_kwargs), seed)
    except TypeError as err:
        raise ValueError(f"calling {spec}(**{model_kwargs!r}) failed ({err}); pass the "
                         "architecture's arguments as model_kwargs") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    if checkpoint is not None:
        _load_strict(model, load_state_dict_file(checkpoint), str(checkpoint))
        what = f"weights from {Path(checkpoint).name}"
    else:
        what = f"random weights (seed {seed})"
    info = getattr(factory, "pcace_info", None) or {}
    categories = info.get("categories")
    if categories is not None and "num_classes" in model_kwargs and \
            len(categories) != model_kwargs["num_classes"]:
        categories = None
    transform = None
    shape = info.get("input_shape")
    if shape is not None:
        from .data import default_transform

        transform = default_transform(resize=tuple(shape[1:]), mean=info.get("mean"),
                                      std=info.get("std"), grayscale=shape[0] == 1)
    out_spec = {"kind": "factory", "spec": spec, "weights": None,
                "checkpoint": _path_str(checkpoint)}
    if checkpoint is None:
        out_spec.update(random_weights=True, seed=int(seed))
    return _finish(model, f"{spec}, {what}", list(categories) if categories else None,
                   transform, tuple(shape) if shape else None, out_spec, model_kwargs)


def _finish(model: nn.Module, what: str, categories: list[str] | None, transform: Any,
            input_shape: tuple[int, ...] | None, spec: dict[str, Any],
            model_kwargs: dict[str, Any]) -> LoadedModel:
    model.eval()
    spec = {**spec, "model_kwargs": dict(model_kwargs)}
    n = count_parameters(model)
    description = f"{what}, {n / 1e6:.2f}M parameters" if n >= 10_000 else f"{what}, {n} parameters"
    return LoadedModel(model=model, description=description, categories=categories,
                       transform=transform, input_shape=input_shape, spec=spec)


def load_model(spec: str | Path | Mapping[str, Any], weights: str | Path | None = None,
               checkpoint: str | Path | None = None,
               model_kwargs: Mapping[str, Any] | None = None, *,
               random_weights: bool = False, seed: int = 0) -> LoadedModel:
    """Load a network from a spec string, ready for :func:`pcace.rank`.

    Parameters
    ----------
    spec : str, Path or dict
        ``"torchvision:NAME"``, ``"timm:NAME"``, an exported program (``.pt2``), or
        ``"package.module:factory"``. A dict is a :attr:`LoadedModel.spec` from an
        earlier load and reloads the same model (it imports what the spec names: for a
        run directory's spec, use :func:`rebuild_model`).
    weights : str or Path, optional
        torchvision: a weights name (``"DEFAULT"``, ``"IMAGENET1K_V1"``), ``"none"`` for
        random initialisation, or a state-dict file. timm: any value other than
        ``"none"`` asks for pretrained weights; a file is a state dict.
    checkpoint : str or Path, optional
        A state-dict file for a factory (or a torchvision/timm architecture): a bare
        state dict or a dict with ``"state_dict"``/``"model_state_dict"``; a
        ``module.`` prefix is stripped; the load is strict.
    model_kwargs : dict, optional
        Keyword arguments for the architecture, e.g. ``{"num_classes": 1}``.
    random_weights : bool
        Allow a network without trained weights (no checkpoint, no weights); refused
        otherwise. ``weights="none"`` says the same for torchvision and timm.
    seed : int
        Seed of the random initialisation (recorded in the spec): two loads with the
        same seed give the same weights.

    Returns
    -------
    LoadedModel
        The model in eval mode with its categories, transform and input shape when known.

    Raises
    ------
    ValueError
        Unknown architecture or weights, a checkpoint that does not fit, a bad spec, no
        weights without ``random_weights``, a TorchScript file.
    FileNotFoundError
        A named file does not exist.

    Examples
    --------
    >>> lm = load_model("pcace.zoo:cifar_resnet20", random_weights=True, seed=1)
    >>> lm.categories[3], lm.input_shape, lm.spec["seed"]
    ('cat', (3, 32, 32), 1)
    >>> load_model("torchvision:resnet18", weights="none").model.training
    False
    """
    if isinstance(spec, Mapping):
        return _reload(spec, weights, checkpoint, model_kwargs, random_weights, seed)
    kwargs = dict(model_kwargs or {})
    weights_s = None if weights is None else str(weights)
    checkpoint_s = None if checkpoint is None else str(checkpoint)
    text = str(spec).strip()
    if not text:
        raise ValueError(f"empty model spec; use {_spec_forms()}")
    prefix, sep, rest = text.partition(":")
    if sep and prefix.lower() in ("torchvision", "timm"):
        if not rest:
            raise ValueError(f"{prefix} spec needs a name, e.g. {prefix.lower()}:resnet18")
        loader = _load_torchvision if prefix.lower() == "torchvision" else _load_timm
        return loader(rest, weights_s, checkpoint_s, kwargs, random_weights, seed)
    path = Path(text).expanduser()
    if path.is_file():
        if weights_s is not None or checkpoint_s is not None:
            raise ValueError(f"a model file carries its own weights; drop "
                             f"{option('weights', '...')} and {option('checkpoint', '...')}, or "
                             f"give the architecture as {_spec_forms()}")
        return _load_file(path)
    _check_factory_spec(text, path)
    if weights_s is not None and checkpoint_s is None and weights_s.lower() not in _NO_WEIGHTS:
        checkpoint_s = weights_s  # a file passed as weights means the same thing
    if weights_s is not None and weights_s.lower() in _NO_WEIGHTS:
        random_weights = True
    return _load_factory(text, checkpoint_s, kwargs, random_weights, seed)


def _reload(spec: Mapping[str, Any], weights: str | Path | None, checkpoint: str | Path | None,
            model_kwargs: Mapping[str, Any] | None, random_weights: bool,
            seed: int) -> LoadedModel:
    """:func:`load_model` of a :attr:`LoadedModel.spec` dict; its entries win over the
    arguments."""
    saved = dict(spec)
    if "spec" not in saved:
        raise ValueError("a spec dict needs a 'spec' entry, as LoadedModel.spec has")
    return load_model(saved["spec"], weights=saved.get("weights", weights),
                      checkpoint=saved.get("checkpoint", checkpoint),
                      model_kwargs=saved.get("model_kwargs", model_kwargs),
                      random_weights=bool(saved.get("random_weights", random_weights)),
                      seed=int(saved.get("seed", seed)))


def _check_factory_spec(text: str, path: Path) -> None:
    """Raise unless ``text`` reads as ``"package.module:factory"``: FileNotFoundError when it
    looks like a path to a missing file (``path``), ValueError otherwise."""
    if path.suffix.lower() in {".pt", ".pth", ".ts", ".th", ".jit", ".pt2"} or "/" in text or \
            "\\" in text:
        raise FileNotFoundError(f"model file not found: {path}; check the path")
    module_name, sep, attr = text.partition(":")
    valid = sep and attr and all(p.isidentifier() for p in module_name.split(".")) and \
        all(p.isidentifier() for p in attr.split("."))
    if not valid:
        raise ValueError(f"cannot read model spec {text!r}; use {_spec_forms()}")


def output_size(model: nn.Module, input_shape: tuple[int, ...]) -> int | None:
    """Number of outputs per image (classes, or regression outputs) from a dummy pass.

    Parameters
    ----------
    model : torch.nn.Module
        The network (run in eval mode, without gradients, on its own device).
    input_shape : tuple of int
        ``(C, H, W)`` of one input.

    Returns
    -------
    int or None
        ``K`` for an (N, K) output, 1 for (N,); None when the output is not a tensor.

    Examples
    --------
    >>> from pcace.zoo import mnist_cnn
    >>> output_size(mnist_cnn(), (1, 28, 28))
    10
    """
    from .hooks import evaluating
    from .targets import output_tensor

    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    try:
        with evaluating(model), torch.no_grad():
            out = model(torch.zeros((2, *input_shape), device=device))
        tensor = output_tensor(out)
    except ValueError:
        return None
    return 1 if tensor.ndim == 1 else int(tensor[0].numel())
