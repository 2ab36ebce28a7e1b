"""What the score is: small callables from a model's output batch to one number per image.

PCACE correlates each channel's activation maps with a scalar score per image. A
target maps the network's output for a batch, shape (N, C) or (N,), to that score,
shape (N,):

- :class:`ClassLogit` -- a class score before the softmax (the paper's choice).
- :class:`ClassProbability` -- the softmax probability of a class.
- :class:`RegressionOutput` -- an output of a regression network.
- :class:`CustomTarget` -- any function ``outputs -> (N,)``.

:func:`resolve_target` turns user input (``3``, ``"cat"``, ``"prob:cat"``,
``"output"``) into one of these.

Examples
--------
>>> import torch
>>> t = resolve_target("prob:cat", categories=["dog", "cat"])
>>> t.describe()
'softmax probability of class 1 (cat)'
>>> t(torch.tensor([[0.0, 0.0], [0.0, 100.0]]))
tensor([0.5000, 1.0000])
"""

from __future__ import annotations

import difflib
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "ClassLogit",
    "ClassProbability",
    "CustomTarget",
    "RegressionOutput",
    "Target",
    "TargetSet",
    "resolve_target",
    "resolve_targets",
    "target_from_dict",
    "target_label",
]

TARGET_FORMS = (
    "a class index (3), a class name ('cat'), 'logit:C', 'prob:C' (C an index or name), "
    "'output' or 'output:I' for a regression output, or a callable outputs -> (N,)"
)


def output_tensor(output: Any) -> torch.Tensor:
    """The tensor in a model's output: itself, ``.logits``, or the first of a tuple.

    Examples
    --------
    >>> output_tensor((torch.ones(2, 3), "aux")).shape
    torch.Size([2, 3])
    """
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, list | tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ValueError(f"cannot read a score from a model output of type {type(output).__name__}; "
                     "give a callable target that maps it to an (N,) tensor")


def _as_index(index: Any) -> int:
    try:
        return operator.index(index)
    except TypeError:
        raise ValueError(f"an output index must be an integer; got {index!r}") from None


class Target:
    """Base of the score definitions: ``target(outputs) -> (N,)``.

    Subclasses implement :meth:`score` (and usually :meth:`check`).
    """

    kind = "target"

    def __call__(self, output: Any) -> torch.Tensor:
        out = output_tensor(output)
        self.check(tuple(out.shape))
        return self.score(out)

    def score(self, output: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def check(self, output_shape: Sequence[int]) -> None:
        """Raise ValueError if this target cannot be read from outputs of this shape.

        ``output_shape`` is the shape of the model's output for a batch, batch axis first.
        """

    def describe(self) -> str:
        return self.kind

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if k != "kind")
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.to_dict() == self.to_dict()

    def __hash__(self) -> int:
        return hash(repr(self))


class _ClassTarget(Target):
    noun = "class score"

    def __init__(self, index: int, name: str | None = None):
        self.index = _as_index(index)
        self.name = name

    def check(self, output_shape: Sequence[int]) -> None:
        shape = tuple(output_shape)
        if len(shape) != 2:
            raise ValueError(f"{self.describe()} needs outputs of shape (N, classes); got "
                             f"{shape}. For a regression network use RegressionOutput")
        n_classes = shape[1]
        if not 0 <= self.index < n_classes:
            raise ValueError(f"class index {self.index} is outside the output's "
                             f"{n_classes} classes; use 0..{n_classes - 1}")

    def describe(self) -> str:
        label = f" ({self.name})" if self.name else ""
        return f"{self.noun} of class {self.index}{label}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "index": self.index, "name": self.name}


class ClassLogit(_ClassTarget):
    """The score of class ``index`` before the softmax (the logit), as in the paper.

    Parameters
    ----------
    index : int
        Column of the output.
    name : str, optional
        Class name, for descriptions only.

    Examples
    --------
    >>> import torch
    >>> ClassLogit(1)(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    tensor([2., 4.])
    """

    kind = "class_logit"
    noun = "logit"

    def score(self, output: torch.Tensor) -> torch.Tensor:
        return output[:, self.index]


class ClassProbability(_ClassTarget):
    """The softmax probability of class ``index``.

    Parameters
    ----------
    index : int
        Column of the output.
    name : str, optional
        Class name, for descriptions only.

    Examples
    --------
    >>> import torch
    >>> ClassProbability(0)(torch.zeros(3, 4))
    tensor([0.2500, 0.2500, 0.2500])
    """

    kind = "class_probability"
    noun = "softmax probability"

    def score(self, output: torch.Tensor) -> torch.Tensor:
        return torch.softmax(output.float(), dim=1)[:, self.index].to(output.dtype)


