"""The public shortcut to :mod:`pcace.inputs.hooks` (its names, under the path users know).

Everything here is defined in :mod:`pcace.inputs.hooks`; nothing inside pcace imports this module.
"""

from .inputs.hooks import (
    evaluating,
    forward_hooks,
    unknown_layers_message,
)

__all__ = ["evaluating", "forward_hooks", "unknown_layers_message"]
