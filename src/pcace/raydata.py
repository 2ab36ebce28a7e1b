"""The public shortcut to :mod:`pcace.inputs.raydata` (its names, under the path users know).

Everything here is defined in :mod:`pcace.inputs.raydata`; nothing inside pcace imports this module.
"""

from .inputs.raydata import (
    RayBatches,
    RayImages,
    is_ray_dataset,
)

__all__ = ["is_ray_dataset", "RayBatches", "RayImages"]
