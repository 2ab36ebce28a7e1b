"""The engine a run asks for by name: this process, or a Ray cluster.

Examples
--------
>>> engine, owned = resolve_engine("local")
>>> engine.name, owned
('local', True)
"""

from __future__ import annotations

from typing import Any

from ..core.voice import option
from .engine import ENGINES, Engine, LocalEngine

__all__ = ["resolve_engine"]


def resolve_engine(engine: str | Engine | None = "local", address: str | None = None,
                   **options: Any) -> tuple[Engine, bool]:
    """An :class:`Engine` for a name, and whether the caller owns it (must close it).

    Parameters
    ----------
    engine : {"local", "ray"} or Engine or None
        A name, or an engine the caller made (returned as is, not owned). None: local.
    address : str, optional
        For ``"ray"``: the cluster to join (``"auto"``: the one running on this machine,
        ``"HOST:PORT"``, ``"ray://HOST:PORT"``); None starts a local cluster for the run.
    **options
        Further keyword arguments of ``pcace.engines.ray.RayEngine``.

    Examples
    --------
    >>> engine, owned = resolve_engine("local")
    >>> engine.name, owned
    ('local', True)
    """
    if engine is None:
        engine = "local"
    if isinstance(engine, Engine):
        return engine, False
    if engine == "local":
        if address is not None:
            raise ValueError(f"{option('ray_address', 'ADDRESS', python='...')} is for "
                             f"{option('engine', 'ray', python=repr('ray'))}")
        return LocalEngine(), True
    if engine == "ray":
        from .ray import RayEngine

        return RayEngine(address=address, **options), True
    raise ValueError(f"engine must be one of {ENGINES} or an Engine; got {engine!r}")
