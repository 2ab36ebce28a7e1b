"""The Ray engine: a run's ACE problems as Ray tasks, its forward pass on Ray actors.

Imported only when ``engine="ray"`` is asked for (Ray is the optional extra
``pcace[ray]``). What runs where:

- ACE problems (:meth:`RayEngine.values`): the shared data of a set of problems (a
  layer's components, the score rows, the image subsets) is put in the object store
  once; each task gets references to it plus a range of problem numbers, solves that
  range with :meth:`pcace.engines.engine.Problems.solve` (the local engine's own code) and
  returns its values, a small array. Tasks are sized from an estimate of ACE's cost
  (about ``5e-7 N k`` seconds per problem on one core): at least ``min_task_seconds``
  (well above Ray's scheduling overhead of a few milliseconds), at most
  ``max_task_seconds`` and the memory plan's cap, and otherwise about four per CPU slot.
  A task whose worker dies is re-run by Ray (``max_retries``); a problem's value does
  not depend on its chunk, so the values are those of the local engine.
- The sharded forward pass (:func:`pcace.engines.shards.sharded_components`): one actor per
  CPU slot (or GPU) rebuilds the model from its spec and opens the data by path.

The cluster: ``address=None`` starts a local one for the engine's lifetime (stopped by
:meth:`RayEngine.close`); ``"auto"`` joins the one running on this machine;
``"HOST:PORT"`` or ``"ray://HOST:PORT"`` a remote one. An already-initialised Ray (the
caller's ``ray.init``) is used as it is and left running. Workers must import the same
pcace as the driver: install it on every node, or pass a ``runtime_env``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from ..core.errors import first_line
from ..core.voice import action, option
from .engine import Engine, EngineLost, Problems, solve_in_process

#: Seconds per (observation x predictor) of one ACE problem on one core (measured:
#: 3.7e-7 on an idle 2-core Xeon at N = 300, k = 3; 1.3e-6 to 1.8e-6 under load 5).
SECONDS_PER_VALUE = 5e-7
#: Seconds between two looks at the cluster's size.
SLOTS_SECONDS = 30.0


def _ray() -> Any:
    try:
        import ray
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"{option('engine', 'ray', python=repr('ray'))} needs Ray: "
                          "pip install 'pcace[ray]'") from err
    return ray


def _identity(value: Any) -> str:
    """What tells two actors' arguments apart: specs by value, live objects by identity."""
    if value is None or isinstance(value, str | int | float | bool | Mapping | list | tuple):
        return repr(value)
    return f"{type(value).__qualname__}@{id(value):x}"


def _solve_chunk(z: np.ndarray, ys: np.ndarray, channels: np.ndarray, order: str,
                 images: np.ndarray | None, lo: int, hi: int, score: str,
                 options: dict, threads: int) -> np.ndarray:
    """A Ray task: the values of problems ``lo .. hi - 1`` (runs on a worker)."""
    # one task per CPU slot: its ACE call uses that slot's threads (set before the kernels
    # start their pool; a worker runs only these tasks)
    os.environ.setdefault("NUMBA_NUM_THREADS", str(threads))
    return Problems(z, ys, channels, order, images).solve(lo, hi, score, options)


def _warm_up(threads: int) -> int:
    """A Ray task: import pcace and load ACE's compiled kernels on a worker (returns its pid)."""
    os.environ.setdefault("NUMBA_NUM_THREADS", str(threads))
    rng = np.random.default_rng(0)
    Problems(rng.normal(size=(1, 30, 1)), rng.normal(size=(1, 30)), np.arange(1)).solve(0, 1)
    return os.getpid()


