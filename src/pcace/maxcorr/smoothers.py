"""Batched scatterplot smoothers used by ACE: Friedman's supersmoother and friends.

Every function here works on a batch of independent problems at once. The
abscissa of each problem is sorted once (:class:`SortedAxis`); the smoothers then
take ordinates already arranged in that order, shape ``(b, n)``, and return the
smoothed values in the same order.

The supersmoother follows Friedman (1984), "A variable span smoother", as it is
used inside R's ``acepack``: running-line fits over symmetric nearest-neighbour
windows of three spans (tweeter 0.05, midrange 0.2, woofer 0.5 of n), the
absolute leave-one-out residuals of each smoothed with the midrange span, the
best span chosen per point (with the bass enhancement ``alpha``), the chosen
spans smoothed, the fits interpolated between spans and smoothed once more with
the tweeter span. Observations with tied abscissae share one fitted value.

Window sums are computed with prefix sums over globally centred values, so one
smooth costs O(n) per problem whatever the span, and every problem of the batch
runs in the same tensor operations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

TWEETER, MIDRANGE, WOOFER = 0.05, 0.2, 0.5
SPANS = (TWEETER, MIDRANGE, WOOFER)
_EPS = 1e-3  # stabilises running-line slopes in nearly constant windows
_SML = 1e-4  # floor of the residual ratio in the bass enhancement
_BIG = 1e20
# 1 - leverage below this counts as 0 (a point alone at the end of its window beside tied
# values): its leave-one-out residual is 0/0, which we take as _BIG (that span cannot
# judge the point). acepack divides by ~0 there, with a result that depends on rounding.
_LEVERAGE_FLOOR = 1e-6

KINDS = ("ordered", "monotone", "linear", "categorical")


def half_window(span: float, n: int) -> int:
    """Half width of acepack's running-line window for ``span`` of ``n`` points.

    Examples
    --------
    >>> half_window(0.05, 300)
    8
    """
    return max(2, int(0.5 * span * n + 0.5))


def _prefix(values: torch.Tensor) -> torch.Tensor:
    """Running sums along the last axis (length n + 1), zero at the middle position.

    Window sums are differences of these; accumulated outwards from the middle (the
    median, on a sorted axis) they never carry an outlier from the far side, so they
    keep their digits when a variable spans many orders of magnitude.
    """
    n = values.shape[-1]
    mid = n // 2
    out = torch.zeros(values.shape[:-1] + (n + 1,), dtype=values.dtype, device=values.device)
    torch.cumsum(values[..., mid:], dim=-1, out=out[..., mid + 1:])
    if mid:
        below = torch.cumsum(values[..., :mid].flip(-1), dim=-1).flip(-1)
        out[..., :mid] = -below
    return out


@dataclass
class _Windows:
    """Window geometry and abscissa statistics of one span."""

    width: int  # points per window
    left: int  # leading points that share the first window
    right: int  # trailing points that share the last window
    x_mean: torch.Tensor | None  # (b, n) mean of centred x over each point's window
    inv_ss: torch.Tensor | None  # (b, n) 1 / sum of squared deviations; 0 where too flat
    cv_scale: torch.Tensor | None  # (b, n) 1 / (1 - leverage), for leave-one-out residuals

    def window_sum(self, prefix: torch.Tensor) -> torch.Tensor:
        """Sum over each point's window, from prefix sums of shape ``(..., n + 1)``."""
        n = prefix.shape[-1] - 1
        sums = prefix[..., self.width:] - prefix[..., :n - self.width + 1]
        if self.left == 0 and self.right == 0:
            return sums
        shape = sums.shape[:-1]
        return torch.cat([sums[..., :1].expand(*shape, self.left), sums,
                          sums[..., -1:].expand(*shape, self.right)], dim=-1)

    def subset(self, idx: torch.Tensor) -> _Windows:
        return _Windows(self.width, self.left, self.right, self.x_mean[idx], self.inv_ss[idx],
                        self.cv_scale[idx])


