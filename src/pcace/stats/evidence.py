"""How much evidence a layer's PCACE ranking carries: split-half reproducibility and a verdict.

A PCACE ranking of a few hundred images can look tidy and still not survive a second
draw of images: ACE overfits (see :mod:`pcace.stats`), and in early layers the
channels' true differences are small compared with the sampling noise. Two checks
answer "can I trust this ranking?", and this module turns them into a per-layer
verdict:

- **Does any channel beat chance?** The permutation null of :mod:`pcace.stats`
  gives each channel a BH ``q_value``; :func:`significant` marks the channels with
  ``q <= alpha``.
- **Is the order reproducible?** :func:`split_half` ranks a layer's channels on two
  disjoint random halves of the images, several times, and reports how well the
  halves agree (Spearman correlation of their values, overlap of their top sets), with
  an interval from a bootstrap over channels. :func:`split_half_table` does that for
  every layer of a run.
- :func:`layer_evidence` combines both into one row per layer with a verdict
  (``"strong"``, ``"weak"``, ``"none"``) and one plain sentence.

Everything takes plain arrays (the ``(C, N, k)`` principal components that
:func:`pcace.rank` keeps in ``PCACEResult.components``, the ``(N,)`` scores) and
returns plain numbers and DataFrames; nothing here touches a model.

Half-samples reuse the full-sample principal components
--------------------------------------------------------
The principal components of a channel do not depend on the score, so the halves
reuse the full-sample components and only ACE re-runs (``2 * splits * C`` ACE
problems on ``N/2`` images, about ``splits`` permutations' worth of work). This is
not only cheaper, it is also the better estimate. On the shared CIFAR ResNet-20 (cat
logit, cat images, k = 3; ``benchmarks/bench_evidence.py``, part ``validate``) halves
that recompute their own PCA agree less than halves that reuse the full-sample one
(by 0.00, 0.05 and 0.06 on average over the 19 layers at N = 200, 600 and 2,400):
their components come from N/2 images and are noisier than the user's, which come
from N. The projection below of the reused-components agreement matched the
directly measured agreement of two disjoint samples of N images, each with its
own PCA.

Agreement at N, not at N/2
--------------------------
Two halves of ``N/2`` images agree less than two independent samples of ``N`` images
would. The reported ``spearman`` is the split-half correlation ``r`` projected to the
full sample with the Spearman-Brown formula ``2 r / (1 + r)`` (for ``r > 0``; a
non-positive ``r`` is reported as it is): the agreement expected between the user's
ranking and one from another ``N`` images. On the shared ResNet-20 the projection
matched the directly measured agreement of disjoint samples of ``N`` images of the
shared ResNet-20 (mean over 19 layers of projected minus measured: -0.01 at N = 200,
0.00 at N = 600, 0.00 at N = 2,400; median absolute difference per layer 0.05-0.06,
about the noise of the measurement itself), where the unprojected halves fell short
by 0.07-0.11. ``spearman_half`` keeps the unprojected value.

On the same data the split-half check of the 200 test cats reads "not reproducible"
in 18 of 19 layers (projected agreement -0.12 to 0.39). The exception, the last
layer, reads "reproducible" (0.82, 90% interval 0.75-0.87); the implied correlation
of that ranking with a ranking of many images, ``sqrt(0.82 * 0.99) = 0.91`` (0.99:
the same check on 4,800 training cats), is close to the measured 0.88 against the
ranking of 4,800 training cats.

Examples
--------
>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> y = rng.normal(size=400)                              # the score of 400 images
>>> z = rng.normal(size=(12, 400, 3))                     # 12 channels, k = 3
>>> z[:, :, 0] += y / np.geomspace(0.2, 3, 12)[:, None]   # channel 0 strongest, 11 weakest
>>> s = split_half(z, y, splits=4, seed=1)
>>> s["spearman"] > 0.8, s["reading"]
(True, 'reproducible')

The split-half interval
-----------------------
Why a bootstrap over channels: a layer's Spearman correlation is computed
from its ``C`` channels, and with 16 or 32 channels (ResNet-20's early
stages) that alone makes it uncertain; resampling channels (the pairs
bootstrap of a correlation) captures that, and the half-sample noise in
each channel's pair of values with it. The spread over splits
(``spearman_half_sd``) only says how much the answer depends on the split
drawn, which averaging over ``splits`` removes; it is not an interval. That spread
is what ``width`` watches: more splits narrow the average's Monte Carlo interval,
never the interval over channels.

On the shared ResNet-20 (19 layers, disjoint sets of N training cats) the
nominal 90% interval held the directly measured agreement of two N-sets
(averaged over 1-5 pairs) in 78%, 80% and 84% of layers x sets at
N = 200, 600 and 2,400; the reference is itself noisy (one pair's Spearman
varies by about 0.2 in 16-channel layers), so the shortfall is partly the
reference's, but it is why the default level is 0.95.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from ..core.validation import fraction, integer
from ..engines.engine import Engine
from .common import DEFAULT_ALPHA, significant
from .halves import (
    _agreement,
    _checked_components,
    _checked_scores,
    _draw_halves,
    _HalfRunner,
    _live_channels,
    _splits_needed,
    spearman_brown,
)

__all__ = [
    "EVIDENCE",
    "layer_evidence",
    "significant",
    "spearman_brown",
    "split_half",
    "split_half_table",
]

#: The verdicts of :func:`layer_evidence`, strongest first.
EVIDENCE = ("strong", "weak", "none")

#: Projected split-half Spearman (agreement of two samples of N images) at and above
#: which a ranking counts as reproducible, when the interval's lower end is at least
#: :data:`REPRODUCIBLE_LOW` too.
REPRODUCIBLE = 0.8
REPRODUCIBLE_LOW = 0.5
#: Below this projected Spearman, or with an interval reaching down to 0, a ranking
#: counts as not reproducible.
NOT_REPRODUCIBLE = 0.5



# ------------------------------------------------------------------------- helpers

def _reading(spearman: float, low: float) -> str:
    if not math.isfinite(spearman):
        return "unknown"
    if spearman < NOT_REPRODUCIBLE or (math.isfinite(low) and low <= 0.0):
        return "not reproducible"
    if spearman >= REPRODUCIBLE and (not math.isfinite(low) or low >= REPRODUCIBLE_LOW):
        return "reproducible"
    return "partly reproducible"


# ------------------------------------------------------------------------ split half

def split_half(
    components: Any,
    scores: Any,
    splits: int = 10,
    seed: int = 0,
    *,
    top: int = 10,
    level: float = 0.95,
    resamples: int = 1000,
    chunk: int | None = None,
    ace_options: dict | None = None,
    engine: Engine | None = None,
    width: float | None = None,
    min_splits: int = 4,
    settled: bool = False,
) -> dict[str, Any]:
    """Split-half reproducibility of one layer's channel ranking.

    Each split draws a random half of the images (``N // 2``, without replacement;
    the other half is the rest, less one image when ``N`` is odd), computes every
    channel's PCACE value on each half from the given (full-sample) principal
    components, and compares the halves: Spearman correlation of the two value
    vectors, and the share of one half's top channels found in the other's.
    The agreement is averaged over ``splits`` splits.

    Parameters
    ----------
    components : numpy.ndarray or torch.Tensor
        ``(C, N, k)`` principal-component scores of the layer's channels
        (``PCACEResult.components[layer]``). A CUDA tensor runs ACE on its device.
        Dead channels (all zero) score 0 in both halves without running ACE.
    scores : array_like
        ``(N,)`` score per image. ``N >= 20`` (halves of at least 10 images).
    splits : int, default 10
        Random splits averaged over. Cost: ``2 * splits * C`` ACE problems on
        ``N/2`` images each, about as much as ``splits`` permutations of a null.
    seed : int, default 0
        Seed of the splits and of the channel bootstrap.
    top : int, default 10
        Size of the top set compared, capped at ``C // 2`` (with ``C <= 2 * top``
        a top-10 would hold most of the layer and agree by construction).
    level : float, default 0.95
        Nominal coverage of the interval for the Spearman correlation (see Notes).
    resamples : int, default 1000
        Bootstrap resamples of the channels for that interval.
    chunk : int, optional
        ACE problems per call (default: as many as fit in about 128 MB).
    ace_options : dict, optional
        Keyword arguments for :func:`pcace.ace` (use those of the ranking).
    engine : pcace.engines.engine.Engine, optional
        Where the ACE problems run (default: this process); the values do not depend on it.
    width : float, optional
        Run no more splits than needed: ``splits`` becomes the most that run, and after
        ``min_splits`` the check stops once the ``level`` interval of the projected
        agreement's average over splits (Student t over the splits' correlations) is
        narrower than ``width`` (0.05 is a good choice). From that interval's width it
        predicts how many splits are needed and runs them in one go. None (default) runs
        all ``splits``. The splits run are the first ones of the full run, so a check
        that runs them all returns exactly the full run's answer.
    min_splits : int, default 4
        Splits run before the first stopping decision (at least 2).
    settled : bool, default False
        With ``width``, also stop once the reading is settled: the upper end of that
        interval is below 0.5 (:data:`NOT_REPRODUCIBLE`), so no number of splits would
        read the ranking as reproducible. Such a layer's agreement is then known less
        precisely than ``width`` (its average over ``min_splits`` splits or more), which
        is what :func:`pcace.rank` accepts to spend no splits on a ranking that is plainly
        not reproducible.

    Returns
    -------
    dict
        ``"spearman"`` (the split-half Spearman projected to ``N`` images with
        :func:`spearman_brown`; NaN below 3 channels or with constant halves),
        ``"spearman_low"``/``"spearman_high"`` (its ``level`` interval under a bootstrap
        over channels; NaN below 5), ``"spearman_half"`` and ``"spearman_half_sd"`` (the
        unprojected Spearman's mean and spread over splits), ``"top_overlap"``,
        ``"top_size"``, ``"top_chance"``, ``"reading"`` (``"reproducible"``: ``spearman >=
        0.8`` and ``spearman_low >= 0.5``; ``"not reproducible"``: ``spearman < 0.5`` or
        ``spearman_low <= 0``; ``"partly reproducible"`` between; ``"unknown"``), ``"text"``,
        ``"n_images"``, ``"half_size"``, ``"splits"`` (run), ``"channels"``,
        ``"live_channels"``, ``"values_a"``/``"values_b"`` (``(splits, C)``). Why the
        interval is over channels: the module notes.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> z = rng.normal(size=(20, 200, 3))           # noise: no channel relates to y
    >>> s = split_half(z, rng.normal(size=200), splits=3)
    >>> s["reading"]
    'not reproducible'
    >>> y = rng.normal(size=200)
    >>> z[:, :, 0] += y / np.geomspace(0.3, 3, 20)[:, None]     # a clear ranking
    >>> split_half(z, y, splits=10, width=0.05)["splits"]      # 4 splits are enough
    4
    """
    s_count = integer(splits, "splits")
    top = integer(top, "top")
    resamples = integer(resamples, "resamples")
    lvl = fraction(level, "level")
    integer(seed, "seed", minimum=None)
    first = s_count if width is None else min(s_count, integer(min_splits, "min_splits", 2))
    if width is not None and not (isinstance(width, (int, float)) and width > 0):
        raise ValueError(f"width must be a positive number (or None: run every split); "
                         f"got {width!r}")
    z, on_gpu = _checked_components(components)
    c, n, k = (int(d) for d in z.shape)
    half = n // 2
    y = _checked_scores(scores, n)
    rng = np.random.default_rng(int(seed))
    halves = _draw_halves(y, half, s_count, rng)   # all drawn: the first s are the same
    live = _live_channels(z, on_gpu)
    run = _HalfRunner(z, y, halves, live, chunk, dict(ace_options or {}), engine, on_gpu)
    done = first
    values = run.values(0, done)
    while done < s_count:
        need = _splits_needed(values, width, lvl, c, done,
                              NOT_REPRODUCIBLE if settled else None)
        if need <= done:
            break
        values = np.concatenate([values, run.values(done, min(s_count, need))])
        done = values.shape[0]
    va, vb = values[:, 0], values[:, 1]
    out = _agreement(va, vb, top, lvl, resamples, rng)
    reading = _reading(out["spearman"], out["spearman_low"])
    return {**out, "reading": reading, "text": _reading_text(reading, n), "n_images": n,
            "half_size": half, "splits": done, "channels": c, "live_channels": int(live.size),
            "values_a": va, "values_b": vb}


def _reading_text(reading: str, n: int) -> str:
    if reading == "unknown":
        return f"the reproducibility of this layer's ranking cannot be measured at N = {n}"
    if reading == "partly reproducible":
        return f"rankings in this layer are partly reproducible at N = {n}"
    return f"rankings in this layer are {reading} at N = {n}"


def split_half_table(
    components: Mapping[str, Any],
    scores: Any,
    splits: int = 10,
    seed: int = 0,
    **options: Any,
) -> pd.DataFrame:
    """:func:`split_half` for every layer of a run, one row per layer.

    Parameters
    ----------
    components : mapping of str to array
        Layer name -> ``(C, N, k)`` components (``PCACEResult.components``).
    scores : array_like
        ``(N,)`` scores (``PCACEResult.scores``).
    splits, seed : int
        As for :func:`split_half`; every layer gets the same splits of the images.
    **options
        Further keyword arguments of :func:`split_half` (``top``, ``level``,
        ``resamples``, ``chunk``, ``ace_options``, ``engine``, ``width``,
        ``min_splits``, ``settled``).

    Returns
    -------
    pandas.DataFrame
        Columns ``layer``, ``split_half_spearman`` (projected to N),
        ``split_half_spearman_low``, ``split_half_spearman_high``,
        ``split_half_top10`` (top-set overlap), ``split_half_raw`` (two halves,
        unprojected), ``split_half_top_size``, ``split_half_top_chance``,
        ``split_half_reading``, ``split_half_splits`` (splits run), ``n_images``, in
        the mapping's order.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> comps = {"a": rng.normal(size=(6, 60, 2)), "b": rng.normal(size=(8, 60, 2))}
    >>> t = split_half_table(comps, rng.normal(size=60), splits=2)
    >>> list(t.layer), len(t.columns)
    (['a', 'b'], 11)
    """
    rows = []
    for name, z in components.items():
        s = split_half(z, scores, splits, seed, **options)
        rows.append({
            "layer": name,
            "split_half_spearman": s["spearman"],
            "split_half_spearman_low": s["spearman_low"],
            "split_half_spearman_high": s["spearman_high"],
            "split_half_top10": s["top_overlap"],
            "split_half_raw": s["spearman_half"],
            "split_half_top_size": s["top_size"],
            "split_half_top_chance": s["top_chance"],
            "split_half_reading": s["reading"],
            "split_half_splits": s["splits"],
            "n_images": s["n_images"],
        })
    return pd.DataFrame(rows, columns=[
        "layer", "split_half_spearman", "split_half_spearman_low", "split_half_spearman_high",
        "split_half_top10", "split_half_raw", "split_half_top_size", "split_half_top_chance",
        "split_half_reading", "split_half_splits", "n_images"])


# --------------------------------------------------------------------------- verdict

VERDICT_COLUMNS = ["layer", "channels", "significant_share", "median_adj",
                   "split_half_spearman", "split_half_spearman_low", "split_half_spearman_high",
                   "split_half_top10", "evidence", "evidence_text"]


def layer_evidence(
    channels: pd.DataFrame,
    split: pd.DataFrame | None = None,
    *,
    alpha: float = DEFAULT_ALPHA,
    n_images: int | None = None,
) -> pd.DataFrame:
    """A per-layer verdict: does the layer's ranking carry evidence?

    Parameters
    ----------
    channels : pandas.DataFrame
        One row per channel with ``layer`` (optional: all rows one layer when
        absent), and, when a permutation null was computed, ``q_value`` and
        ``pcace_adj`` (:func:`pcace.stats.null_summary`).
    split : pandas.DataFrame, optional
        :func:`split_half_table` for the same layers (keyed by ``layer``).
    alpha : float, default 0.05
        FDR level for ``significant_share``.
    n_images : int, optional
        N for the sentences; default the ``n_images`` of ``split``.

    Returns
    -------
    pandas.DataFrame
        One row per layer (in order of first appearance in ``channels``):
        ``layer``, ``channels``, ``significant_share`` (share with
        ``q <= alpha``), ``median_adj`` (median ``pcace_adj``),
        ``split_half_spearman``, ``split_half_spearman_low``,
        ``split_half_spearman_high``, ``split_half_top10``, ``evidence`` and
        ``evidence_text``. Missing inputs give NaN in their columns.

    Notes
    -----
    The rules, with ``share = significant_share`` and the reproducibility
    reading of :func:`split_half` (``reproducible``: projected Spearman
    ``>= 0.8`` with interval low end ``>= 0.5``; ``not reproducible``: below
    0.5 or interval reaching 0):

    - ``"strong"``: ``share >= 0.5`` and the ranking is reproducible. Both are
      needed: values that beat chance can still be ordered by noise, and a
      reproducible order of raw values can come from channel-specific bias
      (channels whose components let ACE overfit more) rather than signal.
    - ``"none"``: no channel beats chance (``share == 0``) and the ranking is
      not reproducible (or unmeasured); or, with one of the two checks missing,
      the other one says no.
    - ``"weak"``: everything else, including a single available check that
      says yes (one check cannot give ``"strong"``).

    Examples
    --------
    >>> import pandas as pd
    >>> ch = pd.DataFrame({"layer": ["a"] * 4 + ["b"] * 4,
    ...                    "q_value": [0.5, 0.6, 0.7, 0.9, 0.01, 0.01, 0.02, 0.3],
    ...                    "pcace_adj": [0.0, 0.1, -0.1, 0.0, 0.6, 0.5, 0.4, 0.1]})
    >>> sp = pd.DataFrame({"layer": ["a", "b"], "split_half_spearman": [0.1, 0.9],
    ...                    "split_half_spearman_low": [-0.4, 0.7],
    ...                    "split_half_spearman_high": [0.5, 0.97],
    ...                    "split_half_top10": [0.5, 1.0], "n_images": [300, 300]})
    >>> layer_evidence(ch, sp).evidence.tolist()
    ['none', 'strong']
    """
    if not isinstance(channels, pd.DataFrame):
        raise TypeError(f"channels must be a pandas DataFrame; got {type(channels).__name__}")
    a = fraction(alpha, "alpha")
    table = channels if "layer" in channels.columns else channels.assign(layer="")
    splits: dict[Any, dict] = {}
    if split is not None:
        if "layer" not in split.columns:
            raise ValueError("split must have a 'layer' column (see split_half_table)")
        splits = {row["layer"]: row for row in split.to_dict("records")}
    rows = []
    for name, sub in table.groupby("layer", sort=False):
        if "q_value" in sub.columns and sub.q_value.notna().any():
            share = float(significant(sub.q_value.to_numpy(), a).mean())
        else:
            share = math.nan
        adj = (float(sub.pcace_adj.median()) if "pcace_adj" in sub.columns
               and sub.pcace_adj.notna().any() else math.nan)
        sp = splits.get(name, {})
        rho = float(sp.get("split_half_spearman", math.nan))
        low = float(sp.get("split_half_spearman_low", math.nan))
        high = float(sp.get("split_half_spearman_high", math.nan))
        top = float(sp.get("split_half_top10", math.nan))
        n = n_images if n_images is not None else sp.get("n_images")
        evidence, text = verdict(share, rho, low, n, a, high)
        rows.append({"layer": name, "channels": int(len(sub)), "significant_share": share,
                     "median_adj": adj, "split_half_spearman": rho,
                     "split_half_spearman_low": low, "split_half_spearman_high": high,
                     "split_half_top10": top, "evidence": evidence, "evidence_text": text})
    return pd.DataFrame(rows, columns=VERDICT_COLUMNS)


def _split_words(reading: str, rho: float, low: float, high: float) -> str:
    """`` (split-half Spearman +0.87 [0.35, 0.99]; reproducible needs ...)``: the numbers
    and the threshold that decided ``reading``."""
    band = f" [{low:.2f}, {high:.2f}]" if math.isfinite(low) and math.isfinite(high) else ""
    rule = {"reproducible": f"reproducible: >= {REPRODUCIBLE:.2f} with the 95% interval's "
                            f"low end >= {REPRODUCIBLE_LOW:.2f}",
            "partly reproducible": f"reproducible needs >= {REPRODUCIBLE:.2f} with the 95% "
                                   f"interval's low end >= {REPRODUCIBLE_LOW:.2f}",
            "not reproducible": f"below {NOT_REPRODUCIBLE:.2f}, or an interval reaching 0, "
                                "is not reproducible"}[reading]
    return f" (split-half Spearman {rho:+.2f}{band}; {rule})"


def verdict(share: float, rho: float, low: float, n: Any, alpha: float = DEFAULT_ALPHA,
            high: float = math.nan) -> tuple[str, str]:
    """The evidence level of one layer and its sentence (the rules of :func:`layer_evidence`).

    ``share``: share of channels with ``q <= alpha`` (NaN: no null); ``rho``, ``low`` and
    ``high``: projected split-half Spearman and its interval (NaN: not measured); ``n``:
    the number of images. The sentence gives the numbers and the thresholds that decided.

    Examples
    --------
    >>> verdict(0.0, 0.1, -0.2, 300)[0]
    'none'
    >>> print(verdict(1.0, 0.87, 0.35, 300, high=0.99)[1])
    100% of the channels beat chance (q <= 0.05) and the ranking is partly reproducible at \
N = 300 (split-half Spearman +0.87 [0.35, 0.99]; reproducible needs >= 0.80 with the 95% \
interval's low end >= 0.50); strong needs a reproducible ranking
    """
    at = f" at N = {int(n)}" if n is not None and not pd.isna(n) else ""
    reading = _reading(rho, low)
    split = _split_words(reading, rho, low, high) if reading != "unknown" else ""
    chance = f"(q <= {alpha:g})"
    known_share = math.isfinite(share)
    if reading == "unknown" and not known_share:
        return "none", "neither a permutation null nor a split-half check was computed"
    if not known_share:
        if reading == "not reproducible":
            return "none", f"the ranking is not reproducible{at}{split}: use more images"
        return "weak", (f"the ranking is {reading}{at}{split}, but without a permutation "
                        "null it is not known whether any channel beats chance")
    pct = f"{share:.0%}"
    if reading == "unknown":
        if share == 0:
            return "none", f"no channel beats chance{at} {chance}: use more images"
        return "weak", (f"{pct} of the channels beat chance{at} {chance}; the ranking's "
                        "reproducibility was not measured, and strong needs it")
    if share == 0:
        if reading == "not reproducible":
            return "none", (f"no channel beats chance {chance} and the ranking is not "
                            f"reproducible{at}{split}: use more images")
        return "weak", (f"the ranking is {reading}{at}{split}, but no channel beats chance "
                        f"{chance}: more permutations or more images may tell")
    if reading == "reproducible" and share >= 0.5:
        return "strong", (f"{pct} of the channels beat chance {chance} and the ranking is "
                          f"reproducible{at}{split}; strong: at least half beat chance and "
                          "the ranking is reproducible")
    if reading == "not reproducible":
        return "weak", (f"{pct} of the channels beat chance {chance}, but their order is not "
                        f"reproducible{at}{split}: use more images to rank them")
    if reading == "reproducible":
        return "weak", (f"{pct} of the channels beat chance {chance}, fewer than the half "
                        f"that strong needs; the ranking is reproducible{at}{split}")
    return "weak", (f"{pct} of the channels beat chance {chance} and the ranking is partly "
                    f"reproducible{at}{split}; strong needs a reproducible ranking")
