"""Where a run's independent ACE problems are solved: in this process, or on a Ray cluster.

Every statistic of a run (observed values, permutation null, split-half check,
bootstrap) reduces to many independent ACE problems that share their data: a layer's
principal-component scores ``z`` ``(C, N, k)`` and a table of score rows (the permuted
scores, or the scores of each half). :class:`Problems` describes such a set by index,
without copying the data per problem; an :class:`Engine` turns it into values, chunk
by chunk, each chunk through :func:`pcace.maxcorr.scoring.channel_values`.

- :class:`LocalEngine` (the default) runs the chunks one after the other in this
  process, exactly as the statistics did before engines existed.
- ``RayEngine`` (:mod:`pcace.engines.ray`, imported only when asked for) puts the
  shared data in Ray's object store once and runs the chunks as Ray tasks.

Both decide the problems, their order and the score rows in the same code (the caller's);
only where the chunks run differs. A problem's value does not depend on the other
problems of its chunk (the ACE engine solves each problem on its own), so the values
are the same whatever the chunk size and the number of workers.

Examples
--------
>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> z = rng.normal(size=(3, 50, 2))
>>> ys = rng.normal(size=(4, 50))                 # four score rows (e.g. permutations)
>>> problems = Problems(z, ys, channels=np.arange(3), order="channel")
>>> len(problems)
12
>>> values = LocalEngine().values(problems, chunk=5)
>>> values.shape
(12,)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from ..core.threads import parallel_ranges
from ..core.validation import score_kind
from ..maxcorr.ace import ace_shared
from ..maxcorr.kernels import sort_rows
from ..maxcorr.scoring import channel_values

__all__ = ["ENGINES", "Engine", "EngineLost", "LocalEngine", "Problems"]

#: ``ace_options`` the shared-set-up solver takes (the rest go to :func:`pcace.ace`).
_SHARED_OPTIONS = {"x_kind", "y_kind", "delrsq", "max_iter", "alpha", "backend", "dtype",
                   "bins"}

#: Engine names :func:`resolve_engine` accepts.
ENGINES = ("local", "ray")


class EngineLost(RuntimeError):
    """The engine's workers went away (a Ray cluster stopped or became unreachable).

    :func:`pcace.rank` treats it like an interruption: the layers finished before are
    kept (and checkpointed with ``checkpoint_dir``), and the run resumes with ``resume``.
    """


@dataclass(frozen=True)
class Problems:
    """A set of ACE problems over shared data, described by index.

    Problem ``p`` is channel ``c`` of ``z`` against score row ``r`` of ``ys``:

    - ``order="channel"`` (channel-major): ``c = channels[p // R]``, ``r = p % R``;
    - ``order="row"`` (row-major): ``c = channels[p % L]``, ``r = p // L``;
    - ``order="paired"``: ``c = channels[p]``, ``r = p`` (one row per problem, ``R = L``);

    with ``R`` the number of rows and ``L = len(channels)``. Its predictors are
    ``z[c]`` (all ``N`` images) or, when ``images`` is given, ``z[c, images[r]]``.

    Parameters
    ----------
    z : numpy.ndarray or torch.Tensor
        ``(C, N, k)`` float64 principal-component scores. A CUDA tensor keeps the local
        engine on its device.
    ys : numpy.ndarray or torch.Tensor
        ``(R, M)`` score rows (``M = N`` without ``images``), on ``z``'s device.
    channels : numpy.ndarray
        ``(L,)`` channel indices into ``z`` (e.g. the live channels).
    order : {"channel", "row", "paired"}
        How problems are numbered (see above).
    images : numpy.ndarray, optional
        ``(R, M)`` image indices per row: problem ``(c, r)`` sees those images only.

    Examples
    --------
    >>> import numpy as np
    >>> z = np.zeros((2, 6, 1)); ys = np.arange(12.0).reshape(2, 6)
    >>> p = Problems(z, ys, np.array([1]), order="row")
    >>> p.index(0, 2)
    (array([1, 1]), array([0, 1]))
    """

    z: Any
    ys: Any
    channels: np.ndarray
    order: Literal["channel", "row", "paired"] = "channel"
    images: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.order not in ("channel", "row", "paired"):
            raise ValueError(f"order must be 'channel', 'row' or 'paired'; got {self.order!r}")
        if self.order == "paired" and len(self.channels) != self.ys.shape[0]:
            raise ValueError("order='paired' needs one score row per channel")
        if self.z.ndim != 3 or self.ys.ndim != 2:
            raise ValueError(f"z must be (C, N, k) and ys (R, M); got {tuple(self.z.shape)} "
                             f"and {tuple(self.ys.shape)}")
        if self.images is not None and tuple(self.images.shape) != tuple(self.ys.shape):
            raise ValueError("images must have the shape of ys")

    @property
    def rows(self) -> int:
        """``R``, the number of score rows."""
        return int(self.ys.shape[0])

    @property
    def observations(self) -> int:
        """Observations per problem (``M``)."""
        return int(self.ys.shape[1])

    @property
    def predictors(self) -> int:
        """``k``."""
        return int(self.z.shape[2])

    def __len__(self) -> int:
        if self.order == "paired":
            return int(len(self.channels))
        return int(len(self.channels)) * self.rows

    def index(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Channels and rows of problems ``lo .. hi - 1``."""
        p = np.arange(lo, hi)
        if self.order == "paired":
            return self.channels[p], p
        if self.order == "channel":
            return self.channels[p // self.rows], p % self.rows
        n_ch = len(self.channels)
        return self.channels[p % n_ch], p // n_ch

    def take(self, lo: int, hi: int) -> tuple[Any, Any]:
        """The predictors ``(b, M, k)`` and scores ``(b, M)`` of problems ``lo .. hi - 1``."""
        ch, rows = self.index(lo, hi)
        if isinstance(self.z, torch.Tensor):
            dev = self.z.device
            ch_t, rows_t = torch.as_tensor(ch, device=dev), torch.as_tensor(rows, device=dev)
            if self.images is None:
                return self.z[ch_t], self.ys[rows_t]
            sel = torch.as_tensor(self.images[rows], device=dev)
            return self.z[ch_t[:, None], sel], self.ys[rows_t]
        if self.images is None:
            return self.z[ch], self.ys[rows]
        return self.z[ch[:, None], self.images[rows]], self.ys[rows]

    def solve(self, lo: int, hi: int, score: str = "maximal",
              ace_options: dict | None = None) -> np.ndarray:
        """Values of problems ``lo .. hi - 1`` (:func:`pcace.maxcorr.scoring.channel_values`)."""
        options = dict(ace_options or {})
        if self._shares_setup(options):
            ch, rows = self.index(lo, hi)
            settings = {k: v for k, v in options.items() if k not in ("backend", "dtype")}
            # channel-major within the chunk: a channel's set-up serves its problems
            turn = np.lexsort((rows, ch))
            used, local = np.unique(rows, return_inverse=True)
            z, ys = self._host_data()
            images = None if self.images is None else self.images[used]
            rho, first = ace_shared(z, ys[used], ch[turn], local[turn], images=images,
                                    orders=self._response_orders(used), **settings)
            out = np.empty_like(rho)
            out[turn] = np.clip(rho, 0.0, 1.0) if score_kind(score) == "maximal" else first
            return out
        xs, ys = self.take(lo, hi)
        return channel_values(xs, ys, score, options)

    def _shares_setup(self, options: dict) -> bool:
        """Whether :func:`pcace.maxcorr.ace.ace_shared` can solve these problems (CPU)."""
        return (_on_host(self.z) and _on_host(self.ys) and self._ascending_images()
                and set(options) <= _SHARED_OPTIONS and options.get("backend", "auto") != "torch"
                and options.get("dtype") in (None, torch.float64))

    def _ascending_images(self) -> bool:
        """No image subsets, or each row's subset in ascending order (checked once)."""
        if self.images is None:
            return True
        if "_ascending" not in self.__dict__:
            images = np.asarray(self.images)
            self.__dict__["_ascending"] = bool((np.diff(images, axis=1) > 0).all())
        return self.__dict__["_ascending"]

    def _host_data(self) -> tuple[np.ndarray, np.ndarray]:
        """``z`` and ``ys`` as float64 NumPy arrays, converted once per problem set."""
        if "_host" not in self.__dict__:
            self.__dict__["_host"] = (_host(self.z), _host(self.ys))
        return self.__dict__["_host"]

    def _response_orders(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sort orders and group labels of score rows ``rows``, each row sorted once per set.

        A row whose sorted values equal the previous new row's (a permutation of it) gets
        its group label (see :func:`pcace.maxcorr.ace.response_orders`).
        """
        cache = self.__dict__.setdefault("_orders", {})
        ys = self._host_data()[1]
        new = [r for r in dict.fromkeys(int(r) for r in rows) if r not in cache]
        orders = np.empty((len(new), ys.shape[1]), dtype=np.int64)
        if new:  # numpy's stable order, by radix sorts, the rows in parallel
            parallel_ranges(sort_rows, len(new), np.ascontiguousarray(ys),
                            np.array(new, dtype=np.int64), orders)
        for r, order in zip(new, orders, strict=True):
            values = ys[r][order]
            group, last = self.__dict__.get("_last_sorted", (-1, None))
            if last is None or not np.array_equal(values, last):
                group += 1
                self.__dict__["_last_sorted"] = (group, values)
            cache[r] = (order, group)
        return (np.stack([cache[int(r)][0] for r in rows]),
                np.array([cache[int(r)][1] for r in rows], dtype=np.int64))


def _on_host(a: Any) -> bool:
    """A NumPy array or a CPU tensor."""
    return not isinstance(a, torch.Tensor) or a.device.type == "cpu"


def _host(a: Any) -> np.ndarray:
    """``a`` as a float64 NumPy array (a view where it already is one)."""
    if isinstance(a, torch.Tensor):
        a = a.detach().numpy()
    return np.asarray(a, dtype=np.float64)


@dataclass
class Engine:
    """Solves :class:`Problems` in chunks; records the seconds spent per stage.

    Subclasses implement :meth:`_solve`. ``stage_seconds`` accumulates wall time per
    stage label (``"observed"``, ``"null"``, ``"split_half"``, ``"bootstrap"``, ...).
    """

    name: str = "local"
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def values(self, problems: Problems, *, chunk: int, score: str = "maximal",
               ace_options: dict | None = None, stage: str = "ace",
               progress: Callable[[int], Any] | None = None) -> np.ndarray:
        """The ``(len(problems),)`` float64 values, in problem order.

        Parameters
        ----------
        problems : Problems
        chunk : int
            At most this many problems per ACE call (the memory plan's cap).
        score, ace_options
            As for :func:`pcace.maxcorr.scoring.channel_values`.
        stage : str
            Label under which the time is recorded.
        progress : callable, optional
            Called with the number of problems finished, as chunks finish.
        """
        start = time.perf_counter()
        total = len(problems)
        out = np.zeros(total, dtype=np.float64) if total == 0 else \
            self._solve(problems, max(1, int(chunk)), score, dict(ace_options or {}), progress)
        self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + \
            time.perf_counter() - start
        return out

    def time_stage(self, stage: str, seconds: float) -> None:
        """Add ``seconds`` to ``stage`` (work timed by the caller)."""
        self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds

    def _solve(self, problems: Problems, chunk: int, score: str, options: dict,
               progress: Callable[[int], Any] | None) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What the manifest records: the engine, its resources, per-stage seconds."""
        return {"name": self.name, "stage_seconds": dict(self.stage_seconds)}

    @property
    def alive(self) -> bool:
        """False once the engine's workers are gone (then run the rest elsewhere)."""
        return True

    def summary(self) -> str:
        """One line for progress output: the engine and what it runs on."""
        return f"engine {self.name}"

    def close(self) -> None:
        """Release what the engine started (nothing for the local engine)."""


@dataclass
class LocalEngine(Engine):
    """Chunks solved one after the other in this process (threads inside each ACE call).

    Examples
    --------
    >>> LocalEngine().describe()["name"]
    'local'
    """

    name: str = "local"

    def _solve(self, problems: Problems, chunk: int, score: str, options: dict,
               progress: Callable[[int], Any] | None) -> np.ndarray:
        return solve_in_process(problems, chunk, score, options, progress)


def solve_in_process(problems: Problems, chunk: int, score: str, options: dict,
                     progress: Callable[[int], Any] | None = None) -> np.ndarray:
    """All of ``problems`` in this process, ``chunk`` at a time, in problem order."""
    total = len(problems)
    flat = np.empty(total, dtype=np.float64)
    for lo in range(0, total, chunk):
        hi = min(lo + chunk, total)
        flat[lo:hi] = problems.solve(lo, hi, score, options)
        if progress is not None:
            progress(hi - lo)
    return flat