class RayEngine(Engine):
    """Solve ACE problems as Ray tasks on a cluster.

    Parameters
    ----------
    address : str, optional
        None: start a local cluster (stopped by :meth:`close`); ``"auto"``: join the
        cluster running on this machine; ``"HOST:PORT"`` / ``"ray://HOST:PORT"``: join
        that one.
    num_cpus : int, optional
        CPUs of a local cluster started here (default: all).
    runtime_env : dict, optional
        Ray runtime environment of the job (e.g. ``{"env_vars": {"PYTHONPATH": ...}}``).
    task_cpus : int, default 1
        CPUs each task reserves (and the threads its ACE call uses).
    min_task_seconds, max_task_seconds : float
        Bounds on a task's estimated running time (see the module's notes).
    inline_seconds : float, default 0.05
        Problem sets estimated to take less than this run in the driver (a task would
        cost more than it saves); their values are the same.
    max_retries : int, default 5
        Times Ray re-runs a task whose worker died.
    lost_after : float, default 10
        Seconds the cluster's GCS may refuse connections before the engine gives up on
        it (:class:`~pcace.engines.engine.EngineLost`); Ray itself ends the process after 60.

    Examples
    --------
    >>> from pcace.engines.ray import RayEngine       # doctest: +SKIP
    >>> engine = RayEngine(address="auto")            # doctest: +SKIP
    >>> engine.describe()["resources"]["CPU"]         # doctest: +SKIP
    2.0
    """

    def __init__(self, address: str | None = None, *, num_cpus: int | None = None,
                 runtime_env: dict | None = None, task_cpus: int = 1,
                 min_task_seconds: float = 0.1, max_task_seconds: float = 2.0,
                 inline_seconds: float = 0.05, max_retries: int = 5,
                 lost_after: float = 10.0):
        super().__init__(name="ray")
        ray = _ray()
        self.owned = False
        if not ray.is_initialized():
            options: dict[str, Any] = {"runtime_env": runtime_env, "log_to_driver": False,
                                       **quiet_ray_logs()}
            if address is None:
                options.update(address="local", num_cpus=num_cpus, include_dashboard=False)
            else:
                if num_cpus is not None:
                    raise ValueError("num_cpus is for a local cluster (address=None); a "
                                     "running cluster has its own")
                options["address"] = address
            try:
                ray.init(**options)
            except ConnectionError as err:
                raise EngineLost(f"cannot join the Ray cluster at {address!r}: {err}. Start "
                                 "one with `ray start --head` (see the docs, 'On a Ray cluster')") \
                    from None
            self.owned = True
        try:
            self.address = ray.get_runtime_context().gcs_address
        except Exception:  # noqa: BLE001 - the Ray client (ray://) does not know it
            self.address = address
        self.task_cpus = int(task_cpus)
        self.min_task_seconds, self.max_task_seconds = min_task_seconds, max_task_seconds
        self.inline_seconds = inline_seconds
        self.lost_after = float(lost_after)
        self.tasks = 0
        self._slots: tuple[float, int] | None = None
        self._actors: tuple[str, list[Any]] | None = None
        self._shipped: list[Any] = []
        self._remote = ray.remote(_solve_chunk).options(
            num_cpus=self.task_cpus, max_retries=int(max_retries), retry_exceptions=False)
        # workers import pcace and load the compiled kernels while the driver runs the
        # forward pass (seconds per worker; otherwise paid by the first ACE tasks)
        warm = ray.remote(_warm_up).options(num_cpus=self.task_cpus, max_retries=0)
        self._warming = [warm.remote(self.task_cpus) for _ in range(self.slots())]

    # ------------------------------------------------------------------ cluster facts

    def resources(self) -> dict[str, float]:
        """The cluster's total resources (``CPU``, ``GPU``, memory, object store)."""
        ray = self._connected()
        self._ensure_reachable()
        keep = ("CPU", "GPU", "memory", "object_store_memory")
        return {k: float(v) for k, v in ray.cluster_resources().items() if k in keep}

    def slots(self) -> int:
        """Tasks the cluster runs at once (CPUs over CPUs per task; at least 1).

        Asked of the cluster at most every ``SLOTS_SECONDS`` (nodes come and go).
        """
        now = time.monotonic()
        if self._slots is None or now - self._slots[0] > SLOTS_SECONDS:
            self._slots = (now, max(1, int(self.resources().get("CPU", 1) // self.task_cpus)))
        return self._slots[1]

    def describe(self) -> dict[str, Any]:
        ray = _ray()
        out = super().describe()
        if not ray.is_initialized():  # disconnected (the cluster went away)
            out.update(address=self.address, tasks=self.tasks, task_cpus=self.task_cpus,
                       connected=False)
            return out
        try:
            nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
            out.update(address=self.address, nodes=nodes, resources=self.resources())
        except Exception as err:  # noqa: BLE001 - the cluster may be gone by now
            out.update(address=self.address, error=str(err))
        out.update(tasks=self.tasks, task_cpus=self.task_cpus)
        return out

    @property
    def alive(self) -> bool:
        return _ray().is_initialized()

    def _connected(self) -> Any:
        """Ray, if still connected (never re-initialised behind the caller's back)."""
        ray = _ray()
        if not ray.is_initialized():
            raise EngineLost(f"the Ray engine is disconnected from {self.address}")
        return ray

    def summary(self) -> str:
        info = self.describe()
        res = info.get("resources", {})
        return (f"engine ray at {self.address}: {info.get('nodes', '?')} node(s), "
                f"{res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs, "
                f"{res.get('object_store_memory', 0) / 2**30:.1f} GiB object store")

    def close(self) -> None:
        self._actors = None
        if self.owned:
            _ray().shutdown()
            self.owned = False

    # ------------------------------------------------------------------ sharded passes

    def forget_shards(self) -> None:
        """Let the actors of :meth:`map_shards` go (the next call builds new ones)."""
        if self._actors is not None:
            ray = _ray()
            for actor in self._actors[1]:
                ray.kill(actor)
        self._actors = None
        self._shipped = []

    def map_shards(self, cls: type, args: tuple, kwargs: dict, method: str,
                   bounds: list[tuple[int, int]], extra: tuple = (),
                   on_shard: Callable[[int, int], Any] | None = None) -> list[Any]:
        """``cls(*args, **kwargs).method(lo, hi, *extra)`` for each shard, on actors.

        One actor per CPU slot (``task_cpus`` CPUs each; at most one per shard) is made
        for a given ``(cls, args, kwargs)`` and kept for later calls with the same ones
        (the second pass reuses the models the first one built). ``extra`` is put in the
        object store once. Results come back in shard order; ``on_shard(lo, hi)`` is called
        as each finishes. An actor whose process dies
        is restarted (it rebuilds its model) and its call re-run.
        """
        ray = self._connected()
        self._ensure_reachable()
        key = repr((cls.__qualname__, [_identity(a) for a in args],
                    sorted((k, _identity(v)) for k, v in kwargs.items())))
        if self._actors is None or self._actors[0] != key:
            count = max(1, min(self.slots(), len(bounds)))
            actor = ray.remote(cls).options(num_cpus=self.task_cpus, max_restarts=3,
                                            max_task_retries=3)
            shipped = [ray.put(a) for a in args]  # a model or dataset travels once
            self._actors = (key, [actor.remote(*shipped, **kwargs) for _ in range(count)])
            self._shipped = shipped  # kept while the actors live: a restart rebuilds from them
        actors = list(self._actors[1])
        out: list[Any] = [None] * len(bounds)
        try:
            refs = [ray.put(e) for e in extra]
            todo = iter(enumerate(bounds))
            pending: dict[Any, tuple[int, Any]] = {}
            for actor in actors:
                nxt = next(todo, None)
                if nxt is None:
                    break
                i, (lo, hi) = nxt
                pending[getattr(actor, method).remote(lo, hi, *refs)] = (i, actor)
            while pending:
                ready = self._wait(list(pending))
                for ref in ready:
                    i, actor = pending.pop(ref)
                    out[i] = ray.get(ref)
                    if on_shard is not None:
                        on_shard(*bounds[i])
                    nxt = next(todo, None)
                    if nxt is not None:
                        j, (lo, hi) = nxt
                        pending[getattr(actor, method).remote(lo, hi, *refs)] = (j, actor)
        except ray.exceptions.RayTaskError as err:
            raise err.as_instanceof_cause() from None
        except ray.exceptions.RayError as err:
            raise EngineLost(_lost_message(self.address, err)) from None
        return out

    # ------------------------------------------------------------------ ACE problems

    def task_size(self, problems: Problems, cap: int) -> int:
        """Problems per task for this set (see the module's notes)."""
        per = SECONDS_PER_VALUE * problems.observations * problems.predictors / self.task_cpus
        lo = max(1, math.ceil(self.min_task_seconds / per))
        hi = max(lo, min(cap, math.ceil(self.max_task_seconds / per)))
        spread = math.ceil(len(problems) / (4 * self.slots()))
        return int(min(cap, min(hi, max(lo, spread))))

    def _solve(self, problems: Problems, chunk: int, score: str, options: dict,
               progress: Callable[[int], Any] | None) -> np.ndarray:
        total = len(problems)
        estimate = SECONDS_PER_VALUE * total * problems.observations * problems.predictors
        if estimate < self.inline_seconds:
            return solve_in_process(problems, chunk, score, options, progress)
        ray = self._connected()
        self._ensure_reachable()
        on_cpu = _to_numpy(problems)
        size = self.task_size(on_cpu, chunk)
        bounds = [(lo, min(lo + size, total)) for lo in range(0, total, size)]
        out = np.empty(total, dtype=np.float64)
        window = 8 * self.slots()
        try:
            z_ref, ys_ref = ray.put(on_cpu.z), ray.put(on_cpu.ys)
            ch_ref = ray.put(on_cpu.channels)
            img_ref = None if on_cpu.images is None else ray.put(on_cpu.images)
            pending: dict[Any, tuple[int, int]] = {}
            todo = iter(bounds)
            for lo, hi in todo:
                pending[self._submit(z_ref, ys_ref, ch_ref, on_cpu.order, img_ref, lo, hi,
                                     score, options)] = (lo, hi)
                if len(pending) >= window:
                    break
            while pending:
                ready = self._wait(list(pending))
                for ref in ready:
                    lo, hi = pending.pop(ref)
                    out[lo:hi] = ray.get(ref)
                    if progress is not None:
                        progress(hi - lo)
                    nxt = next(todo, None)
                    if nxt is not None:
                        pending[self._submit(z_ref, ys_ref, ch_ref, on_cpu.order, img_ref,
                                             *nxt, score, options)] = nxt
        except ray.exceptions.RayTaskError as err:  # the task itself raised: its error
            raise err.as_instanceof_cause() from None
        except ray.exceptions.RayError as err:
            raise EngineLost(_lost_message(self.address, err)) from None
        except EngineLost:
            raise
        except BaseException:  # Ctrl-C: stop the tasks still queued or running
            if ray.is_initialized():
                for ref in list(locals().get("pending", {})):
                    try:
                        ray.cancel(ref, force=True)
                    except Exception:  # noqa: BLE001, S110 - best effort on the way out
                        pass
            raise
        return out

    def _wait(self, refs: list[Any]) -> list[Any]:
        """The finished refs among ``refs``, waiting for one; checks the cluster meanwhile.

        Ray ends a driver whose GCS has been unreachable for a minute (a hard exit). When
        the GCS refuses connections for ``lost_after`` seconds, the engine disconnects
        first and raises :class:`~pcace.engines.engine.EngineLost`, so that the run can keep its
        finished layers.
        """
        ray = _ray()
        down_since = None
        while True:
            ready, _ = ray.wait(refs, num_returns=1, timeout=1.0)
            if ready:
                return ready
            if _reachable(self.address):
                down_since = None
                continue
            down_since = down_since or time.monotonic()
            if time.monotonic() - down_since >= self.lost_after:
                self._give_up()

    def _ensure_reachable(self) -> None:
        """Before a call that would block on the GCS: give up on a cluster that is gone.

        A call to a dead GCS waits for a minute and then Ray ends the process; this raises
        :class:`~pcace.engines.engine.EngineLost` after ``lost_after`` seconds instead.
        """
        down_since = None
        while not _reachable(self.address):
            down_since = down_since or time.monotonic()
            if time.monotonic() - down_since >= self.lost_after:
                self._give_up()
            time.sleep(0.5)

    def _give_up(self) -> None:
        """Disconnect from a cluster that is gone and raise EngineLost."""
        _ray().shutdown()
        self.owned = False
        self._actors, self._slots = None, None
        raise EngineLost(f"the Ray cluster at {self.address} is gone (its GCS refuses "
                         f"connections for {self.lost_after:g} s). {_kept_advice()}")

    def _submit(self, z_ref: Any, ys_ref: Any, ch_ref: Any, order: str, img_ref: Any,
                lo: int, hi: int, score: str, options: dict) -> Any:
        self.tasks += 1
        return self._remote.remote(z_ref, ys_ref, ch_ref, order, img_ref, lo, hi, score,
                                   options, self.task_cpus)


def quiet_ray_logs() -> dict[str, Any]:
    """Keep Ray's own log lines below warning off the terminal, unless asked for.

    Ray's Python loggers then report warnings and above ("Started a local Ray instance"
    and "Connecting to existing Ray cluster" are gone); ``PCACE_RAY_LOGS=1`` keeps Ray's
    defaults. The error lines of Ray's C++ core (``E ... core_worker``, ``task_manager``)
    reach stderr whatever this says; ``RAY_BACKEND_LOG_LEVEL=fatal`` in the environment
    silences them too, at the price of one line of Ray's saying so. What they are about
    (a worker that died, a cluster that went away) pcace handles and reports in its own
    words.

    Returns
    -------
    dict
        Extra options for ``ray.init`` (``logging_level``); empty when logs are asked for.

    Examples
    --------
    >>> import os
    >>> os.environ["PCACE_RAY_LOGS"] = "1"; quiet_ray_logs()
    {}
    >>> del os.environ["PCACE_RAY_LOGS"]; quiet_ray_logs()["logging_level"]
    30
    """
    import logging

    asked = os.environ.get("PCACE_RAY_LOGS", "").strip().lower()
    if asked not in ("", "0", "false", "no", "off"):
        return {}
    return {"logging_level": logging.WARNING}


def _reachable(address: str | None, timeout: float = 1.0) -> bool:
    """Whether the GCS at ``HOST:PORT`` accepts a TCP connection (True when unknown)."""
    import socket

    if not address or ":" not in address:
        return True
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except ConnectionRefusedError:
        return False
    except (OSError, ValueError):
        return True  # a slow or odd network: let Ray decide
    return True


def _to_numpy(problems: Problems) -> Problems:
    """The same problems with CPU float64 NumPy data (tasks run the CPU ACE engine)."""
    def host(a: Any) -> np.ndarray:
        if isinstance(a, torch.Tensor):
            a = a.detach().cpu().numpy()
        return np.ascontiguousarray(a)

    z = host(problems.z).astype(np.float64, copy=False)
    ys = host(problems.ys).astype(np.float64, copy=False)
    images = None if problems.images is None else host(problems.images)
    return Problems(z, ys, np.asarray(problems.channels), problems.order, images)


def _lost_message(address: str | None, err: BaseException) -> str:
    kind = type(err).__name__
    return (f"the Ray cluster at {address} stopped answering ({kind}: "
            f"{first_line(err, default='')}). {_kept_advice()}")


def _kept_advice() -> str:
    """What to do after a lost cluster, in the caller's words."""
    return (f"The layers finished so far are kept: {action('resume_lost')} (on this cluster "
            f"once it is back, on a new one, or with "
            f"{option('engine', 'local', python=repr('local'))})")


def wait_for_cluster(address: str, cpus: float, timeout: float = 60.0) -> None:
    """Block until the cluster at ``address`` shows ``cpus`` CPUs (for scripts and tests)."""
    ray = _ray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ray.cluster_resources().get("CPU", 0) >= cpus:
            return
        time.sleep(0.2)
    raise TimeoutError(f"the Ray cluster at {address} did not show {cpus} CPUs in {timeout} s")
