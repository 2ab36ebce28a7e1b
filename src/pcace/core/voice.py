"""Whose words a message uses: the ``pcace`` command's or the Python API's.

One place decides. The command line's entry point runs its command inside
:func:`speaking_cli`; everything else (a notebook, a script calling :func:`pcace.rank`)
is the API. A message that tells the user what to do asks this module how to say it,
:func:`option` for a setting (``--random-weights`` or ``random_weights=True``) and
:func:`action` for a step (``pcace layers --model MODEL`` or
``pcace.layers.describe_layers(model, input_shape)``), instead of writing both.

Examples
--------
>>> option("random_weights")
'random_weights=True'
>>> with speaking_cli():
...     option("random_weights"), option("checkpoint", "FILE")
('--random-weights', '--checkpoint FILE')
>>> is_cli()
False
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

__all__ = ["ACTIONS", "action", "is_cli", "option", "speaking_cli"]

_CLI: ContextVar[bool] = ContextVar("pcace_speaking_cli", default=False)

#: Settings whose command-line flag is not the parameter's name with dashes.
_FLAGS = {"checkpoint_dir": "out", "per_label": "per-class", "ace_options": "ace-bins",
          "class_name": "class"}

#: Steps a message may point to: (the command line's way, the API's way). Fields in braces
#: are filled from :func:`action`'s keywords.
ACTIONS: dict[str, tuple[str, str]] = {
    "list_layers": ("`pcace layers --model {model}`",
                    "pcace.layers.describe_layers(model, input_shape)"),
    "write_report": ("`pcace report {run_dir}`", "pcace.viz.write_report({run_dir!r})"),
    "full_tables": ("`pcace show {run_dir}` (or --verbose)", "result.summary(verbose=True)"),
    "flat_folder": ("give the folder itself to --data (its images form one group)",
                    "pcace.data.image_folder(path) takes a flat folder as one group, "
                    "pcace.data.csv_images(csv) a list of files"),
    "start_afresh": ("use --force to start afresh",
                     "give another checkpoint_dir (or empty this one) to start afresh"),
    "resume": ("run the same command with --resume",
               "call rank again with the same checkpoint_dir and resume=True"),
    "same_data": ("the same --data and options", "the same images, in the same order, and "
                  "options"),
    "fix_preprocessing": ("--mean/--std (one value per image channel) and --resize/--crop",
                          "the transform's normalisation (one mean and std per image "
                          "channel) and its resize/crop"),
    "same_size": ("--resize N --crop N", "a transform with Resize and CenterCrop"),
    "ablate_from_python": ("run the ablation from Python, with the model in hand (user "
                           "guide, 'Is the ranking faithful?')",
                           "call pcace.ablate(...) with the model"),
    "relabel": ("name the class folders after the model's classes (or give the model's class "
                "names with --categories)",
                "relabel the images first: pcace.data.relabel(images, {indices}, categories)"),
    "labelled_images": ("a folder with one subfolder of images per class",
                        "(images, labels), a Dataset of (image, label) pairs or a DataLoader "
                        "of them"),
    "basis_check": ("run.json's routes -> LAYER -> check",
                    "result.manifest['routes'][layer]['check']"),
    "other_out": ("choose another --out", "choose another directory"),
    "save_again": ("run the command again with --force",
                   "rank again and save the result there (result.save(run_dir))"),
    "resume_lost": ("rerun the same command with --resume",
                    "with a checkpoint_dir, call rank again with resume=True to continue"),
    "collect_assets": ("they are collected at rank time (pcace rank ... --report)",
                       "collect them with pcace.viz.collect_assets(run_dir, model, images, "
                       "result)"),
    "draw_layers": ("`pcace report {run_dir} --layers ...` draws chosen layers in full",
                    "write_report(run_dir, layers=[...]) draws chosen layers in full"),
}


@contextmanager
def speaking_cli() -> Iterator[None]:
    """Within this block, messages use the command line's words.

    Examples
    --------
    >>> with speaking_cli():
    ...     is_cli()
    True
    """
    token = _CLI.set(True)
    try:
        yield
    finally:
        _CLI.reset(token)


def is_cli() -> bool:
    """Whether the running code speaks to a command-line user.

    Examples
    --------
    >>> is_cli()
    False
    """
    return _CLI.get()


def option(name: str, value: Any = True, *, python: str | None = None) -> str:
    """A setting as the caller writes it: ``--name VALUE`` or ``name=VALUE``.

    Parameters
    ----------
    name : str
        The Python parameter's name (``random_weights``).
    value : Any
        Its value; ``True`` for a switch, or a placeholder such as ``"FILE"``.
    python : str, optional
        The value as Python writes it, where that differs (``"'local'"`` for ``local``).

    Returns
    -------
    str

    Examples
    --------
    >>> option("checkpoint", "FILE")
    'checkpoint=FILE'
    >>> option("engine", "local", python="'local'")
    "engine='local'"
    """
    if is_cli():
        flag = "--" + _FLAGS.get(name, name.replace("_", "-"))
        return flag if value is True else f"{flag} {value}"
    return f"{name}={python if python is not None else value}"


def action(key: str, **fill: Any) -> str:
    """A step from :data:`ACTIONS`, in the caller's words.

    Parameters
    ----------
    key : str
        One of :data:`ACTIONS`.
    **fill
        Values for the fields in braces (``run_dir``, ``model``); a missing one reads as
        its name in capitals (``MODEL``).

    Returns
    -------
    str

    Examples
    --------
    >>> action("write_report", run_dir="runs/a")
    "pcace.viz.write_report('runs/a')"
    >>> with speaking_cli():
    ...     action("list_layers")
    '`pcace layers --model MODEL`'
    """
    text = ACTIONS[key][0 if is_cli() else 1]

    class _Fill(dict):
        def __missing__(self, field: str) -> str:
            return field.upper()

    values = _Fill({k: str(v) for k, v in fill.items()})
    if "{run_dir!r}" in text and "run_dir" not in fill:
        text = text.replace("{run_dir!r}", "run_dir")
    return text.format_map(values)
