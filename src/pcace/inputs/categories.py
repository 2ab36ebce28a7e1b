"""Class names: whose are they? The model's, the user's, or the data's folders.

:func:`choose_categories` decides which list names a model's outputs (and says where it
came from); :func:`resolve_target_for_model` resolves a target by those names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..core.voice import option
from .targets import RegressionOutput, Target, _ClassTarget, resolve_target

__all__ = ["Categories", "FolderClasses", "choose_categories", "describe_resolved",
           "folder_classes", "resolve_target_for_model"]


@dataclass(frozen=True)
class Categories:
    """The class names of a model's outputs, with where they came from.

    Attributes
    ----------
    names : tuple of str
        One name per output, in output order.
    source : str
        ``"declared"`` (the user's list), ``"model"`` (weights or factory metadata) or
        ``"data folders"`` (the dataset's class folders, used only when there are as many
        as the model has outputs).
    """

    names: tuple[str, ...]
    source: str


def choose_categories(model: Sequence[str] | None = None, declared: Sequence[str] | None = None,
                      data: Sequence[str] | None = None,
                      n_outputs: int | None = None) -> Categories | None:
    """Pick the class names a class-name target is resolved against.

    The user's declared list first, then the model's own (weights metadata); the data's
    folder names only when they are provably the model's full class list: as many
    folders as the model has outputs. A folder tree holding only ``cat/`` says nothing
    about which output is the cat.

    Parameters
    ----------
    model : sequence of str, optional
        The model's categories (``LoadedModel.categories``).
    declared : sequence of str, optional
        Names the user gives (e.g. ``--categories``), one per output.
    data : sequence of str, optional
        The dataset's class folders (``ImageFolder.classes``), sorted as the dataset has them.
    n_outputs : int, optional
        The model's number of outputs (:func:`pcace.inputs.models.output_size`); without it the
        data's folders are never used.

    Returns
    -------
    Categories or None
        None when no trustworthy list exists.

    Raises
    ------
    ValueError
        A declared or model list whose length differs from ``n_outputs``.

    Examples
    --------
    >>> choose_categories(data=["cat"], n_outputs=10) is None
    True
    >>> choose_categories(data=["cat", "dog"], n_outputs=2).source
    'data folders'
    """
    for names, source in ((declared, "declared"), (model, "model")):
        if names:
            names = tuple(str(n) for n in names)
            if n_outputs is not None and len(names) != n_outputs:
                what = "the declared class names" if source == "declared" else \
                    "the model's class names"
                raise ValueError(f"{what} number {len(names)} but the model has {n_outputs} "
                                 "outputs; give one name per output, in output order")
            return Categories(names, source)
    if data and n_outputs is not None and len(data) == n_outputs:
        return Categories(tuple(str(n) for n in data), "data folders")
    return None


@dataclass(frozen=True)
class FolderClasses:
    """The model's output for each class folder of the data, or why it is unknown.

    Attributes
    ----------
    indices : tuple of int or None
        ``indices[i]`` is the model's class index of folder ``i`` (the folders' sorted
        order, which is their label); None when unknown.
    reason : str
        How the folders were matched, or why they could not be.
    """

    indices: tuple[int, ...] | None
    reason: str

    @property
    def identity(self) -> bool:
        """True when every folder's label already is its model class index."""
        return self.indices is not None and self.indices == tuple(range(len(self.indices)))


