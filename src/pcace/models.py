"""The public shortcut to :mod:`pcace.inputs.models` and :mod:`pcace.inputs.rebuild`.

Everything here is defined there; nothing inside pcace imports this module.
"""

from .inputs.models import (
    LoadedModel,
    count_parameters,
    load_model,
    load_state_dict_file,
    output_size,
    resolve_torchvision_weights,
    weights_hash,
)
from .inputs.rebuild import (
    rebuild_model,
)

__all__ = ["count_parameters", "load_model", "load_state_dict_file", "LoadedModel",
           "output_size", "rebuild_model", "resolve_torchvision_weights", "weights_hash"]
