"""A run's model, rebuilt from its record: only known builders, checked by their weights.

:func:`rebuild_model` replays what ``run.json`` records of the model (``pcace ablate`` on
a saved run): torchvision, timm and :mod:`pcace.zoo` builders; anything else runs code and
is rebuilt only when the user names it again.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..core.voice import action, option
from .models import LoadedModel, _path_str, load_model, weights_hash

__all__ = ["rebuild_model"]


_JSON_SCALARS = (str, int, float, bool, type(None))
_TIMM_FILE_KWARGS = {"checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay"}


def _safe_kwargs(kind: str, kwargs: Any) -> dict[str, Any]:
    """Recorded model_kwargs: plain JSON values, nothing that names a file to load."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping):
        raise ValueError("run.json's model_kwargs is not a dict; the run directory was edited")

    def plain(v: Any) -> bool:
        return isinstance(v, _JSON_SCALARS) or (
            isinstance(v, list) and all(isinstance(x, _JSON_SCALARS) for x in v))

    bad = [k for k, v in kwargs.items() if not isinstance(k, str) or not plain(v) or
           (kind == "timm" and k in _TIMM_FILE_KWARGS)]
    if bad:
        raise ValueError(f"run.json's model_kwargs {bad} cannot be replayed safely; "
                         f"{action('ablate_from_python')}")
    return dict(kwargs)


def _builder_of(recorded: Mapping[str, Any]) -> str | None:
    """The known builder a recorded spec uses (torchvision, timm, pcace.zoo), else None."""
    kind = recorded.get("kind")
    text = str(recorded.get("spec") or "")
    if kind == "torchvision" and text.startswith("torchvision:"):
        return "torchvision"
    if kind == "timm" and text.startswith("timm:"):
        return "timm"
    if kind == "factory" and text.startswith("pcace.zoo:"):
        from . import zoo

        if text.partition(":")[2] in zoo.__all__:
            return "pcace.zoo"
    return None


def rebuild_model(recorded: Mapping[str, Any], *, model: str | Path | None = None,
                  checkpoint: str | Path | None = None,
                  weights: str | Path | None = None) -> LoadedModel:
    """Rebuild the model a run directory records, safely, and check it is the same one.

    Only known builders (``torchvision:``, ``timm:``, ``pcace.zoo:``) are replayed from
    the record. A recorded ``package.module:factory`` or model file runs code, so it is
    rebuilt only when the user names the same spec again (``model``). The weights come
    from the recorded weights name or checkpoint (``checkpoint``/``weights`` replace them,
    e.g. a moved file, loaded with ``weights_only=True``); the result must have the
    recorded ``weights_sha256``.

    Parameters
    ----------
    recorded : mapping
        ``run.json``'s ``"model"`` entry: ``{"spec": {...}, "weights_sha256": ..., ...}``.
    model : str or Path, optional
        The model spec the user gives now (``--model``); required for a recorded factory
        outside pcace.zoo or a model file, and then it must equal the recorded one.
    checkpoint, weights : str or Path, optional
        Replace the recorded checkpoint / weights name.

    Returns
    -------
    LoadedModel

    Raises
    ------
    ValueError
        The record is not replayable without the user naming the model, the user's spec
        differs from the record, or the weights hash differs from the recorded one.

    Examples
    --------
    >>> import json, pcace  # doctest: +SKIP
    >>> manifest = json.load(open("runs/cat/run.json"))  # doctest: +SKIP
    >>> loaded = rebuild_model(manifest["model"])  # doctest: +SKIP
    """
    spec = recorded.get("spec") if isinstance(recorded, Mapping) else None
    if not isinstance(spec, Mapping) or not isinstance(spec.get("spec"), str):
        raise ValueError("this run does not record how its model was loaded (it was made from "
                         f"Python); {action('ablate_from_python')}")
    expected = recorded.get("weights_sha256")
    if not isinstance(expected, str) or not expected:
        raise ValueError("run.json records no weights_sha256, so the rebuilt model cannot be "
                         f"checked; {action('ablate_from_python')}")
    builder = _builder_of(spec)
    named = None if model is None else str(model).strip()
    if builder is None:
        if named is None:
            raise ValueError(f"the run's model {spec['spec']!r} is not a known builder "
                             "(torchvision, timm, pcace.zoo) and would run code named in "
                             "run.json; name it again with "
                             f"{option('model', spec['spec'], python=repr(spec['spec']))} to "
                             "confirm")
        if _same_spec(named, spec) is False:
            raise ValueError(_differs(named, spec))
    elif named is not None and _same_spec(named, spec) is False:
        raise ValueError(f"{_differs(named, spec)}, or leave {option('model', '...')} out")
    kind = spec.get("kind")
    kwargs = _safe_kwargs(str(kind), spec.get("model_kwargs"))
    ckpt = checkpoint if checkpoint is not None else spec.get("checkpoint")
    wts = weights if weights is not None else spec.get("weights")
    if checkpoint is not None and kind == "torchvision":
        wts = None
    if kind in ("exported", "torchscript"):
        loaded = load_model(spec["spec"])
    else:
        loaded = load_model(spec["spec"], weights=wts, checkpoint=ckpt, model_kwargs=kwargs,
                            random_weights=bool(spec.get("random_weights")),
                            seed=int(spec.get("seed", 0)))
    found = weights_hash(loaded.model)
    if found != expected:
        source = f"checkpoint {ckpt}" if ckpt else f"weights {wts}" if wts else "the seed"
        raise ValueError(f"the rebuilt model's weights (hash {found}) differ from the run's "
                         f"({expected}): {source} changed since the run; pass the checkpoint "
                         f"the run was made with ({option('checkpoint', 'FILE')})")
    return loaded


def _differs(named: str, spec: Mapping[str, Any]) -> str:
    return (f"{option('model', named, python=repr(named))} differs from the run's model "
            f"{spec['spec']}; give the model the run was made with")


def _same_spec(named: str, spec: Mapping[str, Any]) -> bool:
    recorded = str(spec["spec"])
    if spec.get("kind") in ("exported", "torchscript"):
        return _path_str(named) == recorded
    return named == recorded