class RegressionOutput(Target):
    """An output of a regression network.

    Parameters
    ----------
    index : int, optional
        Column of an (N, K) output. None: the network must have a single output,
        shape (N,) or (N, 1).

    Examples
    --------
    >>> import torch
    >>> RegressionOutput()(torch.tensor([[0.5], [1.5]]))
    tensor([0.5000, 1.5000])
    """

    kind = "regression_output"

    def __init__(self, index: int | None = None):
        self.index = None if index is None else _as_index(index)

    def check(self, output_shape: Sequence[int]) -> None:
        shape = tuple(output_shape)
        if len(shape) == 1 and self.index in (None, 0):
            return
        if len(shape) != 2:
            raise ValueError(f"a regression output needs outputs of shape (N,) or (N, K); "
                             f"got {shape}")
        k = shape[1]
        if self.index is None:
            if k != 1:
                raise ValueError(f"the network has {k} outputs; name one with "
                                 f"RegressionOutput(index) or 'output:I', I in 0..{k - 1}")
        elif not 0 <= self.index < k:
            raise ValueError(f"output index {self.index} is outside the network's {k} "
                             f"outputs; use 0..{k - 1}")

    def score(self, output: torch.Tensor) -> torch.Tensor:
        if output.ndim == 1:
            return output
        return output[:, 0 if self.index is None else self.index]

    def describe(self) -> str:
        return "regression output" if self.index is None else f"regression output {self.index}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "index": self.index}


class CustomTarget(Target):
    """A user function ``outputs -> (N,)`` with a description.

    Parameters
    ----------
    fn : callable
        Maps the model's output batch to one score per image.
    name : str, optional
        For descriptions; default the function's name.

    Examples
    --------
    >>> import torch
    >>> t = CustomTarget(lambda out: out[:, 3] - out[:, 5], name="cat minus dog")
    >>> t(torch.arange(12.0).reshape(2, 6))
    tensor([-2., -2.])
    """

    kind = "callable"

    def __init__(self, fn: Callable[[Any], torch.Tensor], name: str | None = None):
        if not callable(fn):
            raise ValueError(f"CustomTarget needs a callable; got {type(fn).__name__}")
        self.fn = fn
        self.name = name or getattr(fn, "__qualname__", None) or type(fn).__name__

    def __call__(self, output: Any) -> torch.Tensor:
        scores = self.fn(output)
        if not isinstance(scores, torch.Tensor):
            scores = torch.as_tensor(scores)
        n = _batch_size(output)
        if scores.ndim == 2 and scores.shape[1] == 1:
            scores = scores[:, 0]
        if scores.ndim != 1 or (n is not None and scores.shape[0] != n):
            raise ValueError(f"target {self.name!r} returned shape {tuple(scores.shape)}; it "
                             f"must return one score per image, shape ({n},)")
        return scores

    def describe(self) -> str:
        return f"custom score {self.name}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name}


def _batch_size(output: Any) -> int | None:
    try:
        return int(output_tensor(output).shape[0])
    except (ValueError, IndexError):
        return None


def _class_index(text: str, categories: Sequence[str] | None) -> tuple[int, str | None]:
    """A class given as an index or a name -> (index, name)."""
    text = text.strip()
    try:
        index = int(text)
    except ValueError:
        pass
    else:
        name = categories[index] if categories and 0 <= index < len(categories) else None
        return index, name
    if not categories:
        raise ValueError(f"class name {text!r} needs the model's class names (categories); "
                         "give a class index instead")
    hits = [i for i, c in enumerate(categories) if c.lower() == text.lower()]
    if len(hits) == 1:
        return hits[0], categories[hits[0]]
    if len(hits) > 1:
        raise ValueError(f"class name {text!r} is ambiguous: indices {hits}; give the index")
    lowered = {c.lower(): c for c in categories}
    close = difflib.get_close_matches(text.lower(), list(lowered), n=5, cutoff=0.6)
    hint = (f"did you mean {', '.join(repr(lowered[c]) for c in close)}?" if close
            else f"{len(categories)} classes, e.g. {', '.join(map(repr, categories[:5]))}")
    raise ValueError(f"unknown class name {text!r}; {hint}")


