"""The self-check of the sampled-basis reduce (:mod:`pcace.reduce.sampled`).

:meth:`pcace.reduce.sampled_pass.SampledPass.finish` fills a :class:`SampleCheck` per
layer; :meth:`SampleCheck.summary` is what a run's manifest records, and
:meth:`SampleCheck.message` the one-line warning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["CHECK_THRESHOLD", "SampleCheck", "SampledBasisWarning"]

#: The self-check marks a channel as poor when its ``k`` components capture, on the images
#: outside the sample (estimated), less than this share of what the sample's own top ``k``
#: claimed. Measured (``benchmarks/README.md``, "Sampled basis: accuracy"): on ResNet-20
#: with m = 2,000 it marks 15 of 688 channels at N = 5,000 (2%), among them every channel
#: more than 0.0075 from the exact route; at N = 50,000 all three channels more than 0.01
#: away; on noise images, where the sampled components are unrelated to the exact ones,
#: every channel.
CHECK_THRESHOLD = 0.9


class SampledBasisWarning(UserWarning):
    """The sampled basis captures clearly less over all images than the sample promised."""


@dataclass
class SampleCheck:
    """The sampled basis's self-check for one layer's channels.

    Attributes
    ----------
    sample_size : int
        ``m``, images the axes came from.
    width : int
        ``l``, sample axes every image was projected on.
    threshold : float
        ``ratio`` below it marks a channel as poor.
    explained : torch.Tensor
        ``(C,)``: share of the standardised variance over all ``N`` images that the kept
        components capture (the reduction's ``explained_variance``).
    sample_explained : torch.Tensor
        ``(C,)``: the share the sample's own top components (as many) claimed of the
        sample's variance.
    ratio : torch.Tensor
        ``(C,)``: the estimated share the components capture over the images outside the
        sample, relative to the sample's claim: with ``r = explained / sample_explained``
        (:attr:`ratio_all`), ``(N r - m') / (N - m')`` with ``m' = min(m, N / 2)``: the
        sample's images are taken to be among the ``N``, and the components to capture on
        them what the sample claimed (its own top ``k`` capture exactly that; the Ritz
        components, tuned to all ``N``, a little less). ``m'`` is capped at half the
        images so that the estimate never magnifies the deviations of ``r`` more than
        twice (with 1% of the images held out it would 100 times). 1 where neither has
        anything, 0 where only the whole set has.
    subspace_explained : torch.Tensor
        ``(C,)``: share over all ``N`` held by the whole ``l``-dimensional subspace.
    unseen : torch.Tensor
        ``(C,)`` long: pixels constant in the sample that vary over all ``N`` (no
        component can use them).
    poor : torch.Tensor
        ``(C,)`` bool: ``ratio < threshold``, or the channel is constant over the sample
        but not over all images. Never set for a dead channel.
    angle : torch.Tensor
        ``(C,)`` float64: the estimated largest angle (radians) between the kept
        components and the exact ones over all ``N`` (Ritz residual over the gap to the
        next Ritz value; 0 without components, inf without a gap).
    ratio_all : torch.Tensor
        ``(C,)``: ``explained / sample_explained``, over all ``N`` images.
    """

    sample_size: int
    width: int
    threshold: float
    explained: torch.Tensor
    sample_explained: torch.Tensor
    ratio: torch.Tensor
    subspace_explained: torch.Tensor
    unseen: torch.Tensor
    poor: torch.Tensor
    angle: torch.Tensor | None = None
    ratio_all: torch.Tensor | None = None

    def summary(self) -> dict[str, Any]:
        """A JSON-ready record for the run's manifest.

        Examples
        --------
        >>> import torch
        >>> one = torch.ones(2, dtype=torch.float64)
        >>> check = SampleCheck(500, 8, 0.9, 0.5 * one, 0.5 * one, one, 0.7 * one,
        ...                     torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=bool))
        >>> check.summary()["ratio_min"], check.summary()["poor_channels"]
        (1.0, [])
        """
        ratio = self.ratio.double().cpu()
        out = {"m": self.sample_size, "l": self.width, "threshold": self.threshold,
               "ratio_min": float(ratio.min()) if ratio.numel() else None,
               "ratio_median": float(ratio.median()) if ratio.numel() else None,
               "poor_channels": self.poor.nonzero().flatten().tolist(),
               "unseen_pixels": int(self.unseen.sum())}
        if self.angle is not None and self.angle.numel():
            angle = self.angle.double().cpu()
            finite = angle[torch.isfinite(angle)]
            out["angle_median"] = float(finite.median()) if finite.numel() else None
            out["angle_max"] = float(finite.max()) if finite.numel() else None
            out["angle_no_gap"] = int((~torch.isfinite(angle)).sum())
        return out

    def message(self, layer: str | None = None) -> str | None:
        """One line naming the poor channels, or None when there are none."""
        poor = self.poor.nonzero().flatten().tolist()
        if not poor:
            return None
        where = f"layer {layer}: " if layer else ""
        worst = float(self.ratio[self.poor].min())
        more = f" (and {len(poor) - 20} more)" if len(poor) > 20 else ""
        return (f"{where}the sampled basis (m = {self.sample_size}, l = {self.width}) is "
                f"poor for channel(s) {poor[:20]}{more}: on the images outside the sample "
                f"its components capture less than {self.threshold:.0%} of the variance the "
                f"sample claimed (estimated; worst {worst:.2f}); use a larger sample or "
                "basis='exact' for them")