def folder_classes(folders: Sequence[str], categories: Categories | None,
                   n_outputs: int | None) -> FolderClasses:
    """Match class folders to the model's outputs by name.

    A folder's label is its position among the data's folders (``cat/`` and ``dog/`` are 0
    and 1), which is the model's class index only when the folders are the model's whole
    class list in its order. Otherwise the folders are matched by name to the class names
    the run resolves targets with (:func:`choose_categories`), exactly, else ignoring case.

    Parameters
    ----------
    folders : sequence of str
        The data's class folders, in label order.
    categories : Categories or None
        The model's class names (:func:`choose_categories`).
    n_outputs : int or None
        The model's number of outputs.

    Returns
    -------
    FolderClasses
        The model index of each folder, or None with the reason.

    Examples
    --------
    >>> cifar = Categories(("airplane", "automobile", "bird", "cat", "deer", "dog"), "model")
    >>> folder_classes(["cat", "dog"], cifar, 6).indices
    (3, 5)
    >>> folder_classes(["cat", "wolf"], cifar, 6).indices is None
    True
    """
    folders = [str(f) for f in folders]
    if n_outputs is not None and n_outputs < 2:
        return FolderClasses(None, f"the model has {n_outputs} output: no classes to match")
    if categories is None:
        return FolderClasses(None, "the model's class names are unknown (no names in its "
                             "weights, none declared, and the data's folders are not as many "
                             "as its outputs)")
    names = list(categories.names)
    lowered = [n.lower() for n in names]
    indices, missing = [], []
    for folder in folders:
        if folder in names:
            indices.append(names.index(folder))
        elif lowered.count(folder.lower()) == 1:
            indices.append(lowered.index(folder.lower()))
        else:
            missing.append(folder)
    if missing:
        return FolderClasses(None, f"folder{'s' if len(missing) > 1 else ''} "
                             f"{', '.join(missing)} name{'' if len(missing) > 1 else 's'} no "
                             f"class of the model ({categories.source} names: "
                             f"{', '.join(names[:12])}{', ...' if len(names) > 12 else ''})")
    return FolderClasses(tuple(indices), f"folders matched by name to the {categories.source} "
                         "class names")


def resolve_target_for_model(spec: Any, *, model_categories: Sequence[str] | None = None,
                             declared: Sequence[str] | None = None,
                             data_classes: Sequence[str] | None = None,
                             n_outputs: int | None = None) -> tuple[Target, Categories | None]:
    """:func:`resolve_target` against the model's own class names, checked before any pass.

    Parameters
    ----------
    spec : int, str, dict, callable or Target
        As for :func:`resolve_target`.
    model_categories, declared, data_classes, n_outputs
        As for :func:`choose_categories`.

    Returns
    -------
    (Target, Categories or None)
        The target, and the class names it was resolved against (for
        :func:`describe_resolved` and for ``rank(categories=...)``).

    Raises
    ------
    ValueError
        A class name with no trustworthy class list (the message says why the data's
        folders were not used and asks for an index or a category list); an index
        outside the outputs.

    Examples
    --------
    >>> t, cats = resolve_target_for_model("cat", data_classes=["cat", "dog"], n_outputs=2)
    >>> describe_resolved(t, cats)
    'logit of class 0 (cat; class names from the data folders)'
    """
    categories = choose_categories(model_categories, declared, data_classes, n_outputs)
    names = list(categories.names) if categories else None
    try:
        target = resolve_target(spec, names)
    except ValueError as err:
        if names is None and data_classes and "needs the model's class names" in str(err):
            raise ValueError(_folders_not_used(spec, data_classes, n_outputs)) from None
        raise
    if n_outputs is not None and isinstance(target, _ClassTarget | RegressionOutput):
        target.check((1, n_outputs))
    return target, categories


def _folders_not_used(spec: Any, data: Sequence[str], n_outputs: int | None) -> str:
    count = f"{len(data)} class folder{'s' if len(data) != 1 else ''}"
    why = (f"the data has {count} but the model has {n_outputs} outputs, so the folder "
           "names are not its class list" if n_outputs is not None else
           f"the data's {count} cannot be matched to the model's outputs")
    return (f"class name {str(spec)!r} cannot be resolved: the model declares no class names "
            f"and {why}; give the class index (e.g. {option('target', 3)}) or the model's "
            f"class names ({option('categories', 'NAME ...', python='[...]')}), one per "
            "output")


def describe_resolved(target: Target, categories: Categories | None = None) -> str:
    """One line saying which output the score reads, to print before the forward pass.

    Examples
    --------
    >>> from pcace.inputs.targets import ClassLogit
    >>> describe_resolved(ClassLogit(3, "cat"), Categories(("a", "b", "c", "cat"), "model"))
    "logit of class 3 (cat; class names from the model's weights metadata)"
    >>> describe_resolved(ClassLogit(3))
    'logit of class 3 (no class names known)'
    """
    if not isinstance(target, _ClassTarget):
        return target.describe()
    if target.name is None:
        return f"{target.noun} of class {target.index} (no class names known)"
    source = {"model": "the model's weights metadata", "declared": "the declared list",
              "data folders": "the data folders"}.get(
        categories.source if categories else "", "the given list")
    return f"{target.noun} of class {target.index} ({target.name}; class names from {source})"


# --- several targets from one forward pass ------------------------------------------------------