def target_from_dict(d: Mapping[str, Any]) -> Target:
    """Rebuild a target from its :meth:`Target.to_dict` (e.g. from a run manifest).

    A ``"callable"`` entry cannot be rebuilt: the function is not stored.

    Examples
    --------
    >>> target_from_dict(ClassLogit(3, "cat").to_dict()).describe()
    'logit of class 3 (cat)'
    """
    kind = d.get("kind")
    if kind == ClassLogit.kind:
        return ClassLogit(d["index"], d.get("name"))
    if kind == ClassProbability.kind:
        return ClassProbability(d["index"], d.get("name"))
    if kind == RegressionOutput.kind:
        return RegressionOutput(d.get("index"))
    if kind == CustomTarget.kind:
        raise ValueError(f"custom target {d.get('name')!r} cannot be rebuilt from its "
                         "description; pass the callable again")
    raise ValueError(f"unknown target kind {kind!r}; expected one of class_logit, "
                     "class_probability, regression_output")


def resolve_target(spec: Any, categories: Sequence[str] | None = None) -> Target:
    """Turn a user's score definition into a :class:`Target`.

    Parameters
    ----------
    spec : int, str, dict, callable, Target or None
        - an int or numeric string: :class:`ClassLogit` of that class;
        - a class name (case-insensitive exact match in ``categories``): its logit;
        - ``"logit:C"`` / ``"prob:C"``: logit / softmax probability of class C
          (index or name);
        - ``"output"`` / ``"output:I"``: :class:`RegressionOutput`;
        - None: :class:`RegressionOutput` (a single-output network, as in Captum);
        - a dict from :meth:`Target.to_dict`: rebuilt;
        - a :class:`Target` passes through; another callable is wrapped in
          :class:`CustomTarget`.
    categories : sequence of str, optional
        The model's class names, for names and descriptions.

    Returns
    -------
    Target

    Examples
    --------
    >>> resolve_target(3)
    ClassLogit(index=3, name=None)
    >>> resolve_target("Cat", categories=["dog", "cat"]).describe()
    'logit of class 1 (cat)'
    >>> resolve_target("output:2")
    RegressionOutput(index=2)
    """
    if isinstance(spec, Target):
        return spec
    if spec is None:
        return RegressionOutput()
    if isinstance(spec, bool):
        raise ValueError(f"cannot read target {spec!r}; use {TARGET_FORMS}")
    if isinstance(spec, Mapping):
        return target_from_dict(spec)
    if isinstance(spec, str):
        return _resolve_text(spec, categories)
    try:
        index = operator.index(spec)
    except TypeError:
        pass
    else:
        return ClassLogit(index, _name_of(index, categories))
    if callable(spec):
        return CustomTarget(spec)
    raise ValueError(f"cannot read target {spec!r} of type {type(spec).__name__}; "
                     f"use {TARGET_FORMS}")


def _name_of(index: int, categories: Sequence[str] | None) -> str | None:
    return categories[index] if categories and 0 <= index < len(categories) else None


def _resolve_text(spec: str, categories: Sequence[str] | None) -> Target:
    text = spec.strip()
    if not text:
        raise ValueError(f"empty target; use {TARGET_FORMS}")
    if categories and any(c.lower() == text.lower() for c in categories):
        return ClassLogit(*_class_index(text, categories))
    head, sep, rest = text.partition(":")
    head = head.strip().lower()
    if head == "output":
        if not sep:
            return RegressionOutput()
        try:
            return RegressionOutput(int(rest))
        except ValueError:
            raise ValueError(f"'output:I' needs an integer output index; got {rest!r}") from None
    if sep and head in ("prob", "probability", "logit"):
        if not rest.strip():
            raise ValueError(f"{head}:C needs a class index or name after the colon")
        cls = ClassProbability if head.startswith("prob") else ClassLogit
        return cls(*_class_index(rest, categories))
    if sep:
        raise ValueError(f"unknown target prefix {head!r}; use {TARGET_FORMS}")
    return ClassLogit(*_class_index(text, categories))


def target_label(target: Target) -> str:
    """A short name of a target for tables: the ``target`` column of a run's channels.

    Examples
    --------
    >>> target_label(ClassLogit(3, "cat")), target_label(ClassLogit(3))
    ('cat', '3')
    >>> target_label(ClassProbability(3, "cat")), target_label(RegressionOutput(1))
    ('prob:cat', 'output:1')
    """
    if isinstance(target, _ClassTarget):
        name = target.name if target.name is not None else str(target.index)
        return name if isinstance(target, ClassLogit) else f"prob:{name}"
    if isinstance(target, RegressionOutput):
        return "output" if target.index is None else f"output:{target.index}"
    if isinstance(target, CustomTarget):
        return str(target.name)
    return target.describe()