class SortedAxis:
    """A batch of sorted abscissae with everything the smoothers reuse.

    Parameters
    ----------
    x_sorted : torch.Tensor
        Shape ``(b, n)``, each row sorted in increasing order.

    Examples
    --------
    >>> import torch
    >>> axis = SortedAxis(torch.linspace(0, 1, 20, dtype=torch.float64)[None])
    >>> axis.n
    20
    """

    def __init__(self, x_sorted: torch.Tensor):
        self.x = x_sorted
        self.b, self.n = x_sorted.shape
        self.xc = x_sorted - x_sorted[:, self.n // 2:self.n // 2 + 1]  # median: see _prefix
        self.constant = x_sorted[:, -1] <= x_sorted[:, 0]
        self.vsmlsq = (_EPS * self._quartile_scale()) ** 2
        self._windows: dict[float, _Windows] = {}
        self._ties = self._tie_groups()

    def _quartile_scale(self) -> torch.Tensor:
        # acepack's scale: x(3i) - x(i) with i = n/4 (1-based), widened until positive.
        n = self.n
        i = torch.full((self.b,), n // 4, dtype=torch.long, device=self.x.device)
        j = 3 * i
        scale = self.x.gather(1, (j - 1)[:, None])[:, 0] - self.x.gather(1, (i - 1)[:, None])[:, 0]
        for _ in range(n):
            bad = (scale <= 0) & ~self.constant
            if not bool(bad.any()):
                break
            j = torch.where(bad & (j < n), j + 1, j)
            i = torch.where(bad & (i > 1), i - 1, i)
            new = (self.x.gather(1, (j - 1)[:, None])[:, 0]
                   - self.x.gather(1, (i - 1)[:, None])[:, 0])
            scale = torch.where(bad, new, scale)
        return scale

    def _tie_groups(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        same = self.x[:, 1:] <= self.x[:, :-1]
        if not bool(same.any()):
            return None
        n = self.n
        idx = torch.arange(n, device=self.x.device).expand(self.b, n)
        new_group = torch.ones_like(idx, dtype=torch.bool)
        new_group[:, 1:] = ~same
        start = torch.where(new_group, idx, torch.zeros_like(idx)).cummax(dim=1).values
        end_marks = torch.ones_like(new_group)
        end_marks[:, :-1] = ~same
        # end (exclusive) = index of the next group start, found from the right
        rev = torch.where(end_marks, idx + 1, torch.full_like(idx, n + 1)).flip(1)
        end = rev.cummin(dim=1).values.flip(1)
        return start, end

    def windows(self, span: float) -> _Windows:
        """Window geometry and abscissa statistics for ``span`` (cached)."""
        if span not in self._windows:
            n = self.n
            ibw = half_window(span, n)
            width = min(2 * ibw + 1, n)
            left = min(ibw, n - 1)
            right = n - (n - width + 1) - left
            geometry = _Windows(width, left, right, None, None, None)
            sx = geometry.window_sum(_prefix(self.xc))
            sxx = geometry.window_sum(_prefix(self.xc * self.xc))
            x_mean = sx / width
            x_ss = (sxx - sx * x_mean).clamp(min=0)
            sloped = x_ss > self.vsmlsq[:, None]
            inv_ss = torch.where(sloped, 1.0 / torch.where(sloped, x_ss, 1.0), 0.0)
            dev = self.xc - x_mean
            one_minus_lev = 1.0 - (1.0 / width + dev * dev * inv_ss)
            ok = one_minus_lev > _LEVERAGE_FLOOR
            # isolated points (leverage ~1) get scale 0 here and a residual of _BIG below
            cv_scale = torch.where(ok, 1.0 / torch.where(ok, one_minus_lev, 1.0), 0.0)
            self._windows[span] = _Windows(width, left, right, x_mean, inv_ss, cv_scale)
        return self._windows[span]

    def subset(self, idx: torch.Tensor) -> SortedAxis:
        """The same axis restricted to the problems ``idx`` (caches carried over)."""
        out = SortedAxis.__new__(SortedAxis)
        out.x, out.xc = self.x[idx], self.xc[idx]
        out.b, out.n = out.x.shape
        out.constant, out.vsmlsq = self.constant[idx], self.vsmlsq[idx]
        out._windows = {span: w.subset(idx) for span, w in self._windows.items()}
        out._ties = None
        if self._ties is not None:
            start, end = self._ties[0][idx], self._ties[1][idx]
            if bool((end - start > 1).any()):
                out._ties = (start, end)
        return out

    def tie_average(self, values: torch.Tensor) -> torch.Tensor:
        """Replace each value by the mean over its group of tied abscissae."""
        if self._ties is None:
            return values
        start, end = self._ties
        p = _prefix(values)
        total = p.gather(1, end) - p.gather(1, start)
        return total / (end - start).to(values.dtype)


def running_line(axis: SortedAxis, y: torch.Tensor, span: float,
                 cross_validate: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Local linear fit over each point's nearest-neighbour window.

    Parameters
    ----------
    axis : SortedAxis
        The sorted abscissae, shape ``(b, n)``.
    y : torch.Tensor
        Ordinates in the order of ``axis``, shape ``(b, n)``.
    span : float
        Fraction of the points in each window.
    cross_validate : bool
        Also return the absolute leave-one-out residuals.

    Returns
    -------
    smooth : torch.Tensor
        Fitted values, tied abscissae averaged, shape ``(b, n)``.
    residuals : torch.Tensor or None
        ``|y - fit| / (1 - leverage)`` before tie averaging, if asked for.

    Examples
    --------
    >>> import torch
    >>> x = torch.linspace(0, 1, 50, dtype=torch.float64)[None]
    >>> fit, _ = running_line(SortedAxis(x), 2 * x + 1, 0.2)
    >>> bool(torch.allclose(fit, 2 * x + 1))
    True
    """
    w = axis.windows(span)
    sy = w.window_sum(_prefix(y))
    sxy = w.window_sum(_prefix(axis.xc * y))
    y_mean = sy / w.width
    slope = (sxy - w.x_mean * sy) * w.inv_ss
    fit = slope * (axis.xc - w.x_mean) + y_mean
    residuals = None
    if cross_validate:
        residuals = (y - fit).abs_().mul_(w.cv_scale)
        residuals = torch.where(w.cv_scale == 0, _BIG, residuals)
    return axis.tie_average(fit), residuals


def _smooth_residuals(axis: SortedAxis, res: torch.Tensor) -> torch.Tensor:
    """Leave-one-out residuals smoothed over the midrange span.

    A residual of _BIG (a point of leverage 1) is undefined: it stays out of the sums, and
    every point whose window holds one gets _BIG, so that span is not chosen there. Summed
    in, its 1e20 would leave only rounding noise in the windows around it.
    """
    undefined = res >= _BIG
    if not bool(undefined.any()):
        return running_line(axis, res, MIDRANGE)[0]
    out = running_line(axis, torch.where(undefined, 0.0, res), MIDRANGE)[0]
    held = axis.windows(MIDRANGE).window_sum(_prefix(undefined.to(res.dtype))) > 0
    return torch.where(held, _BIG, out)


def supersmoother(axis: SortedAxis, y: torch.Tensor, alpha: float = 0.0) -> torch.Tensor:
    """Friedman's supersmoother with cross-validated span per point.

    Parameters
    ----------
    axis : SortedAxis
        The sorted abscissae, shape ``(b, n)``.
    y : torch.Tensor
        Ordinates in the order of ``axis``, shape ``(b, n)``.
    alpha : float
        Bass enhancement in (0, 10]: larger values favour smoother fits. 0 turns it off.

    Returns
    -------
    torch.Tensor
        The smoothed ordinates, shape ``(b, n)``.

    Examples
    --------
    >>> import torch
    >>> x = torch.linspace(-1, 1, 200, dtype=torch.float64)[None]
    >>> fit = supersmoother(SortedAxis(x), x ** 2)
    >>> float((fit - x ** 2).abs().max()) < 0.02
    True
    """
    fits, cv = [], []
    for span in SPANS:
        fit, res = running_line(axis, y, span, cross_validate=True)
        fits.append(fit)
        cv.append(_smooth_residuals(axis, res))
    resmin = cv[0]
    spans = torch.full_like(y, TWEETER)
    for span, res in zip(SPANS[1:], cv[1:], strict=True):
        better = res < resmin
        resmin = torch.where(better, res, resmin)
        spans = torch.where(better, span, spans)
    if 0.0 < alpha <= 10.0:
        woofer_res = cv[2]
        # as acepack: the ratio is taken whatever the sign (the smoothed residual of the
        # woofer can dip below 0 at the ends, where running lines extrapolate)
        ratio = resmin / torch.where(woofer_res != 0, woofer_res, 1.0)
        boost = (WOOFER - spans) * ratio.clamp_(min=_SML).pow_(10.0 - alpha)
        spans = torch.where(resmin < woofer_res, spans + boost, spans)
    spans = running_line(axis, spans, MIDRANGE)[0].clamp(TWEETER, WOOFER)
    below = spans < MIDRANGE
    f_low = (MIDRANGE - spans) / (MIDRANGE - TWEETER)
    f_high = (spans - MIDRANGE) / (WOOFER - MIDRANGE)
    mixed = torch.where(below, (1 - f_low) * fits[1] + f_low * fits[0],
                        (1 - f_high) * fits[1] + f_high * fits[2])
    out = running_line(axis, mixed, TWEETER)[0]
    if bool(axis.constant.any()):
        out = torch.where(axis.constant[:, None], y.mean(dim=-1, keepdim=True), out)
    return out


def group_means(axis: SortedAxis, y: torch.Tensor) -> torch.Tensor:
    """Mean of ``y`` within each group of equal abscissae (categorical smoothing)."""
    return axis.tie_average(y)


def linear_fit(axis: SortedAxis, y: torch.Tensor) -> torch.Tensor:
    """Least-squares line through ``y``, centred on the mean abscissa."""
    xm = axis.xc - axis.xc.mean(dim=-1, keepdim=True)  # axis.xc is centred at the median
    ss = (xm * xm).sum(dim=-1, keepdim=True)
    slope = torch.where(ss > 0, (xm * y).sum(dim=-1, keepdim=True) / ss.clamp(min=1e-300), 0.0)
    return slope * xm


def monotone_smooth(axis: SortedAxis, y: torch.Tensor, alpha: float = 0.0) -> torch.Tensor:
    """Supersmoother, then the closer of the best increasing or decreasing fit (acepack).

    Flat stretches of the isotonic fit become gentle ramps and tied abscissae share one
    value, as in acepack. The isotonic step runs on the CPU, one problem at a time, with
    the compiled routines of :mod:`pcace.maxcorr.kernels`.
    """
    from .kernels import _isotonic, _ramp_flat_runs

    rows = supersmoother(axis, y, alpha).detach().cpu().numpy()
    out = np.empty_like(rows)
    for r, row in enumerate(rows):
        up = _isotonic(row)
        down = _isotonic(row[::-1].copy())[::-1]
        best = up if np.sum((row - up) ** 2) < np.sum((row - down) ** 2) else down
        out[r] = _ramp_flat_runs(np.ascontiguousarray(best))
    result = torch.as_tensor(out, dtype=y.dtype, device=y.device)
    return axis.tie_average(result)


def smooth(kind: str, axis: SortedAxis, y: torch.Tensor, alpha: float = 0.0) -> torch.Tensor:
    """Dispatch to the smoother of a variable kind (see :data:`KINDS`)."""
    if kind == "ordered":
        return supersmoother(axis, y, alpha)
    if kind == "categorical":
        return group_means(axis, y)
    if kind == "linear":
        return linear_fit(axis, y)
    if kind == "monotone":
        return monotone_smooth(axis, y, alpha)
    raise ValueError(f"unknown variable kind {kind!r}; expected one of {KINDS}")
