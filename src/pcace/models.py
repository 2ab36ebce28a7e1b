"""The public shortcut to :mod:`pcace.inputs.models` (its names, under the path users know).

Everything here is defined in :mod:`pcace.inputs.models`; nothing inside pcace imports this module.
"""

from .inputs.models import (
    LoadedModel,
    count_parameters,
    load_model,
    load_state_dict_file,
    output_size,
    rebuild_model,
    resolve_torchvision_weights,
    weights_hash,
)

__all__ = ["count_parameters", "load_model", "load_state_dict_file", "LoadedModel",
           "output_size", "rebuild_model", "resolve_torchvision_weights", "weights_hash"]