class TargetSet:
    """Several targets read from one model output: ``outputs -> (B, T)``.

    Either an explicit list of targets, or every class output of the model (``"all"``),
    whose count is known only once the model has run: after the first call, ``targets``
    holds one :class:`ClassLogit` per output column.

    Parameters
    ----------
    targets : sequence of Target, optional
        The targets, in column order. None with ``all_classes``.
    all_classes : bool
        Every column of an (N, C) output, as class logits.
    categories : sequence of str, optional
        Class names, for the labels of ``"all"``.

    Examples
    --------
    >>> import torch
    >>> ts = TargetSet([ClassLogit(1), ClassProbability(0)])
    >>> ts(torch.zeros(4, 2)).shape, ts.labels
    (torch.Size([4, 2]), ['1', 'prob:0'])
    >>> every = TargetSet(all_classes=True, categories=["dog", "cat"])
    >>> every(torch.zeros(3, 2)).shape, every.labels
    (torch.Size([3, 2]), ['dog', 'cat'])
    """

    #: :func:`pcace.capture.capture.capture` accepts an (B, T) score from it.
    returns_matrix = True

    def __init__(self, targets: Sequence[Target] | None = None, *, all_classes: bool = False,
                 categories: Sequence[str] | None = None):
        if all_classes == (targets is not None):
            raise ValueError("give either a list of targets or all_classes=True")
        self.all_classes = all_classes
        self.categories = list(categories) if categories else None
        self.targets: list[Target] | None = list(targets) if targets is not None else None
        if self.targets is not None:
            if not self.targets:
                raise ValueError("the list of targets is empty; give at least one")
            _check_unique(self.labels)

    def __call__(self, output: Any) -> torch.Tensor:
        if not self.all_classes:
            assert self.targets is not None
            return torch.stack([t(output) for t in self.targets], dim=1)
        out = output_tensor(output)
        if out.ndim != 2:
            raise ValueError(f"target 'all' needs outputs of shape (N, classes); got "
                             f"{tuple(out.shape)}")
        if self.targets is None:
            self.expand(out.shape[1])
        elif len(self.targets) != out.shape[1]:
            raise ValueError(f"the model's output changed width: {out.shape[1]} columns, "
                             f"{len(self.targets)} before")
        return out

    def expand(self, n_classes: int) -> None:
        """Fix the classes of ``"all"`` without running the model (a resumed run)."""
        if self.all_classes and self.targets is None:
            self.targets = [ClassLogit(i, _name_of(i, self.categories)) for i in range(n_classes)]

    @property
    def labels(self) -> list[str]:
        """One short name per target (:func:`target_label`), in column order."""
        if self.targets is None:
            raise ValueError("the classes of target 'all' are known only after the model ran")
        return [target_label(t) for t in self.targets]

    def __len__(self) -> int:
        return len(self.targets) if self.targets is not None else 0

    def describe(self) -> str:
        if self.targets is None:
            return "every class output (logits)"
        if len(self.targets) == 1:
            return self.targets[0].describe()
        return f"{len(self.targets)} targets: {', '.join(self.labels)}"


def _check_unique(labels: Sequence[str]) -> None:
    seen: set[str] = set()
    for label in labels:
        if label in seen:
            raise ValueError(f"target {label!r} is given twice; give each target once")
        seen.add(label)


def resolve_targets(spec: Any, categories: Sequence[str] | None = None) -> TargetSet:
    """Turn one or several score definitions into a :class:`TargetSet`.

    Parameters
    ----------
    spec : target, list of targets, or "all"
        One target as for :func:`resolve_target`; a list or tuple of them (ints, names,
        ``"prob:C"``, callables, ...); or ``"all"``: every class output's logit.
    categories : sequence of str, optional
        The model's class names.

    Returns
    -------
    TargetSet

    Examples
    --------
    >>> resolve_targets([3, "prob:cat"], categories=["a", "b", "c", "cat"]).labels
    ['cat', 'prob:cat']
    >>> resolve_targets("all").all_classes
    True
    """
    if isinstance(spec, TargetSet):
        return spec
    if isinstance(spec, str) and spec.strip().lower() == "all" and not (
            categories and any(c.lower() == "all" for c in categories)):
        return TargetSet(all_classes=True, categories=categories)
    if isinstance(spec, list | tuple):
        if any(isinstance(s, str) and s.strip().lower() == "all" for s in spec):
            if len(spec) != 1:
                raise ValueError("target 'all' cannot be combined with other targets")
            return TargetSet(all_classes=True, categories=categories)
        return TargetSet([resolve_target(s, categories) for s in spec], categories=categories)
    return TargetSet([resolve_target(spec, categories)], categories=categories)
