"""The options of a run, declared once: default, type, documentation and check.

:func:`pcace.rank` keeps its keyword arguments as the public face; it hands them to
:class:`RankOptions`, a frozen dataclass whose fields declare each option's default, its
documented type and text, and the check that validates and normalises it (as
scikit-learn's parameter constraints do). The checks run when the options are made, so a
bad option fails before any work, with a message that names it; rank's docstring is built
from the same declarations (:func:`options_doc`), so the two cannot drift apart.

Examples
--------
>>> opts = RankOptions(components=0.9, permutations=0)
>>> opts.components, opts.statistics["permutations"]
(0.9, 0)
>>> RankOptions(batch_size=0)
Traceback (most recent call last):
...
ValueError: batch_size must be an int >= 1; got 0
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ..core.validation import components as check_components
from ..core.validation import fraction, integer, score_kind
from ..core.voice import option as spoken
from ..engines.engine import ENGINES, Engine
from ..reduce.plan import BASES, MemoryPlan
from ..stats.bootstrap import interval_scheme
from ..stats.nulls import NULL_METHODS

__all__ = ["RankOptions", "option", "options_doc"]


def option(default: Any, kind: str, doc: str, check: Callable[[Any], Any] | None = None
           ) -> Any:
    """Declare one option: its default, documented type, text and check."""
    return field(default=default, metadata={"kind": kind, "doc": " ".join(doc.split()),
                                            "check": check})


def _positive(name: str) -> Callable[[Any], int]:
    return lambda value: integer(value, name, minimum=1)


def _count(name: str) -> Callable[[Any], int]:
    return lambda value: integer(value, name, minimum=0)


def _flag(name: str) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False; got {value!r}")
        return value
    return check


def _components(value: Any) -> int | float:
    check_components(value)
    return value


def _layer_names(value: Any) -> list[str] | None:
    if value is None:
        return None
    names = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"layers must be module names (str); got {value!r}")
    return names


def _device(value: Any) -> str | torch.device:
    if not isinstance(value, str | torch.device):
        raise TypeError(f"device must be 'auto', a device name or a torch.device; got "
                        f"{value!r}")
    return value


def _sample_size(value: Any) -> int | str:
    if isinstance(value, str) and value == "auto":
        return value
    return integer(value, "sample_size", minimum=2)


def _basis(value: Any) -> str:
    if value not in BASES:
        raise ValueError(f"basis must be one of {BASES}; got {value!r}")
    return value


def _null(value: Any) -> str:
    if value not in NULL_METHODS:
        raise ValueError(f"null must be one of {NULL_METHODS}; got {value!r}")
    return value


def _memory_budget(value: Any) -> int | str:
    MemoryPlan.from_budget(value)  # refuses anything but "auto" or a byte count
    return value


def _device_memory_budget(value: Any) -> int | str:
    if isinstance(value, str) and value == "auto":
        return value
    return integer(value, "device_memory_budget", minimum=0)


def _pca_dtype(value: Any) -> torch.dtype:
    if value not in (torch.float32, torch.float64):
        raise ValueError(f"pca_dtype must be torch.float32 or torch.float64; got {value!r}")
    return value


def _score(value: Any) -> str:
    return score_kind(value)


def _level(value: Any) -> float:
    return fraction(value, "level")


def _interval(value: Any) -> str:
    interval_scheme(value)
    return value


def _seed(value: Any) -> int:
    return integer(value, "seed", None)


def _ace_options(value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"ace_options must be a dict of pcace.ace keyword arguments; got "
                        f"{type(value).__name__}")
    return dict(value)


def _callback(value: Any) -> Callable[[], None] | None:
    if value is not None and not callable(value):
        raise TypeError(f"on_step must be callable or None; got {type(value).__name__}")
    return value


def _engine(value: Any) -> str | Engine:
    if isinstance(value, Engine) or (isinstance(value, str) and value in ENGINES):
        return value
    raise ValueError(f"engine must be one of {ENGINES} or a pcace.engines.engine.Engine; got "
                     f"{value!r}")


@dataclass(frozen=True)
class RankOptions:
    """Every option of :func:`pcace.rank` but the model and the images, checked.

    Each field's metadata holds its documented type (``kind``), text (``doc``) and check;
    the checks run on construction and may normalise a value (``ace_options`` None
    becomes ``{}``).
    """

    target: Any = option(
        None, "int, str, callable, list of those, or \"all\"",
        """An int ``c``: the score of class ``c`` before the softmax (the paper's choice);
        a string (``"prob:3"``, ``"output:0"``, ``"output"`` or a class name resolved
        through ``categories``); or a callable mapping the model's output batch to an
        (N,) score, such as :class:`pcace.inputs.targets.RegressionOutput`. A list of
        targets, or ``"all"`` (every class output's logit), ranks against each of them
        from one forward pass and one PCA per channel: ``channels`` then holds one row
        per (channel, target), ranks and statistics are per target, and ``layers`` has
        one row per (layer, target). None: a regression network's single output; with
        ``per_label``, each label's own class logit.""")
    layers: Sequence[str] | None = option(
        None, "sequence of str, optional",
        """Qualified module names (``"layer3.1.conv2"``); None ranks every ``nn.Conv2d``.
        Any module with a (N, C, H, W) output may be named.""", check=_layer_names)
    components: int | float = option(
        3, "int or float",
        """k principal components per channel, or a fraction in (0, 1): the smallest k
        whose components explain that share of the channel's variance.""", check=_components)
    basis: str = option(
        "sample", "{\"sample\", \"exact\"}",
        """How each channel's principal axes are found. ``"sample"`` (default): where there are
        more images than ``sample_size``, from a sample of them (a random one where the images
        can be indexed, else the first ones; the manifest says which), refined over all images
        in the one forward pass (Rayleigh-Ritz on ``k + 5`` sample axes), with a self-check per
        channel in the manifest (``routes[layer]["check"]``) and a warning where it is poor; with
        fewer images it is exact. ``"exact"``: the exact PCA of every image's maps on every route
        (kept in memory, pixel moments over two passes, subspace iteration). Accuracy and cost
        of each: ``benchmarks/README.md`` ("Sampled basis").""",
        check=_basis)
    sample_size: int | str = option(
        "auto", "int or \"auto\"",
        """``m``, the images the sampled basis takes its axes from (``basis="sample"``).
        ``"auto"`` (default): ``min(N, max(2000, N // 10))``, at most as many as the memory
        plan's store holds of the layers' maps in float16 (about 2,000 for the shared
        ResNet-20 in 1 GiB).""",
        check=_sample_size)
    batch_size: int = option(
        64, "int",
        """Images per forward pass (when ``images`` is not already a DataLoader).""",
        check=_positive('batch_size'))
    device: str | torch.device = option(
        "auto", "str or torch.device",
        """``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ...""", check=_device)
    memory_budget: int | str = option(
        "auto", "int or \"auto\"",
        """Bytes of RAM for activations and the work on them, shared by one
        :class:`pcace.reduce.plan.MemoryPlan`: three quarters hold captured activations,
        channel-major (layers beyond that are spilled to disk and read back in blocks),
        one quarter the reduce step's and the statistics' working memory. The forward
        pass's own memory comes on top. ``"auto"`` (default): 1 GiB
        (:data:`pcace.reduce.plan.PREFERRED_BUDGET`) when every layer runs in it, kept
        in memory or streamed in two passes (so memory stays flat in N), else a quarter
        of the machine's memory (:func:`pcace.reduce.plan.default_memory_budget`),
        rather than spill maps to disk or take extra forward passes; the bytes used and
        why are recorded in the manifest (``memory_budget``, ``memory_budget_reason``).
        A number is kept as given.""", check=_memory_budget)
    device_memory_budget: int | str = option(
        "auto", "int or \"auto\"",
        """On a GPU: bytes of activations kept in the GPU's memory, where their reduce step
        then runs without a transfer; the layers beyond it go to RAM under
        ``memory_budget``. ``"auto"`` (default): half of the GPU's free memory; 0 keeps
        them all in RAM. Ignored on the CPU.""", check=_device_memory_budget)
    pca_dtype: torch.dtype = option(
        torch.float32, "torch.dtype",
        """Precision of the passes over the activations (standardisation, Gram matrices);
        the eigenproblems and ACE always run in float64. ``torch.float32`` (default)
        works on the captured activations in place; ``torch.float64`` copies each block
        first (slower, exact to ~1e-12). Their measured agreement is in
        ``benchmarks/README.md`` ("Pipeline": float32 against float64).""", check=_pca_dtype)
    score: str = option(
        "maximal", "{\"maximal\", \"first-component\"}",
        """``"maximal"``: the maximal correlation over all k components (PCACE). The other
        reproduces the published scripts' ``|corr(phi_1, theta)|``, for comparison only.""",
        check=_score)
    label: Any = option(
        None, "int, optional",
        """Keep only the images of this label (the paper ranks over the images of one
        class).""")
    per_label: bool = option(
        False, "bool",
        """Rank each label's images separately, from one forward pass over labelled images
        of many classes: each label's rows of every channel get their own
        standardisation, PCA and ACE, exactly as if that label's images had been ranked
        alone. Without a ``target`` each label is scored on its own class logit (labels
        must be class indices); with targets, every label against every target.
        ``channels`` and ``layers`` gain a ``label`` column: an atlas of every class,
        layer and channel (:func:`pcace.viz.class_atlas`).""", check=_flag('per_label'))
    categories: Sequence[str] | None = option(
        None, "sequence of str, optional",
        """Class names, to resolve a class-name ``target``.""")
    permutations: int = option(
        100, "int, default 100",
        """> 0 computes a permutation null for every channel (0 opts out): each channel's value
        against its values on permutations of the score (only ACE re-runs), which adds
        ``null_mean``, ``null_q95``, ``p_value``, ``q_value`` (Benjamini-Hochberg within each
        layer), ``significant`` (``q <= 0.05``) and ``pcace_adj`` (a null-corrected value
        comparable across layers and runs; :mod:`pcace.stats.null`); the layer table gains the
        share of significant channels and the median ``pcace_adj``. With ``null="exact"`` it
        is B, the permutations per channel (a p-value is then at least ``1 / (B + 1)``; use
        1000 for claims about single channels); with ``null="shared"`` or ``"pooled"`` the
        null's size is set by the layers' channels (below).""",
        check=_count("permutations"))
    null: str = option(
        "shared", "{\"shared\", \"pooled\", \"exact\"}",
        """Which permutation null. ``"shared"`` (default): one null for the channels of every
        layer, each compared with a pool of at least ``max(1000, 20 C)`` values (``C`` the
        largest layer's channels) drawn evenly from the channels of all layers with the same
        number of components and a similar share of ties: about ``20 C`` ACE runs for the
        whole network (ResNet-18: 10,240 instead of 480,000 for 100 permutations per
        channel). ``"pooled"``: the same within each layer (``max(20, ceil(1000 / C))``
        permutations per channel, ``max(1000, 20 C)`` per layer). Both are calibrated on
        independent data and agree with a 1,000-permutation exact null on most discoveries
        (limits: ``benchmarks/README.md``, "Cheap null"). ``"exact"``: ``permutations`` of the
        score per channel, each channel against its own null (for claims about single
        channels).""",
        check=_null)
    split_half: int = option(
        10, "int, default 10",
        """S > 0: how reproducible each layer's ranking is. The channels are scored on S
        random splits of the images into two halves and the halves' rankings compared
        (Spearman, projected to N images, with an interval, and the top-10 overlap;
        :func:`pcace.stats.evidence.split_half`). With the null it gives each layer an
        ``evidence`` verdict (``"strong"``, ``"weak"``, ``"none"``) and a sentence
        (:func:`pcace.stats.evidence.layer_evidence`). 0 opts out; skipped below 20
        images.""", check=_count('split_half'))
    bootstrap: int = option(
        0, "int",
        """B > 0 resamples the images B times (half-samples without replacement by default,
        see ``interval``), recomputes PCA and ACE per channel and adds ``ci_low``,
        ``ci_high`` (an interval for the channel's maximal correlation), ``rank_low``,
        ``rank_high``; the layer table gains the ranking's stability.""", check=_count('bootstrap'))
    level: float = option(
        0.95, "float",
        """Confidence level of the bootstrap intervals.""", check=_level)
    interval: str = option(
        "half-sample", "{\"half-sample\", \"basic\", \"percentile\"}",
        """Bootstrap interval method; it also picks the resampling
        (:func:`pcace.stats.interval_scheme`). ``"half-sample"``: half-samples of the
        images without replacement and a bias-corrected interval (it can lie below the
        biased raw value). ``"basic"`` and ``"percentile"``: the classical with-
        replacement bootstrap, which under-covers because ACE overfits more on repeated
        images. Coverage measured in ``benchmarks/README.md``, "Statistics"; see
        :func:`pcace.stats.bootstrap_summary`.""", check=_interval)
    seed: int = option(
        0, "int",
        """Seed of the permutations and resamples; recorded in the manifest.""", check=_seed)
    progress: bool = option(
        True, "bool",
        """Show progress bars on stderr.""", check=_flag('progress'))
    spill_dir: str | Path | None = option(
        None, "path, optional",
        """Where spilled activations go (a temporary directory by default).""")
    ace_options: dict | None = option(
        None, "dict, optional",
        """Extra keyword arguments for :func:`pcace.ace` (``delrsq``, ``max_iter``, ...).""",
        check=_ace_options)
    tune_malloc: bool | None = option(
        None, "bool, optional",
        """Keep freed memory in glibc's heap during the forward pass (faster on Linux, but
        a process-wide setting; see :mod:`pcace.core.malloc`). Off unless True or
        ``PCACE_TUNE_MALLOC=1``; the ``pcace`` command turns it on.""")
    checkpoint_dir: str | Path | None = option(
        None, "path, optional",
        """A run directory (see :func:`pcace.results.rundir.prepare_run_dir`): each
        finished layer (values, null, bootstrap, components) is saved there as the run
        goes, so that an interrupted run can be resumed.""")
    resume: bool = option(
        False, "bool",
        """With ``checkpoint_dir``: take the layers an earlier, interrupted run with the
        same settings finished from their checkpoints and score only the rest. The
        result equals an uninterrupted run's. Checkpoints of other settings are refused.""",
        check=_flag('resume'))
    on_step: Callable[[], None] | None = option(
        None, "callable, optional",
        """Called between batches of the forward pass and between blocks of channels; it
        may raise to stop the run (the ``pcace`` command passes
        :meth:`pcace.core.interrupts.deferred_signals.check`). A ``KeyboardInterrupt``
        (or :class:`pcace.core.interrupts.Interrupted`) while channels are scored
        returns the layers finished so far, with ``result.complete`` False; during the
        forward pass it propagates (nothing is finished yet).""", check=_callback)
    engine: str | Engine = option(
        "local", "{\"local\", \"ray\"} or pcace.engines.engine.Engine",
        """Where the ACE problems (observed values, null, split-half, bootstrap) run:
        ``"local"`` (default) in this process; ``"ray"`` as tasks on a Ray cluster
        (``pip install "pcace[ray]"``; :mod:`pcace.engines.ray`). The same inputs and
        seed give the same results on either. A cluster that goes away ends the run like
        an interruption (finished layers kept, ``result.complete`` False). An engine
        object is used as given and left open.""", check=_engine)
    ray_address: str | None = option(
        None, "str, optional",
        """With ``engine="ray"``: ``"auto"`` joins the cluster running on this machine,
        ``"HOST:PORT"`` (or ``"ray://HOST:PORT"``) another; None starts a local cluster
        for the run.""")
    def __post_init__(self) -> None:
        for f in fields(self):
            check = f.metadata.get("check")
            if check is not None:
                object.__setattr__(self, f.name, check(getattr(self, f.name)))
        if self.per_label and self.label is not None:
            raise ValueError(f"{spoken('per_label')} ranks every label's images; do not "
                             f"also give {spoken('label', 'LABEL', python='...')} (that keeps "
                             "one label's images)")
        if self.bootstrap == 1 and self.interval == "half-sample":
            raise ValueError(f"{spoken('interval', 'half-sample', python=repr('half-sample'))} "
                             f"needs at least 2 replicates ({spoken('bootstrap', 2)} or more)")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError(f"{spoken('resume')} needs "
                             f"{spoken('checkpoint_dir', 'DIR', python='...')} (the "
                             "interrupted run's directory)")

    @property
    def statistics(self) -> dict[str, Any]:
        """What the run computes beyond the raw values (recorded with its checkpoints)."""
        return {"permutations": self.permutations, "null": self.null,
                "bootstrap": self.bootstrap, "level": self.level, "seed": self.seed,
                "interval": self.interval}

    def replace(self, **changes: Any) -> RankOptions:
        """A copy with some options changed (checked again)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return RankOptions(**values)


def options_doc(first: Sequence[tuple[str, str, str]] = ()) -> str:
    """The numpydoc ``Parameters`` entries of ``first`` (name, type, text) and of every
    option, in declaration order, indented for a function's docstring."""
    entries = list(first) + [(f.name, f.metadata["kind"], f.metadata["doc"])
                             for f in fields(RankOptions)]
    out = []
    for name, kind, doc in entries:
        out.append(f"{name} : {kind}")
        out.append(textwrap.fill(doc, 88, initial_indent="    ", subsequent_indent="    "))
    return textwrap.indent("\n".join(out), "    ")
